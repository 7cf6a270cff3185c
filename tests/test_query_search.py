"""Tests for the SearchLogs and AggregateMetrics RPCs of PersistServicer (fake context)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics

import grpc
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import aggregate
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.storage.api import JobInfo
from joblet_persist.storage.snapshot import LocalJobSnapshot
from tests.fakes import FakeContext
from tests.test_query import JOB, ServicerMixin, tls_context
from tests.test_storage_reader import JobWriter

OTHER = "0b7d-other-job"


def lines_of(responses) -> list:
    return [(line.job_uuid, line.stream, line.timestamp, line.sequence, line.content)
            for r in responses for line in r.lines]


class LocalSnapshots:
    """Just enough of a backend to serve LocalJobSnapshots of real segment files."""

    def __init__(self, snaps: dict):
        self.snaps = snaps

    def snapshot(self, job_id):
        return self.snaps.get(job_id)

    def job_info(self, job_id):
        snap = self.snaps.get(job_id)
        return snap.info if snap else None

    def list_jobs_page(self, since, until, offset, limit):
        infos = sorted((s.info for s in self.snaps.values()),
                       key=lambda i: (-i.created_at, i.job_id))
        infos = [i for i in infos if (since <= 0 or i.created_at >= since)
                 and (until <= 0 or i.created_at <= until)]
        return len(infos), infos[offset:offset + limit if limit else None]

    def open_job(self, job_id):
        return None

    def delete_job(self, job_id):
        raise AssertionError("not called")


class SearchFakeStorageTests(ServicerMixin, SynchronousTestCase):
    """SearchLogs over a backend without ILogSearch (message by message)."""

    def setUp(self):
        super().setUp()
        self.add_logs(JOB, 1, [(10, 1, b"boot ok\n"), (20, 2, b"ERROR disk\n"),
                               (30, 3, b"error net\n")])
        self.add_logs(JOB, 2, [(25, 1, b"Error: x\n")])
        self.now[0] += 10
        self.add_logs(OTHER, 1, [(40, 1, b"an error\n"), (50, 2, b"fine\n")])

    def search(self, context=None, **kw):
        return self.stream(self.make(), "SearchLogs", pb.SearchLogsRequest(**kw), context)

    def test_one_job_in_arrival_order(self):
        """Matches of one job come in arrival order across both streams, each the whole
        stored message with its stream, timestamp, sequence and job id."""
        got = lines_of(self.search(job_uuid=JOB, pattern="error", ignore_case=True))
        self.assertEqual(got, [(JOB, 1, 20, 2, b"ERROR disk\n"), (JOB, 1, 30, 3, b"error net\n"),
                               (JOB, 2, 25, 1, b"Error: x\n")])

    def test_stream_time_range_offset_limit(self):
        """stream, the inclusive time range, then offset and limit over the matches."""
        got = lines_of(self.search(job_uuid=JOB, pattern="e", stream=1, start_time=20,
                                   end_time=30, ignore_case=True))
        self.assertEqual([g[2] for g in got], [20, 30])
        got = lines_of(self.search(job_uuid=JOB, pattern="r", ignore_case=True, offset=1,
                                   limit=2))
        self.assertEqual([g[2] for g in got], [30, 25])

    def test_all_jobs_names_the_job_of_each_match(self):
        """all_jobs searches every job, newest created first, naming each match's job."""
        got = lines_of(self.search(all_jobs=True, pattern="error"))
        self.assertEqual([(g[0], g[4]) for g in got],
                         [(OTHER, b"an error\n"), (JOB, b"error net\n")])
        since = int(self.now[0])
        got = lines_of(self.search(all_jobs=True, pattern="error", jobs_since=since))
        self.assertEqual([g[0] for g in got], [OTHER])

    def test_offset_and_limit_span_jobs(self):
        """offset and limit count matches across the jobs searched."""
        got = lines_of(self.search(all_jobs=True, pattern="e", offset=1, limit=2))
        self.assertEqual([(g[0], g[2]) for g in got], [(OTHER, 50), (JOB, 30)])

    def test_summary_and_count_only(self):
        """The last message carries the summary; count_only sends no lines."""
        responses = self.search(all_jobs=True, pattern="error", ignore_case=True,
                                count_only=True)
        self.assertEqual(lines_of(responses), [])
        summary = responses[-1].summary
        self.assertEqual((summary.matches, summary.jobs_searched), (4, 2))
        self.assertGreater(summary.bytes_scanned, 0)

    def test_invalid_requests(self):
        """A bad pattern, stream, range, or job choice is INVALID_ARGUMENT naming it; an
        unknown job NOT_FOUND."""
        s = self.make()
        cases = [
            (dict(job_uuid=JOB, pattern="(", regex=True), "missing )"),
            (dict(job_uuid=JOB, pattern="x", stream=7), "invalid stream 7"),
            (dict(job_uuid=JOB, pattern="x", start_time=5, end_time=1), "inverted range"),
            (dict(job_uuid=JOB, pattern="x", all_jobs=True), "not both"),
            (dict(job_uuid="../x", pattern="x"), "../x"),
            (dict(job_uuid=JOB, pattern="x", max_scan_bytes=-1), "max_scan_bytes"),
        ]
        for kw, text in cases:
            details = self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.stream, s,
                                      "SearchLogs", pb.SearchLogsRequest(**kw))
            self.assertIn(text, details)
        details = self.assertCode(grpc.StatusCode.NOT_FOUND, self.stream, s, "SearchLogs",
                                  pb.SearchLogsRequest(job_uuid="nosuchjob", pattern="x"))
        self.assertIn("nosuchjob", details)

    def test_viewer_may_search_and_aggregate(self):
        """A viewer certificate may call SearchLogs and AggregateMetrics."""
        got = lines_of(self.search(context=tls_context("viewer"), job_uuid=JOB, pattern="boot"))
        self.assertEqual(len(got), 1)
        self.add_metrics(JOB, [(10, 1, {"cpu_usage": 1.0})])
        r = self.unary(self.make(), "AggregateMetrics",
                       pb.AggregateMetricsRequest(job_uuid=JOB), tls_context("viewer"))
        self.assertEqual(r.samples, 1)

    def test_scan_bound_ends_with_resource_exhausted(self):
        """max_scan_bytes bounds the raw bytes scanned: the matches found are sent, then
        RESOURCE_EXHAUSTED names the bound and where to resume."""
        s = self.make()
        sent = []
        gen = s.SearchLogs(pb.SearchLogsRequest(job_uuid=JOB, pattern="o", stream=1,
                                                max_scan_bytes=12), FakeContext())
        details = self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  lambda: [sent.append(r) for r in gen])
        self.assertEqual(lines_of(sent), [(JOB, 1, 10, 1, b"boot ok\n")])
        self.assertIn("limit of 12 bytes", details)
        self.assertIn(f"in job {JOB}", details)
        self.assertIn("start_time=20", details)


