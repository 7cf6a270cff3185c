"""Seek-based reading of published segment members.

Leaf module: blocking generators, no reactor imports, no module-level mutable
state.  gRPC handler threads run them over immutable ``SegmentView`` tuples
taken from a published snapshot; they read only the member byte ranges listed
there, never past them.

Cost is proportional to what a query returns: members whose timestamp bounds
miss the range are never read, offsets are skipped using member counts (and,
for the member where the offset lands or the time range cuts, the per-message
table in its header), and only members that records are returned from are
inflated.  Both streams merge by persistent ordinal (arrival order); for an
offset into the merged stream the split ordinal is found by a binary search
that counts matching messages below a candidate ordinal in both streams.

Per-message work is kept to what is returned, in bulk: a loaded member is
kept as columns, only the contents a query returns are sliced out of its
data, and records come out in chunks (``iter_log_chunks``), where the records
of both streams that lie before any member not yet loaded are merged with one
sort of their ordinals.  In a time range, timestamps in order within a member
(the usual case) are cut by binary search.  docs/performance-queries.md has
the measurements.

Legacy members (files written by the older Go service) come before all other
data; they carry no table, so they are inflated to be counted and filtered,
and both streams of them merge by (timestamp, sequence).
"""

from __future__ import annotations

import heapq
import json
import logging
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Callable, Iterator, Optional

from deflate import DeflateError, deflate_decompress
from deflate import crc32 as _crc32

from joblet_persist.storage.api import (
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAM_UNSPECIFIED,
    LogRecord,
    MetricRecord,
    ReadStats,
    StoredEvent,
)
from joblet_persist.storage.files import FileBudget, OpenFiles
from joblet_persist.storage.format import (
    KIND_LEGACY,
    KIND_LOG,
    KIND_METRIC,
    CorruptMember,
    MemberInfo,
    UnsupportedMember,
    decode_member_table,
    gzip_header_length,
    message_bounds,
    read_member,
)
from joblet_persist.storage.legacy import (
    parse_legacy_event_member,
    parse_legacy_log_member,
    parse_legacy_metric_member,
)

#: How many merge passes may run between two checks of cancelled() (besides the check
#: before every member load).
_CANCEL_CHECK_PASSES = 64

__all__ = [
    "SegmentView",
    "find_disorder",
    "iter_events",
    "iter_log_chunks",
    "iter_logs",
    "iter_metrics",
]

_log = logging.getLogger("joblet_persist.storage")


@dataclass(frozen=True, slots=True)
class SegmentView:
    """One segment file and its published members, in file order; immutable."""

    path: str
    members: tuple[MemberInfo, ...]


class _Range:
    """Inclusive time range; a bound applies when it is > 0."""

    __slots__ = ("start", "end", "active")

    def __init__(self, start: int, end: int) -> None:
        self.start = start if start > 0 else None
        self.end = end if end > 0 else None
        self.active = self.start is not None or self.end is not None

    def contains(self, ts: int) -> bool:
        return (self.start is None or ts >= self.start) and (self.end is None or ts <= self.end)

    def overlaps(self, m: MemberInfo) -> bool:
        return (self.start is None or m.max_timestamp >= self.start) and (
            self.end is None or m.min_timestamp <= self.end
        )

    def covers(self, m: MemberInfo) -> bool:
        return (self.start is None or m.min_timestamp >= self.start) and (
            self.end is None or m.max_timestamp <= self.end
        )


