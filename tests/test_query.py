"""Tests for joblet_persist.query.PersistServicer, called directly with a fake context.

The servicer runs here on the test thread; its reactor is an ImmediateReactor
so that ``blockingCallFromThread`` completes synchronously against FakeStorage.
"""

from __future__ import annotations

import errno
import functools
import time

import grpc
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.query import PersistServicer, metric_message
from joblet_persist.storage.api import MetricRecord, ReadStats
from tests.fakes import (
    Aborted,
    FakeContext,
    FakeStorage,
    ImmediateReactor,
    RecordingMetrics,
    log_batch,
    make_pki,
    metric_batch,
)

BAD_IDS = ["../x", "a/b", "", "x" * 200, "..", "-lead", "a..b", "a b", "job\x00"]
JOB = "3f2a9c1e-0b7d-4e55-9a4e-1c2d3e4f5a6b"


@functools.lru_cache(maxsize=1)
def _pki():
    return make_pki()


def tls_context(ou: str) -> FakeContext:
    """A context as grpc builds it for a TLS caller with a client certificate of ``ou``."""
    cert = _pki().clients[ou][0]
    return FakeContext(
        peer="ipv4:10.1.2.3:40000",
        auth={"transport_security_type": [b"ssl"], "x509_pem_cert": [cert]},
    )


class _Cleanup:
    def __init__(self, jobs_deleted, bytes_freed, deleted_job_ids):
        self.jobs_deleted = jobs_deleted
        self.bytes_freed = bytes_freed
        self.deleted_job_ids = deleted_job_ids


class ServicerMixin:
    """Builds a servicer over FakeStorage; helpers to call it like grpc does."""

    def setUp(self):
        self.now = [1_700_000_000.0]
        self.storage = FakeStorage(now=lambda: self.now[0])
        self.reactor = ImmediateReactor()
        self.metrics = RecordingMetrics()
        self.healthy = True
        self.ingest = {"messages_received": 7, "messages_written": 5, "write_errors": 1}
        self.cleanup_calls = []

    def make(self, **kw) -> PersistServicer:
        def cleanup(dry_run):
            self.cleanup_calls.append(dry_run)
            return defer.succeed(_Cleanup(2, 4096, ["a", "b"]))

        args = dict(
            is_healthy=lambda: self.healthy,
            ingest_stats=lambda: self.ingest,
            delete_job=self.storage.delete_job,
            cleanup=cleanup,
            metrics=self.metrics,
        )
        args.update(kw)
        return PersistServicer(self.storage, self.reactor, **args)

    def unary(self, servicer, rpc, request, context=None):
        return getattr(servicer, rpc)(request, context or FakeContext())

    def stream(self, servicer, rpc, request, context=None):
        return list(getattr(servicer, rpc)(request, context or FakeContext()))

    def assertCode(self, code, fn, *args):
        e = self.assertRaises(Aborted, fn, *args)
        self.assertEqual(e.code, code, e.details)
        return e.details

    def add_logs(self, job, stream, lines):
        self.successResultOf(self.storage.append_logs(log_batch(job, stream, lines)))

    def add_metrics(self, job, samples):
        self.successResultOf(self.storage.append_metrics(metric_batch(job, samples)))


class PingTests(ServicerMixin, SynchronousTestCase):
    def test_ping_reports_health_and_time(self):
        """Ping's healthy follows is_healthy() and its timestamp is the server's time in ns."""
        s = self.make()
        before = time.time_ns()
        r = self.unary(s, "Ping", pb.PingRequest())
        after = time.time_ns()
        self.assertTrue(r.healthy)
        self.assertTrue(before <= r.timestamp <= after)
        self.healthy = False
        self.assertFalse(self.unary(s, "Ping", pb.PingRequest()).healthy)

    def test_ping_does_not_touch_the_reactor(self):
        """Ping answers from is_healthy() alone, without a reactor round trip."""
        s = self.make()
        self.unary(s, "Ping", pb.PingRequest())
        self.assertEqual(self.reactor.from_thread_calls, 0)

    def test_health_check_error_reports_unhealthy(self):
        """A failing is_healthy() makes Ping report unhealthy and is logged, not INTERNAL."""

        def broken():
            raise RuntimeError("probe broke")

        s = self.make(is_healthy=broken)
        self.assertFalse(self.unary(s, "Ping", pb.PingRequest()).healthy)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopping_refuses_every_rpc(self):
        """After set_stopping, Ping and queries fail with UNAVAILABLE."""
        self.add_logs(JOB, 1, [(1, 1, b"x")])
        s = self.make()
        s.set_stopping()
        self.assertFalse(s.healthy())
        self.assertCode(grpc.StatusCode.UNAVAILABLE, self.unary, s, "Ping", pb.PingRequest())
        self.assertCode(
            grpc.StatusCode.UNAVAILABLE,
            self.stream,
            s,
            "QueryLogs",
            pb.QueryLogsRequest(job_uuid=JOB),
        )
        self.assertIn(("Ping", "UNAVAILABLE"), self.metrics.queries)


class QueryLogsTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.add_logs(JOB, 1, [(100, 1, b"out1\n"), (200, 2, b"out2\n")])
        self.add_logs(JOB, 2, [(200, 3, b"err1\n")])
        self.add_logs(JOB, 1, [(300, 4, b"\x00\xffbin"), (400, 5, b"")])
        self.s = self.make()

    def query(self, rpc="QueryLogs", context=None, **kw):
        return self.stream(self.s, rpc, pb.QueryLogsRequest(job_uuid=JOB, **kw), context)

    def test_both_streams_merged_in_arrival_order(self):
        """UNSPECIFIED stream returns one LogLine per message, both streams in arrival order."""
        lines = self.query()
        self.assertEqual(
            [(x.stream, x.timestamp, x.sequence, x.content) for x in lines],
            [
                (1, 100, 1, b"out1\n"),
                (1, 200, 2, b"out2\n"),
                (2, 200, 3, b"err1\n"),
                (1, 300, 4, b"\x00\xffbin"),
                (1, 400, 5, b""),
            ],
        )
        self.assertEqual({x.job_uuid for x in lines}, {JOB})

    def test_single_stream(self):
        """stream 1 or 2 returns only that stream's messages."""
        self.assertEqual([x.sequence for x in self.query(stream=1)], [1, 2, 4, 5])
        self.assertEqual([x.sequence for x in self.query(stream=2)], [3])

    def test_range_then_offset_then_limit(self):
        """The inclusive range applies first, then offset, then limit; 0 bounds are open."""
        self.assertEqual([x.sequence for x in self.query(start_time=200, end_time=300)], [2, 3, 4])
        self.assertEqual([x.sequence for x in self.query(start_time=200)], [2, 3, 4, 5])
        self.assertEqual([x.sequence for x in self.query(end_time=200)], [1, 2, 3])
        self.assertEqual(
            [x.sequence for x in self.query(start_time=200, offset=1, limit=2)], [3, 4]
        )
        self.assertEqual([x.sequence for x in self.query(offset=10)], [])

    def test_node_id_is_ignored(self):
        """node_id (field 7, once a text filter) never filters the result."""
        self.assertEqual(len(self.query(node_id="out1")), 5)

    def test_invalid_job_ids(self):
        """Malformed job ids are INVALID_ARGUMENT and never reach storage."""
        for rpc in ("QueryLogs", "QueryLogsBatched"):
            for bad in BAD_IDS:
                self.assertCode(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    self.stream,
                    self.s,
                    rpc,
                    pb.QueryLogsRequest(job_uuid=bad),
                )
        self.assertEqual(self.storage.open_job_calls, [])

    def test_bad_requests(self):
        """Bad stream, negative or too large limit/offset and inverted ranges are INVALID_ARGUMENT."""
        s = self.make(max_limit=1000)
        cases = [
            dict(stream=3),
            dict(stream=-1),
            dict(limit=-1),
            dict(offset=-5),
            dict(limit=1001),
            dict(offset=1001),
            dict(start_time=300, end_time=200),
        ]
        for kw in cases:
            for rpc in ("QueryLogs", "QueryLogsBatched"):
                details = self.assertCode(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    self.stream,
                    s,
                    rpc,
                    pb.QueryLogsRequest(job_uuid=JOB, **kw),
                )
                self.assertTrue(details)
        self.assertEqual(
            len(self.stream(s, "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB, limit=1000))), 5
        )
        self.assertNotIn("INTERNAL", {code for _, code in self.metrics.queries})

    def test_negative_bound_is_open(self):
        """A bound <= 0 does not apply, so a negative start with a positive end is no inversion."""
        self.assertEqual([x.sequence for x in self.query(start_time=-5, end_time=100)], [1])

    def test_unknown_job_is_not_found(self):
        """An unknown job is NOT_FOUND naming it, after asking storage to open it on the reactor."""
        details = self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.stream,
            self.s,
            "QueryLogs",
            pb.QueryLogsRequest(job_uuid="nosuchjob"),
        )
        self.assertIn("nosuchjob", details)
        self.assertEqual(self.storage.open_job_calls, ["nosuchjob"])

    def test_unloaded_job_is_opened_on_the_reactor(self):
        """A job without a loaded snapshot is opened via the reactor, then queried."""
        self.storage.evict(JOB)
        self.assertEqual(len(self.query()), 5)
        self.assertEqual(self.storage.open_job_calls, [JOB])
        self.assertEqual(self.reactor.from_thread_calls, 1)
        self.assertEqual(len(self.query()), 5)
        self.assertEqual(self.storage.open_job_calls, [JOB])

    def test_batched_equals_per_message(self):
        """QueryLogsBatched returns the same lines as QueryLogs, in the same order."""
        s = self.make(batch_max_items=2)
        for kw in [{}, dict(stream=1), dict(start_time=200, limit=2), dict(offset=3)]:
            plain = self.stream(s, "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB, **kw))
            batches = self.stream(s, "QueryLogsBatched", pb.QueryLogsRequest(job_uuid=JOB, **kw))
            self.assertEqual([x for b in batches for x in b.lines], plain)
            self.assertTrue(all(1 <= len(b.lines) <= 2 for b in batches))

    def test_batches_respect_byte_cap(self):
        """Batches hold at most batch_max_bytes of content; a larger line travels alone."""
        job = "bigjob"
        self.add_logs(job, 1, [(1, i, b"x" * n) for i, n in enumerate([4, 4, 4, 20, 1, 1])])
        s = self.make(batch_max_bytes=10)
        batches = self.stream(s, "QueryLogsBatched", pb.QueryLogsRequest(job_uuid=job))
        self.assertEqual(
            [[len(x.content) for x in b.lines] for b in batches], [[4, 4], [4], [20], [1, 1]]
        )

    def test_empty_result_sends_no_batch(self):
        """A query matching nothing yields no LogLineBatch at all."""
        self.assertEqual(self.query("QueryLogsBatched", start_time=10_000), [])

    def test_client_cancel_stops_the_read(self):
        """When the client goes away the read stops at once and the RPC is CANCELLED."""
        ctx = FakeContext(active_for=2)
        lines = self.query(context=ctx)
        self.assertLessEqual(len(lines), 2)
        self.assertEqual(self.s.active_rpcs, 0)
        self.assertEqual(self.metrics.queries[-1], ("QueryLogs", "CANCELLED"))

    def test_read_stats_are_reported(self):
        """Members inflated, skipped and corrupt are reported to the metrics object."""
        self.storage.corrupt_next = True
        self.add_logs(JOB, 2, [(500, 6, b"lost")])
        self.query(start_time=300)
        self.assertEqual(self.metrics.corrupt, 1)
        self.assertEqual(self.metrics.inflated, 1)
        self.assertEqual(self.metrics.skipped, 2)
        self.assertEqual(self.metrics.queries[-1], ("QueryLogs", "OK"))


class PagingProperties(ServicerMixin, SynchronousTestCase):
    @given(
        messages=st.lists(
            st.tuples(st.sampled_from([1, 2]), st.integers(1, 20), st.binary(max_size=6)),
            max_size=30,
        ),
        cuts=st.lists(st.integers(1, 5), max_size=6),
        stream=st.sampled_from([0, 1, 2]),
        start=st.integers(-1, 21),
        end=st.integers(-1, 21),
        offset=st.integers(0, 35),
        limit=st.integers(0, 35),
        max_items=st.integers(1, 5),
        max_bytes=st.integers(1, 12),
    )
    def test_logs_match_reference(
        self, messages, cuts, stream, start, end, offset, limit, max_items, max_bytes
    ):
        """QueryLogs and QueryLogsBatched equal a plain filter/slice over the arrival order."""
        self.setUp()
        job = "prop"
        # Feed the messages in arrival order as per-stream batches of varying size.
        pending = {1: [], 2: []}
        arrival = 0
        cut_iter = iter(cuts)
        size = next(cut_iter, 3)
        for s_, ts, content in messages:
            arrival += 1
            pending[s_].append((arrival, ts, content))
            if len(pending[s_]) >= size:
                self._flush(job, s_, pending)
                size = next(cut_iter, 3)
        for s_ in (1, 2):
            self._flush(job, s_, pending)
        if start > 0 and end > 0 and start > end:
            start, end = end, start
        expected = [
            (s_, ts, c)
            for s_, ts, c in messages
            if (stream == 0 or s_ == stream)
            and (start <= 0 or ts >= start)
            and (end <= 0 or ts <= end)
        ]
        expected = expected[offset : offset + limit if limit else None]
        servicer = self.make(batch_max_items=max_items, batch_max_bytes=max_bytes)
        request = pb.QueryLogsRequest(
            job_uuid=job, stream=stream, start_time=start, end_time=end, offset=offset, limit=limit
        )
        if not messages:
            self.assertCode(grpc.StatusCode.NOT_FOUND, self.stream, servicer, "QueryLogs", request)
            return
        plain = self.stream(servicer, "QueryLogs", request)
        self.assertEqual([(x.stream, x.timestamp, x.content) for x in plain], expected)
        batches = self.stream(servicer, "QueryLogsBatched", request)
        self.assertEqual([x for b in batches for x in b.lines], plain)
        for b in batches:
            self.assertLessEqual(len(b.lines), max_items)
            if len(b.lines) > 1:
                self.assertLessEqual(sum(len(x.content) for x in b.lines), max_bytes)

    def _flush(self, job, stream, pending):
        items = pending[stream]
        if items:
            batch = log_batch(
                job, stream, [(ts, a, c) for a, ts, c in items], arrivals=[a for a, _, _ in items]
            )
            self.successResultOf(self.storage.append_logs(batch))
            pending[stream] = []


class QueryMetricsTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.add_metrics(
            JOB,
            [
                (
                    100,
                    1,
                    dict(
                        cpu_usage=12.5,
                        memory_usage=1 << 40,
                        gpu_usage=3.0,
                        disk_io=dict(read_bytes=1, write_bytes=2, read_ops=3, write_ops=4),
                        network_io=dict(rx_bytes=5, tx_bytes=6, rx_packets=7, tx_packets=8),
                    ),
                ),
                (200, 2, dict(cpu_usage=50.0)),
            ],
        )
        self.add_metrics(JOB, [(300, 3, dict(memory_usage=9))])
        self.s = self.make()

    def query(self, rpc="QueryMetrics", **kw):
        return self.stream(self.s, rpc, pb.QueryMetricsRequest(job_uuid=JOB, **kw))

    def test_metrics_round_trip(self):
        """Every MetricData field survives storage and is rebuilt on the wire."""
        m = self.query()
        self.assertEqual([x.sequence for x in m], [1, 2, 3])
        first = m[0]
        self.assertEqual(first.job_uuid, JOB)
        self.assertEqual(first.timestamp, 100)
        self.assertEqual(first.data.cpu_usage, 12.5)
        self.assertEqual(first.data.memory_usage, 1 << 40)
        self.assertEqual(first.data.gpu_usage, 3.0)
        self.assertEqual((first.data.disk_io.read_bytes, first.data.disk_io.write_ops), (1, 4))
        self.assertEqual((first.data.network_io.rx_bytes, first.data.network_io.tx_packets), (5, 8))
        self.assertEqual(m[2].data.memory_usage, 9)

    def test_range_offset_limit(self):
        """Metric queries use the same range, offset and limit semantics as logs."""
        self.assertEqual([x.sequence for x in self.query(start_time=200)], [2, 3])
        self.assertEqual([x.sequence for x in self.query(offset=1, limit=1)], [2])
        self.assertEqual([x.sequence for x in self.query(end_time=150)], [1])

    def test_batched_equals_per_message(self):
        """QueryMetricsBatched returns the same metrics as QueryMetrics."""
        s = self.make(batch_max_items=2)
        plain = self.stream(s, "QueryMetrics", pb.QueryMetricsRequest(job_uuid=JOB))
        batches = self.stream(s, "QueryMetricsBatched", pb.QueryMetricsRequest(job_uuid=JOB))
        self.assertEqual([len(b.metrics) for b in batches], [2, 1])
        self.assertEqual([x for b in batches for x in b.metrics], plain)

    def test_errors(self):
        """Bad ids and bad paging are INVALID_ARGUMENT; an unknown job NOT_FOUND."""
        for rpc in ("QueryMetrics", "QueryMetricsBatched"):
            for bad in BAD_IDS:
                self.assertCode(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    self.stream,
                    self.s,
                    rpc,
                    pb.QueryMetricsRequest(job_uuid=bad),
                )
            for kw in (dict(limit=-1), dict(offset=-1), dict(start_time=5, end_time=4)):
                self.assertCode(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    self.stream,
                    self.s,
                    rpc,
                    pb.QueryMetricsRequest(job_uuid=JOB, **kw),
                )
            self.assertCode(
                grpc.StatusCode.NOT_FOUND,
                self.stream,
                self.s,
                rpc,
                pb.QueryMetricsRequest(job_uuid="unknown"),
            )

    def test_metric_message_tolerates_odd_records(self):
        """Missing keys are zero, camelCase keys are read, garbage values become zero."""
        m = metric_message(
            "j",
            MetricRecord(
                5,
                6,
                {
                    "cpuUsage": "7.5",
                    "memory_usage": "not a number",
                    "diskIo": {"readBytes": 11},
                    "network_io": "nonsense",
                    "extra": [1, 2],
                },
            ),
        )
        self.assertEqual((m.job_uuid, m.timestamp, m.sequence), ("j", 5, 6))
        self.assertEqual(m.data.cpu_usage, 7.5)
        self.assertEqual(m.data.memory_usage, 0)
        self.assertEqual(m.data.disk_io.read_bytes, 11)
        self.assertEqual(m.data.network_io.rx_bytes, 0)
        self.assertEqual(metric_message("j", MetricRecord(1, 2, None)).data.cpu_usage, 0.0)


class JobTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        for job, created in [("a", 300), ("b", 100), ("c", 300), ("d", 200)]:
            self.now[0] = created
            self.add_logs(job, 1, [(created * 10**9, 1, b"line\n")])
        self.now[0] = 400
        self.add_metrics("d", [(1, 1, {})])
        self.s = self.make()

    def list(self, **kw):
        r = self.unary(self.s, "ListJobs", pb.ListJobsRequest(**kw))
        return [j.job_uuid for j in r.jobs], r.total_count

    def test_job_info(self):
        """GetJobInfo returns the index summary of the job."""
        r = self.unary(self.s, "GetJobInfo", pb.GetJobInfoRequest(job_uuid="d"))
        self.assertEqual(
            (r.job_uuid, r.created_at, r.last_updated, r.log_count, r.metric_count),
            ("d", 200, 400, 1, 1),
        )
        self.assertEqual(r.size_bytes, self.storage.job_info("d").size_bytes)

    def test_job_info_errors(self):
        """GetJobInfo: bad id INVALID_ARGUMENT, unknown job NOT_FOUND after trying open_job."""
        for bad in BAD_IDS:
            self.assertCode(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.unary,
                self.s,
                "GetJobInfo",
                pb.GetJobInfoRequest(job_uuid=bad),
            )
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.unary,
            self.s,
            "GetJobInfo",
            pb.GetJobInfoRequest(job_uuid="zzz"),
        )
        self.assertEqual(self.storage.open_job_calls, ["zzz"])

    def test_list_order_and_total(self):
        """ListJobs: newest created_at first, ties by job id; total_count before paging."""
        self.assertEqual(self.list(), (["a", "c", "d", "b"], 4))
        self.assertEqual(self.list(limit=2), (["a", "c"], 4))
        self.assertEqual(self.list(offset=1, limit=2), (["c", "d"], 4))
        self.assertEqual(self.list(offset=9), ([], 4))

    def test_list_since_until_inclusive(self):
        """since/until bound created_at inclusively; 0 is unbounded."""
        self.assertEqual(self.list(since=200), (["a", "c", "d"], 3))
        self.assertEqual(self.list(until=200), (["d", "b"], 2))
        self.assertEqual(self.list(since=200, until=200), (["d"], 1))
        self.assertEqual(self.list(since=301), ([], 0))

    def test_list_bad_requests(self):
        """ListJobs refuses inverted bounds and negative paging with INVALID_ARGUMENT."""
        for kw in (dict(since=5, until=4), dict(limit=-1), dict(offset=-1)):
            self.assertCode(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.unary,
                self.s,
                "ListJobs",
                pb.ListJobsRequest(**kw),
            )

    def test_stats(self):
        """GetStats sums the job index and adds the ingest counters."""
        r = self.unary(self.s, "GetStats", pb.GetStatsRequest())
        jobs = self.storage.list_jobs()
        self.assertEqual(
            (r.total_jobs, r.total_logs, r.total_metrics, r.total_size_bytes),
            (4, 4, 1, sum(j.size_bytes for j in jobs)),
        )
        self.assertEqual((r.messages_received, r.messages_written, r.write_errors), (7, 5, 1))

    def test_unexpected_error_is_internal_and_logged(self):
        """A bug (not a user mistake) becomes INTERNAL and its traceback is logged."""

        def broken():
            raise RuntimeError("index exploded")

        self.storage.list_jobs = broken
        details = self.assertCode(
            grpc.StatusCode.INTERNAL, self.unary, self.s, "ListJobs", pb.ListJobsRequest()
        )
        self.assertNotIn("exploded", details)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.metrics.queries[-1], ("ListJobs", "INTERNAL"))


class DeleteAndCleanupTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.add_logs(JOB, 1, [(1, 1, b"0123456789")])
        self.s = self.make()

    def test_delete_existing_job(self):
        """DeleteJob runs delete_job on the reactor; success with the bytes freed."""
        size = self.storage.job_info(JOB).size_bytes
        r = self.unary(self.s, "DeleteJob", pb.DeleteJobRequest(job_uuid=JOB))
        self.assertTrue(r.success)
        self.assertIn(f"{size} bytes freed", r.message)
        self.assertEqual(self.storage.deleted, [JOB])
        self.assertIsNone(self.storage.job_info(JOB))
        self.assertEqual(self.reactor.from_thread_calls, 1)

    def test_delete_unknown_job_succeeds(self):
        """Deleting an unknown job succeeds: its data is gone (WIRE: success when gone)."""
        r = self.unary(self.s, "DeleteJob", pb.DeleteJobRequest(job_uuid="ghost", node_id="n1"))
        self.assertTrue(r.success)
        self.assertEqual(r.message, "job ghost not found; nothing to delete")

    def test_delete_invalid_id(self):
        """DeleteJob with a malformed id is INVALID_ARGUMENT and deletes nothing."""
        for bad in BAD_IDS:
            self.assertCode(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.unary,
                self.s,
                "DeleteJob",
                pb.DeleteJobRequest(job_uuid=bad),
            )
        self.assertEqual(self.storage.deleted, [])

    def test_delete_timeout(self):
        """A delete that does not finish within reactor_call_timeout is UNAVAILABLE."""
        self.reactor.advance_on_call = 31
        s = self.make(delete_job=lambda job_id: defer.Deferred(), reactor_call_timeout=30)
        details = self.assertCode(
            grpc.StatusCode.UNAVAILABLE,
            self.unary,
            s,
            "DeleteJob",
            pb.DeleteJobRequest(job_uuid=JOB),
        )
        self.assertIn("30s", details)

    def test_delete_needs_admin(self):
        """A viewer may not delete; an admin certificate may."""
        self.assertCode(
            grpc.StatusCode.PERMISSION_DENIED,
            self.unary,
            self.s,
            "DeleteJob",
            pb.DeleteJobRequest(job_uuid=JOB),
            tls_context("viewer"),
        )
        self.assertEqual(self.storage.deleted, [])
        r = self.unary(self.s, "DeleteJob", pb.DeleteJobRequest(job_uuid=JOB), tls_context("admin"))
        self.assertTrue(r.success)

    def test_cleanup(self):
        """CleanupOldData passes dry_run to cleanup() on the reactor and reports its result."""
        r = self.unary(self.s, "CleanupOldData", pb.CleanupRequest(dry_run=True))
        self.assertEqual(
            (r.jobs_deleted, r.bytes_freed, list(r.deleted_job_ids)), (2, 4096, ["a", "b"])
        )
        self.assertEqual(self.cleanup_calls, [True])
        self.assertCode(
            grpc.StatusCode.PERMISSION_DENIED,
            self.unary,
            self.s,
            "CleanupOldData",
            pb.CleanupRequest(),
            tls_context("viewer"),
        )
        self.assertEqual(self.cleanup_calls, [True])

    def test_filesystem_errors_are_not_internal(self):
        """A DeleteJob failing on the filesystem is mapped in the one error-mapping place:
        read-only, permission errors are FAILED_PRECONDITION, other errors with an errno
        (I/O error, disk full) UNAVAILABLE; the message names the job, the cause as the
        system words it and the file; no traceback is logged (it is not a bug)."""
        path = f"/data/logs/{JOB}/stdout.log.gz"
        cases = [
            (errno.EROFS, "Read-only file system", grpc.StatusCode.FAILED_PRECONDITION),
            (errno.EACCES, "Permission denied", grpc.StatusCode.FAILED_PRECONDITION),
            (errno.EPERM, "Operation not permitted", grpc.StatusCode.FAILED_PRECONDITION),
            (errno.EIO, "Input/output error", grpc.StatusCode.UNAVAILABLE),
            (errno.ENOSPC, "No space left on device", grpc.StatusCode.UNAVAILABLE),
        ]
        for number, cause, code in cases:
            error = OSError(number, cause, path)
            s = self.make(delete_job=lambda job_id, e=error: defer.fail(e))
            details = self.assertCode(
                code, self.unary, s, "DeleteJob", pb.DeleteJobRequest(job_uuid=JOB)
            )
            self.assertIn(f"DeleteJob of job {JOB} failed: {cause}", details)
            self.assertIn(errno.errorcode[number], details)
            self.assertIn(path, details)
            self.assertEqual(self.metrics.queries[-1], ("DeleteJob", code.name))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cleanup_filesystem_error(self):
        """CleanupOldData failing on a read-only filesystem is FAILED_PRECONDITION naming the
        cause; an OSError without an errno (a bug of ours) stays INTERNAL and is logged."""
        s = self.make(cleanup=lambda dry_run: defer.fail(
            OSError(errno.EROFS, "Read-only file system", "/data/job_index.json")))
        details = self.assertCode(
            grpc.StatusCode.FAILED_PRECONDITION, self.unary, s, "CleanupOldData",
            pb.CleanupRequest(),
        )
        self.assertIn("CleanupOldData failed: Read-only file system [EROFS]", details)
        s = self.make(cleanup=lambda dry_run: defer.fail(OSError("size mismatch")))
        self.assertCode(
            grpc.StatusCode.INTERNAL, self.unary, s, "CleanupOldData", pb.CleanupRequest()
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_cleanup_unavailable(self):
        """Without a cleanup callable CleanupOldData is UNIMPLEMENTED with a message."""
        s = self.make(cleanup=None)
        details = self.assertCode(
            grpc.StatusCode.UNIMPLEMENTED, self.unary, s, "CleanupOldData", pb.CleanupRequest()
        )
        self.assertIn("retention", details)


class AuthorizationTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.add_logs(JOB, 1, [(1, 1, b"x")])
        self.s = self.make()

    def test_viewer_may_read(self):
        """A viewer certificate may Ping, query, get info, list and read stats."""
        ctx = tls_context("viewer")
        self.assertTrue(self.unary(self.s, "Ping", pb.PingRequest(), ctx).healthy)
        self.assertEqual(
            len(self.stream(self.s, "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB), ctx)), 1
        )
        self.unary(self.s, "GetJobInfo", pb.GetJobInfoRequest(job_uuid=JOB), ctx)
        self.unary(self.s, "ListJobs", pb.ListJobsRequest(), ctx)
        self.unary(self.s, "GetStats", pb.GetStatsRequest(), ctx)

    def test_unknown_ou_denied(self):
        """A certificate with neither OU is PERMISSION_DENIED, even for Ping."""
        self.assertCode(
            grpc.StatusCode.PERMISSION_DENIED,
            self.unary,
            self.s,
            "Ping",
            pb.PingRequest(),
            tls_context("other"),
        )

    def test_no_identity_unauthenticated(self):
        """TLS without a client certificate and plaintext from a remote peer are UNAUTHENTICATED."""
        for ctx in (
            FakeContext(peer="ipv4:10.0.0.1:5", auth={"transport_security_type": [b"ssl"]}),
            FakeContext(peer="ipv4:10.0.0.1:5"),
        ):
            self.assertCode(
                grpc.StatusCode.UNAUTHENTICATED, self.unary, self.s, "Ping", pb.PingRequest(), ctx
            )

    def test_loopback_plaintext_is_admin(self):
        """Plaintext callers on loopback are trusted like the Unix socket."""
        for peer in ("ipv4:127.0.0.1:5", "ipv6:[::1]:5", "ipv6:%5B::1%5D:5"):
            r = self.unary(
                self.s, "DeleteJob", pb.DeleteJobRequest(job_uuid="nothing"), FakeContext(peer=peer)
            )
            self.assertTrue(r.success)


class ConcurrencyTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.add_logs(JOB, 1, [(i, i, b"x") for i in range(1, 6)])
        self.s = self.make(max_concurrent_rpcs=2)

    def test_limit_excludes_ping(self):
        """Beyond the limit RPCs get RESOURCE_EXHAUSTED while Ping still answers."""
        held = []
        for _ in range(2):
            ctx = FakeContext()
            gen = self.s.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), ctx)
            next(gen)  # the handler is now running and holds a slot
            held.append((gen, ctx))
        self.assertEqual(self.s.active_rpcs, 2)
        self.assertCode(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            self.stream,
            self.s,
            "QueryLogs",
            pb.QueryLogsRequest(job_uuid=JOB),
        )
        self.assertCode(
            grpc.StatusCode.RESOURCE_EXHAUSTED, self.unary, self.s, "GetStats", pb.GetStatsRequest()
        )
        self.assertTrue(self.unary(self.s, "Ping", pb.PingRequest()).healthy)
        # Finishing one stream frees its slot.
        self.assertEqual(len(list(held[0][0])), 4)
        self.assertEqual(self.s.active_rpcs, 1)
        self.unary(self.s, "GetStats", pb.GetStatsRequest())
        held[1][0].close()
        self.assertEqual(self.s.active_rpcs, 0)
        self.assertIn(("QueryLogs", "CANCELLED"), self.metrics.queries)
        self.assertIn(("QueryLogs", "RESOURCE_EXHAUSTED"), self.metrics.queries)

    def test_terminated_rpc_frees_its_slot(self):
        """An RPC that ends while its handler is suspended (grpc stops pulling) frees its slot."""
        ctx = FakeContext()
        gen = self.s.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), ctx)
        next(gen)
        self.assertEqual(self.s.active_rpcs, 1)
        ctx.terminate()
        self.assertEqual(self.s.active_rpcs, 0)
        gen.close()
        self.assertEqual(self.s.active_rpcs, 0)

    def test_call_ended_before_admission_frees_its_slot(self):
        """When the RPC already ended before the handler registered its slot's release
        (add_callback returns False: the deadline passed while it queued), the slot is given
        back at once and the handler does not run."""

        class Ended(FakeContext):
            def add_callback(self, callback):
                return False

            def is_active(self):
                return False

        self.assertCode(
            grpc.StatusCode.CANCELLED, self.stream, self.s, "QueryLogs",
            pb.QueryLogsRequest(job_uuid=JOB), Ended(),
        )
        self.assertCode(
            grpc.StatusCode.CANCELLED, self.unary, self.s, "GetStats", pb.GetStatsRequest(),
            Ended(),
        )
        self.assertEqual(self.s.active_rpcs, 0)

    def test_abandon_reads_cancels_running_reads(self):
        """Once the server's stop abandons reads, the ``cancelled`` callable that every read
        got returns True even though the call still looks active, so a read that checks it
        stops; before that it is False."""
        seen = []
        real = self.storage.snapshot

        def snapshot(job_id):
            snap = real(job_id)
            inner = snap.iter_logs

            def iter_logs(*args, cancelled, **kw):
                seen.append(cancelled)
                return inner(*args, cancelled=cancelled, **kw)

            snap.iter_logs = iter_logs
            snap.iter_log_chunks = None
            return snap

        self.storage.snapshot = snapshot
        ctx = FakeContext()
        gen = self.s.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), ctx)
        next(gen)
        self.assertEqual(len(seen), 1)
        self.assertFalse(seen[0]())
        self.s.abandon_reads()
        self.assertTrue(seen[0]())
        self.assertTrue(ctx.is_active())
        gen.close()
        self.assertEqual(self.s.active_rpcs, 0)

    def test_unary_slot_released(self):
        """Unary RPCs release their slot whether they succeed or fail."""
        self.unary(self.s, "GetStats", pb.GetStatsRequest())
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.unary,
            self.s,
            "GetJobInfo",
            pb.GetJobInfoRequest(job_uuid="missing"),
        )
        self.assertEqual(self.s.active_rpcs, 0)


