"""Tests for storage.metric_columns: the columnar read of stored metric lines that
AggregateMetrics uses, its C scanner (_speedups.metric_columns) and its json twin."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from joblet_persist import aggregate
from joblet_persist._proto import ipc_pb2
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.storage import format as fmt
from joblet_persist.storage import metric_columns as mc
from joblet_persist.storage.api import JobInfo, ReadStats
from joblet_persist.storage.reader import SegmentView, iter_metrics
from joblet_persist.storage.segment import thd_append
from joblet_persist.storage.snapshot import LocalJobSnapshot
from joblet_persist.threads import run_inline
from tests.test_query import JOB, ServicerMixin
from tests.test_query_search import LocalSnapshots
from tests.test_storage_reader import COMP

FIELDS = mc.FIELDS
GROUP_KEYS = {
    "disk_io": ("read_bytes", "write_bytes", "read_ops", "write_ops"),
    "network_io": ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"),
}


def c_scanner():
    if mc._metric_columns_c is None:
        raise SkipTest("joblet_persist._speedups is not built (no C compiler at install)")
    return mc._metric_columns_c


def codes(fields) -> tuple:
    return tuple(FIELDS.index(f) for f in fields)


def reference(lines: list, fields: tuple):
    """What QueryMetrics reads: json.loads of each line, the getters over its data object;
    None when a line is not a JSON object with a data object."""
    datas = []
    for line in lines:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
            return None
        datas.append(obj["data"])
    return [[aggregate._getter(f)(d) for d in datas] for f in fields]


def same(a, b) -> bool:
    """Equal values of equal types (so 1 and 1.0, or 0.0 and -0.0, differ); NaN equals NaN."""
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for x, y in zip(itertools.chain.from_iterable(a), itertools.chain.from_iterable(b),
                    strict=True):
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if not (x == y and math.copysign(1, x) == math.copysign(1, y)
                    or math.isnan(x) and math.isnan(y)):
                return False
        elif x != y:
            return False
    return True


# -- generated lines ------------------------------------------------------------------------

INTS = st.one_of(st.integers(-(2**63), 2**64), st.integers(), st.integers(-(10**40), 10**40))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def number_text(draw):
    """The text of a JSON number, in the forms a JSON writer may use."""
    kind = draw(st.sampled_from(["int", "repr", "exp", "frac", "big"]))
    if kind == "int":
        return str(draw(INTS))
    if kind == "repr":
        return repr(draw(FLOATS))
    if kind == "big":
        return str(draw(st.integers(10**15, 10**400)) * draw(st.sampled_from([1, -1])))
    mantissa = draw(st.integers(-(10**20), 10**20))
    if kind == "exp":
        e = draw(st.sampled_from(["e", "E"]))
        sign = draw(st.sampled_from(["", "+", "-"]))
        return f"{mantissa}{e}{sign}{draw(st.integers(0, 400))}"
    return f"{mantissa}.{draw(st.integers(0, 10**20))}"


WS = st.sampled_from(["", "", " ", "\t", "\r\n ", "  "])
JSON_STRINGS = st.text(max_size=6).map(json.dumps)  # escapes, \\uXXXX, quotes
OTHER_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), FLOATS, st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
).map(json.dumps)


@st.composite
def obj_text(draw, members: list) -> str:
    """A JSON object of ``members`` [(key text, value text)] in a drawn order, with drawn
    whitespace around every token."""
    members = draw(st.permutations(members))
    parts = [draw(WS) + k + draw(WS) + ":" + draw(WS) + v + draw(WS) for k, v in members]
    return "{" + ",".join(parts) + draw(WS) + "}"


@st.composite
def plain_line(draw) -> str:
    """A metric line in the plain form: every field a JSON number, keys in any order, any
    whitespace, extra keys with any values, an escaped job string."""
    data = [(json.dumps(k), draw(number_text())) for k in ("cpu_usage", "memory_usage",
                                                            "gpu_usage")]
    for group, keys in GROUP_KEYS.items():
        inner = [(json.dumps(k), draw(number_text())) for k in keys]
        inner += draw(st.lists(st.tuples(st.sampled_from(['"x"', '"rx"', '"read"']),
                                         OTHER_VALUES), max_size=1))
        data.append((json.dumps(group), draw(obj_text(inner))))
    data += draw(st.lists(st.tuples(st.sampled_from(['"extra"', '"cpuUsage"', '"y"']),
                                    OTHER_VALUES), max_size=2))
    top = [('"job_uuid"', draw(JSON_STRINGS)), ('"timestamp"', str(draw(INTS))),
           ('"sequence"', draw(number_text())), ('"data"', draw(obj_text(data)))]
    top += draw(st.lists(st.tuples(JSON_STRINGS.filter(lambda k: k != '"data"'),
                                   OTHER_VALUES), max_size=2))
    return draw(WS) + draw(obj_text(top)) + draw(WS) + "\n"


def writer_line(job: str, ts: int, seq: int, values: dict) -> bytes:
    return fmt.metric_json_line(job, ipc_pb2.Metric(
        timestamp=ts, sequence=seq, data=ipc_pb2.MetricData(**values)).SerializeToString())


WRITER_VALUES = st.fixed_dictionaries({
    "cpu_usage": st.floats(width=64),
    "memory_usage": st.integers(-(2**63), 2**63 - 1),
    "gpu_usage": st.floats(),
    "disk_io": st.builds(ipc_pb2.DiskIO, read_bytes=st.integers(-(2**63), 2**63 - 1),
                         write_ops=st.integers(-(2**63), 2**63 - 1)),
    "network_io": st.builds(ipc_pb2.NetworkIO, tx_packets=st.integers(0, 2**63 - 1)),
})
FIELD_SETS = st.one_of(st.just(FIELDS), st.lists(st.sampled_from(FIELDS), min_size=1,
                                                 max_size=4, unique=True).map(tuple))


def mutate(draw, line: str) -> str:
    """``line`` with a few characters deleted, replaced or inserted."""
    chars = list(line)
    for _ in range(draw(st.integers(1, 3))):
        if not chars:
            break
        i = draw(st.integers(0, len(chars) - 1))
        op = draw(st.sampled_from(["del", "sub", "ins"]))
        c = draw(st.sampled_from(list('{}[]":,.-+eE0159 \\nNaIf\x00\x1f\x7f') + ["\u00e9"]))
        if op == "del":
            del chars[i]
        elif op == "sub":
            chars[i] = c
        else:
            chars.insert(i, c)
    return "".join(chars)


class ScannerTests(SynchronousTestCase):
    """The C scanner against its json twin and against json.loads."""

    def check(self, lines: list, fields: tuple, lo: int = 0, hi=None):
        """C (when it answers) == the twin == the reference, on lines lo..hi-1; returns
        the C answer."""
        scan = c_scanner()
        raw = [line.encode("utf-8") if isinstance(line, str) else line for line in lines]
        hi = len(raw) if hi is None else hi
        data = b"".join(raw)
        lengths = [len(r) for r in raw]
        want = reference(raw[lo:hi], fields)
        try:
            twin = mc.columns_from_json(data, lengths, lo, hi, fields)
        except fmt.CorruptMember:
            twin = None
        self.assertTrue(same(twin, want), (twin, want))
        got = scan(data, lengths, lo, hi, codes(fields))
        if got is not None:
            self.assertTrue(same(got, want), (lines, got, want))
        return got

    @given(st.lists(plain_line(), min_size=1, max_size=5), FIELD_SETS)
    def test_plain_lines(self, lines, fields):
        """Lines in the plain form (exponents, negative and big integers, escaped strings,
        any whitespace, key order and extra values) are read by the C scanner, with the
        values json.loads and the getters give them, and the same as the twin's."""
        got = self.check(lines, fields)
        self.assertIsNotNone(got, lines)

    @given(st.lists(st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1),
                              WRITER_VALUES), min_size=1, max_size=5), FIELD_SETS)
    def test_writer_lines(self, samples, fields):
        """Every line the writer produces (NaN and infinities stored as null excepted) is
        read by the C scanner, equal to the reference."""
        lines = [writer_line("job-1", ts, seq, values) for ts, seq, values in samples]
        got = self.check(lines, fields)
        finite = all(math.isfinite(v["cpu_usage"]) and math.isfinite(v["gpu_usage"])
                     for _t, _s, v in samples)
        if finite:
            self.assertIsNotNone(got)

    @given(st.data(), st.lists(plain_line(), min_size=1, max_size=3), FIELD_SETS)
    def test_mutated_lines(self, data, lines, fields):
        """Damaged lines (valid or not): the C scanner defers or agrees with json.loads;
        it never reads a line json.loads refuses."""
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = mutate(data.draw, lines[i])
        got = self.check(lines, fields)
        if got is not None:
            self.assertIsNotNone(reference([x.encode() for x in lines], fields))

    @given(st.lists(st.tuples(st.integers(-(10**16), 10**16), st.integers(0, 18),
                              st.integers(-40, 40), st.booleans()), min_size=1, max_size=20))
    def test_short_decimals(self, numbers):
        """Decimals of few digits (those the scanner computes itself, and just past them)
        read as float() reads their text, in float and integer fields."""
        texts = []
        for mantissa, point, exp, with_exp in numbers:
            digits = str(abs(mantissa)).rjust(point + 1, "0")
            text = ("-" if mantissa < 0 else "") + digits[: len(digits) - point] + "." + (
                digits[len(digits) - point :] or "0")
            texts.append(text + (f"e{exp}" if with_exp else ""))
        lines = ['{"data":{"cpu_usage":' + t + ',"memory_usage":' + t + '}}\n' for t in texts]
        got = self.check(lines, ("cpu_usage", "memory_usage"))
        self.assertIsNotNone(got)
        self.assertTrue(same(got[:1], [[float(t) for t in texts]]))

    def test_odd_values(self):
        """Values whose reading depends on the conversion: ints in float fields (past a
        double's range: 0.0), floats in integer fields (truncated; inf: 0), -0.0, 1e400,
        integers past 64 bits, and beyond int's digit limit (json.loads refuses those: the
        scanner defers and the member is corrupt)."""
        cases = ["1", "-0", "-0.0", "1e400", "-1e400", "1.5e3", "123456789012345678901234567890",
                 "-9223372036854775809", "1" + "0" * 400, "2.9999999999999996", "1E-400",
                 "9007199254740993", "-12.75", "0.1", "5e-324"]
        for text in cases:
            line = ('{"data":{"cpu_usage":' + text + ',"memory_usage":' + text
                    + ',"gpu_usage":0.5,"disk_io":{"read_bytes":' + text + '}}}\n')
            got = self.check([line], ("cpu_usage", "memory_usage", "disk_io.read_bytes"))
            self.assertIsNotNone(got, text)
        line = '{"data":{"memory_usage":1' + "0" * 5000 + '}}\n'
        self.assertIsNone(c_scanner()(line.encode(), [len(line)], 0, 1, codes(["memory_usage"])))
        self.assertRaises(fmt.CorruptMember, mc.columns_from_json, line.encode(), [len(line)], 0,
                          1, ("memory_usage",))

    def test_defers(self):
        """What the scanner leaves to json: a field missing, null, a string or a bool,
        camelCase keys, a key twice, an escaped key, non-ASCII text, NaN, and lines json
        refuses (trailing commas, leading zeros, a bare dot, control characters, extra
        data); the twin then reads or refuses each as json.loads does."""
        lines = [
            '{"data":{"cpu_usage":1.0}}',
            '{"data":{"cpu_usage":null,"memory_usage":1}}',
            '{"data":{"cpu_usage":"1.5","memory_usage":1}}',
            '{"data":{"cpu_usage":true,"memory_usage":1}}',
            '{"data":{"cpuUsage":2.5,"memory_usage":1}}',
            '{"data":{"cpu_usage":1.0,"cpu_usage":2.0,"memory_usage":1}}',
            '{"data":{"cpu_\\u0075sage":1.0,"memory_usage":1}}',
            '{"d\\u0061ta":{"cpu_usage":1.0,"memory_usage":1}}',
            '{"job_uuid":"\u00e9","data":{"cpu_usage":1.0,"memory_usage":1}}',
            '{"data":{"cpu_usage":NaN,"memory_usage":1}}',
            '{"data":{"cpu_usage":1.0,"memory_usage":1,}}',
            '{"data":{"cpu_usage":01,"memory_usage":1}}',
            '{"data":{"cpu_usage":.5,"memory_usage":1}}',
            '{"data":{"cpu_usage":1.,"memory_usage":1}}',
            '{"job_uuid":"a\x01b","data":{"cpu_usage":1.0,"memory_usage":1}}',
            '{"data":{"cpu_usage":1.0,"memory_usage":1}} {}',
            '{"data":{"cpu_usage":1.0,"memory_usage":1},"data":{"cpu_usage":2.0}}',
            '{"data":[1]}',
            '[{"data":{}}]',
            '{"data":{"cpu_usage":1.0,"memory_usage":1,"x":' + "[" * 100 + "]" * 100 + "}}",
        ]
        fields = ("cpu_usage", "memory_usage")
        for line in lines:
            got = self.check([line + "\n"], fields)
            self.assertIsNone(got, line)

    def test_range_and_lengths(self):
        """Lines lo..hi-1 only; lengths past the end of the data defer to the twin, which
        reads what the slices hold, as the reader does."""
        lines = [f'{{"data":{{"memory_usage":{i}}}}}\n' for i in range(5)]
        self.assertEqual(self.check(lines, ("memory_usage",), 1, 4), [[1, 2, 3]])
        self.assertEqual(self.check(lines, ("memory_usage",), 2, 2), [[]])
        data = "".join(lines).encode()
        lengths = [len(x) for x in lines]
        lengths[-1] += 10
        self.assertIsNone(c_scanner()(data, lengths, 0, 5, (1,)))
        self.assertEqual(mc.columns_from_json(data, lengths, 0, 5, ("memory_usage",)),
                         [[0, 1, 2, 3, 4]])
        self.assertRaises(ValueError, c_scanner(), data, lengths, 0, 6, (1,))
        self.assertRaises(ValueError, c_scanner(), data, lengths, 0, 1, (11,))


