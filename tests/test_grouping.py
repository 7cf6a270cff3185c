"""Tests for joblet_persist.grouping: census_groups and extend_groups, the per-read steps
over the frame decoder's groups, their C functions held to the pure-Python references."""

from __future__ import annotations

import gc
import struct
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from joblet_persist import framing, grouping
from joblet_persist._proto import ipc_pb2

CODES = (1, 2, -2, -3, -4, -5, -6, -7, -8, -9)


class Buf:
    """The attributes extend_groups uses of a writer buffer."""

    __slots__ = ("timestamps", "sequences", "arrivals", "contents", "nbytes")

    def __init__(self, held: int = 0, overhead: int = 0, packed: bool = False):
        self.timestamps = list(range(held))
        self.sequences = list(range(held))
        self.arrivals = list(range(held))
        if packed:  # a metric or event buffer's packed int columns
            self.timestamps, self.sequences, self.arrivals = (
                array(code, column) for code, column in
                zip("qQq", (self.timestamps, self.sequences, self.arrivals), strict=True)
            )
        self.contents = [b"h" * (i % 5) for i in range(held)]
        self.nbytes = sum(map(len, self.contents)) + overhead * held

    def state(self) -> tuple:
        return (self.timestamps, self.sequences, self.arrivals, self.contents, self.nbytes)


def c_functions():
    if grouping._census_groups_c is None or grouping._extend_groups_c is None:
        raise SkipTest("joblet_persist._speedups is not built (no C compiler at install)")
    return grouping._census_groups_c, grouping._extend_groups_c


def make_groups(spec, packed: bool = False) -> dict:
    """``spec``: (job, code, sizes of the items) per group, in order; with ``packed``, the
    int columns of metric and event groups (code < 0) are packed, as the decoder's are."""
    groups: dict = {}
    for i, (job, code, sizes) in enumerate(spec):
        n = len(sizes)
        ints = [[1000 + i] * n, [i] * n, list(range(n))]
        if packed and code < 0:
            ints = [array(c, column) for c, column in zip("qQq", ints, strict=True)]
        groups[(job, code)] = [*ints, [b"x" * size for size in sizes]]
    return groups


group_specs = st.lists(
    st.tuples(
        st.sampled_from(["j1", "j2", "j3"]),
        st.sampled_from(CODES),
        st.lists(st.integers(0, 60), max_size=8),
    ),
    max_size=12,
    unique_by=lambda g: (g[0], g[1]),
)


def walk(extend, groups, buffers, max_bytes, max_messages, overhead):
    """Walk the groups with ``extend`` as the writer does; the caller's step for a group it
    stops at is recorded (not performed): (messages, nbytes, stop keys)."""
    messages = nbytes = 0
    stops = []
    position = 0
    while True:
        m, b, key, position = extend(groups, buffers, max_bytes, max_messages, overhead, position)
        messages += m
        nbytes += b
        if key is None:
            return messages, nbytes, stops
        stops.append(key)


class CensusTests(SynchronousTestCase):
    def test_counts_by_type_and_unknown_job_ids(self):
        """Codes 1 and 2 count as type 1 (LOG), -t as type t; the counts add to the dict
        given; the keys of job ids not known valid come back in the groups' order."""
        groups = make_groups([("a", 1, [3, 4]), ("b", -2, [1]), ("a", -7, [1, 1, 1]),
                              ("c", 2, [5]), ("b", 1, [])])
        counts = {1: 10}
        for census in (grouping.census_groups_py, grouping.census_groups):
            got = dict(counts)
            total, per_type, unknown = census(groups, {"a"}, got)
            self.assertEqual(total, 7)
            self.assertEqual(per_type, (0, 3, 1, 0, 0, 0, 0, 3, 0, 0))
            self.assertEqual(unknown, [("b", -2), ("c", 2), ("b", 1)])
            self.assertEqual(got, {1: 13, 2: 1, 7: 3})

    def test_unknown_code_is_an_error(self):
        for census in (grouping.census_groups_py, grouping.census_groups):
            for code in (0, 3, -1, -10):
                with self.assertRaisesRegex(ValueError, f"unknown group code {code}"):
                    census({("a", code): [[1], [1], [0], [b"x"]]}, set(), {})

    @given(group_specs, st.sets(st.sampled_from(["j1", "j2", "j3"])))
    @settings(max_examples=200, deadline=None)
    def test_c_matches_reference(self, spec, valid):
        census_c, _ = c_functions()
        groups = make_groups(spec)
        counts_py: dict = {2: 1}
        counts_c: dict = {2: 1}
        self.assertEqual(census_c(groups, valid, counts_c),
                         grouping.census_groups_py(groups, valid, counts_py))
        self.assertEqual(counts_c, counts_py)

    def test_c_rejects_other_shapes(self):
        census_c, _ = c_functions()
        with self.assertRaises(TypeError):
            census_c({("a", 1): ([1], [1], [0], [b"x"])}, set(), {})
        with self.assertRaises(TypeError):
            census_c([], set(), {})