class FakeStorageTests(SynchronousTestCase):
    """The fake keeps the storage contract others' tests rely on."""

    def test_snapshots_are_immutable(self):
        """A snapshot taken before an append does not see the appended data."""
        s = FakeStorage()
        self.successResultOf(s.append_logs(log_batch("j", 1, [(1, 1, b"a")])))
        snap = s.snapshot("j")
        self.successResultOf(s.append_logs(log_batch("j", 1, [(2, 2, b"b")])))
        self.assertEqual([r.content for r in snap.iter_logs(0)], [b"a"])
        self.assertEqual([r.content for r in s.snapshot("j").iter_logs(0)], [b"a", b"b"])
        self.assertEqual(snap.info.log_count, 1)

    def test_arrival_order_across_out_of_order_appends(self):
        """Streams merge by arrival ordinal even when a later batch is appended first."""
        s = FakeStorage()
        self.successResultOf(s.append_logs(log_batch("j", 2, [(1, 2, b"e")], arrivals=[2])))
        self.successResultOf(
            s.append_logs(log_batch("j", 1, [(1, 1, b"o1"), (1, 3, b"o2")], arrivals=[1, 3]))
        )
        self.assertEqual([r.content for r in s.snapshot("j").iter_logs(0)], [b"o1", b"e", b"o2"])

    def test_rejects_bad_input(self):
        """Bad job ids, streams and paging are refused as the contract says."""
        s = FakeStorage()
        self.failureResultOf(s.append_logs(log_batch("../x", 1, [(1, 1, b"a")])), ValueError)
        self.failureResultOf(s.append_logs(log_batch("j", 0, [(1, 1, b"a")])), ValueError)
        self.successResultOf(s.append_logs(log_batch("j", 1, [(1, 1, b"a")])))
        snap = s.snapshot("j")
        self.assertRaises(ValueError, snap.iter_logs, 3)
        self.assertRaises(ValueError, snap.iter_logs, 0, 0, 0, -1)
        self.assertRaises(ValueError, snap.iter_metrics, 0, 0, 0, -1)

    def test_skips_members_outside_the_request(self):
        """Members outside the range or before the offset are skipped, not inflated."""
        s = FakeStorage()
        for i in range(4):
            self.successResultOf(s.append_logs(log_batch("j", 1, [(i * 10 + 1, i, b"x")] * 2)))
        stats = ReadStats()
        out = list(s.snapshot("j").iter_logs(1, 11, 0, 1, 2, stats=stats))
        self.assertEqual(len(out), 2)
        self.assertEqual((stats.members_inflated, stats.members_skipped), (2, 2))

    def test_evict_and_open(self):
        """An evicted job's snapshot is gone until open_job loads it; unknown jobs open as None."""
        s = FakeStorage()
        self.successResultOf(s.append_logs(log_batch("j", 1, [(1, 1, b"a")])))
        s.evict("j")
        self.assertIsNone(s.snapshot("j"))
        self.assertIsNotNone(s.job_info("j"))
        snap = self.successResultOf(s.open_job("j"))
        self.assertIs(s.snapshot("j"), snap)
        self.assertIsNone(self.successResultOf(s.open_job("k")))
        self.assertGreater(self.successResultOf(s.delete_job("j")), 0)
        self.assertEqual(self.successResultOf(s.delete_job("j")), 0)
        self.assertEqual(s.list_jobs(), ())


