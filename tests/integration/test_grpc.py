"""End-to-end tests of the query API over real gRPC (Unix socket, loopback TCP, TLS).

Real reactor: GrpcServerService runs the server; blocking client calls run in
threads (deferToThread) so that the reactor stays free to serve the
servicer's ``blockingCallFromThread`` (open_job, DeleteJob, CleanupOldData).

Storage comes from ``make_storage()`` and is filled only through the
IStorageBackend API (start, append_logs, append_metrics), so the same tests
run against another backend by overriding ``make_storage``, e.g.::

    class LocalStorageServeTests(ServeTests):
        def make_storage(self):
            return LocalStorage(self.dir + "/data", run_in_thread, ...)
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist._proto import persist_pb2_grpc
from joblet_persist.grpc_server import PERSIST_SERVICE_NAME, GrpcServerService
from joblet_persist.logs import Logger
from joblet_persist.query import PersistServicer
from joblet_persist.storage.api import IJobSnapshot, IStorageBackend
from tests.fakes import FakeStorage, log_batch, make_pki, metric_batch

JOB = "0b4c1f52-95a7-4bd3-8c5e-5d1e7f0a9c11"
BAD_IDS = ["../x", "a/b", "", "x" * 200]


def short_dir(testcase) -> str:
    """A directory under /tmp whose socket paths stay below AF_UNIX's ~104 bytes."""
    path = tempfile.mkdtemp(prefix="jp", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Fire once ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s: {predicate}")
        yield task.deferLater(reactor, interval, lambda: None)


@implementer(IJobSnapshot)
class _Snapshot:
    """Wraps a snapshot to observe reads: counts records, can hold a read open."""

    def __init__(self, inner, probe):
        self._inner = inner
        self._probe = probe
        self.job_id = inner.job_id
        self.info = inner.info

    def _watch(self, records, cancelled):
        probe = self._probe
        try:
            for n, record in enumerate(records):
                if probe.pause_after is not None and n == probe.pause_after:
                    probe.paused.release()
                    # Hold the read like a slow disk would, checking for the
                    # client's cancellation as a real read loop does.
                    while not probe.gate.wait(0.01):
                        if cancelled():
                            probe.saw_cancel = True
                            return
                probe.yielded += 1
                yield record
        finally:
            probe.finished += 1

    def iter_logs(
        self,
        stream,
        start_time=0,
        end_time=0,
        offset=0,
        limit=0,
        stats=None,
        cancelled=lambda: False,
    ):
        records = self._inner.iter_logs(
            stream, start_time, end_time, offset, limit, stats=stats, cancelled=cancelled
        )
        return self._watch(records, cancelled)

    def iter_metrics(
        self, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=lambda: False
    ):
        records = self._inner.iter_metrics(
            start_time, end_time, offset, limit, stats=stats, cancelled=cancelled
        )
        return self._watch(records, cancelled)


@implementer(IStorageBackend)
class ProbedStorage:
    """Delegates to any IStorageBackend (not a stand-in: a probe around the real thing);
    its snapshots report what reads do."""

    def __init__(self, inner):
        self.inner = inner
        self.pause_after = None
        self.gate = threading.Event()
        self.paused = threading.Semaphore(0)
        self.saw_cancel = False
        self.yielded = 0
        self.finished = 0

    def start(self):
        return self.inner.start()

    def stop(self):
        return self.inner.stop()

    def append_logs(self, batch):
        return self.inner.append_logs(batch)

    def append_metrics(self, batch):
        return self.inner.append_metrics(batch)

    def append_events(self, batch):
        return self.inner.append_events(batch)

    def open_job(self, job_id):
        d = self.inner.open_job(job_id)
        return d.addCallback(lambda snap: None if snap is None else _Snapshot(snap, self))

    def delete_job(self, job_id):
        return self.inner.delete_job(job_id)

    def snapshot(self, job_id):
        snap = self.inner.snapshot(job_id)
        return None if snap is None else _Snapshot(snap, self)

    def job_info(self, job_id):
        return self.inner.job_info(job_id)

    def list_jobs(self):
        return self.inner.list_jobs()

    def list_jobs_page(self, since, until, offset, limit):
        return self.inner.list_jobs_page(since, until, offset, limit)

    def totals(self):
        return self.inner.totals()

    def event_totals(self):
        return self.inner.event_totals()

    def part_sizes(self, job_id):
        return self.inner.part_sizes(job_id)

    def delete_part(self, job_id, part):
        return self.inner.delete_part(job_id, part)


class _CleanupResult:
    def __init__(self, ids):
        self.jobs_deleted = len(ids)
        self.bytes_freed = 1000 * len(ids)
        self.deleted_job_ids = ids


class GrpcTestBase(TestCase):
    timeout = 30

    def make_storage(self):
        return FakeStorage()

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = short_dir(self)
        self.socket_path = os.path.join(self.dir, "grpc.sock")
        self.storage = ProbedStorage(self.make_storage())
        verifyObject(IStorageBackend, self.storage)
        yield self.storage.start()
        self.addCleanup(self.storage.stop)
        self.healthy = True
        self.cleanups = []

    def make_servicer(self, **kw):
        def cleanup(dry_run):
            self.cleanups.append(dry_run)
            return defer.succeed(_CleanupResult(["old-1"]))

        args = dict(
            is_healthy=lambda: self.healthy,
            ingest_stats=lambda: {"messages_received": 3, "messages_written": 2, "write_errors": 0},
            delete_job=self.storage.delete_job,
            cleanup=cleanup,
            reactor_call_timeout=10.0,
        )
        args.update(kw)
        return PersistServicer(self.storage, reactor, **args)

    def serve(self, servicer=None, **kw):
        """Start a GrpcServerService (stopped at cleanup); returns it."""
        servicer = servicer or self.make_servicer()
        kw.setdefault("unix_socket", self.socket_path)
        kw.setdefault("shutdown_grace", 0.5)
        service = GrpcServerService(servicer, reactor=reactor, **kw)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def channel(self, target=None, credentials=None):
        target = target or f"unix:{self.socket_path}"
        if credentials is None:
            ch = grpc.insecure_channel(target)
        else:
            ch = grpc.secure_channel(target, credentials)
        self.addCleanup(ch.close)
        return ch

    def stub(self, **kw):
        return persist_pb2_grpc.PersistServiceStub(self.channel(**kw))

    @defer.inlineCallbacks
    def fill(self):
        yield self.storage.append_logs(
            log_batch(JOB, 1, [(100, 1, b"out1\n"), (200, 2, b"out2\n")])
        )
        yield self.storage.append_logs(log_batch(JOB, 2, [(150, 3, b"err\xff\n")]))
        yield self.storage.append_logs(log_batch(JOB, 1, [(300, 4, b"out3")]))
        yield self.storage.append_metrics(
            metric_batch(JOB, [(100, 1, dict(cpu_usage=1.5, disk_io=dict(read_bytes=7)))])
        )
        yield self.storage.append_metrics(metric_batch(JOB, [(200, 2, dict(memory_usage=5))]))

    def code_of(self, fn, *args, **kw):
        """Run a blocking call in a thread; fires with its status code (OK when it succeeds)."""

        def run():
            try:
                result = fn(*args, **kw)
                if hasattr(result, "__next__"):  # a server stream: read it to the end
                    list(result)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        return threads.deferToThread(run)


class ServeTests(GrpcTestBase):
    @defer.inlineCallbacks
    def test_every_rpc_over_the_unix_socket(self):
        """Each RPC answers over the Unix socket with the stored data."""
        yield self.fill()
        self.serve()
        stub = self.stub()

        def client():
            out = {}
            out["ping"] = stub.Ping(pb.PingRequest(), timeout=2)
            out["logs"] = list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB, node_id="n")))
            out["batched"] = list(stub.QueryLogsBatched(pb.QueryLogsRequest(job_uuid=JOB)))
            out["metrics"] = list(stub.QueryMetrics(pb.QueryMetricsRequest(job_uuid=JOB)))
            out["mbatched"] = list(stub.QueryMetricsBatched(pb.QueryMetricsRequest(job_uuid=JOB)))
            out["info"] = stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB))
            out["list"] = stub.ListJobs(pb.ListJobsRequest())
            out["stats"] = stub.GetStats(pb.GetStatsRequest())
            out["cleanup"] = stub.CleanupOldData(pb.CleanupRequest(dry_run=True))
            out["delete"] = stub.DeleteJob(pb.DeleteJobRequest(job_uuid=JOB))
            try:
                stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB))
            except grpc.RpcError as e:
                out["after"] = e.code()
            return out

        out = yield threads.deferToThread(client)
        self.assertTrue(out["ping"].healthy)
        self.assertEqual(
            [(x.stream, x.timestamp, x.sequence, x.content) for x in out["logs"]],
            [
                (1, 100, 1, b"out1\n"),
                (1, 200, 2, b"out2\n"),
                (2, 150, 3, b"err\xff\n"),
                (1, 300, 4, b"out3"),
            ],
        )
        self.assertEqual([x for b in out["batched"] for x in b.lines], out["logs"])
        self.assertEqual([m.sequence for m in out["metrics"]], [1, 2])
        self.assertEqual(out["metrics"][0].data.disk_io.read_bytes, 7)
        self.assertEqual([m for b in out["mbatched"] for m in b.metrics], out["metrics"])
        self.assertEqual((out["info"].log_count, out["info"].metric_count), (4, 2))
        self.assertEqual(
            ([j.job_uuid for j in out["list"].jobs], out["list"].total_count), ([JOB], 1)
        )
        self.assertEqual((out["stats"].total_logs, out["stats"].messages_received), (4, 3))
        self.assertEqual(list(out["cleanup"].deleted_job_ids), ["old-1"])
        self.assertEqual(self.cleanups, [True])
        self.assertTrue(out["delete"].success)
        self.assertEqual(out["after"], grpc.StatusCode.NOT_FOUND)

    @defer.inlineCallbacks
    def test_error_codes(self):
        """User mistakes get INVALID_ARGUMENT, unknown jobs NOT_FOUND, over the wire."""
        yield self.fill()
        self.serve()
        stub = self.stub()
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        for bad in BAD_IDS:
            for call, request in [
                (stub.QueryLogs, pb.QueryLogsRequest(job_uuid=bad)),
                (stub.QueryLogsBatched, pb.QueryLogsRequest(job_uuid=bad)),
                (stub.QueryMetrics, pb.QueryMetricsRequest(job_uuid=bad)),
                (stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=bad)),
                (stub.DeleteJob, pb.DeleteJobRequest(job_uuid=bad)),
            ]:
                self.assertEqual((yield self.code_of(call, request)), invalid, (call, bad))
        for request in [
            pb.QueryLogsRequest(job_uuid=JOB, stream=5),
            pb.QueryLogsRequest(job_uuid=JOB, limit=-1),
            pb.QueryLogsRequest(job_uuid=JOB, offset=-1),
            pb.QueryLogsRequest(job_uuid=JOB, start_time=9, end_time=8),
        ]:
            self.assertEqual((yield self.code_of(stub.QueryLogs, request)), invalid)
        self.assertEqual(
            (yield self.code_of(stub.QueryLogs, pb.QueryLogsRequest(job_uuid="nosuch"))),
            grpc.StatusCode.NOT_FOUND,
        )
        self.assertEqual(
            (yield self.code_of(stub.QueryMetricsBatched, pb.QueryMetricsRequest(job_uuid="no"))),
            grpc.StatusCode.NOT_FOUND,
        )

    @defer.inlineCallbacks
    def test_unloaded_job_is_opened_on_the_reactor(self):
        """A job known only to the index (as after a restart) is opened on the reactor, then served."""
        yield self.fill()
        inner = self.storage.inner
        if hasattr(inner, "evict"):
            inner.evict(JOB)
        else:
            # Restart the backend on the same directory: nothing is loaded yet.
            yield inner.stop()
            self.storage.inner = inner = self.make_storage()
            yield inner.start()
        self.assertIsNone(self.storage.snapshot(JOB))
        self.serve()
        stub = self.stub()
        lines = yield threads.deferToThread(
            lambda: list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB)))
        )
        self.assertEqual(len(lines), 4)
        self.assertIsNotNone(self.storage.snapshot(JOB))
        if hasattr(inner, "open_job_calls"):
            self.assertEqual(inner.open_job_calls, [JOB])

    @defer.inlineCallbacks
    def test_loopback_tcp(self):
        """Plaintext TCP on 127.0.0.1 port 0 (opted in) binds a real port; loopback callers
        are admin."""
        yield self.fill()
        service = self.serve(unix_socket=None, tcp_address="127.0.0.1:0", allow_plaintext_tcp=True)
        self.assertGreater(service.tcp_port, 0)
        stub = self.stub(target=f"127.0.0.1:{service.tcp_port}")
        response = yield threads.deferToThread(
            stub.DeleteJob, pb.DeleteJobRequest(job_uuid=JOB), timeout=5
        )
        self.assertTrue(response.success)
        self.assertFalse(os.path.exists(self.socket_path))

    def test_socket_mode_and_stale_socket(self):
        """A stale socket file is replaced and the new socket gets the configured mode."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.socket_path)
        stale.close()  # the file stays, nobody listens: what a crash leaves
        self.serve()
        self.assertEqual(stat.S_IMODE(os.stat(self.socket_path).st_mode), 0o600)
        other = os.path.join(self.dir, "g2.sock")
        self.serve(unix_socket=other, unix_socket_mode="0660")
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o660)
        return self.code_of(self.stub().Ping, pb.PingRequest(), timeout=5).addCallback(
            self.assertEqual, grpc.StatusCode.OK
        )

    def test_refuses_live_socket_and_other_files(self):
        """A socket another process listens on, or a regular file, is never replaced."""
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(self.socket_path)
        live.listen(1)
        service = GrpcServerService(
            self.make_servicer(), unix_socket=self.socket_path, reactor=reactor
        )
        self.assertRaises(OSError, service.startService)
        self.assertFalse(service.running)
        path = os.path.join(self.dir, "file")
        with open(path, "w") as f:
            f.write("keep me")
        service = GrpcServerService(self.make_servicer(), unix_socket=path, reactor=reactor)
        self.assertRaises(OSError, service.startService)
        with open(path) as f:
            self.assertEqual(f.read(), "keep me")

    @defer.inlineCallbacks
    def test_stopping_and_stop(self):
        """set_stopping makes RPCs UNAVAILABLE; stopService removes the socket."""
        servicer = self.make_servicer()
        service = self.serve(servicer)
        stub = self.stub()
        self.assertEqual(
            (yield self.code_of(stub.Ping, pb.PingRequest(), timeout=5)), grpc.StatusCode.OK
        )
        servicer.set_stopping()
        self.assertEqual(
            (yield self.code_of(stub.Ping, pb.PingRequest(), timeout=5)),
            grpc.StatusCode.UNAVAILABLE,
        )
        yield service.stopService()
        self.assertFalse(os.path.exists(self.socket_path))
        self.assertEqual(
            (yield self.code_of(self.stub().Ping, pb.PingRequest(), timeout=2)),
            grpc.StatusCode.UNAVAILABLE,
        )

    @defer.inlineCallbacks
    def test_stop_cancels_reads_after_grace(self):
        """stopService ends a read still running after the grace period and frees its thread."""
        yield self.fill()
        self.storage.pause_after = 1
        servicer = self.make_servicer()
        service = self.serve(servicer, shutdown_grace=0.2)
        stub = self.stub()
        call = stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB))
        first = yield threads.deferToThread(next, call)
        self.assertEqual(first.sequence, 1)
        yield threads.deferToThread(self.storage.paused.acquire)
        yield service.stopService()
        self.assertTrue(self.storage.saw_cancel)
        self.assertEqual(servicer.active_rpcs, 0)

    @defer.inlineCallbacks
    def test_health_and_reflection(self):
        """grpc.health.v1 reports SERVING/NOT_SERVING from the health verdict; reflection lists services."""
        self.serve()
        ch = self.channel()
        health = health_pb2_grpc.HealthStub(ch)
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)

        def check(service=""):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        serving, persist = yield threads.deferToThread(
            lambda: (check(), check(PERSIST_SERVICE_NAME))
        )
        self.assertEqual((serving, persist), (health_pb2.HealthCheckResponse.SERVING,) * 2)
        self.healthy = False
        status = yield threads.deferToThread(check)
        self.assertEqual(status, health_pb2.HealthCheckResponse.NOT_SERVING)

        def services():
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            return {s.name for r in responses for s in r.list_services_response.service}

        names = yield threads.deferToThread(services)
        self.assertTrue(
            {
                PERSIST_SERVICE_NAME,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            <= names,
            names,
        )

    @defer.inlineCallbacks
    def test_health_watch_follows_health(self):
        """A Watch stream sees NOT_SERVING when the service turns unhealthy, without a Check."""
        self.serve(health_interval=0.02)
        health = health_pb2_grpc.HealthStub(self.channel())
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = yield threads.deferToThread(next, watch)
        self.assertEqual(first.status, health_pb2.HealthCheckResponse.SERVING)
        self.healthy = False
        second = yield threads.deferToThread(next, watch)
        self.assertEqual(second.status, health_pb2.HealthCheckResponse.NOT_SERVING)
        watch.cancel()

    @defer.inlineCallbacks
    def test_client_cancel_frees_the_handler(self):
        """A client that cancels after N items stops the server's read at once."""
        yield self.storage.append_logs(
            log_batch(JOB, 1, [(i + 1, i, b"line %d\n" % i) for i in range(1000)])
        )
        self.storage.pause_after = 10
        servicer = self.make_servicer()
        self.serve(servicer)
        stub = self.stub()
        call = stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB))
        got = yield threads.deferToThread(lambda: [next(call) for _ in range(10)])
        self.assertEqual([x.sequence for x in got], list(range(10)))
        # Cancel only once the server's read reached its pause point, so that the
        # cancellation is seen by the read rather than before it.
        yield threads.deferToThread(self.storage.paused.acquire)
        call.cancel()
        yield wait_for(lambda: self.storage.finished == 1 and servicer.active_rpcs == 0)
        self.assertTrue(self.storage.saw_cancel)
        self.assertEqual(self.storage.yielded, 10)

    @defer.inlineCallbacks
    def test_client_deadline_frees_the_handler(self):
        """A client deadline that expires mid-read stops the server's read too."""
        yield self.fill()
        self.storage.pause_after = 2
        servicer = self.make_servicer()
        self.serve(servicer)
        stub = self.stub()
        code = yield self.code_of(stub.QueryLogs, pb.QueryLogsRequest(job_uuid=JOB), timeout=0.3)
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        yield wait_for(lambda: self.storage.finished == 1 and servicer.active_rpcs == 0)
        self.assertTrue(self.storage.saw_cancel)

    @defer.inlineCallbacks
    def test_resource_exhausted_but_ping_answers(self):
        """Beyond max concurrent RPCs queries get RESOURCE_EXHAUSTED; Ping still answers."""
        yield self.fill()
        self.storage.pause_after = 1
        servicer = self.make_servicer()
        service = self.serve(servicer, max_concurrent_rpcs=2, max_workers=1)
        self.assertEqual(service.workers, 2 + 4)
        stub = self.stub()
        calls = [stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB)) for _ in range(2)]
        for call in calls:
            yield threads.deferToThread(next, call)
        for _ in calls:
            yield threads.deferToThread(self.storage.paused.acquire)
        self.assertEqual(servicer.active_rpcs, 2)
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.assertEqual(
            (yield self.code_of(stub.QueryLogs, pb.QueryLogsRequest(job_uuid=JOB))), exhausted
        )
        self.assertEqual((yield self.code_of(stub.GetStats, pb.GetStatsRequest())), exhausted)
        ping = yield threads.deferToThread(stub.Ping, pb.PingRequest(), timeout=2)
        self.assertTrue(ping.healthy)
        self.storage.gate.set()
        rest = yield threads.deferToThread(lambda: [list(c) for c in calls])
        self.assertEqual([len(r) for r in rest], [3, 3])
        yield wait_for(lambda: servicer.active_rpcs == 0)
        self.assertEqual(
            (yield self.code_of(stub.GetStats, pb.GetStatsRequest())), grpc.StatusCode.OK
        )


