"""Tests for joblet_persist.storage.search: patterns, the member scan and its bounds."""

from __future__ import annotations

import os
from concurrent.futures import Future
from itertools import accumulate

import re2
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage.api import ReadStats
from joblet_persist.storage.reader import iter_logs
from joblet_persist.storage.search import (
    BadPattern,
    ScanLimits,
    SearchLimitExceeded,
    compile_matcher,
    required_literals,
    search_views,
)
from tests.test_storage_reader import COMP, JobWriter

#: Text that exercises case folding (KELVIN SIGN, LONG S, non-ASCII letters), newlines and
#: the regex metacharacters as literal content.
TEXT = st.text(alphabet="abkKsSE \n\u212a\u017f\u00e9\u00c9.*(1", max_size=12)
LITERALS = st.text(alphabet="abkKsSE \n\u212a\u017f\u00e9\u00c9.*(1", max_size=4)
REGEXES = st.text(alphabet="abkKsE \\.*+?()[]|^$1{},dwS", max_size=8)


def _strip(content: bytes) -> bytes:
    """A message without its final newline: what a pattern is matched against."""
    return content[:-1] if content.endswith(b"\n") else content


def _reference(pattern: str, regex: bool, ignore_case: bool):
    """RE2 alone, over one message at a time, without its final newline: what a match
    means."""
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    options.literal = not regex
    raw = pattern.encode("utf-8")
    rx = re2.compile(b"(?m)" + raw if regex else raw, options)
    return lambda content: rx.search(_strip(content)) is not None


def _layout(messages: list):
    data = b"".join(messages)
    return data, list(accumulate(map(len, messages), initial=0))


def _chunks_to_rows(chunks) -> list:
    return [row for chunk in chunks for row in zip(*chunk, strict=True)]


