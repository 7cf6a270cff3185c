"""Tests for joblet_persist.storage.format and .compress: the member byte format."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import random
import struct
import subprocess
import zlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from joblet_persist._proto import ipc_pb2
from joblet_persist.storage import format as fmt
from joblet_persist.storage.compress import COMPRESSOR_LEVELS, make_compressor

I64_MIN, I64_MAX, U64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
COMPRESSORS = [("zlib", 6), ("deflate", 6), ("isal", 1), ("zlib", 0), ("deflate", 12)]


def concat(pieces):
    """Join encoded members into a file image, shifting offsets as a writer does."""
    data, infos, off = [], [], 0
    for blob, info in pieces:
        data.append(blob)
        infos.append(dataclasses.replace(info, offset=off))
        off += len(blob)
    return b"".join(data), infos


def encode_logs(contents, compressor=None, start_ord=0, ts=None, seqs=None, **kw):
    """Encode contents with simple increasing ordinals/sequences and given timestamps."""
    n = len(contents)
    ts = ts if ts is not None else [1_700_000_000_000_000_000 + i for i in range(n)]
    seqs = seqs if seqs is not None else list(range(n))
    ords = list(range(start_ord, start_ord + n))
    return fmt.encode_log_members(
        ts, seqs, ords, contents, compressor or make_compressor("zlib", 6), **kw
    )


def read_varint(buf, pos):
    """Decode one LEB128 varint (the doc's definition), returning (value, new_pos)."""
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def unzigzag(z):
    """Zigzag decoding as the doc defines it."""
    return (z >> 1) ^ -(z & 1)


def doc_reader(blob):
    """An independent reader written from docs/storage-format.md only.

    Returns a list of (header fields dict, messages [(ts, seq, ordinal, bytes)]).
    """
    out = []
    pos = 0
    while pos < len(blob):
        assert blob[pos : pos + 4] == b"\x1f\x8b\x08\x04"
        assert blob[pos + 4 : pos + 10] == b"\x00\x00\x00\x00\x00\xff"
        (xlen,) = struct.unpack_from("<H", blob, pos + 10)
        assert blob[pos + 12 : pos + 14] == b"JP"
        (plen,) = struct.unpack_from("<H", blob, pos + 14)
        assert xlen == plen + 4
        payload = blob[pos + 16 : pos + 16 + plen]
        version, kind, flags, _r, meta_crc = struct.unpack_from("<BBBBI", payload, 0)
        assert version == 1 and zlib.crc32(payload[8:]) == meta_crc
        size, count, raw_size, table_raw = struct.unpack_from("<IIII", payload, 8)
        first_ord, last_ord, min_ts, max_ts = struct.unpack_from("<qqqq", payload, 24)
        first_seq, last_seq = struct.unpack_from("<QQ", payload, 56)
        table = payload[72:]
        if flags & 1:
            table = zlib.decompress(table, -15)
        assert len(table) == table_raw
        cols = [None] if flags & 2 else []  # a line member has no lengths column
        tpos = 0
        for key in (0x12, 0x1A, 0x22) if flags & 2 else (0x0A, 0x12, 0x1A, 0x22):
            assert table[tpos] == key
            length, tpos = read_varint(table, tpos + 1)
            end = tpos + length
            col = []
            while tpos < end:
                v, tpos = read_varint(table, tpos)
                col.append(v)
            cols.append(col)
        lengths, tsd, seqd, ordd = cols
        tsd = [unzigzag(z) for z in tsd]
        seqd = [unzigzag(z) for z in seqd]
        data_start = pos + 16 + plen
        data = zlib.decompress(blob[data_start : pos + size - 8], -15)
        crc, isize = struct.unpack_from("<II", blob, pos + size - 8)
        assert zlib.crc32(data) == crc and len(data) == isize == raw_size
        if lengths is None:  # message i is line i of the data
            assert data.endswith(b"\n") and data.count(b"\n") == count
            lengths = [len(line) + 1 for line in data[:-1].split(b"\n")]
        msgs, t, s, o, off = [], min_ts, first_seq, first_ord, 0
        for i in range(count):
            t = ((t + tsd[i] - I64_MIN) % (1 << 64)) + I64_MIN
            s = (s + seqd[i]) % (1 << 64)
            o += ordd[i]
            msgs.append((t, s, o, data[off : off + lengths[i]]))
            off += lengths[i]
        assert o == last_ord and s == last_seq
        fields = dict(kind=kind, count=count, min_ts=min_ts, max_ts=max_ts, size=size)
        out.append((fields, msgs))
        pos += size
    return out


class CompressorTests(SynchronousTestCase):
    """make_compressor gives raw deflate producers with a gzip CRC."""

    def test_round_trip_every_compressor(self):
        """Each compressor's output inflates with zlib as raw deflate; crc32 matches zlib's."""
        data = b"some log output\n" * 5000 + bytes(range(256))
        for name, level in COMPRESSORS:
            c = make_compressor(name, level)
            self.assertEqual((c.name, c.level), (name, level))
            self.assertEqual(zlib.decompress(c.compress_raw(data), -15), data)
            self.assertEqual(zlib.decompress(c.compress_raw(b""), -15), b"")
            self.assertEqual(c.crc32(data), zlib.crc32(data))
            self.assertEqual(c.crc32(data[100:], c.crc32(data[:100])), zlib.crc32(data))

    def test_every_documented_level_works(self):
        """Every level in COMPRESSOR_LEVELS is accepted and produces valid deflate."""
        for name, (low, high) in COMPRESSOR_LEVELS.items():
            for level in range(low, high + 1):
                c = make_compressor(name, level)
                self.assertEqual(zlib.decompress(c.compress_raw(b"abc" * 50), -15), b"abc" * 50)

    def test_invalid_name_or_level(self):
        """An unknown name or an out-of-range level raises ValueError naming both."""
        e = self.assertRaises(ValueError, make_compressor, "lz4", 1)
        self.assertIn("'lz4'", str(e))
        for name, level in [("isal", 4), ("zlib", 10), ("deflate", 13), ("zlib", -1)]:
            e = self.assertRaises(ValueError, make_compressor, name, level)
            self.assertIn(repr(name), str(e))
            self.assertIn(str(level), str(e))
        self.assertRaises(ValueError, make_compressor, "zlib", True)
        self.assertRaises(ValueError, make_compressor, "zlib", 6.0)


class LogMemberTests(SynchronousTestCase):
    """encode_log_members output: gzip outside, exact messages inside."""

    def assertRoundTrip(self, contents, **kw):
        pieces = encode_logs(contents, **kw)
        blob, infos = concat(pieces)
        self.assertEqual(gzip.decompress(blob), b"".join(contents))
        f = io.BytesIO(blob)
        got = []
        for info in infos:
            table, data = fmt.read_member(f, info)
            self.assertEqual(fmt.inflate_member(f, info), data)
            self.assertEqual(fmt.decode_member_table(f, info), table)
            bounds = fmt.message_bounds(table, data)
            got += [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.assertEqual(got, list(contents))
        self.assertEqual(sum(i.count for i in infos), len(contents))
        return blob, infos

    def test_binary_empty_and_huge_contents(self):
        """Binary bytes, empty chunks and a chunk over 64 KiB come back byte-exact."""
        huge = bytes(range(256)) * 1024 + b"\x00\xff"  # 256 KiB + 2
        contents = [b"", b"\x00\x01\x02\xff", b"", b"line\r\n", huge, b"", b"\n"]
        self.assertRoundTrip(contents)

    def test_all_empty_batch_of_chunks(self):
        """A batch of only empty chunks is valid gzip of nothing and keeps its count."""
        blob, infos = self.assertRoundTrip([b""] * 5)
        self.assertEqual([i.count for i in infos], [5])
        self.assertEqual(infos[0].raw_size, 0)

    def test_empty_batch(self):
        """An empty batch encodes to no members."""
        self.assertEqual(encode_logs([]), [])

    def test_many_tiny_messages_split_by_table(self):
        """Many tiny messages are split so each table fits XLEN <= 65535."""
        n = 60000
        rnd = random.Random(7)
        ts = [rnd.getrandbits(40) for _ in range(n)]  # ~6-byte deltas, incompressible
        contents = [bytes([i % 251]) for i in range(n)]
        blob, infos = self.assertRoundTrip(contents, ts=ts)
        self.assertGreater(len(infos), 1)
        for info in infos:
            (xlen,) = struct.unpack_from("<H", blob, info.offset + 10)
            self.assertLessEqual(xlen, 65535)

    def test_split_by_raw_size(self):
        """A batch larger than max_member_raw becomes several members; one big message stays whole."""
        contents = [b"a" * 100] * 50 + [b"b" * 5000] + [b"c" * 10] * 3
        blob, infos = self.assertRoundTrip(contents, max_member_raw=1000)
        self.assertTrue(all(i.raw_size <= 1000 or i.count == 1 for i in infos))
        self.assertIn(5000, [i.raw_size for i in infos])
        self.assertEqual(infos[0].first_ordinal, 0)
        for a, b in zip(infos, infos[1:], strict=False):
            self.assertEqual(b.first_ordinal, a.last_ordinal + 1)

    def test_gzip_binary_and_module_read_the_file(self):
        """`gzip -dc` and Python's gzip module both print exactly the concatenated contents."""
        contents = [b"hello\n", b"", b"\x00\x9f binary", b"x" * 70000, b"tail"]
        pieces = encode_logs(contents) + encode_logs([b"more\n"] * 3, start_ord=10)
        blob, _ = concat(pieces)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(blob)
        expected = b"".join(contents) + b"more\n" * 3
        out = subprocess.run(["gzip", "-dc", path], capture_output=True, check=True).stdout
        self.assertEqual(out, expected)
        with gzip.open(path, "rb") as g:
            self.assertEqual(g.read(), expected)

    def test_every_compressor_writes_gzip(self):
        """Members from each compressor decode with the standard library."""
        contents = [b"line %d\n" % i for i in range(1000)]
        for name, level in COMPRESSORS:
            blob, _ = self.assertRoundTrip(contents, compressor=make_compressor(name, level))
            self.assertEqual(gzip.decompress(blob), b"".join(contents))

    def test_header_layout_and_determinism(self):
        """The header has MTIME 0, OS 255 and the JP subfield; equal input gives equal bytes."""
        a = encode_logs([b"x", b"y"])
        b = encode_logs([b"x", b"y"])
        self.assertEqual(a, b)
        blob = a[0][0]
        self.assertEqual(blob[:10], b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff")
        self.assertEqual(blob[12:14], b"JP")
        self.assertEqual(blob[16], fmt.FORMAT_VERSION)
        self.assertEqual(blob[17], fmt.KIND_LOG)
        info = a[0][1]
        self.assertEqual(len(blob), info.size)
        self.assertEqual(struct.unpack_from("<I", blob, 16 + 8)[0], info.size)

    def test_independent_reader_from_the_doc(self):
        """A reader written from docs/storage-format.md alone decodes every message."""
        ts = [5, 3, 3, I64_MAX, I64_MIN, 0]
        seqs = [U64_MAX, 0, 7, 6, U64_MAX, 1]
        contents = [b"a", b"", b"ccc", b"\x00", b"e" * 300, b"f"]
        ords = [10, 11, 15, 100, 101, 10**12]
        pieces = fmt.encode_log_members(ts, seqs, ords, contents, make_compressor("isal", 2))
        pieces += encode_logs([b"%d" % i for i in range(3000)], start_ord=10**12 + 1)
        blob, infos = concat(pieces)
        members = doc_reader(blob)
        msgs = [m for _, ms in members for m in ms]
        self.assertEqual(msgs[:6], list(zip(ts, seqs, ords, contents, strict=True)))
        self.assertEqual(len(msgs), 3006)
        self.assertEqual(members[0][0]["min_ts"], I64_MIN)
        self.assertEqual(members[0][0]["max_ts"], I64_MAX)

    def test_extreme_values_round_trip(self):
        """int64 timestamp and uint64 sequence extremes survive the wrapped deltas."""
        ts = [I64_MIN, I64_MAX, I64_MIN, 0, -1]
        seqs = [0, U64_MAX, 0, U64_MAX, 1]
        ords = [I64_MIN, -5, 0, 1, I64_MAX]
        pieces = fmt.encode_log_members(ts, seqs, ords, [b"1"] * 5, make_compressor("zlib", 1))
        blob, infos = concat(pieces)
        table = fmt.decode_member_table(blob, infos[0])
        self.assertEqual((table.timestamps, table.sequences, table.ordinals), (ts, seqs, ords))
        self.assertEqual((infos[0].first_sequence, infos[0].last_sequence), (0, 1))

    def test_invalid_batches(self):
        """Mismatched columns, non-increasing ordinals and out-of-range values are ValueErrors."""
        c = make_compressor("zlib", 1)
        enc = fmt.encode_log_members
        self.assertRaises(ValueError, enc, [1], [1, 2], [1], [b"a"], c)
        self.assertRaises(ValueError, enc, [1, 2], [1, 2], [5, 5], [b"a", b"b"], c)
        self.assertRaises(ValueError, enc, [1, 2], [1, 2], [5, 4], [b"a", b"b"], c)
        self.assertRaises(ValueError, enc, [1 << 63], [1], [1], [b"a"], c)
        self.assertRaises(ValueError, enc, [1], [-1], [1], [b"a"], c)
        self.assertRaises(ValueError, enc, [1], [1 << 64], [1], [b"a"], c)
        self.assertRaises(ValueError, enc, [1], [1], [1], [b"a"], c, max_member_raw=0)

    def test_decode_table_sources(self):
        """decode_member_table accepts member bytes, a path and a file object."""
        pieces = encode_logs([b"a", b"bb"]) + encode_logs([b"ccc"], start_ord=5)
        blob, infos = concat(pieces)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(blob)
        second = infos[1]
        member_bytes = blob[second.offset : second.offset + second.size]
        expected = fmt.MemberTable([3], [1_700_000_000_000_000_000], [0], [5])
        self.assertEqual(fmt.decode_member_table(member_bytes, second), expected)
        self.assertEqual(fmt.decode_member_table(path, second), expected)
        with open(path, "rb") as f:
            self.assertEqual(fmt.decode_member_table(f, second), expected)
        header_only = member_bytes[: 12 + struct.unpack_from("<H", member_bytes, 10)[0]]
        self.assertEqual(fmt.decode_member_table(header_only, second), expected)

    def test_parse_member_header(self):
        """parse_member_header returns the MemberInfo for ours and None for plain gzip."""
        blob, info = encode_logs([b"abc"])[0]
        parsed, hlen = fmt.parse_member_header(blob, 1234)
        self.assertEqual(parsed, dataclasses.replace(info, offset=1234))
        self.assertEqual(hlen, 12 + struct.unpack_from("<H", blob, 10)[0])
        plain = gzip.compress(b"x", mtime=0)
        self.assertEqual(fmt.parse_member_header(plain), (None, 10))
        self.assertRaises(ValueError, fmt.parse_member_header, blob[:20])
        self.assertRaises(ValueError, fmt.parse_member_header, b"\x00" * 100)

    def test_header_bit_flip_detected(self):
        """Any flipped bit in the JP payload is caught by its checksum."""
        blob, info = encode_logs([b"abc", b"de"])[0]
        plen = struct.unpack_from("<H", blob, 14)[0]
        for pos in range(16 + 8, 16 + plen):
            bad = bytearray(blob)
            bad[pos] ^= 0x10
            self.assertRaises(ValueError, fmt.parse_member_header, bytes(bad))
            self.assertRaises(fmt.CorruptMember, fmt.decode_member_table, bytes(bad), info)

    def test_corrupt_data_names_file_and_offset(self):
        """A flipped data byte fails the CRC; the error names the file and offset."""
        pieces = encode_logs([b"first"]) + encode_logs([b"second member data" * 10], start_ord=1)
        blob, infos = concat(pieces)
        target = infos[1]
        bad = bytearray(blob)
        bad[target.offset + target.size - 12] ^= 0xFF
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(bad)
        with open(path, "rb") as f:
            self.assertEqual(fmt.inflate_member(f, infos[0]), b"first")
            e = self.assertRaises(fmt.CorruptMember, fmt.inflate_member, f, target)
            self.assertIn(path, str(e))
            self.assertIn(f"offset {target.offset}", str(e))
            self.assertRaises(fmt.CorruptMember, fmt.read_member, f, target)
        short = io.BytesIO(blob[: target.offset + 5])
        self.assertRaises(fmt.CorruptMember, fmt.inflate_member, short, target)

    @given(
        st.lists(
            st.tuples(
                st.integers(I64_MIN, I64_MAX),
                st.integers(0, U64_MAX),
                st.integers(1, 1 << 40),
                st.binary(max_size=300),
            ),
            max_size=60,
        ),
        st.sampled_from(COMPRESSORS),
        st.integers(1, 2000),
    )
    def test_random_batches_round_trip(self, rows, comp, max_raw):
        """Random batches (any values, any split size, any compressor) round-trip exactly."""
        ts = [r[0] for r in rows]
        seqs = [r[1] for r in rows]
        ords = list(accumulate_from(-(10**6), [r[2] for r in rows]))
        contents = [r[3] for r in rows]
        pieces = fmt.encode_log_members(
            ts, seqs, ords, contents, make_compressor(*comp), max_member_raw=max_raw
        )
        blob, infos = concat(pieces)
        self.assertEqual(gzip.decompress(blob) if blob else b"", b"".join(contents))
        f = io.BytesIO(blob)
        got = []
        for info in infos:
            table, data = fmt.read_member(f, info)
            bounds = fmt.message_bounds(table, data)
            for i in range(info.count):
                got.append((table.timestamps[i], table.sequences[i], table.ordinals[i],
                            data[bounds[i] : bounds[i + 1]]))  # fmt: skip
            self.assertEqual(info.min_timestamp, min(table.timestamps))
            self.assertEqual(info.max_timestamp, max(table.timestamps))
        self.assertEqual(got, list(zip(ts, seqs, ords, contents, strict=True)))


def accumulate_from(base, steps):
    """Running sums of positive steps starting after ``base``."""
    total = base
    for s in steps:
        total += s
        yield total


def metric_payload(**kw):
    """A serialized joblet.ipc.Metric built from keyword fields."""
    data = kw.pop("data", None)
    m = ipc_pb2.Metric(**kw)
    if data is not None:
        m.data.CopyFrom(data)
    return m.SerializeToString()


_i64 = st.integers(-(1 << 63), (1 << 63) - 1)
_any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 1e16, 1e-7, 5e-324, 1.7976931348623157e308, math.nan,
                     -math.inf]),
)


