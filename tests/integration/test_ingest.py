"""Ingest end to end: many real IPC connections into an in-process service, read back over gRPC.

Real reactor, real Unix sockets, real gRPC (client calls run in threads), real files.  The
service is the one ``tap.build_service`` wires; only monitoring listeners are switched off.
"""

from __future__ import annotations

import collections
import os
import random

from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from tests.integration.support import (
    check_gzip_files,
    envelope,
    frame,
    grpc_call,
    gzip_dc,
    in_thread,
    log_frame,
    metric_frame,
    metric_message_values,
    metric_values,
    query_logs,
    query_metrics,
    send_in_pieces,
    service_config_text,
    short_tempdir,
    start_service,
    stop_service,
    wait_for,
)

JOBS = [
    "6c1f0e52-0d4b-4f0e-9a57-3c1d2b7e8a01",
    "6c1f0e52-0d4b-4f0e-9a57-3c1d2b7e8a02",
    "job_3.build-7",
    "J4",
]
CONNECTIONS = 20
FRAMES_PER_CONNECTION = 60
MAX_FRAME = 256 * 1024
BASE_TS = 1_700_000_000_123_456_789


class _Stream:
    """What one connection sends, and what the service must make of it."""

    def __init__(self, conn: int):
        self.conn = conn
        self.data = bytearray()
        self.logs: list[tuple] = []  # (job, stream, timestamp, sequence, content), in send order
        self.metrics: list[tuple] = []  # (job, timestamp, sequence, values)
        self.rejected: collections.Counter = collections.Counter()
        # Frames read as LOG / METRIC (accepted or rejected after the envelope decoded).
        self.received = collections.Counter()


def _content(rng: random.Random, conn: int, i: int) -> bytes:
    kind = i % 9
    if kind == 0:
        return b""
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 2:
        return bytes(range(256)) + b"\x00\r\n\x00"
    if kind == 3 and i % 27 == 3:
        return rng.randbytes(150_000)  # one read cannot hold it: split over many
    if kind == 4:
        return f"partial line of {conn}/{i} without newline".encode()
    return f"conn {conn} line {i}: {'x' * rng.randrange(0, 120)}\n".encode()


def _rejects(job: str, ts: int, seq: int) -> list[tuple[str, bytes, str | None]]:
    """(reason, frame, type name counted as received or None) of each kind of bad input."""
    return [
        ("bad_envelope", frame(b"\xff\xff\xff\xff"), None),
        ("unknown_type", frame(envelope(42, job, b"?")), "other"),
        ("unknown_type", frame(envelope(0, job)), "unspecified"),
        ("bad_payload", frame(envelope(5, job, b"\xff\xff\xff")), "accept_event"),
        ("invalid_job_id", log_frame("../etc", 1, ts, seq, b"never stored"), "log"),
        ("invalid_job_id", metric_frame("../etc", ts, seq, metric_values(1)), "metric"),
        ("oversized", log_frame(job, 1, ts, seq, b"o" * (MAX_FRAME + 1)), None),
        ("bad_payload", frame(envelope(1, job, b"\xff\xff\xff")), "log"),
        ("bad_payload", frame(envelope(2, job, b"\x07")), "metric"),
        ("invalid_stream", log_frame(job, 0, ts, seq, b"no stream"), "log"),
    ]


