"""The storage contract: everything the rest of the service needs from a backend.

This module is a leaf: no reactor imports, no Deferreds are created here.  It
declares, with ``zope.interface`` (as Twisted does):

- ``IStorageBackend``: what the writer, the query servicer, retention and the
  composition root need from any backend;
- ``IJobSnapshot``: an immutable, published view of one job, read by queries;
- small optional capabilities that only some backends have, which callers
  test with ``ICapability.providedBy(backend)``, never with ``getattr``:
  ``IRetentionSegments`` (segment-level retention), ``IIdleUnload`` (dropping
  idle jobs from memory), ``IFreeSpace`` (writability and free-space probing)
  and, on snapshots, ``IBulkLogReads`` (log reads in columnar chunks);
- the errors that cross the seam (``StorageError`` and its subclasses): a
  backend translates its own failures (OSError, an HTTP status) into these;
- the immutable value types that cross thread boundaries (``JobInfo``,
  ``LogBatch``, ...).

``joblet_persist.storage.backends.make_storage`` builds the backend that
``storage.backend`` names; ``LocalStorage`` (``joblet_persist.storage.local``)
is the local-directory one, and a backend that is not a local directory (S3,
CloudWatch) provides the same interfaces.  tests/storage_contract.py holds every
implementation to them.

Threading (see docs/architecture.md):

- Methods documented "reactor thread" change backend state and must only be
  called on the reactor thread.  They return Deferreds and do their blocking
  work elsewhere (a thread pool, a network client).
- Methods documented "any thread" only read immutable, published state;
  gRPC handler threads call them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from zope.interface import Attribute, Interface

#: Stream numbers, as on the wire (docs/wire.md StreamType).
STREAM_UNSPECIFIED = 0
STREAM_STDOUT = 1
STREAM_STDERR = 2
LOG_STREAMS = (STREAM_STDOUT, STREAM_STDERR)


class Part(enum.StrEnum):
    """A part of a job's data that is aged and deleted on its own (``delete_part``).

    The value is the name backends use for it (the local backend's top-level
    directory), so ``Part.LOGS == "logs"``.
    """

    LOGS = "logs"
    METRICS = "metrics"
    EVENTS = "events"


class SegmentKind(enum.StrEnum):
    """What one stored sequence of a job holds: a log stream or the metrics.

    The value is the name backends use for it (the local backend's segment
    file stem, S3's key component), so ``SegmentKind.STDOUT == "stdout"``.
    A new kind of data (a telemetry event kind) is a new member here plus its
    rows in the tables below (and in segment.SEGMENT_SUFFIXES); no caller
    tests kinds one by one.
    """

    STDOUT = "stdout"
    STDERR = "stderr"
    METRICS = "metrics"
    # Telemetry events, one kind per IPC event type (joblet_persist/events.py: the value
    # is the EventKind's file stem).
    EXEC_EVENTS = "exec_events"
    CONNECT_EVENTS = "connect_events"
    ACCEPT_EVENTS = "accept_events"
    SOCKET_DATA_EVENTS = "socket_data_events"
    MMAP_EVENTS = "mmap_events"
    MPROTECT_EVENTS = "mprotect_events"
    FILE_EVENTS = "file_events"


#: The segment kind of each telemetry event kind, by the event kind's name
#: (``events.EventKind.name``, the key of JobInfo.event_counts).
KIND_OF_EVENT = {
    "exec": SegmentKind.EXEC_EVENTS,
    "connect": SegmentKind.CONNECT_EVENTS,
    "accept": SegmentKind.ACCEPT_EVENTS,
    "socket_data": SegmentKind.SOCKET_DATA_EVENTS,
    "mmap": SegmentKind.MMAP_EVENTS,
    "mprotect": SegmentKind.MPROTECT_EVENTS,
    "file": SegmentKind.FILE_EVENTS,
}
#: The event kind name of each event segment kind.
EVENT_OF_KIND = {kind: name for name, kind in KIND_OF_EVENT.items()}

#: The part each segment kind belongs to (deleted and aged with it).
PART_OF_KIND = {
    SegmentKind.STDOUT: Part.LOGS,
    SegmentKind.STDERR: Part.LOGS,
    SegmentKind.METRICS: Part.METRICS,
    **{kind: Part.EVENTS for kind in EVENT_OF_KIND},
}
#: The segment kinds of each part, in SegmentKind order.
KINDS_OF_PART = {
    part: tuple(kind for kind in SegmentKind if PART_OF_KIND[kind] is part) for part in Part
}
#: The JobInfo field that counts the messages of each part (events: ``event_count``,
#: the sum of the per-kind fields).
COUNT_FIELD_OF_PART = {Part.LOGS: "log_count", Part.METRICS: "metric_count", Part.EVENTS: "event_count"}
#: The JobInfo field that counts the messages of each segment kind.
COUNT_FIELD_OF_KIND = {
    SegmentKind.STDOUT: "log_count",
    SegmentKind.STDERR: "log_count",
    SegmentKind.METRICS: "metric_count",
    **{kind: f"{name}_events" for name, kind in KIND_OF_EVENT.items()},
}
#: The JobInfo fields that count events, by event kind name.
EVENT_COUNT_FIELDS = {name: f"{name}_events" for name in KIND_OF_EVENT}
#: The segment kind of each log stream number (STREAM_UNSPECIFIED has none: it means both).
KIND_OF_STREAM = {STREAM_STDOUT: SegmentKind.STDOUT, STREAM_STDERR: SegmentKind.STDERR}

_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class InvalidJobId(ValueError):
    """A job id that is not a safe token; it must never become a path."""


def is_valid_job_id(job_id: str) -> bool:
    """True when ``job_id`` is a UUID-like token that is safe as a path component.

    ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, and never containing ``..``.
    """
    return (
        isinstance(job_id, str)
        and _JOB_ID_RE.match(job_id) is not None
        and ".." not in job_id
    )


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` or raise InvalidJobId naming the offending value."""
    if not is_valid_job_id(job_id):
        shown = job_id if isinstance(job_id, str) else type(job_id).__name__
        raise InvalidJobId(
            f"invalid job id {shown[:160]!r}: expected 1-128 characters of "
            "[A-Za-z0-9._-], starting with a letter or digit, without '..'"
        )
    return job_id


@dataclass(frozen=True, slots=True)
class JobInfo:
    """Per-job summary, as the backend keeps it and GetJobInfo returns it."""

    job_id: str
    created_at: int  # Unix seconds: when the job's first data arrived
    last_updated: int  # Unix seconds: when data was last appended
    log_count: int  # stored LOG messages (both streams)
    metric_count: int  # stored metric samples
    size_bytes: int  # bytes the job's stored data occupies in the backend
    first_timestamp: int  # Unix ns, smallest message timestamp (0 if none)
    last_timestamp: int  # Unix ns, largest message timestamp (0 if none)
    # Stored telemetry events per kind (COUNT_FIELD_OF_KIND); 0 when none.
    exec_events: int = 0
    connect_events: int = 0
    accept_events: int = 0
    socket_data_events: int = 0
    mmap_events: int = 0
    mprotect_events: int = 0
    file_events: int = 0

    @property
    def event_counts(self) -> dict:
        """Event kind name -> stored events, for the kinds that have any."""
        counts = {}
        for name, field_name in EVENT_COUNT_FIELDS.items():
            value = getattr(self, field_name)
            if value:
                counts[name] = value
        return counts

    @property
    def event_count(self) -> int:
        """Stored telemetry events of every kind."""
        return sum(getattr(self, f) for f in EVENT_COUNT_FIELDS.values())


@dataclass(frozen=True, slots=True)
class LogBatch:
    """A batch of LOG messages of one job and one stream, in arrival order.

    Columnar so that encoding is a handful of C-level joins, not per-message
    Python work.  ``arrivals`` are per-job arrival ordinals assigned by the
    writer on the reactor thread, strictly increasing across both streams of
    the job within one process run; storage maps them to persistent ordinals
    (``job base + arrival``) so that both streams merge in arrival order, also
    across restarts.
    """

    job_id: str
    stream: int  # STREAM_STDOUT or STREAM_STDERR
    timestamps: Sequence[int]  # Unix ns, from the LogLine payload
    sequences: Sequence[int]  # from the LogLine payload
    arrivals: Sequence[int]
    contents: Sequence[bytes]  # raw chunks, byte-exact, may be empty


@dataclass(frozen=True, slots=True)
class MetricBatch:
    """A batch of metric samples of one job, in arrival order.

    ``payloads`` are serialized ``joblet.ipc.Metric`` messages as received;
    storage converts them to JSON lines on a pool thread.
    """

    job_id: str
    timestamps: Sequence[int]
    sequences: Sequence[int]
    arrivals: Sequence[int]
    payloads: Sequence[bytes]
    #: True: the list columns are given away with the batch.  Once they are stored,
    #: storage empties them on its pool thread, which has just read every message, so that
    #: the messages are freed there and not where the batch is dropped (for the writer,
    #: the reactor thread).  A failed append leaves them whole for the retry.
    disposable: bool = False


@dataclass(frozen=True, slots=True)
class EventBatch:
    """A batch of telemetry events of one job and one kind, in arrival order.

    ``kind`` is the event kind's name (``"exec"``, a key of KIND_OF_EVENT);
    ``payloads`` are the IPC payloads as received, already accepted by
    ``events.check_event``; storage builds their JSON lines on a pool thread.
    ``timestamps`` and ``sequences`` are those ``check_event`` returned;
    ``arrivals`` as in LogBatch (one counter per job across all its data).
    """

    job_id: str
    kind: str
    timestamps: Sequence[int]
    sequences: Sequence[int]
    arrivals: Sequence[int]
    payloads: Sequence[bytes]
    disposable: bool = False  # as in MetricBatch


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One stored telemetry event, as a query returns it.

    ``data`` is the stored JSON object (docs/storage-format.md, "Telemetry
    events"); ``events.event_message(kind, data, job_id)`` makes the reply.
    """

    timestamp: int
    sequence: int
    data: dict


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One stored LOG message, as a query returns it."""

    stream: int
    timestamp: int
    sequence: int
    content: bytes


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """One stored metric sample, as a query returns it.

    ``data`` is the sample's stored JSON object, with docs/wire.md's snake_case keys:
    ``{"cpu_usage": .., "memory_usage": .., "gpu_usage": .., "disk_io":
    {"read_bytes": .., ...}, "network_io": {"rx_bytes": .., ...}}``.
    """

    timestamp: int
    sequence: int
    data: dict


class ReadStats:
    """Counts the work a read did; the cost tests and Prometheus read it.

    Only the thread running the read increments it.
    """

    __slots__ = ("members_inflated", "members_skipped", "corrupt_members")

    def __init__(self) -> None:
        self.members_inflated = 0
        self.members_skipped = 0
        self.corrupt_members = 0




@dataclass(frozen=True, slots=True)
class SegmentUsage:
    """One segment of a job's stored data, as segment-level retention sees it.

    A segment is a unit a backend can drop on its own: ``kind`` is a
    SegmentKind; ``index`` orders the segments of a kind, oldest first.
    """

    kind: SegmentKind
    index: int
    size_bytes: int
    last_segment: bool  # the one appends go to; never dropped


@dataclass(frozen=True, slots=True)
class SpaceProbe:
    """The outcome of a writability and free-space probe (``IFreeSpace.probe_space``)."""

    writable: bool  # a change could be made durable just now
    error: Optional[str]  # why not, for operators (None when writable)
    free_bytes: Optional[int]  # room left for new data; None when unknown or unlimited


# -- errors that cross the seam -------------------------------------------------------


class StorageError(Exception):
    """Base of the errors a backend reports through this contract."""


class DataVanished(StorageError):
    """Data a snapshot named was deleted while a read was going on.

    Raised while iterating a snapshot's records, after DeleteJob or retention
    removed (part of) the job: the job is gone, or a retry reads what is left.
    """

    def __init__(self, job_id: str, detail: str = ""):
        super().__init__(
            f"data of job {job_id} was deleted during the read" + (f": {detail}" if detail else "")
        )
        self.job_id = job_id
        self.detail = detail


class StorageUnavailable(StorageError):
    """The backend cannot serve or change this data now (read-only, full, I/O error).

    ``cause`` is the underlying reason in words, for the client and the log.
    The same request may succeed later.
    """

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


# -- interfaces -----------------------------------------------------------------------


class IJobSnapshot(Interface):
    """An immutable view of one job's published data.  Any thread.

    Holds only data that was completely and durably stored (under the
    backend's durability policy) before it was published; a snapshot never
    changes, a newer one replaces it.  Iterating it may raise DataVanished
    (the job was deleted meanwhile) or StorageUnavailable.
    """

    job_id = Attribute("The job's id (str).")
    info = Attribute("The job's JobInfo as of this snapshot.")

    def iter_logs(
        stream, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=None
    ):
        """Yield the job's LOG messages as LogRecords.  Blocking; any thread.

        ``stream`` 0 merges both streams in arrival order.  The inclusive time
        range applies to each bound that is > 0, then ``offset`` matching
        messages are skipped, then at most ``limit`` are yielded (0 = all).
        Cost is proportional to what is returned, not to the job's size.
        Stops early when ``cancelled()`` turns true.  Stored data that cannot
        be decoded is skipped, counted in ``stats.corrupt_members`` and
        logged; the rest is returned.  ``stats`` (a ReadStats) counts the work.
        """

    def iter_metrics(start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=None):
        """Yield the job's metric samples as MetricRecords; same semantics as iter_logs."""

    def iter_events(
        kind, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=None
    ):
        """Yield the job's telemetry events of ``kind`` (an event kind name, a key of
        KIND_OF_EVENT) as StoredEvents, in arrival order; same semantics and cost
        rules as iter_metrics.  An unknown kind raises ValueError; a kind the job
        has no events of yields nothing.
        """


class IBulkLogReads(Interface):
    """Optional snapshot capability: log reads in columnar chunks.  Any thread."""

    def iter_log_chunks(
        stream, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=None
    ):
        """The messages of ``iter_logs``, as chunks of four equally long sequences.

        Each chunk is ``(streams, timestamps, sequences, contents)``; together
        the chunks hold exactly what ``iter_logs`` yields, in the same order,
        without building a record object per message.
        """


class ILogTail(Interface):
    """Optional snapshot capability: reading logs from the end, and with ordinals.  Any thread.

    TailLogs and FollowLogs use it (joblet_persist/follow.py); snapshots without
    it are tailed by counting through ``iter_logs``.
    """

    def count_logs(stream, start_time=0, end_time=0, stats=None, cancelled=None):
        """How many messages ``iter_logs(stream, start_time, end_time)`` would yield,
        from member headers (nothing of the current format is inflated)."""

    def iter_log_chunks_ordinals(
        stream, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=None
    ):
        """The chunks of ``iter_log_chunks`` with a fifth sequence: each message's
        persistent ordinal (messages of legacy members: a negative number below
        every other ordinal)."""


class IOrdinalBase(Interface):
    """Optional storage capability: how arrival numbers map to persistent ordinals."""

    def ordinal_base(job_id):
        """Reactor thread.  The number that, added to the writer's arrival number of
        a message appended from now on, gives its persistent ordinal; None when
        the job is not loaded (it then has no published snapshot either)."""

class ILogSearch(Interface):
    """Optional snapshot capability: full-text search inside the member scan.  gRPC thread.

    Without it, the servicer searches what ``iter_log_chunks`` / ``iter_logs``
    return, message by message.
    """

    def search_log_chunks(
        matcher, stream, start_time=0, end_time=0, limits=None, submit=None, window=4,
        stats=None, cancelled=None,
    ):
        """The messages of ``iter_logs(stream, start_time, end_time)`` that ``matcher``
        (a ``storage.search.Matcher``) matches, as chunks like iter_log_chunks'.

        ``limits`` (a ``search.ScanLimits``) bounds the work: it raises
        ``search.SearchLimitExceeded`` after yielding the matches scanned before.
        ``submit(fn, *args)`` returns a Future: the per-member work runs through it.
        """


class IMetricColumns(Interface):
    """Optional snapshot capability: metric fields read as columns.  gRPC thread.

    AggregateMetrics uses it; without it, the servicer aggregates what
    ``iter_metrics`` returns, sample by sample.
    """

    def iter_metric_columns(
        fields, start_time=0, end_time=0, submit=None, window=4, stats=None, cancelled=None
    ):
        """The samples of ``iter_metrics(start_time, end_time)`` as chunks
        ``(timestamps, columns)``: ``columns`` holds one list per name in ``fields``
        (``storage.metric_columns.FIELDS``) of the values ``metric_columns.getter`` reads
        from each sample's data object.  ``submit(fn, *args)`` returns a Future: the
        per-member work runs through it, up to ``window`` members at once.
        """


class IStorageBackend(Interface):
    """What the writer, the query servicer, retention and the composition root need.

    Job ids are validated at every entry point: reactor-thread methods fail
    their Deferred with InvalidJobId, any-thread lookups raise it.
    """

    # -- reactor thread ---------------------------------------------------------

    def start():
        """Make the stored jobs known (list_jobs and job_info answer for them).

        Reactor thread; Deferred.  Appends, loads and deletions fail before it.
        """

    def stop():
        """Make everything appended durable and release resources.  Reactor thread; Deferred.

        Called after the writer has handed over every batch; waits for work in
        flight.  Appends, loads and deletions afterwards fail.
        """

    def append_logs(batch):
        """Store one LogBatch; Deferred firing with the bytes it added.

        Reactor thread.  The caller keeps at most one append in flight per
        (job, stream); appends of different streams or jobs may run at once.
        When the Deferred fires the batch is durable (per the backend's
        durability policy) and published: snapshots taken afterwards show it.
        On failure nothing of the batch is visible and the caller may retry
        the same batch later.
        """

    def append_metrics(batch):
        """Store one MetricBatch; like append_logs.

        Samples whose payload cannot be decoded are left out and counted;
        they never fail the batch.
        """

    def append_events(batch):
        """Store one EventBatch; like append_metrics.

        Payloads that do not decode as their kind are left out and counted;
        they never fail the batch.  An unknown kind fails with ValueError.
        """

    def open_job(job_id):
        """Deferred firing with the job's IJobSnapshot, or None if the job is unknown.

        Reactor thread.  The first call may have to load the job (cost: its
        metadata, not its data); later calls fire at once.
        """

    def delete_job(job_id):
        """Delete all of a job's data; Deferred firing with the bytes freed (0 if unknown).

        Reactor thread.  Appends in flight for the job are waited for first;
        data that arrives afterwards starts a fresh job.  Fails with
        StorageUnavailable when the backend cannot delete now.
        """

    def delete_part(job_id, part):
        """Delete one Part of a job (its logs or its metrics); Deferred[bytes freed].

        Reactor thread; used by retention.  The job keeps the other part (and
        its created_at); when nothing remains it is gone.  An unknown part
        fails with ValueError, a backend that cannot delete now with
        StorageUnavailable.
        """

    # -- any thread ---------------------------------------------------------------

    def snapshot(job_id):
        """The job's latest published IJobSnapshot if it is loaded, else None."""

    def job_info(job_id):
        """The job's JobInfo, or None if unknown."""

    def list_jobs():
        """Every known job's JobInfo, as an immutable tuple."""

    def list_jobs_page(since, until, offset, limit):
        """``(total, infos)`` for ListJobs: jobs with ``since <= created_at <= until``.

        A bound <= 0 is open.  Newest first, ties by job id; ``total`` counts
        every matching job, ``infos`` lists them from ``offset``, at most
        ``limit`` (0 = all).
        """

    def totals():
        """``(jobs, log messages, metric samples, bytes)`` over every known job."""

    def event_totals():
        """Event kind name -> stored events over every known job (kinds with none
        may be absent)."""

    def part_sizes(job_id):
        """``(bytes of logs, bytes of metrics, bytes of events)`` of a job (a value per
        Part, in Part order), all 0 if unknown."""


class IRetentionSegments(Interface):
    """Optional: the backend stores a job as segments it can drop one by one.

    Retention caps a job's size with it (oldest closed segments first).
    """

    def segment_usage(job_id):
        """SegmentUsage of each segment of a loaded job (() when it is not loaded).

        Reactor thread; ``open_job`` loads the job.
        """

    def drop_segment(job_id, kind, index):
        """Remove one closed segment (``kind`` a SegmentKind); Deferred[bytes freed].

        Reactor thread.  The segment appends go to is refused with ValueError;
        an unknown segment frees 0.  Queries holding an older snapshot may
        then see DataVanished.
        """


class IIdleUnload(Interface):
    """Optional: the backend keeps per-job state in memory and can drop idle jobs."""

    loaded_jobs = Attribute("Jobs whose state is in memory (int).  Any thread.")
    unloaded_jobs = Attribute("Jobs unloaded by unload_idle so far (int).  Any thread.")

    def unload_idle(idle):
        """Forget the in-memory state of jobs unused for ``idle`` seconds; return how many.

        Reactor thread.  Nothing stored is lost: the next append or query
        loads the job again.
        """

    def resident(job_id):
        """Whether the job's state is in memory or being loaded, written or deleted.

        Reactor thread.  While it is, the writer must keep the job's arrival
        counter (the backend derives ordinals from it).
        """


class ICompressionBacklog(Interface):
    """Optional: the backend's compression level may follow the writer's backlog."""

    def set_compression_backlog(backlog):
        """Let the level policy follow ``backlog()``: the writer's buffered bytes as a
        fraction of its high-water mark.  Reactor thread (the composition root)."""


class IFreeSpace(Interface):
    """Optional: the backend can tell whether it accepts writes and how much room is left."""

    def probe_space():
        """Deferred[SpaceProbe]: whether a change can be made durable now, and the room left.

        Reactor thread; the probe itself runs off the reactor.  Never fails:
        an error is reported in the SpaceProbe.
        """

    def free_bytes():
        """Deferred[Optional[int]]: room left for new data (None when unknown).

        Reactor thread; never fails.
        """


class ILocalTier(Interface):
    """Optional: the backend keeps local copies of data that a remote tier holds too.

    Retention frees local space with it: ``release_job`` and ``release_part``
    drop the local copy of what the remote tier has taken, which stays
    readable through the backend's snapshots (``delete_job`` and
    ``delete_part`` delete the data wherever it is).  ``drop_segment``
    (IRetentionSegments) of such a backend releases the segment likewise.
    """

    local = Attribute("The IStorageBackend holding the local copies (what is on disk).")

    def set_archive_check(check):
        """Release only what ``check`` (retention.IArchivedCheck: the archive's shipper)
        says the remote tier holds as it is on disk.  Called once at wiring time."""

    def release_job(job_id):
        """Drop the job's local copy; Deferred[local bytes freed].  Reactor thread.

        Fails with StorageUnavailable (nothing dropped) when part of the local
        data is not held by the remote tier.
        """

    def release_part(job_id, part):
        """Drop the local copy of one Part of the job; like release_job."""


class IRemoteNodes(Interface):
    """Optional: the backend can read the data other nodes stored in a shared remote tier."""

    node_id = Attribute("This node's id (str): requests naming it read the local data.")

    def node_snapshot(node_id, job_id):
        """IJobSnapshot of job ``job_id`` as node ``node_id`` archived it, or None.

        Blocking (it may list and read the remote tier); any thread but the
        reactor.  Raises StorageUnavailable when the remote tier cannot be
        reached, InvalidJobId for an invalid job or node id.
        """
