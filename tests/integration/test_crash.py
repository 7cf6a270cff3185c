"""Crash safety and graceful stop of a real service.

- SIGKILL of a ``twistd -n joblet-persist`` child in the middle of a steady ingest (with
  small segments, so streams span several files), then a restart on the same data directory.
- Torn tails (garbage appended, last member cut, a next segment holding only a partial
  header) left in the files of a stopped service.
- SIGTERM / SIGINT while frames are buffered and the flush timer has not fired; SIGTERM while
  senders push; a stop while ingest is paused by backpressure: what the senders had written
  into the sockets before the service closed them is read and stored.

The twistd children are started with posix_spawn (``SpawnedTwistd``), never fork: see there.

Real reactor, real processes, real sockets and files; blocking clients run in threads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from tests.integration.support import (
    SpawnedTwistd,
    TwistdProcess,
    check_gzip_files,
    grpc_call,
    gz_files,
    in_thread,
    log_frame,
    metric_frame,
    metric_values,
    ping,
    query_logs,
    query_metrics,
    send_in_pieces,
    service_config_text,
    short_tempdir,
    start_service,
    stop_service,
    wait_for,
    write_service_config,
)

JOBS = ["c0ffee00-0000-4000-8000-000000000001", "c0ffee00-0000-4000-8000-000000000002",
        "crash-job-3"]
BASE_TS = 1_710_000_000_000_000_000
FLUSH_INTERVAL = 0.2
#: Slack on top of the flush interval for "sent long enough before the kill to be stored":
#: generous, so that a loaded 2-core machine does not make the test flaky.
MARGIN = 3.0
#: How long the sender runs before the kill.
RUN_BEFORE_KILL = FLUSH_INTERVAL + MARGIN + 1.0

STDOUT, STDERR, METRICS = 1, 2, "metrics"


def _content(job: str, kind, seq: int) -> bytes:
    return f"{job} {kind} #{seq:07d} ".encode() + b"." * (seq % 61) + b"\n"


def _ts(seq: int) -> int:
    return BASE_TS + seq * 1_000_003


class PacedSender:
    """Sends LOG (stdout, stderr) and METRIC frames for each job at a steady pace.

    One connection and one thread per job; sequence numbers count 0, 1, 2, ... per
    (job, kind).  ``sent[(job, kind)]`` lists ``(seq, t)`` where ``t`` is the
    ``time.monotonic()`` at which that frame's ``sendall`` returned; ``order[job]`` lists the
    ``(kind, seq)`` of the job's frames in the order they were sent.  A send error (the
    service went away) ends the job's thread; ``errors[job]`` keeps it.  ``when_sent(n, f)``
    calls ``f`` on the reactor once every job has sent ``n`` stdout frames.
    """

    def __init__(self, path: str, jobs, tick: float = 0.01, per_tick=((STDOUT, 5), (STDERR, 2)),
                 metric_every: int = 10):
        self.path = path
        self._trigger = None
        self._reached: set[str] = set()
        self._lock = threading.Lock()
        self.jobs = list(jobs)
        self.tick = tick
        self.per_tick = per_tick
        self.metric_every = metric_every
        self.sent = {(job, kind): [] for job in self.jobs for kind in (STDOUT, STDERR, METRICS)}
        self.order = {job: [] for job in self.jobs}
        self.errors: dict[str, OSError] = {}
        self.started_at = None
        self._stop = threading.Event()

    def start(self) -> defer.Deferred:
        self.started_at = time.monotonic()
        return defer.gatherResults([in_thread(self._run, job) for job in self.jobs])

    def stop(self) -> None:
        self._stop.set()

    def when_sent(self, count: int, f) -> None:
        self._trigger = (count, f)

    def _sent_stdout(self, job: str, count: int) -> None:
        trigger = self._trigger
        if trigger is None or count != trigger[0]:
            return
        with self._lock:
            self._reached.add(job)
            if len(self._reached) == len(self.jobs):
                reactor.callFromThread(trigger[1])

    def _run(self, job: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        counters = {STDOUT: 0, STDERR: 0, METRICS: 0}
        order = self.order[job]
        try:
            sock.connect(self.path)
            next_tick = time.monotonic()
            tick = 0
            while not self._stop.is_set():
                for kind, count in self.per_tick:
                    for _ in range(count):
                        seq = counters[kind]
                        sock.sendall(log_frame(job, kind, _ts(seq), seq, _content(job, kind, seq)))
                        self.sent[(job, kind)].append((seq, time.monotonic()))
                        order.append((kind, seq))
                        counters[kind] = seq + 1
                        if kind == STDOUT:
                            self._sent_stdout(job, seq + 1)
                if tick % self.metric_every == 0:
                    seq = counters[METRICS]
                    sock.sendall(metric_frame(job, _ts(seq), seq, metric_values(seq)))
                    self.sent[(job, METRICS)].append((seq, time.monotonic()))
                    order.append((METRICS, seq))
                    counters[METRICS] = seq + 1
                tick += 1
                # Pacing of the load generator (not a wait for the service).
                next_tick += self.tick
                self._stop.wait(max(0.0, next_tick - time.monotonic()))
        except OSError as e:
            self.errors[job] = e
        finally:
            sock.close()


def _job_info(sock: str, job: str):
    return grpc_call(
        sock,
        lambda stub, t: stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t),
    )


def _stats(sock: str):
    return grpc_call(sock, lambda stub, t: stub.GetStats(persist_pb2.GetStatsRequest(), timeout=t))


def _job_files_size(data_dir: str, job: str) -> int:
    total = 0
    for top in ("logs", "metrics"):
        directory = os.path.join(data_dir, top, job)
        if os.path.isdir(directory):
            total += sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
    return total


def _healthy(sock: str) -> defer.Deferred:
    d = threads.deferToThread(ping, sock, 1.0)
    return d.addCallback(lambda r: r is not None and r.healthy)


class _Base(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")

    async def start_twistd(self, config: str) -> TwistdProcess:
        proc = SpawnedTwistd(self, self.dir, ["--config", config])
        try:
            await wait_for(lambda: _healthy(self.grpc_sock), timeout=30, what="Ping healthy")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        return proc

    async def wait_exit(self, proc: TwistdProcess, timeout: float) -> int:
        """The child's exit status; fails with its output if it does not exit in time."""
        try:
            return await proc.wait_exit(timeout)
        except defer.TimeoutError:
            self.fail(f"the service did not exit within {timeout}s; output:\n{proc.output}")

    async def read_job(self, job: str) -> dict:
        """Merged, stdout, stderr logs and metrics of ``job`` over gRPC."""
        sock = self.grpc_sock
        return {
            0: await threads.deferToThread(query_logs, sock, job, 0),
            STDOUT: await threads.deferToThread(query_logs, sock, job, STDOUT),
            STDERR: await threads.deferToThread(query_logs, sock, job, STDERR),
            METRICS: await threads.deferToThread(query_metrics, sock, job),
        }