class MatcherTests(SynchronousTestCase):
    """Matcher.scan finds exactly the messages that match on their own."""

    @given(st.lists(TEXT, max_size=8), LITERALS)
    def test_substring_is_python_in(self, texts, pattern):
        """A case-sensitive substring matches the messages that contain it (Python's
        ``in``), never across a message boundary."""
        messages = [t.encode("utf-8") for t in texts]
        data, bounds = _layout(messages)
        m = compile_matcher(pattern)
        want = [i for i, msg in enumerate(messages) if pattern.encode("utf-8") in _strip(msg)]
        self.assertEqual(m.scan(data, bounds, range(len(messages))), want)

    @given(st.lists(TEXT, max_size=8), LITERALS, st.booleans())
    def test_substring_ignoring_case_is_re2(self, texts, pattern, ignore_case):
        """With or without case folding, a substring matches as RE2 decides per message
        (KELVIN SIGN and LONG S included, which ASCII lower-casing would miss)."""
        messages = [t.encode("utf-8") for t in texts]
        data, bounds = _layout(messages)
        m = compile_matcher(pattern, ignore_case=ignore_case)
        ref = _reference(pattern, False, ignore_case)
        want = [i for i, msg in enumerate(messages) if ref(msg)]
        self.assertEqual(m.scan(data, bounds, range(len(messages))), want)

    @given(st.lists(TEXT, max_size=8), REGEXES, st.booleans(), st.booleans(), st.data())
    def test_regex_is_re2_per_message(self, texts, pattern, ignore_case, lines, data_):
        """A regular expression (multi-line) matches as RE2 does on each message alone,
        without its final newline, whatever literal the prefilter took from it, within any
        subset of positions; also when every message ends in a newline and the whole data
        is searched at once (the context search)."""
        try:
            m = compile_matcher(pattern, regex=True, ignore_case=ignore_case)
        except BadPattern:
            assume(False)
        messages = [t.encode("utf-8") + (b"\n" if lines else b"") for t in texts]
        data, bounds = _layout(messages)
        ref = _reference(pattern, True, ignore_case)
        positions = data_.draw(st.sampled_from(["all", "range", "list"]))
        n = len(messages)
        if positions == "all":
            where = range(n)
        elif positions == "range":
            lo = data_.draw(st.integers(0, n))
            where = range(lo, data_.draw(st.integers(lo, n)))
        else:
            where = sorted(data_.draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n)))
            where = [i for i in where if i < n]
        want = [i for i in where if ref(messages[i])]
        self.assertEqual(m.scan(data, bounds, where), want)
        self.assertEqual(m.scan(bytearray(data), bounds, where), want)

    @given(st.lists(st.text(alphabet="ab \u212aE\n", max_size=6).map(lambda t: t + "\n"),
                    min_size=1, max_size=8),
           st.sampled_from([r"^a", r"a$", r"\ba", r"a\B", r"^$", r"a\s*$", r"\n$", r"^\n",
                            r"(?s)a.b", r"(?i)k\b", r"\Bb", r"^a b$", r"a\z", r"\Aa",
                            r"(?-m)^a"]))
    def test_context_search_finds_every_match(self, texts, pattern):
        """Assertions at message boundaries (^, $, \\b, \\B, \\A, \\z, multi-line off) give
        the same matches through the whole-data search as one message at a time."""
        m = compile_matcher(pattern, regex=True)
        messages = [t.encode("utf-8") for t in texts]
        data, bounds = _layout(messages)
        ref = _reference(pattern, True, False)
        self.assertEqual(m.scan(data, bounds, range(len(messages))),
                         [i for i, msg in enumerate(messages) if ref(msg)])

    def test_context_search_is_used_where_it_is_safe(self):
        """The whole-data search is on for plain regular expressions, off for \\A, \\z and
        multi-line mode turned off, and only for members whose messages all end in a
        newline, unless the pattern has no assertion at all."""
        from joblet_persist.storage.search import _lines_only

        self.assertTrue(compile_matcher(r"err\w+$", regex=True).context_ok)
        for pattern in (r"\Aerr", r"err\z", r"(?-m)^err", r"(?i-m)err$"):
            self.assertFalse(compile_matcher(pattern, regex=True).context_ok, pattern)
        self.assertFalse(compile_matcher("err").context_ok)
        # Without any assertion the whole-data search needs no newline at the ends.
        self.assertTrue(compile_matcher(r"err\w+=\d", regex=True).assertion_free)
        for pattern in (r"^err", r"err$", r"\berr", r"[^e]rr", r"err\B"):
            self.assertFalse(compile_matcher(pattern, regex=True).assertion_free, pattern)
        m = compile_matcher(r"a.b", regex=True)
        data, bounds = _layout([b"xa", b"yb\n", b"a b", b"ab"])
        self.assertEqual(m.scan(data, bounds, range(4)), [2])
        self.assertTrue(_lines_only(*_layout([b"a\n", b"\n"])))
        self.assertTrue(_lines_only(*_layout([b"a\n"])))
        for messages in ([b"a", b"b\n"], [b"a\n", b""], [b""], [b"a\nb"], []):
            self.assertFalse(_lines_only(*_layout(messages)), messages)

    def test_final_newline_is_not_matched(self):
        """A message's final newline is not part of what is matched, as grep's lines have
        none; a newline inside a message is."""
        data, bounds = _layout([b"a\n", b"a\nb\n", b"a"])
        self.assertEqual(compile_matcher("a\n").scan(data, bounds, range(3)), [1])
        self.assertEqual(compile_matcher(r"a\n", regex=True).scan(data, bounds, range(3)), [1])
        self.assertEqual(compile_matcher(r"b$", regex=True).scan(data, bounds, range(3)), [1])

    def test_required_literals(self):
        """Only unquantified top-level literal runs are required; anything unsure is None."""
        cases = {
            "ERROR": ["ERROR"],
            r"disk \d+ full": ["disk ", " full"],
            "ab?c": ["a", "c"],
            "ab{2}c": ["a", "c"],
            "a{,2}": ["a", ",2}"],
            r"x\.y": ["x.y"],
            "(foo)bar": ["bar"],
            "[[:alpha:]]x": ["x"],
            "[]a]b": ["b"],
            "a|b": None,
            "(?i)abc": None,
            r"\Qa.b\E": None,
            r"\x41": None,
            "^start$": ["start"],
        }
        for pattern, want in cases.items():
            self.assertEqual(required_literals(pattern), want, pattern)

    def test_needles(self):
        """The needle is the longest required run; case folding keeps only runs that ASCII
        lower-casing compares exactly; a substring pattern decides alone."""
        m = compile_matcher("connection refused")
        self.assertEqual((m.needle, m.exact, m.folded), (b"connection refused", True, False))
        m = compile_matcher("Timeout", ignore_case=True)  # RE2 finds it in the whole data
        self.assertEqual((m.needle, m.exact, m.assertion_free), (None, False, True))
        m = compile_matcher(r"disk \d", regex=True, ignore_case=True)  # 'k' folds to KELVIN
        self.assertEqual((m.needle, m.exact, m.folded), (b"di", False, True))
        m = compile_matcher(r"user=\w+ failed", regex=True)
        self.assertEqual((m.needle, m.exact), (b" failed", False))
        m = compile_matcher(r"^\d+$", regex=True)
        self.assertIsNone(m.needle)

    def test_case_invariant_needles(self):
        """Ignoring case, the longest run of digits, punctuation and spaces (which do not
        fold) is the needle, compared with the data as it is (no lower-cased copy); a
        pattern of letters alone keeps RE2 (substring) or the folded needle (regex)."""
        m = compile_matcher("RETRY=62308 USER=459", ignore_case=True)
        self.assertEqual((m.needle, m.folded, m.exact), (b"=62308 ", False, False))
        self.assertTrue(m.matches(b"x retry=62308 user=459\n"))
        m = compile_matcher(r"user=\d+ FAILED: 42", regex=True, ignore_case=True)
        self.assertEqual((m.needle, m.folded), (b": 42", False))
        m = compile_matcher("Timeout a", ignore_case=True)
        self.assertEqual(m.needle, None)
        m = compile_matcher(r"disk \d", regex=True, ignore_case=True)
        self.assertEqual((m.needle, m.folded), (b"di", True))

    def test_invalid_patterns_name_the_problem(self):
        """An invalid regex raises BadPattern quoting the pattern and RE2's reason; lookbehind
        and backreferences (not linear-time) are refused."""
        for pattern, reason in [("(abc", "missing )"), ("a**", "bad repetition"),
                                ("(?<=a)b", "invalid perl operator"),
                                (r"(a)\1", "invalid escape")]:
            e = self.assertRaises(BadPattern, compile_matcher, pattern, True)
            self.assertIn(repr(pattern), str(e))
            self.assertIn(reason, str(e))
        e = self.assertRaises(BadPattern, compile_matcher, "x" * 5000)
        self.assertIn("longer than the limit", str(e))
        # The same text as a substring is fine.
        self.assertTrue(compile_matcher("(abc").matches(b"x(abcy"))

    def test_empty_pattern_matches_every_message(self):
        """An empty pattern matches every message, as ``grep ''`` does."""
        data, bounds = _layout([b"a\n", b"", b"b\n"])
        for ic in (False, True):
            self.assertEqual(compile_matcher("", ignore_case=ic).scan(data, bounds, range(3)),
                             [0, 1, 2])


