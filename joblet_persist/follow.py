"""Following a job's logs live (FollowLogs) and reading its last lines (TailLogs).

Two threads meet here:

- ``FollowHub`` lives on the reactor thread.  It installs a tap in the
  writer (``BatchingWriter.log_taps``) for each followed job; the tap collects
  the LOG messages the writer accepts during a reactor turn, and one delayed
  call per turn (``callLater(0)``) merges them by arrival number and offers
  the chunk to every follower of the job.  New lines thus reach followers as
  soon as they are accepted from the IPC socket, without waiting for the
  flush.  With nobody following, the writer's cost is one dict lookup per call.
- ``Follower`` is the hand-over to one FollowLogs call's gRPC thread: a
  bounded, thread-safe buffer (a deque under a condition variable).  The
  reactor only appends to it; when a follower's buffer would exceed its byte
  bound (it stopped reading, or reads slower than the job writes), it is cut
  off with RESOURCE_EXHAUSTED instead of growing.
- ``follow_chunks`` runs on the gRPC thread: it reads what is stored, then
  waits on its Follower for new lines.

The hand-off from stored to live lines, without gap or duplicate: in one
reactor turn, ``FollowHub.start`` delivers what the taps collected so far,
takes the job's published snapshot, the writer's not yet published messages
(``BatchingWriter.pending_logs``, with their arrival numbers) and the
storage's ordinal base (persistent ordinal = base + arrival number), and
registers the Follower.  Every message accepted before that turn is in
exactly one of the snapshot and the pending list (a batch leaves the pending
list in the turn storage publishes it); every message accepted after it
reaches the Follower.  The gRPC thread then merges the snapshot's messages
(read with their ordinals) with the pending ones by arrival number, so the
stored part comes in arrival order even when one stream was published
further than the other.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import grpc
from twisted.internet import defer

from joblet_persist._proto import persist_pb2
from joblet_persist.logs import Logger
from joblet_persist.storage.api import IBulkLogReads, ILogTail, IOrdinalBase
from joblet_persist.threads import reactor_only

__all__ = [
    "FOLLOW_FROM_NOW",
    "FOLLOW_FROM_START",
    "FOLLOW_FROM_TAIL",
    "FollowHub",
    "Follower",
    "batches",
    "coalesce",
    "follow_batches",
    "follow_wire",
    "tail_chunks",
]

FOLLOW_FROM_START = persist_pb2.FOLLOW_FROM_START
FOLLOW_FROM_TAIL = persist_pb2.FOLLOW_FROM_TAIL
FOLLOW_FROM_NOW = persist_pb2.FOLLOW_FROM_NOW

#: Bytes a buffered line counts for besides its content (its tuple slots and ints).
LINE_OVERHEAD = 64

#: Seconds the hub gathers followed jobs' new lines before it hands them to the
#: followers: one wake-up of each follower's thread per interval at most, whatever the
#: ingest rate (a thread woken per reactor turn would contend for the GIL with the
#: reactor), at the price of this much latency.
DELIVERY_INTERVAL = 0.01
#: Follower wake-ups a second that the interval stretches to stay within, up to
#: DELIVERY_MAX_INTERVAL.  Each wake-up costs the same whatever it carries: the handler
#: thread's wake-up, one send completed through grpc's polling thread and the GIL
#: hand-offs of both with the reactor.  With 100 followers the interval is 100 ms: a
#: line waits 50 ms on average, at most 100 ms, and the reactor keeps its share.
DELIVERY_WAKEUPS = 1000
DELIVERY_MAX_INTERVAL = 0.1

#: How often a waiting follower wakes up to check that its call is still active,
#: besides being woken by new lines, its end, or the call's termination callback.
_WAKE_SECONDS = 1.0

log = Logger()


class FollowEnded(Exception):
    """A follower was ended by the service: ``code`` and ``details`` are the RPC's status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class Follower:
    """One follower's bounded buffer of live chunks.  Thread-safe.

    The reactor calls ``offer`` and ``end``; the follower's gRPC thread calls
    ``take``.  A chunk is ``(streams, arrivals, timestamps, sequences,
    contents)``, five equally long tuples in arrival order, shared by every
    follower of the job (never mutated).
    """

    def __init__(self, job_id: str, stream: int, max_bytes: int):
        self.job_id = job_id
        self.stream = stream
        self.max_bytes = max(1, int(max_bytes))
        self._cond = threading.Condition(threading.Lock())
        self._chunks: deque = deque()
        self._bytes = 0
        self._ended: Optional[FollowEnded] = None
        self._finished = False

    @property
    def buffered_bytes(self) -> int:
        with self._cond:
            return self._bytes

    @property
    def ended(self) -> Optional[FollowEnded]:
        with self._cond:
            return self._ended

    def offer(self, chunk: tuple, nbytes: int) -> bool:
        """Buffer ``chunk`` (``nbytes`` as counted by the hub).  Reactor thread.

        False when the follower has ended, or ends now because the chunk does
        not fit in its bound (the buffered chunks are dropped: its thread
        only sees the end).
        """
        with self._cond:
            if self._ended is not None:
                return False
            if self._bytes + nbytes > self.max_bytes:
                self._chunks.clear()
                self._bytes = 0
                self._ended = FollowEnded(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"follower of job {self.job_id} fell behind by more than its buffer "
                    f"({self.max_bytes} bytes, query.followBufferBytes); follow again from "
                    "the last line received",
                )
                self._cond.notify_all()
                return False
            self._chunks.append(chunk)
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the follower (its thread sees it after the lines it already holds are
        dropped).  Any thread; the first end wins."""
        with self._cond:
            if self._ended is None:
                self._ended = FollowEnded(code, details)
                self._chunks.clear()
                self._bytes = 0
            self._cond.notify_all()

    def take(self, timeout: float) -> tuple[list, Optional[FollowEnded]]:
        """Wait up to ``timeout`` seconds for chunks; ``(chunks, ended)``.  gRPC thread."""
        with self._cond:
            if not self._chunks and self._ended is None:
                self._cond.wait(timeout)
            chunks = list(self._chunks)
            self._chunks.clear()
            self._bytes = 0
            return chunks, self._ended


@dataclass(frozen=True)
class FollowStart:
    """What ``FollowHub.start`` hands to the follower's thread (read-only there)."""

    follower: Follower
    snapshot: object  # the job's published snapshot, or None (nothing published yet)
    base: Optional[int]  # ordinal base; None when storage does not provide IOrdinalBase
    pending: list  # BatchingWriter.pending_logs at registration


