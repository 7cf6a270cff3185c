"""The query API end to end: the real service, the real ingest path, the real storage.

Each test builds the whole service in-process with ``tap.build_service`` (real
reactor, real thread pools, LocalStorage on a short directory under /tmp),
writes data only through the IPC Unix socket (length-prefixed IPCMessage
frames, exactly what joblet-core sends), waits until the data is queryable by
polling GetJobInfo, and then talks to the service over a real gRPC channel
on its Unix socket.  Blocking gRPC and socket calls run in threads
(``deferToThread``) so that the reactor stays free to serve ingest, the
writer and the servicer's calls onto the reactor.

What is proven here and not by the unit tests (tests/test_query.py against a
fake storage): that what joblet-core sends is what queries return, byte for
byte and in arrival order, through the writer's batching, the gzip member
format and the seek-based reader; that a late offset or a narrow time range
inflates only the members it needs (read from the Prometheus counter
``persist_query_members_total``); that deletion, retention and files written
by the older Go service behave as the API promises.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import struct
import time
from dataclasses import astuple

import grpc
import yaml
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from joblet_persist import cli
from joblet_persist._proto import ipc_pb2, persist_pb2_grpc
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.config import config_from_string
from joblet_persist.tap import build_service
from tests.fakes import Aborted, FakeContext
from tests.integration.support import short_tempdir, wait_for

#: Unix ns of the first line written by these tests (2025-11-24T16:00:00Z).
T0 = 1_764_000_000 * 10**9
MS = 10**6
SEC = 10**9

BAD_IDS = ["../x", "a/b", "", "x" * 200, "..", ".hidden", "a..b"]


# -- IPC frames, as joblet-core writes them --------------------------------------------


def _frame(envelope: ipc_pb2.IPCMessage) -> bytes:
    body = envelope.SerializeToString()
    return struct.pack(">I", len(body)) + body


def log_frame(job: str, stream: int, timestamp: int, sequence: int, content: bytes) -> bytes:
    """One LOG frame: an IPCMessage envelope carrying a serialized LogLine."""
    line = ipc_pb2.LogLine(
        job_uuid=job, stream=stream, timestamp=timestamp, sequence=sequence, content=content
    )
    return _frame(
        ipc_pb2.IPCMessage(
            version=1,
            type=ipc_pb2.MESSAGE_TYPE_LOG,
            job_uuid=job,
            timestamp=timestamp,
            sequence=sequence,
            data=line.SerializeToString(),
        )
    )


def metric_frame(job: str, timestamp: int, sequence: int, i: int) -> bytes:
    """One METRIC frame whose every field is derived from ``i``."""
    metric = ipc_pb2.Metric(job_uuid=job, timestamp=timestamp, sequence=sequence)
    d = metric.data
    d.cpu_usage = i + 0.25
    d.memory_usage = 1_000_000 + i
    d.gpu_usage = i / 2
    d.disk_io.read_bytes, d.disk_io.write_bytes = 10 * i, 20 * i
    d.disk_io.read_ops, d.disk_io.write_ops = i, 2 * i
    d.network_io.rx_bytes, d.network_io.tx_bytes = 30 * i, 40 * i
    d.network_io.rx_packets, d.network_io.tx_packets = 3 * i, 4 * i
    return _frame(
        ipc_pb2.IPCMessage(
            version=1,
            type=ipc_pb2.MESSAGE_TYPE_METRIC,
            job_uuid=job,
            timestamp=timestamp,
            sequence=sequence,
            data=metric.SerializeToString(),
        )
    )


def expected_metric(job: str, timestamp: int, sequence: int, i: int) -> pb.Metric:
    m = pb.Metric(job_uuid=job, timestamp=timestamp, sequence=sequence)
    d = m.data
    d.cpu_usage = i + 0.25
    d.memory_usage = 1_000_000 + i
    d.gpu_usage = i / 2
    d.disk_io.read_bytes, d.disk_io.write_bytes = 10 * i, 20 * i
    d.disk_io.read_ops, d.disk_io.write_ops = i, 2 * i
    d.network_io.rx_bytes, d.network_io.tx_bytes = 30 * i, 40 * i
    d.network_io.rx_packets, d.network_io.tx_packets = 3 * i, 4 * i
    return m


def as_tuples(lines) -> list:
    return [(x.stream, x.timestamp, x.sequence, x.content) for x in lines]


def select(records, stream=0, start=0, end=0, offset=0, limit=0) -> list:
    """The reference semantics of docs/wire.md: range (bounds > 0), then offset, then limit."""
    out = [
        r
        for r in records
        if (stream == 0 or r[0] == stream)
        and (start <= 0 or r[1] >= start)
        and (end <= 0 or r[1] <= end)
    ]
    out = out[offset:]
    return out[:limit] if limit else out


# -- the harness ------------------------------------------------------------------------


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class ServiceTestBase(TestCase):
    """Starts the whole service in-process for each test; subclasses adjust ``settings``."""

    timeout = 60
    #: YAML settings merged over the base configuration (nested dicts).
    settings: dict = {}

    def prepare_data_dir(self, data_dir: str) -> None:
        """Hook: put files into the data directory before the service starts."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = short_tempdir(self, "jpq")
        self.data_dir = os.path.join(self.dir, "data")
        os.makedirs(self.data_dir)
        self.prepare_data_dir(self.data_dir)
        base = {
            "server": {
                "grpcSocket": f"{self.dir}/g.sock",
                "grpcAddress": "",
                "shutdownGrace": "500ms",
            },
            "ipc": {"socket": f"{self.dir}/i.sock"},
            "storage": {
                "dataDir": self.data_dir,
                "retention": {"minFreeBytes": 0, "interval": "1h"},
            },
            "writer": {"flushInterval": "200ms"},
            "monitoring": {"enabled": False},
        }
        text = yaml.safe_dump(_merge(base, self.settings))
        self.config = config_from_string(text, source="test_query_e2e")
        self.registry = CollectorRegistry()
        self.root = build_service(self.config, reactor, registry=self.registry)
        self.parts = self.root.components
        self.root.startService()
        self.addCleanup(self._stop)
        yield self.root.started
        self.channel = grpc.insecure_channel(f"unix:{self.config.server.grpc_socket}")
        self.addCleanup(self.channel.close)
        self.stub = persist_pb2_grpc.PersistServiceStub(self.channel)
        self._ipc = []
        yield wait_for(self._healthy, timeout=20, what="Ping healthy")

    def _stop(self):
        for s in self._ipc:
            s.close()
        return self.root.stopService()

    def _healthy(self):
        def ping():
            try:
                return self.stub.Ping(pb.PingRequest(), timeout=2).healthy
            except grpc.RpcError:
                return False

        return threads.deferToThread(ping)

    # -- helpers -------------------------------------------------------------------------

    def call(self, fn, *args, **kw):
        """Run a blocking call in a thread; a server stream is read to its end (a list)."""

        def run():
            result = fn(*args, **kw)
            return list(result) if hasattr(result, "__next__") else result

        return threads.deferToThread(run)

    def code_of(self, fn, *args, **kw):
        """Fires with the status code of a call (OK when it succeeds)."""

        def run():
            try:
                result = fn(*args, **kw)
                if hasattr(result, "__next__"):
                    list(result)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        return threads.deferToThread(run)

    def connect(self) -> socket.socket:
        """A new IPC connection to the service, closed at cleanup."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.config.ipc.socket)
        self._ipc.append(s)
        return s

    def send(self, data: bytes, conn: socket.socket | None = None):
        """Write frames to the IPC socket from a thread (the reactor must keep reading)."""
        conn = conn if conn is not None else (self._ipc[0] if self._ipc else self.connect())
        return threads.deferToThread(conn.sendall, data)

    def info(self, job: str):
        def get():
            try:
                return self.stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=job), timeout=5)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

        return threads.deferToThread(get)

    def wait_counts(self, job: str, logs: int = 0, metrics: int = 0, timeout: float = 20):
        """Poll GetJobInfo until the job reports these counts; fires with the response."""

        @defer.inlineCallbacks
        def reached():
            info = yield self.info(job)
            return info is not None and (info.log_count, info.metric_count) == (logs, metrics) and info

        return wait_for(reached, timeout=timeout, interval=0.02, what=f"{job} counts {logs}/{metrics}")

    def sample(self, name: str, **labels) -> float:
        value = self.registry.get_sample_value(name, labels)
        return value or 0.0

    def inflated(self) -> float:
        """``persist_query_members_total{result="inflated"}`` from the service's registry."""
        return self.sample("persist_query_members_total", result="inflated")

    def logs(self, job: str, batched: bool = False, **kw):
        request = pb.QueryLogsRequest(job_uuid=job, **kw)
        if not batched:
            return self.call(self.stub.QueryLogs, request, timeout=30).addCallback(as_tuples)

        def flat(batches):
            return as_tuples([line for b in batches for line in b.lines])

        return self.call(self.stub.QueryLogsBatched, request, timeout=30).addCallback(flat)