class SigkillTests(_Base):
    async def test_sigkill_mid_ingest_then_restart(self):
        """A service receiving a steady stream is killed with SIGKILL and restarted on the same
        data directory.  Afterwards: every .gz file decodes completely (Python gzip and
        ``gzip -t``); per (job, stream) and for metrics the stored sequence numbers are exactly
        0..k-1 (a prefix of what was sent, in order, no gaps, no duplicates) with byte-exact
        content; everything sent more than flushInterval + 3 s before the kill is stored; the
        job index agrees with the files; new frames after the restart are stored after the old
        ones, in the merged view too.  Every .gz file passes ``gzip -t`` once the jobs are
        loaded (loading cuts torn tails and removes segments left with no complete member)."""
        config = write_service_config(
            self.dir,
            {
                "writer": {"flushInterval": FLUSH_INTERVAL},
                # Small segments: the crash hits a job whose streams span several files.
                "storage": {"segmentMaxBytes": "4KiB"},
            },
        )
        proc = await self.start_twistd(config)

        sender = PacedSender(self.ipc_sock, JOBS)
        sending = sender.start()
        await wait_for(
            lambda: time.monotonic() - sender.started_at >= RUN_BEFORE_KILL,
            timeout=RUN_BEFORE_KILL + 10,
            what="the sender to run",
        )
        killed_at = time.monotonic()
        proc.signal("KILL")
        self.assertEqual(await self.wait_exit(proc, 10), -signal.SIGKILL)
        sender.stop()
        await sending
        self.assertTrue(os.path.exists(self.ipc_sock), "a SIGKILLed service leaves its socket")

        proc = await self.start_twistd(config)  # replaces the stale socket
        # The job index as refreshed from the files on start, before any job is loaded.
        infos = {}
        for job in JOBS:
            infos[job] = await threads.deferToThread(_job_info, self.grpc_sock, job)
        cutoff = killed_at - FLUSH_INTERVAL - MARGIN
        stored = {}
        for job in JOBS:
            data = stored[job] = await self.read_job(job)
            for kind in (STDOUT, STDERR, METRICS):
                sent = sender.sent[(job, kind)]
                got = data[kind]
                seqs = [item.sequence for item in got]
                self.assertEqual(seqs, list(range(len(seqs))), f"{job}/{kind}: not a prefix")
                self.assertLessEqual(len(seqs), len(sent), f"{job}/{kind}: more than sent")
                required = sum(1 for _, t in sent if t < cutoff)
                self.assertGreater(required, 0)
                self.assertGreaterEqual(
                    len(seqs), required, f"{job}/{kind}: lost data older than the window"
                )
                for item in got:
                    self.assertEqual(item.timestamp, _ts(item.sequence))
                    if kind == METRICS:
                        self.assertEqual(item.data.memory_usage, (1 << 50) + item.sequence)
                    else:
                        self.assertEqual(item.content, _content(job, kind, item.sequence))
            # Merged arrival order is the order the connection sent them in.
            self.assertEqual(
                [(ln.stream, ln.sequence) for ln in data[0]],
                [(kind, seq) for kind, seq in sender.order[job]
                 if kind != METRICS and seq < len(data[kind])],
            )

        # Jobs are loaded (torn tails cut) now: every file is complete gzip, and the segments
        # of a stream, in name order, hold its content.
        decoded = await threads.deferToThread(check_gzip_files, self, self.data_dir)
        for job in JOBS:
            directory = os.path.join(self.data_dir, "logs", job)
            names = sorted(n for n in os.listdir(directory) if n.startswith("stdout"))
            self.assertGreater(len(names), 1, "no rotation happened")
            self.assertEqual(
                b"".join(decoded[os.path.join(directory, n)] for n in names),
                b"".join(ln.content for ln in stored[job][STDOUT]),
            )
        for job in JOBS:
            info = await threads.deferToThread(_job_info, self.grpc_sock, job)
            for seen in (infos[job], info):
                self.assertEqual(seen.log_count, len(stored[job][0]))
                self.assertEqual(seen.metric_count, len(stored[job][METRICS]))
            self.assertEqual(info.size_bytes, _job_files_size(self.data_dir, job))
            # Before the job was loaded its files were not repaired yet: the index counted
            # the bytes on disk, a torn tail (a kill part way through a write) included.
            self.assertGreaterEqual(infos[job].size_bytes, info.size_bytes)

        # New ingest after the restart goes after the old data.
        new_logs = {job: [] for job in JOBS}
        payload = bytearray()
        for i in range(30):
            job = JOBS[i % len(JOBS)]
            kind = STDOUT if i % 3 else STDERR
            seq = 1_000_000 + i
            payload += log_frame(job, kind, _ts(seq), seq, _content(job, kind, seq))
            new_logs[job].append((kind, seq))
        await in_thread(send_in_pieces, self.ipc_sock, bytes(payload))

        def all_stored():
            counts = defer.gatherResults(
                [threads.deferToThread(_job_info, self.grpc_sock, job) for job in JOBS]
            )
            return counts.addCallback(
                lambda infos: all(
                    info.log_count == len(stored[job][0]) + len(new_logs[job])
                    for job, info in zip(JOBS, infos, strict=True)
                )
            )

        await wait_for(all_stored, timeout=10, what="frames sent after the restart stored")
        for job in JOBS:
            merged = await threads.deferToThread(query_logs, self.grpc_sock, job, 0)
            self.assertEqual(
                [(ln.stream, ln.sequence) for ln in merged],
                [(ln.stream, ln.sequence) for ln in stored[job][0]] + new_logs[job],
            )

        proc.signal("TERM")
        self.assertIn(await self.wait_exit(proc, 15), (0, -signal.SIGTERM), proc.output)
        await threads.deferToThread(check_gzip_files, self, self.data_dir)
        with open(os.path.join(self.data_dir, "job_index.json")) as f:
            index = json.load(f)["jobs"]
        self.assertEqual(set(index), set(JOBS))
        for job in JOBS:
            entry = index[job]
            self.assertEqual(entry["log_count"], len(stored[job][0]) + len(new_logs[job]))
            self.assertEqual(entry["metric_count"], len(stored[job][METRICS]))
            self.assertEqual(entry["size_bytes"], _job_files_size(self.data_dir, job))