class FollowHub:
    """The followed jobs and their followers.  Reactor thread (except where noted).

    ``writer`` provides ``log_taps``, ``pending_logs`` and ``arrivals``
    (BatchingWriter); ``storage`` provides ``snapshot``/``open_job`` and
    optionally IOrdinalBase.  ``metrics`` (optional) gets
    ``followers(n)`` on every change and ``follower_cut_off()`` per follower
    cut off by its bound.
    """

    def __init__(self, writer, storage, clock, *, buffer_bytes: int = 8 << 20,
                 delivery_interval: float = DELIVERY_INTERVAL, metrics=None):
        self._writer = writer
        self._storage = storage
        self._clock = clock
        self.buffer_bytes = int(buffer_bytes)
        self._interval = max(0.0, float(delivery_interval))
        self._metrics = metrics
        self._followers: dict[str, set[Follower]] = {}
        self._collected: dict[str, list] = {}
        self._delivery = None
        self._stopped = False
        self._total = 0

    @property
    def follower_count(self) -> int:
        return self._total

    def delivery_delay(self) -> float:
        """Seconds from a followed job's first new line to its delivery: the configured
        interval, stretched with the number of followers so that they wake up at most
        DELIVERY_WAKEUPS times a second in all (at most DELIVERY_MAX_INTERVAL)."""
        if not self._interval:
            return 0.0
        return max(self._interval, min(DELIVERY_MAX_INTERVAL, self._total / DELIVERY_WAKEUPS))

    @reactor_only
    def start(self, job_id: str, stream: int) -> defer.Deferred:
        """Register a follower of ``job_id`` (``stream`` 0, 1 or 2); Deferred[FollowStart].

        Loads the job first when storage knows it but has not loaded it.
        Fails with FollowEnded(NOT_FOUND) for a job that storage does not
        know and the writer has no data of, and with FollowEnded(UNAVAILABLE)
        once the hub is stopped.
        """
        if self._stopped:
            return defer.fail(
                FollowEnded(grpc.StatusCode.UNAVAILABLE, "joblet-persist is shutting down")
            )
        if self._storage.snapshot(job_id) is not None:
            return defer.succeed(self._register(job_id, stream))
        d = defer.maybeDeferred(self._storage.open_job, job_id)
        d.addCallback(lambda _snap: self._register(job_id, stream))
        return d

    def _register(self, job_id: str, stream: int) -> FollowStart:
        if self._stopped:
            raise FollowEnded(grpc.StatusCode.UNAVAILABLE, "joblet-persist is shutting down")
        # Lines collected by the taps before this turn are in the writer's pending list
        # (or published): deliver them to the existing followers now, so that the new
        # follower does not receive them a second time.
        self._deliver()
        snapshot = self._storage.snapshot(job_id)
        pending = self._writer.pending_logs(job_id)
        if snapshot is None and not pending and job_id not in self._writer.arrivals:
            raise FollowEnded(grpc.StatusCode.NOT_FOUND, f"job {job_id} not found")
        base = (
            self._storage.ordinal_base(job_id) if IOrdinalBase.providedBy(self._storage) else None
        )
        follower = Follower(job_id, stream, self.buffer_bytes)
        followers = self._followers.get(job_id)
        if followers is None:
            followers = self._followers[job_id] = set()
            self._writer.log_taps[job_id] = functools.partial(self._collect, job_id)
        followers.add(follower)
        self._count()
        return FollowStart(follower, snapshot, base, pending)

    @reactor_only
    def remove(self, follower: Follower) -> None:
        """Forget a follower (its call ended).  Reactor thread."""
        followers = self._followers.get(follower.job_id)
        if followers is None or follower not in followers:
            return
        followers.discard(follower)
        if not followers:
            del self._followers[follower.job_id]
            self._writer.log_taps.pop(follower.job_id, None)
            self._collected.pop(follower.job_id, None)
        self._count()

    @reactor_only
    def end_job(self, job_id: str, code: grpc.StatusCode, details: str) -> None:
        """End every follower of ``job_id`` (the job was deleted)."""
        for follower in list(self._followers.get(job_id, ())):
            follower.end(code, details)
            self.remove(follower)

    def stop(self) -> None:
        """End every follower with UNAVAILABLE and refuse new ones.  Reactor thread.

        Called when the gRPC server starts stopping, so that followers end at
        once instead of holding their calls until the grace period is over.
        """
        self._stopped = True
        self._deliver()
        for job_id in list(self._followers):
            self.end_job(job_id, grpc.StatusCode.UNAVAILABLE, "joblet-persist is shutting down")

    # -- the writer's tap and the delivery ---------------------------------------------

    def _collect(self, job_id, stream, arrivals, timestamps, sequences, contents) -> None:
        """The writer's tap: copy the accepted lines into the job's collected columns
        until the next delivery (C-level list extends: no object per line)."""
        collected = self._collected.get(job_id)
        if collected is None:
            collected = self._collected[job_id] = _Collected()
        collected.add(stream, arrivals, timestamps, sequences, contents)
        if self._delivery is None:
            self._delivery = self._clock.callLater(self.delivery_delay(), self._deliver)

    def _deliver(self) -> None:
        """Offer each job's collected lines, in arrival order, to its followers."""
        if self._delivery is not None:
            if self._delivery.active():
                self._delivery.cancel()
            self._delivery = None
        collected, self._collected = self._collected, {}
        cut = 0
        for job_id, columns in collected.items():
            followers = self._followers.get(job_id)
            if not followers:
                continue
            chunk = LiveChunk(columns.chunk())
            nbytes = columns.nbytes + LINE_OVERHEAD * len(chunk[4])
            for follower in list(followers):
                if not follower.offer(chunk, nbytes):
                    cut += 1
                    self.remove(follower)
        if cut and self._metrics is not None:
            for _ in range(cut):
                self._metrics.follower_cut_off()

    def _count(self) -> None:
        self._total = sum(len(f) for f in self._followers.values())
        if self._metrics is not None:
            self._metrics.followers(self._total)


