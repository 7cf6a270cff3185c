"""The C member planner produces exactly the Python planner's members and errors."""

from __future__ import annotations

import random
import zlib
from array import array
from contextlib import contextmanager
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage.compress import make_compressor

I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 60))
    contents = draw(st.lists(st.binary(max_size=40), min_size=n, max_size=n))
    timestamps = draw(
        st.one_of(
            st.lists(I64, min_size=n, max_size=n),
            st.lists(st.integers(1_700_000_000 * 10**9, 1_700_000_100 * 10**9), min_size=n,
                     max_size=n),
        )
    )
    sequences = draw(st.lists(U64, min_size=n, max_size=n))
    start = draw(I64.filter(lambda v: v < 2**63 - 10_000))
    steps = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    ordinals, value = [], start
    for step in steps:
        value += step
        ordinals.append(value)
    if ordinals[-1] > 2**63 - 1:
        ordinals = list(range(n))
    return timestamps, sequences, ordinals, contents


@contextmanager
def _planner(use_c: bool):
    """The encoders' planner within the block: the C one (as built), or the Python one."""
    saved = fmt._plan_members_c
    if not use_c:
        fmt._plan_members_c = None
    try:
        yield
    finally:
        fmt._plan_members_c = saved


def _encode(batch, use_c: bool, max_member_raw: int):
    with _planner(use_c):
        return fmt.encode_log_members(*batch, make_compressor("zlib", 1),
                                      max_member_raw=max_member_raw)


class MemberTableTests(SynchronousTestCase):
    def setUp(self):
        if fmt._plan_members_c is None:
            self.skipTest("joblet_persist._speedups is not built (no C compiler at install)")

    @given(batches(), st.integers(1, 400))
    def test_same_members_as_python(self, batch, max_member_raw):
        """For any valid batch, including extreme timestamps and sequences whose deltas wrap,
        the C path encodes byte-identical members with identical MemberInfo."""
        self.assertEqual(_encode(batch, True, max_member_raw),
                         _encode(batch, False, max_member_raw))

    def test_same_errors_as_python(self):
        """Out-of-range values and non-increasing ordinals raise ValueError on both paths."""
        bad = [
            ([2**63], [0], [0], [b"x"]),
            ([-(2**63) - 1], [0], [0], [b"x"]),
            ([0], [-1], [0], [b"x"]),
            ([0], [2**64], [0], [b"x"]),
            ([0, 0], [0, 0], [1, 1], [b"x", b"y"]),
            ([0, 0], [0, 0], [2, 1], [b"x", b"y"]),
            ([0, 0], [0, 0], [0, 2**63], [b"x", b"y"]),
        ]
        for batch in bad:
            for use_c in (True, False):
                with self.subTest(batch=batch, c=use_c):
                    self.assertRaises(ValueError, _encode, batch, use_c, 1 << 20)

    def test_order_checked_across_member_boundaries(self):
        """A non-increasing ordinal exactly at a member boundary is still refused."""
        batch = ([0, 0, 0], [0, 0, 0], [5, 6, 6], [b"aa", b"bb", b"cc"])
        self.assertRaises(ValueError, _encode, batch, True, 2)


@st.composite
def plan_batches(draw):
    """(items, timestamps, sequences, ordinals) mixing lines (one newline, at the end),
    messages with no or several newlines and empty ones, with int64/uint64 edge values whose
    deltas wrap, sometimes with many tiny messages (tables that need deflating)."""
    n = draw(st.integers(1, 80))
    line = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"") + b"\n")
    other = st.binary(max_size=30).map(lambda b: b.replace(b"\x00", b"\n"))
    items = draw(st.lists(st.one_of(line, other, st.just(b"")), min_size=n, max_size=n))
    edges = st.sampled_from((-(2**63), 2**63 - 1, 0, -1, 1))
    timestamps = draw(st.lists(st.one_of(I64, edges), min_size=n, max_size=n))
    sequences = draw(st.lists(st.one_of(U64, st.sampled_from((0, 2**64 - 1, 2**63))),
                              min_size=n, max_size=n))
    start = draw(st.one_of(st.just(-(2**63)), I64.filter(lambda v: v < 2**63 - 10_000)))
    steps = draw(st.lists(st.one_of(st.integers(1, 100), st.just(2**62)), min_size=n,
                          max_size=n))
    ordinals, value = [], start
    for step in steps:
        value += step
        ordinals.append(value)
    if ordinals[-1] > 2**63 - 1:
        ordinals = list(range(start, start + n))
    return items, timestamps, sequences, ordinals