class _Query:
    """Per-call state: open files, caches, counters.  Owned by one reading thread."""

    def __init__(
        self, rng: _Range, stats: Optional[ReadStats], cancelled, budget: Optional[FileBudget]
    ) -> None:
        self.rng = rng
        self.stats = stats if stats is not None else ReadStats()
        self.cancelled = cancelled
        self._files = OpenFiles(budget)
        self._tables: dict = {}
        self._matching: dict = {}
        self._corrupt: set = set()

    def close(self) -> None:
        """Close the files this query holds (it reopens them when it reads on)."""
        self._files.release_all()

    def file(self, path: str):
        return self._files.get(path)

    def skipped(self, n: int = 1) -> None:
        self.stats.members_skipped += n

    def is_corrupt(self, path: str, m: MemberInfo) -> bool:
        return (path, m.offset) in self._corrupt

    def corrupt(self, path: str, m: MemberInfo, exc: Exception) -> None:
        key = (path, m.offset)
        if key in self._corrupt:
            return
        self._corrupt.add(key)
        self.stats.corrupt_members += 1
        _log.warning("skipping corrupt member of %s at offset %d: %s", path, m.offset, exc)

    def table(self, path: str, m: MemberInfo):
        """The member's header table (cached), or None when it is corrupt."""
        key = (path, m.offset)
        if key in self._tables:
            return self._tables[key]
        table = None
        if key not in self._corrupt:
            try:
                table = decode_member_table(self.file(path), m)
            except (CorruptMember, UnsupportedMember) as e:
                # (Unsupported: only a file rewritten since its scan, which stops before one.)
                self.corrupt(path, m, e)
        self._tables[key] = table
        return table

    def matching_ordinals(self, path: str, m: MemberInfo) -> list:
        """Ordinals of the member's messages inside the time range (from its table)."""
        key = (path, m.offset)
        found = self._matching.get(key)
        if found is None:
            table = self.table(path, m)
            if table is None:
                found = []
            elif self.rng.covers(m):
                found = table.ordinals
            else:
                where = _positions(table.timestamps, self.rng, 0)
                if isinstance(where, range):
                    found = table.ordinals[where.start : where.stop]
                else:
                    found = [table.ordinals[i] for i in where]
            self._matching[key] = found
        return found

    def matching_count(self, path: str, m: MemberInfo) -> int:
        if self.rng.covers(m) and not self.is_corrupt(path, m):
            return m.count
        return len(self.matching_ordinals(path, m))

    def load(self, path: str, m: MemberInfo):
        """Read and inflate a member: ``(table, data)`` or None when it is corrupt.

        The table comes from this query's cache (a binary search for an
        offset may have decoded it already); the data is inflated with
        libdeflate and checked against the trailer's CRC32 and ISIZE.
        """
        if self.is_corrupt(path, m):
            return None
        try:
            if m.kind == KIND_LEGACY or m.raw_size == 0:
                result = read_member(self.file(path), m)
            else:
                table = self.table(path, m)
                if table is None:
                    return None
                result = (table, _inflate(self.file(path), path, m))
        except CorruptMember as e:
            self.corrupt(path, m, e)
            return None
        self.stats.members_inflated += 1
        return result


_TRAILER = struct.Struct("<II")


def _inflate(f, path: str, m: MemberInfo) -> bytes:
    """Read member ``m`` of our format from ``f`` and inflate its data (``m.raw_size`` bytes).

    The same checks as ``format.read_member`` (CRC32, ISIZE, raw size), with
    libdeflate, which inflates about three times faster than zlib when the
    output size is known, as it is from the header.  Raises CorruptMember.
    """
    f.seek(m.offset)
    buf = f.read(m.size)
    if len(buf) != m.size:
        raise CorruptMember(f"short read: {len(buf)} of {m.size} bytes", path, m.offset)
    return bytes(inflate_member_bytes(buf, m, path))


def inflate_member_bytes(buf: bytes, m: MemberInfo, path: str):
    """The data of member ``m`` from its bytes ``buf`` (a bytearray), checked as
    ``_inflate`` says.  Any thread; raises CorruptMember."""
    try:
        hlen = gzip_header_length(buf)
    except ValueError as e:
        raise CorruptMember(str(e), path, m.offset) from None
    if hlen is None or hlen + _TRAILER.size > len(buf):
        raise CorruptMember("truncated gzip header", path, m.offset)
    try:
        data = deflate_decompress(memoryview(buf)[hlen : len(buf) - _TRAILER.size], m.raw_size)
    except DeflateError as e:
        raise CorruptMember(f"data does not inflate: {e}", path, m.offset) from None
    if len(data) != m.raw_size:
        raise CorruptMember("raw size differs from the header", path, m.offset)
    crc, isize = _TRAILER.unpack_from(buf, len(buf) - _TRAILER.size)
    if _crc32(data) != crc:
        raise CorruptMember("CRC32 mismatch", path, m.offset)
    if isize != m.raw_size & 0xFFFFFFFF:
        raise CorruptMember("ISIZE mismatch", path, m.offset)
    return data