# -- the read -------------------------------------------------------------------------------


def write_members(path: str, batches: list) -> tuple:
    """Members of the given lines [[(ts, line bytes)]], one batch each: a SegmentView."""
    members, size, ordinal = [], 0, 0
    for batch in batches:
        ords = list(range(ordinal, ordinal + len(batch)))
        ordinal += len(batch)
        pieces = fmt.encode_metric_members([t for t, _l in batch], ords, ords,
                                           [line for _t, line in batch], COMP)
        for blob, info in pieces:
            members.append(dataclasses.replace(info, offset=size))
            size = thd_append(path, blob, size, False)
    return (SegmentView(path, tuple(members)),)


def rows_of(chunks) -> list:
    return [(t, *vals) for times, cols in chunks for t, *vals in zip(times, *cols, strict=True)]


class ReadTests(SynchronousTestCase):
    """iter_metric_columns against reader.iter_metrics (what AggregateMetrics read before)."""

    def path(self) -> str:
        d = self.mktemp()
        os.makedirs(d)
        return os.path.join(d, "metrics.jsonl.gz")

    def old_rows(self, views, fields, start=0, end=0, stats=None):
        gets = [aggregate._getter(f) for f in fields]
        return [(r.timestamp, *(g(r.data) for g in gets))
                for r in iter_metrics(views, start, end, stats=stats)]

    @given(st.lists(st.lists(st.tuples(st.integers(0, 50), st.one_of(
                WRITER_VALUES, WRITER_VALUES, WRITER_VALUES,
                st.sampled_from([b'{"data":{"cpu_usage":\n', b'{"data":[]}\n',
                                 b'{"data":{"cpuUsage":"2.5"}}\n']))),
                             min_size=1, max_size=6), min_size=1, max_size=4),
           st.integers(0, 50), st.integers(0, 50), FIELD_SETS)
    def test_same_samples_as_iter_metrics(self, batches, start, end, fields):
        """For any members (timestamps in or out of order within one, lines that do not
        parse or read oddly, in range or out of it) and time range, the columns hold the
        samples iter_metrics yields, in its order, with the getters' values, and the same
        members are skipped as corrupt."""
        path = self.path()
        views = write_members(path, [
            [(ts, v if isinstance(v, bytes) else writer_line("j", ts, 0, v)) for ts, v in batch]
            for batch in batches])
        stats, old = ReadStats(), ReadStats()
        got = rows_of(mc.iter_metric_columns(views, fields, start, end, stats=stats))
        self.assertTrue(same([got], [self.old_rows(views, fields, start, end, old)]))
        self.assertEqual(stats.corrupt_members, old.corrupt_members)

    def test_member_with_a_bad_line_is_skipped_whole(self):
        """A member holding a line that does not parse is counted corrupt and skipped, as
        iter_metrics skips it; the members around it are read."""
        batches = []
        for b, bad in enumerate((False, True, False)):
            lines = [(b * 3 + i, b'{"timestamp":%d,"data":{"cpu_usage":%d.5}}\n' % (b * 3 + i, i))
                     for i in range(3)]
            if bad:
                lines[1] = (4, b'{"timestamp":4,"data":{"cpu_usage":\n')
            batches.append(lines)
        views = write_members(self.path(), batches)
        stats, old = ReadStats(), ReadStats()
        got = rows_of(mc.iter_metric_columns(views, ("cpu_usage",), stats=stats))
        self.assertEqual(got, self.old_rows(views, ("cpu_usage",), stats=old))
        self.assertEqual([g[0] for g in got], [0, 1, 2, 6, 7, 8])
        self.assertEqual((stats.corrupt_members, stats.members_inflated), (1, 3))
        self.assertEqual((old.corrupt_members, old.members_inflated), (1, 3))

    def test_members_through_submit_and_cancel(self):
        """Each member is parsed through ``submit``; a cancelled read stops before the next
        member."""
        views = write_members(self.path(), [[(t, writer_line("j", t, 0, {"cpu_usage": 1.0}))]
                                            for t in range(5)])
        calls = []

        def submit(fn, *args):
            calls.append(args[1])
            return run_inline(fn, *args)

        got = rows_of(mc.iter_metric_columns(views, ("cpu_usage",), submit=submit, window=2))
        self.assertEqual([g[0] for g in got], [0, 1, 2, 3, 4])
        self.assertEqual(len(calls), 5)
        calls.clear()
        left = [2]

        def cancelled():
            left[0] -= 1
            return left[0] < 0

        got = rows_of(mc.iter_metric_columns(views, ("cpu_usage",), submit=submit, window=1,
                                             cancelled=cancelled))
        self.assertEqual([g[0] for g in got], [0, 1])

    def test_columns_without_json(self):
        """Members the writer produced are read without json.loads (the C scanner): the
        reason AggregateMetrics no longer spends its time parsing JSON."""
        c_scanner()
        views = write_members(self.path(), [[(t, writer_line("j", t, 0, {"cpu_usage": t / 2}))
                                             for t in range(4)]])
        with mock.patch.object(json, "loads", side_effect=AssertionError("json.loads")):
            got = rows_of(mc.iter_metric_columns(views, ("cpu_usage",)))
        self.assertEqual(got, [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)])


