"""Line tables (JP flag FLAG_LINES): members of newline-terminated messages carry no
lengths column; readers split their data at the newlines.  Also: members of a later
format (unknown flag bits or JP version) are refused as UnsupportedMember, never cut."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage import tail
from joblet_persist.storage.api import STREAM_STDOUT, ReadStats
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.reader import SegmentView, iter_logs, iter_metrics
from joblet_persist.storage.search import compile_matcher, search_views
from joblet_persist.storage.segment import segment_name, thd_append, thd_scan_segment
from tests.test_storage_local import JOB, StorageTestCase, rows

COMP = make_compressor("zlib", 6)
T0 = 1_700_000_000 * 10**9


def encode(contents, lines=True, start_ord=0, max_member_raw=fmt.DEFAULT_MEMBER_RAW, ts=None):
    n = len(contents)
    ts = ts if ts is not None else [T0 + i for i in range(n)]
    return fmt.encode_log_members(
        ts, list(range(n)), list(range(start_ord, start_ord + n)), contents, COMP,
        max_member_raw=max_member_raw, lines=lines,
    )  # fmt: skip


def flags_of(blob: bytes) -> int:
    """The JP flags byte of the member at the start of ``blob``."""
    return blob[16 + 2]


def stored_table(blob: bytes) -> bytes:
    """The member's table, inflated when it is stored deflated."""
    (plen,) = struct.unpack_from("<H", blob, 14)
    table = blob[16 + 72 : 16 + plen]
    return zlib.decompress(table, -15) if flags_of(blob) & fmt.FLAG_TABLE_DEFLATED else table


def forge(data: bytes, count: int, *, flags: int = fmt.FLAG_LINES, version: int = 1,
          lengths=None, kind: int = fmt.KIND_LOG, first_ordinal: int = 0) -> bytes:
    """A member built field by field from docs/storage-format.md (valid CRCs and sizes),
    so that its flags, version and table can say anything."""
    table = fmt._TableProto(
        lengths=lengths or (), timestamp_deltas=[0] * count, sequence_deltas=[0] * count,
        ordinal_deltas=[0] + [1] * (count - 1),
    ).SerializeToString()
    body = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = body.compress(data) + body.flush()
    size = 16 + 72 + len(table) + len(body) + 8
    tail_ = struct.pack(
        "<IIIIqqqqQQ", size, count, len(data), len(table), first_ordinal,
        first_ordinal + count - 1, T0, T0, 0, 0,
    ) + table  # fmt: skip
    payload = bytes((version, kind, flags, 0)) + struct.pack("<I", zlib.crc32(tail_)) + tail_
    header = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", 4 + len(payload))
              + b"JP" + struct.pack("<H", len(payload)) + payload)
    member = header + body + struct.pack("<II", zlib.crc32(data), len(data))
    assert len(member) == size
    return member