class _Source:
    """One stream's (or the metrics') members of our format, as candidates for a query."""

    def __init__(self, q: _Query, key: int, entries: list) -> None:
        self.key = key  # stream number (0 for metrics): the merge tie-breaker
        self.entries = entries  # [(path, MemberInfo)] overlapping the time range
        self.first = [m.first_ordinal for _, m in entries]
        self.last = [m.last_ordinal for _, m in entries]
        self._q = q
        self._prefix: Optional[list] = None

    def prefix(self) -> list:
        if self._prefix is None:
            counts = (self._q.matching_count(p, m) for p, m in self.entries)
            self._prefix = list(accumulate(counts, initial=0))
        return self._prefix

    def bounds_below(self, x: int) -> tuple[int, int]:
        """(lower, upper) bounds of matching messages with ordinal < x, no tables read."""
        prefix = self.prefix()
        k = bisect_left(self.last, x)  # entries[:k] lie wholly below x
        j = bisect_left(self.first, x)  # entries[:j] start below x
        return prefix[k], prefix[max(j, k)]

    def count_below(self, x: int) -> int:
        """Exact matching messages with ordinal < x (reads at most one table)."""
        prefix = self.prefix()
        k = bisect_left(self.last, x)
        n = prefix[k]
        if k < len(self.entries) and self.first[k] < x:
            path, m = self.entries[k]
            n += bisect_left(self._q.matching_ordinals(path, m), x)
        return n


def _split_point(sources: list, offset: int):
    """Smallest ordinal X with count_below(X) <= offset < count_below(X + 1), or None.

    None when fewer than ``offset + 1`` messages match.  Uses member bounds to
    decide most probes and reads a table only where a member straddles.
    """
    total = sum(s.prefix()[-1] for s in sources)
    if offset >= total:
        return None
    lo = min(s.first[0] for s in sources if s.entries)
    hi = max(s.last[-1] for s in sources if s.entries)

    def above_offset(x: int) -> bool:  # count_below(x) > offset ?
        lower = upper = 0
        for s in sources:
            a, b = s.bounds_below(x)
            lower += a
            upper += b
        if lower > offset:
            return True
        if upper <= offset:
            return False
        return sum(s.count_below(x) for s in sources) > offset

    while lo < hi:
        mid = (lo + hi) // 2
        if above_offset(mid + 1):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Cursor:
    """Walks one source's records from a start member; loads members lazily.

    A loaded member is held as columns of its matching records (ordinals,
    timestamps, sequences) and a function that materializes the payloads of
    a range of them, so that only the records a query returns are sliced out
    of the inflated data (a first page of 100 lines does not build the other
    10,000 of its member).
    """

    __slots__ = ("_q", "_src", "_idx", "_min_ord", "_loader", "ords", "_ts", "_seqs", "_pay",
                 "pos", "key_value")

    def __init__(self, q: _Query, src: _Source, start: int, min_ord, loader) -> None:
        self._q = q
        self._src = src
        self._idx = start
        self._min_ord = min_ord
        # (path, member, table, data, min_ord) -> (ordinals, timestamps, sequences,
        # payloads(i, j), first position); raises CorruptMember.
        self._loader = loader
        self.ords: Optional[list] = None  # ordinals of the loaded member's matching records
        self._ts: list = []
        self._seqs: list = []
        self._pay = None
        self.pos = 0
        self.key_value = src.key

    def key(self):
        """((ordinal, source key), exact) of the next record, or None at the end.

        When the next member is not loaded yet, its first ordinal is a lower
        bound of its first matching record's ordinal.
        """
        if self.ords is not None:
            return (self.ords[self.pos], self._src.key), True
        if self._idx >= len(self._src.entries):
            return None
        return (self._src.first[self._idx], self._src.key), False

    def load(self) -> None:
        path, m = self._src.entries[self._idx]
        self._idx += 1
        loaded = self._q.load(path, m)
        columns = None
        if loaded is not None:
            table, data = loaded
            try:
                columns = self._loader(path, m, table, data, self._min_ord)
            except CorruptMember as e:
                self._q.corrupt(path, m, e)
        self._min_ord = None
        if columns is not None and columns[4] < len(columns[0]):
            self.ords, self._ts, self._seqs, self._pay, self.pos = columns

    def run_length(self, bound) -> int:
        """How many of the loaded records sort before ``bound`` (a key; None: all)."""
        if bound is None:
            return len(self.ords) - self.pos
        ordinal, key = bound
        cut = bisect_right if self._src.key < key else bisect_left
        return cut(self.ords, ordinal, self.pos) - self.pos

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos >= len(self.ords):
            self.ords = None

    def frontier(self):
        """Lower bound (a key) of every record not loaded yet, or None at the last member."""
        if self._idx >= len(self._src.entries):
            return None
        return self._src.first[self._idx], self._src.key

    def peek(self, n: int) -> tuple:
        """The next ``n`` loaded records: ``(ordinals, timestamps, sequences, payloads)``."""
        i, j = self.pos, self.pos + n
        return self.ords[i:j], self._ts[i:j], self._seqs[i:j], self._pay(i, j)