class PrometheusTests(ServicerMixin, SynchronousTestCase):
    def test_servicer_drives_persist_metrics(self):
        """The servicer's metric calls fit PersistMetrics: requests by rpc and code, members."""
        from prometheus_client import CollectorRegistry

        from joblet_persist.metrics import PersistMetrics

        registry = CollectorRegistry()
        s = self.make(metrics=PersistMetrics(registry, process=False))
        self.add_logs(JOB, 1, [(1, 1, b"x")])
        self.unary(s, "Ping", pb.PingRequest())
        self.stream(s, "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB))
        self.assertRaises(
            Aborted, self.stream, s, "QueryLogs", pb.QueryLogsRequest(job_uuid="../x")
        )

        def value(name, **labels):
            return registry.get_sample_value(name, labels)

        self.assertEqual(value("persist_query_requests_total", rpc="Ping", code="OK"), 1)
        self.assertEqual(value("persist_query_requests_total", rpc="QueryLogs", code="OK"), 1)
        self.assertEqual(
            value("persist_query_requests_total", rpc="QueryLogs", code="INVALID_ARGUMENT"), 1
        )
        self.assertEqual(value("persist_query_members_total", result="inflated"), 1)
        self.assertEqual(value("persist_query_duration_seconds_count", rpc="QueryLogs"), 2)


class _MidReadContext(FakeContext):
    """A context that runs ``action`` the first time the read checks it: a deletion that
    happens after the RPC took its snapshot and before it read the data."""

    def __init__(self, action):
        super().__init__()
        self._action = action

    def is_active(self) -> bool:
        action, self._action = self._action, None
        if action is not None:
            action()
        return super().is_active()


class SeamErrorTests(ServicerMixin, SynchronousTestCase):
    """The storage seam's errors map to status codes in the servicer's one mapping place."""

    def setUp(self):
        super().setUp()
        self.storage = FakeStorage(now=lambda: self.now[0], segment_max_bytes=1)
        self.add_logs(JOB, 1, [(100, 1, b"a")])
        self.add_logs(JOB, 1, [(200, 2, b"b")])
        self.add_metrics(JOB, [(300, 1, {"cpu_usage": 1.0})])
        self.s = self.make()

    def test_job_deleted_during_read_is_not_found(self):
        """DataVanished for a job that is gone maps to NOT_FOUND, for logs and metrics."""
        for rpc, request in (
            ("QueryLogs", pb.QueryLogsRequest(job_uuid=JOB)),
            ("QueryLogsBatched", pb.QueryLogsRequest(job_uuid=JOB)),
            ("QueryMetrics", pb.QueryMetricsRequest(job_uuid=JOB)),
        ):
            self.setUp()
            ctx = _MidReadContext(lambda: self.storage.delete_job(JOB))
            details = self.assertCode(grpc.StatusCode.NOT_FOUND, self.stream, self.s, rpc,
                                      request, ctx)
            self.assertIn("deleted during the read", details)
            self.assertEqual(self.metrics.queries[-1], (rpc, "NOT_FOUND"))

    def test_segment_dropped_during_read_is_aborted(self):
        """DataVanished while the job still exists (retention dropped a segment) maps to
        ABORTED: a retry reads what is left."""
        ctx = _MidReadContext(lambda: self.storage.drop_segment(JOB, "stdout", 0))
        details = self.assertCode(grpc.StatusCode.ABORTED, self.stream, self.s, "QueryLogs",
                                  pb.QueryLogsRequest(job_uuid=JOB), ctx)
        self.assertIn("retry the query", details)
        self.assertEqual(
            [line.content for line in self.stream(self.s, "QueryLogs",
                                                  pb.QueryLogsRequest(job_uuid=JOB))],
            [b"b"],
        )

    def test_storage_unavailable_is_unavailable(self):
        """StorageUnavailable (the backend cannot delete now) maps to UNAVAILABLE with its
        cause, not INTERNAL, and nothing is logged as an internal error."""
        self.storage.fail_deletes.add(JOB)
        details = self.assertCode(grpc.StatusCode.UNAVAILABLE, self.unary, self.s, "DeleteJob",
                                  pb.DeleteJobRequest(job_uuid=JOB))
        self.assertIn("permission denied", details)
        self.assertIn("DeleteJob", details)
        self.assertEqual(self.metrics.queries[-1], ("DeleteJob", "UNAVAILABLE"))

    def test_bulk_reads_used_when_provided(self):
        """A snapshot providing IBulkLogReads is read through iter_log_chunks, with the same
        lines as iter_logs gives; one without it through iter_logs."""
        from tests.fakes import FakeBulkSnapshot

        plain = self.stream(self.s, "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB))
        chunked = []
        original = FakeBulkSnapshot.iter_log_chunks

        def recording(snap, *args, **kwargs):
            chunked.append(args)
            return original(snap, *args, **kwargs)

        self.patch(FakeBulkSnapshot, "iter_log_chunks", recording)
        self.storage = FakeStorage(now=lambda: self.now[0], bulk_reads=True)
        self.add_logs(JOB, 1, [(100, 1, b"a")])
        self.add_logs(JOB, 1, [(200, 2, b"b")])
        bulk = self.stream(self.make(), "QueryLogs", pb.QueryLogsRequest(job_uuid=JOB))
        self.assertEqual(bulk, plain)
        self.assertEqual(len(chunked), 1)