def _plans(batch, max_member_raw, lines, max_table):
    """The C and the Python plan of ``batch`` with MAX_TABLE_BYTES set to ``max_table``."""
    saved = fmt.MAX_TABLE_BYTES
    fmt.MAX_TABLE_BYTES = max_table
    try:
        c = fmt._plan_members_c(*map(list, batch), max_member_raw, lines, max_table)
        py = fmt._plan_members_py(*map(list, batch), max_member_raw, lines)
    finally:
        fmt.MAX_TABLE_BYTES = saved
    return c, py


def _outcome(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        return (type(e), str(e))


class PlanMembersTests(SynchronousTestCase):
    """The C planner (which runs without the GIL) gives exactly the Python planner's members:
    boundaries, data, stored tables and flags, timestamp bounds."""

    def setUp(self):
        if fmt._plan_members_c is None:
            self.skipTest("joblet_persist._speedups is not built (no C compiler at install)")

    @settings(max_examples=300)
    @given(plan_batches(), st.integers(1, 400), st.booleans(),
           st.one_of(st.just(fmt.MAX_TABLE_BYTES), st.integers(48, 300)))
    def test_same_plan_as_python(self, batch, max_member_raw, lines, max_table):
        """For random batches (line and non-line messages, int64/uint64 edges, wrapped
        deltas), any member size, with and without line tables, and header limits small enough
        to force the table-too-big shrink (never below one message's largest table, 48
        bytes), both planners return identical member lists."""
        c, py = _plans(batch, max_member_raw, lines, max_table)
        self.assertIsNotNone(c)
        self.assertEqual(c, py)
        self.assertEqual(b"".join(m[1] for m in c), b"".join(batch[0]))

    def test_deflated_tables_and_real_header_limit(self):
        """Tens of thousands of tiny messages: tables big enough to be deflated and to exceed
        the real MAX_TABLE_BYTES, so that members are shrunk to fit: the same plan and the same
        encoded members on both paths, all within the header limit."""
        rng = random.Random(7)
        n = 70_000
        items = [b"%d\n" % (i % 10) if i % 1000 else b"x" for i in range(n)]
        ts = [1_700_000_000 * 10**9 + rng.randrange(10**6) for i in range(n)]
        seqs = [rng.randrange(2**20) for i in range(n)]
        batch = (items, ts, seqs, list(range(n)))
        for lines in (True, False):
            with self.subTest(lines=lines):
                c, py = _plans(batch, 1 << 20, lines, fmt.MAX_TABLE_BYTES)
                self.assertEqual(c, py)
                self.assertGreater(len(c), 1)
                self.assertTrue(all(m[4] & fmt.FLAG_TABLE_DEFLATED for m in c))
                self.assertTrue(all(len(m[3]) <= fmt.MAX_TABLE_BYTES for m in c))
                self.assertEqual(_encode(batch[1:] + (items,), True, 1 << 20),
                                 _encode(batch[1:] + (items,), False, 1 << 20))

    def test_large_batch_released_path(self):
        """A batch large enough for the C planner to release the GIL (over 256 KiB, over 4096
        messages), lines and not, split into several members by size: the same plan, and
        each member's CRC is its data's."""
        rng = random.Random(3)
        n = 20_000
        items = [b"%s %d\n" % (b"w" * rng.randrange(80), i) for i in range(n)]
        items[n // 2] = b"no newline"
        ts = [rng.randrange(-(2**63), 2**63) for _ in range(n)]
        seqs = [rng.randrange(2**64) for _ in range(n)]
        batch = (items, ts, seqs, list(range(5, n + 5)))
        for lines in (True, False):
            with self.subTest(lines=lines):
                c, py = _plans(batch, 300_000, lines, fmt.MAX_TABLE_BYTES)
                self.assertEqual(c, py)
                self.assertGreater(len(c), 3)
                self.assertEqual([zlib.crc32(m[1]) for m in c], [m[2] for m in c])

    @given(plan_batches(), st.integers(0, 3), st.sampled_from((
        2**63, -(2**63) - 1, 2**64, -1, 1.5, "7", None, bytearray(b"ab\n"))))
    def test_other_input_goes_to_the_reference(self, batch, column, bad):
        """A value of another type, or out of range, in any column (or an item that is not
        bytes): the C planner either plans it exactly like Python (a value that is in range
        there) or returns None, and encoding gives exactly the Python path's members or
        error."""
        columns = list(map(list, batch))
        k = len(columns[0]) // 2
        columns[column][k] = bad
        items, ts, seqs, ords = columns
        plan = fmt._plan_members_c(items, ts, seqs, ords, 100, True, fmt.MAX_TABLE_BYTES)
        if plan is not None:
            self.assertEqual(plan, fmt._plan_members_py(items, ts, seqs, ords, 100, True))
        batch = (ts, seqs, ords, items)
        self.assertEqual(_outcome(_encode, batch, True, 100), _outcome(_encode, batch, False, 100))

    @settings(max_examples=100)
    @given(plan_batches(), st.integers(1, 400), st.booleans(),
           st.lists(st.booleans(), min_size=3, max_size=3))
    def test_packed_columns_plan_like_lists(self, batch, max_member_raw, lines, packed):
        """Int columns packed as metric and event batches hold them (timestamps and
        ordinals array('q'), sequences array('Q')), any of them: the same plan as from
        lists, and the encoder passes them to the C planner as they are."""
        items, ts, seqs, ords = map(list, batch)
        want = fmt._plan_members_c(items, ts, seqs, ords, max_member_raw, lines,
                                   fmt.MAX_TABLE_BYTES)
        columns = [array(code, column) if pack else column
                   for code, column, pack in zip("qQq", (ts, seqs, ords), packed, strict=True)]
        self.assertEqual(fmt._plan_members_c(items, *columns, max_member_raw, lines,
                                             fmt.MAX_TABLE_BYTES), want)
        self.assertEqual(_encode((*columns, items), True, max_member_raw),
                         _encode((ts, seqs, ords, items), True, max_member_raw))

    def test_other_packed_columns_go_to_the_reference(self):
        """A buffer of another item type (array('Q') timestamps, array('i') ordinals,
        bytes), or a packed column of another length: None, and the encoder's Python path
        gives the same members or error as lists do; something neither a list nor a buffer
        is a TypeError."""
        items, ts, seqs, ords = [b"a\n", b"b\n"], [5, 6], [1, 2], [1, 2]
        want = _encode((ts, seqs, ords, items), True, 100)
        for column, odd in ((1, array("Q", ts)), (3, array("i", ords)), (2, array("q", seqs)),
                            (1, array("q", [5])), (3, b"\x01\x02")):
            with self.subTest(column=column, odd=odd):
                columns = [items, ts, seqs, ords]
                columns[column] = odd
                self.assertIsNone(fmt._plan_members_c(*columns, 100, True, fmt.MAX_TABLE_BYTES))
                if not isinstance(odd, bytes) and len(odd) == 2:
                    got = _encode((*columns[1:], items), True, 100)
                    self.assertEqual(got, want)
        self.assertRaises(TypeError, fmt._plan_members_c, items, ts, (5, 6), ords, 100, True,
                          fmt.MAX_TABLE_BYTES)

    def test_out_of_range_values_go_to_the_reference(self):
        """Each value the C planner does not take gives None and the Python planner's error:
        timestamps and ordinals outside int64, sequences outside uint64, non-ints, non-bytes."""
        good = ([b"a\n", b"b\n"], [0, 0], [0, 0], [1, 2])
        cases = (
            (1, 2**63, "timestamp out of range"), (1, -(2**63) - 1, "timestamp out of range"),
            (2, -1, "sequence out of range"), (2, 2**64, "sequence out of range"),
            (3, 2**63, "ordinal out of range"), (3, 1, "ordinals must be strictly increasing"),
            (3, -(2**63) - 1, "ordinal out of range"), (1, 1.5, None), (0, "x\n", None),
        )
        for column, bad, message in cases:
            with self.subTest(column=column, bad=bad):
                columns = [list(c) for c in good]
                columns[column][0 if column == 3 and isinstance(bad, int) and bad < 0 else 1] = bad
                items, ts, seqs, ords = columns
                self.assertIsNone(fmt._plan_members_c(items, ts, seqs, ords, 100, True,
                                                      fmt.MAX_TABLE_BYTES))
                batch = (ts, seqs, ords, items)
                got = _outcome(_encode, batch, True, 100)
                self.assertEqual(got, _outcome(_encode, batch, False, 100))
                if message is not None:
                    self.assertEqual(got[0], ValueError)
                    self.assertTrue(got[1].startswith(message), got[1])

    @given(plan_batches().filter(lambda b: len(b[0]) > 1), st.data())
    def test_unordered_ordinals_go_to_the_reference(self, batch, data):
        """Ordinals not strictly increasing anywhere: None from C, the Python planner's
        ValueError from the encoder."""
        items, ts, seqs, ords = map(list, batch)
        k = data.draw(st.integers(1, len(ords) - 1))
        ords[k] = ords[k - 1] - data.draw(st.integers(0, 3))
        self.assertIsNone(fmt._plan_members_c(items, ts, seqs, ords, 100, True,
                                              fmt.MAX_TABLE_BYTES))
        self.assertEqual(_outcome(_encode, (ts, seqs, ords, items), True, 100),
                         (ValueError, "ordinals must be strictly increasing"))

    @given(plan_batches(), st.booleans())
    def test_newline_check_in_the_planner(self, batch, use_c):
        """With ``newlines`` the C planner gives None exactly when an item does not end with a
        newline, and the metric and event encoders raise their own error for such a batch on
        both paths, before any other check (mismatched columns, a bad member size)."""
        items, ts, seqs, ords = map(list, batch)
        complete = all(item.endswith(b"\n") for item in items)
        plan = fmt._plan_members_c(items, ts, seqs, ords, 100, True, fmt.MAX_TABLE_BYTES, True)
        self.assertEqual(plan is not None, complete)
        comp = make_compressor("zlib", 1)
        with _planner(use_c):
            for what, encode in (
                ("metric", fmt.encode_metric_members),
                ("event", lambda *a, **kw: fmt.encode_event_members(3, *a, **kw)),
            ):
                for cols, size in (((ts, seqs, ords), 100), ((ts, seqs, ords[:-1]), 100),
                                   ((ts, seqs, ords), 0)):
                    got = _outcome(partial(encode, *cols, items, comp, max_member_raw=size))
                    if not complete:
                        self.assertEqual(
                            got, (ValueError, f"{what} JSON lines must end with a newline"))
                    elif size == 0 or len(cols[2]) != len(items):
                        self.assertEqual(got[0], ValueError)
                        self.assertNotIn("newline", got[1])

    def test_the_snapshot_keeps_items_alive(self):
        """The planner reads the items without the GIL from its own snapshot: data built from
        items no other reference holds is intact."""
        items = [bytes([65 + i % 26]) * 50_000 for i in range(40)]
        expect = b"".join(items)
        plan = fmt._plan_members_c(items, [0] * 40, [0] * 40, list(range(40)), 1 << 20, True,
                                   fmt.MAX_TABLE_BYTES)
        del items
        self.assertEqual(b"".join(m[1] for m in plan), expect)


def _decode(blob: bytes, info, use_c: bool):
    saved = fmt._decode_table_c
    if not use_c:
        fmt._decode_table_c = None
    try:
        return fmt.decode_member_table(blob, info)
    except fmt.CorruptMember as e:
        return ("corrupt", str(e))
    finally:
        fmt._decode_table_c = saved


@st.composite
def near_tables(draw):
    """(bytes, count): a serialized table of ``count`` values per column (sometimes one
    column longer or shorter), sometimes with one byte changed; or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200)), draw(st.integers(1, 6))
    count = draw(st.integers(1, 6))
    sizes = [count] * 4
    if draw(st.integers(0, 3)) == 0:
        sizes[draw(st.integers(0, 3))] += draw(st.sampled_from((-1, 1)))
    columns = [draw(st.lists(U64 if i in (0, 3) else I64, min_size=k, max_size=k))
               for i, k in enumerate(sizes)]
    raw = bytearray(fmt._TableProto(lengths=columns[0], timestamp_deltas=columns[1],
                                    sequence_deltas=columns[2],
                                    ordinal_deltas=columns[3]).SerializeToString())
    if raw and draw(st.integers(0, 2)) == 0:
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw), count


class OrdinalBaseTests(SynchronousTestCase):
    """encode_*_members(..., ordinal_base=B) with arrival numbers is byte for byte the
    encoding of the ordinals B + arrival, on both planners; a base that takes an ordinal
    out of int64 is the same ValueError."""

    @settings(max_examples=100)
    @given(batches(), st.integers(-(2**62), 2**62), st.integers(1, 400), st.booleans())
    def test_same_members_as_added_ordinals(self, batch, base, max_member_raw, use_c):
        timestamps, sequences, arrivals, contents = batch
        arrivals = [a - arrivals[0] for a in arrivals]  # from 0, as a job's arrival numbers
        added = [base + a for a in arrivals]
        if added[-1] > 2**63 - 1:
            return
        compressor = make_compressor("zlib", 1)
        lines = [c.replace(b"\n", b"") + b"\n" for c in contents]
        with _planner(use_c):
            for encode, items in (
                (fmt.encode_log_members, contents),
                (fmt.encode_metric_members, lines),
                (partial(fmt.encode_event_members, 5), lines),
            ):
                want = encode(timestamps, sequences, added, items, compressor, max_member_raw)
                got = encode(timestamps, sequences, arrivals, items, compressor,
                             max_member_raw, ordinal_base=base)
                self.assertEqual(got, want)

    def test_base_past_int64_is_refused(self):
        encode = partial(fmt.encode_log_members, [1, 2], [1, 2], [0, 5], [b"a\n", b"b\n"],
                         make_compressor("zlib", 1))
        for use_c in (True, False):
            with _planner(use_c):
                with self.assertRaisesRegex(ValueError, "ordinal out of range"):
                    encode(ordinal_base=2**63 - 5)
                with self.assertRaisesRegex(ValueError, "ordinal out of range"):
                    encode(ordinal_base=-(2**63) - 1)
                members = encode(ordinal_base=2**63 - 6)
                self.assertEqual(members[-1][1].last_ordinal, 2**63 - 1)


class DecodeTableTests(SynchronousTestCase):
    """The C table decoder gives exactly the protobuf path's tables, or defers to it."""

    def setUp(self):
        if fmt._decode_table_c is None:
            self.skipTest("joblet_persist._speedups is not built (no C compiler at install)")

    @given(batches(), st.integers(1, 400))
    def test_same_tables_as_python(self, batch, max_member_raw):
        """For any valid batch, including extreme timestamps and sequences whose deltas
        wrap, both decoders return identical tables for every member, and the C decoder
        did decode them (it did not defer)."""
        for blob, info in _encode(batch, True, max_member_raw):
            table = _decode(blob, info, True)
            self.assertEqual(table, _decode(blob, info, False))
            self.assertEqual(table.ordinals[0], info.first_ordinal)
            hlen = fmt.gzip_header_length(blob)
            header = bytes(blob[:hlen])
            xlen = header[10] | (header[11] << 8)
            payload = fmt._jp_payload(memoryview(header)[12 : 12 + xlen])
            _info, flags, size, stored = fmt._parse_payload(payload, 0)
            raw = stored
            if flags & fmt.FLAG_TABLE_DEFLATED:
                import zlib

                raw = zlib.decompressobj(-15).decompress(stored)
            self.assertIsNotNone(
                fmt._decode_table_c(raw, info.count, info.min_timestamp,
                                    info.first_sequence, info.first_ordinal)
            )

    @given(near_tables(), I64, U64, I64)
    def test_garbage_is_deferred_or_decoded_alike(self, table, ts0, seq0, ord0):
        """For arbitrary bytes, and for tables with a byte changed, the C decoder returns
        None (the protobuf path decides) or exactly the columns the protobuf path decodes
        from them."""
        raw, count = table
        got = fmt._decode_table_c(raw, count, ts0, seq0, ord0)
        if got is None:
            return
        try:
            msg = fmt._TableProto.FromString(raw)
        except Exception as e:  # noqa: BLE001 - upb's DecodeError
            self.fail(f"C decoded bytes protobuf rejects: {e}")
        lengths, timestamps, sequences, ordinals, total, low, high = got
        self.assertEqual(lengths, list(msg.lengths))
        self.assertEqual(timestamps, fmt._accumulate_wrapped(ts0, msg.timestamp_deltas, False))
        self.assertEqual(sequences, fmt._accumulate_wrapped(seq0, msg.sequence_deltas, True))
        self.assertEqual(ordinals, fmt._accumulate_wrapped(ord0, msg.ordinal_deltas, False))
        self.assertEqual((total, low, high), (sum(lengths), min(timestamps), max(timestamps)))

    def test_non_canonical_encodings_are_deferred(self):
        """Unpacked fields, fields out of order, a wrong count, a truncated varint: None."""
        table = fmt._TableProto(lengths=[3, 4], timestamp_deltas=[0, 5], sequence_deltas=[1, 1],
                                ordinal_deltas=[0, 1])
        canonical = table.SerializeToString()
        self.assertIsNotNone(fmt._decode_table_c(canonical, 2, 10, 0, 0))
        self.assertEqual(fmt._decode_table_c(canonical, 2, 10, 0, 0)[1], [10, 15])
        unpacked = b"".join(
            bytes([(field << 3) | 0, v]) for field, vals in
            ((1, [3, 4]), (2, [0, 10]), (3, [2, 2]), (4, [0, 1])) for v in vals
        )
        self.assertEqual(fmt._TableProto.FromString(unpacked), table)
        for raw, count in ((unpacked, 2), (canonical, 3), (canonical, 1), (canonical[:-1], 2),
                           (canonical + b"\x08\x01", 2), (b"", 2)):
            with self.subTest(raw=raw, count=count):
                self.assertIsNone(fmt._decode_table_c(raw, count, 10, 0, 0))
        self.assertIsNone(fmt._decode_table_c(canonical, 2, 2**63, 0, 0))  # base not int64
        self.assertIsNone(fmt._decode_table_c(canonical, 0, 10, 0, 0))