def _select(q: _Query, entries: list, kind: int) -> list:
    """Our-format members of ``kind`` overlapping the range; counts the others as skipped."""
    out = []
    for path, m in entries:
        if m.kind == kind and m.count > 0 and q.rng.overlaps(m):
            out.append((path, m))
        elif m.kind != KIND_LEGACY:
            q.skipped()
    return out


def _in_order(entries: list, kind: int) -> bool:
    """Whether the ordinals of ``kind``'s non-empty members in ``entries`` rise strictly.

    They do in everything this service writes: a job's ordinals grow across
    its segments.  A segment copied under another name, or two writers of one
    directory, leave overlapping or out-of-order segments; those are read in
    stored order (_stored_order) instead of merged by ordinal.
    """
    prev = None
    for _path, m in entries:
        if m.kind != kind or m.count <= 0:
            continue
        if m.last_ordinal < m.first_ordinal or (prev is not None and m.first_ordinal <= prev):
            return False
        prev = m.last_ordinal
    return True


def find_disorder(views) -> Optional[tuple[str, str]]:
    """``(earlier path, later path)`` of the first members out of ordinal order, or None.

    ``views`` are one stream's (or the metrics') SegmentViews in segment name
    order; legacy and empty members are left out, as in _in_order.  Any thread.
    """
    prev = prev_path = None
    for view in views:
        for m in view.members:
            if m.kind == KIND_LEGACY or m.count <= 0:
                continue
            if m.last_ordinal < m.first_ordinal or (prev is not None and m.first_ordinal <= prev):
                return (prev_path or view.path), view.path
            prev, prev_path = m.last_ordinal, view.path
    return None


def _stored_order(q: _Query, listed: list, kind: int, offset: int, limit: int, loader):
    """Chunks like _merged's, for sources whose ordinals are not in order.

    ``listed`` holds ``(source key, [(path, member)])`` with every member of
    each source in stored order: segment name order, then file order.  Whole
    members are ordered by ``(effective ordinal, source key, position)``,
    where a member's effective ordinal is the largest first ordinal of it and
    of the members stored before it in its source (so each source keeps its
    stored order, and the order does not depend on the time range); records
    come in stored order within a member.  Every stored record is returned:
    overlapping members are not deduplicated.  Each member is visited once,
    and ``q.cancelled()`` is checked before each, so the walk ends on any input.
    """
    order = []
    for key, entries in listed:
        top = None
        for i, (path, m) in enumerate(entries):
            if m.kind != kind:
                if m.kind != KIND_LEGACY:
                    q.skipped()
                continue
            top = m.first_ordinal if top is None else max(top, m.first_ordinal)
            order.append((top, key, i, path, m))
    order.sort(key=itemgetter(0, 1, 2))
    emitted = 0
    for _top, key, _i, path, m in order:
        if q.cancelled():
            return
        if m.count <= 0 or not q.rng.overlaps(m):
            q.skipped()
            continue
        if offset and offset >= q.matching_count(path, m):
            offset -= q.matching_count(path, m)
            q.skipped()
            continue
        loaded = q.load(path, m)
        if loaded is None:
            continue
        table, data = loaded
        try:
            ords, ts, seqs, payloads, start = loader(path, m, table, data, None)
        except CorruptMember as e:
            q.corrupt(path, m, e)
            continue
        i = start + offset
        offset = 0
        j = len(ords)
        if limit:
            j = min(j, i + limit - emitted)
        while i < j:
            k = min(j, i + _LEGACY_CHUNK)
            yield [key] * (k - i), ts[i:k], seqs[i:k], payloads(i, k)
            emitted += k - i
            i = k
        if limit and emitted >= limit:
            return


def _pick(values: list, positions) -> tuple:
    """``values`` at ``positions``, as a tuple (one C call for two or more)."""
    if len(positions) > 1:
        return itemgetter(*positions)(values)
    return tuple(values[i] for i in positions)