class _Collected:
    """One followed job's lines collected since the last delivery, as columns.
    Reactor thread.  Each tap call's lines are in arrival order; the calls usually
    are too (then ``chunk`` only converts), else ``chunk`` sorts by arrival."""

    __slots__ = ("streams", "arrivals", "timestamps", "sequences", "contents", "nbytes",
                 "in_order")

    def __init__(self):
        self.streams: list = []
        self.arrivals: list = []
        self.timestamps: list = []
        self.sequences: list = []
        self.contents: list = []
        self.nbytes = 0
        self.in_order = True

    def add(self, stream, arrivals, timestamps, sequences, contents) -> None:
        if not arrivals:
            return
        if self.arrivals and arrivals[0] < self.arrivals[-1]:
            self.in_order = False
        self.streams += (stream,) * len(arrivals)
        self.arrivals += arrivals
        self.timestamps += timestamps
        self.sequences += sequences
        self.contents += contents
        self.nbytes += sum(map(len, contents))

    def chunk(self) -> tuple:
        """``(streams, arrivals, timestamps, sequences, contents)`` in arrival order."""
        columns = (self.streams, self.arrivals, self.timestamps, self.sequences, self.contents)
        if self.in_order:
            return tuple(map(tuple, columns))
        # Each call's run is sorted already: timsort merges the runs.
        order = sorted(range(len(self.arrivals)), key=self.arrivals.__getitem__)
        return tuple(tuple(map(column.__getitem__, order)) for column in columns)


