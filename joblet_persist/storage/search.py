"""Full-text search over stored log messages: patterns, the member scan, its bounds.

Leaf module: no reactor imports.  ``compile_matcher`` runs on a gRPC thread (it
validates a user's pattern); ``search_views`` runs on a gRPC thread and hands the
CPU work of each member (inflate, CRC check, scan) to pool threads through an
injected ``submit(fn, *args) -> concurrent.futures.Future``; ``thd_scan_member`` is
that work.

Patterns come from users, so matching uses RE2 (google-re2), whose time is linear
in the text: no pattern can stall a thread.  A match is decided per stored message
(the one-LogLine-per-message contract): a message matches when the pattern matches
somewhere in its content without its final newline.  Regular expressions run in
RE2's multi-line mode, so ``^`` and ``$`` match at the start and end of each line
of a message, as grep's do.

The scan of a member never splits its data into messages first.  A *needle*, a
literal run of text that every match must contain, is searched in the member's
whole inflated data (``bytes.find``); a member without it ends there.  For a
substring the needle is the pattern itself and decides alone; ignoring case, it is
the pattern's longest run of digits, punctuation and spaces (which do not fold), and
for a regular expression that run or else a run compared lower-cased.  A substring
ignoring case, and a regular expression where it is safe (``Matcher.context_ok``,
``assertion_free``), are searched by RE2 once over the whole data, and only the
messages where a match starts are checked alone; otherwise the regex runs on the
messages that contain the needle, or without one (``^\\d+$``) on every message in
range.  That RE2 pass runs before the member's message bounds are built (RE2 and
libdeflate release the GIL, so members scan in parallel on the pool threads), and
whether the messages all end in a newline is checked in one C call
(``_speedups.message_ends``): a member without a match costs its inflation, its
table and one pass of RE2, with no Python work per message.  Members outside the
time range are skipped by their index entry, and the work per call is bounded
(``ScanLimits``: raw bytes scanned, a deadline).
"""

from __future__ import annotations

import heapq
import operator
import re
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import itemgetter
from typing import Callable, Iterator, Optional

import re2

from joblet_persist.storage import reader
from joblet_persist.storage.api import STREAM_STDERR, STREAM_STDOUT, STREAM_UNSPECIFIED, ReadStats
from joblet_persist.storage.format import (
    KIND_LOG,
    CorruptMember,
    MemberInfo,
    UnsupportedMember,
    decode_member_table,
    message_bounds,
)
from joblet_persist.threads import run_inline

__all__ = [
    "BadPattern",
    "Matcher",
    "ScanLimits",
    "SearchLimitExceeded",
    "compile_matcher",
    "search_views",
    "thd_scan_member",
]

#: Longest pattern accepted (characters).
MAX_PATTERN_CHARS = 4096

#: ASCII letters whose case partners under Unicode simple case folding include a
#: non-ASCII character (KELVIN SIGN, LATIN SMALL LETTER LONG S): an ASCII
#: lower-casing of the data cannot stand in for RE2's case folding of these.
_NON_ASCII_FOLDS = frozenset("kKsS")

#: Escapes that end a literal run and consume exactly two characters.
_SIMPLE_ESCAPES = frozenset("dDsSwWbBAzaftnrv")


class BadPattern(ValueError):
    """The pattern is not a valid RE2 regular expression (or is too long)."""


