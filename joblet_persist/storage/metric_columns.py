"""Columnar reads of stored metric samples: the numeric fields an aggregation asks for.

Leaf module: no reactor imports.  ``iter_metric_columns`` runs on a gRPC thread
and hands the CPU work of each member (inflate, CRC check, table decode, parse)
to pool threads through an injected ``submit(fn, *args) ->
concurrent.futures.Future``, as the search does; ``thd_member_columns`` is that
work.

A stored metric line (docs/storage-format.md section 4) is a JSON object; what
an aggregation needs of it is up to eleven numbers.  Building a dict per line
with ``json.loads`` and reading the fields back out of it was most of
AggregateMetrics' time, so a member's lines are scanned by
``_speedups.metric_columns`` (C, without the GIL while it scans), which
returns one list per asked field.  It reads the plain form: any JSON object
the writer or another JSON writer could produce with the fields as numbers
(any whitespace, key order, extra keys and values, exponents, negative and
big integers, escaped strings), and defers (returns None) on anything else
(a field missing, null or not a number, camelCase keys, a key twice, a key with a ``\\u`` escape
key, non-ASCII text, a line that does not parse): those members take the json
route, ``columns_from_json``, the reference, which reads them exactly as
QueryMetrics does and fails the same way on a line that does not parse (the
member is then skipped whole and counted corrupt, as the reader does).  Both
give each value as ``getter(field)`` reads it from the line's ``data`` object:
float fields (``cpu_usage``, ``gpu_usage``) as ``float(value)``, the others as
``int(value)``, 0 where that conversion fails.
"""

from __future__ import annotations

import json
import operator
from collections import deque
from itertools import accumulate
from typing import Callable, Iterator, Optional

from joblet_persist.storage import reader
from joblet_persist.storage.api import ReadStats
from joblet_persist.storage.format import (
    KIND_LEGACY,
    KIND_METRIC,
    CorruptMember,
    MemberInfo,
    decode_member_table,
    message_bounds,
)
from joblet_persist.threads import run_inline

__all__ = [
    "FIELDS",
    "columns_from_json",
    "columns_from_objects",
    "getter",
    "iter_metric_columns",
    "number",
    "parse_columns",
    "thd_member_columns",
]

#: Fields of a stored metric sample that are numbers, in the order answers list them; a
#: field's position here is its code for ``_speedups.metric_columns``.
FIELDS = (
    "cpu_usage",
    "memory_usage",
    "gpu_usage",
    "disk_io.read_bytes",
    "disk_io.write_bytes",
    "disk_io.read_ops",
    "disk_io.write_ops",
    "network_io.rx_bytes",
    "network_io.tx_bytes",
    "network_io.rx_packets",
    "network_io.tx_packets",
)
FLOAT_FIELDS = frozenset(("cpu_usage", "gpu_usage"))
_CODES = {name: i for i, name in enumerate(FIELDS)}

try:
    from joblet_persist._speedups import metric_columns as _metric_columns_c
except ImportError:  # not built: the json route reads every member
    _metric_columns_c = None


def number(data: dict, key: str, kind):
    """A numeric field of a stored metric object; missing or unreadable -> 0.

    snake_case keys (the stored format) and protobuf JSON's camelCase are both read.
    """
    value = data.get(key)
    if value is None:
        head, *rest = key.split("_")
        value = data.get(head + "".join(w.title() for w in rest))
    if value is None:
        return kind(0)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return kind(0)


def getter(field: str) -> Callable[[dict], object]:
    """The function reading ``field`` from a sample's ``data`` object as QueryMetrics does."""
    if "." not in field:
        kind = float if field in FLOAT_FIELDS else int

        def get_top(data: dict):
            value = data.get(field)
            if type(value) is kind:  # the stored format: no conversion needed
                return value
            return number(data, field, kind)

        return get_top
    group, name = field.split(".")
    camel = {"disk_io": "diskIo", "network_io": "networkIo"}[group]

    def get(data: dict):
        sub = data.get(group)
        if sub is None:
            sub = data.get(camel)
        if not isinstance(sub, dict):
            return 0
        value = sub.get(name)
        if type(value) is int:
            return value
        return number(sub, name, int)

    return get


def columns_from_objects(datas: list, fields: tuple) -> list:
    """One list per field of the ``data`` objects ``datas``, read by ``getter``."""
    return [[get(d) for d in datas] for get in map(getter, fields)]


class _BadLine(CorruptMember):
    """A line of an inflated member is not a JSON object with a data object."""


def _data_objects(data, lengths: list, lo: int, hi: int) -> list:
    """The ``data`` objects of lines lo..hi-1, parsed as ``reader.iter_metrics`` parses
    them (one json.loads for the lot where it can, else line by line); raises _BadLine
    (without a place) for the first line that is not a JSON object with a data object."""
    bounds = list(accumulate(lengths[: hi], initial=0))
    begins, ends = bounds[:-1], bounds[1:]
    bulk = reader._parse_lines(data, begins, ends, lo)
    if bulk is not None:
        return bulk
    out = []
    for a, b in zip(begins[lo:], ends[lo:], strict=True):
        try:
            obj = json.loads(bytes(data[a:b]))
        except (ValueError, RecursionError) as e:
            raise _BadLine(f"metric line does not parse: {e}") from None
        payload = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(payload, dict):
            raise _BadLine("metric line has no data object")
        out.append(payload)
    return out