class ExtendTests(SynchronousTestCase):
    def test_fits_open_buffers_and_stops_at_the_others(self):
        """A group is appended to an open buffer it does not fill; the walk stops at a group
        without a buffer, with an empty buffer, or one it would fill (bytes or messages), and
        skips empty groups."""
        for extend in (grouping.extend_groups_py, grouping.extend_groups):
            buffers = {
                ("a", 1): Buf(2, overhead=10),  # 2 messages, 1 byte of items + 20
                ("a", -2): Buf(0),
                ("b", 1): Buf(3, overhead=10),
                ("c", -3): Buf(1, overhead=10),
            }
            groups = make_groups([
                ("a", 1, [5, 5]),  # fits: 21 + 30 < 100, 4 < 10
                ("x", 1, []),  # empty: skipped
                ("a", -2, [1]),  # empty buffer: stop
                ("b", 1, [1] * 7),  # 3 + 7 messages reach 10: stop
                ("c", -3, [60]),  # 10 + 70 = 80 < 100: fits
                ("d", 2, [1]),  # no buffer: stop
                ("c", 1, [1]),  # no buffer: stop
            ])
            groups[("c", -3)][3] = [b"y" * 60]
            messages, nbytes, stops = walk(extend, groups, buffers, 100, 10, 10)
            self.assertEqual(stops, [("a", -2), ("b", 1), ("d", 2), ("c", 1)])
            self.assertEqual((messages, nbytes), (3, 30 + 70))
            self.assertEqual(buffers[("a", 1)].state(),
                             ([0, 1, 1000, 1000], [0, 1, 0, 0], [0, 1, 0, 1],
                              [b"", b"h", b"xxxxx", b"xxxxx"], 21 + 30))
            self.assertEqual(buffers[("c", -3)].nbytes, 80)
            self.assertEqual(buffers[("b", 1)].state(), Buf(3, overhead=10).state())
            self.assertEqual(buffers[("a", -2)].state(), Buf(0).state())

    def test_a_group_reaching_the_byte_limit_is_left(self):
        """Bytes exactly at the limit would seal the buffer: left for the caller."""
        for extend in (grouping.extend_groups_py, grouping.extend_groups):
            buffers = {("a", 1): Buf(1)}  # 0 bytes
            groups = make_groups([("a", 1, [50])])
            self.assertEqual(walk(extend, groups, buffers, 50, 100, 0), (0, 0, [("a", 1)]))
            self.assertEqual(walk(extend, groups, buffers, 51, 100, 0), (1, 50, []))

    @given(group_specs, st.integers(1, 400), st.integers(1, 12), st.integers(0, 3),
           st.dictionaries(st.sampled_from(["j1", "j2", "j3"]), st.integers(0, 6)),
           st.booleans())
    @settings(max_examples=300, deadline=None)
    def test_c_matches_reference(self, spec, max_bytes, max_messages, overhead, held, packed):
        """Same buffers, counts and stops as the reference, for any groups and limits, with
        list int columns and with metric and event groups and buffers packed."""
        _, extend_c = c_functions()
        results = []
        for extend in (grouping.extend_groups_py, extend_c):
            groups = make_groups(spec, packed)
            buffers = {
                (job, code): Buf(held[job], overhead, packed and code < 0)
                for job, code, _sizes in spec if job in held
            }
            got = walk(extend, groups, buffers, max_bytes, max_messages, overhead)
            results.append((got, {k: b.state() for k, b in buffers.items()}))
        self.assertEqual(results[1], results[0])

    def test_c_takes_tuples_and_leaves_other_shapes(self):
        """Tuple columns are appended like lists; a group of another shape is a stop, for
        the caller's step to judge."""
        _, extend_c = c_functions()
        buffers = {("a", 1): Buf(1), ("b", 1): Buf(1)}
        groups = {("a", 1): ([7], (8,), [9], (b"z",)), ("b", 1): ([1], [2], [3])}
        self.assertEqual(walk(extend_c, groups, buffers, 100, 100, 0), (1, 1, [("b", 1)]))
        self.assertEqual(buffers[("a", 1)].state(), ([0, 7], [0, 8], [0, 9], [b"", b"z"], 1))
        with self.assertRaises(TypeError):
            extend_c({}, [], 1, 1, 0, 0)

    def test_c_appends_packed_columns_to_their_kind_only(self):
        """Packed int columns are appended to packed buffer columns of the same typecode;
        packed into lists, lists into packed, or another typecode is a stop that leaves the
        buffer untouched, for the caller's step (which converts)."""
        _, extend_c = c_functions()
        packed = make_groups([("a", -3, [1, 2])], packed=True)[("a", -3)]
        lists = make_groups([("a", -3, [1, 2])])[("a", -3)]
        odd = [array("q", packed[1]) if i == 1 else c for i, c in enumerate(packed)]
        for group, buf, appended in ((packed, Buf(1, packed=True), True),
                                     (packed, Buf(1), False), (lists, Buf(1, packed=True), False),
                                     (odd, Buf(1, packed=True), False)):
            before = Buf(1, packed=type(buf.timestamps) is array).state()
            got = walk(extend_c, {("a", -3): group}, {("a", -3): buf}, 100, 100, 0)
            if appended:
                self.assertEqual(got, (2, 3, []))
                self.assertEqual(buf.state(), (array("q", [0, 1000, 1000]),
                                               array("Q", [0, 0, 0]), array("q", [0, 0, 1]),
                                               [b"", b"x", b"xx"], 3))
            else:
                self.assertEqual(got, (0, 0, [("a", -3)]))
                self.assertEqual(buf.state(), before)
        with self.assertRaises(ValueError):
            extend_c({}, {}, 1, 1, 0, -1)


