"""The storage contract shared by the writer, the query servicer and retention.

This module is a leaf: no reactor imports, no Deferreds are created here.  It
defines the value types that cross thread boundaries (all immutable) and the
abstract interface a storage backend implements.  ``LocalStorage`` in
``joblet_persist.storage.local`` is the local-directory backend; a backend that
is not a local directory (S3, CloudWatch) implements the same interface.

Threading (see docs/architecture.md):

- Methods documented "reactor thread" mutate backend state and must only be
  called on the reactor thread.  They return Deferreds and hand blocking work
  to the injected thread runner.
- Methods documented "any thread" only read immutable, published snapshots and
  file bytes within published bounds; gRPC handler threads call them.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

#: Stream numbers, as on the wire (WIRE.md StreamType).
STREAM_UNSPECIFIED = 0
STREAM_STDOUT = 1
STREAM_STDERR = 2
LOG_STREAMS = (STREAM_STDOUT, STREAM_STDERR)

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
    """Per-job summary, as kept in job_index.json and returned by GetJobInfo."""

    job_id: str
    created_at: int  # Unix seconds: when the job's first data arrived
    last_updated: int  # Unix seconds: when data was last appended
    log_count: int  # stored LOG messages (both streams)
    metric_count: int  # stored metric samples
    size_bytes: int  # bytes on disk for this job (all its files)
    first_timestamp: int  # Unix ns, smallest message timestamp (0 if none)
    last_timestamp: int  # Unix ns, largest message timestamp (0 if none)


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

    ``data`` is the JSON object stored on disk with WIRE.md's snake_case keys:
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


class JobSnapshot(abc.ABC):
    """An immutable view of one job's published data.  Any thread.

    Holds only data that was completely appended (and fsync'd, under the
    default policy) before it was published; a snapshot never changes, a newer
    one replaces it.
    """

    job_id: str
    info: JobInfo

    @abc.abstractmethod
    def iter_logs(
        self,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[LogRecord]:
        """Yield the job's LOG messages.  Blocking; any thread.

        ``stream`` 0 merges both streams in arrival order.  The inclusive time
        range applies to each bound that is > 0, then ``offset`` matching
        messages are skipped, then at most ``limit`` are yielded (0 = all).
        Cost is proportional to what is returned: members wholly outside the
        range or before the offset are not inflated.  Stops early when
        ``cancelled()`` turns true.  A corrupt member is skipped, counted in
        ``stats.corrupt_members`` and logged; the rest is returned.
        """

    @abc.abstractmethod
    def iter_metrics(
        self,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[MetricRecord]:
        """Yield the job's metric samples; same semantics as iter_logs."""


class StorageBackend(abc.ABC):
    """What the writer, the query servicer and retention need from storage."""

    # -- reactor thread -------------------------------------------------

    @abc.abstractmethod
    def start(self):
        """Load (or rebuild) the job index.  Reactor thread; returns a Deferred."""

    @abc.abstractmethod
    def stop(self):
        """Persist the job index and close files.  Reactor thread; Deferred.

        Called after the writer has flushed everything.
        """

    @abc.abstractmethod
    def append_logs(self, batch: LogBatch):
        """Append one batch; Deferred firing with the bytes written.

        Reactor thread.  The caller keeps at most one append in flight per
        (job, stream); appends of different files run in parallel on the pool.
        The batch is compressed, appended whole, fsync'd per policy, and only
        then published to readers (on the reactor thread).  On failure
        (ENOSPC, EIO) the Deferred fails, nothing partial stays visible or on
        disk, and the caller retries the same batch later.
        """

    @abc.abstractmethod
    def append_metrics(self, batch: MetricBatch):
        """Append one metric batch; like append_logs."""

    @abc.abstractmethod
    def open_job(self, job_id: str):
        """Deferred firing with the job's JobSnapshot, or None if unknown.

        Reactor thread.  Loads the job's segment indexes from disk (headers
        only, nothing inflated) the first time; later calls fire at once.
        """

    @abc.abstractmethod
    def delete_job(self, job_id: str):
        """Delete all of a job's data; Deferred firing with bytes freed.

        Reactor thread.  Appends in flight for the job are waited for first;
        data that arrives afterwards starts a fresh job.
        """

    # -- any thread ------------------------------------------------------

    @abc.abstractmethod
    def snapshot(self, job_id: str) -> Optional[JobSnapshot]:
        """The job's latest published snapshot if it is loaded, else None."""

    @abc.abstractmethod
    def job_info(self, job_id: str) -> Optional[JobInfo]:
        """The job's summary from the job index, or None if unknown."""

    @abc.abstractmethod
    def list_jobs(self) -> Sequence[JobInfo]:
        """Every known job's summary (an immutable tuple)."""