def _build_stream(conn: int) -> _Stream:
    rng = random.Random(conn)
    s = _Stream(conn)
    for i in range(FRAMES_PER_CONNECTION):
        job = JOBS[(conn + i // 7) % len(JOBS)]
        ts = BASE_TS + conn * 1_000_000_000 + i * 1_001
        seq = conn * 1_000_000 + i
        stream = 2 if rng.random() < 0.35 else 1
        content = _content(rng, conn, i)
        s.data += log_frame(job, stream, ts, seq, content)
        s.logs.append((job, stream, ts, seq, content))
        s.received["log"] += 1
        if i % 5 == 2:
            values = metric_values(seq)
            s.data += metric_frame(job, ts + 3, seq, values)
            s.metrics.append((job, ts + 3, seq, values))
            s.received["metric"] += 1
        if i % 4 == 1:
            options = _rejects(job, ts, seq)
            reason, bad, counted_as = options[(conn + i) % len(options)]
            s.data += bad
            s.rejected[reason] += 1
            if counted_as is not None:
                s.received[counted_as] += 1
    s.data = bytes(s.data)
    return s


def _expected_by_job(streams: list[_Stream]):
    logs = collections.defaultdict(list)
    metrics = collections.defaultdict(list)
    for s in streams:
        for entry in s.logs:
            logs[entry[0]].append((s.conn, entry))
        for entry in s.metrics:
            metrics[entry[0]].append((s.conn, entry))
    return logs, metrics


def _conn_of(sequence: int) -> int:
    return sequence // 1_000_000


def _line_tuple(job: str, line) -> tuple:
    return (job, line.stream, line.timestamp, line.sequence, line.content)


class ManyConnectionsTests(unittest.TestCase):
    timeout = 60

    def _config(self, directory: str) -> str:
        return service_config_text(
            directory,
            {
                "ipc": {"maxFrameBytes": MAX_FRAME},
                # Only batch size, flush_all and stop flush: data stays buffered in between.
                "writer": {"flushInterval": "30s", "batchMaxMessages": 64},
            },
        )

    async def _query_all(self, sock: str) -> dict:
        """job -> (merged, stdout, stderr, metrics) read over gRPC."""
        result = {}
        for job in JOBS:
            merged = await threads.deferToThread(query_logs, sock, job, 0)
            stdout = await threads.deferToThread(query_logs, sock, job, 1)
            stderr = await threads.deferToThread(query_logs, sock, job, 2)
            metrics = await threads.deferToThread(query_metrics, sock, job)
            result[job] = (merged, stdout, stderr, metrics)
        return result

    def _check_job_logs(self, job, expected, merged, stdout, stderr):
        sent = {entry[3]: entry for _, entry in expected}
        self.assertEqual(len(merged), len(expected), f"{job}: one LogLine per accepted message")
        got = {line.sequence: _line_tuple(job, line) for line in merged}
        self.assertEqual(len(got), len(merged), f"{job}: a message was stored twice")
        # Byte-exact content, exact stream, timestamp and sequence of every message.
        self.assertEqual(got, sent)
        for line in merged:
            self.assertEqual(line.job_uuid, job)
        # Arrival order: each connection's messages keep the order it sent them in, in the
        # merged view and in each stream; each stream is the merged view's subsequence.
        for conn in {c for c, _ in expected}:
            sent_order = [entry[3] for c, entry in expected if c == conn]
            merged_order = [ln.sequence for ln in merged if _conn_of(ln.sequence) == conn]
            self.assertEqual(merged_order, sent_order, f"{job}: order of connection {conn}")
        self.assertEqual([_line_tuple(job, ln) for ln in stdout],
                         [_line_tuple(job, ln) for ln in merged if ln.stream == 1])
        self.assertEqual([_line_tuple(job, ln) for ln in stderr],
                         [_line_tuple(job, ln) for ln in merged if ln.stream == 2])

    def _check_job_metrics(self, job, expected, metrics):
        self.assertEqual(len(metrics), len(expected), job)
        got = {m.sequence: (job, m.timestamp, m.sequence, metric_message_values(m))
               for m in metrics}
        self.assertEqual(got, {entry[2]: entry for _, entry in expected})
        for conn in {c for c, _ in expected}:
            sent_order = [entry[2] for c, entry in expected if c == conn]
            got_order = [m.sequence for m in metrics if _conn_of(m.sequence) == conn]
            self.assertEqual(got_order, sent_order, f"{job}: metric order of connection {conn}")

    async def test_many_connections_round_trip(self):
        """Twenty concurrent IPC connections send LOG and METRIC frames for four jobs, cut at
        odd boundaries and interleaved with every kind of bad frame.  Read back over gRPC:
        exactly one LogLine per accepted LOG message with byte-exact content (binary, empty,
        150 kB chunks), exact stream/timestamp/sequence, each connection's order kept per
        stream and in the merged view, metric values exact; every bad frame is counted under
        its reason and nothing else is lost; ``gzip -dc`` of each stdout.log.gz is the
        concatenated stdout content.  After more frames and a stop (the flush interval never
        fired), the socket files are gone and a new service on the same directory returns
        everything, in the same order."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        ipc_sock = os.path.join(directory, "ipc.sock")
        grpc_sock = os.path.join(directory, "grpc.sock")
        text = self._config(directory)
        root = await start_service(self, text)
        parts = root.components
        writer, factory, metrics = parts["writer"], parts["factory"], parts["metrics"]

        streams = [_build_stream(c) for c in range(CONNECTIONS)]
        expected_logs, expected_metrics = _expected_by_job(streams)
        accepted = sum(len(s.logs) + len(s.metrics) for s in streams)
        rejected = sum((s.rejected for s in streams), collections.Counter())
        received = sum((s.received for s in streams), collections.Counter())
        self.assertEqual(set(rejected), {
            "bad_envelope", "unknown_type", "invalid_job_id", "oversized",
            "bad_payload", "invalid_stream",
        })

        await defer.gatherResults(
            [in_thread(send_in_pieces, ipc_sock, s.data) for s in streams], consumeErrors=True
        )
        await wait_for(
            lambda: writer.messages_received >= accepted
            and metrics.rejected_total() >= sum(rejected.values())
            and factory.connection_count() == 0,
            timeout=20,
            what="every frame read and every connection closed",
        )
        await writer.flush_all()

        self.assertEqual(writer.messages_received, accepted)
        self.assertEqual(metrics.rejected_total(), sum(rejected.values()))
        registry = metrics.registry
        for reason, count in rejected.items():
            self.assertEqual(
                registry.get_sample_value(
                    "persist_ipc_frames_rejected_total", {"reason": reason}
                ),
                count,
                reason,
            )
        for name, count in received.items():
            self.assertEqual(
                registry.get_sample_value("persist_ipc_messages_received_total", {"type": name}),
                count,
                name,
            )
        self.assertEqual(writer.write_errors, 0)

        before = await self._query_all(grpc_sock)
        for job in JOBS:
            merged, stdout, stderr, job_metrics = before[job]
            self._check_job_logs(job, expected_logs[job], merged, stdout, stderr)
            self._check_job_metrics(job, expected_metrics[job], job_metrics)
            # The file holds the raw stdout bytes, as plain gzip.
            path = os.path.join(data_dir, "logs", job, "stdout.log.gz")
            raw = await threads.deferToThread(gzip_dc, path)
            self.assertEqual(raw, b"".join(line.content for line in stdout), job)
        decoded = await threads.deferToThread(check_gzip_files, self, data_dir)
        self.assertEqual(len([p for p in decoded if p.endswith("stdout.log.gz")]), len(JOBS))

        # More frames, then a stop before any timer flush: the stop path stores them.
        extra = bytearray()
        extra_logs = []
        for i in range(40):
            job = JOBS[i % 2]
            entry = (job, 1 + i % 2, BASE_TS + 10**12 + i, 900_000_000 + i, b"late %d\n" % i)
            extra += log_frame(*entry)
            extra_logs.append(entry)
        extra += metric_frame(JOBS[0], BASE_TS + 10**12, 900_000_100, metric_values(7))
        await in_thread(send_in_pieces, ipc_sock, bytes(extra))
        await wait_for(
            lambda: writer.messages_received == accepted + len(extra_logs) + 1
            and factory.connection_count() == 0,
            timeout=10,
            what="the late frames read",
        )
        await stop_service(root)
        self.assertFalse(os.path.exists(ipc_sock), "IPC socket left behind")
        self.assertFalse(os.path.exists(grpc_sock), "gRPC socket left behind")

        await start_service(self, text)
        after = await self._query_all(grpc_sock)
        for job in JOBS:
            merged, stdout, stderr, job_metrics = after[job]
            late = [e for e in extra_logs if e[0] == job]
            self.assertEqual(
                [_line_tuple(job, ln) for ln in merged],
                [_line_tuple(job, ln) for ln in before[job][0]] + late,
                job,
            )
            self.assertEqual(
                [_line_tuple(job, ln) for ln in stdout],
                [_line_tuple(job, ln) for ln in merged if ln.stream == 1],
            )
            late_metrics = 1 if job == JOBS[0] else 0
            self.assertEqual(len(job_metrics), len(before[job][3]) + late_metrics)
            self.assertEqual(job_metrics[: len(before[job][3])], before[job][3])
            info = await threads.deferToThread(
                grpc_call,
                grpc_sock,
                lambda stub, t, job=job: stub.GetJobInfo(
                    persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t
                ),
            )
            self.assertEqual(info.log_count, len(merged))
            self.assertEqual(info.metric_count, len(job_metrics))
        await threads.deferToThread(check_gzip_files, self, data_dir)