@st.composite
def _metric_payloads(draw) -> bytes:
    """A Metric with any subset of its fields set (unset ones are 0 or absent messages)."""
    m = ipc_pb2.Metric()
    if draw(st.booleans()):
        m.timestamp = draw(_i64)
    if draw(st.booleans()):
        m.sequence = draw(st.integers(0, (1 << 64) - 1))
    if draw(st.booleans()):
        m.job_uuid = draw(st.text(max_size=5))
    if draw(st.booleans()):
        d = m.data
        d.cpu_usage = draw(_any_float)
        d.gpu_usage = draw(_any_float)
        d.memory_usage = draw(_i64)
        for name in ("read_bytes", "write_bytes", "read_ops", "write_ops"):
            if draw(st.booleans()):
                setattr(d.disk_io, name, draw(_i64))
        for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            if draw(st.booleans()):
                setattr(d.network_io, name, draw(_i64))
    return m.SerializeToString()


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def _wire_field(draw, numbers, depth=0) -> bytes:
    """A field of a Metric-like message: any number in ``numbers`` (or unknown), any wire
    type, embedded messages (also repeated, also wrongly typed), groups, bad UTF-8."""
    number = draw(st.one_of(st.sampled_from(numbers), st.integers(1, 40)))
    wire = draw(st.sampled_from([0, 0, 1, 2, 2, 5, 3]))
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(draw(st.integers(-(1 << 63), (1 << 64) - 1)))
    if wire == 1:
        return tag + struct.pack("<d", draw(_any_float))
    if wire == 5:
        return tag + b"\x00\x00\x80\x3f"
    if wire == 3:
        return tag + _varint(1 << 3) + b"\x01" + _varint(number << 3 | 4)
    if depth < 2 and draw(st.booleans()):
        body = b"".join(draw(st.lists(_wire_field(range(1, 6), depth + 1), max_size=5)))
    else:
        body = draw(st.sampled_from([b"", b"job", b"\xff\xfe", "é".encode()]))
    return tag + _varint(len(body)) + body