class SearchLimitExceeded(Exception):
    """The call reached its bound on work (raw bytes scanned, or its time).

    ``resume_time`` is the smallest timestamp of the first member not scanned
    (0 when unknown): a client can continue from there.
    """

    def __init__(self, reason: str, bytes_scanned: int, resume_time: int, job_id: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.bytes_scanned = bytes_scanned
        self.resume_time = resume_time
        self.job_id = job_id


class ScanLimits:
    """A search call's budget, shared by the jobs it searches.  One gRPC thread.

    ``max_bytes``: raw (uncompressed) bytes the call may scan (0 = no bound);
    ``deadline``: a ``clock()`` value after which no further member is started
    (None = no bound).  At least one member is always scanned.
    """

    def __init__(self, max_bytes: int = 0, deadline: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.clock = clock
        self.bytes_scanned = 0
        self.members_scanned = 0

    def check(self, size: int, resume_time: int) -> None:
        """Raise SearchLimitExceeded unless a member of ``size`` raw bytes may be scanned."""
        if self.members_scanned == 0:
            return
        if self.max_bytes and self.bytes_scanned + size > self.max_bytes:
            raise SearchLimitExceeded(
                f"the search scanned {self.bytes_scanned} bytes of log data and the next "
                f"part would pass the limit of {self.max_bytes} bytes",
                self.bytes_scanned, resume_time,
            )
        if self.deadline is not None and self.clock() > self.deadline:
            raise SearchLimitExceeded(
                f"the search ran out of its time after scanning {self.bytes_scanned} bytes",
                self.bytes_scanned, resume_time,
            )

    def charge(self, size: int) -> None:
        self.bytes_scanned += size
        self.members_scanned += 1


# -- patterns -----------------------------------------------------------------------------


def _options(ignore_case: bool, literal: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    options.case_sensitive = not ignore_case
    options.literal = literal
    return options


def _compile(pattern: bytes, options: re2.Options):
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        text = e.args[0] if e.args else str(e)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        raise BadPattern(f"invalid regular expression {pattern.decode('utf-8', 'replace')!r}: "
                         f"{text}") from None


def _skip_class(p: str, i: int) -> int:
    """Index just past the character class that starts at ``p[i] == '['``."""
    i += 1
    if i < len(p) and p[i] == "^":
        i += 1
    if i < len(p) and p[i] == "]":
        i += 1  # a leading ']' is a member
    while i < len(p):
        c = p[i]
        if c == "\\":
            i += 2
        elif c == "[" and p.startswith("[:", i):
            end = p.find(":]", i + 2)
            i = end + 2 if end >= 0 else i + 1
        elif c == "]":
            return i + 1
        else:
            i += 1
    return i


def _repetition_end(p: str, i: int) -> Optional[int]:
    """Index past ``{n}``, ``{n,}`` or ``{n,m}`` at ``p[i] == '{'``, or None (a literal '{')."""
    end = p.find("}", i)
    if end < 0:
        return None
    body = p[i + 1 : end]
    lo, sep, hi = body.partition(",")
    if lo.isdigit() and (not hi or hi.isdigit()) and (sep or not hi):
        return end + 1
    return None


def required_literals(pattern: str) -> Optional[list]:
    """Literal runs that every match of RE2 ``pattern`` contains, or None when unsure.

    Conservative: only characters at the top level of the pattern (outside any
    group and class), in a pattern without a top-level alternation, that are not
    quantified; escapes other than escaped punctuation end a run; anything
    unusual (``\\Q``, ``\\x``, ``\\p``, inline flags at the top level) gives None.
    Leaving out a character that is in fact required only weakens the filter.
    """
    runs: list = []
    cur: list = []
    depth = 0
    i, n = 0, len(pattern)

    def end_run():
        if cur:
            runs.append("".join(cur))
            cur.clear()

    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            e = pattern[i + 1]
            if e.isascii() and not e.isalnum() and e != "_" or e in " ":
                if depth == 0:
                    cur.append(e)
                i += 2
                continue
            if e in _SIMPLE_ESCAPES:
                end_run()
                i += 2
                continue
            return None  # \Q..\E, \x.., \p.., octal, \C, ...: not worth the risk
        if c == "[":
            end_run()
            i = _skip_class(pattern, i)
            continue
        if c == "(":
            if depth == 0 and pattern.startswith("(?", i) and not (
                pattern.startswith("(?:", i) or pattern.startswith("(?P<", i)
                or pattern.startswith("(?<", i)
            ):
                return None  # inline flags may change what the rest matches
            end_run()
            depth += 1
            i += 1
            continue
        if c == ")":
            end_run()
            depth = max(0, depth - 1)
            i += 1
            continue
        if depth > 0:
            i += 1
            continue
        if c == "|":
            return None
        if c in "*+?":
            if cur:
                cur.pop()  # the quantified atom is not required
            end_run()
            i += 1
            continue
        if c == "{":
            end = _repetition_end(pattern, i)
            if end is not None:
                if cur:
                    cur.pop()
                end_run()
                i = end
                continue
            end_run()  # a literal '{': leave it out
            i += 1
            continue
        if c in ".^$":
            end_run()
            i += 1
            continue
        cur.append(c)
        i += 1
    end_run()
    return runs


#: Shortest run of case-invariant characters worth a prefilter under case folding.
_MIN_INVARIANT = 2


def _sub_runs(runs: list, keep: Callable) -> list:
    """The maximal non-empty pieces of the strings in ``runs`` whose every character
    satisfies ``keep``."""
    out = []
    for run in runs:
        piece: list = []
        for ch in run:
            if keep(ch):
                piece.append(ch)
            else:
                if piece:
                    out.append("".join(piece))
                piece = []
        if piece:
            out.append("".join(piece))
    return out


def _invariant_runs(runs: list) -> list:
    """Sub-runs of ``runs`` made of ASCII characters that are not letters (digits,
    punctuation, spaces): no character folds to them or from them under Unicode simple case
    folding, so ignoring case they match only themselves, and ``bytes.find`` in the data as
    it is (no lower-cased copy) finds them."""
    return _sub_runs(runs, lambda ch: ch.isascii() and not ch.isalpha())


def _invariant_needle(runs: list) -> Optional[bytes]:
    """The longest case-invariant run of ``runs`` (``_invariant_runs``) when it is long
    enough to be worth a ``find``, else None."""
    best = max(_invariant_runs(runs), key=len, default="")
    return best.encode("ascii") if len(best) >= _MIN_INVARIANT else None


def _foldable_runs(runs: list) -> list:
    """Sub-runs of ``runs`` that ASCII lower-casing compares exactly under RE2 (?i)."""
    return _sub_runs(runs, lambda ch: ch.isascii() and ch not in _NON_ASCII_FOLDS)


@dataclass(frozen=True)
class Matcher:
    """A compiled search pattern.  Immutable; any thread.

    ``needle`` is a byte string every matching message contains (compared with
    the data lower-cased when ``folded``), or None; ``exact`` means that
    containing the needle is the match (a substring pattern), so RE2 runs only
    when it is False.
    """

    pattern: str
    regex: bool
    ignore_case: bool
    needle: Optional[bytes]
    folded: bool
    exact: bool
    _rx: object
    #: Whether a search of a member's whole data finds every message that matches alone
    #: (when every message ends in a newline): no \A, \z or multi-line mode turned off.
    context_ok: bool = False
    #: Whether the regular expression has no assertion at all (^ $ \\b \\B \\A \\z): then a
    #: search of the whole data finds every matching message whatever the messages' ends.
    assertion_free: bool = False

    def matches(self, content: bytes) -> bool:
        """Whether one message matches: RE2 over the content alone, without its final
        newline (the reference)."""
        if content.endswith(b"\n"):
            content = content[:-1]
        return self._rx.search(content) is not None

    def scan(self, data: bytes, bounds: list, positions, hay=None, ends=None,
             first: int = 0) -> list:
        """Positions (message indices) among ``positions`` whose message matches.

        ``data`` is a member's inflated data, message i being
        ``data[bounds[i]:bounds[i + 1]]``; ``positions`` a ``range`` (the usual
        case) or an ascending list of indices; ``hay`` the data as the needle is
        compared with (lower-cased when ``folded``), when the caller has it;
        ``ends``, ``(nonempty, lines)`` of ``message_ends``, when the caller has
        them; ``first``: no match of the whole data starts before this offset
        (the caller searched up to there).  Result ascending.
        """
        if not positions:
            return []
        needle = self.needle
        if ends is None:
            ends = (all(map(operator.lt, bounds, bounds[1:])), _lines_only(data, bounds))
        if self.context_search(*ends):
            candidates = self._context_candidates(data, bounds, positions, first)
        elif needle is None:
            candidates = positions
        elif not needle:
            candidates = positions
        else:
            if hay is None:
                hay = data.lower() if self.folded else data
            if isinstance(positions, range):
                lo, hi = bounds[positions.start], bounds[positions.stop]
                wanted = None
            else:
                lo, hi = bounds[positions[0]], bounds[positions[-1] + 1]
                wanted = set(positions)
            candidates = []
            size = len(needle)
            find = hay.find
            p = find(needle, lo, hi)
            while p >= 0:
                i = bisect_right(bounds, p) - 1
                end = bounds[i + 1]
                # A message's final newline is not matched (as grep's lines have none).
                if p + size <= end - (data[end - 1] == 10):
                    if wanted is None or i in wanted:
                        candidates.append(i)
                    p = find(needle, end, hi)
                else:
                    p = find(needle, p + 1, hi)  # ran across a message boundary
        if self.exact:
            return list(candidates)
        matches = self.matches
        return [i for i in candidates if matches(bytes(data[bounds[i] : bounds[i + 1]]))]

    def context_search(self, nonempty: bool, lines: bool) -> bool:
        """Whether one search of a member's whole data finds every message that matches
        (see _context_candidates), for a member whose messages are all non-empty
        (``nonempty``) and all end in a newline (``lines``)."""
        return not self.exact and (self.assertion_free and nonempty
                                   or self.context_ok and lines)

    def _context_candidates(self, data, bounds: list, positions, first: int = 0) -> list:
        """Messages in which a search of the whole data finds a match starting: a
        superset of the matching messages when every message ends in a newline (a match
        of a message alone, without its newline, is a match in the data too: its
        neighbours are newlines, which ^, $, \\b and \\B see as they see the ends of a
        text), found by RE2's DFA at memory speed instead of a call per message."""
        if isinstance(positions, range):
            lo, hi, wanted = bounds[positions.start], bounds[positions.stop], None
        else:
            lo, hi = bounds[positions[0]], bounds[positions[-1] + 1]
            wanted = set(positions)
        match = self._rx._regexp.Match
        out = []
        pos = max(lo, first)
        while pos < hi:
            start = match(_UNANCHORED, data, pos, hi)[0][0]
            if start < 0 or start >= hi:
                break
            i = bisect_right(bounds, start) - 1
            if wanted is None or i in wanted:
                out.append(i)
            pos = bounds[i + 1]
        return out


_UNANCHORED = re2._Anchor.UNANCHORED

#: Inline flags that turn multi-line mode off, in a regular expression.
_NO_MULTILINE = re.compile(r"\(\?[A-Za-z]*-[A-Za-z]*m")


#: What an assertion may be written as (conservatively: a '^' or '$' in a class counts too).
_ASSERTIONS = ("^", "$", "\\b", "\\B", "\\A", "\\z")


def _lines_only(data, bounds: list) -> bool:
    """Whether every message of a member (``bounds`` into ``data``) ends in a newline."""
    n = len(bounds) - 1
    if n <= 0:
        return False
    if n == 1:
        return bounds[1] > 0 and data[bounds[1] - 1] == 10
    if bounds[1] == 0:
        return False
    lasts = itemgetter(*map(operator.sub, bounds[1:], repeat(1)))(data)
    return lasts.count(10) == n and all(map(operator.lt, bounds, bounds[1:]))


def _message_ends_py(data, lengths: list) -> tuple:
    """``(total, nonempty, lines)`` of a member's messages (``lengths`` into ``data``):
    the sum of the lengths; whether every message is non-empty; whether there is one, all
    are non-empty, the lengths add up to the data and every message ends in a newline."""
    total = sum(lengths)
    nonempty = all(lengths)
    if not lengths or not nonempty or total != len(data):
        return total, nonempty, False
    return total, True, _lines_only(data, list(accumulate(lengths, initial=0)))


try:
    from joblet_persist._speedups import message_ends
except ImportError:  # not built
    message_ends = _message_ends_py


def compile_matcher(pattern: str, regex: bool = False, ignore_case: bool = False) -> Matcher:
    """Compile a user's pattern; BadPattern names the problem.  Any thread.

    Without ``regex`` the pattern is a plain substring; with it, an RE2 regular
    expression (https://github.com/google/re2/wiki/Syntax), matched in
    multi-line mode.  ``ignore_case`` folds case as RE2 does (Unicode simple
    case folding).
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadPattern(f"pattern of {len(pattern)} characters is longer than the limit of "
                         f"{MAX_PATTERN_CHARS}")
    raw = pattern.encode("utf-8")
    if regex:
        _compile(raw, _options(ignore_case, False))  # errors name the user's own pattern
        rx = _compile(b"(?m)" + raw, _options(ignore_case, False))
        runs = required_literals(pattern)
    else:
        rx = _compile(raw, _options(ignore_case, True))
        runs = [pattern]
    if ignore_case and not regex:
        # A substring ignoring case is found by RE2 itself in the member's data (its DFA,
        # no lower-cased copy of the data; RE2's folding is the reference anyway); each
        # message where it is found is then checked alone.  Its digits and punctuation do
        # not fold: the longest run of them, found with bytes.find, dismisses most members
        # before RE2 runs.
        needle = _invariant_needle([pattern])
        return Matcher(pattern, regex, ignore_case, needle, False, False, rx, True, True)
    exact = not regex
    context = bool(regex and "\\A" not in pattern and "\\z" not in pattern
                   and not _NO_MULTILINE.search(pattern))
    free = bool(regex and not any(a in pattern for a in _ASSERTIONS))
    if runs is None or not runs and regex:
        return Matcher(pattern, regex, ignore_case, None, False, False, rx, context, free)
    if ignore_case and regex:
        invariant = _invariant_needle(runs)
        if invariant is not None:  # found in the data as it is: no lower-cased copy
            return Matcher(pattern, regex, ignore_case, invariant, False, False, rx, context,
                           free)
    if ignore_case:
        foldable = _foldable_runs(runs)
        if exact and (len(foldable) != 1 or foldable[0] != pattern):
            exact = False
        if not foldable:
            if pattern:
                return Matcher(pattern, regex, ignore_case, None, False, False, rx, context, free)
            foldable = [""]
        needle = max(foldable, key=len).lower().encode("ascii")
        return Matcher(pattern, regex, ignore_case, needle, True, exact, rx, context, free)
    needle = max(runs, key=lambda r: len(r.encode("utf-8"))).encode("utf-8")
    return Matcher(pattern, regex, ignore_case, needle, False, exact, rx, context, free)


# -- the scan of one member (pool thread) ------------------------------------------------


def _inflate(buf: bytes, m: MemberInfo, path: str):
    """The data of member ``m`` (its bytes ``buf``), checked as the reader checks it; a
    bytearray: only the matching messages are copied out of it."""
    return reader.inflate_member_bytes(buf, m, path)


def thd_scan_member(buf: bytes, m: MemberInfo, path: str, matcher: Matcher,
                    start_time: int, end_time: int) -> tuple:
    """Decode, inflate and scan one log member: its matching messages.  Pool thread.

    Returns ``(ordinals, timestamps, sequences, contents)`` of the matching
    messages inside the inclusive time range, in stored order.  Raises
    CorruptMember.
    """
    data = _inflate(buf, m, path) if m.raw_size else b""
    hay = None
    if matcher.needle:
        # The literal prefilter, on the whole member before it is split into messages:
        # most members of a selective search end here, without their table.
        hay = data.lower() if matcher.folded else data
        if matcher.needle not in hay:
            return [], [], [], []
    first = None  # where the first match in the whole data starts (-1: none)
    if matcher.assertion_free:
        first = matcher._rx._regexp.Match(_UNANCHORED, data, 0, len(data))[0][0]
        if first < 0:
            return [], [], [], []  # no match anywhere in the data: none in any message
    try:
        table = decode_member_table(buf, m)
    except UnsupportedMember as e:  # only a file rewritten since its scan: skipped
        raise CorruptMember(e.reason, path, m.offset) from None
    if table.lengths is None:
        # A line member: every message is a non-empty line by construction; its bounds
        # are checked against the data's newlines when they are built.
        nonempty = lines = True
    else:
        total, nonempty, lines = message_ends(data, table.lengths)
        if total != len(data):
            raise CorruptMember("message lengths do not add up to the data", path, m.offset)
    rng = reader._Range(start_time, end_time)
    if rng.active and not rng.covers(m):
        positions = reader._positions(table.timestamps, rng, 0)
    else:
        positions = range(len(table.ordinals))
    if matcher.context_search(nonempty, lines):
        # RE2 over the whole data (without the GIL) before the message bounds are built:
        # most members of a selective search end here.
        if first is None:
            first = matcher._rx._regexp.Match(_UNANCHORED, data, 0, len(data))[0][0]
        if first < 0:
            return [], [], [], []
    bounds = message_bounds(table, data, path, m.offset)
    hits = matcher.scan(data, bounds, positions, hay, (nonempty, lines), max(0, first or 0))
    ords, ts, seqs = table.ordinals, table.timestamps, table.sequences
    return (
        [ords[i] for i in hits],
        [ts[i] for i in hits],
        [seqs[i] for i in hits],
        [bytes(data[bounds[i] : bounds[i + 1]]) for i in hits],
    )


# -- the search of one job's segments (gRPC thread) -------------------------------------


def _work_list(q, streams: dict, wanted: tuple) -> tuple[list, bool]:
    """``[(first ordinal, stream, path, member)]`` to scan, in merge order, and whether
    the streams' ordinals rise (then matches merge by ordinal; else stored order)."""
    listed = []
    for key in (STREAM_STDOUT, STREAM_STDERR):
        if key in wanted:
            listed.append((key, [(v.path, m) for v in streams.get(key, ()) for m in v.members]))
    if all(reader._in_order(entries, KIND_LOG) for _key, entries in listed):
        work = [
            (m.first_ordinal, key, path, m)
            for key, entries in listed
            for path, m in reader._select(q, entries, KIND_LOG)
        ]
        work.sort(key=lambda w: (w[0], w[1]))
        return work, True
    # Stored order, as reader._stored_order: whole members by effective ordinal.
    order = []
    for key, entries in listed:
        top = None
        for i, (path, m) in enumerate(entries):
            if m.kind != KIND_LOG:
                continue
            top = m.first_ordinal if top is None else max(top, m.first_ordinal)
            if m.count > 0 and q.rng.overlaps(m):
                order.append((top, key, i, path, m))
            else:
                q.skipped()
    order.sort(key=lambda w: (w[0], w[1], w[2]))
    return [(top, key, path, m) for top, key, _i, path, m in order], False


def search_views(
    streams: dict,
    stream: int,
    matcher: Matcher,
    start_time: int = 0,
    end_time: int = 0,
    *,
    limits: Optional[ScanLimits] = None,
    submit: Callable = run_inline,
    window: int = 4,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget=None,
) -> Iterator[tuple]:
    """Yield a job's matching LOG messages in chunks ``(streams, timestamps, sequences,
    contents)``, in arrival order (both streams merged when ``stream`` is 0).

    Blocking; gRPC thread.  ``streams`` maps 1 and 2 to SegmentViews as for
    reader.iter_log_chunks.  Members outside the inclusive time range are
    skipped by their index entry; the others are read here (within ``budget``)
    and scanned by ``thd_scan_member`` through ``submit``, up to ``window`` at
    once, so several inflate in parallel.  ``limits`` bounds the raw bytes and
    the time (SearchLimitExceeded, after the matches of every member scanned
    before it are yielded).  ``cancelled()`` is checked before each member; files
    are released before each chunk is yielded.  Legacy members (no table) are
    scanned here, message by message.
    """
    if stream not in (STREAM_UNSPECIFIED, STREAM_STDOUT, STREAM_STDERR):
        raise ValueError(f"unknown stream {stream!r}")
    limits = limits if limits is not None else ScanLimits()
    q = reader._Query(reader._Range(start_time, end_time), stats, cancelled, budget)
    pending: deque = deque()
    try:
        # Legacy members first (they precede all other data), record by record.
        chunk: tuple = ([], [], [], [])
        for ts, seq, st, content in reader._legacy_logs(q, streams, stream):
            limits.bytes_scanned += len(content)
            if matcher.matches(content):
                chunk[0].append(st)
                chunk[1].append(ts)
                chunk[2].append(seq)
                chunk[3].append(content)
        if chunk[0]:
            q.close()
            yield chunk
        wanted = (STREAM_STDOUT, STREAM_STDERR) if stream == STREAM_UNSPECIFIED else (stream,)
        work, merge = _work_list(q, streams, wanted)
        merge = merge and len(wanted) > 1
        heap: list = []
        window = max(1, window)
        nxt = 0  # next work item to submit
        stopped: list = []  # the SearchLimitExceeded that ended the submissions

        def results():
            """(index, result or None) of each work item, in order."""
            nonlocal nxt
            while True:
                while nxt < len(work) and len(pending) < window and not stopped:
                    if q.cancelled():
                        return
                    _first, _key, path, m = work[nxt]
                    try:
                        limits.check(m.raw_size, m.min_timestamp)
                    except SearchLimitExceeded as e:
                        stopped.append(e)  # what was submitted is still delivered
                        break
                    if q.is_corrupt(path, m):
                        nxt += 1
                        continue
                    f = q.file(path)
                    f.seek(m.offset)
                    buf = f.read(m.size)
                    limits.charge(m.raw_size)
                    if len(buf) != m.size:
                        q.corrupt(path, m, CorruptMember(
                            f"short read: {len(buf)} of {m.size} bytes", path, m.offset))
                        nxt += 1
                        continue
                    pending.append((nxt, submit(
                        thd_scan_member, buf, m, path, matcher, start_time, end_time)))
                    nxt += 1
                if not pending:
                    return
                index, future = pending.popleft()
                try:
                    found = future.result()
                except CorruptMember as e:
                    _f, _k, path, m = work[index]
                    q.corrupt(path, m, e)
                    found = None
                else:
                    q.stats.members_inflated += 1
                yield index, found

        for index, found in results():
            key = work[index][1]
            out: tuple = ([], [], [], [])
            if found is not None and found[0]:
                if merge:
                    for item in zip(found[0], [key] * len(found[0]), *found[1:], strict=True):
                        heapq.heappush(heap, item)
                else:
                    n = len(found[0])
                    out = ([key] * n, found[1], found[2], found[3])
            if merge and heap:
                horizon = (work[index + 1][0], work[index + 1][1]) if index + 1 < len(work) \
                    else None
                while heap and (horizon is None or heap[0][:2] < horizon):
                    _o, k, ts, seq, content = heapq.heappop(heap)
                    out[0].append(k)
                    out[1].append(ts)
                    out[2].append(seq)
                    out[3].append(content)
            if out[0]:
                q.close()
                yield out
        if stopped:
            # Matches held back for a member not scanned are left out, so that what was
            # sent is a prefix of the whole answer; the resume time covers them.
            exc = stopped[0]
            if heap:
                exc.resume_time = min(exc.resume_time, min(item[2] for item in heap))
            raise exc
        if heap:
            heap.sort()
            q.close()
            yield ([k for _o, k, _t, _s, _c in heap], [t for _o, _k, t, _s, _c in heap],
                   [s for _o, _k, _t, s, _c in heap], [c for _o, _k, _t, _s, c in heap])
    finally:
        for _index, future in pending:
            future.cancel()
        q.close()