class TornTailTests(_Base):
    def _config(self) -> str:
        return service_config_text(self.dir, {"writer": {"flushInterval": "30s"}})

    async def _send(self, root, frames: list[bytes]) -> None:
        writer = root.components["writer"]
        target = writer.messages_received + len(frames)
        await in_thread(send_in_pieces, self.ipc_sock, b"".join(frames))
        await wait_for(lambda: writer.messages_received >= target, timeout=10, what="frames read")
        await writer.flush_all()

    def _batch(self, job: str, first: int, count: int) -> tuple[list, list, list]:
        frames, logs, metrics = [], [], []
        for seq in range(first, first + count):
            kind = STDERR if seq % 4 == 1 else STDOUT
            frames.append(log_frame(job, kind, _ts(seq), seq, _content(job, kind, seq)))
            logs.append((kind, seq))
            if seq % 5 == 0:
                frames.append(metric_frame(job, _ts(seq), seq, metric_values(seq)))
                metrics.append(seq)
        return frames, logs, metrics

    async def test_torn_tails_cut_on_restart(self):
        """Files of a stopped service get a torn tail: garbage that starts like a gzip member
        appended to stdout, stderr's last member cut in half, the metrics file's last member
        missing its trailer.  On restart the tails are cut (each file back to the end of its
        last complete member), everything before them is intact and queryable, every file
        passes ``gzip -t``, and new data is appended after the earlier data in order.  A next
        stdout segment holding nothing but the start of a gzip header (a crash right after it
        was created) holds no complete member: it is removed (an empty file is not gzip), and
        the new stdout data goes on in the first segment."""
        job = JOBS[0]
        paths = {
            STDOUT: os.path.join(self.data_dir, "logs", job, "stdout.log.gz"),
            STDERR: os.path.join(self.data_dir, "logs", job, "stderr.log.gz"),
            METRICS: os.path.join(self.data_dir, "metrics", job, "metrics.jsonl.gz"),
        }
        root = await start_service(self, self._config())
        frames_a, logs_a, metrics_a = self._batch(job, 0, 40)
        await self._send(root, frames_a)
        size_a = {kind: os.path.getsize(path) for kind, path in paths.items()}
        frames_b, logs_b, metrics_b = self._batch(job, 40, 40)
        await self._send(root, frames_b)
        size_b = {kind: os.path.getsize(path) for kind, path in paths.items()}
        for kind in paths:
            self.assertGreater(size_b[kind], size_a[kind])
        await stop_service(root)

        with open(paths[STDOUT], "ab") as f:
            f.write(b"\x1f\x8b\x08\x04" + os.urandom(300))
        next_stdout = os.path.join(self.data_dir, "logs", job, "stdout_000001.log.gz")
        with open(next_stdout, "wb") as f:
            f.write(b"\x1f\x8b\x08")
        os.truncate(paths[STDERR], size_a[STDERR] + (size_b[STDERR] - size_a[STDERR]) // 2)
        os.truncate(paths[METRICS], size_b[METRICS] - 3)

        root = await start_service(self, self._config())
        data = await self.read_job(job)
        kept = logs_a + [(kind, seq) for kind, seq in logs_b if kind == STDOUT]
        self.assertEqual([(ln.stream, ln.sequence) for ln in data[0]], kept)
        for ln in data[0]:
            self.assertEqual(ln.content, _content(job, ln.stream, ln.sequence))
            self.assertEqual(ln.timestamp, _ts(ln.sequence))
        self.assertEqual([m.sequence for m in data[METRICS]], metrics_a)
        self.assertEqual(os.path.getsize(paths[STDOUT]), size_b[STDOUT])
        self.assertEqual(os.path.getsize(paths[STDERR]), size_a[STDERR])
        self.assertEqual(os.path.getsize(paths[METRICS]), size_a[METRICS])
        self.assertFalse(os.path.lexists(next_stdout))
        self.assertEqual(root.components["storage"].repaired_segments, 4)
        self.assertEqual(len(gz_files(self.data_dir)), 3)
        await threads.deferToThread(check_gzip_files, self, self.data_dir)

        frames_c, logs_c, metrics_c = self._batch(job, 80, 20)
        await self._send(root, frames_c)
        data = await self.read_job(job)
        self.assertEqual([(ln.stream, ln.sequence) for ln in data[0]], kept + logs_c)
        self.assertEqual([m.sequence for m in data[METRICS]], metrics_a + metrics_c)
        info = await threads.deferToThread(_job_info, self.grpc_sock, job)
        self.assertEqual(info.log_count, len(kept) + len(logs_c))
        self.assertEqual(info.size_bytes, _job_files_size(self.data_dir, job))
        decoded = await threads.deferToThread(check_gzip_files, self, self.data_dir)
        self.assertEqual(decoded[paths[STDOUT]], b"".join(ln.content for ln in data[STDOUT]))
        self.assertGreater(os.path.getsize(paths[STDOUT]), size_b[STDOUT])
        self.assertEqual(len(gz_files(self.data_dir)), 3)


class GracefulStopTests(_Base):
    FRAMES_PER_JOB = 1500

    async def _stop_with(self, signame: str):
        config = write_service_config(
            self.dir, {"writer": {"flushInterval": "30s", "indexInterval": "30s"}}
        )
        proc = await self.start_twistd(config)
        expected = {}
        payloads = []
        for n, job in enumerate(JOBS):
            frames, logs, metrics = bytearray(), [], []
            for seq in range(self.FRAMES_PER_JOB):
                kind = STDERR if (seq * 7 + n) % 5 == 0 else STDOUT
                frames += log_frame(job, kind, _ts(seq), seq, _content(job, kind, seq))
                logs.append((kind, seq))
                if seq % 50 == 0:
                    frames += metric_frame(job, _ts(seq), seq, metric_values(seq))
                    metrics.append(seq)
            expected[job] = (logs, metrics)
            payloads.append(bytes(frames))
        total = sum(len(logs) + len(metrics) for logs, metrics in expected.values())

        await defer.gatherResults([in_thread(send_in_pieces, self.ipc_sock, p) for p in payloads])
        # Every frame has been read by the service (its own count says so) ...
        stats = await wait_for(
            lambda: threads.deferToThread(_stats, self.grpc_sock).addCallback(
                lambda s: s.messages_received == total and s
            ),
            timeout=15,
            what="all frames received",
        )
        # ... and none written yet: only the stop path can store them.
        self.assertEqual(stats.messages_written, 0)
        self.assertEqual(os.listdir(self.data_dir), ["job_index.json"])
        proc.signal(signame)
        code = await self.wait_exit(proc, 15)
        self.assertIn(code, (0, -getattr(signal, "SIG" + signame)), proc.output)
        self.assertNotIn("Traceback", proc.output)
        self.assertFalse(os.path.exists(self.ipc_sock))
        self.assertFalse(os.path.exists(self.grpc_sock))

        await threads.deferToThread(check_gzip_files, self, self.data_dir)
        with open(os.path.join(self.data_dir, "job_index.json")) as f:
            index = json.load(f)["jobs"]
        await start_service(self, service_config_text(self.dir))
        for job in JOBS:
            logs, metrics = expected[job]
            data = await self.read_job(job)
            self.assertEqual([(ln.stream, ln.sequence) for ln in data[0]], logs)
            self.assertEqual([m.sequence for m in data[METRICS]], metrics)
            self.assertEqual(index[job]["log_count"], len(logs))
            self.assertEqual(index[job]["metric_count"], len(metrics))

    async def _check_stored_exactly(self, sender: PacedSender) -> None:
        """Every frame whose sendall returned is stored, in order; nothing else is."""
        await start_service(self, service_config_text(self.dir))
        for job in JOBS:
            data = await self.read_job(job)
            for kind in (STDOUT, STDERR, METRICS):
                sent = [seq for seq, _ in sender.sent[(job, kind)]]
                self.assertGreater(len(sent), 0)
                self.assertEqual([item.sequence for item in data[kind]], sent, f"{job}/{kind}")
            for ln in data[0]:
                self.assertEqual(ln.content, _content(job, ln.stream, ln.sequence))
        await threads.deferToThread(check_gzip_files, self, self.data_dir)

    async def test_sigterm_while_sending(self):
        """SIGTERM while senders push as fast as they can: the service stops reading new
        bytes but reads what is already queued in its sockets, so every frame whose
        ``sendall`` returned before the service shut the connection is stored, in order,
        and the senders see the connection refuse further bytes."""
        config = write_service_config(self.dir, {"writer": {"flushInterval": "30s"}})
        proc = await self.start_twistd(config)
        sender = PacedSender(self.ipc_sock, JOBS, tick=0.0)
        # The signal goes out the moment every sender is well under way (and the amount of
        # data stays bounded whatever the machine's load).
        sender.when_sent(2000, lambda: proc.signal("TERM"))
        sending = sender.start()
        self.assertIn(await self.wait_exit(proc, 30), (0, -signal.SIGTERM), proc.output)
        await sending
        self.assertEqual(set(sender.errors), set(JOBS), "each sender saw its connection end")
        await self._check_stored_exactly(sender)

    async def test_stop_drains_connections_paused_by_backpressure(self):
        """Ingest is paused by backpressure (high-water mark reached, no flush due for 30 s)
        and the senders block with frames queued in the sockets.  Stopping the service reads
        those queued frames despite the pause and stores them with everything else: every
        frame whose ``sendall`` returned is on disk, in order."""
        text = service_config_text(
            self.dir,
            {
                "writer": {
                    "flushInterval": "30s",
                    "highWaterBytes": "512KiB",
                    "lowWaterBytes": "256KiB",
                },
            },
        )
        root = await start_service(self, text)
        writer, factory = root.components["writer"], root.components["factory"]
        sender = PacedSender(self.ipc_sock, JOBS, tick=0.0)
        sending = sender.start()
        await wait_for(
            lambda: writer.paused and factory.paused, timeout=20, what="backpressure"
        )
        self.assertEqual(writer.messages_written, 0)
        await stop_service(root)
        await sending
        self.assertEqual(set(sender.errors), set(JOBS))
        await self._check_stored_exactly(sender)

    async def test_sigterm_flushes_everything_received(self):
        """With a 30 s flush interval, frames the service has read but not yet written are all
        on disk (in order, complete gzip, counted in the job index) after SIGTERM, and the
        process exits cleanly with its sockets removed."""
        await self._stop_with("TERM")

    async def test_sigint_flushes_everything_received(self):
        """Like SIGTERM: SIGINT flushes every received frame before the process exits."""
        await self._stop_with("INT")