class MetricLineTests(SynchronousTestCase):
    """metric_json_line and metric members: jq-friendly JSON lines."""

    @given(st.lists(_wire_field(range(1, 5)), max_size=8), st.text(max_size=10))
    def test_c_twin_on_any_payload(self, fields, job_id):
        """On any payload (unknown fields, wrong wire types, repeated embedded messages,
        groups, invalid UTF-8, truncation), metric_json_line (the C twin when built) gives the
        protobuf route's line, or both raise ValueError."""
        for payload in (b"".join(fields), b"".join(fields)[:-1]):
            try:
                want = fmt._metric_json_line_py(job_id, payload)
            except ValueError:
                self.assertRaises(ValueError, fmt.metric_json_line, job_id, payload)
                continue
            self.assertEqual(fmt.metric_json_line(job_id, payload), want)

    @given(st.lists(st.lists(_wire_field(range(1, 5)), max_size=6), max_size=5),
           st.text(max_size=10))
    def test_batch_same_as_single_lines(self, payloads, job_id):
        """metric_json_lines (one C call for the batch when built) gives, for each payload of
        a batch of any payloads, metric_json_line's line, or None where it raises."""
        batch = [b"".join(fields) for fields in payloads]
        batch += [p[:-1] for p in batch if p]
        want = []
        for payload in batch:
            try:
                want.append(fmt.metric_json_line(job_id, payload))
            except ValueError:
                want.append(None)
        for builder in (fmt._metric_lines_c, None):  # the C batch, then the fallback
            self.patch(fmt, "_metric_lines_c", builder)
            self.assertEqual(fmt.metric_json_lines(job_id, batch), want)

    def test_usage_texts_of_a_large_batch_are_repr(self):
        """A batch large enough to be written without the GIL formats its usages without
        the interpreter's float repr: the texts must still be repr's, for doubles of every
        kind (random bit patterns, short decimals, subnormals, the ends of repr's fixed-point
        range, exact powers of two, integers, -0.0, NaN and infinities; subnormals and
        powers of two take repr with the GIL; [1e-3, 1e14) takes integer arithmetic)."""
        rng = random.Random(7)
        values = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
                  for _ in range(3000)]
        values += [rng.uniform(0, 400) for _ in range(500)]
        values += [round(rng.uniform(0, 100), rng.randrange(6)) for _ in range(500)]
        values += [2.0 ** k for k in range(-1074, 1024, 7)] + [-(2.0 ** 60), 0.5, 1024.0]
        values += [1e16, 9999999999999998.0, 1e15, 1e-4, 9.999999999999999e-05, 1e-5, 5e-324,
                   1.7976931348623157e308, 0.1, 1 / 3, 100.0, 1e22, -0.0, 0.0, math.nan,
                   math.inf, -math.inf, 123456789012345678.0,
                   9.4883095999446e-310, 8.3693941028992e-310, 3 * 5e-324, 2.2250738585072e-308]
        values += [rng.randrange(1, 10 ** rng.randrange(1, 17)) / 10 ** rng.randrange(20)
                   for _ in range(1000)]
        # [1e-3, 1e14) takes 128-bit integers instead of printf: the doubles next to each
        # power of ten and to both ends (where the first digit's place is easy to get wrong),
        # any magnitude, and short binary fractions (exact ties between decimals).
        for power in range(-4, 16):
            for toward in (0.0, math.inf):
                value = 10.0 ** power
                for _ in range(12):
                    values.append(value)
                    value = math.nextafter(value, toward)
        values += [10 ** rng.uniform(-3.5, 14.5) for _ in range(4000)]
        values += [rng.randrange(1, 1 << 53) / (1 << rng.randrange(1, 60)) for _ in range(1000)]
        batch = [ipc_pb2.Metric(job_uuid="j", data=ipc_pb2.MetricData(
            cpu_usage=v, gpu_usage=-v)).SerializeToString() for v in values]
        want = [fmt._metric_json_line_py("j", p) for p in batch]
        self.assertEqual(fmt.metric_json_lines("j", batch), want)
        line = json.loads(want[values.index(1e16)])
        self.assertEqual((line["data"]["cpu_usage"], line["data"]["gpu_usage"]), (1e16, -1e16))

    def test_c_twin_in_use(self):
        """When the extension is built, canonical payloads take the C route."""
        if fmt._metric_line_c is None:
            raise SkipTest("joblet_persist._speedups is not built")
        payload = ipc_pb2.Metric(timestamp=-1, sequence=(1 << 64) - 1, data=ipc_pb2.MetricData(
            cpu_usage=math.inf, gpu_usage=0.1, memory_usage=-(1 << 63))).SerializeToString()
        line = fmt._metric_line_c('"j"', payload)
        self.assertEqual(line, fmt._metric_json_line_py("j", payload))
        self.assertIn(b'"cpu_usage":null', line)
        self.assertIsNone(fmt._metric_line_c('"j"', payload + b"\x22\x00"))  # data twice

    @given(_metric_payloads(), st.text(max_size=40))
    def test_same_bytes_as_json_dumps(self, payload, job_id):
        """The line is byte for byte json.dumps of metric_record_dict (compact separators,
        ASCII escapes), whatever is set: non-finite floats null, unset fields 0, exact
        64-bit integers, any job id text."""
        metric = ipc_pb2.Metric.FromString(payload)
        want = json.dumps(
            fmt.metric_record_dict(job_id, metric), separators=(",", ":"), allow_nan=False
        ).encode() + b"\n"
        self.assertEqual(fmt.metric_json_line(job_id, payload), want)

    def test_full_sample(self):
        """All fields appear with docs/wire.md snake_case keys and exact integers."""
        data = ipc_pb2.MetricData(
            cpu_usage=12.5,
            memory_usage=(1 << 62) + 1,
            gpu_usage=0.25,
            disk_io=ipc_pb2.DiskIO(read_bytes=1, write_bytes=2, read_ops=3, write_ops=4),
            network_io=ipc_pb2.NetworkIO(rx_bytes=5, tx_bytes=6, rx_packets=7, tx_packets=8),
        )
        ts = 1_700_000_000_123_456_789  # beyond 2**53: floats would lose it
        line = fmt.metric_json_line(
            "job-1", metric_payload(job_uuid="other", timestamp=ts, sequence=U64_MAX, data=data)
        )
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertNotIn(b" ", line)
        obj = json.loads(line)
        self.assertEqual(
            obj,
            {
                "job_uuid": "job-1",
                "timestamp": ts,
                "sequence": U64_MAX,
                "data": {
                    "cpu_usage": 12.5,
                    "memory_usage": (1 << 62) + 1,
                    "gpu_usage": 0.25,
                    "disk_io": {"read_bytes": 1, "write_bytes": 2, "read_ops": 3, "write_ops": 4},
                    "network_io": {"rx_bytes": 5, "tx_bytes": 6, "rx_packets": 7, "tx_packets": 8},
                },
            },
        )
        self.assertIsInstance(obj["timestamp"], int)

    def test_defaults_present(self):
        """An empty Metric still produces every numeric field, zero-valued."""
        obj = json.loads(fmt.metric_json_line("j", b""))
        self.assertEqual(obj["timestamp"], 0)
        self.assertEqual(obj["data"]["cpu_usage"], 0.0)
        self.assertEqual(obj["data"]["disk_io"]["write_ops"], 0)
        self.assertEqual(obj["data"]["network_io"]["tx_packets"], 0)

    def test_non_finite_becomes_null(self):
        """NaN or infinite usage is written as null so the line stays valid JSON."""
        data = ipc_pb2.MetricData(cpu_usage=math.nan, gpu_usage=math.inf)
        line = fmt.metric_json_line("j", metric_payload(data=data))
        obj = json.loads(line)
        self.assertIsNone(obj["data"]["cpu_usage"])
        self.assertIsNone(obj["data"]["gpu_usage"])

    def test_undecodable_payload(self):
        """A payload that is not a Metric raises ValueError."""
        self.assertRaises(ValueError, fmt.metric_json_line, "j", b"\xff\xff\xff")

    def test_metric_members_decode_with_gzip_and_json(self):
        """zcat of metric members gives JSON lines that json.loads exactly."""
        lines = []
        for i in range(500):
            ts = 1_700_000_000_000_000_001 + i * 1_000_000_000
            data = ipc_pb2.MetricData(cpu_usage=i / 3, memory_usage=i * 1024)
            lines.append(fmt.metric_json_line("job", metric_payload(timestamp=ts, sequence=i, data=data)))
        ts = [json.loads(x)["timestamp"] for x in lines]
        pieces = fmt.encode_metric_members(
            ts, list(range(500)), list(range(500)), lines, make_compressor("deflate", 6),
            max_member_raw=8000,
        )  # fmt: skip
        blob, infos = concat(pieces)
        self.assertGreater(len(infos), 1)
        self.assertTrue(all(i.kind == fmt.KIND_METRIC for i in infos))
        text = gzip.decompress(blob)
        self.assertEqual(text, b"".join(lines))
        decoded = [json.loads(x) for x in text.splitlines()]
        self.assertEqual([d["timestamp"] for d in decoded], ts)
        self.assertEqual(decoded[7]["data"]["cpu_usage"], 7 / 3)

    def test_metric_lines_need_newline(self):
        """encode_metric_members refuses a line without its newline."""
        self.assertRaises(
            ValueError, fmt.encode_metric_members, [1], [1], [1], [b"{}"], make_compressor("zlib", 1)
        )
