"""Test doubles shared by the test suites.

- FakeStorage: the one in-memory IStorageBackend, with every optional
  capability of ``joblet_persist.storage.api``; tests/storage_contract.py
  holds it to the same tests as LocalStorage (arrival-order merging,
  inclusive time range on bounds > 0, then offset, then limit, snapshots that
  never change, jobs that must be opened before their snapshot is visible,
  segments, idle unloading).  Each appended batch is one "member", so
  ReadStats counts are meaningful.  Appends complete at once or when the
  test says (``auto=False``), to drive the writer.
- log_batch / metric_batch / metric_payload: build storage batches.
- FakeContext: a grpc.ServicerContext for calling servicer methods directly.
- ImmediateReactor: a Clock whose callFromThread runs the call at once (under
  a lock), so ``blockingCallFromThread`` works without a running reactor when
  the called code fires its Deferred synchronously.
- RecordingMetrics: records the query metric calls.
- make_pki: a throwaway CA, server certificate and client certificates.
"""

from __future__ import annotations

import datetime
import heapq
import ipaddress
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import grpc
from google.protobuf.message import DecodeError
from twisted.internet import defer, task
from zope.interface import alsoProvides, implementer

from joblet_persist import events
from joblet_persist._proto import ipc_pb2
from joblet_persist.storage.api import (
    COUNT_FIELD_OF_KIND,
    EVENT_OF_KIND,
    KIND_OF_EVENT,
    LOG_STREAMS,
    STREAM_STDERR,
    STREAM_STDOUT,
    DataVanished,
    EventBatch,
    IBulkLogReads,
    IFreeSpace,
    IIdleUnload,
    IJobSnapshot,
    IRetentionSegments,
    IStorageBackend,
    JobInfo,
    LogBatch,
    LogRecord,
    MetricBatch,
    MetricRecord,
    Part,
    ReadStats,
    SegmentKind,
    SegmentUsage,
    SpaceProbe,
    StorageUnavailable,
    StoredEvent,
    check_job_id,
)

# -- batches ---------------------------------------------------------------------------

_arrivals = itertools.count(1)


def log_batch(
    job_id: str,
    stream: int,
    lines: Sequence[tuple[int, int, bytes]],
    arrivals: Optional[Sequence[int]] = None,
) -> LogBatch:
    """A LogBatch of ``(timestamp, sequence, content)`` lines.

    Arrival ordinals default to a process-wide increasing counter, so batches
    built one after another merge in the order they were built.
    """
    if arrivals is None:
        arrivals = [next(_arrivals) for _ in lines]
    return LogBatch(
        job_id=job_id,
        stream=stream,
        timestamps=tuple(t for t, _, _ in lines),
        sequences=tuple(s for _, s, _ in lines),
        arrivals=tuple(arrivals),
        contents=tuple(c for _, _, c in lines),
    )


def metric_payload(job_id: str, timestamp: int, sequence: int, **data) -> bytes:
    """A serialized ``joblet.ipc.Metric``; ``data`` holds MetricData fields.

    ``disk_io`` and ``network_io`` are dicts of their sub-fields.
    """
    msg = ipc_pb2.Metric(job_uuid=job_id, timestamp=timestamp, sequence=sequence)
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                setattr(getattr(msg.data, key), sub, v)
        else:
            setattr(msg.data, key, value)
    return msg.SerializeToString()


def metric_batch(
    job_id: str,
    samples: Sequence[tuple[int, int, dict]],
    arrivals: Optional[Sequence[int]] = None,
) -> MetricBatch:
    """A MetricBatch of ``(timestamp, sequence, data)`` samples."""
    if arrivals is None:
        arrivals = [next(_arrivals) for _ in samples]
    return MetricBatch(
        job_id=job_id,
        timestamps=tuple(t for t, _, _ in samples),
        sequences=tuple(s for _, s, _ in samples),
        arrivals=tuple(arrivals),
        payloads=tuple(metric_payload(job_id, t, s, **d) for t, s, d in samples),
    )


