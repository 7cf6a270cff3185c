"""Faults: a crash loop under load, corrupt and damaged data, slow and vanishing clients.

Real reactor, real sockets, real files, real gRPC; a ``twistd -n joblet-persist`` child where
the test kills processes, the service built in-process (``tap.build_service``) elsewhere.
Blocking clients run in threads.  Each fault is injected the way it happens on a node: a
SIGKILL at a random moment, bytes flipped in a stored file, a file where a directory should
be, a client that stops reading, a peer that sends half a frame and goes silent.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import random
import shutil
import signal
import socket
import threading
import time

import grpc
from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from joblet_persist.storage import jobindex, segment
from joblet_persist.storage.format import read_member_header
from tests.integration.support import (
    TwistdProcess,
    grpc_call,
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

BASE_TS = 1_740_000_000_000_000_000


def _content(job: str, stream: int, seq: int) -> bytes:
    return f"{job} s{stream} #{seq:07d} ".encode() + b"~" * (seq % 37) + b"\n"


def _job_info(sock: str, job: str):
    return grpc_call(
        sock,
        lambda stub, t: stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t),
    )


def _delete_job(sock: str, job: str):
    return grpc_call(
        sock,
        lambda stub, t: stub.DeleteJob(persist_pb2.DeleteJobRequest(job_uuid=job), timeout=t),
    )


def _code(fn, *args):
    """The grpc status code ``fn(*args)`` ends with (OK when it returns).  Blocking."""
    try:
        fn(*args)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


class _LogCapture(logging.Handler):
    """Collects the records of a stdlib logger during a test."""

    def __init__(self, testcase, name: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        logger = logging.getLogger(name)
        logger.addHandler(self)
        testcase.addCleanup(logger.removeHandler, self)

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


class _ServiceCase(unittest.TestCase):
    """An in-process service on a short temporary directory; frames in, flush on demand."""

    timeout = 60
    #: Sections merged over the default test configuration.
    SECTIONS: dict = {"writer": {"flushInterval": "30s"}}

    def setUp(self):
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        self.root = None

    async def start(self, sections: dict | None = None):
        self.root = await start_service(
            self, service_config_text(self.dir, sections or self.SECTIONS)
        )
        return self.root

    async def send(self, frames: list[bytes], flush: bool = True) -> None:
        """Send frames on one connection; wait until read (and, by default, all written)."""
        writer = self.root.components["writer"]
        target = writer.messages_received + len(frames)
        await in_thread(send_in_pieces, self.ipc_sock, b"".join(frames))
        await wait_for(lambda: writer.messages_received >= target, timeout=20, what="frames read")
        if flush:
            await writer.flush_all()

    def sample(self, name: str, **labels) -> float:
        value = self.root.components["metrics"].registry.get_sample_value(name, labels)
        return value or 0.0


def _member_data_offset(path: str, member) -> tuple[int, int]:
    """(start, end) file offsets of a member's compressed data (between header and trailer)."""
    with open(path, "rb") as f:
        header = read_member_header(f, member.offset, member.offset + member.size)
    return member.offset + len(header), member.offset + member.size - 8


