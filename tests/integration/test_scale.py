"""Scale: 10,000 jobs over 200 concurrent IPC connections, and SIGTERM while 200 connections pump.

Real reactor, real Unix sockets, real files.  The load generator (``Pump``) drives many
non-blocking connections from a few threads with ``selectors`` and counts, per key, the frames
whose last byte the kernel accepted: for a Unix stream socket that byte is then in the
service's receive queue, which the service drains on a graceful stop (``shutdown(SHUT_RD)``,
then read to end of file), so stored counts must equal these counts exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import signal
import socket
import threading
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from joblet_persist.storage import jobindex
from tests.integration.support import (
    TwistdProcess,
    check_gzip_files,
    grpc_call,
    in_thread,
    log_frame,
    metric_frame,
    metric_values,
    ping,
    service_config_text,
    short_tempdir,
    start_service,
    wait_for,
    write_service_config,
)

BASE_TS = 1_730_000_000_000_000_000
SEND_CHUNK = 1 << 16


def job_name(n: int) -> str:
    """The id of job ``n`` of a scale run (valid, UUID-like, sorts by ``n``)."""
    return f"5ca1e000-0000-4000-8000-{n:012d}"


def proc_rss_bytes(pid="self") -> int:
    """Resident set size of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def proc_fds(pid="self") -> list[str]:
    """Targets of a process's open file descriptors (``readlink /proc/PID/fd/*``)."""
    base = f"/proc/{pid}/fd"
    targets = []
    for name in os.listdir(base):
        try:
            targets.append(os.readlink(os.path.join(base, name)))
        except FileNotFoundError:
            continue
    return targets


class Pump:
    """Many Unix-socket connections driven by a few threads.  Blocking; runs on its own threads.

    ``next_chunk(conn)`` returns the next bytes of connection ``conn`` as ``(data, ends)``,
    where ``ends`` lists ``(end_offset, key)`` of each frame in ``data``, or None when the
    connection has nothing more to send (it is then closed).  ``sent[key]`` counts the frames
    whose last byte was accepted by ``send``; ``closed_by_peer`` the connections that ended
    with EPIPE/ECONNRESET.  ``stop()`` makes every connection close at its next chunk
    boundary; a partly sent chunk is still finished unless the peer goes away.
    """

    def __init__(self, path: str, connections: int, next_chunk, threads_: int = 4):
        self.path = path
        self.connections = connections
        self.next_chunk = next_chunk
        self.threads = max(1, min(threads_, connections))
        self.sent: dict = {}
        self.bytes_sent = 0
        self.closed_by_peer = 0
        self.connected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.all_connected = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> dict:
        """Connect every connection, pump until all are done; returns ``sent``.  Blocking."""
        workers = []
        errors = []
        for t in range(self.threads):
            conns = list(range(t, self.connections, self.threads))
            th = threading.Thread(target=self._guard, args=(conns, errors), daemon=True,
                                  name=f"pump-{t}")
            th.start()
            workers.append(th)
        for th in workers:
            th.join()
        if errors:
            raise errors[0]
        return self.sent

    def _guard(self, conns, errors) -> None:
        try:
            self._work(conns)
        except BaseException as e:  # reported by run()
            errors.append(e)
            self.all_connected.set()

    def _connect(self) -> socket.socket:
        # A listener's backlog may be full for a moment: a non-blocking Unix-socket connect
        # then fails with EAGAIN instead of waiting.  Retry until the deadline.
        deadline = time.monotonic() + 30
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
            except BaseException:
                sock.close()
                raise

    def _work(self, conns) -> None:
        sel = selectors.DefaultSelector()
        state = {}
        for conn in conns:
            sock = self._connect()
            state[sock] = [conn, b"", 0, [], 0]  # conn, data, pos, ends, next end index
            sel.register(sock, selectors.EVENT_WRITE)
        with self._lock:
            self.connected += len(conns)
            if self.connected == self.connections:
                self.all_connected.set()
        self.all_connected.wait(60)
        local: dict = {}
        sent_bytes = 0
        try:
            while state:
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    st = state[sock]
                    if st[2] >= len(st[1]):
                        chunk = None if self._stop.is_set() else self.next_chunk(st[0])
                        if chunk is None:
                            sel.unregister(sock)
                            sock.close()
                            del state[sock]
                            continue
                        st[1], st[3] = chunk
                        st[2] = st[4] = 0
                    try:
                        n = sock.send(memoryview(st[1])[st[2]:st[2] + SEND_CHUNK])
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                            raise
                        sel.unregister(sock)
                        sock.close()
                        del state[sock]
                        with self._lock:
                            self.closed_by_peer += 1
                        continue
                    sent_bytes += n
                    pos = st[2] = st[2] + n
                    ends, i = st[3], st[4]
                    while i < len(ends) and ends[i][0] <= pos:
                        k = ends[i][1]
                        local[k] = local.get(k, 0) + 1
                        i += 1
                    st[4] = i
        finally:
            for sock in state:
                sock.close()
            sel.close()
            with self._lock:
                for k, v in local.items():
                    self.sent[k] = self.sent.get(k, 0) + v
                self.bytes_sent += sent_bytes


