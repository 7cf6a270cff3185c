"""Observability end to end: a real in-process service, its /metrics and /health.

A service built by ``tap.build_service`` runs on the test's reactor with real sockets and
threads: frames arrive over the IPC Unix socket, queries and CleanupOldData over gRPC (blocking
client calls run in threads so the reactor stays free), and /metrics and /health are scraped
over HTTP with treq.  The helpers at the top are shared with test_lifecycle.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import textwrap
import threading
import time

import grpc
import treq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.trial import unittest

from joblet_persist._proto import ipc_pb2, persist_pb2_grpc
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.config import config_from_string
from joblet_persist.tap import build_service
from tests.integration.support import short_tempdir, wait_for

JOB = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
OLD = "0d0d0d0d-1111-4222-8333-444455556666"

# -- frames -----------------------------------------------------------------------------


def framed(body: bytes) -> bytes:
    """A frame as joblet-core sends it: 4-byte big-endian length, then the body."""
    return len(body).to_bytes(4, "big") + body


def log_body(job_id: str, seq: int, content: bytes, stream: int = 1) -> bytes:
    """A serialized IPCMessage carrying one LogLine."""
    ts = 1_700_000_000_000_000_000 + seq * 1_000_000
    line = ipc_pb2.LogLine(
        job_uuid=job_id, stream=stream, timestamp=ts, sequence=seq, content=content
    )
    return ipc_pb2.IPCMessage(
        version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job_id, timestamp=ts, sequence=seq,
        data=line.SerializeToString(),
    ).SerializeToString()


def metric_body(job_id: str, seq: int, cpu: float) -> bytes:
    """A serialized IPCMessage carrying one Metric sample."""
    ts = 1_700_000_000_000_000_000 + seq * 1_000_000
    metric = ipc_pb2.Metric(
        job_uuid=job_id, timestamp=ts, sequence=seq,
        data=ipc_pb2.MetricData(cpu_usage=cpu, memory_usage=1024 * seq),
    )
    return ipc_pb2.IPCMessage(
        version=1, type=ipc_pb2.MESSAGE_TYPE_METRIC, job_uuid=job_id, timestamp=ts,
        sequence=seq, data=metric.SerializeToString(),
    ).SerializeToString()


class _ClientProtocol(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost.callback(None)


class IPCClient:
    """A joblet-core stand-in: writes frames to the IPC socket.  Reactor thread."""

    def __init__(self, proto: _ClientProtocol):
        self._proto = proto

    @classmethod
    async def connect(cls, testcase, path: str) -> IPCClient:
        proto = await connectProtocol(UNIXClientEndpoint(reactor, path), _ClientProtocol())
        client = cls(proto)
        testcase.addCleanup(client.close)
        return client

    def send(self, *bodies: bytes) -> int:
        """Write the framed bodies; returns the body bytes sent."""
        self._proto.transport.write(b"".join(framed(b) for b in bodies))
        return sum(len(b) for b in bodies)

    def send_raw(self, data: bytes) -> None:
        self._proto.transport.write(data)

    def close(self) -> defer.Deferred:
        """Close the connection; fires once it is closed."""
        if not self._proto.lost.called:
            self._proto.transport.loseConnection()
        d = defer.Deferred()
        self._proto.lost.addBoth(lambda r: (d.callback(None), r)[1])
        return d


# -- data on disk -------------------------------------------------------------------------


def seed_legacy_job(data_dir: str, job_id: str, lines: list[bytes], age: float) -> int:
    """Write a job as the older Go service did, its files last modified ``age`` seconds ago.

    Returns the bytes on disk.  Call before the service starts: the job index, rebuilt from
    the files, then says the job was last updated ``age`` seconds ago.
    """
    directory = os.path.join(data_dir, "logs", job_id)
    os.makedirs(directory, exist_ok=True)
    text = "".join(
        json.dumps(
            {
                "job_uuid": job_id,
                "stream": 1,
                "timestamp": 1_600_000_000_000_000_000 + i,
                "sequence": i + 1,
                "content": base64.b64encode(line).decode(),
            }
        )
        + "\n"
        for i, line in enumerate(lines)
    )
    path = os.path.join(directory, "stdout.log.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(text.encode()))
    then = time.time() - age
    os.utime(path, (then, then))
    os.utime(directory, (then, then))
    return os.path.getsize(path)


# -- the service ------------------------------------------------------------------------------


def service_config(directory: str, extra: str = "", *, source: str | None = None):
    """Config text for an in-process service whose data and sockets live in ``directory``.

    ``extra`` is YAML merged section by section (a section given in ``extra`` replaces the
    matching defaults below entirely).
    """
    sections = {
        "server": f'  grpcSocket: {directory}/g.sock\n  grpcAddress: ""\n',
        "ipc": f"  socket: {directory}/i.sock\n",
        "storage": (
            f"  dataDir: {directory}/data\n  retention:\n    minFreeBytes: 0\n"
            "    interval: 1h\n"
        ),
        "writer": "  flushInterval: 50ms\n",
        "monitoring": "  metricsPort: 0\n  healthPort: 0\n",
    }
    extra = textwrap.dedent(extra)
    text = "".join(f"{name}:\n{body}" for name, body in sections.items() if f"{name}:" not in extra)
    return text + extra


async def start_service(testcase, config_text: str):
    """Build and start the service on the test's reactor; stopped at cleanup."""
    config = config_from_string(config_text, source="<test>")
    root = build_service(config, reactor, registry=CollectorRegistry())
    root.startService()
    testcase.addCleanup(root.stopService)
    await root.started
    return root