def _flip(path: str, offset: int, nbytes: int, rng: random.Random) -> None:
    """XOR ``nbytes`` bytes at ``offset`` with random non-zero values (every byte changes)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(b ^ rng.randrange(1, 256) for b in old))
        f.flush()
        os.fsync(f.fileno())


class CorruptDataTests(_ServiceCase):
    JOB = "c0a1e5ce-0000-4000-8000-00000000000a"
    OTHER = "c0a1e5ce-0000-4000-8000-00000000000b"
    BATCHES = 6
    PER_BATCH = 40

    async def _fill(self) -> dict:
        """BATCHES flushed batches (one member each per stream) for JOB and OTHER.

        Returns {(job, stream): [seq, ...]} of what was stored; stream "metrics" for samples.
        """
        stored: dict = {}
        for b in range(self.BATCHES):
            frames = []
            for job in (self.JOB, self.OTHER):
                for i in range(self.PER_BATCH):
                    seq = b * self.PER_BATCH + i
                    stream = 2 if i % 4 == 3 else 1
                    frames.append(log_frame(job, stream, BASE_TS + seq, seq,
                                            _content(job, stream, seq)))
                    stored.setdefault((job, stream), []).append(seq)
                    if i % 10 == 0:
                        frames.append(metric_frame(job, BASE_TS + seq, seq, metric_values(seq)))
                        stored.setdefault((job, "metrics"), []).append(seq)
            await self.send(frames)
        return stored

    def _segment(self, job: str, name: str) -> tuple[str, tuple]:
        top = "metrics" if name.startswith("metrics") else "logs"
        path = os.path.join(self.data_dir, top, job, name)
        return path, segment.thd_scan_segment(path, repair=False).members

    async def test_corrupt_member_data_is_skipped_counted_and_logged(self):
        """Random bytes written into the middle of the compressed data of one stdout member
        and one metrics member (not the last ones, which a restart verifies as possible torn
        tails): queries return every other message of the job, byte-exact and in order, skip
        exactly the damaged blocks, count them in persist_query_members_total{result=
        "corrupt"} and log a warning naming the file; the other job is untouched, GetJobInfo
        still answers, and new data for the job is stored and returned after the old."""
        await self.start()
        stored = await self._fill()
        await stop_service(self.root)

        rng = random.Random(4)
        damaged = {}
        for key, name in (((self.JOB, 1), "stdout.log.gz"), ((self.JOB, "metrics"),
                                                              "metrics.jsonl.gz")):
            path, members = self._segment(self.JOB, name)
            self.assertEqual(len(members), self.BATCHES)
            victim = members[2]
            start, end = _member_data_offset(path, victim)
            _flip(path, (start + end) // 2 - 8, 16, rng)
            damaged[key] = {
                s for s in stored[key] if victim.first_sequence <= s <= victim.last_sequence
            }
            self.assertEqual(len(damaged[key]), victim.count)

        capture = _LogCapture(self, "joblet_persist.storage")
        await self.start()
        lines = await threads.deferToThread(query_logs, self.grpc_sock, self.JOB, 1)
        expected = [s for s in stored[(self.JOB, 1)] if s not in damaged[(self.JOB, 1)]]
        self.assertEqual([ln.sequence for ln in lines], expected)
        for ln in lines:
            self.assertEqual(ln.content, _content(self.JOB, 1, ln.sequence))
        self.assertEqual(self.sample("persist_query_members_total", result="corrupt"), 1)
        merged = await threads.deferToThread(query_logs, self.grpc_sock, self.JOB, 0)
        self.assertEqual(len(merged), len(expected) + len(stored[(self.JOB, 2)]))
        self.assertEqual(self.sample("persist_query_members_total", result="corrupt"), 2)
        metrics = await threads.deferToThread(query_metrics, self.grpc_sock, self.JOB)
        self.assertEqual(
            [m.sequence for m in metrics],
            [s for s in stored[(self.JOB, "metrics")] if s not in damaged[(self.JOB, "metrics")]],
        )
        self.assertEqual(self.sample("persist_query_members_total", result="corrupt"), 3)
        warnings = [m for m in capture.messages() if "corrupt member" in m]
        self.assertEqual(len(warnings), 3, capture.messages())
        self.assertIn(os.path.join(self.JOB, "stdout.log.gz"), warnings[0])

        other = await threads.deferToThread(query_logs, self.grpc_sock, self.OTHER, 0)
        self.assertEqual(len(other), len(stored[(self.OTHER, 1)]) + len(stored[(self.OTHER, 2)]))
        info = await threads.deferToThread(_job_info, self.grpc_sock, self.JOB)
        self.assertEqual(info.log_count, len(stored[(self.JOB, 1)]) + len(stored[(self.JOB, 2)]))

        seq = 10_000
        await self.send([log_frame(self.JOB, 1, BASE_TS + seq, seq, _content(self.JOB, 1, seq))])
        lines = await threads.deferToThread(query_logs, self.grpc_sock, self.JOB, 1)
        self.assertEqual([ln.sequence for ln in lines], expected + [seq])

    async def test_damaged_member_header_is_stepped_over_and_logged(self):
        """Bytes flipped in the gzip header of a middle stdout member: on restart the scan
        steps over the damaged region to the complete members after it (never cutting them
        off as a torn tail), logs an error naming the file and the byte range, counts it in
        ``storage.damaged_regions``; queries return every message outside the damaged
        member, and appends continue after the last member."""
        await self.start()
        stored = await self._fill()
        await stop_service(self.root)
        path, members = self._segment(self.JOB, "stdout.log.gz")
        victim = members[3]
        _flip(path, victim.offset, 4, random.Random(9))  # the gzip magic and method
        size = os.path.getsize(path)

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start()
        storage = self.root.components["storage"]
        lines = await threads.deferToThread(query_logs, self.grpc_sock, self.JOB, 1)
        lost = {s for s in stored[(self.JOB, 1)]
                if victim.first_sequence <= s <= victim.last_sequence}
        self.assertEqual(len(lost), victim.count)
        self.assertEqual(
            [ln.sequence for ln in lines], [s for s in stored[(self.JOB, 1)] if s not in lost]
        )
        self.assertEqual(storage.damaged_regions, 1)
        self.assertEqual(storage.repaired_segments, 0)
        self.assertEqual(os.path.getsize(path), size)
        logged = [e for e in events if e.get("log_level") == LogLevel.error
                  and e.get("path") == path]
        self.assertEqual(len(logged), 1, events)
        self.assertEqual((logged[0]["start"], logged[0]["end"]),
                         (victim.offset, members[4].offset))
        seq = 20_000
        await self.send([log_frame(self.JOB, 1, BASE_TS + seq, seq, _content(self.JOB, 1, seq))])
        lines = await threads.deferToThread(query_logs, self.grpc_sock, self.JOB, 1)
        self.assertEqual(lines[-1].sequence, seq)
        self.assertGreater(os.path.getsize(path), size)

    async def test_garbage_job_index_is_rebuilt(self):
        """job_index.json replaced by random bytes, then by JSON of the wrong shape: each
        time the service starts, rebuilds the index from the files (same counts and sizes as
        before), serves GetJobInfo and ListJobs from it, and writes a valid index back."""
        await self.start()
        stored = await self._fill()
        await stop_service(self.root)
        index_path = os.path.join(self.data_dir, "job_index.json")
        with open(index_path) as f:
            before = json.load(f)["jobs"]
        self.assertEqual(set(before), {self.JOB, self.OTHER})

        garbage = [
            random.Random(1).randbytes(5000),
            json.dumps({"version": 1, "jobs": {self.JOB: {"log_count": -3}}}).encode(),
            b'{"version": 1, "jobs": {"../../etc": {}}}',
            b"",
        ]
        for blob in garbage:
            with open(index_path, "wb") as f:
                f.write(blob)
            await self.start()
            for job in (self.JOB, self.OTHER):
                info = await threads.deferToThread(_job_info, self.grpc_sock, job)
                self.assertEqual(info.log_count, len(stored[(job, 1)]) + len(stored[(job, 2)]))
                self.assertEqual(info.metric_count, len(stored[(job, "metrics")]))
                self.assertEqual(info.size_bytes, before[job]["size_bytes"])
            listed = await threads.deferToThread(
                grpc_call,
                self.grpc_sock,
                lambda stub, t: stub.ListJobs(persist_pb2.ListJobsRequest(), timeout=t),
            )
            self.assertEqual(listed.total_count, 2)
            await stop_service(self.root)
            with open(index_path) as f:
                after = json.load(f)["jobs"]
            for job in (self.JOB, self.OTHER):
                for key in ("log_count", "metric_count", "size_bytes", "first_timestamp",
                            "last_timestamp"):
                    self.assertEqual(after[job][key], before[job][key], (job, key))


class DamagedJobDirectoryTests(_ServiceCase):
    GOOD = "600d0000-0000-4000-8000-000000000001"
    FILE_AS_DIR = "bad00000-0000-4000-8000-000000000001"  # logs/<job> is a regular file
    DIR_AS_SEGMENT = "bad00000-0000-4000-8000-000000000002"  # stdout.log.gz is a directory
    GARBAGE = "bad00000-0000-4000-8000-000000000003"  # foreign names, random-bytes segment
    METRICS_FILE = "bad00000-0000-4000-8000-000000000004"  # metrics/<job> is a regular file
    JOBS = (GOOD, FILE_AS_DIR, DIR_AS_SEGMENT, GARBAGE, METRICS_FILE)
    SECTIONS = {"writer": {"flushInterval": "30s", "retryInitial": "100ms", "retryMax": "200ms"}}

    def _frames(self, job: str, first: int, count: int) -> list[bytes]:
        frames = []
        for seq in range(first, first + count):
            stream = 2 if seq % 3 == 2 else 1
            frames.append(log_frame(job, stream, BASE_TS + seq, seq, _content(job, stream, seq)))
            if seq % 5 == 0:
                frames.append(metric_frame(job, BASE_TS + seq, seq, metric_values(seq)))
        return frames

    def _damage(self) -> None:
        d = self.data_dir
        shutil.rmtree(os.path.join(d, "logs", self.FILE_AS_DIR))
        with open(os.path.join(d, "logs", self.FILE_AS_DIR), "wb") as f:
            f.write(b"not a directory\n")
        os.unlink(os.path.join(d, "logs", self.DIR_AS_SEGMENT, "stdout.log.gz"))
        os.mkdir(os.path.join(d, "logs", self.DIR_AS_SEGMENT, "stdout.log.gz"))
        garbage = os.path.join(d, "logs", self.GARBAGE)
        for name, data in (("stdout_1.log.gz", b"non-canonical name"),
                           ("notes.txt", b"foreign file"),
                           ("stderr.log.gz", random.Random(3).randbytes(3000))):
            with open(os.path.join(garbage, name), "wb") as f:
                f.write(data)
        os.mkdir(os.path.join(garbage, "subdir"))
        shutil.rmtree(os.path.join(d, "metrics", self.METRICS_FILE))
        with open(os.path.join(d, "metrics", self.METRICS_FILE), "wb") as f:
            f.write(b"not a directory either\n")

    async def _check_readable(self, count: int, good_count: int) -> None:
        """What each damaged job (``count`` messages sent) still serves; GOOD is complete."""
        sock = self.grpc_sock
        good = await threads.deferToThread(query_logs, sock, self.GOOD, 0)
        self.assertEqual([ln.sequence for ln in good], list(range(good_count)))
        # stdout is a directory: skipped, stderr served.
        lines = await threads.deferToThread(query_logs, sock, self.DIR_AS_SEGMENT, 0)
        self.assertEqual({ln.stream for ln in lines}, {2})
        # The random-bytes stderr is cut like a torn tail on load; stdout is intact.
        lines = await threads.deferToThread(query_logs, sock, self.GARBAGE, 0)
        self.assertEqual([ln.sequence for ln in lines],
                         [s for s in range(count) if s % 3 != 2])
        # Its logs are fine; its metrics are gone (a file stands there).
        lines = await threads.deferToThread(query_logs, sock, self.METRICS_FILE, 0)
        self.assertEqual(len(lines), count)
        metrics = await threads.deferToThread(query_metrics, sock, self.METRICS_FILE)
        self.assertEqual(metrics, [])
        # Its logs directory is a file: only the metrics are left.
        metrics = await threads.deferToThread(query_metrics, sock, self.FILE_AS_DIR)
        self.assertEqual(len(metrics), len(range(0, count, 5)))

    async def test_damaged_job_directories_do_not_stop_the_service(self):
        """Four jobs are damaged on disk while the service is down: a file where the job's
        logs directory should be, a directory named like a segment, foreign and non-canonical
        file names plus a segment of random bytes, a file where the metrics directory should
        be.  The service starts (both when it refreshes a stale index and when it rebuilds a
        missing one), reports healthy, serves what is still readable of each damaged job and
        all of the intact one, and keeps storing new data for the intact job while appends
        for a damaged one fail and are retried.  DeleteJob clears the damaged job's place
        (the file is removed), its held-back data is dropped, health recovers, and data sent
        afterwards starts the job afresh."""
        count = 30
        await self.start()
        for job in self.JOBS:
            await self.send(self._frames(job, 0, count))
        await stop_service(self.root)
        self._damage()

        index = os.path.join(self.data_dir, "job_index.json")
        for how in ("refresh", "rebuild"):
            if how == "refresh":
                os.utime(index, (1, 1))  # older than every file: every job is rescanned
            else:
                os.unlink(index)
            await self.start()
            self.assertTrue(await threads.deferToThread(lambda: ping(self.grpc_sock).healthy))
            await self._check_readable(count, count)
            await stop_service(self.root)

        await self.start()
        writer = self.root.components["writer"]
        await self.send(self._frames(self.GOOD, count, 20) + self._frames(self.FILE_AS_DIR, 1, 4),
                        flush=False)
        writer.flush_all()
        await wait_for(lambda: writer.write_errors > 0, timeout=10, what="a failing append")
        # The good job's batch is written although the damaged one's keeps failing.
        await wait_for(
            lambda: self.root.components["storage"].job_info(self.GOOD).log_count == count + 20,
            timeout=10,
            what="the intact job's new data stored",
        )
        self.assertFalse(await threads.deferToThread(lambda: ping(self.grpc_sock).healthy))
        await self._check_readable(count, count + 20)

        response = await threads.deferToThread(_delete_job, self.grpc_sock, self.FILE_AS_DIR)
        self.assertTrue(response.success, response.message)
        self.assertFalse(os.path.lexists(os.path.join(self.data_dir, "logs", self.FILE_AS_DIR)))
        await wait_for(
            lambda: threads.deferToThread(lambda: ping(self.grpc_sock).healthy),
            timeout=10,
            what="healthy again",
        )
        await self.send(self._frames(self.FILE_AS_DIR, 100, 6))
        lines = await threads.deferToThread(query_logs, self.grpc_sock, self.FILE_AS_DIR, 0)
        self.assertEqual([ln.sequence for ln in lines], list(range(100, 106)))
        # A file where the job directory should be: the walk to it finds no directory.
        self.flushLoggedErrors(NotADirectoryError)

    async def test_unreadable_job_directory_is_left_out(self):
        """A job directory that cannot be listed (as ``chmod 000`` does for a service that
        does not run as root; here listing it raises EACCES): the service starts, the index
        leaves that job out with a warning, the other jobs are served completely, and a
        query for the unreadable job fails with a status (not a hang or a crash)."""
        count = 12
        await self.start()
        for job in (self.GOOD, self.GARBAGE):
            await self.send(self._frames(job, 0, count))
        await stop_service(self.root)
        os.unlink(os.path.join(self.data_dir, "job_index.json"))

        forbidden = os.path.join(self.data_dir, "logs", self.GARBAGE)
        real_listdir, real_scandir = os.listdir, os.scandir

        def check(path):
            if isinstance(path, int):  # storage lists directories it holds open by descriptor
                path = os.readlink(f"/proc/self/fd/{path}")
            if os.fspath(path).rstrip(os.sep) == forbidden:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

        def listdir(path="."):
            check(path)
            return real_listdir(path)

        def scandir(path="."):
            check(path)
            return real_scandir(path)

        self.patch(os, "listdir", listdir)
        self.patch(os, "scandir", scandir)
        capture = _LogCapture(self, "joblet_persist.storage")
        await self.start()
        self.assertTrue(await threads.deferToThread(lambda: ping(self.grpc_sock).healthy))
        storage = self.root.components["storage"]
        self.assertEqual([i.job_id for i in storage.list_jobs()], [self.GOOD])
        self.assertTrue(any(self.GARBAGE in m and "cannot read" in m
                            for m in capture.messages()), capture.messages())
        good = await threads.deferToThread(query_logs, self.grpc_sock, self.GOOD, 0)
        self.assertEqual(len(good), count)
        code = await threads.deferToThread(_code, query_logs, self.grpc_sock, self.GARBAGE, 0)
        self.assertNotEqual(code, grpc.StatusCode.OK)
        self.flushLoggedErrors(PermissionError)


class IndexScanTests(unittest.SynchronousTestCase):
    """The index scan and job removal against damage outside any job directory."""

    def test_a_file_in_place_of_the_metrics_directory(self):
        """``metrics`` being a regular file does not keep the index from loading: the jobs
        under ``logs`` are found, rebuilt and refreshed."""
        d = short_tempdir(self)
        os.makedirs(os.path.join(d, "logs", "job-a"))
        with open(os.path.join(d, "metrics"), "wb") as f:
            f.write(b"x")
        self.assertEqual(jobindex.thd_list_job_ids(d), {"job-a"})
        load = jobindex.thd_open_index(d)
        self.assertEqual(set(load.jobs), {"job-a"})
        jobindex.thd_write(jobindex.index_path(d), load.jobs, load.parts)
        os.utime(jobindex.index_path(d), (1, 1))
        self.assertEqual(set(jobindex.thd_open_index(d).jobs), {"job-a"})

    def test_removing_a_job_whose_directory_is_a_symlink(self):
        """A symlink in place of a job directory is removed itself: its target and the files
        in it are left alone."""
        from joblet_persist.storage.local import thd_remove_job

        d = short_tempdir(self)
        target = os.path.join(d, "elsewhere")
        os.makedirs(target)
        with open(os.path.join(target, "keep.txt"), "wb") as f:
            f.write(b"precious")
        os.makedirs(os.path.join(d, "logs"))
        os.symlink(target, os.path.join(d, "logs", "job-b"))
        thd_remove_job(d, "job-b")
        self.assertFalse(os.path.lexists(os.path.join(d, "logs", "job-b")))
        with open(os.path.join(target, "keep.txt"), "rb") as f:
            self.assertEqual(f.read(), b"precious")


# -- crash loop -----------------------------------------------------------------------------

CYCLE = 1_000_000  # sequence numbers of cycle c are c * CYCLE + 0, 1, 2, ...
LOG_KINDS = (1, 2)


class _CycleSender:
    """One connection and thread per job, sending paced LOG (both streams) and METRIC frames.

    ``sent[(job, kind)]`` lists ``(seq, t)``: ``t`` is ``time.monotonic()`` when that frame's
    ``sendall`` returned.  A send error (the service was killed) ends the thread quietly.
    """

    def __init__(self, path: str, jobs, cycle: int, tick: float = 0.01):
        self.path = path
        self.jobs = jobs
        self.cycle = cycle
        self.tick = tick
        self.sent = {(job, kind): [] for job in jobs for kind in (1, 2, "metrics")}
        self._stop = threading.Event()

    def start(self) -> defer.Deferred:
        return defer.gatherResults([in_thread(self._run, job) for job in self.jobs])

    def stop(self) -> None:
        self._stop.set()

    def _run(self, job: str) -> None:
        counters = {1: 0, 2: 0, "metrics": 0}
        base = self.cycle * CYCLE
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.path)
            tick = 0
            next_tick = time.monotonic()
            while not self._stop.is_set():
                for kind, count in ((1, 3), (2, 1)):
                    for _ in range(count):
                        seq = base + counters[kind]
                        sock.sendall(log_frame(job, kind, BASE_TS + seq, seq,
                                               _content(job, kind, seq)))
                        self.sent[(job, kind)].append((seq, time.monotonic()))
                        counters[kind] += 1
                if tick % 5 == 0:
                    seq = base + counters["metrics"]
                    sock.sendall(metric_frame(job, BASE_TS + seq, seq, metric_values(seq % CYCLE)))
                    self.sent[(job, "metrics")].append((seq, time.monotonic()))
                    counters["metrics"] += 1
                tick += 1
                next_tick += self.tick
                self._stop.wait(max(0.0, next_tick - time.monotonic()))
        except OSError:
            pass
        finally:
            sock.close()


class _QueryLoad:
    """A thread issuing mixed queries while the service ingests (and is killed).

    Counts status codes; collects problems (a result out of order, an unexpected code).
    """

    ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.DEADLINE_EXCEEDED}

    def __init__(self, sock: str, jobs, seed: int):
        self.sock = sock
        self.jobs = jobs
        self.rng = random.Random(seed)
        self.codes: dict = {}
        self.problems: list[str] = []
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        with grpc.insecure_channel(f"unix:{self.sock}") as channel:
            stub = persist_pb2_grpc.PersistServiceStub(channel)
            while not self._stop.is_set():
                code = self._one(stub)
                self.codes[code] = self.codes.get(code, 0) + 1
                if code not in self.ALLOWED:
                    self.problems.append(f"unexpected status {code}")
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._stop.wait(0.05)

    def _one(self, stub) -> grpc.StatusCode:
        rng = self.rng
        job = rng.choice(self.jobs)
        what = rng.randrange(5)
        try:
            if what == 0:
                stream = rng.choice((1, 2))
                req = persist_pb2.QueryLogsRequest(job_uuid=job, stream=stream,
                                                   offset=rng.randrange(50),
                                                   limit=rng.randrange(0, 300))
                seqs = [ln.sequence for ln in stub.QueryLogs(req, timeout=5)]
                if seqs != sorted(seqs):
                    self.problems.append(f"{job}/{stream}: out of order")
            elif what == 1:
                req = persist_pb2.QueryLogsRequest(job_uuid=job, limit=2000)
                for batch in stub.QueryLogsBatched(req, timeout=5):
                    if not batch.lines:
                        self.problems.append("empty batch")
            elif what == 2:
                list(stub.QueryMetrics(persist_pb2.QueryMetricsRequest(job_uuid=job, limit=50),
                                       timeout=5))
            elif what == 3:
                stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=5)
            else:
                stub.ListJobs(persist_pb2.ListJobsRequest(limit=10), timeout=5)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return grpc.StatusCode.OK  # a job not stored yet
            return e.code()
        return grpc.StatusCode.OK


def _copy_and_rebuild(data_dir: str, copy: str) -> tuple[dict, dict]:
    """Copy the data directory; rebuild its index from the copy's files and decode every
    file completely.  Returns (job -> JobInfo, path -> decoded size).  Blocking."""
    shutil.copytree(data_dir, copy)
    rebuilt = jobindex.thd_rebuild(copy)
    decoded = {}
    for root, _dirs, files in os.walk(copy):
        for name in files:
            if name.endswith(".gz"):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    decoded[path] = len(gzip.decompress(f.read()))
    return rebuilt, decoded


class CrashLoopTests(unittest.TestCase):
    """SIGKILL at random moments of ingest and queries, restart, verify, again."""

    timeout = 150
    KILLS = 5
    JOBS = ["c4a54000-0000-4000-8000-000000000001", "c4a54000-0000-4000-8000-000000000002",
            "c4a54000-0000-4000-8000-000000000003", "crash.loop_4"]
    FLUSH_INTERVAL = 0.2
    #: Slack beyond the flush interval for "old enough to be durable" on a busy 2-core box.
    MARGIN = 1.5
    SEED = 20240611

    async def _start(self, config: str) -> TwistdProcess:
        proc = TwistdProcess(self, self.dir, ["--config", config])
        try:
            await wait_for(
                lambda: threads.deferToThread(ping, self.grpc_sock, 1.0).addCallback(
                    lambda r: r is not None and r.healthy
                ),
                timeout=30,
                what="service healthy",
            )
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        return proc

    def _read_job(self, job: str) -> dict:
        """Both streams and the metrics of a job over gRPC; empty for an unknown job."""
        def logs(stream):
            request = persist_pb2.QueryLogsRequest(job_uuid=job, stream=stream)
            return grpc_call(
                self.grpc_sock,
                lambda stub, t: [ln for b in stub.QueryLogsBatched(request, timeout=t)
                                 for ln in b.lines],
            )

        try:
            return {1: logs(1), 2: logs(2), "metrics": query_metrics(self.grpc_sock, job)}
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return {1: [], 2: [], "metrics": []}

    async def _verify(self, cycles: list, verified: dict, round_: int) -> None:
        """Check what the restarted service serves against every finished cycle's sends."""
        sock = self.grpc_sock
        totals = {}
        for job in self.JOBS:
            got = await threads.deferToThread(self._read_job, job)
            for kind, items in got.items():
                seqs = [item.sequence for item in items]
                self.assertEqual(seqs, sorted(seqs), (job, kind))
                by_cycle: dict = {}
                for s in seqs:
                    by_cycle.setdefault(s // CYCLE, []).append(s % CYCLE)
                self.assertLessEqual(set(by_cycle), set(range(len(cycles))), (job, kind))
                for c, (sender, killed_at) in enumerate(cycles):
                    stored = by_cycle.get(c, [])
                    sent = sender.sent[(job, kind)]
                    where = f"round {round_}, cycle {c}, {job}/{kind}"
                    self.assertEqual(stored, list(range(len(stored))), where + ": not a prefix")
                    self.assertLessEqual(len(stored), len(sent), where)
                    cutoff = killed_at - self.FLUSH_INTERVAL - self.MARGIN
                    required = sum(1 for _, t in sent if t < cutoff)
                    self.assertGreaterEqual(len(stored), required, where + ": lost old data")
                    # Never backwards (nor forwards: nothing of that cycle arrives later).
                    previous = verified.setdefault((job, kind, c), len(stored))
                    self.assertEqual(len(stored), previous, where + ": count changed")
                for item in items if kind != "metrics" else ():
                    self.assertEqual(item.content, _content(job, kind, item.sequence))
            totals[job] = (len(got[1]) + len(got[2]), len(got["metrics"]))
            if totals[job] != (0, 0):
                info = await threads.deferToThread(_job_info, sock, job)
                self.assertEqual((info.log_count, info.metric_count), totals[job], job)
        totals = {job: counts for job, counts in totals.items() if counts != (0, 0)}
        # The index agrees with a scan of the files (on a copy: the service keeps running),
        # and every file decodes to its end.
        copy = os.path.join(self.dir, f"copy{round_}")
        rebuilt, decoded = await threads.deferToThread(_copy_and_rebuild, self.data_dir, copy)
        self.assertEqual(
            {job: (i.log_count, i.metric_count) for job, i in rebuilt.items()}, totals
        )
        self.assertGreaterEqual(len(decoded), 3 * len(self.JOBS) if cycles else 0)
        shutil.rmtree(copy)

    async def test_sigkill_loop_during_ingest_and_queries(self):
        """KILLS times: start the service, check what it serves, then run paced ingest on 4
        connections and a thread of mixed queries (QueryLogs with offsets and limits, the
        batched RPC, QueryMetrics, GetJobInfo, ListJobs) for a random 2-3.5 s and SIGKILL the
        process at that random moment.  After every restart: per (job, stream) and per
        job's metrics the stored sequence numbers of each earlier run are exactly a prefix of
        what was sent in it, containing everything sent more than flushInterval + 1.5 s
        before that run's kill, and that count never changes in later rounds (never goes
        backwards); content is byte-exact; GetJobInfo equals what the queries return and
        equals a rebuild of the index from a copy of the files; every file decodes
        completely.  Queries during the run never end with a status other than OK,
        NOT_FOUND, UNAVAILABLE (the kill), CANCELLED or DEADLINE_EXCEEDED."""
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        ipc_sock = os.path.join(self.dir, "ipc.sock")
        config = write_service_config(
            self.dir, {"writer": {"flushInterval": self.FLUSH_INTERVAL, "indexInterval": "1s"}}
        )
        rng = random.Random(self.SEED)
        cycles: list = []
        verified: dict = {}
        codes: dict = {}
        for round_ in range(self.KILLS):
            proc = await self._start(config)
            await self._verify(cycles, verified, round_)
            sender = _CycleSender(ipc_sock, self.JOBS, cycle=round_)
            queries = _QueryLoad(self.grpc_sock, self.JOBS, seed=round_)
            sending, querying = sender.start(), in_thread(queries.run)
            # The load runs for a random time: the kill lands at a random moment.
            await task.deferLater(reactor, 2.0 + rng.random() * 1.5, lambda: None)
            killed_at = time.monotonic()
            proc.signal("KILL")
            self.assertEqual(await proc.wait_exit(10), -signal.SIGKILL)
            sender.stop()
            queries.stop()
            await sending
            await querying
            self.assertEqual(queries.problems, [])
            for code, n in queries.codes.items():
                codes[code] = codes.get(code, 0) + n
            cycles.append((sender, killed_at))

        proc = await self._start(config)
        await self._verify(cycles, verified, self.KILLS)
        self.assertGreater(codes.get(grpc.StatusCode.OK, 0), 10 * self.KILLS, codes)
        proc.signal("TERM")
        self.assertIn(await proc.wait_exit(20), (0, -signal.SIGTERM), proc.output)
        self.assertNotIn("Traceback", proc.output)


# -- slow and vanishing clients -------------------------------------------------------------


def _data_fds(data_dir: str) -> int:
    """Open descriptors of this process on files under ``data_dir``."""
    prefix = data_dir + os.sep
    base = "/proc/self/fd"
    count = 0
    for name in os.listdir(base):
        try:
            if os.readlink(os.path.join(base, name)).startswith(prefix):
                count += 1
        except FileNotFoundError:
            continue
    return count


_VANISHING_CLIENT = """
import os, signal, sys, grpc
from joblet_persist._proto import persist_pb2, persist_pb2_grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
stub = persist_pb2_grpc.PersistServiceStub(channel)
stream = stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=sys.argv[2]))
next(stream)
print("read one", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


class SlowClientTests(_ServiceCase):
    JOB = "510e0000-0000-4000-8000-000000000001"
    LINES = 20_000
    LINE_BYTES = 1000
    SECTIONS = {
        "writer": {"flushInterval": "200ms"},
        "server": {"maxConcurrentRpcs": 2, "grpcWorkers": 2},
    }

    async def _fill(self) -> None:
        """LINES lines of LINE_BYTES each (20 MB): far more than gRPC's flow-control windows."""
        filler = b"f" * (self.LINE_BYTES - 16)
        frames = [log_frame(self.JOB, 1, BASE_TS + i, i, b"%015d " % i + filler)
                  for i in range(self.LINES)]
        await self.send(frames)

    def _servicer(self):
        return self.root.components["servicer"]

    def _open_stalled(self, timeout=None):
        """A QueryLogs call whose client read one line and then stops reading.  Blocking."""
        channel = grpc.insecure_channel(f"unix:{self.grpc_sock}")
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        call = stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=self.JOB), timeout=timeout)
        first = next(call)
        return channel, call, first

    async def test_client_that_stops_reading_is_released_at_its_deadline(self):
        """A client reads one line of a 20 MB QueryLogs and then stops reading, with a 2 s
        deadline: while it stalls, the RPC holds a handler slot but no file (a query closes
        its files before handing records over); at the deadline the slot is released (the
        active-RPC count returns to 0), the RPC is counted as cancelled, and the client sees
        DEADLINE_EXCEEDED.  Other queries are answered meanwhile."""
        await self.start()
        await self._fill()
        servicer = self._servicer()
        self.assertEqual(_data_fds(self.data_dir), 0)
        channel, call, first = await threads.deferToThread(self._open_stalled, 2.0)
        self.addCleanup(channel.close)
        opened = time.monotonic()
        self.assertEqual(first.sequence, 0)
        self.assertEqual(servicer.active_rpcs, 1)
        await wait_for(lambda: _data_fds(self.data_dir) == 0, timeout=1, what="no file held")
        self.assertEqual(servicer.active_rpcs, 1)
        info = await threads.deferToThread(_job_info, self.grpc_sock, self.JOB)
        self.assertEqual(info.log_count, self.LINES)
        self.assertEqual(servicer.active_rpcs, 1, "the stalled RPC finished on its own")

        await wait_for(lambda: servicer.active_rpcs == 0, timeout=10, what="slot released")
        await wait_for(lambda: _data_fds(self.data_dir) == 0, timeout=5, what="file closed")
        self.assertGreaterEqual(time.monotonic() - opened, 1.5)
        code = await threads.deferToThread(_code, lambda: list(call))
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        await wait_for(
            lambda: self.sample("persist_query_requests_total", rpc="QueryLogs",
                                code="CANCELLED") == 1,
            timeout=5,
            what="the RPC counted as cancelled",
        )

    async def test_client_that_disconnects_is_released_at_once(self):
        """A client that closes its channel mid-stream, and a client process killed with
        SIGKILL mid-stream (both with no deadline): each RPC's slot and open file are
        released within seconds, and the service goes on answering."""
        await self.start()
        await self._fill()
        servicer = self._servicer()

        channel, _call, _first = await threads.deferToThread(self._open_stalled, None)
        self.assertEqual(servicer.active_rpcs, 1)
        channel.close()
        await wait_for(lambda: servicer.active_rpcs == 0, timeout=5, what="slot released")
        await wait_for(lambda: _data_fds(self.data_dir) == 0, timeout=5, what="file closed")

        child = await threads.deferToThread(
            _run_child, [_VANISHING_CLIENT, self.grpc_sock, self.JOB]
        )
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        self.assertIn(b"read one", child.stdout)
        await wait_for(lambda: servicer.active_rpcs == 0, timeout=5, what="slot released")
        await wait_for(lambda: _data_fds(self.data_dir) == 0, timeout=5, what="file closed")
        self.assertTrue(await threads.deferToThread(lambda: ping(self.grpc_sock).healthy))

    async def test_rpcs_beyond_the_limit_are_refused_while_ping_answers(self):
        """With maxConcurrentRpcs 2 and two stalled streams holding both slots: QueryLogs,
        QueryMetrics and GetJobInfo are refused with RESOURCE_EXHAUSTED at once, Ping still
        answers (healthy, well under a second); once the stalled calls are cancelled, queries
        are served again."""
        await self.start()
        await self._fill()
        servicer = self._servicer()
        stalled = []
        for _ in range(2):
            channel, call, _first = await threads.deferToThread(self._open_stalled, None)
            self.addCleanup(channel.close)
            stalled.append(call)
        self.assertEqual(servicer.active_rpcs, 2)

        sock = self.grpc_sock
        for fn in (
            lambda: query_logs(sock, self.JOB, 0),
            lambda: query_metrics(sock, self.JOB),
            lambda: _job_info(sock, self.JOB),
        ):
            self.assertEqual(await threads.deferToThread(_code, fn),
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
        started = time.monotonic()
        response = await threads.deferToThread(ping, sock, 2.0)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(response is not None and response.healthy)
        self.assertEqual(
            self.sample("persist_query_requests_total", rpc="GetJobInfo",
                        code="RESOURCE_EXHAUSTED"), 1)

        for call in stalled:
            call.cancel()
        await wait_for(lambda: servicer.active_rpcs == 0, timeout=5, what="slots released")
        info = await threads.deferToThread(_job_info, sock, self.JOB)
        self.assertEqual(info.log_count, self.LINES)

    async def test_half_frame_then_silence_blocks_nobody(self):
        """Two IPC peers go silent in the middle of a frame (one inside the length prefix,
        one inside a body that announces 1000 bytes) and stay connected: frames from other
        connections are stored and queryable within the flush interval meanwhile; a graceful
        stop does not wait for the silent peers (it completes in well under the 5 s drain
        timeout) and counts their two cut-off frames as truncated_frame."""
        await self.start()
        silent = []
        for partial in (b"\x00\x00", b"\x00\x00\x03\xe8" + b"\x0a" * 10):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(sock.close)
            await threads.deferToThread(sock.connect, self.ipc_sock)
            await threads.deferToThread(sock.sendall, partial)
            silent.append(sock)
        factory = self.root.components["factory"]
        await wait_for(lambda: factory.connection_count() == 2, timeout=5, what="connected")

        for round_ in range(3):
            frames = [log_frame(self.JOB, 1, BASE_TS + round_ * 10 + i, round_ * 10 + i,
                                b"line %d\n" % i) for i in range(10)]
            sent_at = time.monotonic()
            await in_thread(send_in_pieces, self.ipc_sock, b"".join(frames))
            await wait_for(
                lambda n=round_: threads.deferToThread(
                    lambda: len(query_logs(self.grpc_sock, self.JOB, 0)) == 10 * (n + 1)
                ).addErrback(lambda f: f.trap(grpc.RpcError) and False),
                timeout=5,
                what="frames stored beside the silent peers",
            )
            self.assertLess(time.monotonic() - sent_at, 3.0)
        self.assertEqual(factory.connection_count(), 2)

        started = time.monotonic()
        await stop_service(self.root)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(
            self.sample("persist_ipc_frames_rejected_total", reason="truncated_frame"), 2
        )


def _run_child(args):
    """Run a Python snippet (``args[0]``, with ``args[1:]`` as argv) in a child process."""
    import subprocess
    import sys

    from tests.integration.support import ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, env=env,
                          timeout=30)