class ListenerRoleTests(GrpcTestBase):
    """Each listener decides its callers' role: admin socket, viewer socket, TCP."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.fill()
        self.viewer_path = os.path.join(self.dir, "viewer.sock")

    @defer.inlineCallbacks
    def test_viewer_socket_reads_but_cannot_delete(self):
        """On the viewer socket every caller is viewer: Ping, queries, info, list and stats
        work; DeleteJob and CleanupOldData are PERMISSION_DENIED and change nothing.  The
        admin socket of the same service still deletes.  Both get their modes and the viewer
        socket its group."""
        gid = os.getgid() if os.getgid() != 0 else 65534
        servicer = self.make_servicer()
        self.serve(
            servicer,
            viewer_socket=self.viewer_path,
            viewer_socket_mode=0o660,
            viewer_socket_gid=gid,
        )
        info = os.stat(self.viewer_path)
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o660)
        self.assertEqual(info.st_gid, gid)
        self.assertEqual(stat.S_IMODE(os.stat(self.socket_path).st_mode), 0o600)
        viewer = self.stub(target=f"unix:{self.viewer_path}")
        lines = yield threads.deferToThread(
            lambda: list(viewer.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), timeout=5))
        )
        self.assertEqual(len(lines), 4)
        ok = grpc.StatusCode.OK
        for call, request in [
            (viewer.Ping, pb.PingRequest()),
            (viewer.QueryMetrics, pb.QueryMetricsRequest(job_uuid=JOB)),
            (viewer.GetJobInfo, pb.GetJobInfoRequest(job_uuid=JOB)),
            (viewer.ListJobs, pb.ListJobsRequest()),
            (viewer.GetStats, pb.GetStatsRequest()),
        ]:
            self.assertEqual((yield self.code_of(call, request, timeout=5)), ok, call)
        for call, request in [
            (viewer.DeleteJob, pb.DeleteJobRequest(job_uuid=JOB)),
            (viewer.CleanupOldData, pb.CleanupRequest()),
        ]:
            code = yield self.code_of(call, request, timeout=5)
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertIsNotNone(self.storage.job_info(JOB))
        self.assertEqual(self.cleanups, [])
        response = yield threads.deferToThread(
            self.stub().DeleteJob, pb.DeleteJobRequest(job_uuid=JOB), timeout=5
        )
        self.assertTrue(response.success)
        self.assertIsNone(self.storage.job_info(JOB))

    @defer.inlineCallbacks
    def test_viewer_socket_health_and_stop(self):
        """The viewer socket serves gRPC health too; stopService removes both sockets."""
        service = self.serve(viewer_socket=self.viewer_path)
        channel = self.channel(target=f"unix:{self.viewer_path}")
        health = health_pb2_grpc.HealthStub(channel)
        response = yield threads.deferToThread(
            health.Check, health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        self.assertEqual(response.status, health_pb2.HealthCheckResponse.SERVING)
        yield service.stopService()
        self.assertFalse(os.path.exists(self.viewer_path))
        self.assertFalse(os.path.exists(self.socket_path))

    @defer.inlineCallbacks
    def test_concurrency_limit_is_global(self):
        """The concurrency limit counts RPCs on every listener together, and Ping stays
        exempt on each: two reads held on the admin socket exhaust the viewer socket."""
        self.storage.pause_after = 1
        servicer = self.make_servicer()
        self.serve(servicer, viewer_socket=self.viewer_path, max_concurrent_rpcs=2)
        admin = self.stub()
        viewer = self.stub(target=f"unix:{self.viewer_path}")
        calls = [admin.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB)) for _ in range(2)]
        for call in calls:
            yield threads.deferToThread(next, call)
        for _ in calls:
            yield threads.deferToThread(self.storage.paused.acquire)
        self.assertEqual(servicer.active_rpcs, 2)
        self.assertEqual(
            (yield self.code_of(viewer.GetStats, pb.GetStatsRequest(), timeout=5)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        ping = yield threads.deferToThread(viewer.Ping, pb.PingRequest(), timeout=2)
        self.assertTrue(ping.healthy)
        self.storage.gate.set()
        rest = yield threads.deferToThread(lambda: [list(c) for c in calls])
        self.assertEqual([len(r) for r in rest], [3, 3])
        yield wait_for(lambda: servicer.active_rpcs == 0)

    @defer.inlineCallbacks
    def test_plaintext_tcp_warns_with_address(self):
        """An opted-in plaintext TCP listener logs a warning at start naming the bound
        address and the risk."""
        events = []
        service = GrpcServerService(
            self.make_servicer(),
            tcp_address="127.0.0.1:0",
            allow_plaintext_tcp=True,
            shutdown_grace=0.5,
            reactor=reactor,
        )
        service.log = Logger(observer=events.append)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn(f"127.0.0.1:{service.tcp_port}", warning["detail"])
        self.assertIn("every local user", warning["detail"])
        yield service.stopService()

    def test_tls_listener_warns_nothing(self):
        """A TLS TCP listener logs no plaintext warning."""
        pki = make_pki()
        tls = {
            "server_cert": pki.server_cert,
            "server_key": pki.server_key,
            "ca_cert": pki.ca_cert,
            "require_client_cert": True,
        }
        events = []
        service = GrpcServerService(
            self.make_servicer(),
            tcp_address="127.0.0.1:0",
            tls=tls,
            reactor=reactor,
            shutdown_grace=0.5,
        )
        service.log = Logger(observer=events.append)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])


class TLSTests(GrpcTestBase):
    """Mutual TLS on 127.0.0.1 with throwaway certificates generated per run."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.pki = make_pki()
        yield self.fill()
        tls = {
            "server_cert": self.pki.server_cert,
            "server_key": self.pki.server_key,
            "ca_cert": self.pki.ca_cert,
            "require_client_cert": True,
        }
        self.service = self.serve(unix_socket=None, tcp_address="127.0.0.1:0", tls=tls)

    def tls_stub(self, ou=None):
        if ou is None:
            creds = grpc.ssl_channel_credentials(self.pki.ca_cert)
        else:
            cert, key = self.pki.clients[ou]
            creds = grpc.ssl_channel_credentials(self.pki.ca_cert, key, cert)
        return self.stub(target=f"localhost:{self.service.tcp_port}", credentials=creds)

    @defer.inlineCallbacks
    def test_no_client_certificate_refused(self):
        """Without a client certificate the handshake fails: UNAVAILABLE."""
        code = yield self.code_of(self.tls_stub().Ping, pb.PingRequest(), timeout=5)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

    @defer.inlineCallbacks
    def test_plaintext_client_refused(self):
        """A plaintext client cannot talk to the TLS port."""
        stub = self.stub(target=f"127.0.0.1:{self.service.tcp_port}")
        code = yield self.code_of(stub.Ping, pb.PingRequest(), timeout=5)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

    @defer.inlineCallbacks
    def test_viewer_reads_but_cannot_delete(self):
        """A viewer may Ping and query; DeleteJob is PERMISSION_DENIED and deletes nothing."""
        stub = self.tls_stub("viewer")
        lines = yield threads.deferToThread(
            lambda: list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), timeout=5))
        )
        self.assertEqual(len(lines), 4)
        self.assertEqual(
            (yield self.code_of(stub.Ping, pb.PingRequest(), timeout=5)), grpc.StatusCode.OK
        )
        for call, request in [
            (stub.DeleteJob, pb.DeleteJobRequest(job_uuid=JOB)),
            (stub.CleanupOldData, pb.CleanupRequest()),
        ]:
            code = yield self.code_of(call, request, timeout=5)
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertIsNotNone(self.storage.job_info(JOB))
        self.assertEqual(self.cleanups, [])

    @defer.inlineCallbacks
    def test_admin_deletes(self):
        """An admin certificate may delete."""
        stub = self.tls_stub("admin")
        response = yield threads.deferToThread(
            stub.DeleteJob, pb.DeleteJobRequest(job_uuid=JOB), timeout=5
        )
        self.assertTrue(response.success)
        self.assertIsNone(self.storage.job_info(JOB))

    @defer.inlineCallbacks
    def test_other_ou_denied(self):
        """A valid certificate whose OU is neither admin nor viewer gets PERMISSION_DENIED."""
        code = yield self.code_of(self.tls_stub("other").Ping, pb.PingRequest(), timeout=5)
        self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
