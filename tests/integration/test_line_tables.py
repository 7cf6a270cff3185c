"""Line tables and later-format members in the whole service: real reactor, real sockets,
real files, real gRPC (the service built in-process, as in test_faults)."""

from __future__ import annotations

import gzip
import os

from twisted.internet import threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from joblet_persist.storage import format as fmt
from joblet_persist.storage import segment
from joblet_persist.storage.compress import make_compressor
from tests.integration.support import (
    TwistdProcess,
    in_thread,
    log_frame,
    metric_frame,
    metric_values,
    ping,
    query_logs,
    send_in_pieces,
    short_tempdir,
    stop_service,
    wait_for,
    write_service_config,
)
from tests.integration.test_faults import BASE_TS, _ServiceCase
from tests.test_line_tables import forge

JOB = "11ae0000-0000-4000-8000-00000000000c"


def _flags(path: str) -> list:
    """The JP flags byte of every member of the segment at ``path``."""
    members = segment.thd_scan_segment(path, repair=False).members
    with open(path, "rb") as f:
        return [fmt.read_member_header(f, m.offset)[18] for m in members]


class LineTablesServiceTests(_ServiceCase):
    def logs_path(self, name="stdout.log.gz") -> str:
        return os.path.join(self.data_dir, "logs", JOB, name)

    async def send_lines(self, first: int, n: int) -> None:
        await self.send([log_frame(JOB, 1, BASE_TS + s, s, b"line %d\n" % s)
                         for s in range(first, first + n)]
                        + [metric_frame(JOB, BASE_TS + first, first, metric_values(first))])

    async def test_line_tables_then_off_after_a_restart(self):
        """By default the service writes line members (logs and metrics); restarted with
        storage.lineTables: false it appends the old encoding to the same files; queries
        and gzip read both alike."""
        await self.start()
        await self.send_lines(0, 50)
        await self.stop_and_start({"storage": {"lineTables": False}})
        await self.send_lines(50, 50)
        flags = [f & fmt.FLAG_LINES for f in _flags(self.logs_path())]
        self.assertEqual(flags, [fmt.FLAG_LINES, 0])
        metrics = os.path.join(self.data_dir, "metrics", JOB, "metrics.jsonl.gz")
        self.assertEqual([f & fmt.FLAG_LINES for f in _flags(metrics)], [fmt.FLAG_LINES, 0])
        lines = await threads.deferToThread(query_logs, self.grpc_sock, JOB, 1)
        self.assertEqual([ln.content for ln in lines], [b"line %d\n" % s for s in range(100)])
        with open(self.logs_path(), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()),
                             b"".join(b"line %d\n" % s for s in range(100)))

    async def stop_and_start(self, sections=None):
        await stop_service(self.root)
        merged = dict(self.SECTIONS)
        merged.update(sections or {})
        await self.start(merged)

    async def test_later_format_member_is_kept_and_reported(self):
        """A segment ending with a member of a later format (flags bit 2) is not cut at
        start: the service logs an error naming the file, counts it in
        persist_storage_errors_total{kind="unsupported_member"}, returns the messages
        before it, and appends new data to the next segment; the file keeps every byte."""
        await self.start()
        await self.send_lines(0, 20)
        await stop_service(self.root)
        path = self.logs_path()
        with open(path, "ab") as f:
            f.write(forge(b"from a later release\n", 1, flags=4, first_ordinal=10_000))
        with open(path, "rb") as f:
            before = f.read()
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start()
        lines = await threads.deferToThread(query_logs, self.grpc_sock, JOB, 1)
        self.assertEqual([ln.sequence for ln in lines], list(range(20)))
        storage = self.root.components["storage"]
        self.assertEqual(storage.unsupported_segments, 1)
        self.assertEqual(storage.repaired_segments, 0)
        self.assertEqual(
            self.sample("persist_storage_errors_total", kind="unsupported_member"), 1.0)
        logged = [e for e in events if e.get("log_level") == LogLevel.error
                  and e.get("path") == path]
        self.assertEqual(len(logged), 1, events)
        self.assertEqual(logged[0]["offset"], len(before) - len(forge(
            b"from a later release\n", 1, flags=4, first_ordinal=10_000)))
        await self.send_lines(20, 5)
        lines = await threads.deferToThread(query_logs, self.grpc_sock, JOB, 1)
        self.assertEqual([ln.sequence for ln in lines], list(range(25)))
        self.assertTrue(os.path.exists(self.logs_path("stdout_000001.log.gz")))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)


class TwistdTests(unittest.TestCase):
    """The same through a real ``twistd -n joblet-persist`` process and its config file."""

    timeout = 90

    async def _serve(self, directory: str, sections: dict, frames: bytes, expect: list):
        """Start twistd, send ``frames``, wait until the stdout query returns ``expect``
        (sequences), stop it with SIGTERM; returns its output."""
        config = write_service_config(directory, sections)
        proc = TwistdProcess(self, directory, ["--config", config])
        grpc_sock = os.path.join(directory, "grpc.sock")

        def up():
            try:
                return ping(grpc_sock).healthy
            except Exception:
                return False

        await wait_for(up, timeout=30, what="ping")
        await in_thread(send_in_pieces, os.path.join(directory, "ipc.sock"), frames)

        def stored():
            return [ln.sequence for ln in query_logs(grpc_sock, JOB, 1)]

        # The service is another process: a blocking query here does not hold it up.
        await wait_for(lambda: stored() == expect, timeout=30, what="the messages stored")
        self.assertEqual(await threads.deferToThread(stored), expect, proc.output)
        proc.signal("TERM")
        await proc.wait_exit(30)
        return proc.output

    async def test_later_format_kept_and_line_tables_off(self):
        """A data directory whose stdout segment ends with a member of a later format
        (JP version 2): twistd starts, leaves the file byte for byte, logs the file by
        name, serves the messages before it and appends to the next segment. Started
        again with storage.lineTables: false in its config file, it appends members
        without FLAG_LINES."""
        directory = short_tempdir(self)
        job_dir = os.path.join(directory, "data", "logs", JOB)
        os.makedirs(job_dir)
        path = os.path.join(job_dir, "stdout.log.gz")
        good = fmt.encode_log_members(
            [BASE_TS + s for s in range(5)], list(range(5)), list(range(5)),
            [b"line %d\n" % s for s in range(5)], make_compressor("zlib", 6))[0][0]
        with open(path, "wb") as f:
            f.write(good + forge(b"later\n", 1, version=2, first_ordinal=100))
        with open(path, "rb") as f:
            before = f.read()
        frames = b"".join(log_frame(JOB, 1, BASE_TS + s, s, b"line %d\n" % s)
                          for s in range(5, 10))
        output = await self._serve(directory, {}, frames, list(range(10)))
        self.assertIn(path, output)
        self.assertIn("later storage format", output)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        nxt = os.path.join(job_dir, "stdout_000001.log.gz")
        self.assertEqual([f & fmt.FLAG_LINES for f in _flags(nxt)], [fmt.FLAG_LINES])

        frames = b"".join(log_frame(JOB, 1, BASE_TS + s, s, b"line %d\n" % s)
                          for s in range(10, 15))
        await self._serve(directory, {"storage": {"lineTables": False}}, frames, list(range(15)))
        self.assertEqual([f & fmt.FLAG_LINES for f in _flags(nxt)], [fmt.FLAG_LINES, 0])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