# -- disk full under load ---------------------------------------------------------------------


def _mount_tmpfs(testcase, size: int) -> str:
    """A tmpfs of ``size`` bytes on a fresh directory, unmounted at cleanup; skips the test
    when it cannot be mounted (not root, no permission in this container)."""
    import subprocess

    if os.geteuid() != 0:
        raise unittest.SkipTest("mounting a tmpfs needs root")
    mountpoint = os.path.join(short_tempdir(testcase, "jpdfl"), "mnt")
    os.mkdir(mountpoint)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise unittest.SkipTest(f"cannot mount a tmpfs: {result.stderr.strip() or result}")
    testcase.addCleanup(subprocess.run, ["umount", "-l", mountpoint], capture_output=True)
    return mountpoint


def _free_bytes(path: str) -> int:
    st_ = os.statvfs(path)
    return st_.f_bavail * st_.f_frsize


def _fill(path: str, nbytes: int) -> None:
    block = b"\x5a" * (1 << 20)
    with open(path, "wb") as f:
        while nbytes > 0:
            nbytes -= f.write(block[: min(nbytes, len(block))])
        f.flush()
        os.fsync(f.fileno())


class DiskFullUnderLoadTests(_ServiceCase):
    CONNECTIONS = 40
    JOBS_PER_CONNECTION = 5
    FRAMES_PER_CONNECTION = 80
    CONTENT = 1024  # incompressible bytes per frame: 40 x 80 x 1 KiB = 3.2 MiB in all
    HIGH_WATER = 1 << 20
    LOW_WATER = 512 << 10
    LEFT_FREE = 256 << 10
    timeout = 90

    def _chunks(self):
        """Per connection, a few chunks of frames for its jobs; keys (job, stream)."""
        from tests.integration.test_scale import _frames_chunk

        rng = random.Random(11)
        plan = {}
        expected = {}
        for conn in range(self.CONNECTIONS):
            jobs = [f"d15c0000-0000-4000-8000-{conn:06d}{j:06d}"
                    for j in range(self.JOBS_PER_CONNECTION)]
            chunks = []
            frames = []
            for i in range(self.FRAMES_PER_CONNECTION):
                job = jobs[i % len(jobs)]
                stream = 1 + (i // len(jobs)) % 2
                key = (job, stream)
                seq = expected.get(key, 0)
                body = rng.randbytes(self.CONTENT)
                expected[key] = seq + 1
                frames.append((key, log_frame(job, stream, BASE_TS + seq, seq, body)))
                if len(frames) == 16:
                    chunks.append(_frames_chunk(frames))
                    frames = []
            if frames:
                chunks.append(_frames_chunk(frames))
            chunks.reverse()  # popped from the end
            plan[conn] = chunks
        return plan, expected

    async def test_disk_full_while_forty_connections_send(self):
        """The data directory (a small tmpfs) fills up while 40 connections send 200 jobs'
        incompressible output: appends fail and are retried, ingest on every connection is
        paused by backpressure (the senders stall; the writer's buffered bytes stay near the
        high-water mark), Ping and /health report the failing writes; once space is freed,
        the retries succeed, ingest resumes by itself, and every frame every connection
        fully sent is stored, per (job, stream) in order, in files that decode completely."""
        from tests.integration.test_scale import Pump

        mountpoint = _mount_tmpfs(self, 24 << 20)
        sections = {
            "storage": {"dataDir": os.path.join(mountpoint, "data")},
            "writer": {"flushInterval": "100ms", "batchMaxBytes": "64KiB",
                       "highWaterBytes": self.HIGH_WATER, "lowWaterBytes": self.LOW_WATER,
                       "retryInitial": "100ms", "retryMax": "400ms"},
        }
        self.data_dir = sections["storage"]["dataDir"]
        await self.start(sections)
        parts = self.root.components
        writer, factory, health = parts["writer"], parts["factory"], parts["health"]
        ballast = os.path.join(mountpoint, "ballast")
        await threads.deferToThread(_fill, ballast, _free_bytes(mountpoint) - self.LEFT_FREE)

        plan, expected = self._chunks()
        total = sum(expected.values())
        pump = Pump(self.ipc_sock, self.CONNECTIONS,
                    lambda conn: plan[conn].pop() if plan[conn] else None)
        pumping = in_thread(pump.run)
        await wait_for(lambda: writer.write_errors > 0 and writer.paused and factory.paused,
                       timeout=30, what="write errors and backpressure")
        self.assertFalse(await threads.deferToThread(lambda: ping(self.grpc_sock).healthy))
        self.assertFalse(health.refresh())
        self.assertFalse(health.details["writer"]["ok"])
        # Stalled: the senders cannot finish while ingest is paused.
        stalled_at = writer.messages_received
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(pumping.called)
        self.assertLess(writer.messages_received, total)
        self.assertLessEqual(writer.messages_received - stalled_at, self.CONNECTIONS * 64)
        self.assertLess(writer.buffered_bytes, self.HIGH_WATER + self.CONNECTIONS * 70_000)

        os.unlink(ballast)
        sent = await pumping
        self.assertEqual(sum(sent.values()), total)
        await wait_for(lambda: writer.messages_written == total and writer.failed_pending == 0,
                       timeout=30, what="everything written after space was freed")
        self.assertFalse(factory.paused)
        await wait_for(lambda: threads.deferToThread(lambda: ping(self.grpc_sock).healthy),
                       timeout=10, what="healthy again")
        storage = parts["storage"]
        jobs = {job for job, _ in expected}
        for job in jobs:
            info = storage.job_info(job)
            self.assertEqual(info.log_count, expected[(job, 1)] + expected[(job, 2)], job)
        for job in sorted(jobs)[:: len(jobs) // 5]:
            for stream in (1, 2):
                lines = await threads.deferToThread(query_logs, self.grpc_sock, job, stream)
                self.assertEqual([ln.sequence for ln in lines], list(range(expected[(job,
                                                                                   stream)])))
        await stop_service(self.root)
        for root_, _dirs, names in os.walk(self.data_dir):
            for name in names:
                if name.endswith(".gz"):
                    with open(os.path.join(root_, name), "rb") as f:
                        gzip.decompress(f.read())
        self.flushLoggedErrors(OSError)