# -- the aggregation ----------------------------------------------------------------------


def results(points) -> list:
    return [(key, count, [[fs.result(f) for f in aggregate.FUNCTIONS] for fs in stats])
            for key, count, stats in points]


class AddColumnsTests(SynchronousTestCase):
    """Aggregator.add_columns (the fast path) against Aggregator.add (the old one)."""

    @given(st.lists(st.tuples(st.integers(0, 30 * 10**9), WRITER_VALUES), min_size=1,
                    max_size=40),
           st.sampled_from([10**9, 7 * 10**9, 60 * 10**9]), st.data())
    def test_same_points_as_add(self, samples, step, data):
        """For any samples cut into any chunks, every function of every bucket is exactly
        (float sums too: the runs are the same) what add() gives sample by sample."""
        datas = [json.loads(writer_line("j", ts, 0, v))["data"] for ts, v in samples]
        times = [ts for ts, _v in samples]
        old = aggregate.Aggregator(step, FIELDS, aggregate.FUNCTIONS)
        for ts, d in zip(times, datas, strict=True):
            old.add(ts, d)
        new = aggregate.Aggregator(step, FIELDS, aggregate.FUNCTIONS)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(times)), max_size=4)))
        columns = mc.columns_from_objects(datas, FIELDS)
        for lo, hi in itertools.pairwise([0, *cuts, len(times)]):
            new.add_columns(times[lo:hi], [c[lo:hi] for c in columns])
            self.assertEqual(new.bucket_count(), len({t - t % step for t in times[:hi]}))
        self.assertEqual(new.samples, old.samples)
        a, b = results(new.points()), results(old.points())
        self.assertEqual(repr(a), repr(b))