class SearchLocalSnapshotTests(ServicerMixin, SynchronousTestCase):
    """SearchLogs over LocalJobSnapshots (ILogSearch: the member scan, through submit)."""

    def setUp(self):
        super().setUp()
        d = self.mktemp()
        os.makedirs(d)
        self.snaps = {}
        for n, job in enumerate((JOB, OTHER)):
            os.makedirs(os.path.join(d, job))
            w = JobWriter(os.path.join(d, job))
            for b in range(6):
                w.logs(1, [(100 + b, b * 3 + i, b"%s line %d.%d\n" % (job[:4].encode(), b, i))
                           for i in range(3)])
                w.logs(2, [(100 + b, b, b"warning %d\n" % b)])
            info = JobInfo(job, 1000 + n, 1000 + n, 24, 0, 0, 100, 105)
            streams = w.streams()
            self.snaps[job] = LocalJobSnapshot(job, info, streams[1], streams[2], ())
        self.storage = LocalSnapshots(self.snaps)
        self.submitted = 0

    def submit(self, fn, *args):
        from concurrent.futures import Future

        self.submitted += 1
        f = Future()
        f.set_result(fn(*args))
        return f

    def test_member_scan_through_the_pool(self):
        """The servicer hands each member to its submit and returns the matches in order."""
        s = self.make(search_submit=self.submit)
        got = lines_of(self.stream(s, "SearchLogs", pb.SearchLogsRequest(
            job_uuid=JOB, pattern=r"line [24]\.1", regex=True)))
        self.assertEqual([g[4] for g in got], [b"3f2a line 2.1\n", b"3f2a line 4.1\n"])
        self.assertEqual(self.submitted, 12)

    def test_all_jobs_and_byte_bound_across_jobs(self):
        """The byte bound counts over every job searched; the message names the job where
        the search stopped."""
        s = self.make(search_submit=self.submit)
        request = pb.SearchLogsRequest(all_jobs=True, pattern="warning 5")
        got = lines_of(self.stream(s, "SearchLogs", request))
        self.assertEqual([g[0] for g in got], [OTHER, JOB])
        per_job = sum(m.raw_size for v in self.snaps[JOB].stdout + self.snaps[JOB].stderr
                      for m in v.members)
        s = self.make(search_submit=self.submit, search_max_bytes=per_job + 5)
        details = self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stream, s,
                                  "SearchLogs", request)
        self.assertIn(f"in job {JOB}", details)

    def test_time_bound(self):
        """query.searchMaxTime: past it no further member is started (RESOURCE_EXHAUSTED)."""
        now = [0.0]

        def clock():
            now[0] += 1.0
            return now[0]

        s = self.make(search_submit=self.submit, search_max_seconds=3.0, clock=clock)
        details = self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stream, s,
                                  "SearchLogs", pb.SearchLogsRequest(job_uuid=JOB, pattern="x"))
        self.assertIn("time", details)

    def test_client_cancel_stops_the_scan(self):
        """A call that ends (cancel, deadline) stops the scan before the next member."""
        s = self.make(search_submit=self.submit)
        ctx = FakeContext(active_for=3)
        self.stream(s, "SearchLogs", pb.SearchLogsRequest(job_uuid=JOB, pattern="line"), ctx)
        self.assertLess(self.submitted, 4)


