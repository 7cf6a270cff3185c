"""Reading a job's logs from the end: counting without inflating, and ordinals for follow.

Leaf module: blocking functions over published ``SegmentView`` tuples (as
``storage.reader``), no reactor imports; any thread.

- ``count_logs`` counts the LOG messages a query would match from the member
  headers: a member wholly inside the time range counts as its header's
  message count, one that the range cuts through is counted from its
  per-message table (header only).  Nothing of our format is inflated.  Legacy
  members (files of the older Go service) carry no table and are inflated to be
  counted, as every query does with them.
- The last N messages are then the query with ``offset = count - N``: the
  reader finds the member where that offset lands by binary search over the
  member counts and inflates only the members from there on (see
  storage/reader.py), so a tail costs what it returns, not the job's size.
- ``iter_log_chunks_ordinals`` is ``reader.iter_log_chunks`` with each
  message's persistent ordinal added, which FollowLogs uses to place the stored
  messages among the ones still buffered in the writer (joblet_persist/follow.py).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from joblet_persist.storage import reader
from joblet_persist.storage.api import (
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAM_UNSPECIFIED,
    ReadStats,
)
from joblet_persist.storage.files import FileBudget
from joblet_persist.storage.format import KIND_LEGACY, KIND_LOG

__all__ = ["count_logs", "iter_log_chunks_ordinals"]

#: The ordinal given to messages of legacy members: they come before everything else.
LEGACY_ORDINAL = -(2**62)


def _wanted(stream: int) -> tuple:
    if stream == STREAM_UNSPECIFIED:
        return (STREAM_STDOUT, STREAM_STDERR)
    if stream in (STREAM_STDOUT, STREAM_STDERR):
        return (stream,)
    raise ValueError(f"unknown stream {stream!r}")


def count_logs(
    streams: dict,
    stream: int,
    start_time: int = 0,
    end_time: int = 0,
    stats: Optional[ReadStats] = None,
    cancelled: Callable[[], bool] = lambda: False,
    budget: Optional[FileBudget] = None,
) -> int:
    """How many LOG messages ``iter_log_chunks(streams, stream, start_time, end_time)`` yields.

    Blocking; any thread.  Reads member headers (and the per-message tables of
    members the time range cuts through); inflates only legacy members.
    """
    wanted = _wanted(stream)
    q = reader._Query(reader._Range(start_time, end_time), stats, cancelled, budget)
    try:
        total = sum(1 for _ in reader._legacy_logs(q, streams, stream))
        for key in wanted:
            for view in streams.get(key, ()):
                for m in view.members:
                    if m.kind == KIND_LOG and m.count > 0 and q.rng.overlaps(m):
                        total += q.matching_count(view.path, m)
                    elif m.kind != KIND_LEGACY:
                        q.skipped()
        return total
    finally:
        q.close()


def _ordinal_loader(rng):
    """reader's log loader, with each payload paired with its ordinal: ``(ordinal, content)``."""
    load_columns = reader._log_loader(rng)

    def load(path, m, table, data, min_ord):
        ords, ts, seqs, payloads, start = load_columns(path, m, table, data, min_ord)

        def with_ordinals(i: int, j: int) -> list:
            return list(zip(ords[i:j], payloads(i, j), strict=True))

        return ords, ts, seqs, with_ordinals, start

    return load


def iter_log_chunks_ordinals(
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
    """``reader.iter_log_chunks`` with ordinals: ``(streams, timestamps, sequences, contents,
    ordinals)``.  Blocking; any thread.

    The same messages in the same order, for the same arguments and cost.
    ``ordinals[i]`` is message i's persistent ordinal (LEGACY_ORDINAL for
    messages of legacy members, which come first).
    """
    wanted = _wanted(stream)
    reader._check_args(offset, limit)
    q = reader._Query(reader._Range(start_time, end_time), stats, cancelled, budget)
    try:
        emitted = 0
        chunk: tuple = ([], [], [], [], [])
        for ts, seq, st, content in reader._legacy_logs(q, streams, stream):
            if offset:
                offset -= 1
                continue
            if len(chunk[0]) >= reader._LEGACY_CHUNK:
                q.close()
                yield chunk
                chunk = ([], [], [], [], [])
            for column, value in zip(chunk, (st, ts, seq, content, LEGACY_ORDINAL), strict=True):
                column.append(value)
            emitted += 1
            if limit and emitted >= limit:
                break
        if chunk[0]:
            q.close()
            yield chunk
        if limit and emitted >= limit:
            return
        listed = [
            (key, [(v.path, m) for v in streams.get(key, ()) for m in v.members])
            for key in wanted
        ]
        remaining = limit - emitted if limit else 0
        loader = _ordinal_loader(q.rng)
        if all(reader._in_order(entries, KIND_LOG) for _key, entries in listed):
            sources = [
                reader._Source(q, key, reader._select(q, entries, KIND_LOG))
                for key, entries in listed
            ]
            chunks = reader._merged(q, sources, offset, remaining, loader)
        else:
            chunks = reader._stored_order(q, listed, KIND_LOG, offset, remaining, loader)
        for keys, timestamps, sequences, pairs in chunks:
            q.close()
            yield (
                list(keys),
                list(timestamps),
                list(sequences),
                [content for _o, content in pairs],
                [o for o, _content in pairs],
            )
    finally:
        q.close()