def _frames_chunk(frames: list[tuple[object, bytes]]) -> tuple[bytes, list]:
    data = bytearray()
    ends = []
    for key, fr in frames:
        data += fr
        ends.append((len(data), key))
    return bytes(data), ends


def _content(job: int, stream: int, seq: int) -> bytes:
    return f"job {job} stream {stream} line {seq:06d} ".encode() + b"=" * (seq * 7 % 50) + b"\n"


def _stats(sock: str):
    return grpc_call(sock, lambda stub, t: stub.GetStats(persist_pb2.GetStatsRequest(), timeout=t))


def _job_info(sock: str, job: str):
    return grpc_call(
        sock,
        lambda stub, t: stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t),
    )


class ManyJobsManyConnectionsTests(unittest.TestCase):
    """10,000 jobs spread over 200 concurrent connections into an in-process service."""

    timeout = 150
    JOBS = 10_000
    CONNECTIONS = 200
    LOGS_PER_JOB = 3  # stdout, stderr, stdout
    METRIC_EVERY = 25  # every 25th job also sends one metric sample
    INDEX_INTERVAL = 1.0
    #: RSS growth allowed per job: every job seen stays loaded (writer state, member index,
    #: published snapshot); about 5 KiB of objects per job here, 15-18 KiB of RSS with the
    #: allocator's fragmentation after 20,000 appends complete at once.
    RSS_PER_JOB_MAX = 25 << 10

    def _plan(self):
        """Per connection, one chunk: its jobs' frames interleaved round by round."""
        plan = {}
        expected_logs = {}
        expected_metrics = {}
        for conn in range(self.CONNECTIONS):
            frames = []
            jobs = range(conn, self.JOBS, self.CONNECTIONS)
            for r in range(self.LOGS_PER_JOB):
                stream = 2 if r == 1 else 1
                for n in jobs:
                    job = job_name(n)
                    frames.append(
                        (n, log_frame(job, stream, BASE_TS + r, r, _content(n, stream, r)))
                    )
                    expected_logs[n] = expected_logs.get(n, 0) + 1
            for n in jobs:
                if n % self.METRIC_EVERY == 0:
                    frames.append(
                        (n, metric_frame(job_name(n), BASE_TS + 9, 0, metric_values(n)))
                    )
                    expected_metrics[n] = 1
            plan[conn] = [_frames_chunk(frames)]
        return plan, expected_logs, expected_metrics

    async def test_ten_thousand_jobs_two_hundred_connections(self):
        """Every frame of 10,000 jobs sent over 200 connections open at once is stored
        (GetStats totals, the job index, and the files scanned from scratch agree); the
        storage never holds more segment files open than it has pool threads (files are
        opened per append and closed at once, so open descriptors do not grow with jobs);
        total descriptors stay within the connections plus a small constant; RSS growth is
        bounded; and the job index is written at most once per indexInterval (debounced),
        not once per flush."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        ipc_sock = os.path.join(directory, "ipc.sock")
        grpc_sock = os.path.join(directory, "grpc.sock")

        index_writes = []
        real_write = jobindex.thd_write

        def counting_write(path, jobs, parts=None, *rest):
            index_writes.append((time.monotonic(), len(jobs)))
            return real_write(path, jobs, parts, *rest)

        self.patch(jobindex, "thd_write", counting_write)

        plan, expected_logs, expected_metrics = self._plan()
        total_logs = sum(expected_logs.values())
        total_metrics = sum(expected_metrics.values())
        rss_before = proc_rss_bytes()
        fds_before = len(proc_fds())

        root = await start_service(
            self,
            service_config_text(
                directory,
                {"writer": {"indexInterval": self.INDEX_INTERVAL, "flushInterval": "500ms"}},
            ),
        )
        parts = root.components
        writer, pool_threads = parts["writer"], parts["config"].writer.thread_count

        samples = {"data_fds": 0, "fds": 0, "rss": 0}
        sampling = threading.Event()

        def sample() -> None:
            prefix = data_dir + os.sep
            while not sampling.is_set():
                fds = proc_fds()
                samples["fds"] = max(samples["fds"], len(fds))
                samples["data_fds"] = max(
                    samples["data_fds"], sum(1 for t in fds if t.startswith(prefix))
                )
                samples["rss"] = max(samples["rss"], proc_rss_bytes())
                sampling.wait(0.02)

        sampler = in_thread(sample)
        plans = {conn: list(chunks) for conn, chunks in plan.items()}
        pump = Pump(ipc_sock, self.CONNECTIONS, lambda conn: plans[conn].pop()
                    if plans[conn] else None)
        started = time.monotonic()
        await in_thread(pump.run)
        await wait_for(
            lambda: writer.messages_received == total_logs + total_metrics,
            timeout=60,
            what="every frame received",
        )
        await writer.flush_all()
        elapsed = time.monotonic() - started
        writes_during_run = len(index_writes)
        sampling.set()
        await sampler

        self.assertEqual(pump.sent, {n: expected_logs[n] + expected_metrics.get(n, 0)
                                     for n in expected_logs})
        self.assertEqual(writer.messages_written, total_logs + total_metrics)
        stats = await threads.deferToThread(_stats, grpc_sock)
        self.assertEqual(stats.total_jobs, self.JOBS)
        self.assertEqual(stats.total_logs, total_logs)
        self.assertEqual(stats.total_metrics, total_metrics)
        self.assertEqual(stats.write_errors, 0)
        for n in (0, 1, 4_999, self.JOBS - 1):
            info = await threads.deferToThread(_job_info, grpc_sock, job_name(n))
            self.assertEqual(info.log_count, self.LOGS_PER_JOB)
            self.assertEqual(info.metric_count, expected_metrics.get(n, 0))

        # Descriptors under the data directory exist only while a pool thread works on a
        # file: at most the file and its directory (being fsync'd) per thread, whether it is
        # an append, the index write or the health probe.  Sockets: one per connection.
        self.assertLessEqual(samples["data_fds"], 2 * pool_threads, samples)
        self.assertLessEqual(samples["fds"], fds_before + 2 * self.CONNECTIONS + 64, samples)
        self.assertLess(samples["rss"] - rss_before, self.JOBS * self.RSS_PER_JOB_MAX, samples)
        # Debounced index: one write per interval at most (plus the one at start).
        self.assertLessEqual(writes_during_run, elapsed / self.INDEX_INTERVAL + 2,
                             (writes_during_run, elapsed))

        Logger().info(
            "scale figures: {jobs} jobs, {connections} connections, {frames} frames stored in "
            "{elapsed:.1f}s; max open files under the data directory {data_fds} ({threads} "
            "pool threads), max descriptors {fds} ({before} before start), RSS growth "
            "{rss_growth} MiB, job index writes during the run {writes}",
            jobs=self.JOBS, connections=self.CONNECTIONS, frames=total_logs + total_metrics,
            elapsed=elapsed, data_fds=samples["data_fds"], threads=pool_threads,
            fds=samples["fds"], before=fds_before, rss_growth=(samples["rss"] - rss_before) >> 20,
            writes=writes_during_run,
        )

        # The files are the truth: a scan from scratch finds the same counts.
        await root.stopService()
        rebuilt = await threads.deferToThread(jobindex.thd_rebuild, data_dir)
        self.assertEqual(len(rebuilt), self.JOBS)
        self.assertEqual(sum(i.log_count for i in rebuilt.values()), total_logs)
        self.assertEqual(sum(i.metric_count for i in rebuilt.values()), total_metrics)
        with open(os.path.join(data_dir, "job_index.json")) as f:
            index = json.load(f)["jobs"]
        self.assertEqual(
            {job: (e["log_count"], e["metric_count"], e["size_bytes"]) for job, e in index.items()},
            {job: (i.log_count, i.metric_count, i.size_bytes) for job, i in rebuilt.items()},
        )


class _Stream:
    """What the graceful-restart senders send: endless chunks, per connection, of LOG frames
    of two jobs (both streams) and a METRIC frame, with per-(job, kind) sequence numbers."""

    FRAMES_PER_CHUNK = 48

    def __init__(self, connections: int, first_job: int):
        self.jobs = {c: (job_name(first_job + 2 * c), job_name(first_job + 2 * c + 1))
                     for c in range(connections)}
        self.seq: dict = {}
        self._lock = threading.Lock()

    def chunk(self, conn: int):
        frames = []
        jobs = self.jobs[conn]
        seq = self.seq
        for i in range(self.FRAMES_PER_CHUNK):
            job = jobs[i & 1]
            stream = 2 if i % 6 == 5 else 1
            key = (job, stream)
            n = seq.get(key, 0)
            seq[key] = n + 1
            frames.append((key, log_frame(job, stream, BASE_TS + n, n, _content(conn, stream, n))))
        key = (jobs[0], "metrics")
        n = seq.get(key, 0)
        seq[key] = n + 1
        frames.append((key, metric_frame(jobs[0], BASE_TS + n, n, metric_values(n))))
        return _frames_chunk(frames)


def _stored_counts(data_dir: str, jobs) -> dict:
    """(job, 1 | 2 | "metrics") -> messages in the files, from a header scan.  Blocking."""
    counts = {}
    kinds = {"stdout": 1, "stderr": 2, "metrics": "metrics"}
    for job in jobs:
        scan = jobindex.thd_scan_job(data_dir, job, repair=False)
        if scan is None:
            continue
        for kind, key in kinds.items():
            n = sum(m.count for seg in scan.kind_segments(kind) for m in seg.result.members)
            if n:
                counts[(job, key)] = n
    return counts


class GracefulRestartUnderLoadTests(unittest.TestCase):
    """SIGTERM to a ``twistd -n joblet-persist`` child while 200 connections pump frames."""

    timeout = 120
    CONNECTIONS = 200
    PUMP_SECONDS = 2.0

    async def test_sigterm_while_two_hundred_connections_pump(self):
        """While 200 connections write as fast as they can, SIGTERM stops the service: it
        exits cleanly, and for every (job, stream) and every job's metrics the files hold
        exactly the frames whose last byte the sender's kernel accepted before the service
        closed the connection (the service drains its receive queues before it stops; a frame
        cut off mid-write is the only thing not stored, and the sender never counted it).  The
        job index written at stop agrees with the files, every file is complete gzip, and the
        stored sequence numbers per (job, stream) are 0..n-1.  The service is then started
        again on the same directory and serves the same counts."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        ipc_sock = os.path.join(directory, "ipc.sock")
        grpc_sock = os.path.join(directory, "grpc.sock")
        config = write_service_config(directory, {"writer": {"flushInterval": "500ms"}})
        proc = TwistdProcess(self, directory, ["--config", config])
        await wait_for(
            lambda: threads.deferToThread(ping, grpc_sock, 1.0).addCallback(
                lambda r: r is not None and r.healthy
            ),
            timeout=30,
            what="service healthy",
        )

        stream = _Stream(self.CONNECTIONS, first_job=1_000_000)
        pump = Pump(ipc_sock, self.CONNECTIONS, stream.chunk)
        pumping = in_thread(pump.run)
        await wait_for(pump.all_connected.is_set, timeout=30, what="all connections open")
        pump_started = time.monotonic()
        received = await wait_for(
            lambda: threads.deferToThread(_stats, grpc_sock).addCallback(
                lambda s: time.monotonic() - pump_started >= self.PUMP_SECONDS
                and s.messages_received
            ),
            timeout=30,
            what="the pump to run",
        )
        self.assertFalse(pumping.called, "the senders stopped before SIGTERM")
        proc.signal("TERM")
        code = await proc.wait_exit(30)
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        self.assertNotIn("Traceback", proc.output)
        self.assertNotIn("were not stored", proc.output)
        sent = await pumping
        self.assertEqual(pump.closed_by_peer, self.CONNECTIONS)
        self.assertGreater(received, 0)

        all_jobs = [job for pair in stream.jobs.values() for job in pair]
        stored = await threads.deferToThread(_stored_counts, data_dir, all_jobs)
        Logger().info(
            "graceful restart figures: {connections} connections; the service had received "
            "{received} frames shortly before SIGTERM; senders fully wrote {sent} frames "
            "({nbytes} bytes) before their connections were closed; {stored} stored",
            connections=self.CONNECTIONS, received=received, sent=sum(sent.values()),
            nbytes=pump.bytes_sent, stored=sum(stored.values()),
        )
        self.assertEqual(sum(stored.values()), sum(sent.values()))
        self.assertEqual(stored, {k: v for k, v in sent.items() if v})
        with open(os.path.join(data_dir, "job_index.json")) as f:
            index = json.load(f)["jobs"]
        for job in all_jobs:
            logs = stored.get((job, 1), 0) + stored.get((job, 2), 0)
            self.assertEqual(index[job]["log_count"], logs, job)
            self.assertEqual(index[job]["metric_count"], stored.get((job, "metrics"), 0), job)
        await threads.deferToThread(check_gzip_files, self, data_dir)

        # Restarted on the same files, the service reports the same counts and the stored
        # sequence numbers of a few jobs are exactly 0..n-1 in each stream.
        root = await start_service(self, service_config_text(directory))
        storage = root.components["storage"]
        self.assertEqual(
            sum(i.log_count + i.metric_count for i in storage.list_jobs()), sum(sent.values())
        )
        for job in all_jobs[:: len(all_jobs) // 4]:
            snap = await storage.open_job(job)
            for st in (1, 2):
                seqs = await threads.deferToThread(
                    lambda s=snap, st=st: [r.sequence for r in s.iter_logs(st)]
                )
                self.assertEqual(seqs, list(range(stored.get((job, st), 0))), (job, st))


class _QueuedRunner:
    """A thread runner that queues blocking work until ``drain()`` runs it: as a busy pool
    does, it lets the reactor side issue many calls before any of them completes."""

    def __init__(self):
        self.queue: list = []
        self.calls: dict = {}

    def __call__(self, f, *args, **kwargs):
        from twisted.internet import defer

        self.calls[f.__name__] = self.calls.get(f.__name__, 0) + 1
        d = defer.Deferred()
        self.queue.append((d, f, args, kwargs))
        return d

    def drain(self) -> int:
        """Run everything queued so far (not what their callbacks queue); return how many."""
        from twisted.internet import defer

        batch, self.queue = self.queue, []
        for d, f, args, kwargs in batch:
            defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)
        return len(batch)


