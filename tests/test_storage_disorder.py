"""Reading segments whose ordinals overlap or go backwards (a copied segment,
two writers of one directory): every read ends, on any layout, returns every
stored record in the documented order, and honours cancellation.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage.api import LogRecord, ReadStats
from joblet_persist.storage.reader import (
    SegmentView,
    find_disorder,
    iter_log_chunks,
    iter_logs,
    iter_metrics,
)
from joblet_persist.storage.segment import segment_name, thd_append
from tests.test_storage_local import JOB, StorageTestCase, rows
from tests.test_storage_reader import COMP, JobWriter


def bounded(test, f, seconds=20.0):
    """``f()`` run on a daemon thread; fails the test if it has not returned in ``seconds``.

    A thread, not a clock: the failure this guards against is a loop that
    never returns to the caller, which no fake clock can interrupt.
    """
    box = {}

    def run():
        try:
            box["result"] = f()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        test.fail(f"read still running after {seconds} s: it does not terminate")
    if "error" in box:
        raise box["error"]
    return box["result"]


def write_member_segments(directory, layout):
    """Write ``layout`` [(stream, [[ordinal, ...] per member])] as one segment each.

    Returns (streams dict for iter_logs, stored records per stream in stored
    order as [(member first ordinal, [(ordinal, ts, seq, content)])]).
    """
    views = {1: [], 2: []}
    stored = {1: [], 2: []}
    for n, (stream, members) in enumerate(layout):
        kind = "stdout" if stream == 1 else "stderr"
        path = os.path.join(directory, segment_name(kind, len(views[stream])) + f".{n}")
        size = 0
        infos = []
        for ords in members:
            ts = [1000 + o for o in ords]
            seqs = list(range(len(ords)))
            contents = [b"s%d m%d o%d" % (n, len(infos), o) for o in ords]
            pieces = fmt.encode_log_members(ts, seqs, ords, contents, COMP)
            for blob, info in pieces:
                infos.append(dataclasses.replace(info, offset=size))
                size = thd_append(path, blob, size, False)
            stored[stream].append(list(zip(ords, ts, seqs, contents, strict=True)))
        views[stream].append(SegmentView(path, tuple(infos)))
    return {k: tuple(v) for k, v in views.items()}, stored


def in_order(members):
    prev = None
    for recs in members:
        if prev is not None and recs[0][0] <= prev:
            return False
        prev = recs[-1][0]
    return True


def expected(stored, stream, start, end, offset, limit):
    """The documented order, computed from the records as stored."""
    keys = (1, 2) if stream == 0 else (stream,)
    if all(in_order(stored[k]) for k in keys):
        # Ordinals rise in every wanted stream: one merge by (ordinal, stream).
        recs = sorted((r[0], k, r) for k in keys for m in stored[k] for r in m)
        out = [(k, r) for _o, k, r in recs]
    else:
        # Whole members by (largest first ordinal so far in the stream, stream, position).
        order = []
        for k in keys:
            top = None
            for i, m in enumerate(stored[k]):
                top = m[0][0] if top is None else max(top, m[0][0])
                order.append((top, k, i, m))
        order.sort(key=lambda e: e[:3])
        out = [(k, r) for _t, k, _i, m in order for r in m]
    out = [
        LogRecord(k, r[1], r[2], r[3])
        for k, r in out
        if (start <= 0 or r[1] >= start) and (end <= 0 or r[1] <= end)
    ][offset:]
    return out[:limit] if limit else out


member_ords = st.builds(
    lambda first, steps: [first + sum(steps[:i]) for i in range(len(steps) + 1)],
    st.integers(0, 40),
    st.lists(st.integers(1, 3), max_size=4),
)
layouts = st.lists(
    st.tuples(st.sampled_from([1, 2]), st.lists(member_ords, min_size=1, max_size=3)),
    min_size=1,
    max_size=5,
)


class DisorderedReadTests(SynchronousTestCase):
    """Reads over overlapping, duplicated and out-of-order segments."""

    def test_copied_segment_terminates_and_returns_everything(self):
        """A segment copied under a later name: the read ends and returns both copies, in
        segment order (this looped forever in _merged when a member's successor started at a
        lower ordinal)."""
        directory = self.mktemp()
        os.makedirs(directory)
        w = JobWriter(directory, per_segment=2)
        for b in range(4):
            w.logs(1, [(1000 + b, b * 3 + i, b"line %d.%d\n" % (b, i)) for i in range(3)])
        streams = w.streams()
        first, second = streams[1]
        copy = os.path.join(directory, segment_name("stdout", 2))
        shutil.copyfile(first.path, copy)
        streams = {1: (first, second, SegmentView(copy, first.members))}
        once = [b"line %d.%d\n" % (b, i) for b in range(4) for i in range(3)]
        for stream in (0, 1):
            got = bounded(self, lambda s=stream: [r.content for r in iter_logs(streams, s)])
            self.assertEqual(got, once + once[:6])
        # Paging through it with offsets gives the same records.
        page = bounded(self, lambda: [r.content for r in iter_logs(streams, 0, offset=10, limit=5)])
        self.assertEqual(page, (once + once[:6])[10:15])
        self.assertEqual(find_disorder(streams[1]), (second.path, copy))
        self.assertIsNone(find_disorder((first, second)))

    def test_copied_metric_segment(self):
        """A copied metrics segment is read to the end, both copies returned."""
        directory = self.mktemp()
        os.makedirs(directory)
        w = JobWriter(directory)
        w.metrics([(1000 + i, i, float(i)) for i in range(5)])
        (view,) = w.metric_segments()
        copy = os.path.join(directory, segment_name("metrics", 1))
        shutil.copyfile(view.path, copy)
        segments = (view, SegmentView(copy, view.members))
        got = bounded(self, lambda: [r.sequence for r in iter_metrics(segments)])
        self.assertEqual(got, list(range(5)) * 2)
        got = bounded(self, lambda: [r.sequence for r in iter_metrics(segments, offset=3, limit=4)])
        self.assertEqual(got, [3, 4, 0, 1])

    @given(
        layout=layouts,
        stream=st.sampled_from([0, 1, 2]),
        start=st.integers(0, 1045),
        end=st.integers(0, 1045),
        offset=st.integers(0, 12),
        limit=st.integers(0, 12),
    )
    def test_any_layout_ends_in_the_documented_order(
        self, layout, stream, start, end, offset, limit
    ):
        """Arbitrary segment layouts (overlaps, duplicates, segments out of order, both
        streams): the read ends and returns exactly the documented order's records."""
        directory = self.mktemp()
        os.makedirs(directory)
        streams, stored = write_member_segments(directory, layout)
        got = bounded(
            self, lambda: list(iter_logs(streams, stream, start, end, offset, limit)), 60.0
        )
        self.assertEqual(got, expected(stored, stream, start, end, offset, limit))


