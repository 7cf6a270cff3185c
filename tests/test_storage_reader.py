"""Tests for joblet_persist.storage.reader: query semantics and query cost."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist._proto import ipc_pb2
from joblet_persist.storage import files as files_module
from joblet_persist.storage import format as fmt
from joblet_persist.storage.api import LogRecord, MetricRecord, ReadStats
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.files import FileBudget
from joblet_persist.storage.reader import SegmentView, iter_logs, iter_metrics
from joblet_persist.storage.segment import segment_name, thd_append

COMP = make_compressor("deflate", 1)


class JobWriter:
    """Writes a job's messages the way storage does: per-stream batches, rotation.

    ``messages`` are (stream, timestamp, sequence, content) in arrival order;
    each gets the next ordinal.  Returns the streams dict for iter_logs.
    """

    def __init__(self, directory: str, per_segment: int = 10**9) -> None:
        self.dir = directory
        self.per_segment = per_segment  # members per segment before rotating
        self.views: dict = {1: [], 2: [], "metrics": []}
        self.sizes: dict = {}
        self.next_ordinal = 0

    def _append(self, key, name_kind, pieces):
        views = self.views[key]
        if not views or len(views[-1][1]) >= self.per_segment:
            path = os.path.join(self.dir, segment_name(name_kind, len(views)))
            views.append((path, []))
            self.sizes[path] = 0
        path, members = views[-1]
        off = self.sizes[path]
        for blob, info in pieces:
            members.append(dataclasses.replace(info, offset=off))
            off += len(blob)
        self.sizes[path] = thd_append(path, b"".join(b for b, _ in pieces), self.sizes[path], False)

    def logs(self, stream: int, batch: list, max_member_raw: int = fmt.DEFAULT_MEMBER_RAW):
        """Append one batch [(ts, seq, content)] of ``stream``; returns the ordinals used."""
        ords = list(range(self.next_ordinal, self.next_ordinal + len(batch)))
        self.next_ordinal += len(batch)
        pieces = fmt.encode_log_members(
            [b[0] for b in batch], [b[1] for b in batch], ords, [b[2] for b in batch], COMP,
            max_member_raw=max_member_raw,
        )  # fmt: skip
        self._append(stream, "stdout" if stream == 1 else "stderr", pieces)
        return ords

    def metrics(self, samples: list):
        """Append one batch of metric samples [(ts, seq, cpu)]."""
        lines = [
            fmt.metric_json_line(
                "job",
                ipc_pb2.Metric(
                    timestamp=ts, sequence=seq, data=ipc_pb2.MetricData(cpu_usage=cpu)
                ).SerializeToString(),
            )
            for ts, seq, cpu in samples
        ]
        ords = list(range(self.next_ordinal, self.next_ordinal + len(samples)))
        self.next_ordinal += len(samples)
        pieces = fmt.encode_metric_members(
            [s[0] for s in samples], [s[1] for s in samples], ords, lines, COMP
        )
        self._append("metrics", "metrics", pieces)

    def streams(self) -> dict:
        return {
            key: tuple(SegmentView(p, tuple(ms)) for p, ms in self.views[key]) for key in (1, 2)
        }

    def metric_segments(self) -> tuple:
        return tuple(SegmentView(p, tuple(ms)) for p, ms in self.views["metrics"])


def reference(messages, stream, start, end, offset, limit):
    """Brute-force query semantics over (stream, ts, seq, content) in arrival order."""
    out = [
        LogRecord(*m)
        for m in messages
        if (stream == 0 or m[0] == stream)
        and (start <= 0 or m[1] >= start)
        and (end <= 0 or m[1] <= end)
    ][offset:]
    return out[:limit] if limit else out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class BigJobMixin:
    """A job of 200 stdout members (50 messages each) and 100 interleaved stderr members."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        w = JobWriter(self.dir, per_segment=64)
        self.messages = []
        for b in range(200):
            out = [(1_000 + b, b * 50 + i, b"out %d.%d\n" % (b, i)) for i in range(50)]
            w.logs(1, out)
            self.messages += [(1, *m) for m in out]
            if b % 2:
                err = [(1_000 + b, i, b"err %d.%d\n" % (b, i)) for i in range(30)]
                w.logs(2, err)
                self.messages += [(2, *m) for m in err]
        self.streams = w.streams()

    def query(self, *args, **kw):
        stats = ReadStats()
        got = list(iter_logs(self.streams, *args, stats=stats, **kw))
        return got, stats