# -- aggregation ------------------------------------------------------------------------------

SAMPLES = st.lists(
    st.tuples(
        st.integers(0, 60 * 10**9),
        st.floats(0, 400, allow_nan=False, width=32),
        st.integers(0, 2**40),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=40,
)


def naive(samples, step, field):
    """Every function of ``field`` per bucket, computed the obvious way from the samples
    (in arrival order): lists per bucket, sorted for percentiles, deltas for the rate."""
    get = aggregate._getter(field)
    buckets: dict = {}
    for ts, data in samples:
        buckets.setdefault(ts - ts % step, []).append(get(data))
    deltas: dict = {}
    for (t0, d0), (t1, d1) in itertools.pairwise(samples):
        if t1 > t0:
            v0, v1 = get(d0), get(d1)
            inc = v1 - v0 if v1 >= v0 else v1
            deltas.setdefault(t1 - t1 % step, []).append((inc, (t1 - t0) / 1e9))
    out = {}
    for key, values in buckets.items():
        r = {"count": len(values), "sum": sum(values), "min": min(values), "max": max(values),
             "last": values[-1], "avg": sum(values) / len(values)}
        for name, p in (("p50", 50), ("p95", 95), ("p99", 99)):
            r[name] = (values[0] if len(values) == 1 else
                       statistics.quantiles(values, n=100, method="inclusive")[p - 1])
        d = deltas.get(key, [])
        seconds = sum(s for _i, s in d)
        r["rate"] = sum(i for i, _s in d) / seconds if seconds > 0 else None
        out[key] = r
    return out


class AggregateTests(ServicerMixin, SynchronousTestCase):
    def request(self, **kw):
        return self.unary(self.make(), "AggregateMetrics",
                          pb.AggregateMetricsRequest(job_uuid=JOB, **kw))

    @given(SAMPLES, st.sampled_from([10**9, 7 * 10**9, 60 * 10**9]))
    def test_every_function_equals_the_naive_computation(self, rows, step):
        """For every field and function, each bucket's value equals a naive computation
        over the same samples (counters' rate included, with resets); float sums (and their
        averages) and rates to within rounding, everything else exactly."""
        samples = [(ts, {"cpu_usage": cpu, "memory_usage": mem,
                         "disk_io": {"read_bytes": rb}, "network_io": {"rx_bytes": mem}})
                   for ts, cpu, mem, rb in rows]
        agg = aggregate.Aggregator(step, aggregate.FIELDS, aggregate.FUNCTIONS)
        for ts, data in samples:
            agg.add(ts, data)
        points = agg.points()
        for i, field in enumerate(aggregate.FIELDS):
            want = naive(samples, step, field)
            self.assertEqual([p[0] for p in points], sorted(want))
            for key, count, stats in points:
                self.assertEqual(count, want[key]["count"])
                for function in aggregate.FUNCTIONS:
                    got = stats[i].result(function)
                    expected = want[key][function]
                    if function == "rate" and field not in aggregate.COUNTERS:
                        continue
                    float_sum = function in ("sum", "avg") and field in ("cpu_usage", "gpu_usage")
                    if (function == "rate" or float_sum) and expected is not None:
                        # A bucket revisited out of time order adds its runs' sums.
                        self.assertTrue(math.isclose(got, expected, rel_tol=1e-12),
                                        (field, function, got, expected))
                    else:
                        self.assertEqual(got, expected, (field, function))

    def test_rpc_answer(self):
        """The RPC returns epoch-aligned buckets oldest first with the requested functions
        and fields; rate only for counters, with has_rate."""
        s = 10**9
        self.add_metrics(JOB, [(s * t, t, {"cpu_usage": float(t), "disk_io": {"read_bytes": 100 * t}})
                               for t in (5, 9, 12, 19, 21)])
        r = self.request(step_ns=10 * s, functions=["avg", "max", "count", "rate", "p50"],
                         fields=["cpu_usage", "disk_io.read_bytes"])
        self.assertEqual((r.step_ns, r.samples), (10 * s, 5))
        self.assertEqual(list(r.fields), ["cpu_usage", "disk_io.read_bytes"])
        self.assertEqual([(p.timestamp, p.count) for p in r.points],
                         [(0, 2), (10 * s, 2), (20 * s, 1)])
        cpu, disk = r.points[1].values
        self.assertEqual((cpu.field, cpu.avg, cpu.max, cpu.count, cpu.p50), ("cpu_usage", 15.5, 19, 2, 15.5))
        self.assertFalse(cpu.has_rate)
        self.assertTrue(disk.has_rate)
        self.assertEqual(disk.rate, 100.0)
        self.assertEqual(disk.min, 0)  # not requested

    def test_auto_step_and_range(self):
        """step 0 picks the smallest nice step giving at most max_points buckets over the
        range (or the job's span); the range bounds the samples."""
        s = 10**9
        self.add_metrics(JOB, [(s * t, t, {"cpu_usage": 1.0}) for t in range(1, 3601, 10)])
        r = self.request(max_points=10)
        self.assertEqual(r.step_ns, 600 * s)
        r = self.request(start_time=100 * s, end_time=200 * s)
        self.assertEqual(r.step_ns, s)
        self.assertEqual(r.samples, 10)
        self.assertEqual(aggregate.auto_step(0, 100), s)
        self.assertEqual(aggregate.auto_step(30 * 86400 * s, 2), 21 * 86400 * s)

    def test_invalid_requests(self):
        """Unknown fields or functions, a negative step, too many points: INVALID_ARGUMENT
        naming the problem."""
        self.add_metrics(JOB, [(10**9, 1, {"cpu_usage": 1.0}), (10**12, 2, {"cpu_usage": 1.0})])
        s = self.make(aggregate_max_points=50)
        for kw, text in [(dict(fields=["cpu"]), "unknown field 'cpu'"),
                         (dict(functions=["median"]), "unknown function 'median'"),
                         (dict(step_ns=-1), "negative"),
                         (dict(step_ns=10**9), "query.aggregateMaxPoints"),
                         (dict(max_points=51), "max_points 51")]:
            details = self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.unary, s,
                                      "AggregateMetrics",
                                      pb.AggregateMetricsRequest(job_uuid=JOB, **kw))
            self.assertIn(text, details)
        self.assertCode(grpc.StatusCode.NOT_FOUND, self.unary, s, "AggregateMetrics",
                        pb.AggregateMetricsRequest(job_uuid="nosuchjob"))