class RetentionKeepsUpTests(unittest.SynchronousTestCase):
    """Retention deleting many jobs at once, against real files and a pool that lags."""

    JOBS = 64

    def test_deleting_many_jobs_costs_a_few_index_writes(self):
        """A retention run that deletes 64 idle jobs (the job index holds 64 + 1 entries)
        completes in a handful of pool rounds with a handful of job index writes, not one
        write (of the whole index) per deleted job after another: the deletions run
        concurrently and their index writes coalesce.  The index on disk then lists only the
        job that was kept, and every deleted job's files are gone."""
        from twisted.internet import task

        from joblet_persist.retention import RetentionPolicy, RetentionRunner
        from joblet_persist.storage.api import LogBatch
        from joblet_persist.storage.compress import make_compressor
        from joblet_persist.storage.local import LocalStorage

        directory = short_tempdir(self)
        clock = task.Clock()
        clock.advance(1_700_000_000)
        runner = _QueuedRunner()
        storage = LocalStorage(directory, runner, compressor=make_compressor("zlib", 1),
                               segment_max_bytes=1 << 20, fsync="never", clock=clock)

        def settle(d) -> tuple:
            """Drain the queue until ``d`` has its result: (result, rounds)."""
            box: list = []
            d.addBoth(box.append)
            rounds = 0
            while not box:
                self.assertTrue(runner.drain(), "stuck: nothing queued")
                rounds += 1
            self.assertNotIsInstance(box[0], Failure)
            return box[0], rounds

        settle(storage.start())
        jobs = [job_name(n) for n in range(self.JOBS + 1)]
        for job in jobs:
            settle(storage.append_logs(LogBatch(job, 1, [1], [1], [0], [b"x\n"])))
        clock.advance(1000)
        # The last job stays active.
        settle(storage.append_logs(LogBatch(jobs[-1], 1, [2], [2], [1], [b"y\n"])))
        writes_before = runner.calls.get("thd_write", 0)

        retention = RetentionRunner(
            storage,
            RetentionPolicy(log_max_age=100, metric_max_age=100, active_window=50),
            clock,
            busy_jobs=set,
            discard_job=lambda job: defer_succeed(None),
        )
        result, rounds = settle(retention.run())
        self.assertEqual(result.jobs_deleted, self.JOBS)
        self.assertEqual(result.errors, 0)
        writes = runner.calls["thd_write"] - writes_before
        # One deletion after another would take 64 index writes and ~130 pool rounds.
        self.assertLessEqual(writes, 12)
        self.assertLessEqual(rounds, 20)
        with open(os.path.join(directory, "job_index.json")) as f:
            self.assertEqual(list(json.load(f)["jobs"]), [jobs[-1]])
        self.assertEqual(os.listdir(os.path.join(directory, "logs")), [jobs[-1]])