class ColumnTests(SynchronousTestCase):
    """new_columns: a buffer's columns, which the C twin keeps out of the cyclic collector."""

    def test_four_fresh_empty_lists(self):
        for new in (grouping.new_columns_py, grouping.new_columns):
            first, second = new(), new()
            self.assertEqual(first, ([], [], [], []))
            self.assertEqual(len({id(column) for column in first + second}), 8)

    def test_c_columns_are_untracked_and_work_as_lists(self):
        if grouping._new_columns_c is None:
            raise SkipTest("joblet_persist._speedups is not built (no C compiler at install)")
        columns = grouping._new_columns_c()
        self.assertEqual([gc.is_tracked(column) for column in columns], [False] * 4)
        timestamps, sequences, arrivals, contents = columns
        timestamps.extend([1, 2])
        sequences.append(3)
        arrivals[:] = [4]
        contents.extend([b"a", b"b"])
        gc.collect()
        self.assertEqual(columns, ([1, 2], [3], [4], [b"a", b"b"]))
        self.assertEqual([gc.is_tracked(column) for column in columns], [False] * 4)

    def test_decoder_group_columns_are_untracked(self):
        """The C frame decoder's group columns (bytes and ints only) are untracked too."""
        if framing._decode_log_frames_c is None:
            raise SkipTest("joblet_persist._speedups is not built (no C compiler at install)")
        body = ipc_pb2.IPCMessage(
            version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid="j", timestamp=5, sequence=1,
            data=ipc_pb2.LogLine(job_uuid="j", stream=1, timestamp=5, sequence=1,
                                 content=b"x\n").SerializeToString(),
        ).SerializeToString()
        data = struct.pack(">I", len(body)) + body
        _offset, groups, _stop = framing._decode_log_frames_c(data, 0, 1 << 20, {}, [], True)
        (columns,) = groups.values()
        self.assertEqual(columns[3], [b"x\n"])
        self.assertEqual([gc.is_tracked(column) for column in columns], [False] * 4)

    def test_packed_columns(self):
        """new_packed_columns: a metric or event buffer's columns, int columns packed as
        the decoder's groups hold them, fresh each call."""
        first, second = grouping.new_packed_columns(), grouping.new_packed_columns()
        self.assertEqual([type(c) for c in first], [array, array, array, list])
        self.assertEqual([c.typecode for c in first[:3]], ["q", "Q", "q"])
        self.assertEqual(len({id(column) for column in first + second}), 8)