class ManualPool:
    """A ``submit`` whose work runs only when a result is asked for, then every pending
    piece at once in reverse submission order; records how many were pending at most."""

    def __init__(self):
        self.pending: list = []
        self.most = 0
        self.calls = 0

    def submit(self, fn, *args):
        pool = self

        class Lazy(Future):
            def result(self, timeout=None):
                pool.run_all()
                return super().result(timeout)

        future = Lazy()
        self.pending.append((future, fn, args))
        self.calls += 1
        self.most = max(self.most, len(self.pending))
        return future

    def run_all(self):
        pending, self.pending = self.pending, []
        for future, fn, args in reversed(pending):
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)


class SearchViewsTests(SynchronousTestCase):
    """search_views over real segment files: the same matches as a filter of iter_logs."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        w = JobWriter(self.dir, per_segment=8)
        self.messages = []
        words = [b"ok", b"ERROR disk full", b"warn", b"error: timeout", b"Error 42"]
        for b in range(40):
            out = [(1_000 + b, b * 10 + i, b"out %d %s\n" % (b, words[(b + i) % 5]))
                   for i in range(10)]
            w.logs(1, out)
            if b % 3 == 0:
                err = [(1_000 + b, i, b"err %d %s" % (b, words[(b * i) % 5])) for i in range(4)]
                w.logs(2, err)
        self.streams = w.streams()
        self.all = list(iter_logs(self.streams, 0))

    def expected(self, matcher, stream=0, start=0, end=0):
        return [
            (r.stream, r.timestamp, r.sequence, r.content)
            for r in self.all
            if (stream == 0 or r.stream == stream)
            and (start <= 0 or r.timestamp >= start)
            and (end <= 0 or r.timestamp <= end)
            and matcher.matches(r.content)
        ]

    def test_same_matches_as_a_filter_of_the_read(self):
        """For substrings, case folding and regexes, each stream and both merged, with
        and without a time range, the matches are the read's messages that match, in
        arrival order."""
        patterns = [("ERROR", False, False), ("error", False, True), (r"err\w* \d+", True, True),
                    (r"^out 1\d ", True, False), ("", False, False), ("nothing here", False, False)]
        for pattern, regex, ic in patterns:
            m = compile_matcher(pattern, regex, ic)
            for stream in (0, 1, 2):
                for start, end in ((0, 0), (1_012, 1_020), (1_030, 0)):
                    got = _chunks_to_rows(search_views(self.streams, stream, m, start, end))
                    self.assertEqual(got, self.expected(m, stream, start, end),
                                     (pattern, stream, start, end))

    def test_order_does_not_depend_on_completion_order(self):
        """Members scanned through a pool that finishes them in reverse order still give
        the matches in arrival order; at most ``window`` members are in flight."""
        m = compile_matcher("e", ignore_case=True)
        pool = ManualPool()
        got = _chunks_to_rows(search_views(self.streams, 0, m, submit=pool.submit, window=3))
        self.assertEqual(got, self.expected(m))
        self.assertEqual(pool.most, 3)
        self.assertEqual(pool.calls, 40 + 14)

    def test_members_outside_the_range_are_not_read(self):
        """A time range inflates only the members it overlaps; the rest are skipped by
        their index entry."""
        stats = ReadStats()
        m = compile_matcher("out")
        got = _chunks_to_rows(search_views(self.streams, 1, m, 1_010, 1_014, stats=stats))
        self.assertEqual(len(got), 50)
        self.assertEqual(stats.members_inflated, 5)
        self.assertEqual(stats.members_skipped, 35)

    def test_byte_bound_stops_after_yielding_what_was_scanned(self):
        """With a bound on raw bytes, the matches of the members scanned come out, then
        SearchLimitExceeded names the bytes scanned and the time to resume from."""
        members = [m for v in self.streams[1] for m in v.members]
        bound = members[0].raw_size + members[1].raw_size
        limits = ScanLimits(max_bytes=bound)
        got = []
        gen = search_views(self.streams, 1, compile_matcher("out"), limits=limits, window=2)
        e = self.assertRaises(SearchLimitExceeded, lambda: [got.extend(zip(*c, strict=True)) for c in gen])
        self.assertEqual(len(got), 20)
        self.assertEqual(e.bytes_scanned, bound)
        self.assertEqual(e.resume_time, members[2].min_timestamp)
        self.assertIn(str(bound), e.reason)

    def test_bound_on_merged_streams_sends_a_prefix(self):
        """With both streams merged and their members overlapping in arrival order (each
        member spans ordinals the other stream's members hold too), a search stopped by its
        bound has sent a prefix of the whole answer (no match of a later ordinal before one
        of a member not scanned), and its resume time is no later than the first match it
        left out."""
        d = self.mktemp()
        os.makedirs(d)
        w = JobWriter(d)
        for b in range(10):
            for stream in (1, 2):
                ords = [b * 40 + 2 * i + stream - 1 for i in range(20)]
                rows = [(1_000 + o, o, b"s%d %d e\n" % (stream, o)) for o in ords]
                pieces = fmt.encode_log_members([r[0] for r in rows], [r[1] for r in rows],
                                                ords, [r[2] for r in rows], COMP)
                w._append(stream, "stdout" if stream == 1 else "stderr", pieces)
        streams = w.streams()
        m = compile_matcher("e")
        want = [(r.stream, r.timestamp, r.sequence, r.content)
                for r in iter_logs(streams, 0) if m.matches(r.content)]
        self.assertEqual(len(want), 400)
        members = sorted((mb for k in (1, 2) for v in streams[k] for mb in v.members),
                         key=lambda mb: mb.first_ordinal)
        for n in range(1, 12):
            limits = ScanLimits(max_bytes=sum(mb.raw_size for mb in members[:n]))
            got = []
            gen = search_views(streams, 0, m, limits=limits, window=3)
            e = self.assertRaises(SearchLimitExceeded,
                                  lambda gen=gen, got=got: [got.extend(zip(*c, strict=True))
                                                            for c in gen])
            self.assertEqual(got, want[:len(got)], n)
            self.assertLessEqual(e.resume_time, want[len(got)][1], n)

    def test_deadline_stops_the_scan(self):
        """Past the deadline no further member is started (the first one always is)."""
        now = [0.0]

        def clock():
            now[0] += 1.0
            return now[0]

        limits = ScanLimits(deadline=2.5, clock=clock)
        got = []
        gen = search_views(self.streams, 1, compile_matcher("out"), limits=limits, window=1)
        e = self.assertRaises(SearchLimitExceeded, lambda: [got.extend(zip(*c, strict=True)) for c in gen])
        self.assertIn("time", e.reason)
        self.assertEqual(len(got), 30)

    def test_cancelled_stops_before_the_next_member(self):
        """cancelled() turning true stops the scan before it reads another member."""
        flag = []
        stats = ReadStats()
        gen = search_views(self.streams, 1, compile_matcher("out"), stats=stats,
                           cancelled=lambda: bool(flag), window=1)
        first = next(gen)
        flag.append(True)
        self.assertEqual(list(gen), [])
        self.assertEqual(len(first[0]), 10)
        self.assertEqual(stats.members_inflated, 1)

    def test_corrupt_member_is_skipped_and_counted(self):
        """A member whose data does not inflate is counted corrupt; the others match."""
        view = self.streams[1][0]
        victim = view.members[2]
        with open(view.path, "r+b") as f:
            f.seek(victim.offset + victim.size - 12)
            byte = f.read(1)
            f.seek(victim.offset + victim.size - 12)
            f.write(bytes([byte[0] ^ 0xFF]))
        stats = ReadStats()
        m = compile_matcher("out")
        got = _chunks_to_rows(search_views(self.streams, 1, m, stats=stats))
        self.assertEqual(stats.corrupt_members, 1)
        self.assertEqual(len(got), 390)
        self.assertNotIn(1_002, [row[1] for row in got])
        self.flushLoggedErrors()

    def test_no_file_held_between_chunks(self):
        """No segment file stays open while the caller holds a chunk."""
        before = len(os.listdir("/proc/self/fd"))
        for _chunk in search_views(self.streams, 0, compile_matcher("o")):
            self.assertEqual(len(os.listdir("/proc/self/fd")), before)


def _member(messages: list, timestamps: list):
    """One log member of ``messages``: (bytes, MemberInfo)."""
    ords = list(range(len(messages)))
    pieces = fmt.encode_log_members(timestamps, ords, ords, messages, COMP,
                                    max_member_raw=1 << 30)
    assert len(pieces) == 1
    return pieces[0]


class MemberScanTests(SynchronousTestCase):
    """thd_scan_member (the whole-member scan on a pool thread) against RE2 on each message
    of the member alone: the path searches took before they searched whole members."""

    @given(st.lists(st.tuples(TEXT, st.sampled_from([b"\n", b"\n", b""]), st.integers(0, 5)),
                    min_size=1, max_size=10),
           st.one_of(st.tuples(REGEXES, st.just(True)), st.tuples(LITERALS, st.just(False))),
           st.booleans(), st.integers(0, 5), st.integers(0, 5))
    def test_same_matches_as_per_message(self, rows, pattern_regex, ignore_case, start, end):
        """For any member (messages with and without final newlines, empty ones, timestamps
        in or out of order), pattern and time range, the scan returns exactly the messages
        in range that RE2 matches alone, in stored order, with their columns."""
        from joblet_persist.storage.search import thd_scan_member

        pattern, regex = pattern_regex
        try:
            m = compile_matcher(pattern, regex=regex, ignore_case=ignore_case)
        except BadPattern:
            assume(False)
        messages = [t.encode("utf-8") + nl for t, nl, _ts in rows]
        timestamps = [ts for _t, _nl, ts in rows]
        assume(sum(map(len, messages)) > 0)
        buf, info = _member(messages, timestamps)
        ref = _reference(pattern, regex, ignore_case)
        want = [i for i, msg in enumerate(messages)
                if (start <= 0 or timestamps[i] >= start) and (end <= 0 or timestamps[i] <= end)
                and ref(msg)]
        got = thd_scan_member(buf, info, "p", m, start, end)
        self.assertEqual(got, (want, [timestamps[i] for i in want], want,
                               [messages[i] for i in want]))

    @given(st.lists(st.binary(max_size=4), max_size=8), st.integers(-2, 2))
    def test_message_ends_twins(self, messages, extra):
        """_speedups.message_ends and its Python twin agree for any messages, also when the
        lengths do not add up to the data."""
        from joblet_persist.storage import search

        if search.message_ends is search._message_ends_py:
            self.skipTest("joblet_persist._speedups is not built")
        data = b"".join(messages)[: max(0, len(b"".join(messages)) + extra)]
        if extra > 0:
            data += b"\n" * extra
        lengths = [len(x) for x in messages]
        self.assertEqual(search.message_ends(data, lengths),
                         search._message_ends_py(data, lengths))

    def test_members_without_a_match_end_before_message_bounds(self):
        """A regular expression with assertions is searched in the member's whole data
        (RE2, without the GIL) before anything is done per message: a member that holds its
        required literal but no match ends there, and the members' ends are checked in one
        call (no per-message Python work)."""
        from unittest import mock

        from joblet_persist.storage import search

        messages = [b"ERROR [w12] user=%d\n" % i for i in range(50)]
        buf, info = _member(messages, [1] * 50)
        m = compile_matcher(r"\bERROR \[w1\d\] user=9\d\d\b", regex=True)
        self.assertIsNotNone(m.needle)
        self.assertFalse(m.assertion_free)
        if getattr(search, "message_ends", None) is getattr(search, "_message_ends_py", ()):
            self.skipTest("joblet_persist._speedups is not built")
        with mock.patch.object(search, "message_bounds", side_effect=AssertionError("bounds")), \
                mock.patch.object(search, "_lines_only", side_effect=AssertionError("per line")):
            self.assertEqual(search.thd_scan_member(buf, info, "p", m, 0, 0), ([], [], [], []))
        messages[7] = b"ERROR [w13] user=912\n"
        buf, info = _member(messages, [1] * 50)
        self.assertEqual(search.thd_scan_member(buf, info, "p", m, 0, 0)[3], [messages[7]])