class MetricLinesParseTests(SynchronousTestCase):
    """reader._parse_lines (one json.loads per member) agrees with parsing line by line."""

    @given(st.lists(st.one_of(
        st.dictionaries(st.sampled_from(["cpu_usage", "memory_usage", "x"]),
                        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=3)),
                        max_size=3).map(lambda d: json.dumps({"timestamp": 1, "data": d})),
        st.sampled_from(['{"data": 5}', "[1]", "{bad", '{"data": {}} {"data": {}}', "",
                         '{"data": {"a": "x\\ny"}}']),
    ), max_size=6))
    def test_bulk_equals_line_by_line(self, lines):
        """For any lines, the bulk parse gives each line's ``data`` object exactly when every
        line is a JSON object with a data object, and None (line-by-line parsing) otherwise."""
        from joblet_persist.storage.reader import _parse_lines

        raw = [line.encode() + b"\n" for line in lines]
        data = b"".join(raw)
        bounds = list(itertools.accumulate(map(len, raw), initial=0))
        expected = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                expected = None
                break
            if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
                expected = None
                break
            expected.append(obj["data"])
        self.assertEqual(_parse_lines(data, bounds[:-1], bounds[1:], 0), expected)

    def test_member_with_a_bad_line_is_skipped_whole(self):
        """A metric member holding a line that does not parse is counted corrupt and
        skipped; the members around it are read."""
        from joblet_persist.storage import format as fmt
        from joblet_persist.storage.api import ReadStats
        from joblet_persist.storage.reader import SegmentView, iter_metrics
        from joblet_persist.storage.segment import thd_append
        from tests.test_storage_reader import COMP

        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "metrics.jsonl.gz")
        members, size = [], 0
        for b, bad in enumerate((False, True, False)):
            lines = [b'{"timestamp":%d,"data":{"cpu_usage":%d.5}}\n' % (b * 3 + i, i)
                     for i in range(3)]
            if bad:
                lines[1] = b'{"timestamp":4,"data":{"cpu_usage":\n'
            ords = [b * 3 + i for i in range(3)]
            pieces = fmt.encode_metric_members(ords, ords, ords, lines, COMP)
            for blob, info in pieces:
                members.append(dataclasses.replace(info, offset=size))
                size = thd_append(path, blob, size, False)
        stats = ReadStats()
        got = list(iter_metrics((SegmentView(path, tuple(members)),), stats=stats))
        self.assertEqual([r.timestamp for r in got], [0, 1, 2, 6, 7, 8])
        self.assertEqual(stats.corrupt_members, 1)