def ports(root) -> tuple[int, int]:
    """(metrics port, health port) the monitoring listeners bound."""
    web = {w.name: w.port_number for w in root.components["web"]}
    return web["metrics-http"], web["health-http"]


async def scrape(port: int) -> dict:
    """GET /metrics; returns {(sample name, frozenset(labels)): value}."""
    response = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
    text = (await response.content()).decode()
    if response.code != 200:
        raise AssertionError(f"/metrics answered {response.code}: {text}")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def get_health(port: int) -> tuple[int, dict]:
    response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
    return response.code, json.loads(await response.content())


def in_thread(sock_path: str, fn):
    """Run ``fn(stub)`` with a PersistService stub on a worker thread; Deferred of its result."""

    def run():
        with grpc.insecure_channel(f"unix:{sock_path}") as channel:
            return fn(persist_pb2_grpc.PersistServiceStub(channel))

    return threads.deferToThread(run)


def rpc_code(call, request):
    """Call a unary or server-streaming RPC; its status code (OK on success)."""
    try:
        result = call(request, timeout=10)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- the tests ------------------------------------------------------------------------------------


class MetricsEndToEndTests(unittest.TestCase):
    timeout = 60

    async def test_every_metric_present_and_moving(self):
        """Ingest (LOG, METRIC, rejected frames) under forced backpressure and a failing
        append, query over gRPC and clean up: every metric the lifecycle issue names is on
        /metrics and has moved, and the storage gauges agree with GetStats."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        old_size = seed_legacy_job(data_dir, OLD, [b"old line\n"] * 3, age=7200)
        root = await start_service(
            self,
            service_config(
                directory,
                f"""\
                storage:
                  dataDir: {data_dir}
                  retention:
                    logMaxAge: 1h
                    metricMaxAge: 1h
                    minFreeBytes: 0
                    interval: 1h
                writer:
                  flushInterval: 50ms
                  highWaterBytes: 600
                  lowWaterBytes: 300
                  threads: 1
                  retryInitial: 50ms
                  retryMax: 100ms
                """,
            ),
        )
        parts = root.components
        writer, pool = parts["writer"], parts["pool"]
        metrics_port, health_port = ports(root)
        grpc_sock = os.path.join(directory, "g.sock")

        before = await scrape(metrics_port)
        for name in ("persist_ipc_bytes_received_total", "persist_write_errors_total",
                     "persist_retention_deleted_jobs_total",
                     "persist_retention_bytes_freed_total", "persist_backpressure_seconds_total",
                     "persist_write_latency_seconds_count", "persist_ipc_connections",
                     "persist_durability_lag_seconds_count", "persist_query_open_files",
                     "persist_query_open_file_waits_total",
                     "persist_backpressure_active", "persist_writer_buffered_bytes"):
            self.assertEqual(value(before, name), 0, name)
        self.assertEqual(value(before, "persist_jobs"), 1)  # the seeded OLD job
        self.assertEqual(value(before, "persist_storage_bytes"), old_size)

        client = await IPCClient.connect(self, parts["ingest"].path)
        await wait_for(lambda: parts["factory"].connection_count() == 1, what="connection")
        during = await scrape(metrics_port)
        self.assertEqual(value(during, "persist_ipc_connections"), 1)

        # Backpressure: hold the single pool thread so nothing is appended, and send more
        # than highWaterBytes.
        gate = threading.Event()
        self.addCleanup(gate.set)
        blocker = pool.run(gate.wait, 30)
        logs = [log_body(JOB, i, b"line %03d of the job\n" % i) for i in range(20)]
        metrics = [metric_body(JOB, i, 12.5 + i) for i in range(3)]
        sent = client.send(*logs, *metrics)
        rejected = [
            log_body("../escape", 1, b"x"),  # invalid_job_id (counted as a received LOG)
            # bad_payload: an exec event whose payload does not decode
            ipc_pb2.IPCMessage(version=1, type=3, job_uuid=JOB, data=b"\xff\xff\xff")
            .SerializeToString(),
        ]
        sent += client.send(*rejected)
        client.send_raw(framed(b"\xff\xff\xff"))  # bad_envelope: not counted as received
        await wait_for(lambda: writer.paused, what="backpressure")
        paused = await scrape(metrics_port)
        self.assertEqual(value(paused, "persist_backpressure_active"), 1)
        self.assertGreater(value(paused, "persist_writer_buffered_bytes"), 600)
        gate.set()
        await blocker
        await wait_for(lambda: writer.messages_written == 23 and not writer.paused,
                       what="all frames appended")

        # A failing append: a file where the job's log directory must go.
        failing = "5e5e5e5e-aaaa-4bbb-8ccc-dddddddddddd"
        blocker_path = os.path.join(data_dir, "logs", failing)
        with open(blocker_path, "w") as f:
            f.write("in the way\n")
        sent += client.send(log_body(failing, 1, b"late\n"))
        await wait_for(lambda: writer.write_errors >= 1, what="a write error")

        def pinged(expected):
            d = in_thread(grpc_sock, lambda stub: stub.Ping(pb.PingRequest(), timeout=2))
            return d.addCallback(lambda response: response.healthy == expected)

        # Ping follows the writer's state without a /health request, well within the 5 s
        # between disk probes.
        await wait_for(lambda: pinged(False), timeout=3, what="Ping reporting unhealthy")
        code, body = await get_health(health_port)
        self.assertEqual(code, 503)
        self.assertFalse(body["checks"]["writer"]["ok"])
        os.unlink(blocker_path)
        await wait_for(lambda: writer.messages_written == 24 and writer.failed_pending == 0,
                       what="the failed append retried")
        await wait_for(lambda: pinged(True), timeout=3, what="Ping reporting healthy")
        code, body = await get_health(health_port)
        self.assertEqual((code, body["status"]), (200, "healthy"))
        self.flushLoggedErrors(OSError)

        def queries(stub):
            out = {"logs": list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), timeout=10))}
            out["metrics"] = list(
                stub.QueryMetrics(pb.QueryMetricsRequest(job_uuid=JOB), timeout=10)
            )
            out["missing"] = rpc_code(stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid="nosuch"))
            out["invalid"] = rpc_code(stub.QueryLogs, pb.QueryLogsRequest(job_uuid="../x"))
            out["before"] = stub.GetStats(pb.GetStatsRequest(), timeout=10)
            out["dry"] = stub.CleanupOldData(pb.CleanupRequest(dry_run=True), timeout=10)
            out["listed"] = stub.ListJobs(pb.ListJobsRequest(), timeout=10)
            out["clean"] = stub.CleanupOldData(pb.CleanupRequest(), timeout=10)
            out["after"] = stub.GetStats(pb.GetStatsRequest(), timeout=10)
            out["ping"] = stub.Ping(pb.PingRequest(), timeout=2)
            return out

        out = await in_thread(grpc_sock, queries)
        self.assertEqual([line.content for line in out["logs"]],
                         [b"line %03d of the job\n" % i for i in range(20)])
        self.assertEqual([round(m.data.cpu_usage, 1) for m in out["metrics"]],
                         [12.5, 13.5, 14.5])
        self.assertEqual(out["missing"], grpc.StatusCode.NOT_FOUND)
        self.assertEqual(out["invalid"], grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(list(out["dry"].deleted_job_ids), [OLD])
        self.assertEqual(out["dry"].bytes_freed, old_size)
        self.assertIn(OLD, [j.job_uuid for j in out["listed"].jobs])  # dry run kept it
        self.assertEqual(list(out["clean"].deleted_job_ids), [OLD])
        self.assertEqual(out["clean"].bytes_freed, old_size)
        self.assertEqual(out["before"].total_jobs, 3)
        self.assertEqual(out["after"].total_jobs, 2)
        self.assertTrue(out["ping"].healthy)
        self.assertFalse(os.path.exists(os.path.join(data_dir, "logs", OLD)))

        await client.close()
        await wait_for(lambda: parts["factory"].connection_count() == 0, what="disconnect")

        async def settled():
            # Streaming RPCs record their metrics when the server side of the stream ends,
            # which may be just after the client has read the last message.
            s = await scrape(metrics_port)
            done = [value(s, "persist_query_requests_total", rpc=rpc, code="OK")
                    for rpc in ("QueryLogs", "QueryMetrics")]
            return s if done == [1, 1] else None

        m = await wait_for(settled, what="query metrics")
        after = out["after"]

        def check(name, expected, **labels):
            self.assertEqual(value(m, name, **labels), expected, (name, labels))

        check("persist_ipc_messages_received_total", 22, type="log")
        check("persist_ipc_messages_received_total", 3, type="metric")
        check("persist_ipc_messages_received_total", 1, type="exec_event")
        check("persist_ipc_bytes_received_total", sent)
        check("persist_ipc_frames_rejected_total", 1, reason="invalid_job_id")
        check("persist_ipc_frames_rejected_total", 1, reason="bad_payload")
        check("persist_ipc_events_rejected_total", 1, kind="exec", reason="bad_payload")
        check("persist_ipc_frames_rejected_total", 1, reason="bad_envelope")
        check("persist_ipc_connections", 0)
        self.assertGreaterEqual(value(m, "persist_write_latency_seconds_count"), 3)
        self.assertGreater(value(m, "persist_write_latency_seconds_sum"), 0)
        # Every appended batch reports its lag, which includes the latency of its append.
        self.assertEqual(value(m, "persist_durability_lag_seconds_count"),
                         value(m, "persist_write_latency_seconds_count"))
        self.assertGreaterEqual(value(m, "persist_durability_lag_seconds_sum"),
                                value(m, "persist_write_latency_seconds_sum"))
        check("persist_query_open_files", 0)  # the query that ran closed its files
        check("persist_query_open_files_limit",
              root.components["config"].storage.max_open_files
              - 2 * root.components["config"].writer.thread_count)
        check("persist_writer_buffered_bytes", 0)
        check("persist_backpressure_active", 0)
        self.assertGreater(value(m, "persist_backpressure_seconds_total"), 0)
        self.assertGreaterEqual(value(m, "persist_write_errors_total"), 1)
        check("persist_jobs", after.total_jobs)
        check("persist_storage_bytes", after.total_size_bytes)
        self.assertGreater(after.total_size_bytes, 0)
        self.assertEqual(after.total_logs, 21)
        self.assertEqual(after.total_metrics, 3)
        check("persist_query_requests_total", 1, rpc="QueryLogs", code="OK")
        check("persist_query_requests_total", 1, rpc="QueryLogs", code="INVALID_ARGUMENT")
        check("persist_query_requests_total", 1, rpc="GetJobInfo", code="NOT_FOUND")
        check("persist_query_requests_total", 2, rpc="CleanupOldData", code="OK")
        check("persist_query_requests_total", 2, rpc="GetStats", code="OK")
        self.assertGreaterEqual(value(m, "persist_query_requests_total", rpc="Ping", code="OK"),
                                3)
        check("persist_query_duration_seconds_count", 2, rpc="QueryLogs")
        check("persist_query_duration_seconds_count", 2, rpc="CleanupOldData")
        check("persist_retention_deleted_jobs_total", 1)
        check("persist_retention_bytes_freed_total", old_size)
        self.assertGreater(value(m, "process_resident_memory_bytes"), 0)
        check("persist_healthy", 1)


def _can_bind_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class ReadOnlyDataDir:
    """Makes a directory read-only and writable again, also for root.

    As root, permissions do not stop writes, so a read-only bind mount of the directory
    onto itself is used; otherwise the directory's mode is set to 0555.
    """

    def __init__(self, testcase, path: str):
        self.path = path
        self.mounted = False
        self.mode = None
        if os.geteuid() == 0 and not _can_bind_mount():
            raise unittest.SkipTest("running as root without mount(8): cannot make a "
                                    "directory read-only")
        testcase.addCleanup(self.make_writable)

    def make_read_only(self) -> None:
        if os.geteuid() == 0:
            try:
                subprocess.run(["mount", "--bind", self.path, self.path], check=True,
                               capture_output=True)
                self.mounted = True
                subprocess.run(["mount", "-o", "remount,ro,bind", self.path, self.path],
                               check=True, capture_output=True)
            except subprocess.CalledProcessError as e:
                self.make_writable()
                raise unittest.SkipTest(
                    f"root cannot bind-mount here ({e.stderr.decode().strip()}); a read-only "
                    "data directory cannot be simulated"
                ) from None
        else:
            self.mode = os.stat(self.path).st_mode & 0o7777
            os.chmod(self.path, 0o555)

    def make_writable(self) -> None:
        if self.mounted:
            result = subprocess.run(["umount", self.path], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", self.path], capture_output=True)
            self.mounted = False
        if self.mode is not None:
            os.chmod(self.path, self.mode)
            self.mode = None


class HealthTests(unittest.TestCase):
    timeout = 60

    async def test_read_only_data_dir_turns_health_503_and_back(self):
        """When the data directory becomes read-only, the next disk probe turns /health to
        503 naming the storage check, Ping reports unhealthy, and the persist_healthy gauge
        drops; once it is writable again all three return to healthy."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        os.makedirs(data_dir)
        read_only = ReadOnlyDataDir(self, data_dir)
        root = await start_service(self, service_config(directory))
        health = root.components["health"]
        metrics_port, health_port = ports(root)
        grpc_sock = os.path.join(directory, "g.sock")

        def ping(stub):
            return stub.Ping(pb.PingRequest(), timeout=2).healthy

        # Ping first: its verdict must not depend on a /health request having refreshed it.
        self.assertTrue(await in_thread(grpc_sock, ping))
        code, body = await get_health(health_port)
        self.assertEqual((code, body["status"]), (200, "healthy"))

        read_only.make_read_only()
        await health.probe_now()
        code, body = await get_health(health_port)
        self.assertEqual((code, body["status"]), (503, "unhealthy"))
        self.assertFalse(body["checks"]["storage"]["ok"])
        self.assertIn(data_dir, body["checks"]["storage"]["detail"])
        self.assertTrue(body["checks"]["ingest"]["ok"])
        self.assertFalse(await in_thread(grpc_sock, ping))
        self.assertEqual(value(await scrape(metrics_port), "persist_healthy"), 0)

        read_only.make_writable()
        await health.probe_now()
        code, body = await get_health(health_port)
        self.assertEqual((code, body["status"]), (200, "healthy"))
        self.assertTrue(body["checks"]["storage"]["ok"])
        self.assertTrue(await in_thread(grpc_sock, ping))
        self.assertEqual(value(await scrape(metrics_port), "persist_healthy"), 1)

    async def test_health_loop_notices_without_a_request(self):
        """The service is healthy as soon as it has started (the verdict is recomputed once
        the listeners run), and the periodic probe alone (no /health request, no probe_now)
        marks it unhealthy when the data directory turns read-only, and healthy again."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        os.makedirs(data_dir)
        read_only = ReadOnlyDataDir(self, data_dir)
        root = await start_service(self, service_config(directory))
        health = root.components["health"]
        self.assertTrue(health.healthy)
        # The service probes every 5 s; restart the loop with a shorter interval so that the
        # test waits less (the loop, the probe and the verdict are the service's own).
        health.stop()
        health._interval = 0.1
        await health.start()
        self.assertTrue(health.healthy)
        read_only.make_read_only()
        await wait_for(lambda: not health.healthy, timeout=15, what="the probe loop")
        read_only.make_writable()
        await wait_for(lambda: health.healthy, timeout=15, what="the probe loop")