def _merged(q: _Query, sources: list, offset: int, limit: int, loader) -> Iterator[tuple]:
    """Yield the records of ``sources`` merged by (ordinal, key), after ``offset``, up to ``limit``.

    Records come in chunks ``(keys, timestamps, sequences, payloads)`` of
    equally long sequences (``keys[i]`` is record i's source key).  A chunk
    holds every loaded record that sorts before the first record a member not
    loaded yet could hold (its first ordinal bounds it), at most what the
    limit still needs; when several sources have records there, they are
    merged by one sort of their ordinals, not record by record.  ``loader``
    turns a loaded member into columns (see _Cursor).
    """
    sources = [s for s in sources if s.entries]
    if not sources:
        return
    extra = 0
    x = None
    if offset > 0:
        x = _split_point(sources, offset)
        if x is None:
            q.skipped(sum(len(s.entries) for s in sources))
            return
        extra = offset - sum(s.count_below(x) for s in sources)
    cursors = []
    for s in sources:
        start = bisect_left(s.last, x) if x is not None else 0
        q.skipped(start)
        cursors.append(_Cursor(q, s, start, x, loader))
    emitted = 0
    passes = 0
    while True:
        # Every pass consumes a record or loads a member, so the walk ends on any input;
        # cancellation is checked before each load and every _CANCEL_CHECK_PASSES passes
        # (a check per pass costs streams that alternate often a call per short run).
        passes += 1
        if not passes % _CANCEL_CHECK_PASSES and q.cancelled():
            return
        best = best_key = horizon = None
        best_exact = False
        for c in cursors:
            k = c.key()
            if k is not None and (best_key is None or k[0] < best_key):
                best, best_key, best_exact = c, k[0], k[1]
            f = c.frontier()
            if f is not None and (horizon is None or f < horizon):
                horizon = f
        if best is None:
            return
        if not best_exact:
            if q.cancelled():
                return
            best.load()
            continue
        need = extra + limit - emitted if limit else None
        parts = []
        for c in cursors:
            if c.ords is not None:
                n = c.run_length(horizon)
                if need is not None and n > need:
                    n = need
                if n:
                    parts.append((c, n))
        if not parts:
            # Only when ordinals are not in order inside a member or across members
            # (sources are checked by _in_order, member tables are not): take the
            # best record alone, so that every pass consumes a record or loads a member.
            parts.append((best, 1))
        if len(parts) == 1:
            c, n = parts[0]
            skip = min(extra, n)
            if skip:
                c.skip(skip)
                extra -= skip
                n -= skip
            if not n:
                continue
            _ords, ts, seqs, payloads = c.peek(n)
            c.skip(n)
            chunk = ([c.key_value] * n, ts, seqs, payloads)
        else:
            ords: list = []
            ts = []
            seqs = []
            payloads = []
            keys: list = []
            for c, n in parts:
                o, t, s, p = c.peek(n)
                ords += o
                ts += t
                seqs += s
                payloads += p
                keys += [c.key_value] * n
            # Each part is sorted: the sort merges runs (stable, so ties keep source order).
            order = sorted(range(len(ords)), key=ords.__getitem__)
            end = len(order) if need is None else min(len(order), need)
            taken = _pick(keys, order[:end])
            for c, _n in parts:
                used = taken.count(c.key_value)
                if used:
                    c.skip(used)
            if extra >= end:
                extra -= end
                continue
            chosen = order[extra:end]
            chunk = (taken[extra:], _pick(ts, chosen), _pick(seqs, chosen), _pick(payloads, chosen))
            extra = 0
        yield chunk
        emitted += len(chunk[0])
        if limit and emitted >= limit:
            return


def _positions(ts: list, rng: _Range, start: int):
    """Positions from ``start`` on whose timestamp is in the range, ascending.

    A ``range`` when the timestamps are in order (the usual case: found by
    binary search), else a list.
    """
    if ts == sorted(ts):
        lo = start if rng.start is None else max(start, bisect_left(ts, rng.start))
        hi = len(ts) if rng.end is None else bisect_right(ts, rng.end)
        return range(lo, max(lo, hi))
    contains = rng.contains
    return [i for i in range(start, len(ts)) if contains(ts[i])]


