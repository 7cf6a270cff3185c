"""Disk full: the data directory on a small tmpfs that the test fills and then frees.

Needs root (to mount the tmpfs); skipped with the reason otherwise.  Real reactor, in-process
service built by ``tap.build_service``, real Unix sockets and gRPC.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.integration.support import (
    check_gzip_files,
    in_thread,
    log_frame,
    ping,
    query_logs,
    send_in_pieces,
    service_config_text,
    short_tempdir,
    start_service,
    stop_service,
    wait_for,
)

JOBS = ["d15cf011-0000-4000-8000-000000000001", "d15cf011-0000-4000-8000-000000000002"]
FS_BYTES = 8 << 20
HIGH_WATER = 1 << 20
LOW_WATER = 512 << 10
CHUNK = 4096
FRAMES_PER_JOB = 384  # 2 jobs x 384 x 4 KiB = 3 MiB of incompressible content
BASE_TS = 1_720_000_000_000_000_000


def _mount_tmpfs(testcase, size: int) -> str:
    """Mount a tmpfs of ``size`` bytes on a fresh directory; unmounted at cleanup."""
    if os.geteuid() != 0:
        raise unittest.SkipTest("mounting a tmpfs needs root")
    mountpoint = os.path.join(short_tempdir(testcase, "jpfull"), "mnt")
    os.mkdir(mountpoint)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise unittest.SkipTest(f"cannot mount a tmpfs: {result.stderr.strip() or result}")
    testcase.addCleanup(subprocess.run, ["umount", "-l", mountpoint], capture_output=True)
    return mountpoint


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: str) -> None:
    """Write ``path`` until the filesystem is full.  Blocking."""
    block = b"\xa5" * (64 << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)


class DiskFullTests(unittest.TestCase):
    timeout = 60

    async def test_disk_full_then_freed(self):
        """With the data directory's filesystem full: the service stays up and Ping answers
        unhealthy at once, /health's writer check fails, write errors are counted, ingest
        pauses by backpressure (the senders block, buffered bytes stay near the high-water
        mark), the failed appends leave no file behind (not even an empty one) and a failed
        job index write leaves the previous index whole.  Once space is freed, the retried
        appends succeed, ingest resumes by itself, Ping is healthy again, every frame is
        stored in order and byte-exact in files that decode completely, and the job index
        written on stop agrees with the files."""
        mountpoint = _mount_tmpfs(self, FS_BYTES)
        sockets = short_tempdir(self)
        data_dir = os.path.join(mountpoint, "data")
        grpc_sock = os.path.join(sockets, "grpc.sock")
        text = service_config_text(
            sockets,
            {
                "storage": {"dataDir": data_dir},
                "writer": {
                    "flushInterval": "100ms",
                    "batchMaxBytes": "64KiB",
                    "highWaterBytes": HIGH_WATER,
                    "lowWaterBytes": LOW_WATER,
                    "retryInitial": "100ms",
                    "retryMax": "400ms",
                },
            },
        )
        root = await start_service(self, text)
        parts = root.components
        writer, factory, health, registry = (
            parts["writer"], parts["factory"], parts["health"], parts["metrics"].registry
        )

        ballast = os.path.join(mountpoint, "ballast")
        await threads.deferToThread(_fill, ballast)
        self.assertEqual(_free_bytes(mountpoint), 0)

        rng = random.Random(7)
        expected = {}
        payloads = []
        for n, job in enumerate(JOBS):
            lines = []
            data = bytearray()
            for seq in range(FRAMES_PER_JOB):
                content = rng.randbytes(CHUNK)
                data += log_frame(job, 1 + n, BASE_TS + seq, seq, content)
                lines.append((1 + n, BASE_TS + seq, seq, content))
            expected[job] = lines
            payloads.append(bytes(data))
        sending = defer.gatherResults(
            [in_thread(send_in_pieces, _ipc_path(sockets), p, (65536,)) for p in payloads]
        )

        await wait_for(
            lambda: writer.write_errors > 0 and writer.paused and factory.paused,
            timeout=20,
            what="write errors and backpressure",
        )
        self.assertTrue(root.running)
        self.assertFalse(sending.called, "the senders finished although ingest is paused")
        self.assertGreaterEqual(registry.get_sample_value("persist_write_errors_total"), 1)
        self.assertEqual(registry.get_sample_value("persist_backpressure_active"), 1)
        # Ping keeps answering, and reports the failing writes at once: well before the
        # health monitor's next disk probe (every 5 s), with nobody asking /health.
        response = await wait_for(
            lambda: _ping_says(grpc_sock, healthy=False), timeout=3, what="Ping unhealthy"
        )
        self.assertGreater(response.timestamp, 0)
        # What /health reports: the writer check fails.
        self.assertFalse(health.refresh())
        self.assertFalse(health.details["writer"]["ok"])
        # Memory stays bounded: at most a read's worth of frames beyond the high-water mark.
        received = writer.messages_received
        self.assertLess(writer.buffered_bytes, HIGH_WATER + 256 * 1024)
        self.assertLess(received, 2 * FRAMES_PER_JOB)
        self.assertFalse(sending.called)
        # Failed appends leave nothing behind, not even an empty segment file: what is on
        # disk is complete gzip, even now.
        self.assertEqual(await threads.deferToThread(check_gzip_files, self, data_dir), {})
        # A job index write fails too, and leaves the previous index whole.
        storage = parts["storage"]
        self.assertFalse(await storage.flush_index())
        self.assertGreaterEqual(storage.index_write_errors, 1)
        with open(os.path.join(data_dir, "job_index.json")) as f:
            self.assertEqual(json.load(f)["jobs"], {})

        os.unlink(ballast)
        await sending
        await wait_for(
            lambda: writer.messages_written == 2 * FRAMES_PER_JOB and writer.failed_pending == 0,
            timeout=20,
            what="everything written after space was freed",
        )
        self.assertFalse(writer.paused)
        self.assertFalse(factory.paused)
        await wait_for(
            lambda: _ping_says(grpc_sock, healthy=True), timeout=3, what="Ping healthy again"
        )
        self.assertTrue(health.refresh(), health.details)
        self.assertEqual(registry.get_sample_value("persist_backpressure_active"), 0)

        for job in JOBS:
            lines = await threads.deferToThread(query_logs, grpc_sock, job, 0)
            self.assertEqual(
                [(ln.stream, ln.timestamp, ln.sequence, ln.content) for ln in lines],
                expected[job],
            )
        decoded = await threads.deferToThread(check_gzip_files, self, data_dir)
        for n, job in enumerate(JOBS):
            name = ("stdout", "stderr")[n] + ".log.gz"
            path = os.path.join(data_dir, "logs", job, name)
            self.assertEqual(decoded[path], b"".join(entry[3] for entry in expected[job]))
        # The job index, whose writes failed too while the disk was full, is written on stop
        # and agrees with the files.
        await stop_service(root)
        with open(os.path.join(data_dir, "job_index.json")) as f:
            index = json.load(f)["jobs"]
        for job in JOBS:
            self.assertEqual(index[job]["log_count"], FRAMES_PER_JOB)
            self.assertEqual(
                index[job]["size_bytes"],
                sum(os.path.getsize(p) for p in decoded if f"/{job}/" in p),
            )
        # The failed appends were logged (as failures, with their retry delay).
        self.assertTrue(self.flushLoggedErrors(OSError))


def _ipc_path(sockets: str) -> str:
    return os.path.join(sockets, "ipc.sock")


def _ping_says(sock: str, healthy: bool) -> defer.Deferred:
    """Deferred: the PingResponse if Ping answered with ``healthy``, else False."""
    d = threads.deferToThread(ping, sock)
    return d.addCallback(lambda r: r is not None and r.healthy == healthy and r)