class LogCostTests(BigJobMixin, SynchronousTestCase):
    """Queries inflate only the members they return from."""

    def test_layout(self):
        """The fixture rotates into several segments per stream."""
        self.assertEqual(len(self.streams[1]), 4)
        self.assertEqual(sum(len(v.members) for v in self.streams[1]), 200)
        self.assertEqual(sum(len(v.members) for v in self.streams[2]), 100)

    def test_first_page_inflates_one_member(self):
        """limit 10 from the start inflates exactly the first member."""
        got, stats = self.query(1, limit=10)
        self.assertEqual(got, reference(self.messages, 1, 0, 0, 0, 10))
        self.assertEqual(stats.members_inflated, 1)
        self.assertEqual(stats.corrupt_members, 0)

    def test_late_offset_inflates_only_returned_members(self):
        """An offset deep into the stream skips members by count and inflates two."""
        offset = 150 * 50 + 45  # 5 records of member 150, then 5 of member 151
        got, stats = self.query(1, offset=offset, limit=10)
        self.assertEqual(got, reference(self.messages, 1, 0, 0, offset, 10))
        self.assertEqual(stats.members_inflated, 2)
        self.assertEqual(stats.members_skipped, 150)

    def test_offset_past_the_end(self):
        """An offset beyond all messages returns nothing and inflates nothing."""
        got, stats = self.query(0, offset=10**7)
        self.assertEqual(got, [])
        self.assertEqual(stats.members_inflated, 0)

    def test_narrow_time_range(self):
        """A time range inside one member inflates just that member."""
        got, stats = self.query(1, start_time=1_120, end_time=1_120)
        self.assertEqual(got, reference(self.messages, 1, 1_120, 1_120, 0, 0))
        self.assertEqual(len(got), 50)
        self.assertEqual(stats.members_inflated, 1)
        self.assertEqual(stats.members_skipped, 199)

    def test_time_range_and_offset(self):
        """Offset counts within the time range; only the returned member is inflated."""
        got, stats = self.query(1, start_time=1_100, end_time=1_150, offset=520, limit=3)
        self.assertEqual(got, reference(self.messages, 1, 1_100, 1_150, 520, 3))
        self.assertEqual(stats.members_inflated, 1)

    def test_merged_offset_inflates_only_returned_members(self):
        """A merged-stream offset finds its split point from headers and tables only."""
        offset = 9_000
        got, stats = self.query(0, offset=offset, limit=20)
        self.assertEqual(got, reference(self.messages, 0, 0, 0, offset, 20))
        self.assertLessEqual(stats.members_inflated, 2)

    def test_merged_whole_stream(self):
        """stream 0 with no bounds returns every message in arrival order."""
        got, stats = self.query(0)
        self.assertEqual(got, reference(self.messages, 0, 0, 0, 0, 0))
        self.assertEqual(stats.members_inflated, 300)

    def test_cancelled_stops_between_members(self):
        """cancelled() turning true stops the read before the next member."""
        flag = []
        stats = ReadStats()
        got = []
        for record in iter_logs(self.streams, 1, stats=stats, cancelled=lambda: bool(flag)):
            got.append(record)
            flag.append(True)
        # The first member's records came as one chunk; nothing was read after.
        self.assertEqual(len(got), 50)
        self.assertEqual(stats.members_inflated, 1)

    def test_no_file_held_between_records(self):
        """A caller holding a record holds no file; closing early leaves none open."""
        before = open_fds()
        opened = []
        real_open = open

        def spy(path, mode="r", *a, **kw):
            f = real_open(path, mode, *a, **kw)
            if str(path).startswith(self.dir):
                opened.append(f)
            return f

        self.patch(files_module, "_open_file", spy)
        gen = iter_logs(self.streams, 0, offset=5_000)
        next(gen)
        self.assertTrue(opened)  # the read did open segment files...
        self.assertTrue(all(f.closed for f in opened))  # ...and closed them before yielding
        self.assertEqual(open_fds(), before)
        next(gen)
        gen.close()
        self.assertEqual(open_fds(), before)
        list(iter_logs(self.streams, 2))
        self.assertEqual(open_fds(), before)