def _columns(rng: _Range, m: MemberInfo, table, data, path: str, min_ord):
    """The matching records of a loaded member: (ordinals, timestamps, sequences, begins,
    ends, first position); offsets ``begins[i]:ends[i]`` into the member's data.  Raises
    CorruptMember when the data does not split into the table's messages."""
    ords, ts, seqs = table.ordinals, table.timestamps, table.sequences
    bounds = message_bounds(table, data, path, m.offset)
    start = 0 if min_ord is None else bisect_left(ords, min_ord)
    if rng.active and not rng.covers(m):
        keep = _positions(ts, rng, start)
        if isinstance(keep, range):
            hi = keep.stop
            return ords[:hi], ts[:hi], seqs[:hi], bounds[:hi], bounds[1 : hi + 1], keep.start
        return (
            [ords[i] for i in keep],
            [ts[i] for i in keep],
            [seqs[i] for i in keep],
            [bounds[i] for i in keep],
            [bounds[i + 1] for i in keep],
            0,
        )
    return ords, ts, seqs, bounds[:-1], bounds[1:], start


def _log_loader(rng: _Range):
    def load(path, m, table, data, min_ord):
        ords, ts, seqs, begins, ends, start = _columns(rng, m, table, data, path, min_ord)

        def payloads(i: int, j: int) -> list:
            return [data[a:b] for a, b in zip(begins[i:j], ends[i:j], strict=True)]

        return ords, ts, seqs, payloads, start

    return load


def _metric_loader(rng: _Range):
    def load(path, m, table, data, min_ord):
        ords, ts, seqs, begins, ends, start = _columns(rng, m, table, data, path, min_ord)
        # Parsed at once: a member with a line that does not parse is skipped whole.
        parsed = [None] * start
        bulk = _parse_lines(data, begins, ends, start)
        if bulk is not None:
            parsed += bulk
            return ords, ts, seqs, lambda i, j: parsed[i:j], start
        for a, b in zip(begins[start:], ends[start:], strict=True):
            try:
                obj = json.loads(data[a:b])
            except ValueError as e:
                raise CorruptMember(f"metric line does not parse: {e}", path, m.offset) from None
            payload = obj.get("data") if isinstance(obj, dict) else None
            if not isinstance(payload, dict):
                raise CorruptMember("metric line has no data object", path, m.offset)
            parsed.append(payload)
        return ords, ts, seqs, lambda i, j: parsed[i:j], start

    return load


def _parse_lines(data: bytes, begins: list, ends: list, start: int) -> Optional[list]:
    """The ``data`` objects of the metric lines ``begins[start:]``..``ends[start:]``, parsed
    with one ``json.loads`` when they are back to back, each a JSON object ending in a
    newline (JSON text holds no raw newline, so the lines joined by commas make an array);
    None when they are not, or anything does not parse: the caller then parses line by
    line and reports the line."""
    n = len(begins) - start
    if n <= 0:
        return []
    lo, hi = begins[start], ends[-1]
    if hi - lo != sum(e - b for b, e in zip(begins[start:], ends[start:], strict=True)):
        return None  # not contiguous (positions picked out of order)
    block = data[lo:hi]
    if not block.endswith(b"\n") or block.count(b"\n") != n:
        return None
    try:
        objs = json.loads(b"[" + block[:-1].replace(b"\n", b",") + b"]")
    except ValueError:
        return None
    if len(objs) != n:
        return None
    out = []
    for obj in objs:
        payload = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(payload, dict):
            return None
        out.append(payload)
    return out


def _event_loader(rng: _Range):
    def load(path, m, table, data, min_ord):
        ords, ts, seqs, begins, ends, start = _columns(rng, m, table, data, path, min_ord)
        # Parsed at once, like metrics: a member with a line that is not a JSON object is
        # skipped whole (counted as corrupt).
        parsed = [None] * start
        for a, b in zip(begins[start:], ends[start:], strict=True):
            try:
                obj = json.loads(data[a:b])
            except ValueError as e:
                raise CorruptMember(f"event line does not parse: {e}", path, m.offset) from None
            if not isinstance(obj, dict):
                raise CorruptMember("event line is not a JSON object", path, m.offset)
            parsed.append(obj)
        return ords, ts, seqs, lambda i, j: parsed[i:j], start

    return load