class AggregateRpcTests(ServicerMixin, SynchronousTestCase):
    """AggregateMetrics over a LocalJobSnapshot (IMetricColumns) answers what the
    sample-by-sample path answers."""

    def test_same_answer_as_the_record_path(self):
        """The columnar read through the servicer's submit gives the response that
        aggregating iter_metrics' records gives, for every function and field."""
        d = self.mktemp()
        os.makedirs(d)
        batches = [[(t * 10**9, writer_line(JOB, t * 10**9, t, {
            "cpu_usage": t * 1.5, "memory_usage": 1000 - t,
            "disk_io": ipc_pb2.DiskIO(read_bytes=t * t)})) for t in range(b * 7, b * 7 + 7)]
            for b in range(4)]
        views = write_members(os.path.join(d, "metrics.jsonl.gz"), batches)
        info = JobInfo(JOB, 1000, 1000, 0, 28, 0, 0, 27 * 10**9)
        snap = LocalJobSnapshot(JOB, info, (), (), views)
        self.storage = LocalSnapshots({JOB: snap})
        submitted = []

        def submit(fn, *args):
            submitted.append(fn)
            return run_inline(fn, *args)

        request = pb.AggregateMetricsRequest(job_uuid=JOB, step_ns=5 * 10**9,
                                             functions=list(aggregate.FUNCTIONS))
        fast = self.unary(self.make(search_submit=submit), "AggregateMetrics", request)
        self.assertEqual(len(submitted), 4)

        class Records:
            """The same snapshot without IMetricColumns: the record path."""

            info = snap.info

            def iter_metrics(self, *args, **kw):
                return snap.iter_metrics(*args, **kw)

        self.storage = LocalSnapshots({JOB: Records()})
        slow = self.unary(self.make(), "AggregateMetrics", request)
        self.assertEqual(fast, slow)
        self.assertEqual(fast.samples, 28)