class FileBudgetTests(BigJobMixin, SynchronousTestCase):
    """Queries open their files within a shared FileBudget."""

    def test_interleaved_queries_share_one_slot(self):
        """Generators advanced in turn by one thread all finish within a budget of 1."""
        budget = FileBudget(1)
        gens = [
            iter_logs(self.streams, 0, budget=budget),
            iter_logs(self.streams, 1, start_time=1_050, budget=budget),
            iter_logs(self.streams, 2, offset=100, limit=900, budget=budget),
        ]
        got = [[] for _ in gens]
        live = set(range(len(gens)))
        while live:
            for i in sorted(live):
                try:
                    got[i].append(next(gens[i]))
                except StopIteration:
                    live.discard(i)
                self.assertEqual(budget.in_use, 0)  # nothing held between records
        self.assertEqual(got[0], reference(self.messages, 0, 0, 0, 0, 0))
        self.assertEqual(got[1], reference(self.messages, 1, 1_050, 0, 0, 0))
        self.assertEqual(got[2], reference(self.messages, 2, 0, 0, 100, 900))
        self.assertEqual(budget.peak, 1)

    def test_metrics_within_budget(self):
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d, per_segment=3)
        for b in range(10):
            w.metrics([(100 + b, b * 5 + i, float(i)) for i in range(5)])
        segments = w.metric_segments()
        budget = FileBudget(1)
        a = iter_metrics(segments, budget=budget)
        b = iter_metrics(segments, offset=7, budget=budget)
        first = [next(a), next(b)]
        self.assertEqual(budget.in_use, 0)
        rest_a, rest_b = list(a), list(b)
        self.assertEqual(len(rest_a) + 1, 50)
        self.assertEqual(len(rest_b) + 1, 43)
        self.assertEqual(first[1].sequence, 7)
        self.assertEqual(budget.in_use, 0)

    def test_threads_stay_within_budget(self):
        """Six threads reading the whole job at once never hold more than the budget.

        Open segment files are counted where queries open and close them (a
        sampler of /proc/self/fd cannot take an atomic picture while the
        symlink-safe walks churn descriptor numbers, and over-counts).
        """
        budget = FileBudget(2)
        want = reference(self.messages, 0, 0, 0, 0, 0)
        results: list = []
        lock = threading.Lock()
        open_now = [0]
        peak_open = [0]
        real_open = files_module._open_file

        class Counted:
            def __init__(self, f):
                self._f = f

            def __getattr__(self, name):
                return getattr(self._f, name)

            def close(self):
                try:
                    self._f.close()
                finally:
                    with lock:
                        open_now[0] -= 1

        def counting_open(path, mode="rb"):
            f = real_open(path, mode)
            with lock:
                open_now[0] += 1
                peak_open[0] = max(peak_open[0], open_now[0])
            return Counted(f)

        self.patch(files_module, "_open_file", counting_open)

        def read():
            results.append(list(iter_logs(self.streams, 0, budget=budget)))

        readers = [threading.Thread(target=read) for _ in range(6)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(60)
        self.assertEqual(len(results), 6)
        for got in results:
            self.assertEqual(got, want)
        self.assertLessEqual(budget.peak, 2)
        self.assertGreater(peak_open[0], 0)
        self.assertLessEqual(peak_open[0], 2)
        self.assertEqual(open_now[0], 0)
        self.assertEqual(budget.in_use, 0)


class LogSemanticsTests(SynchronousTestCase):
    """Query semantics against a brute-force reference."""

    def write(self, messages, batch_sizes, per_segment=3, max_member_raw=40):
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d, per_segment=per_segment)
        i = 0
        k = 0
        while i < len(messages):
            # Consecutive runs of one stream form a batch, capped by the drawn size.
            size = batch_sizes[k % len(batch_sizes)]
            k += 1
            stream = messages[i][0]
            j = i
            while j < len(messages) and j - i < size and messages[j][0] == stream:
                j += 1
            w.logs(stream, [m[1:] for m in messages[i:j]], max_member_raw=max_member_raw)
            i = j
        return w.streams()

    @given(
        st.lists(
            st.tuples(st.sampled_from([1, 2]), st.integers(1, 20), st.binary(max_size=12)),
            max_size=80,
        ),
        st.lists(st.integers(1, 9), min_size=1, max_size=5),
        st.sampled_from([0, 1, 2]),
        st.integers(0, 22),
        st.integers(0, 22),
        st.integers(0, 90),
        st.integers(0, 30),
    )
    def test_matches_brute_force(self, rows, sizes, stream, start, end, offset, limit):
        """Any interleaving, batching, range, offset and limit gives the reference answer."""
        messages = [(s, ts, i, c) for i, (s, ts, c) in enumerate(rows)]
        streams = self.write(messages, sizes)
        stats = ReadStats()
        got = list(iter_logs(streams, stream, start, end, offset, limit, stats))
        self.assertEqual(got, reference(messages, stream, start, end, offset, limit))
        self.assertEqual(stats.corrupt_members, 0)
        total = sum(len(v.members) for views in streams.values() for v in views)
        self.assertLessEqual(stats.members_inflated + stats.members_skipped, total)

    def test_empty_and_missing_streams(self):
        """No segments, or a stream absent from the dict, yields nothing."""
        self.assertEqual(list(iter_logs({}, 0)), [])
        self.assertEqual(list(iter_logs({1: ()}, 1, offset=3)), [])

    def test_invalid_arguments(self):
        """An unknown stream or a negative offset/limit is a ValueError."""
        self.assertRaises(ValueError, list, iter_logs({}, 3))
        self.assertRaises(ValueError, list, iter_logs({}, 0, offset=-1))
        self.assertRaises(ValueError, list, iter_metrics((), limit=-1))

    def test_reads_only_published_members(self):
        """Members appended after the view was taken are not returned."""
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d)
        w.logs(1, [(1, 0, b"a"), (1, 1, b"b")])
        published = w.streams()
        w.logs(1, [(1, 2, b"c")])
        got = list(iter_logs(published, 0))
        self.assertEqual([r.content for r in got], [b"a", b"b"])
        self.assertEqual([r.content for r in iter_logs(w.streams(), 0)], [b"a", b"b", b"c"])

    def test_corrupt_member_is_skipped_and_counted(self):
        """A member whose data was damaged is skipped, counted and logged; the rest returns."""
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d)
        for b in range(5):
            w.logs(1, [(10 + b, i, b"batch %d line %d\n" % (b, i)) for i in range(20)])
        streams = w.streams()
        view = streams[1][0]
        victim = view.members[2]
        with open(view.path, "r+b") as f:
            f.seek(victim.offset + victim.size - 20)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        stats = ReadStats()
        with self.assertLogs("joblet_persist.storage", "WARNING") as logs:
            got = list(iter_logs(streams, 1, stats=stats))
        self.assertEqual(len(got), 80)
        self.assertNotIn(12, [r.timestamp for r in got])
        self.assertEqual(stats.corrupt_members, 1)
        self.assertEqual(stats.members_inflated, 4)
        self.assertIn(view.path, logs.output[0])
        # Offsets still count the damaged member's messages (from its header).
        with self.assertLogs("joblet_persist.storage", "WARNING"):
            got = list(iter_logs(streams, 1, offset=30, limit=15, stats=ReadStats()))
        self.assertEqual([r.timestamp for r in got], [11] * 10 + [13] * 5)


