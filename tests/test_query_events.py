"""The seven Query*Events RPCs and QueryEventsBatched, called directly with a fake context
over FakeStorage (the servicer's reactor is an ImmediateReactor)."""

from __future__ import annotations

import grpc
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import events
from joblet_persist._proto import persist_pb2 as pb
from tests.fakes import FakeContext
from tests.storage_contract import event_batch, event_payload
from tests.test_events import IPC, SAMPLES, encode_event
from tests.test_query import BAD_IDS, JOB, ServicerMixin, tls_context


class EventQueryTests(ServicerMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.arrival = 0
        for t in range(3, 10):
            self.add_events(JOB, IPC[t][0], [(100 * i, i, encode_event(t, SAMPLES[t], ts=9))
                                             for i in range(1, 6)])
        self.s = self.make()

    def add_events(self, job, kind, rows):
        rows = [(ts, seq, self.arrival + i, p) for i, (ts, seq, p) in enumerate(rows)]
        self.arrival += len(rows)
        self.successResultOf(self.storage.append_events(event_batch(job, kind, rows)))

    def query(self, rpc, context=None, **kw):
        return self.stream(self.s, rpc, pb.QueryTelemetryRequest(job_uuid=JOB, **kw), context)

    def test_every_rpc_returns_its_kind(self):
        """Each Query*Events RPC streams its kind's messages in arrival order, with the
        job, timestamp and sequence stored and the fields of the payload; SocketDataEvent
        in the query layout (dst_addr, dst_port)."""
        for kind in events.KINDS:
            got = self.query(kind.rpc)
            self.assertEqual([type(m) for m in got], [kind.persist_class] * 5, kind.rpc)
            self.assertEqual([(m.timestamp, m.sequence) for m in got],
                             [(100 * i, i) for i in range(1, 6)])
            self.assertEqual(got[0].job_uuid, JOB)
            self.assertEqual(got[0].pid, SAMPLES[kind.msg_type]["pid"])
        sock = self.query("QuerySocketDataEvents")[0]
        self.assertEqual((sock.dst_addr, sock.dst_port, sock.bytes), ("93.184.216.34", 443, 517))
        self.assertEqual(list(self.query("QueryExecEvents")[0].args), SAMPLES[3]["args"])
        self.assertEqual(self.metrics.queries[-1], ("QueryExecEvents", "OK"))

    def test_range_offset_limit(self):
        """Inclusive range on bounds > 0, then offset, then limit; node_id is ignored."""
        got = self.query("QueryMmapEvents", start_time=200, end_time=400, offset=1, limit=1,
                         node_id="elsewhere")
        self.assertEqual([m.timestamp for m in got], [300])
        self.assertEqual([m.timestamp for m in self.query("QueryMmapEvents", start_time=-5)],
                         [100, 200, 300, 400, 500])

    def test_unknown_job_and_missing_kind(self):
        """An unknown job is NOT_FOUND; a known job without events of a kind is an empty
        stream; bad ids and requests are INVALID_ARGUMENT."""
        details = self.assertCode(grpc.StatusCode.NOT_FOUND, self.stream, self.s,
                                  "QueryFileEvents", pb.QueryTelemetryRequest(job_uuid="nope"))
        self.assertIn("nope", details)
        self.add_logs("logs-only", 1, [(1, 1, b"x")])
        self.assertEqual(self.stream(self.s, "QueryFileEvents",
                                     pb.QueryTelemetryRequest(job_uuid="logs-only")), [])
        for bad in BAD_IDS:
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.stream, self.s,
                            "QueryExecEvents", pb.QueryTelemetryRequest(job_uuid=bad))
        for kw in (dict(limit=-1), dict(offset=-1), dict(start_time=5, end_time=4)):
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT,
                            lambda kw=kw: self.query("QueryExecEvents", **kw))

    def test_viewer_may_query_and_other_ou_may_not(self):
        """Roles as for QueryLogs: a viewer may query events, another OU may not."""
        self.assertEqual(len(self.query("QueryConnectEvents", tls_context("viewer"))), 5)
        self.assertCode(grpc.StatusCode.PERMISSION_DENIED, self.query, "QueryConnectEvents",
                        tls_context("other"))

    def test_cancel_and_concurrency_limit(self):
        """A cancelled client stops the read (CANCELLED); beyond the concurrency limit an
        events query is RESOURCE_EXHAUSTED; stopping refuses it with UNAVAILABLE."""
        self.assertLessEqual(len(self.query("QueryExecEvents", FakeContext(active_for=2))), 2)
        self.assertEqual(self.metrics.queries[-1], ("QueryExecEvents", "CANCELLED"))
        s = self.make(max_concurrent_rpcs=1)
        held = s.QueryFileEvents(pb.QueryTelemetryRequest(job_uuid=JOB), FakeContext())
        next(held)
        self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stream, s, "QueryExecEvents",
                        pb.QueryTelemetryRequest(job_uuid=JOB))
        held.close()
        self.assertEqual(s.active_rpcs, 0)
        s.set_stopping()
        self.assertCode(grpc.StatusCode.UNAVAILABLE, self.stream, s, "QueryExecEvents",
                        pb.QueryTelemetryRequest(job_uuid=JOB))

    def test_batched_equals_per_kind_rpc(self):
        """QueryEventsBatched returns the per-kind RPC's messages, in batches of at most
        batch_max_items, with the kind set and only that kind's field filled."""
        s = self.make(batch_max_items=2)
        for kind in events.KINDS:
            request = pb.QueryEventsBatchedRequest(job_uuid=JOB, kind=kind.msg_type, offset=1)
            batches = self.stream(s, "QueryEventsBatched", request)
            self.assertEqual([len(getattr(b, kind.batch_field)) for b in batches], [2, 2])
            self.assertTrue(all(b.kind == kind.msg_type for b in batches))
            flat = [m for b in batches for m in getattr(b, kind.batch_field)]
            self.assertEqual(flat, self.query(kind.rpc, offset=1))
            others = [k.batch_field for k in events.KINDS if k is not kind]
            self.assertTrue(all(len(getattr(b, f)) == 0 for b in batches for f in others))

    def test_batched_byte_cap_and_bad_kind(self):
        """Batches hold at most batch_max_bytes (a larger event alone); an unspecified or
        unknown kind is INVALID_ARGUMENT."""
        size = max(m.ByteSize() for m in self.query("QueryFileEvents"))
        s = self.make(batch_max_bytes=2 * size)
        batches = self.stream(s, "QueryEventsBatched",
                              pb.QueryEventsBatchedRequest(job_uuid=JOB, kind=9))
        self.assertEqual([len(b.file_events) for b in batches], [2, 2, 1])
        for bad in (0, 2, 10, 99):
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.stream, s, "QueryEventsBatched",
                            pb.QueryEventsBatchedRequest(job_uuid=JOB, kind=bad))

    def test_counts_in_job_info_list_and_stats(self):
        """GetJobInfo, ListJobs and GetStats carry the event counts (fields 16 and 17)."""
        self.add_events("other", "exec", [(1, 1, event_payload("exec", 1, 1))])
        info = self.unary(self.s, "GetJobInfo", pb.GetJobInfoRequest(job_uuid=JOB))
        self.assertEqual(info.event_count, 35)
        self.assertEqual(dict(info.event_counts), {k.name: 5 for k in events.KINDS})
        listed = {j.job_uuid: j for j in self.unary(self.s, "ListJobs", pb.ListJobsRequest()).jobs}
        self.assertEqual(dict(listed["other"].event_counts), {"exec": 1})
        self.assertEqual(listed[JOB].event_count, 35)
        stats = self.unary(self.s, "GetStats", pb.GetStatsRequest())
        self.assertEqual(stats.total_events, 36)
        self.assertEqual(dict(stats.total_events_by_kind)["exec"], 6)
