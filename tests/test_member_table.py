"""The C member-table builder produces exactly the Python encoder's bytes and errors."""

from __future__ import annotations

from hypothesis import given
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


def _encode(batch, use_c: bool, max_member_raw: int):
    saved = fmt._member_table
    if not use_c:
        fmt._member_table = None
    try:
        return fmt.encode_log_members(*batch, make_compressor("zlib", 1),
                                      max_member_raw=max_member_raw)
    finally:
        fmt._member_table = saved


class MemberTableTests(SynchronousTestCase):
    def setUp(self):
        if fmt._member_table is None:
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