# -- data shared by several tests --------------------------------------------------------


def mixed_lines(n: int) -> list:
    """(stream, timestamp, sequence, content) of ``n`` interleaved stdout/stderr messages.

    Contents are byte-exact edge cases too: empty, binary, no newline, CRLF.
    """
    out = []
    for i in range(n):
        stream = 2 if i % 3 == 1 else 1
        if i % 17 == 5:
            content = b""
        elif i % 13 == 7:
            content = bytes(range(256)) + b"\x00\xff"
        elif i % 11 == 3:
            content = b"partial chunk %d without newline" % i
        else:
            content = b"line %d of the job\r\n" % i
        out.append((stream, T0 + i * MS, i, content))
    return out


class QueryTests(ServiceTestBase):
    """Every RPC over real gRPC against data written through the ingest path."""

    settings = {"query": {"batchMaxItems": 7, "batchMaxBytes": 300}}
    JOB = "9d7b3a52-1c4e-4f0a-9b8e-2e6f1a0c7d31"
    N = 300
    M = 40

    @defer.inlineCallbacks
    def fill(self):
        self.lines = mixed_lines(self.N)
        # A chunk bigger than a query batch travels alone in its own message.
        self.lines.append((1, T0 + self.N * MS, self.N, b"B" * 10_000 + b"\n"))
        frames = [log_frame(self.JOB, *line) for line in self.lines]
        frames += [metric_frame(self.JOB, T0 + i * SEC, 1000 + i, i) for i in range(self.M)]
        yield self.send(b"".join(frames))
        yield self.wait_counts(self.JOB, len(self.lines), self.M)

    @defer.inlineCallbacks
    def test_query_logs_streams_ranges_offsets_limits(self):
        """QueryLogs returns one LogLine per stored message, byte-exact, in arrival order, for
        stream 0/1/2, inclusive time ranges (each bound applies when > 0), offset and limit;
        QueryLogsBatched returns identical lines in several batch messages."""
        yield self.fill()
        every = self.lines
        cases = [
            {},
            {"stream": 1},
            {"stream": 2},
            {"start_time": T0 + 50 * MS, "end_time": T0 + 120 * MS},
            {"start_time": T0 + 50 * MS, "end_time": T0 + 50 * MS},
            {"start_time": T0 + 250 * MS},
            {"end_time": T0 + 9 * MS},
            {"offset": 10, "limit": 20},
            {"stream": 2, "offset": 33, "limit": 5},
            {"stream": 1, "start_time": T0 + 100 * MS, "end_time": T0 + 200 * MS, "offset": 7,
             "limit": 11},
            {"offset": self.N - 3},
            {"offset": self.N + 5},
            {"limit": 1},
            {"start_time": T0 + 10_000 * MS},
        ]
        for case in cases:
            want = select(
                every,
                case.get("stream", 0),
                case.get("start_time", 0),
                case.get("end_time", 0),
                case.get("offset", 0),
                case.get("limit", 0),
            )
            got = yield self.logs(self.JOB, node_id="node-a", **case)
            self.assertEqual(got, want, case)
            batched = yield self.logs(self.JOB, batched=True, **case)
            self.assertEqual(batched, want, case)
        whole = yield self.call(
            self.stub.QueryLogsBatched, pb.QueryLogsRequest(job_uuid=self.JOB), timeout=30
        )
        self.assertEqual({x.job_uuid for b in whole for x in b.lines}, {self.JOB})
        # Batches are filled greedily up to 7 lines and 300 content bytes; a line larger
        # than that travels alone.
        sizes = [[len(x.content) for x in b.lines] for b in whole]
        for this, following in zip(sizes, sizes[1:] + [None], strict=True):
            self.assertTrue(len(this) <= 7 and (sum(this) <= 300 or len(this) == 1), this)
            if following is not None:
                self.assertTrue(len(this) == 7 or sum(this) + following[0] > 300,
                                (this, following))
        self.assertIn([10_001], sizes)
        self.assertIn(258, [n for batch in sizes for n in batch])

    @defer.inlineCallbacks
    def test_query_metrics_and_batched(self):
        """QueryMetrics returns every sample with every field as sent; range, offset and limit
        apply; QueryMetricsBatched returns identical Metrics."""
        yield self.fill()
        samples = [expected_metric(self.JOB, T0 + i * SEC, 1000 + i, i) for i in range(self.M)]
        cases = [
            ({}, samples),
            ({"start_time": T0 + 5 * SEC, "end_time": T0 + 9 * SEC}, samples[5:10]),
            ({"offset": 30}, samples[30:]),
            ({"limit": 3}, samples[:3]),
            ({"start_time": T0 + 10 * SEC, "offset": 2, "limit": 4}, samples[12:16]),
            ({"end_time": T0 - 1}, []),
        ]
        for case, want in cases:
            request = pb.QueryMetricsRequest(job_uuid=self.JOB, node_id="n", **case)
            got = yield self.call(self.stub.QueryMetrics, request, timeout=30)
            self.assertEqual(got, want, case)
            batches = yield self.call(self.stub.QueryMetricsBatched, request, timeout=30)
            self.assertEqual([m for b in batches for m in b.metrics], want, case)
            self.assertTrue(all(0 < len(b.metrics) <= 7 for b in batches))

    @defer.inlineCallbacks
    def test_metrics_only_job(self):
        """A job that sent only metrics is found: its log queries are empty, not NOT_FOUND."""
        yield self.send(b"".join(metric_frame("metrics-only", T0 + i, i, i) for i in range(3)))
        info = yield self.wait_counts("metrics-only", 0, 3)
        self.assertGreater(info.size_bytes, 0)
        self.assertEqual((yield self.logs("metrics-only")), [])
        self.assertEqual((yield self.logs("metrics-only", batched=True, stream=2)), [])
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "logs", "metrics-only")))

    @defer.inlineCallbacks
    def test_command_line_client(self):
        """joblet-persist-ctl against the real service: logs are the raw bytes, byte-exact,
        in arrival order; stream and paging options apply; info, jobs, stats, ping, delete
        work and an unknown job exits 3."""
        yield self.fill()
        sock = self.config.server.grpc_socket

        def ctl(*argv):
            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="")
            err = io.StringIO()
            code = cli.main(["--socket", sock, *argv], stdout=out, stderr=err)
            out.flush()
            return code, out.buffer.getvalue(), err.getvalue()

        def run(*argv):
            return threads.deferToThread(ctl, *argv)

        code, out, _ = yield run("logs", self.JOB)
        self.assertEqual((code, out), (0, b"".join(x[3] for x in self.lines)))
        code, out, _ = yield run("logs", self.JOB, "--stream", "stderr", "--offset", "3",
                                 "--limit", "5")
        self.assertEqual(out, b"".join(x[3] for x in select(self.lines, 2, offset=3, limit=5)))
        code, out, _ = yield run("info", self.JOB, "--json")
        self.assertEqual(json.loads(out)["log_count"], len(self.lines))
        code, out, _ = yield run("jobs", "--json")
        self.assertEqual([json.loads(x)["job_uuid"] for x in out.splitlines()], [self.JOB])
        code, out, _ = yield run("metrics", self.JOB, "--json", "--limit", "2")
        self.assertEqual([json.loads(x)["sequence"] for x in out.splitlines()], [1000, 1001])
        code, out, _ = yield run("stats", "--json")
        self.assertEqual(json.loads(out)["total_metrics"], self.M)
        self.assertEqual((yield run("ping"))[0], 0)
        code, _, err = yield run("info", "no-such-job")
        self.assertEqual(code, 3, err)
        self.assertEqual((yield run("delete", self.JOB))[0], 0)
        self.assertIsNone((yield self.info(self.JOB)))

    @defer.inlineCallbacks
    def test_job_info_list_and_stats(self):
        """GetJobInfo counts what was stored; ListJobs lists it; GetStats adds up the job index
        and reports the live ingest counters (every frame received and written, no errors)."""
        before = int(time.time())
        yield self.fill()
        info = yield self.info(self.JOB)
        self.assertEqual(info.job_uuid, self.JOB)
        self.assertEqual((info.log_count, info.metric_count), (len(self.lines), self.M))
        self.assertGreaterEqual(info.created_at, before - 1)
        self.assertLessEqual(info.created_at, info.last_updated)
        self.assertLessEqual(info.last_updated, int(time.time()) + 1)
        on_disk = sum(
            os.path.getsize(os.path.join(d, f))
            for top in ("logs", "metrics")
            for d, _, files in os.walk(os.path.join(self.data_dir, top, self.JOB))
            for f in files
        )
        self.assertEqual(info.size_bytes, on_disk)
        listed = yield self.call(self.stub.ListJobs, pb.ListJobsRequest(), timeout=5)
        self.assertEqual(list(listed.jobs), [pb.JobInfo(**_fields(info))])
        self.assertEqual(listed.total_count, 1)
        stats = yield self.call(self.stub.GetStats, pb.GetStatsRequest(), timeout=5)
        frames = len(self.lines) + self.M
        self.assertEqual(
            (stats.total_jobs, stats.total_logs, stats.total_metrics, stats.total_size_bytes),
            (1, len(self.lines), self.M, on_disk),
        )
        self.assertEqual(
            (stats.messages_received, stats.messages_written, stats.write_errors),
            (frames, frames, 0),
        )
        self.assertEqual(
            self.sample("persist_ipc_messages_received_total", type="log"), len(self.lines)
        )

    @defer.inlineCallbacks
    def test_queryable_within_the_flush_interval(self):
        """A lone message (far below every batch threshold) becomes queryable about one flush
        interval after it arrives, without any further traffic: the timer flushes it."""
        flush = self.config.writer.flush_interval
        self.assertEqual(flush, 0.2)
        conn = self.connect()
        timings = []
        for i in range(3):
            job = f"fresh-{i}"
            started = time.monotonic()
            yield self.send(log_frame(job, 1, T0, 1, b"hello\n"), conn)
            yield wait_for(
                lambda job=job: self.logs(job).addErrback(lambda _: None),
                timeout=10,
                interval=0.01,
                what=f"{job} queryable",
            )
            timings.append(time.monotonic() - started)
            got = yield self.logs(job)
            self.assertEqual(got, [(1, T0, 1, b"hello\n")])
        # One flush interval plus an fsync'd append and polling; generous for a shared machine,
        # far below what a missing timer flush would take (never).
        self.assertLess(min(timings), flush + 0.5, timings)

    @defer.inlineCallbacks
    def test_delete_job(self):
        """DeleteJob answers success, the job is then NOT_FOUND and its files are gone; new
        data for the same id starts a clean job (no old lines, counts from zero)."""
        yield self.fill()
        other = "other-job"
        yield self.send(log_frame(other, 1, T0, 1, b"keep me\n"))
        yield self.wait_counts(other, 1, 0)
        response = yield self.call(
            self.stub.DeleteJob, pb.DeleteJobRequest(job_uuid=self.JOB, node_id="n"), timeout=10
        )
        self.assertTrue(response.success, response.message)
        for call, request in [
            (self.stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=self.JOB)),
            (self.stub.QueryLogs, pb.QueryLogsRequest(job_uuid=self.JOB)),
            (self.stub.QueryMetrics, pb.QueryMetricsRequest(job_uuid=self.JOB)),
        ]:
            code = yield self.code_of(call, request, timeout=5)
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, call)
        for top in ("logs", "metrics"):
            self.assertFalse(os.path.exists(os.path.join(self.data_dir, top, self.JOB)))
        listed = yield self.call(self.stub.ListJobs, pb.ListJobsRequest(), timeout=5)
        self.assertEqual([j.job_uuid for j in listed.jobs], [other])
        # Deleting again (or an unknown job) succeeds: the data is gone.
        again = yield self.call(
            self.stub.DeleteJob, pb.DeleteJobRequest(job_uuid=self.JOB), timeout=10
        )
        self.assertTrue(again.success)

        yield self.send(log_frame(self.JOB, 2, T0 + SEC, 7, b"after delete\n"))
        info = yield self.wait_counts(self.JOB, 1, 0)
        got = yield self.logs(self.JOB)
        self.assertEqual(got, [(2, T0 + SEC, 7, b"after delete\n")])
        self.assertLess(info.size_bytes, 200)
        kept = yield self.logs(other)
        self.assertEqual(kept, [(1, T0, 1, b"keep me\n")])
        stats = yield self.call(self.stub.GetStats, pb.GetStatsRequest(), timeout=5)
        self.assertEqual((stats.total_jobs, stats.total_logs, stats.total_metrics), (2, 2, 0))

    @defer.inlineCallbacks
    def test_error_codes(self):
        """Malformed ids and requests are INVALID_ARGUMENT (never a path, never INTERNAL);
        an unknown job is NOT_FOUND; nothing is created on disk by a bad id."""
        yield self.fill()
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        stub = self.stub
        for bad in BAD_IDS:
            for call, request in [
                (stub.QueryLogs, pb.QueryLogsRequest(job_uuid=bad)),
                (stub.QueryLogsBatched, pb.QueryLogsRequest(job_uuid=bad)),
                (stub.QueryMetrics, pb.QueryMetricsRequest(job_uuid=bad)),
                (stub.QueryMetricsBatched, pb.QueryMetricsRequest(job_uuid=bad)),
                (stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=bad)),
                (stub.DeleteJob, pb.DeleteJobRequest(job_uuid=bad)),
            ]:
                code = yield self.code_of(call, request, timeout=5)
                self.assertEqual(code, invalid, (call._method, bad))
        for request in [
            pb.QueryLogsRequest(job_uuid=self.JOB, stream=3),
            pb.QueryLogsRequest(job_uuid=self.JOB, stream=-1),
            pb.QueryLogsRequest(job_uuid=self.JOB, limit=-1),
            pb.QueryLogsRequest(job_uuid=self.JOB, offset=-5),
            pb.QueryLogsRequest(job_uuid=self.JOB, start_time=T0 + 2, end_time=T0 + 1),
        ]:
            for call in (stub.QueryLogs, stub.QueryLogsBatched):
                code = yield self.code_of(call, request, timeout=5)
                self.assertEqual(code, invalid, request)
        for request in [
            pb.QueryMetricsRequest(job_uuid=self.JOB, limit=-1),
            pb.QueryMetricsRequest(job_uuid=self.JOB, offset=-1),
            pb.QueryMetricsRequest(job_uuid=self.JOB, start_time=T0 + 2, end_time=T0 + 1),
        ]:
            for call in (stub.QueryMetrics, stub.QueryMetricsBatched):
                code = yield self.code_of(call, request, timeout=5)
                self.assertEqual(code, invalid, request)
        for request in [
            pb.ListJobsRequest(since=10, until=5),
            pb.ListJobsRequest(limit=-1),
            pb.ListJobsRequest(offset=-1),
        ]:
            code = yield self.code_of(stub.ListJobs, request, timeout=5)
            self.assertEqual(code, invalid, request)
        for call, request in [
            (stub.QueryLogs, pb.QueryLogsRequest(job_uuid="no-such-job")),
            (stub.QueryLogsBatched, pb.QueryLogsRequest(job_uuid="no-such-job")),
            (stub.QueryMetrics, pb.QueryMetricsRequest(job_uuid="no-such-job")),
            (stub.QueryMetricsBatched, pb.QueryMetricsRequest(job_uuid="no-such-job")),
            (stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid="no-such-job")),
        ]:
            code = yield self.code_of(call, request, timeout=5)
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, call._method)
        # The service still works and nothing outside the data layout appeared.
        self.assertEqual(sorted(os.listdir(os.path.join(self.data_dir, "logs"))), [self.JOB])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "x")))
        self.assertEqual(self.sample("persist_query_requests_total", rpc="GetJobInfo",
                                     code="INTERNAL"), 0)
        got = yield self.logs(self.JOB, limit=2)
        self.assertEqual(got, self.lines[:2])