class LiveChunk(tuple):
    """A delivered chunk ``(streams, arrivals, timestamps, sequences, contents)``, shared by
    every follower of the job, with what is sent from it cached per stream filter: the
    LogLineBatch messages (``batches``) and their serialized bytes (``wire``).  A hundred
    followers of a job build and serialize a delivery once, not a hundred times.  Any
    thread.
    """

    __slots__ = ()

    def __new__(cls, columns: tuple):
        return super().__new__(cls, (*columns, threading.Lock(), {}, {}))

    def lines(self, stream: int) -> tuple:
        """``(streams, timestamps, sequences, contents)`` of ``stream`` (0: both)."""
        streams, _arrivals, ts, seqs, contents = self[:5]
        if stream:
            keep = [i for i, st in enumerate(streams) if st == stream]
            if len(keep) < len(streams):
                return (
                    [streams[i] for i in keep], [ts[i] for i in keep],
                    [seqs[i] for i in keep], [contents[i] for i in keep],
                )
        return streams, ts, seqs, contents

    def _sized(self, job_id: str, stream: int, max_items: int, max_bytes: int) -> list:
        """``[(LogLineBatch, lines, content bytes)]`` for ``stream``; under the lock."""
        cache = self[6]
        found = cache.get(stream)
        if found is None:
            lines = self.lines(stream)
            found = cache[stream] = (
                list(sized_batches(job_id, [lines], max_items, max_bytes)) if lines[0] else []
            )
        return found

    def batches(self, job_id: str, stream: int, max_items: int, max_bytes: int) -> list:
        """The chunk's LogLineBatch messages for ``stream`` (built once, then shared)."""
        with self[5]:
            return [batch for batch, _n, _size in
                    self._sized(job_id, stream, max_items, max_bytes)]

    def wire(self, job_id: str, stream: int, max_items: int, max_bytes: int) -> list:
        """``[(serialized LogLineBatch, lines, content bytes)]`` for ``stream``: the same
        bytes objects for every caller (serialized once)."""
        lock, cache = self[5], self[7]
        with lock:
            found = cache.get(stream)
            if found is None:
                found = cache[stream] = [
                    (batch.SerializeToString(), n, size)
                    for batch, n, size in self._sized(job_id, stream, max_items, max_bytes)
                ]
            return found