def _check_args(offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise ValueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")


# -- legacy members -----------------------------------------------------------


def _legacy_log_records(q: _Query, path: str, members: list, home: Optional[int], stream: int):
    """Yield (timestamp, sequence, stream, content) of one legacy file's members."""
    for m in members:
        if m.count == 0 or not q.rng.overlaps(m):
            q.skipped()
            continue
        if q.cancelled():
            return
        loaded = q.load(path, m)
        if loaded is None:
            continue
        for st, ts, seq, content in parse_legacy_log_member(loaded[1]):
            if st not in (STREAM_STDOUT, STREAM_STDERR):
                st = home if home is not None else STREAM_STDOUT
            if (stream == STREAM_UNSPECIFIED or st == stream) and q.rng.contains(ts):
                yield ts, seq, st, content


def _legacy_logs(q: _Query, streams: dict, stream: int) -> Iterator[tuple]:
    order: list = []
    members: dict = {}
    homes: dict = {}
    seen: set = set()
    for key in (STREAM_STDOUT, STREAM_STDERR):
        for view in streams.get(key, ()):
            for m in view.members:
                if m.kind != KIND_LEGACY:
                    continue
                if view.path not in members:
                    order.append(view.path)
                    members[view.path] = []
                    homes[view.path] = key
                elif homes[view.path] != key:
                    homes[view.path] = None  # listed under both streams
                if (view.path, m.offset) not in seen:
                    seen.add((view.path, m.offset))
                    members[view.path].append(m)
    gens = [_legacy_log_records(q, p, members[p], homes[p], stream) for p in order]
    if len(gens) == 1:
        return gens[0]
    return heapq.merge(*gens, key=lambda r: (r[0], r[1]))


def iter_log_chunks(
    streams: dict,
    stream: int,
    start_time: int = 0,
    end_time: int = 0,
    offset: int = 0,
    limit: int = 0,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget: Optional[FileBudget] = None,
) -> Iterator[tuple]:
    """Yield a job's LOG messages in chunks: ``(streams, timestamps, sequences, contents)``.

    Blocking; any thread.  The same messages, in the same order and with the
    same arguments and cost as iter_logs, as chunks of four equally long,
    non-empty sequences (``streams[i]`` is message i's stream).  Bulk readers
    (the query RPCs) use it to avoid per-message objects on the way.
    """
    if stream not in (STREAM_UNSPECIFIED, STREAM_STDOUT, STREAM_STDERR):
        raise ValueError(f"unknown stream {stream!r}")
    _check_args(offset, limit)
    q = _Query(_Range(start_time, end_time), stats, cancelled, budget)
    try:
        emitted = 0
        chunk: tuple = ([], [], [], [])
        for ts, seq, st, content in _legacy_logs(q, streams, stream):
            if offset:
                offset -= 1
                continue
            if len(chunk[0]) >= _LEGACY_CHUNK:
                q.close()
                yield chunk
                chunk = ([], [], [], [])
            chunk[0].append(st)
            chunk[1].append(ts)
            chunk[2].append(seq)
            chunk[3].append(content)
            emitted += 1
            if limit and emitted >= limit:
                break
        if chunk[0]:
            q.close()
            yield chunk
        if limit and emitted >= limit:
            return
        wanted = (STREAM_STDOUT, STREAM_STDERR) if stream == STREAM_UNSPECIFIED else (stream,)
        listed = []
        for key in (STREAM_STDOUT, STREAM_STDERR):
            if key in wanted:
                entries = [(v.path, m) for v in streams.get(key, ()) for m in v.members]
                listed.append((key, entries))
        remaining = limit - emitted if limit else 0
        if all(_in_order(entries, KIND_LOG) for _key, entries in listed):
            sources = [_Source(q, key, _select(q, entries, KIND_LOG)) for key, entries in listed]
            chunks = _merged(q, sources, offset, remaining, _log_loader(q.rng))
        else:
            chunks = _stored_order(q, listed, KIND_LOG, offset, remaining, _log_loader(q.rng))
        for chunk in chunks:
            q.close()  # the caller may take its time: hold no file meanwhile
            yield chunk
    finally:
        q.close()


#: Legacy records are grouped into chunks of at most this many.
_LEGACY_CHUNK = 1024


def iter_logs(
    streams: dict,
    stream: int,
    start_time: int = 0,
    end_time: int = 0,
    offset: int = 0,
    limit: int = 0,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget: Optional[FileBudget] = None,
) -> Iterator[LogRecord]:
    """Yield a job's LOG messages from published segments.  Blocking; any thread.

    ``streams`` maps 1 (stdout) and 2 (stderr) to that stream's SegmentViews
    in order.  ``stream`` 0 merges both by persistent ordinal.  The inclusive
    time range applies to each bound > 0, then ``offset`` matching messages
    are skipped, then at most ``limit`` are yielded (0 = all).  Members are
    inflated only when records are returned from them (see the module
    docstring).  ``stats.members_inflated`` counts members whose data was
    inflated, ``members_skipped`` members passed over unread (outside the time
    range, empty, or wholly before the offset), ``corrupt_members`` members
    that failed to decode.  A corrupt member is skipped, counted and logged
    on the stdlib logger "joblet_persist.storage".  ``cancelled()`` is checked
    between members.
    Files are opened as members are read, at most storage.files.QUERY_FILES
    at once (within ``budget`` when one is given), and all are closed before
    each record or chunk is handed to the caller and when the generator
    finishes or is closed: a caller that stops reading holds no file.
    """
    chunks = iter_log_chunks(
        streams, stream, start_time, end_time, offset, limit, stats, cancelled, budget
    )
    try:
        for kinds, timestamps, sequences, contents in chunks:
            for st, ts, seq, content in zip(kinds, timestamps, sequences, contents, strict=True):
                yield LogRecord(st, ts, seq, content)
    finally:
        chunks.close()


def iter_metrics(
    segments: tuple,
    start_time: int = 0,
    end_time: int = 0,
    offset: int = 0,
    limit: int = 0,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget: Optional[FileBudget] = None,
) -> Iterator[MetricRecord]:
    """Yield a job's metric samples from published segments.  Blocking; any thread.

    Same semantics and cost rules as iter_logs, over one sequence of
    SegmentViews.  ``MetricRecord.data`` is the stored ``data`` object.
    """
    return _iter_records(
        segments, KIND_METRIC, _legacy_metrics, _metric_loader, MetricRecord,
        start_time, end_time, offset, limit, stats, cancelled, budget,
    )


def _legacy_metrics(data: bytes) -> Iterator[tuple]:
    for rec in parse_legacy_metric_member(data):
        yield rec["timestamp"], rec["sequence"], rec["data"]


def iter_events(
    segments: tuple,
    member_kind: int,
    start_time: int = 0,
    end_time: int = 0,
    offset: int = 0,
    limit: int = 0,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget: Optional[FileBudget] = None,
) -> Iterator[StoredEvent]:
    """Yield a job's telemetry events of one kind from published segments.  Blocking; any
    thread.

    Same semantics and cost rules as iter_metrics, over one event kind's
    SegmentViews; ``member_kind`` is the kind's IPC message type (the JP member
    kind).  ``StoredEvent.data`` is the stored JSON object.  Members of the
    older Go service (JSON lines without a member table) come first, as for
    metrics.
    """
    return _iter_records(
        segments, member_kind, parse_legacy_event_member, _event_loader, StoredEvent,
        start_time, end_time, offset, limit, stats, cancelled, budget,
    )


def _iter_records(
    segments, member_kind, legacy_records, make_loader, make,
    start_time, end_time, offset, limit, stats, cancelled, budget,
) -> Iterator:
    """The one-sequence read behind iter_metrics and iter_events.  Any thread.

    Legacy members (``legacy_records(bytes)`` yields ``(ts, seq, obj)``) come
    first, then the JP members of ``member_kind`` merged by ordinal; every
    record is ``make(ts, seq, obj)``.
    """
    _check_args(offset, limit)
    q = _Query(_Range(start_time, end_time), stats, cancelled, budget)
    try:
        emitted = 0
        entries = [(v.path, m) for v in segments for m in v.members]
        for path, m in entries:
            if m.kind != KIND_LEGACY:
                continue
            if m.count == 0 or not q.rng.overlaps(m):
                q.skipped()
                continue
            if q.cancelled():
                return
            loaded = q.load(path, m)
            if loaded is None:
                continue
            for ts, seq, obj in legacy_records(loaded[1]):
                if not q.rng.contains(ts):
                    continue
                if offset:
                    offset -= 1
                    continue
                q.close()
                yield make(ts, seq, obj)
                emitted += 1
                if limit and emitted >= limit:
                    return
        remaining = limit - emitted if limit else 0
        loader = make_loader(q.rng)
        if _in_order(entries, member_kind):
            source = _Source(q, 0, _select(q, entries, member_kind))
            merged = _merged(q, [source], offset, remaining, loader)
        else:
            merged = _stored_order(q, [(0, entries)], member_kind, offset, remaining, loader)
        for _key, timestamps, sequences, payloads in merged:
            q.close()
            for ts, seq, data in zip(timestamps, sequences, payloads, strict=True):
                yield make(ts, seq, data)
    finally:
        q.close()