class AggregateLocalSnapshotTests(ServicerMixin, SynchronousTestCase):
    """AggregateMetrics over LocalJobSnapshots of real metric members."""

    def test_stored_lines_are_read_without_json(self):
        """The writer's metric lines are aggregated without json.loads (the columnar C
        scan of the asked fields, where the time of an aggregation used to go), with the
        values the lines hold."""
        from unittest import mock

        from joblet_persist.storage.reader import SegmentView

        try:
            import joblet_persist._speedups  # noqa: F401
        except ImportError:
            self.skipTest("joblet_persist._speedups is not built")
        d = self.mktemp()
        os.makedirs(os.path.join(d, JOB))
        w = JobWriter(os.path.join(d, JOB))
        for b in range(3):
            w.metrics([(t * 10**9, t, t / 4) for t in range(b * 5, b * 5 + 5)])
        views = tuple(SegmentView(p, tuple(ms)) for p, ms in w.views["metrics"])
        info = JobInfo(JOB, 1000, 1000, 0, 15, 0, 0, 14 * 10**9)
        self.storage = LocalSnapshots({JOB: LocalJobSnapshot(JOB, info, (), (), views)})
        with mock.patch.object(json, "loads", side_effect=AssertionError("json.loads called")):
            r = self.unary(self.make(), "AggregateMetrics", pb.AggregateMetricsRequest(
                job_uuid=JOB, step_ns=5 * 10**9, fields=["cpu_usage"],
                functions=["sum", "max", "count"]))
        self.assertEqual([(p.timestamp, p.values[0].sum, p.values[0].max, p.values[0].count)
                          for p in r.points],
                         [(0, 2.5, 1.0, 5), (5 * 10**9, 8.75, 2.25, 5), (10 * 10**9, 15.0, 3.5, 5)])