def coalesce(pieces: list, max_items: int, max_bytes: int) -> Iterator[bytes]:
    """Serialized LogLineBatches ``(bytes, lines, content bytes)`` joined into as few
    messages as the bounds allow, in order.

    A serialized message with a repeated field is the concatenation of the encodings
    of its elements, so ``b"".join`` of two LogLineBatches is byte for byte the
    LogLineBatch of their lines together.  A piece alone is passed on as it is (the
    shared object, not a copy).
    """
    group: list = []
    count = size = 0
    for data, n, nbytes in pieces:
        if group and (count + n > max_items or size + nbytes > max_bytes):
            yield group[0] if len(group) == 1 else b"".join(group)
            group = []
            count = size = 0
        group.append(data)
        count += n
        size += nbytes
    if group:
        yield group[0] if len(group) == 1 else b"".join(group)


# -- gRPC thread ------------------------------------------------------------------


def tail_chunks(snapshot, stream: int, lines: int, start_time: int, end_time: int, stats,
                cancelled) -> Iterator[tuple]:
    """The last ``lines`` matching messages of a snapshot as iter_log_chunks chunks.

    Blocking; gRPC thread.  With ILogTail the count comes from member headers
    and the read starts at the member holding the first line wanted;
    otherwise the snapshot is counted through ``iter_logs``.
    """
    if ILogTail.providedBy(snapshot):
        total = snapshot.count_logs(stream, start_time, end_time, stats, cancelled)
    else:
        total = sum(1 for _ in snapshot.iter_logs(stream, start_time, end_time,
                                                   cancelled=cancelled))
    offset = max(0, total - lines)
    if lines <= 0 or total == 0:
        return iter(())
    return _chunks(snapshot, stream, start_time, end_time, offset, stats, cancelled)


def _chunks(snapshot, stream, start_time, end_time, offset, stats, cancelled) -> Iterator[tuple]:
    """A snapshot's log chunks (IBulkLogReads), or its records as one-line chunks."""
    if IBulkLogReads.providedBy(snapshot):
        return snapshot.iter_log_chunks(stream, start_time, end_time, offset, 0, stats=stats,
                                        cancelled=cancelled)
    records = snapshot.iter_logs(stream, start_time, end_time, offset, 0, stats=stats,
                                 cancelled=cancelled)
    return (((r.stream,), (r.timestamp,), (r.sequence,), (r.content,)) for r in records)


def _stored_chunks(start: FollowStart, stream: int, start_time: int, offset: int, stats,
                   cancelled) -> Iterator[tuple]:
    """The snapshot's messages from ``offset`` as ``(streams, timestamps, sequences,
    contents, arrivals)``; arrivals relative to the base (None when unknown)."""
    snap = start.snapshot
    if snap is None:
        return
    if ILogTail.providedBy(snap) and start.base is not None:
        base = start.base
        for streams, ts, seqs, contents, ords in snap.iter_log_chunks_ordinals(
            stream, start_time, 0, offset, 0, stats, cancelled
        ):
            yield streams, ts, seqs, contents, [o - base for o in ords]
        return
    for streams, ts, seqs, contents in _chunks(snap, stream, start_time, 0, offset, stats,
                                               cancelled):
        yield streams, ts, seqs, contents, None


def _pending_rows(start: FollowStart, stream: int, start_time: int) -> list:
    """The writer's pending messages of ``stream`` (0: both) from ``start_time``, as rows
    ``(arrival, stream, timestamp, sequence, content)`` in arrival order."""
    rows = [
        (a, st, t, s, c)
        for st, arrivals, timestamps, sequences, contents in start.pending
        if stream == 0 or st == stream
        for a, t, s, c in zip(arrivals, timestamps, sequences, contents, strict=True)
        if start_time <= 0 or t >= start_time
    ]
    rows.sort(key=lambda row: row[0])
    return rows