def defer_succeed(value):
    from twisted.internet import defer

    return defer.succeed(value)


class OpenFileCapTests(unittest.TestCase):
    """``storage.maxOpenFiles`` caps the data files open at once, whatever the queries do.

    Two pool threads may hold 4 files; queries share the other 2.  Sixteen concurrent
    queries over jobs of several segments, two of them stalled by their clients mid-stream,
    and ingest of new jobs at the same time: descriptors under the data directory
    (sampled from /proc/self/fd: the service runs in this process) never exceed 6, every
    query returns exactly what was stored, and the stalled streams block nobody.
    """

    timeout = 120
    JOBS = 6
    LINES = 4000
    BIG_LINES = 40_000
    MAX_OPEN_FILES = 6

    def _line(self, job: int, i: int) -> bytes:
        noise = hashlib.blake2b(b"%d.%d" % (job, i), digest_size=12).hexdigest()
        return f"cap job {job} line {i:05d} {noise}".encode()

    def _frames(self, job: int, lines: int, first_job_ts: int = BASE_TS) -> bytes:
        name = job_name(900_000 + job)
        return b"".join(
            log_frame(name, 1 + i % 2, first_job_ts + i, i, self._line(job, i))
            for i in range(lines)
        )

    @defer.inlineCallbacks
    def test_descriptors_stay_within_max_open_files(self):
        import grpc

        from joblet_persist._proto import persist_pb2_grpc
        from tests.integration.support import send_in_pieces

        directory = short_tempdir(self)
        data_dir = os.path.abspath(os.path.join(directory, "data"))
        root = yield start_service(self, service_config_text(directory, {
            "writer": {"threads": 2, "flushInterval": "50ms", "batchMaxMessages": 100},
            "storage": {"maxOpenFiles": self.MAX_OPEN_FILES, "segmentMaxBytes": "8KiB"},
            "server": {"maxConcurrentRpcs": 32},
        }))
        budget = root.components["storage"].file_budget
        self.assertEqual(budget.limit, self.MAX_OPEN_FILES - 4)
        ipc_sock, grpc_sock = f"{directory}/ipc.sock", f"{directory}/grpc.sock"
        # JOBS jobs read by the queries, and two larger ones read by the stalled streams
        # (larger than what gRPC and the socket buffer between the server and a client that
        # stopped reading, so that the server's stream really waits).
        sizes = [self.LINES] * self.JOBS + [self.BIG_LINES] * 2
        yield in_thread(send_in_pieces, ipc_sock,
                        b"".join(self._frames(j, n) for j, n in enumerate(sizes)), (1 << 16,))
        jobs = [job_name(900_000 + j) for j in range(len(sizes))]

        def all_stored():
            try:
                return all(
                    _job_info(grpc_sock, j).log_count == n for j, n in zip(jobs, sizes, strict=True)
                )
            except grpc.RpcError as e:  # NOT_FOUND until a job's first batch is stored
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False

        yield wait_for(lambda: in_thread(all_stored), 30, 0.1, "every line stored")
        segments = [
            f for f in os.listdir(jobindex.job_dir(data_dir, "stdout", jobs[0]))
            if f.endswith(".gz")
        ]
        self.assertGreater(len(segments), 4)  # more than one query may hold at once

        expected = {jobs[j]: [self._line(j, i) for i in range(n)] for j, n in enumerate(sizes)}
        stop = threading.Event()
        peak = [0]
        errors: list = []

        def sample():
            while not stop.is_set():
                n = sum(1 for t in proc_fds() if t.startswith(data_dir + "/"))
                peak[0] = max(peak[0], n)
                time.sleep(0.001)

        def read(job, batched, rounds):
            try:
                with grpc.insecure_channel(f"unix:{grpc_sock}") as channel:
                    stub = persist_pb2_grpc.PersistServiceStub(channel)
                    for _ in range(rounds):
                        req = persist_pb2.QueryLogsRequest(job_uuid=job)
                        if batched:
                            got = [ln.content for b in stub.QueryLogsBatched(req, timeout=60)
                                   for ln in b.lines]
                        else:
                            got = [ln.content for ln in stub.QueryLogs(req, timeout=60)]
                        if got != expected[job]:
                            errors.append(f"{job}: {len(got)} lines differ from what was sent")
            except BaseException as e:
                errors.append(f"{job}: {e!r}")

        stalled_ready = threading.Barrier(3)
        resume = threading.Event()

        def stalled(job):
            try:
                # No BDP probing: the receive window stays small while this client waits.
                options = [("grpc.http2.bdp_probe", 0)]
                with grpc.insecure_channel(f"unix:{grpc_sock}", options=options) as channel:
                    stub = persist_pb2_grpc.PersistServiceStub(channel)
                    it = stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=job), timeout=90)
                    got = [next(it).content]
                    stalled_ready.wait(30)
                    resume.wait(60)  # not reading: the server's stream waits on us
                    got += [ln.content for ln in it]
                    if got != expected[job]:
                        errors.append(f"stalled {job}: {len(got)} lines differ")
            except BaseException as e:
                errors.append(f"stalled {job}: {e!r}")

        def more_ingest():
            try:
                data = b"".join(self._frames(j, 300) for j in range(self.JOBS, self.JOBS + 40))
                send_in_pieces(ipc_sock, data, (1 << 15,))
            except BaseException as e:
                errors.append(f"ingest: {e!r}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stallers = [threading.Thread(target=stalled, args=(jobs[self.JOBS + i],), daemon=True)
                    for i in range(2)]
        for t in stallers:
            t.start()
        yield in_thread(stalled_ready.wait, 30)
        readers = [
            threading.Thread(target=read, args=(jobs[i % self.JOBS], i % 2 == 0, 3), daemon=True)
            for i in range(14)
        ]
        readers.append(threading.Thread(target=more_ingest, daemon=True))

        def run_all():
            for t in readers:
                t.start()
            for t in readers:
                t.join(90)
            return [t.name for t in readers if t.is_alive()]

        # Everything else completes while the two streams are stalled.
        stuck = yield in_thread(run_all)
        self.assertEqual(stuck, [])
        # The stalled streams are still in progress on the server, and hold no file.
        limiter = root.components["servicer"]._limiter
        yield wait_for(lambda: limiter.active == 2 and budget.in_use == 0, 10, 0.01,
                       "two RPCs in progress holding no file")
        resume.set()
        for t in stallers:
            yield in_thread(t.join, 60)
        stop.set()
        yield in_thread(sampler.join, 10)
        self.assertEqual(errors, [])
        self.assertLessEqual(peak[0], self.MAX_OPEN_FILES)
        self.assertGreater(peak[0], 0)
        self.assertGreaterEqual(budget.peak, 1)  # the queries' files went through the budget
        self.assertLessEqual(budget.peak, self.MAX_OPEN_FILES - 4)
        self.assertEqual(budget.in_use, 0)