def _fields(info) -> dict:
    return {
        name: getattr(info, name)
        for name in (
            "job_uuid", "created_at", "last_updated", "log_count", "metric_count", "size_bytes"
        )
    }


# -- cost and cancellation on a job of many members ---------------------------------------


class ManyMembersTests(ServiceTestBase):
    """A job of 20,000 lines written in batches of 100: at least 200 gzip members per job."""

    settings = {"writer": {"batchMaxMessages": 100}, "storage": {"fsync": "interval"}}
    JOB = "many-members"
    N = 20_000

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        # Every fourth message goes to stderr; 20 lines per millisecond of timestamp.
        self.lines = [
            (2 if i % 4 == 3 else 1, T0 + (i // 20) * MS, i, b"%08d %s\n" % (i, b"x" * 90))
            for i in range(self.N)
        ]
        frames = b"".join(log_frame(self.JOB, *line) for line in self.lines)
        yield self.send(frames)
        yield self.wait_counts(self.JOB, self.N, 0, timeout=40)
        snap = self.parts["storage"].snapshot(self.JOB)
        self.members = {
            "stdout": sum(len(v.members) for v in snap.stdout),
            "stderr": sum(len(v.members) for v in snap.stderr),
        }

    @defer.inlineCallbacks
    def assert_cost(self, bound: int, want: list, **request):
        before = self.inflated()
        got = yield self.logs(self.JOB, **request)
        self.assertEqual(got, want, request)
        used = self.inflated() - before
        self.assertLessEqual(used, bound, (request, used, self.members))
        return used

    @defer.inlineCallbacks
    def test_cost_is_proportional_to_what_is_returned(self):
        """A first page, a late offset and a narrow time range inflate a handful of members
        (counted by persist_query_members_total{result="inflated"}), not the job's hundreds;
        so do their batched twins.  Reading everything inflates every member once."""
        total_members = self.members["stdout"] + self.members["stderr"]
        self.assertGreaterEqual(self.members["stdout"], self.N * 3 // 4 // 100)
        self.assertGreaterEqual(self.members["stderr"], self.N // 4 // 100)
        lines = self.lines
        late = self.N - 150
        window = (T0 + 500 * MS, T0 + 500 * MS + MS - 1)  # 20 lines in the middle
        cases = [
            ({"limit": 100}, lines[:100]),
            ({"offset": late, "limit": 100}, lines[late : late + 100]),
            ({"stream": 1, "offset": late * 3 // 4, "limit": 100},
             select(lines, 1)[late * 3 // 4 : late * 3 // 4 + 100]),
            ({"stream": 2, "offset": 4_000, "limit": 50}, select(lines, 2)[4_000:4_050]),
            ({"start_time": window[0], "end_time": window[1]}, lines[10_000:10_020]),
            ({"start_time": window[0], "end_time": window[1], "offset": 5, "limit": 3},
             lines[10_005:10_008]),
        ]
        for request, want in cases:
            self.assertTrue(want)
            # Both streams are involved in a merged page: up to 2 members of each.
            yield self.assert_cost(4, want, **request)
            before = self.inflated()
            got = yield self.logs(self.JOB, batched=True, **request)
            self.assertEqual(got, want)
            self.assertLessEqual(self.inflated() - before, 4)
        skipped_before = self.sample("persist_query_members_total", result="skipped")
        yield self.assert_cost(4, lines[late : late + 100], offset=late, limit=100)
        skipped = self.sample("persist_query_members_total", result="skipped") - skipped_before
        self.assertGreater(skipped, total_members // 2)
        before = self.inflated()
        everything = yield self.logs(self.JOB, batched=True)
        self.assertEqual(len(everything), self.N)
        self.assertEqual(self.inflated() - before, total_members)

    def test_bulk_chunks_match_records(self):
        """The snapshot's bulk reader (behind both query RPCs) returns exactly iter_logs's
        messages: chunks of equally long, non-empty columns; a merged chunk spans both
        streams (one sort per window, not one step per message)."""
        snap = self.parts["storage"].snapshot(self.JOB)
        window = (T0 + 300 * MS, T0 + 420 * MS)
        for args in [
            (0, 0, 0, 0, 0),
            (0, 0, 0, 12_345, 3_000),
            (1, 0, 0, 7_000, 0),
            (2, window[0], window[1], 10, 500),
            (0, window[0], window[1], 0, 0),
        ]:
            chunks = list(snap.iter_log_chunks(*args))
            for chunk in chunks:
                self.assertTrue(len(chunk[0]) > 0)
                self.assertEqual({len(column) for column in chunk}, {len(chunk[0])})
            flat = [
                (st, ts, seq, content)
                for chunk in chunks
                for st, ts, seq, content in zip(*chunk, strict=True)
            ]
            self.assertEqual(flat, [astuple(r) for r in snap.iter_logs(*args)], args)
            self.assertEqual(flat, select(self.lines, *args[:3], args[3], args[4]), args)
        merged = list(snap.iter_log_chunks(0, limit=5_000))
        streams = [st for chunk in merged for st in chunk[0]]
        switches = sum(a != b for a, b in zip(streams[:-1], streams[1:], strict=True))
        # 5,000 messages in batches of 100 (two members each): at most one chunk per member,
        # although the stream changes about 2,500 times.
        self.assertGreater(switches, 2_000)
        self.assertLessEqual(len(merged), 100)
        self.assertGreater(sum(set(chunk[0]) == {1, 2} for chunk in merged), len(merged) // 2)

    @defer.inlineCallbacks
    def test_cancellation_mid_stream_stops_the_read(self):
        """A client that cancels a QueryLogs stream after a few lines ends the server's read:
        the handler finishes with CANCELLED, frees its slot, and most members are never
        inflated."""
        servicer = self.parts["servicer"]
        before = self.inflated()
        call = self.stub.QueryLogs(pb.QueryLogsRequest(job_uuid=self.JOB), timeout=30)
        first = yield threads.deferToThread(lambda: [next(call) for _ in range(10)])
        self.assertEqual(as_tuples(first), self.lines[:10])
        call.cancel()
        yield wait_for(
            lambda: servicer.active_rpcs == 0
            and self.sample("persist_query_requests_total", rpc="QueryLogs", code="CANCELLED"),
            timeout=10,
            what="the cancelled handler to finish",
        )
        total_members = self.members["stdout"] + self.members["stderr"]
        self.assertLess(self.inflated() - before, total_members // 2)
        # A deadline that expires mid-stream ends the read the same way.
        call = self.stub.QueryLogsBatched(pb.QueryLogsRequest(job_uuid=self.JOB), timeout=0.5)
        yield threads.deferToThread(next, call)
        # The client reads no further; code() returns once the deadline ends the call.
        code = yield threads.deferToThread(call.code)
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        yield wait_for(lambda: servicer.active_rpcs == 0, timeout=10, what="handler freed")
        got = yield self.logs(self.JOB, offset=self.N - 1)
        self.assertEqual(got, self.lines[-1:])


# -- ListJobs over several jobs, and files of the older Go service -------------------------

LEGACY = "legacy-go-job"
LEGACY_T = 1_600_000_000 * SEC  # 2020-09-13T12:26:40Z


def _member(lines: list) -> bytes:
    """A plain gzip member (no FEXTRA) of JSON lines, as the Go service wrote them."""
    return gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines), mtime=0)


def _legacy_log(job, stream, i, content: bytes, key="job_uuid") -> dict:
    record = {key: job, "timestamp": LEGACY_T + i * SEC, "sequence": i,
              "content": base64.b64encode(content).decode()}
    if stream is not None:
        record["stream"] = stream
    return record


def write_legacy_job(data_dir: str, job: str, t_seconds: int | None = None) -> list:
    """Write a job in the Go service's format; return its log records as query tuples.

    stdout.log.gz holds records of both streams (and an empty member); stderr.log.gz
    holds a record without a stream (it belongs to stderr) and uses the ``job_id`` key.
    """
    logs = os.path.join(data_dir, "logs", job)
    metrics = os.path.join(data_dir, "metrics", job)
    os.makedirs(logs)
    os.makedirs(metrics)
    out_records = [
        _legacy_log(job, 1, 0, b"go line 0\n"),
        _legacy_log(job, 2, 1, b"go err 1\n"),
        _legacy_log(job, 1, 3, b"\x00binary\xff"),
    ]
    with open(os.path.join(logs, "stdout.log.gz"), "wb") as f:
        f.write(_member(out_records[:2]) + gzip.compress(b"", mtime=0) + _member(out_records[2:]))
    err_records = [_legacy_log(job, None, 2, b"go err 2\n", key="job_id")]
    with open(os.path.join(logs, "stderr.log.gz"), "wb") as f:
        f.write(_member(err_records))
    samples = [
        {"jobUuid": job, "timestamp": LEGACY_T + i * SEC, "sequence": i,
         "data": {"cpuUsage": 1.5 * i, "memoryUsage": str(1000 + i),
                  "diskIO": {"readBytes": 7 * i}}}
        for i in range(3)
    ]
    with open(os.path.join(metrics, "metrics.jsonl.gz"), "wb") as f:
        f.write(_member(samples[:2]) + _member(samples[2:]))
    if t_seconds is not None:
        for d in (logs, metrics):
            for name in os.listdir(d):
                os.utime(os.path.join(d, name), (t_seconds, t_seconds))
    return [
        (1, LEGACY_T, 0, b"go line 0\n"),
        (2, LEGACY_T + SEC, 1, b"go err 1\n"),
        (2, LEGACY_T + 2 * SEC, 2, b"go err 2\n"),
        (1, LEGACY_T + 3 * SEC, 3, b"\x00binary\xff"),
    ]


class LegacyAndListTests(ServiceTestBase):
    """Jobs present in the data directory before start: Go-format files, several ages."""

    #: job id -> created_at (Unix seconds) of the pre-existing legacy jobs.
    OLD = {"old-a": 1_500_000_000, "old-b": 1_500_000_100, "old-c": 1_500_000_200}

    def prepare_data_dir(self, data_dir):
        self.legacy_lines = write_legacy_job(data_dir, LEGACY, 1_600_000_100)
        for job, t in self.OLD.items():
            write_legacy_job(data_dir, job, t)

    @defer.inlineCallbacks
    def test_legacy_job_listed_queried_counted(self):
        """A job written by the Go service is listed, queried (both streams merged by
        timestamp, byte-exact, offset and range applied), its metrics decoded, and counted in
        GetJobInfo and GetStats; new data appended to it comes after the legacy records."""
        info = yield self.info(LEGACY)
        self.assertEqual((info.log_count, info.metric_count), (4, 3))
        self.assertEqual(info.created_at, LEGACY_T // SEC)
        self.assertEqual(info.last_updated, 1_600_000_100)
        got = yield self.logs(LEGACY)
        self.assertEqual(got, self.legacy_lines)
        self.assertEqual((yield self.logs(LEGACY, stream=2)), select(self.legacy_lines, 2))
        self.assertEqual((yield self.logs(LEGACY, offset=1, limit=2)), self.legacy_lines[1:3])
        self.assertEqual(
            (yield self.logs(LEGACY, batched=True, start_time=LEGACY_T + SEC,
                             end_time=LEGACY_T + 2 * SEC)),
            self.legacy_lines[1:3],
        )
        metrics = yield self.call(
            self.stub.QueryMetrics, pb.QueryMetricsRequest(job_uuid=LEGACY), timeout=10
        )
        self.assertEqual([m.sequence for m in metrics], [0, 1, 2])
        self.assertEqual(metrics[2].data.cpu_usage, 3.0)
        self.assertEqual(metrics[2].data.memory_usage, 1002)
        self.assertEqual(metrics[2].data.disk_io.read_bytes, 14)
        self.assertEqual(metrics[1].timestamp, LEGACY_T + SEC)

        stats = yield self.call(self.stub.GetStats, pb.GetStatsRequest(), timeout=5)
        self.assertEqual((stats.total_jobs, stats.total_logs, stats.total_metrics), (4, 16, 12))

        yield self.send(log_frame(LEGACY, 1, T0, 99, b"new format line\n"))
        yield self.wait_counts(LEGACY, 5, 3)
        got = yield self.logs(LEGACY)
        self.assertEqual(got, self.legacy_lines + [(1, T0, 99, b"new format line\n")])
        self.assertEqual((yield self.logs(LEGACY, offset=4)), got[4:])
        with gzip.open(os.path.join(self.data_dir, "logs", LEGACY, "stdout.log.gz")) as f:
            text = f.read()
        self.assertTrue(text.endswith(b"}\nnew format line\n"), text[-40:])

    @defer.inlineCallbacks
    def test_list_jobs_filters_pages_and_orders(self):
        """ListJobs: newest created_at first (ties by job id), since/until inclusive on
        created_at, total_count counts matches before limit/offset."""
        yield self.send(log_frame("live-1", 1, T0, 1, b"x\n") + log_frame("live-2", 2, T0, 1, b"y\n"))
        yield self.wait_counts("live-1", 1, 0)
        yield self.wait_counts("live-2", 1, 0)

        def jobs(**kw):
            return self.call(self.stub.ListJobs, pb.ListJobsRequest(**kw), timeout=5)

        everything = yield jobs()
        ids = [j.job_uuid for j in everything.jobs]
        self.assertEqual(ids, ["live-1", "live-2", LEGACY, "old-c", "old-b", "old-a"])
        self.assertEqual(everything.total_count, 6)
        created = [j.created_at for j in everything.jobs]
        self.assertEqual(created, sorted(created, reverse=True))
        self.assertEqual(created[3:], [1_500_000_200, 1_500_000_100, 1_500_000_000])

        page = yield jobs(limit=2, offset=3)
        self.assertEqual(([j.job_uuid for j in page.jobs], page.total_count),
                         (["old-c", "old-b"], 6))
        window = yield jobs(since=1_500_000_100, until=1_500_000_200)
        self.assertEqual(([j.job_uuid for j in window.jobs], window.total_count),
                         (["old-c", "old-b"], 2))
        since = yield jobs(since=1_500_000_101, limit=1, offset=1)
        self.assertEqual(([j.job_uuid for j in since.jobs], since.total_count), (["live-2"], 4))
        until = yield jobs(until=1_500_000_000)
        self.assertEqual(([j.job_uuid for j in until.jobs], until.total_count), (["old-a"], 1))
        beyond = yield jobs(offset=10)
        self.assertEqual((list(beyond.jobs), beyond.total_count), ([], 6))
        old = [j for j in everything.jobs if j.job_uuid == "old-b"][0]
        self.assertEqual((old.log_count, old.metric_count, old.last_updated),
                         (4, 3, 1_500_000_100))


# -- CleanupOldData with a retention that makes jobs old within a second -----------------------


class CleanupTests(ServiceTestBase):
    settings = {
        "storage": {
            "retention": {"logMaxAge": "1s", "metricMaxAge": "1s", "activeWindow": "1s"}
        }
    }

    @defer.inlineCallbacks
    def test_cleanup_dry_run_then_real(self):
        """CleanupOldData(dry_run) names the job idle past logMaxAge and deletes nothing; the
        real run deletes it (files gone, NOT_FOUND, bytes freed reported) and keeps a job
        that is still receiving data."""
        yield self.send(log_frame("idle", 1, T0, 1, b"old news\n") + metric_frame("idle", T0, 2, 1))
        yield self.wait_counts("idle", 1, 1)
        size = (yield self.info("idle")).size_bytes

        def dry_run():
            return self.call(
                self.stub.CleanupOldData, pb.CleanupRequest(dry_run=True), timeout=10
            )

        conn = self.connect()
        sequence = [0]

        @defer.inlineCallbacks
        def idle_job_is_old():
            # Keep "busy" active meanwhile: it must survive the cleanup.
            sequence[0] += 1
            yield self.send(log_frame("busy", 1, T0, sequence[0], b"tick\n"), conn)
            response = yield dry_run()
            return "idle" in response.deleted_job_ids and response

        planned = yield wait_for(idle_job_is_old, timeout=15, interval=0.1,
                                 what="the idle job to age")
        self.assertEqual(list(planned.deleted_job_ids), ["idle"])
        self.assertEqual((planned.jobs_deleted, planned.bytes_freed), (1, size))
        self.assertIsNotNone((yield self.info("idle")))
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "logs", "idle")))

        sequence[0] += 1
        yield self.send(log_frame("busy", 1, T0, sequence[0], b"tick\n"), conn)
        yield self.wait_counts("busy", sequence[0], 0)
        done = yield self.call(self.stub.CleanupOldData, pb.CleanupRequest(), timeout=10)
        self.assertEqual(list(done.deleted_job_ids), ["idle"])
        self.assertEqual((done.jobs_deleted, done.bytes_freed), (1, size))
        self.assertIsNone((yield self.info("idle")))
        for top in ("logs", "metrics"):
            self.assertFalse(os.path.exists(os.path.join(self.data_dir, top, "idle")))
        self.assertIsNotNone((yield self.info("busy")))
        stats = yield self.call(self.stub.GetStats, pb.GetStatsRequest(), timeout=5)
        self.assertEqual(stats.total_jobs, 1)


# -- reads that lose their files to DeleteJob or retention -------------------------------------


class VanishingFilesTests(ServiceTestBase):
    """Every appended batch of 10 messages starts a new segment file (segmentMaxBytes 1).

    A read takes the snapshot of the files published when it starts and opens
    each segment when it gets there; these tests delete files in between.  The
    servicer is driven directly (as a gRPC thread would, from a thread) so that
    the point where the files go is exact, independent of gRPC flow control.
    """

    settings = {"writer": {"batchMaxMessages": 10}, "storage": {"segmentMaxBytes": 1}}
    JOB = "vanishing"

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.lines = [(1, T0 + i * MS, i, b"line %d\n" % i) for i in range(100)]
        frames = [log_frame(self.JOB, *line) for line in self.lines]
        frames += [metric_frame(self.JOB, T0 + i * SEC, i, i) for i in range(30)]
        yield self.send(b"".join(frames))
        yield self.wait_counts(self.JOB, 100, 30)
        self.assertEqual(len(os.listdir(os.path.join(self.data_dir, "logs", self.JOB))), 10)

    def drain(self, stream):
        """Read the rest of a servicer stream in a thread: (items, status code or None)."""

        def run():
            items = []
            try:
                for item in stream:
                    items.append(item)
            except Aborted as e:
                return items, e.code
            return items, None

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_delete_during_a_read_is_not_found(self):
        """A read whose job is deleted before it reaches the next segment ends with NOT_FOUND
        (not INTERNAL) after the lines it had; logs and metrics alike."""
        servicer = self.parts["servicer"]
        logs = servicer.QueryLogs(pb.QueryLogsRequest(job_uuid=self.JOB), FakeContext())
        metrics = servicer.QueryMetrics(pb.QueryMetricsRequest(job_uuid=self.JOB), FakeContext())
        first = yield threads.deferToThread(next, logs)
        self.assertEqual(first.content, b"line 0\n")
        sample = yield threads.deferToThread(next, metrics)
        self.assertEqual(sample.sequence, 0)
        response = yield self.call(
            self.stub.DeleteJob, pb.DeleteJobRequest(job_uuid=self.JOB), timeout=10
        )
        self.assertTrue(response.success)
        rest, code = yield self.drain(logs)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual([x.sequence for x in rest], list(range(1, 10)))
        rest, code = yield self.drain(metrics)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual([x.sequence for x in rest], list(range(1, 10)))
        self.assertEqual(
            self.sample("persist_query_requests_total", rpc="QueryLogs", code="NOT_FOUND"), 1
        )
        self.assertEqual(servicer.active_rpcs, 0)

    @defer.inlineCallbacks
    def test_segment_dropped_during_a_read_is_aborted(self):
        """When retention drops a segment a read has not reached yet, the read ends with
        ABORTED; a retry reads what is left."""
        servicer = self.parts["servicer"]
        logs = servicer.QueryLogs(pb.QueryLogsRequest(job_uuid=self.JOB), FakeContext())
        yield threads.deferToThread(next, logs)
        freed = yield self.parts["storage"].drop_segment(self.JOB, "stdout", 5)
        self.assertGreater(freed, 0)
        rest, code = yield self.drain(logs)
        self.assertEqual(code, grpc.StatusCode.ABORTED)
        self.assertEqual([x.sequence for x in rest], list(range(1, 50)))
        again = yield self.logs(self.JOB)
        self.assertEqual(again, self.lines[:50] + self.lines[60:])