def _merge_stored(stored: Iterator[tuple], rows: list) -> Iterator[tuple]:
    """Stored chunks and pending rows merged by arrival, as ``(streams, timestamps,
    sequences, contents)`` chunks.  A stored message without an arrival (unknown
    base) comes before every pending row."""
    i, n = 0, len(rows)
    for streams, ts, seqs, contents, arrivals in stored:
        if arrivals is None or i >= n or arrivals[-1] < rows[i][0]:
            yield streams, ts, seqs, contents
            continue
        out: tuple = ([], [], [], [])
        for k, a in enumerate(arrivals):
            while i < n and rows[i][0] < a:
                _a, st, t, s, c = rows[i]
                for column, value in zip(out, (st, t, s, c), strict=True):
                    column.append(value)
                i += 1
            for column, value in zip(out, (streams[k], ts[k], seqs[k], contents[k]),
                                     strict=True):
                column.append(value)
        yield out
    if i < n:
        rest = rows[i:]
        yield (
            [r[1] for r in rest], [r[2] for r in rest], [r[3] for r in rest], [r[4] for r in rest]
        )


def _skip(chunks: Iterator[tuple], skip: int) -> Iterator[tuple]:
    for chunk in chunks:
        n = len(chunk[0])
        if skip >= n:
            skip -= n
            continue
        if skip:
            chunk = tuple(column[skip:] for column in chunk)
            skip = 0
        yield chunk


def stored_part(start: FollowStart, stream: int, start_from: int, tail_lines: int,
                start_time: int, stats, cancelled) -> Iterator[tuple]:
    """What a follower gets before live lines: ``(streams, timestamps, sequences, contents)``
    chunks in arrival order.  Blocking; gRPC thread."""
    if start_from == FOLLOW_FROM_NOW:
        return iter(())
    rows = _pending_rows(start, stream, start_time)
    offset = 0
    skip = 0
    if start_from == FOLLOW_FROM_TAIL:
        if tail_lines <= 0:
            return iter(())
        # The last N of (stored + pending) lie within the last N of each.
        stored_total = 0
        snap = start.snapshot
        if snap is not None:
            if ILogTail.providedBy(snap):
                stored_total = snap.count_logs(stream, start_time, 0, stats, cancelled)
            else:
                stored_total = sum(
                    1 for _ in snap.iter_logs(stream, start_time, 0, cancelled=cancelled)
                )
        offset = max(0, stored_total - tail_lines)
        rows = rows[max(0, len(rows) - tail_lines):]
        produced = (stored_total - offset) + len(rows)
        skip = max(0, produced - tail_lines)
    merged = _merge_stored(_stored_chunks(start, stream, start_time, offset, stats, cancelled),
                           rows)
    return _skip(merged, skip) if skip else merged


def live_takes(follower: Follower, stream: int, idle_timeout: float,
               is_active: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
               wake: float = _WAKE_SECONDS) -> Iterator[list]:
    """New lines for ``follower``: per wake-up, the list of LiveChunks holding lines of
    ``stream`` (0: any) that arrived since the last one (several when the follower is
    behind: they go out together).

    Blocking; gRPC thread.  Returns (normally) when ``idle_timeout`` > 0
    seconds pass without a line or when ``is_active()`` turns false; raises
    FollowEnded when the service ended the follower (cut off, stopping, job
    deleted).
    """
    last = clock()
    while True:
        wait = wake
        if idle_timeout > 0:
            wait = min(wait, max(0.0, last + idle_timeout - clock()))
        chunks, ended = follower.take(wait)
        if ended is not None:
            raise ended
        if stream:
            chunks = [chunk for chunk in chunks if stream in chunk[0]]
        if chunks:
            last = clock()
            yield chunks
        if not is_active():
            return
        if idle_timeout > 0 and clock() - last >= idle_timeout:
            return