def metric_data(payload: bytes) -> dict:
    """The stored JSON object of a serialized ipc Metric (docs/wire.md snake_case keys)."""
    m = ipc_pb2.Metric.FromString(payload).data
    return {
        "cpu_usage": m.cpu_usage,
        "memory_usage": m.memory_usage,
        "gpu_usage": m.gpu_usage,
        "disk_io": {
            "read_bytes": m.disk_io.read_bytes,
            "write_bytes": m.disk_io.write_bytes,
            "read_ops": m.disk_io.read_ops,
            "write_ops": m.disk_io.write_ops,
        },
        "network_io": {
            "rx_bytes": m.network_io.rx_bytes,
            "tx_bytes": m.network_io.tx_bytes,
            "rx_packets": m.network_io.rx_packets,
            "tx_packets": m.network_io.tx_packets,
        },
    }


# -- storage ---------------------------------------------------------------------------

_MEMBER_OVERHEAD = 64  # bytes a member costs beyond its content, like a gzip header
_KIND_OF_STREAM = {STREAM_STDOUT: "stdout", STREAM_STDERR: "stderr"}
_EVENT_KINDS = tuple(kind.value for kind in EVENT_OF_KIND)
_KINDS = ("stdout", "stderr", "metrics", *_EVENT_KINDS)


@dataclass(frozen=True)
class _Member:
    """One appended batch: a stream (0 for metrics) and its records in arrival order.

    ``segment`` is the segment it was stored in: once that is removed (DeleteJob,
    retention), reading the member raises DataVanished, as a deleted file would.
    """

    stream: int
    arrivals: tuple
    records: tuple
    corrupt: bool = False
    segment: Optional[Segment] = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        if self.stream:
            return _MEMBER_OVERHEAD + sum(len(r.content) for r in self.records)
        return _MEMBER_OVERHEAD + 100 * len(self.records)


class Segment:
    """A run of members of one kind; dropped or deleted as a whole.  Reactor thread."""

    def __init__(self, index: int):
        self.index = index
        self.members: list = []
        self.removed = False

    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)


def _in_range(ts: int, start: int, end: int) -> bool:
    return (start <= 0 or ts >= start) and (end <= 0 or ts <= end)