class MetricTests(SynchronousTestCase):
    """iter_metrics over metric segments."""

    def setUp(self):
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d, per_segment=4)
        self.samples = []
        for b in range(20):
            batch = [(1_700_000_000_000_000_000 + (b * 10 + i) * 10**9, b * 10 + i, (b * 10 + i) / 4)
                     for i in range(10)]  # fmt: skip
            w.metrics(batch)
            self.samples += batch
        self.segments = w.metric_segments()

    def expected(self, rows):
        out = []
        for ts, seq, cpu in rows:
            data = json.loads(
                fmt.metric_json_line(
                    "job",
                    ipc_pb2.Metric(data=ipc_pb2.MetricData(cpu_usage=cpu)).SerializeToString(),
                )
            )["data"]
            out.append(MetricRecord(ts, seq, data))
        return out

    def test_all(self):
        """Every sample comes back with exact ns timestamp and its data object."""
        got = list(iter_metrics(self.segments))
        self.assertEqual(got, self.expected(self.samples))
        self.assertEqual(len(self.segments), 5)

    def test_range_offset_limit_cost(self):
        """A time range with offset and limit inflates only the member it returns from."""
        start = self.samples[57][0]
        end = self.samples[143][0]
        stats = ReadStats()
        got = list(iter_metrics(self.segments, start, end, offset=10, limit=3, stats=stats))
        self.assertEqual(got, self.expected(self.samples[67:70]))
        self.assertEqual(stats.members_inflated, 1)

    def test_limit(self):
        """limit alone returns the first samples from the first member."""
        stats = ReadStats()
        got = list(iter_metrics(self.segments, limit=3, stats=stats))
        self.assertEqual(got, self.expected(self.samples[:3]))
        self.assertEqual(stats.members_inflated, 1)