class UnloadIdleJobsTests(unittest.TestCase):
    """``storage.unloadIdleAfter``: idle jobs leave memory and come back intact."""

    timeout = 60
    JOBS = 300

    @defer.inlineCallbacks
    def test_idle_jobs_unloaded_then_queried_and_appended(self):
        from tests.integration.support import query_logs, send_in_pieces

        directory = short_tempdir(self)
        root = yield start_service(self, service_config_text(directory, {
            "writer": {"flushInterval": "50ms"},
            "storage": {"unloadIdleAfter": "1s"},
        }))
        storage, writer = root.components["storage"], root.components["writer"]
        ipc_sock, grpc_sock = f"{directory}/ipc.sock", f"{directory}/grpc.sock"
        jobs = [job_name(700_000 + n) for n in range(self.JOBS)]

        def frames(first_seq: int, count: int) -> bytes:
            return b"".join(
                log_frame(job, 1 + (first_seq + i) % 2, BASE_TS + first_seq + i, first_seq + i,
                          b"%s line %d\n" % (job.encode(), first_seq + i))
                for job in jobs for i in range(count)
            )

        yield in_thread(send_in_pieces, ipc_sock, frames(0, 3), (1 << 16,))
        yield wait_for(lambda: writer.messages_written == 3 * self.JOBS, 20, 0.05, "stored")
        # Every job was loaded once; on a loaded machine the 1 s unload timer may already
        # have dropped the first ones while the last were still being written.
        self.assertEqual(storage.loaded_jobs + storage.unloaded_jobs, self.JOBS)
        # Within a minute... the unload timer runs every second here (unloadIdleAfter 1s).
        yield wait_for(lambda: storage.loaded_jobs == 0 and not writer.arrivals, 10, 0.1,
                       "every idle job unloaded")
        self.assertEqual(len(storage.list_jobs()), self.JOBS)
        self.assertEqual(storage.unloaded_jobs, self.JOBS)

        # New data for every job: loaded again from the files, numbered after what is there.
        yield in_thread(send_in_pieces, ipc_sock, frames(3, 2), (1 << 16,))
        yield wait_for(lambda: writer.messages_written == 5 * self.JOBS, 20, 0.05, "stored")
        for job in jobs[:: self.JOBS // 10]:
            lines = yield in_thread(query_logs, grpc_sock, job)
            self.assertEqual([ln.content for ln in lines],
                             [b"%s line %d\n" % (job.encode(), i) for i in range(5)])
            self.assertEqual([ln.sequence for ln in lines], list(range(5)))
            info = yield in_thread(_job_info, grpc_sock, job)
            self.assertEqual(info.log_count, 5)
        rebuilt = yield threads.deferToThread(jobindex.thd_rebuild, storage.data_dir)
        for job in jobs:
            self.assertEqual(rebuilt[job].log_count, storage.job_info(job).log_count)