def _check_page(offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")


def _iter_members(job_id, members, start, end, offset, limit, stats, cancelled):
    """Yield matching records of ``members`` merged in arrival order.

    Which records match is decided from per-record timestamps alone (what a
    member header holds), so members before the offset or outside the range
    are skipped without being "inflated"; each member that yields a record
    counts as inflated once.  A member whose segment was removed raises
    DataVanished when it is first read.
    """
    stats = stats if stats is not None else ReadStats()
    usable = []
    for m in members:
        if not any(_in_range(r.timestamp, start, end) for r in m.records):
            stats.members_skipped += 1
        elif m.corrupt:
            stats.corrupt_members += 1
        else:
            usable.append(m)
    matching = heapq.merge(
        *(
            [
                (a, i, r)
                for a, r in zip(m.arrivals, m.records, strict=True)
                if _in_range(r.timestamp, start, end)
            ]
            for i, m in enumerate(usable)
        )
    )
    selected = itertools.islice(matching, offset, offset + limit if limit else None)
    inflated: set = set()
    try:
        for _, index, record in selected:
            if cancelled():
                return
            if index not in inflated:
                segment = usable[index].segment
                if segment is not None and segment.removed:
                    raise DataVanished(job_id, f"segment {segment.index} was removed")
                inflated.add(index)
                stats.members_inflated += 1
            yield record
    finally:
        stats.members_skipped += len(usable) - len(inflated)


def _never_cancelled() -> bool:
    return False


@implementer(IJobSnapshot)
class FakeSnapshot:
    """An immutable view of a FakeStorage job.  Any thread."""

    def __init__(self, job_id: str, info: JobInfo, logs: tuple, metrics: tuple, events=None):
        self.job_id = job_id
        self.info = info
        self._logs = logs
        self._metrics = metrics
        self._events = events or {}  # event kind name -> members

    def iter_logs(
        self,
        stream,
        start_time=0,
        end_time=0,
        offset=0,
        limit=0,
        stats=None,
        cancelled=_never_cancelled,
    ):
        if stream not in (0, 1, 2):
            raise ValueError(f"invalid stream {stream!r}")
        _check_page(offset, limit)
        members = [m for m in self._logs if stream == 0 or m.stream == stream]
        return _iter_members(
            self.job_id, members, start_time, end_time, offset, limit, stats, cancelled
        )

    def iter_metrics(
        self, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=_never_cancelled
    ):
        _check_page(offset, limit)
        return _iter_members(
            self.job_id, list(self._metrics), start_time, end_time, offset, limit, stats, cancelled
        )

    def iter_events(
        self,
        kind,
        start_time=0,
        end_time=0,
        offset=0,
        limit=0,
        stats=None,
        cancelled=_never_cancelled,
    ):
        if kind not in KIND_OF_EVENT:
            raise ValueError(f"unknown event kind {kind!r}")
        _check_page(offset, limit)
        members = list(self._events.get(kind, ()))
        return _iter_members(
            self.job_id, members, start_time, end_time, offset, limit, stats, cancelled
        )


@implementer(IBulkLogReads)
class FakeBulkSnapshot(FakeSnapshot):
    """A FakeSnapshot that also reads logs in columnar chunks (one chunk per 3 records)."""

    def iter_log_chunks(
        self,
        stream,
        start_time=0,
        end_time=0,
        offset=0,
        limit=0,
        stats=None,
        cancelled=_never_cancelled,
    ):
        records = self.iter_logs(stream, start_time, end_time, offset, limit, stats, cancelled)
        return self._chunks(records)

    @staticmethod
    def _chunks(records):
        while chunk := list(itertools.islice(records, 3)):
            yield (
                tuple(r.stream for r in chunk),
                tuple(r.timestamp for r in chunk),
                tuple(r.sequence for r in chunk),
                tuple(r.content for r in chunk),
            )


@dataclass
class _Job:
    created_at: int
    last_updated: int
    segments: dict = field(default_factory=lambda: {kind: [] for kind in _KINDS})

    def members(self, *kinds) -> list:
        return [m for kind in kinds for seg in self.segments[kind] for m in seg.members]

    def part_sizes(self) -> tuple:
        logs = sum(m.size for m in self.members("stdout", "stderr"))
        events = sum(m.size for m in self.members(*_EVENT_KINDS))
        return logs, sum(m.size for m in self.members("metrics")), events

    def info(self, job_id: str) -> JobInfo:
        members = self.members(*_KINDS)
        timestamps = [r.timestamp for m in members for r in m.records]
        return JobInfo(
            job_id=job_id,
            created_at=self.created_at,
            last_updated=self.last_updated,
            log_count=sum(len(m.records) for m in self.members("stdout", "stderr")),
            metric_count=sum(len(m.records) for m in self.members("metrics")),
            size_bytes=sum(m.size for m in members),
            first_timestamp=min(timestamps, default=0),
            last_timestamp=max(timestamps, default=0),
            **{
                COUNT_FIELD_OF_KIND[SegmentKind(kind)]: sum(
                    len(m.records) for m in self.members(kind)
                )
                for kind in _EVENT_KINDS
            },
        )


class Append:
    """One append handed to FakeStorage; ``outcome`` is None until it completes."""

    def __init__(self, storage: FakeStorage, kind: str, batch):
        self._storage = storage
        self.kind = kind  # "logs", "metrics" or "events"
        self.batch = batch
        self.deferred = defer.Deferred()
        self.outcome: Optional[str] = None

    @property
    def key(self):
        """(job id, stream number) of a log batch, (job id, "metrics") of a metric batch,
        (job id, event kind name) of an event batch."""
        b = self.batch
        if self.kind == "events":
            return (b.job_id, b.kind)
        return (b.job_id, b.stream if self.kind == "logs" else "metrics")

    @property
    def items(self) -> list:
        """The batch's contents (logs) or payloads (metrics)."""
        b = self.batch
        return list(b.contents if self.kind == "logs" else b.payloads)

    def succeed(self) -> None:
        """Store and publish the batch, then fire the Deferred with the bytes added."""
        self.outcome = "ok"
        size = self._storage._store(self)
        self._storage._finished(self)
        self.deferred.callback(size)

    def fail(self, error: Optional[Exception] = None) -> None:
        """Fail the append (nothing of it is stored); ENOSPC-like by default."""
        self.outcome = "failed"
        self._storage._finished(self)
        self.deferred.errback(
            error if error is not None else StorageUnavailable("no space left on device")
        )


#: The optional capabilities a FakeStorage provides unless told otherwise.
ALL_CAPABILITIES = (IRetentionSegments, IIdleUnload, IFreeSpace)


@implementer(IStorageBackend)
class FakeStorage:
    """The in-memory IStorageBackend, held to tests/storage_contract.py like LocalStorage.

    Reactor-side methods return Deferreds.  ``now`` gives Unix seconds for
    created_at/last_updated and idle unloading.  Jobs are "loaded" (their
    snapshot visible to ``snapshot()``) once appended to or opened;
    ``unload_idle`` or ``evict(job_id)`` unloads them, as after a restart.

    Appends are recorded in ``calls`` (Append objects).  With ``auto`` (the
    default) each completes at once; ``fail_next`` makes that many of them
    fail.  Without ``auto`` the test completes them (``pending()``, then
    ``succeed()`` / ``fail()``): the batch is published only then, as a real
    backend publishes after the write.  Like LocalStorage, a second append of
    one (job, stream) while one is in flight is refused, and deletions wait
    for the job's appends in flight.

    A stream's members go to segments of at most ``segment_max_bytes``
    (IRetentionSegments); ``space`` is what IFreeSpace reports; ``fail_deletes``
    names jobs whose deletion fails with StorageUnavailable; ``bulk_reads``
    makes snapshots provide IBulkLogReads; ``corrupt_next`` stores the next
    batch as an unreadable member.  ``capabilities`` are the optional
    interfaces it declares (all by default; ``()`` makes a bare backend, to
    test callers' paths for backends without them).
    """

    def __init__(
        self,
        now: Callable[[], float] = time.time,
        *,
        auto: bool = True,
        bulk_reads: bool = False,
        segment_max_bytes: int = 1 << 20,
        capabilities: Sequence = ALL_CAPABILITIES,
    ):
        alsoProvides(self, *capabilities)
        self._now = now
        self.auto = auto
        self.fail_next = 0
        self._snapshot_class = FakeBulkSnapshot if bulk_reads else FakeSnapshot
        self._segment_max_bytes = segment_max_bytes
        self._jobs: dict[str, _Job] = {}
        self._loaded: dict[str, FakeSnapshot] = {}
        self._index: dict[str, JobInfo] = {}
        self._last_used: dict[str, float] = {}
        self._in_flight: dict[str, set] = {}  # job -> keys of appends in flight
        self._idle_waiters: dict[str, list] = {}
        self.calls: list[Append] = []
        self.open_job_calls: list[str] = []
        self.deleted: list = []  # job ids, (job id, part), (job id, kind, index)
        self.fail_deletes: set[str] = set()
        self.running = False
        self.corrupt_next = False
        self.space = SpaceProbe(True, None, 10**12)
        self.unloaded_jobs = 0
        self.skipped_metric_payloads = 0

    # -- reactor thread: lifecycle and appends

    def start(self):
        self.running = True
        return defer.succeed(None)

    def stop(self):
        self.running = False
        return defer.succeed(None)

    def append_logs(self, batch: LogBatch):
        try:
            check_job_id(batch.job_id)
            if batch.stream not in LOG_STREAMS:
                raise ValueError(f"invalid stream {batch.stream!r} for a log batch")
            _same_length(batch.timestamps, batch.sequences, batch.arrivals, batch.contents)
        except ValueError:
            return defer.fail()
        return self._append("logs", batch, len(batch.contents))

    def append_metrics(self, batch: MetricBatch):
        try:
            check_job_id(batch.job_id)
            _same_length(batch.timestamps, batch.sequences, batch.arrivals, batch.payloads)
        except ValueError:
            return defer.fail()
        return self._append("metrics", batch, len(batch.payloads))

    def append_events(self, batch: EventBatch):
        try:
            check_job_id(batch.job_id)
            if batch.kind not in KIND_OF_EVENT:
                raise ValueError(f"unknown event kind {batch.kind!r} for an event batch")
            _same_length(batch.timestamps, batch.sequences, batch.arrivals, batch.payloads)
        except ValueError:
            return defer.fail()
        return self._append("events", batch, len(batch.payloads))

    def _append(self, kind: str, batch, count: int):
        if count == 0:
            return defer.succeed(0)
        call = Append(self, kind, batch)
        in_flight = self._in_flight.setdefault(batch.job_id, set())
        if call.key in in_flight:
            return defer.fail(RuntimeError(f"an append to {call.key} is already in flight"))
        in_flight.add(call.key)
        self.calls.append(call)
        if self.auto:
            if self.fail_next:
                self.fail_next -= 1
                call.fail()
            else:
                call.succeed()
        return call.deferred

    def pending(self) -> list[Append]:
        """Appends not completed yet, in the order they were made."""
        return [c for c in self.calls if c.outcome is None]

    def _finished(self, call: Append) -> None:
        job_id = call.batch.job_id
        in_flight = self._in_flight[job_id]
        in_flight.discard(call.key)
        if not in_flight:
            del self._in_flight[job_id]
            for d in self._idle_waiters.pop(job_id, ()):
                d.callback(None)

    def _store(self, call: Append) -> int:
        """Add a completed append's member and publish the job; the bytes it added."""
        batch = call.batch
        job = self._job(batch.job_id)
        if call.kind == "logs":
            stream = batch.stream
            records = [
                LogRecord(stream, t, s, bytes(c))
                for t, s, c in zip(batch.timestamps, batch.sequences, batch.contents, strict=True)
            ]
            arrivals = tuple(batch.arrivals)
            kind = _KIND_OF_STREAM[stream]
        elif call.kind == "events":
            event_kind = events.KINDS_BY_NAME[batch.kind]
            stream, kind, records, kept = 0, KIND_OF_EVENT[batch.kind].value, [], []
            for t, s, a, p in zip(
                batch.timestamps, batch.sequences, batch.arrivals, batch.payloads, strict=True
            ):
                try:
                    line = events.payload_json_line(event_kind, p, batch.job_id, t, s)
                except events.EventDecodeError:  # left out and counted, like LocalStorage
                    self.skipped_metric_payloads += 1
                    continue
                records.append(StoredEvent(t, s, json.loads(line)))
                kept.append(a)
            arrivals = tuple(kept)
            if not records:
                return 0
        else:
            stream, kind, records, kept = 0, "metrics", [], []
            for t, s, a, p in zip(
                batch.timestamps, batch.sequences, batch.arrivals, batch.payloads, strict=True
            ):
                try:
                    records.append(MetricRecord(t, s, metric_data(p)))
                except DecodeError:  # undecodable: left out and counted, like LocalStorage
                    self.skipped_metric_payloads += 1
                    continue
                kept.append(a)
            arrivals = tuple(kept)
            if not records:
                return 0
        segments = job.segments[kind]
        if not segments or segments[-1].size >= self._segment_max_bytes:
            segments.append(Segment(segments[-1].index + 1 if segments else 0))
        corrupt, self.corrupt_next = self.corrupt_next, False
        member = _Member(stream, arrivals, tuple(records), corrupt, segments[-1])
        segments[-1].members.append(member)
        job.last_updated = max(job.last_updated, int(self._now()))
        self._last_used[batch.job_id] = self._now()
        self._publish(batch.job_id)
        return member.size

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            now = int(self._now())
            job = self._jobs[job_id] = _Job(created_at=now, last_updated=now)
        return job

    def _publish(self, job_id: str) -> None:
        job = self._jobs[job_id]
        info = job.info(job_id)
        self._index[job_id] = info
        self._loaded[job_id] = self._snapshot_class(
            job_id,
            info,
            tuple(job.members("stdout", "stderr")),
            tuple(job.members("metrics")),
            {
                name: tuple(job.members(kind.value))
                for name, kind in KIND_OF_EVENT.items()
                if job.segments[kind.value]
            },
        )

    # -- reactor thread: loading and deleting

    def open_job(self, job_id: str):
        try:
            check_job_id(job_id)
        except ValueError:
            return defer.fail()
        self.open_job_calls.append(job_id)
        if job_id not in self._jobs:
            return defer.succeed(None)
        if job_id not in self._loaded:
            self._publish(job_id)
        self._last_used[job_id] = self._now()
        return defer.succeed(self._loaded[job_id])

    def _after_appends(self, job_id: str, operation):
        """Run ``operation()`` once the job's appends in flight are done."""
        try:
            check_job_id(job_id)
        except ValueError:
            return defer.fail()
        if job_id not in self._in_flight:
            return defer.maybeDeferred(operation)
        d = defer.Deferred()
        self._idle_waiters.setdefault(job_id, []).append(d)
        return d.addCallback(lambda _: operation())

    def _check_deletable(self, job_id: str) -> None:
        if job_id in self.fail_deletes:
            raise StorageUnavailable(f"deleting data of job {job_id} failed: permission denied")

    def delete_job(self, job_id: str):
        def delete():
            self._check_deletable(job_id)
            self.deleted.append(job_id)
            job = self._jobs.pop(job_id, None)
            self._loaded.pop(job_id, None)
            self._index.pop(job_id, None)
            if job is None:
                return 0
            for kind in _KINDS:
                for seg in job.segments[kind]:
                    seg.removed = True
            return sum(m.size for m in job.members(*_KINDS))

        return self._after_appends(job_id, delete)

    def delete_part(self, job_id: str, part: str):
        kinds = {"logs": ("stdout", "stderr"), "metrics": ("metrics",), "events": _EVENT_KINDS}.get(
            part
        )
        if kinds is None:
            return defer.fail(ValueError(f"unknown part {part!r}: expected one of {', '.join(Part)}"))

        def delete():
            self._check_deletable(job_id)
            self.deleted.append((job_id, part))
            job = self._jobs.get(job_id)
            if job is None:
                return 0
            freed = 0
            for kind in kinds:
                for seg in job.segments[kind]:
                    seg.removed = True
                    freed += seg.size
                job.segments[kind] = []
            if not job.members(*_KINDS):
                del self._jobs[job_id]
                self._loaded.pop(job_id, None)
                self._index.pop(job_id, None)
            else:
                self._publish(job_id)
            return freed

        return self._after_appends(job_id, delete)

    def evict(self, job_id: str) -> None:
        """Forget the loaded snapshot (the index entry stays), as after a restart."""
        self._loaded.pop(job_id, None)

    # -- IRetentionSegments (reactor thread)

    def segment_usage(self, job_id: str):
        if job_id not in self._loaded:
            return ()
        job = self._jobs[job_id]
        usage = []
        for kind in _KINDS:
            segments = job.segments[kind]
            for i, seg in enumerate(segments):
                usage.append(SegmentUsage(kind, seg.index, seg.size, i == len(segments) - 1))
        return tuple(usage)

    def drop_segment(self, job_id: str, kind: str, index: int):
        try:
            check_job_id(job_id)
            if kind not in _KINDS:
                raise ValueError(f"unknown segment kind {kind!r}")
        except ValueError:
            return defer.fail()
        job = self._jobs.get(job_id)
        if job is None:
            return defer.succeed(0)
        segments = job.segments[kind]
        positions = [i for i, seg in enumerate(segments) if seg.index == index]
        if not positions:
            return defer.succeed(0)
        if positions[0] == len(segments) - 1:
            return defer.fail(ValueError(f"segment {kind} {index} of job {job_id} is being written"))
        seg = segments.pop(positions[0])
        seg.removed = True
        self.deleted.append((job_id, kind, index))
        self._publish(job_id)
        return defer.succeed(seg.size)

    # -- IIdleUnload

    def unload_idle(self, idle: float) -> int:
        cutoff = self._now() - idle
        idle_jobs = [
            job_id
            for job_id in self._loaded
            if self._last_used.get(job_id, 0) <= cutoff and job_id not in self._in_flight
        ]
        for job_id in idle_jobs:
            del self._loaded[job_id]
        self.unloaded_jobs += len(idle_jobs)
        return len(idle_jobs)

    def resident(self, job_id: str) -> bool:
        return job_id in self._loaded or job_id in self._in_flight

    @property
    def loaded_jobs(self) -> int:
        return len(self._loaded)

    # -- IFreeSpace

    def probe_space(self):
        return defer.succeed(self.space)

    def free_bytes(self):
        return defer.succeed(self.space.free_bytes)

    # -- any thread

    def snapshot(self, job_id: str):
        check_job_id(job_id)
        return self._loaded.get(job_id)

    def job_info(self, job_id: str):
        check_job_id(job_id)
        return self._index.get(job_id)

    def list_jobs(self):
        return tuple(self._index.copy().values())

    def list_jobs_page(self, since: int, until: int, offset: int, limit: int):
        jobs = sorted(
            (
                info
                for info in self.list_jobs()
                if (since <= 0 or info.created_at >= since)
                and (until <= 0 or info.created_at <= until)
            ),
            key=lambda info: (-info.created_at, info.job_id),
        )
        return len(jobs), jobs[offset : offset + limit] if limit else jobs[offset:]

    def totals(self):
        infos = self.list_jobs()
        return (
            len(infos),
            sum(i.log_count for i in infos),
            sum(i.metric_count for i in infos),
            sum(i.size_bytes for i in infos),
        )

    def event_totals(self):
        totals: dict = {}
        for info in self.list_jobs():
            for name, count in info.event_counts.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    def part_sizes(self, job_id: str):
        job = self._jobs.get(job_id)
        return (0,) * len(Part) if job is None else job.part_sizes()


def _same_length(*columns) -> None:
    if len({len(c) for c in columns}) > 1:
        raise ValueError("batch columns differ in length")


# -- gRPC context and reactor ---------------------------------------------------------------


class Aborted(Exception):
    """Raised by FakeContext.abort, like grpc's context.abort."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """Enough of grpc.ServicerContext for the servicer.

    ``active_for`` makes ``is_active()`` turn false after that many calls
    (a client that cancels mid-stream).  ``joblet_listener`` names the listener
    the call came in on (security.LISTENER_*); by default the one the peer and
    auth suggest: the admin socket for ``unix:``, TLS TCP for an ``ssl``
    transport, plaintext TCP otherwise.
    """

    def __init__(
        self,
        peer: str = "unix:",
        auth: Optional[dict] = None,
        active_for: Optional[int] = None,
        listener: Optional[str] = None,
    ):
        self._peer = peer
        self._auth = auth if auth is not None else {"transport_security_type": [b"insecure"]}
        if listener is None:
            if peer.startswith("unix:"):
                listener = "admin-socket"
            elif (self._auth.get("transport_security_type") or [b""])[0] == b"ssl":
                listener = "tls-tcp"
            else:
                listener = "plaintext-tcp"
        self.joblet_listener = listener
        self._active_for = active_for
        self.is_active_calls = 0
        self.callbacks: list = []
        self.code: Optional[grpc.StatusCode] = None
        self.details: Optional[str] = None

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth

    def is_active(self) -> bool:
        self.is_active_calls += 1
        if self._active_for is None:
            return True
        return self.is_active_calls <= self._active_for

    def cancel(self) -> None:
        self._active_for = 0

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def terminate(self) -> None:
        """Run the termination callbacks, as grpc does when the RPC ends."""
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb()

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code, details)

    def time_remaining(self):
        return None


class ImmediateReactor(task.Clock):
    """A Clock whose callFromThread runs the call immediately, serialized by a lock.

    Stands in for the reactor of code that calls ``blockingCallFromThread``
    from worker threads when the called functions fire synchronously.
    ``advance_on_call`` advances the clock after each call (to fire reactor-side
    timeouts of Deferreds that never fire).
    """

    def __init__(self, advance_on_call: float = 0.0):
        super().__init__()
        self._lock = threading.RLock()
        self.advance_on_call = advance_on_call
        self.from_thread_calls = 0

    def callFromThread(self, f, *args, **kwargs):
        with self._lock:
            self.from_thread_calls += 1
            f(*args, **kwargs)
            if self.advance_on_call:
                self.advance(self.advance_on_call)


class RecordingMetrics:
    """Records the servicer's metric calls.  Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.queries: list[tuple[str, str]] = []
        self.inflated = 0
        self.skipped = 0
        self.corrupt = 0

    def query_done(self, rpc: str, code: str, seconds: float) -> None:
        assert seconds >= 0
        with self._lock:
            self.queries.append((rpc, code))

    def members_inflated(self, n: int) -> None:
        with self._lock:
            self.inflated += n

    def members_skipped(self, n: int) -> None:
        with self._lock:
            self.skipped += n

    def corrupt_members(self, n: int) -> None:
        with self._lock:
            self.corrupt += n


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM bytes of a throwaway CA, a server certificate and client certificates by OU."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    clients: dict  # OU (or "" for none) -> (cert_pem, key_pem)


def make_pki(client_ous: Iterable[str] = ("admin", "viewer", "other")) -> Pki:
    """Generate a CA, a server cert for localhost/127.0.0.1 and one client cert per OU."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def builder(subject, issuer, public_key, ca: bool):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    ca_key = new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "joblet-persist test CA")])
    ca = builder(ca_name, ca_name, ca_key.public_key(), True).sign(ca_key, hashes.SHA256())

    def leaf(attrs, server: bool):
        key = new_key()
        b = builder(x509.Name(attrs), ca_name, key.public_key(), False)
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")], True)
    clients = {}
    for ou in client_ous:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, f"client-{ou or 'none'}")]
        if ou:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        clients[ou] = leaf(attrs, False)
    return Pki(ca.public_bytes(serialization.Encoding.PEM), server_cert, server_key, clients)