class DisorderedCancellationTests(SynchronousTestCase):
    """cancelled() turning true mid-read ends a large read at once, in either read order."""

    def large_job(self, disordered):
        directory = self.mktemp()
        os.makedirs(directory)
        w = JobWriter(directory, per_segment=50)
        for b in range(200):
            w.logs(1, [(1000 + b, b * 20 + i, b"out %d.%d\n" % (b, i)) for i in range(20)])
            w.logs(2, [(1000 + b, i, b"err %d.%d\n" % (b, i)) for i in range(5)])
        streams = w.streams()
        if disordered:
            # The last stdout segment again, under a later name.
            last = streams[1][-1]
            copy = os.path.join(directory, segment_name("stdout", len(streams[1])))
            shutil.copyfile(last.path, copy)
            streams = {1: streams[1] + (SegmentView(copy, last.members),), 2: streams[2]}
        return streams

    def check(self, disordered):
        streams = self.large_job(disordered)
        flag = []
        stats = ReadStats()
        chunks = iter_log_chunks(streams, 0, stats=stats, cancelled=lambda: bool(flag))
        first = bounded(self, lambda: next(chunks))
        self.assertTrue(first[0])
        flag.append(True)
        rest = bounded(self, lambda: list(chunks))
        self.assertEqual(rest, [])
        # Nothing was inflated after the flag flipped: the members read were for chunk 1.
        self.assertLessEqual(stats.members_inflated, 2)

    def test_in_order_job(self):
        """The ordinal merge stops at the next pass after cancellation."""
        self.check(False)

    def test_disordered_job(self):
        """The stored-order walk stops before the next member after cancellation."""
        self.check(True)


class LoadDetectsDisorderTests(StorageTestCase):
    """A job with overlapping segments is detected when it is loaded: logged and counted."""

    def test_copied_segment_is_logged_counted_and_read(self):
        """Copying a job's stdout segment under a later name: loading the job logs the job
        and both file names, counts it once, and a query returns every stored record."""
        counted = []

        class Metrics:
            def overlapping_segments(self):
                counted.append(1)

            def __getattr__(self, name):
                return lambda *a, **k: None

        storage = self.make(metrics=Metrics())
        self.append(storage, 1, rows(0, b"a", b"b"))
        self.append(storage, 1, rows(2, b"c"))
        storage = self.restart(storage, metrics=Metrics())
        directory = os.path.join(self.data_dir, "logs", JOB)
        shutil.copyfile(
            os.path.join(directory, segment_name("stdout", 0)),
            os.path.join(directory, segment_name("stdout", 1)),
        )
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        got = self.logs(storage)
        self.assertEqual([c for _s, c in got], [b"a", b"b", b"c", b"a", b"b", b"c"])
        self.assertEqual(counted, [1])
        self.assertEqual(storage.disordered_jobs, 1)
        texts = [e.get("log_format", "") for e in logged if e.get("job") == JOB]
        self.assertTrue(texts, logged)
        event = next(e for e in logged if e.get("job") == JOB)
        self.assertIn(segment_name("stdout", 1), event["later"])
        self.assertIn(segment_name("stdout", 0), event["earlier"])