def columns_from_json(data, lengths: list, lo: int, hi: int, fields: tuple) -> list:
    """The reference (and the route for what the C scanner defers): lines lo..hi-1 of a
    member (line i is ``lengths[i]`` bytes of ``data`` after the lines before it) parsed
    with json.loads, one list per field of ``fields`` (names from FIELDS).  Raises
    CorruptMember for a line that is not a JSON object with a data object."""
    return columns_from_objects(_data_objects(data, lengths, lo, hi), fields)


def parse_columns(data, lengths: list, lo: int, hi: int, fields: tuple) -> list:
    """``columns_from_json``'s answer, by the C scanner where it reads every line."""
    if _metric_columns_c is not None:
        codes = tuple(_CODES[f] for f in fields)
        found = _metric_columns_c(data, lengths, lo, hi, codes)
        if found is not None:
            return found
    return columns_from_json(data, lengths, lo, hi, fields)


def thd_member_columns(buf, m: MemberInfo, path: str, fields: tuple, start_time: int,
                       end_time: int) -> tuple:
    """Inflate, check and parse one metric member: ``(timestamps, columns)`` of its
    samples inside the inclusive time range, in stored order.  Pool thread.  Raises
    CorruptMember (the member is then skipped whole, as the reader skips it)."""
    table = decode_member_table(buf, m)
    data = reader.inflate_member_bytes(buf, m, path) if m.raw_size else b""
    lengths = table.lengths
    if lengths is None:  # a line member: its lines are found at the data's newlines
        bounds = message_bounds(table, data, path, m.offset)
        lengths = list(map(operator.sub, bounds[1:], bounds[:-1]))
    rng = reader._Range(start_time, end_time)
    where = reader._positions(table.timestamps, rng, 0) if rng.active and not rng.covers(m) \
        else range(len(lengths))
    # Timestamps out of order inside the member give a list of positions: its runs of
    # consecutive lines are parsed (only the lines in range, as the reader parses them).
    runs = [(where.start, where.stop)] if isinstance(where, range) else _runs(where)
    columns: list = [[] for _ in fields]
    try:
        for lo, hi in runs:
            for column, part in zip(columns, parse_columns(data, lengths, lo, hi, fields),
                                    strict=True):
                column += part
    except _BadLine as e:
        raise _BadLine(e.reason, path, m.offset) from None
    if isinstance(where, range):
        return table.timestamps[where.start : where.stop], columns
    return [table.timestamps[i] for i in where], columns


def _runs(positions: list) -> list:
    """``[(lo, hi)]`` of the runs of consecutive numbers in ascending ``positions``."""
    out: list = []
    for i in positions:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _rows_to_columns(records, fields: tuple, chunk: int = 4096) -> Iterator[tuple]:
    """``(timestamps, columns)`` chunks of MetricRecords (the reader's own order)."""
    getters = [getter(f) for f in fields]
    times: list = []
    datas: list = []
    for rec in records:
        times.append(rec.timestamp)
        datas.append(rec.data if isinstance(rec.data, dict) else {})
        if len(times) >= chunk:
            yield times, [[get(d) for d in datas] for get in getters]
            times, datas = [], []
    if times:
        yield times, [[get(d) for d in datas] for get in getters]


def iter_metric_columns(
    segments: tuple,
    fields: tuple,
    start_time: int = 0,
    end_time: int = 0,
    *,
    submit: Callable = run_inline,
    window: int = 4,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget=None,
) -> Iterator[tuple]:
    """Yield a job's metric samples inside the inclusive time range as chunks
    ``(timestamps, columns)``, ``columns`` one list per field of ``fields`` (names from
    FIELDS), in the order and with the values of ``reader.iter_metrics`` read by
    ``getter``.  Blocking; gRPC thread.

    Members of the current format are read here (within ``budget``) and parsed by
    ``thd_member_columns`` through ``submit``, up to ``window`` at once, so several
    inflate and scan in parallel; members outside the range are skipped by their
    index entry.  Legacy members, and metrics whose members are out of ordinal order,
    are read through ``reader.iter_metrics``.  ``cancelled()`` is checked before each
    member; files are released before each chunk is yielded.
    """
    for name in fields:
        if name not in _CODES:
            raise ValueError(f"unknown metric field {name!r}")
    entries = [(v.path, m) for v in segments for m in v.members]
    if any(m.kind == KIND_LEGACY for _p, m in entries) or not reader._in_order(
            entries, KIND_METRIC):
        yield from _rows_to_columns(reader.iter_metrics(
            segments, start_time, end_time, 0, 0, stats, cancelled, budget), fields)
        return
    q = reader._Query(reader._Range(start_time, end_time), stats, cancelled, budget)
    pending: deque = deque()
    try:
        work = reader._select(q, entries, KIND_METRIC)
        window = max(1, window)
        nxt = 0
        while True:
            while nxt < len(work) and len(pending) < window:
                if q.cancelled():
                    return
                path, m = work[nxt]
                nxt += 1
                f = q.file(path)
                f.seek(m.offset)
                buf = f.read(m.size)
                if len(buf) != m.size:
                    q.corrupt(path, m, CorruptMember(
                        f"short read: {len(buf)} of {m.size} bytes", path, m.offset))
                    continue
                pending.append((path, m, submit(
                    thd_member_columns, buf, m, path, fields, start_time, end_time)))
            if not pending:
                return
            path, m, future = pending.popleft()
            try:
                times, columns = future.result()
            except CorruptMember as e:
                if isinstance(e, _BadLine):  # inflated, then a line did not parse
                    q.stats.members_inflated += 1
                q.corrupt(path, m, e)
                continue
            q.stats.members_inflated += 1
            if times:
                q.close()
                yield times, columns
    finally:
        for _path, _m, future in pending:
            future.cancel()
        q.close()