def live_chunks(follower: Follower, stream: int, idle_timeout: float, is_active: Callable[[], bool],
                clock: Callable[[], float] = time.monotonic,
                wake: float = _WAKE_SECONDS) -> Iterator[tuple]:
    """``live_takes``, one LiveChunk at a time.  Blocking; gRPC thread."""
    for chunks in live_takes(follower, stream, idle_timeout, is_active, clock, wake):
        yield from chunks


def follow_batches(start: FollowStart, job_id: str, stream: int, start_from: int,
                   tail_lines: int, start_time: int, idle_timeout: float, stats, cancelled,
                   max_items: int, max_bytes: int) -> Iterator[persist_pb2.LogLineBatch]:
    """FollowLogs' messages: stored lines from the requested point, then live lines, until
    the call ends.  Blocking; gRPC thread.  Raises FollowEnded when the service ends the
    follower."""
    yield from batches(
        job_id,
        stored_part(start, stream, start_from, tail_lines, start_time, stats, cancelled),
        max_items,
        max_bytes,
    )
    if cancelled():
        return
    for chunk in live_chunks(start.follower, stream, idle_timeout, lambda: not cancelled()):
        yield from chunk.batches(job_id, stream, max_items, max_bytes)


def follow_wire(start: FollowStart, job_id: str, stream: int, start_from: int,
                tail_lines: int, start_time: int, idle_timeout: float, stats, cancelled,
                max_items: int, max_bytes: int) -> Iterator[bytes]:
    """``follow_batches`` serialized, for a pass-through response serializer: the same
    lines in the same order, as serialized LogLineBatch messages.  Live lines are
    serialized once per delivery and the bytes shared by every follower of the job;
    what a follower takes in one wake-up goes out in as few messages as ``max_items``
    / ``max_bytes`` allow.  Blocking; gRPC thread."""
    for batch in batches(
        job_id,
        stored_part(start, stream, start_from, tail_lines, start_time, stats, cancelled),
        max_items,
        max_bytes,
    ):
        yield batch.SerializeToString()
    if cancelled():
        return
    for chunks in live_takes(start.follower, stream, idle_timeout, lambda: not cancelled()):
        if len(chunks) == 1:
            pieces = chunks[0].wire(job_id, stream, max_items, max_bytes)
        else:
            pieces = [piece for chunk in chunks
                      for piece in chunk.wire(job_id, stream, max_items, max_bytes)]
        yield from coalesce(pieces, max_items, max_bytes)


def batches(job_id: str, chunks: Iterator[tuple], max_items: int,
            max_bytes: int) -> Iterator[persist_pb2.LogLineBatch]:
    """LogLineBatch messages of at most ``max_items`` lines / ``max_bytes`` of content,
    one or more per chunk (a chunk's lines are sent before the next chunk is waited
    for; a line larger than ``max_bytes`` travels alone)."""
    for batch, _n, _size in sized_batches(job_id, chunks, max_items, max_bytes):
        yield batch


def sized_batches(job_id: str, chunks: Iterator[tuple], max_items: int,
                  max_bytes: int) -> Iterator[tuple]:
    """``batches`` with each message's line count and content bytes:
    ``(LogLineBatch, lines, content bytes)``."""
    for streams, timestamps, sequences, contents in chunks:
        batch = persist_pb2.LogLineBatch()
        add = batch.lines.add
        count = size = 0
        for st, ts, seq, content in zip(streams, timestamps, sequences, contents, strict=True):
            n = len(content)
            if count and (count >= max_items or size + n > max_bytes):
                yield batch, count, size
                batch = persist_pb2.LogLineBatch()
                add = batch.lines.add
                count = size = 0
            m = add()
            m.job_uuid = job_id
            m.stream = st
            m.timestamp = ts
            m.sequence = seq
            m.content = content
            count += 1
            size += n
        if count:
            yield batch, count, size