def read_all(blob: bytes) -> list:
    """Every message of the concatenated members in ``blob``, through read_member."""
    f = io.BytesIO(blob)
    out, pos = [], 0
    while pos < len(blob):
        info, _hlen = fmt.parse_member_header(blob[pos : pos + 65600], pos)
        table, data = fmt.read_member(f, info)
        bounds = fmt.message_bounds(table, data)
        out += [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        pos += info.size
    return out


def a_line():
    return st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n")


@st.composite
def mixed_batches(draw):
    """Batches of log messages: runs of lines, with sometimes a non-line among them (no
    newline, an inner newline, empty, a progress bar's ``\\r``) and lone ``\\n`` lines."""
    n = draw(st.integers(1, 80))
    other = st.one_of(st.binary(max_size=30), st.just(b""), st.just(b"50%\r"),
                      st.just(b"a\nb\n"), st.just(b"\n"))
    contents = draw(st.lists(st.one_of(a_line(), a_line(), a_line(), other),
                             min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
    return contents, ts


def _with(attr, value, fn, *args, **kw):
    saved = getattr(fmt, attr)
    setattr(fmt, attr, value)
    try:
        return fn(*args, **kw)
    finally:
        setattr(fmt, attr, saved)


class EncodeTests(SynchronousTestCase):
    """Which members get a line table, and what it holds."""

    def test_all_lines_get_a_line_table(self):
        """A batch of newline-terminated messages is one member with FLAG_LINES, whose
        table has no lengths column (no field 1 key) and three columns of ``count``
        values; zcat shows the same bytes."""
        contents = [b"line %d\n" % i for i in range(100)]
        (blob, info), = encode(contents)
        self.assertTrue(flags_of(blob) & fmt.FLAG_LINES)
        msg = fmt._TableProto.FromString(stored_table(blob))
        self.assertEqual(list(msg.lengths), [])
        self.assertEqual(len(msg.timestamp_deltas), 100)
        self.assertNotEqual(stored_table(blob)[0], 0x0A)
        self.assertEqual(gzip.decompress(blob), b"".join(contents))
        self.assertEqual(read_all(blob), contents)

    def test_non_lines_keep_the_lengths_column(self):
        """An empty message, one without a newline, one with an inner newline, a
        progress bar redrawn with ``\\r``: the member keeps its lengths column."""
        for odd in (b"", b"no newline", b"two\nlines\n", b"\rprogress 50%", b"50%\r"):
            with self.subTest(odd=odd):
                contents = [b"a\n", odd, b"b\n"]
                (blob, _info), = encode(contents)
                self.assertFalse(flags_of(blob) & fmt.FLAG_LINES)
                self.assertEqual(list(fmt._TableProto.FromString(stored_table(blob)).lengths),
                                 [2, len(odd), 2])
                self.assertEqual(read_all(blob), contents)

    def test_a_lone_newline_is_a_line(self):
        """``\\n`` alone is a (blank) line: a member of blank lines is a line member."""
        contents = [b"\n", b"x\n", b"\n", b"\n"]
        (blob, _info), = encode(contents)
        self.assertTrue(flags_of(blob) & fmt.FLAG_LINES)
        self.assertEqual(read_all(blob), contents)

    def test_the_choice_is_per_member(self):
        """In one batch split into members, the members of lines get line tables and the
        member holding a partial line does not."""
        contents = [b"%03d\n" % i for i in range(30)] + [b"partial"] + [b"z\n"] * 30
        pieces = encode(contents, max_member_raw=40)
        flags = [bool(flags_of(b) & fmt.FLAG_LINES) for b, _ in pieces]
        self.assertIn(True, flags)
        self.assertIn(False, flags)
        self.assertEqual(read_all(b"".join(b for b, _ in pieces)), contents)

    def test_lines_false_writes_the_old_encoding(self):
        """``lines=False`` (storage.lineTables: false) writes the lengths column and never
        FLAG_LINES: the bytes an older release reads."""
        contents = [b"line %d\n" % i for i in range(50)]
        for use_c in (True, False):
            with self.subTest(c=use_c):
                c = fmt._plan_members_c if use_c else None
                (blob, _info), = _with("_plan_members_c", c, encode, contents, lines=False)
                self.assertEqual(flags_of(blob) & ~fmt.FLAG_TABLE_DEFLATED, 0)
                self.assertEqual(list(fmt._TableProto.FromString(stored_table(blob)).lengths),
                                 [len(m) for m in contents])

    def test_line_table_is_smaller(self):
        """Short lines: the line table is smaller than the table with lengths."""
        contents = [b"%d\n" % (i * 7919 % 1000) for i in range(5000)]
        (lines, _), = encode(contents)
        (old, _), = encode(contents, lines=False)
        self.assertLess(len(lines), len(old))

    def test_metric_and_event_members_are_line_members(self):
        """Metric and event members (JSON lines) get line tables."""
        line = b'{"a":1}\n'
        (m, _), = fmt.encode_metric_members([T0], [0], [0], [line], COMP)
        (e, _), = fmt.encode_event_members(3, [T0], [0], [0], [line], COMP)
        self.assertTrue(flags_of(m) & fmt.FLAG_LINES)
        self.assertTrue(flags_of(e) & fmt.FLAG_LINES)


class TwinTests(SynchronousTestCase):
    """The C planner and table decoder match the Python reference on line members."""

    def setUp(self):
        if fmt._plan_members_c is None or fmt._decode_table_c is None:
            self.skipTest("joblet_persist._speedups is not built (no C compiler at install)")

    @settings(max_examples=200)
    @given(mixed_batches(), st.integers(1, 300), st.booleans())
    def test_c_and_python_encode_the_same_bytes(self, batch, max_member_raw, lines):
        """On batches mixing line and non-line messages, any split, with or without line
        tables, both encoders produce byte-identical members (and MemberInfo), and both
        decoders the same tables."""
        contents, ts = batch
        c = encode(contents, lines, max_member_raw=max_member_raw, ts=ts)
        py = _with("_plan_members_c", None, encode, contents, lines,
                   max_member_raw=max_member_raw, ts=ts)
        self.assertEqual(c, py)
        for blob, info in c:
            table = fmt.decode_member_table(blob, info)
            self.assertEqual(table, _with("_decode_table_c", None,
                                          fmt.decode_member_table, blob, info))
            self.assertEqual(table.lengths is None, bool(flags_of(blob) & fmt.FLAG_LINES))
        self.assertEqual(read_all(b"".join(b for b, _ in c)), contents)

    @given(st.binary(max_size=60).map(lambda b: b.replace(b"\x00", b"\n")), st.integers(0, 12))
    def test_line_bounds_c_matches_python(self, data, count):
        """``_speedups.line_bounds`` gives the Python reference's offsets, or None alike."""
        self.assertEqual(fmt._line_bounds_c(data, count), fmt._line_bounds_py(data, count))
        self.assertEqual(fmt._line_bounds_c(bytearray(data), count),
                         fmt._line_bounds_py(data, count))


class CorruptLineMemberTests(SynchronousTestCase):
    """A line member whose data is not ``count`` whole lines is corrupt."""

    BAD = [
        (b"a\nb\nc", 2, "no newline at the end"),
        (b"a\nb\n", 3, "fewer lines than count"),
        (b"a\nb\nc\n", 2, "more lines than count"),
    ]

    def test_read_member_refuses(self):
        """read_member and message_bounds raise CorruptMember naming the member."""
        for data, count, why in self.BAD:
            with self.subTest(why=why):
                blob = forge(data, count)
                info, _ = fmt.parse_member_header(blob)
                e = self.assertRaises(fmt.CorruptMember, fmt.read_member, io.BytesIO(blob), info)
                self.assertIn("newline", str(e))
        good = forge(b"a\nb\n", 2)
        self.assertEqual(read_all(good), [b"a\n", b"b\n"])

    def test_a_line_table_with_lengths_is_corrupt(self):
        """A line member whose table still has a lengths column does not decode."""
        blob = forge(b"a\nb\n", 2, lengths=[2, 2])
        info, _ = fmt.parse_member_header(blob)
        for c in (fmt._decode_table_c, None):
            with self.subTest(c=c is not None):
                self.assertRaises(fmt.CorruptMember, _with, "_decode_table_c", c,
                                  fmt.decode_member_table, blob, info)

    def test_queries_skip_it_and_count_it(self):
        """Reads, searches and tails skip the corrupt line member (counted) and return
        the messages of the good members around it."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, segment_name("stdout", 0))
        good1 = encode([b"one\n", b"two\n"], start_ord=0)[0][0]
        bad = forge(b"x\ny\nz", 2, first_ordinal=2)
        good2 = encode([b"five\n"], start_ord=4)[0][0]
        thd_append(path, good1 + bad + good2, 0, False)
        scan = thd_scan_segment(path, repair=False)
        self.assertEqual(len(scan.members), 3)
        streams = {1: (SegmentView(path, scan.members),), 2: ()}
        stats = ReadStats()
        got = [r.content for r in iter_logs(streams, 1, stats=stats)]
        self.assertEqual(got, [b"one\n", b"two\n", b"five\n"])
        self.assertEqual(stats.corrupt_members, 1)
        stats = ReadStats()
        rows = [c for chunk in search_views(streams, 1, compile_matcher(""), stats=stats)
                for c in chunk[3]]
        self.assertEqual(rows, [b"one\n", b"two\n", b"five\n"])
        self.assertEqual(stats.corrupt_members, 1)
        self.flushLoggedErrors()


class LineReadTests(SynchronousTestCase):
    """Reads, seeks, searches and tails give the same answers over line members as over
    the old encoding."""

    def setUp(self):
        self.files = {}
        self.messages = []
        for lines in (True, False):
            d = self.mktemp()
            os.makedirs(d)
            views = {1: [], 2: []}
            ordinal = 0
            for b in range(12):
                for stream in (1, 2):
                    n = 20 if stream == 1 else 7
                    contents = [b"s%d b%d m%d\n" % (stream, b, i) for i in range(n)]
                    if b % 5 == 4:
                        contents[3] = b"progress %d%%\r" % b  # this member keeps lengths
                    ts = [T0 + b * 1000 + i for i in range(n)]
                    pieces = fmt.encode_log_members(
                        ts, list(range(n)), list(range(ordinal, ordinal + n)), contents, COMP,
                        max_member_raw=100, lines=lines,
                    )  # fmt: skip
                    ordinal += n
                    path = os.path.join(d, segment_name("stdout" if stream == 1 else "stderr",
                                                        b // 4))
                    size = os.path.getsize(path) if os.path.exists(path) else 0
                    thd_append(path, b"".join(p for p, _ in pieces), size, False)
                    if lines:
                        self.messages += [(stream, t, c) for t, c in zip(ts, contents, strict=True)]
            for stream, kind in ((1, "stdout"), (2, "stderr")):
                for i in range(3):
                    path = os.path.join(d, segment_name(kind, i))
                    views[stream].append(
                        SegmentView(path, thd_scan_segment(path, repair=False).members))
            self.files[lines] = {k: tuple(v) for k, v in views.items()}
        flags = []
        for v in self.files[True][1]:
            with open(v.path, "rb") as f:
                flags += [bool(fmt.read_member_header(f, m.offset)[18] & fmt.FLAG_LINES)
                          for m in v.members]
        self.assertIn(True, flags)
        self.assertIn(False, flags)

    def rows(self, lines, **kw):
        return [(r.stream, r.timestamp, r.content) for r in iter_logs(self.files[lines], **kw)]

    def test_reads_and_seeks(self):
        """Whole reads, offsets, limits and time ranges of each stream and both merged
        return the same records from line members as from lengths members, and the
        records written."""
        for stream in (0, 1, 2):
            for kw in ({}, {"offset": 13, "limit": 9}, {"offset": 150},
                       {"start_time": T0 + 3005, "end_time": T0 + 7010},
                       {"start_time": T0 + 2003, "offset": 5, "limit": 30}):
                with self.subTest(stream=stream, **kw):
                    got = self.rows(True, stream=stream, **kw)
                    self.assertEqual(got, self.rows(False, stream=stream, **kw))
                    if stream and not kw:
                        self.assertEqual(got, [m for m in self.messages if m[0] == stream])

    def test_search(self):
        """Searches match the same messages in line members as in lengths members."""
        for pattern, regex in (("m1", False), (r"^s2 b\d m[0-3]\n?$", True),
                               ("progress", False)):
            m = compile_matcher(pattern, regex)
            for kw in ({}, {"start_time": T0 + 3005, "end_time": T0 + 7010}):
                got = [r for chunk in search_views(self.files[True], 0, m, **kw)
                       for r in zip(*chunk, strict=True)]
                old = [r for chunk in search_views(self.files[False], 0, m, **kw)
                       for r in zip(*chunk, strict=True)]
                self.assertEqual(got, old)
                self.assertTrue(got)

    def test_tail(self):
        """count_logs and the last N messages agree over both encodings."""
        for stream in (0, 1, 2):
            n = tail.count_logs(self.files[True], stream)
            self.assertEqual(n, tail.count_logs(self.files[False], stream))
            last = [r[3] for chunk in tail.iter_log_chunks_ordinals(
                self.files[True], stream, offset=n - 25) for r in zip(*chunk, strict=True)]
            old = [r[3] for chunk in tail.iter_log_chunks_ordinals(
                self.files[False], stream, offset=n - 25) for r in zip(*chunk, strict=True)]
            self.assertEqual(last, old)
            self.assertEqual(len(last), 25)

    def test_metrics(self):
        """Metric line members read back (bulk-parsed and by offset) as written."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, segment_name("metrics", 0))
        lines = [b'{"job_uuid":"j","timestamp":%d,"sequence":%d,"data":{"cpu_usage":%d}}\n'
                 % (T0 + i, i, i) for i in range(40)]
        pieces = fmt.encode_metric_members([T0 + i for i in range(40)], list(range(40)),
                                           list(range(40)), lines, COMP, max_member_raw=500)
        self.assertTrue(all(flags_of(b) & fmt.FLAG_LINES for b, _ in pieces))
        thd_append(path, b"".join(b for b, _ in pieces), 0, False)
        segs = (SegmentView(path, thd_scan_segment(path, repair=False).members),)
        got = [(r.timestamp, r.data["cpu_usage"]) for r in iter_metrics(segs, offset=7)]
        self.assertEqual(got, [(T0 + i, i) for i in range(7, 40)])


class UnsupportedMemberTests(SynchronousTestCase):
    """Members of a later format are refused as UnsupportedMember, and a scan never cuts
    them, even with repair: it stops there and leaves the file as it is."""

    LATER = [
        ({"flags": 4}, "JP flag bits 0x4"),
        ({"flags": 4 | fmt.FLAG_LINES}, "JP flag bits 0x4"),
        ({"version": 2}, "JP version 2"),
    ]

    def test_header_is_unsupported_not_corrupt(self):
        """parse_member_header and decode_member_table raise UnsupportedMember (not
        CorruptMember) for unknown flag bits and an unknown JP version."""
        for kw, reason in self.LATER:
            with self.subTest(**kw):
                blob = forge(b"a\nb\n", 2, **kw)
                e = self.assertRaises(fmt.UnsupportedMember, fmt.parse_member_header, blob)
                self.assertIn(reason, str(e))
                self.assertNotIsInstance(e, fmt.CorruptMember)
                info, _ = fmt.parse_member_header(forge(b"a\nb\n", 2))
                self.assertRaises(fmt.UnsupportedMember, fmt.decode_member_table, blob, info)

    def _file(self, *members) -> str:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, segment_name("stdout", 0))
        with open(path, "wb") as f:
            f.write(b"".join(members))
        return path

    def test_scan_with_repair_never_cuts_it(self):
        """thd_scan_segment(repair=True) of a file whose last member (or a middle one) has
        flags bit 2 (value 4) or JP version 2 leaves the file byte for byte, reports the
        member's offset and reason, and lists the members before it."""
        good = encode([b"one\n", b"two\n"])[0][0]
        after = encode([b"three\n"], start_ord=3)[0][0]
        for kw, reason in self.LATER:
            later = forge(b"x\ny\n", 2, first_ordinal=2, **kw)
            for members in ((good, later), (good, later, after), (later,),
                            (good, later, b"\x00" * 40)):
                with self.subTest(kw=kw, n=len(members)):
                    path = self._file(*members)
                    with open(path, "rb") as f:
                        before = f.read()
                    result = thd_scan_segment(path, repair=True)
                    with open(path, "rb") as f:
                        self.assertEqual(f.read(), before)
                    self.assertFalse(result.truncated)
                    offset = len(good) if members[0] is good else 0
                    self.assertEqual(result.unsupported[0], offset)
                    self.assertIn(reason, result.unsupported[1])
                    self.assertEqual(len(result.members), 1 if members[0] is good else 0)
                    self.assertEqual(result.valid_size, offset)

    def test_a_corrupt_last_member_is_still_cut(self):
        """The same file with a member that is damaged rather than of a later format (its
        header checksum fails) is cut as a torn tail: the rule above is specific."""
        good = encode([b"one\n", b"two\n"])[0][0]
        damaged = bytearray(forge(b"x\ny\n", 2, first_ordinal=2))
        damaged[18] = 4  # the flags byte, after the checksum was computed
        damaged[16 + 20] ^= 1  # and the size field: the checksum no longer matches
        path = self._file(good, bytes(damaged))
        result = thd_scan_segment(path, repair=True)
        self.assertTrue(result.truncated)
        self.assertIsNone(result.unsupported)
        self.assertEqual(os.path.getsize(path), len(good))



class StorageTests(StorageTestCase):
    """LocalStorage: storage.lineTables, and jobs whose files hold a later format."""

    def member_flags(self, name="stdout.log.gz"):
        path = os.path.join(self.data_dir, "logs", JOB, name)
        scan = thd_scan_segment(path, repair=False)
        with open(path, "rb") as f:
            return [fmt.read_member_header(f, m.offset)[18] for m in scan.members]

    def test_line_tables_on_by_default_and_off(self):
        """By default appended lines get line tables; with line_tables=False
        (storage.lineTables: false) every member has a lengths column, and both read."""
        for line_tables, expect in ((True, fmt.FLAG_LINES), (False, 0)):
            with self.subTest(line_tables=line_tables):
                shutil.rmtree(self.data_dir, ignore_errors=True)
                storage = self.make(line_tables=line_tables)
                self.append(storage, STREAM_STDOUT, rows(0, b"a\n", b"b\n"))
                self.append(storage, STREAM_STDOUT, rows(2, b"c", b"d\n"))
                flags = [f & fmt.FLAG_LINES for f in self.member_flags()]
                self.assertEqual(flags, [expect, 0])
                self.assertEqual(self.logs(storage),
                                 [(1, b"a\n"), (1, b"b\n"), (1, b"c"), (1, b"d\n")])
                self.successResultOf(storage.stop())

    def test_later_format_is_left_alone_and_reported(self):
        """A job whose segment ends with a member of a later format (flags bit 2) loads:
        the member is not cut, the segment is counted and logged by name, queries return
        the messages before it, and appends go on in a new segment, never into that file."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"first\n", b"second\n"))
        self.successResultOf(storage.stop())
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        with open(path, "ab") as f:
            f.write(forge(b"later\n", 1, flags=4, first_ordinal=2))
        with open(path, "rb") as f:
            before = f.read()
        storage = self.make()
        self.assertEqual(self.logs(storage), [(1, b"first\n"), (1, b"second\n")])
        self.assertEqual(storage.unsupported_segments, 1)
        self.assertEqual(storage.repaired_segments, 0)
        self.append(storage, STREAM_STDOUT, rows(3, b"third\n"))
        self.assertEqual(self.logs(storage),
                         [(1, b"first\n"), (1, b"second\n"), (1, b"third\n")])
        self.assertEqual(self.segment_files(), ["stdout.log.gz", "stdout_000001.log.gz"])
        self.successResultOf(storage.stop())
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(storage.job_info(JOB).size_bytes,
                         len(before) + os.path.getsize(path.replace(".log", "_000001.log")))


class ConfigTests(SynchronousTestCase):
    """storage.lineTables: a bool, true by default, passed to LocalStorage."""

    def test_key(self):
        """Omitted: true; false is read; a non-bool is an error naming the key and file;
        the storage built from the config writes what the key says."""
        from joblet_persist.config import ConfigError, config_from_string, default_config
        from joblet_persist.storage.backends import make_storage

        self.assertIs(default_config().storage.line_tables, True)
        cfg = config_from_string("storage:\n  lineTables: false\n", source="c.yml")
        self.assertIs(cfg.storage.line_tables, False)
        e = self.assertRaises(ConfigError, config_from_string,
                              "storage:\n  lineTables: sometimes\n", source="c.yml")
        self.assertIn("c.yml", str(e))
        self.assertIn("storage.lineTables", str(e))
        storage = make_storage(cfg, run=lambda f, *a, **k: None, clock=task.Clock())
        self.assertIs(storage._line_tables, False)
