"""A real ``twistd joblet-persist`` over a data directory a hostile local user has tampered
with: symlinks planted at ``logs/<job>`` and at a segment's name, a segment copied so that
ordinals overlap.  Nothing outside the data directory is created, written or cut; queries
of the damaged job end within their deadline; new files get 0640/0750 under umask 0.

Real processes (posix_spawn, see support.SpawnedTwistd), sockets and files; blocking clients
run in threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from tests.integration.support import (
    SpawnedTwistd,
    grpc_call,
    log_frame,
    ping,
    query_logs,
    send_in_pieces,
    short_tempdir,
    wait_for,
    write_service_config,
)

LINKED_DIR = "f00dbabe-0000-4000-8000-00000000000a"  # logs/<job> -> outside
LINKED_SEGMENT = "f00dbabe-0000-4000-8000-00000000000b"  # logs/<job>/stdout.log.gz -> outside
PLAIN = "f00dbabe-0000-4000-8000-00000000000c"
OVERLAP = "f00dbabe-0000-4000-8000-00000000000d"  # a segment copied under a later name
TS = 1_710_000_000_000_000_000


def _tree(root: str) -> dict:
    """{path: (bytes, mtime_ns)} of every entry under ``root`` (directories: (None, mtime))."""
    found = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(base, name)
            found[path] = (None, os.lstat(path).st_mtime_ns)
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                found[path] = (f.read(), os.lstat(path).st_mtime_ns)
    found[root] = (None, os.lstat(root).st_mtime_ns)
    return found


def _healthy(sock: str) -> defer.Deferred:
    d = threads.deferToThread(ping, sock, 1.0)
    return d.addCallback(lambda r: r is not None and r.healthy)


def _delete(sock: str, job: str):
    request = persist_pb2.DeleteJobRequest(job_uuid=job)
    return grpc_call(sock, lambda stub, t: stub.DeleteJob(request, timeout=t))


class HostileDataDirectoryTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        self.config = write_service_config(
            self.dir, {"writer": {"flushInterval": "100ms", "retryMax": "1s"},
                       "storage": {"segmentMaxBytes": 1}}
        )  # fmt: skip

    async def start(self) -> SpawnedTwistd:
        old = os.umask(0)  # the child inherits it: the modes must not depend on it
        try:
            proc = SpawnedTwistd(self, self.dir, ["--config", self.config])
        finally:
            os.umask(old)
        try:
            await wait_for(lambda: _healthy(self.grpc_sock), timeout=30, what="Ping healthy")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        return proc

    async def stop(self, proc: SpawnedTwistd) -> float:
        started = time.monotonic()
        proc.signal("TERM")
        try:
            status = await proc.wait_exit(30)
        except defer.TimeoutError:
            self.fail(f"the service did not exit on SIGTERM; output:\n{proc.output}")
        self.assertIn(status, (0, -signal.SIGTERM), proc.output)
        return time.monotonic() - started

    def send(self, job: str, lines: list, first_seq: int = 0) -> None:
        data = b"".join(
            log_frame(job, 1, TS + first_seq + i, first_seq + i, line)
            for i, line in enumerate(lines)
        )
        send_in_pieces(self.ipc_sock, data)

    async def contents(self, job: str, timeout: float = 30.0) -> list:
        lines = await threads.deferToThread(query_logs, self.grpc_sock, job, 0, timeout)
        return [line.content for line in lines]

    async def stored(self, job: str) -> list:
        """``contents``, or [] while the job is not known yet."""
        try:
            return await self.contents(job)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return []

    async def test_overlapping_segments_answer_within_the_deadline(self):
        """A job's first segment copied under a later name (as two instances writing one
        directory would leave it): QueryLogs answers within a 10 s deadline with every
        stored line in segment order, before and after a restart, and SIGTERM ends the
        service promptly (the read used to spin forever at 100% CPU)."""
        proc = await self.start()
        await threads.deferToThread(self.send, OVERLAP, [b"first\n"])
        await wait_for(lambda: self.stored(OVERLAP), timeout=20, what="first line stored")
        await threads.deferToThread(self.send, OVERLAP, [b"second\n"], 1)

        async def two():
            return len(await self.stored(OVERLAP)) == 2

        await wait_for(two, timeout=20, what="second line stored")
        await self.stop(proc)
        job_dir = os.path.join(self.data_dir, "logs", OVERLAP)
        self.assertEqual(sorted(os.listdir(job_dir)), ["stdout.log.gz", "stdout_000001.log.gz"])
        shutil.copyfile(
            os.path.join(job_dir, "stdout.log.gz"), os.path.join(job_dir, "stdout_000002.log.gz")
        )
        for _run in range(2):
            proc = await self.start()
            started = time.monotonic()
            got = await self.contents(OVERLAP, timeout=10.0)
            self.assertLess(time.monotonic() - started, 10.0)
            self.assertEqual(got, [b"first\n", b"second\n", b"first\n"])
            self.assertLess(await self.stop(proc), 10.0)
        self.assertIn("overlap", proc.output)

    async def test_planted_symlinks(self):
        """Symlinks at logs/<job> (to a directory) and at logs/<job>/stdout.log.gz (to a
        file that looks like a torn gzip tail) pointing outside: ingest, query, delete,
        restart.  The outside tree keeps its bytes and mtimes and gains no file, the other
        jobs are stored and read back, the refusal is logged, and what the service created
        under umask 0 is 0640 (files) and 0750 (directories)."""
        outside = os.path.join(self.dir, "outside")
        os.makedirs(os.path.join(outside, "dir"))
        with open(os.path.join(outside, "precious.gz"), "wb") as f:
            # Looks like a torn gzip tail: a repair through the link would cut it.
            f.write(b"\x1f\x8b\x08\x00 precious bytes that are not a gzip member")
        os.makedirs(os.path.join(self.data_dir, "logs", LINKED_SEGMENT))
        os.symlink(os.path.join(outside, "dir"), os.path.join(self.data_dir, "logs", LINKED_DIR))
        os.symlink(
            os.path.join(outside, "precious.gz"),
            os.path.join(self.data_dir, "logs", LINKED_SEGMENT, "stdout.log.gz"),
        )
        before = _tree(outside)

        proc = await self.start()
        for job in (LINKED_DIR, LINKED_SEGMENT, PLAIN):
            await threads.deferToThread(self.send, job, [b"line of %s\n" % job.encode()])

        async def stored():
            plain = await self.stored(PLAIN)
            linked = await self.stored(LINKED_SEGMENT)
            return plain and linked

        await wait_for(stored, timeout=20, what="the other jobs stored")
        self.assertEqual(
            await self.contents(LINKED_SEGMENT), [b"line of %s\n" % LINKED_SEGMENT.encode()]
        )
        self.assertEqual(_tree(outside), before)
        # Deleting the job whose directory is a link removes the link, never the target;
        # that also gives up the writer's batch for it.
        await threads.deferToThread(_delete, self.grpc_sock, LINKED_DIR)
        self.assertFalse(os.path.lexists(os.path.join(self.data_dir, "logs", LINKED_DIR)))
        self.assertEqual(_tree(outside), before)
        await self.stop(proc)
        self.assertIn("refused", proc.output)

        # Restarted: the same answers, the outside untouched.
        proc = await self.start()
        self.assertEqual(await self.contents(PLAIN), [b"line of %s\n" % PLAIN.encode()])
        self.assertEqual(
            await self.contents(LINKED_SEGMENT), [b"line of %s\n" % LINKED_SEGMENT.encode()]
        )
        await self.stop(proc)
        self.assertEqual(_tree(outside), before)

        # What the service created, under umask 0: files 0640, directories 0750.
        # (The data directory and logs/ were made by this test, with the umask it had.)
        self.assertEqual(
            stat.S_IMODE(os.lstat(os.path.join(self.data_dir, "logs", PLAIN)).st_mode), 0o750
        )
        for path in (
            os.path.join(self.data_dir, "job_index.json"),
            os.path.join(self.data_dir, "logs", PLAIN, "stdout.log.gz"),
            os.path.join(self.data_dir, "logs", LINKED_SEGMENT, "stdout_000001.log.gz"),
        ):
            self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o640, path)
