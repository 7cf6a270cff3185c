"""The gRPC servicer of ``joblet.persist.PersistService``.

gRPC handler threads (grpcio's ThreadPoolExecutor) run everything in this
module.  The handlers only read immutable, published storage snapshots
(``IStorageBackend.snapshot``, ``job_info``, ``list_jobs_page``, ``totals``)
and the data within them.  The few operations that change state or load a job from disk
(``open_job``, DeleteJob, CleanupOldData) are marshalled onto the reactor with
``blockingCallFromThread``, with a timeout applied on the reactor side.

Every handler is wrapped by one piece of code (``_run_unary`` / ``_run_stream``,
applied by the ``_unary`` / ``_streaming`` decorators) that

- refuses RPCs with UNAVAILABLE once ``set_stopping()`` was called,
- checks the caller's role (security.Authorizer),
- enforces the concurrency limit (RESOURCE_EXHAUSTED beyond it; Ping is
  exempt, so joblet-core's pre-job Ping answers even when queries saturate
  the service),
- maps exceptions to status codes (the only place that does so), and
- reports each RPC's outcome and duration to the injected metrics object.

Metrics object (optional; a no-op by default), called on gRPC threads:
``query_done(rpc: str, code: str, seconds: float)``, ``members_inflated(n)``,
``members_skipped(n)``, ``corrupt_members(n)``.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Iterator, Optional

import grpc
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from joblet_persist import aggregate, events, follow
from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from joblet_persist.logs import Logger
from joblet_persist.security import (
    ROLE_ADMIN,
    ROLE_VIEWER,
    Authorizer,
    PermissionDenied,
    Unauthenticated,
)
from joblet_persist.storage.api import (
    DataVanished,
    IBulkLogReads,
    ILogSearch,
    IMetricColumns,
    InvalidJobId,
    IRemoteNodes,
    JobInfo,
    LogRecord,
    MetricRecord,
    ReadStats,
    StorageUnavailable,
    check_job_id,
)
from joblet_persist.storage.search import (
    BadPattern,
    ScanLimits,
    SearchLimitExceeded,
    compile_matcher,
)

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


class BadRequest(ValueError):
    """A malformed request field (maps to INVALID_ARGUMENT)."""


class RpcStatus(Exception):
    """End the RPC with this status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


#: OSError numbers that the operator must fix before a retry can succeed (the data
#: directory is read-only or not ours): FAILED_PRECONDITION.  Every other OSError
#: with an errno (EIO, ENOSPC, EMFILE, ...) is UNAVAILABLE: the service cannot
#: do it now, a retry later may succeed.  RESOURCE_EXHAUSTED is kept for the
#: concurrency limit, which a client retries at once.
_PRECONDITION_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def os_error_status(rpc: str, exc: OSError, job_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message of a filesystem error that ended ``rpc``.

    The message names the RPC, the job (when the request has one), the cause
    as the system words it ("Read-only file system") and the file.
    """
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    where = f" ({exc.filename})" if exc.filename else ""
    subject = f"{rpc} of job {job_id}" if job_id else rpc
    if exc.errno in _PRECONDITION_ERRNOS:
        return (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{subject} failed: {cause} [{name}]{where}; "
            + ("the job's remaining data is kept; " if job_id else "")
            + "the data directory must be writable by the service before a retry can succeed",
        )
    return (
        grpc.StatusCode.UNAVAILABLE,
        f"{subject} failed: {cause} [{name}]{where}; retry later",
    )


class _NoMetrics:
    def query_done(self, rpc: str, code: str, seconds: float) -> None:
        pass

    def members_inflated(self, n: int) -> None:
        pass

    def members_skipped(self, n: int) -> None:
        pass

    def corrupt_members(self, n: int) -> None:
        pass


class _Slot:
    """One admitted RPC; released exactly once (handler end or RPC termination)."""

    __slots__ = ("_limiter", "_released")

    def __init__(self, limiter: _Limiter):
        self._limiter = limiter
        self._released = False

    def release(self) -> None:
        with self._limiter.lock:
            if not self._released:
                self._released = True
                self._limiter.active -= 1


class _Limiter:
    """Counts RPCs in progress; any thread."""

    def __init__(self, limit: int):
        self.lock = threading.Lock()
        self.limit = limit
        self.active = 0

    def acquire(self) -> Optional[_Slot]:
        with self.lock:
            if self.active >= self.limit:
                return None
            self.active += 1
            return _Slot(self)


def _unary(rpc: str, role: str, limited: bool = True):
    """Wrap a unary handler with the admission checks and error mapping."""

    def decorate(fn):
        @functools.wraps(fn)
        def handler(self, request, context):
            return self._run_unary(rpc, role, limited, fn, request, context)

        return handler

    return decorate


def _streaming(rpc: str, role: str):
    """Wrap a server-streaming handler (a generator) likewise."""

    def decorate(fn):
        @functools.wraps(fn)
        def handler(self, request, context):
            yield from self._run_stream(rpc, role, fn, request, context)

        return handler

    return decorate


_num = aggregate.number  # one reading of stored metric fields, shared with AggregateMetrics


def metric_message(job_id: str, record: MetricRecord) -> persist_pb2.Metric:
    """Rebuild the wire Metric from a stored record's ``data`` object.

    Unknown keys are ignored, missing ones are zero; snake_case keys (the
    stored format) and camelCase keys are both read.
    """
    data = record.data if isinstance(record.data, dict) else {}
    msg = persist_pb2.Metric(job_uuid=job_id, timestamp=record.timestamp, sequence=record.sequence)
    md = msg.data
    md.cpu_usage = _num(data, "cpu_usage", float)
    md.memory_usage = _num(data, "memory_usage", int)
    md.gpu_usage = _num(data, "gpu_usage", float)
    disk = data.get("disk_io", data.get("diskIo"))
    if isinstance(disk, dict):
        for name in ("read_bytes", "write_bytes", "read_ops", "write_ops"):
            setattr(md.disk_io, name, _num(disk, name, int))
    net = data.get("network_io", data.get("networkIo"))
    if isinstance(net, dict):
        for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
            setattr(md.network_io, name, _num(net, name, int))
    return msg


def _job_info_fields(info: JobInfo) -> dict:
    return {
        "job_uuid": info.job_id,
        "created_at": info.created_at,
        "last_updated": info.last_updated,
        "log_count": info.log_count,
        "metric_count": info.metric_count,
        "size_bytes": info.size_bytes,
        "event_count": min(info.event_count, _INT64_MAX),
        "event_counts": info.event_counts,
    }


def _event_rpc(kind: events.EventKind):
    """The handler of ``kind``'s Query*Events RPC (QueryTelemetryRequest -> stream)."""

    def handler(self, request, context):
        yield from self._events_of(kind, request, context)

    handler.__name__ = handler.__qualname__ = kind.rpc
    handler.__doc__ = f"The job's {kind.name} events in arrival order (QueryTelemetryRequest)."
    return _streaming(kind.rpc, ROLE_VIEWER)(handler)


class PersistServicer(persist_pb2_grpc.PersistServiceServicer):
    """``joblet.persist.PersistService``.  Handlers run on gRPC threads.

    ``is_healthy`` and ``ingest_stats`` are called on gRPC threads: they must
    be cheap, thread-safe reads of state the reactor maintains.
    ``delete_job(job_id)`` and ``cleanup(dry_run)`` are called on the reactor
    thread and return Deferreds (bytes freed; an object with
    ``jobs_deleted``, ``bytes_freed``, ``deleted_job_ids``).  ``cleanup=None``
    answers CleanupOldData with UNIMPLEMENTED.
    """

    log = Logger()

    def __init__(
        self,
        storage,
        reactor,
        *,
        is_healthy: Callable[[], bool],
        ingest_stats: Callable[[], dict],
        delete_job: Callable[[str], defer.Deferred],
        cleanup: Optional[Callable[[bool], defer.Deferred]] = None,
        batch_max_items: int = 4096,
        batch_max_bytes: int = 1 << 20,
        max_limit: int = 100_000_000,
        reactor_call_timeout: float = 30.0,
        max_concurrent_rpcs: int = 64,
        metrics=None,
        admin_ou: str = "admin",
        viewer_ou: str = "viewer",
        follow_hub=None,
        delete_note: str = "",
        search_submit: Optional[Callable] = None,
        search_window: int = 4,
        search_max_bytes: int = 0,
        search_max_seconds: float = 0.0,
        aggregate_max_points: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._storage = storage
        # Appended to DeleteJob's message (what a remote backend could or could not delete).
        self._delete_note = delete_note
        self._reactor = reactor
        self._is_healthy = is_healthy
        self._ingest_stats = ingest_stats
        self._delete_job = delete_job
        self._cleanup = cleanup
        self._batch_max_items = max(1, int(batch_max_items))
        self._batch_max_bytes = max(1, int(batch_max_bytes))
        self._max_limit = min(int(max_limit), _INT32_MAX)
        self._timeout = float(reactor_call_timeout)
        self._limiter = _Limiter(max(1, int(max_concurrent_rpcs)))
        self._metrics = metrics if metrics is not None else _NoMetrics()
        self._authorizer = Authorizer(admin_ou, viewer_ou)
        self._stopping = False
        self._abandoned = threading.Event()
        # follow.FollowHub (reactor side of FollowLogs), or None: FollowLogs is UNIMPLEMENTED.
        self._follow_hub = follow_hub
        # Search (and AggregateMetrics' read): where members are scanned (a Future-returning
        # submit; None: inline), how many at once, and the work bound of each search.
        self._search_submit = search_submit
        self._search_window = max(1, int(search_window))
        self._search_max_bytes = max(0, int(search_max_bytes))
        self._search_max_seconds = max(0.0, float(search_max_seconds))
        self._aggregate_max_points = max(1, int(aggregate_max_points))
        self._clock = clock

    # -- lifecycle (any thread) -------------------------------------------------

    def set_stopping(self) -> None:
        """From now on every RPC is refused with UNAVAILABLE.  Any thread.

        Followers (FollowLogs) end at once with UNAVAILABLE: the hub is
        stopped on the reactor thread.
        """
        self._stopping = True
        if self._follow_hub is not None:
            self._reactor.callFromThread(self._follow_hub.stop)

    def abandon_reads(self) -> None:
        """Make every read's ``cancelled()`` true from now on.  Any thread.

        Called by the server's stop once the grace period is over, so that a
        read still running stops at its next cancellation check even if its
        call still looks active.
        """
        self._stopping = True
        self._abandoned.set()

    def _cancelled(self, context) -> Callable[[], bool]:
        """The ``cancelled`` callable handed to storage readers for this RPC.

        True once the client cancelled, the deadline passed or the call ended
        (gRPC also ends every call at the end of a stop's grace period), and
        once ``abandon_reads`` was called.
        """
        abandoned = self._abandoned.is_set
        is_active = context.is_active
        return lambda: abandoned() or not is_active()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def max_concurrent_rpcs(self) -> int:
        return self._limiter.limit

    def set_max_concurrent_rpcs(self, limit: int) -> None:
        """Change the concurrency limit (before serving).  Any thread."""
        with self._limiter.lock:
            self._limiter.limit = max(1, int(limit))

    @property
    def active_rpcs(self) -> int:
        """RPCs admitted and not yet finished (Ping excluded)."""
        with self._limiter.lock:
            return self._limiter.active

    def healthy(self) -> bool:
        """The health verdict for Ping and the gRPC health service.  Any thread."""
        if self._stopping:
            return False
        try:
            return bool(self._is_healthy())
        except Exception:
            self.log.failure("health check raised; reporting unhealthy")
            return False

    # -- the wrapper: admission, error mapping, metrics -----------------------------

    def _admit(self, context, rpc: str, role: str, limited: bool):
        if self._stopping:
            raise RpcStatus(grpc.StatusCode.UNAVAILABLE, "joblet-persist is shutting down")
        self._authorizer.check(context, role, rpc)
        if not limited:
            return None
        slot = self._limiter.acquire()
        if slot is None:
            raise RpcStatus(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent requests (limit {self._limiter.limit}); retry later",
            )
        # Released when the RPC terminates (cancel, deadline, stop), even while
        # the handler still runs, and even if grpc never resumes a streaming
        # handler whose client went away.
        if not context.add_callback(slot.release):
            # The RPC already ended (its deadline passed before we got here):
            # the callback will never run, so give the slot back now.
            slot.release()
            raise RpcStatus(grpc.StatusCode.CANCELLED, f"{rpc}: the call ended before it started")
        return slot

    def _map_error(self, rpc: str, exc: Exception, request=None) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, RpcStatus):
            return exc.code, exc.details
        if isinstance(exc, BadPattern):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, SearchLimitExceeded):
            where = f" in job {exc.job_id}" if exc.job_id else ""
            resume = (
                f"; continue{where} with start_time={exc.resume_time}" if exc.resume_time else ""
            )
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{rpc} stopped: {exc.reason}{where} (the matches before that point were "
                f"sent){resume}, or narrow the time range or the jobs searched",
            )
        if isinstance(exc, (InvalidJobId, BadRequest)):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, DataVanished):
            vanished = self._vanished(exc.job_id)
            return vanished.code, vanished.details
        if isinstance(exc, StorageUnavailable):
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno:
                # A local filesystem's refusal (read-only, permissions, full): its errno
                # decides whether an operator must act first (FAILED_PRECONDITION).
                exc = cause
            else:
                return grpc.StatusCode.UNAVAILABLE, f"{rpc}: storage unavailable: {exc.cause}"
        if isinstance(exc, Unauthenticated):
            return grpc.StatusCode.UNAUTHENTICATED, str(exc)
        if isinstance(exc, PermissionDenied):
            return grpc.StatusCode.PERMISSION_DENIED, str(exc)
        if isinstance(exc, defer.TimeoutError):
            return (
                grpc.StatusCode.UNAVAILABLE,
                f"{rpc}: the service did not complete the operation within "
                f"{self._timeout:g}s; retry later",
            )
        if isinstance(exc, OSError) and exc.errno:
            # The environment (a read-only or failing disk), not a bug: no traceback.
            code, details = os_error_status(rpc, exc, getattr(request, "job_uuid", ""))
            self.log.warn("{details}", details=details, rpc=rpc, code=code.name)
            return code, details
        self.log.failure("{rpc} failed", failure=Failure(exc), rpc=rpc)
        return grpc.StatusCode.INTERNAL, f"{rpc}: internal error (see the service log)"

    def _run_unary(self, rpc, role, limited, fn, request, context):
        started = time.monotonic()
        code = grpc.StatusCode.OK
        slot = None
        try:
            slot = self._admit(context, rpc, role, limited)
            return fn(self, request, context)
        except Exception as exc:
            code, details = self._map_error(rpc, exc, request)
            context.abort(code, details)
        finally:
            if slot is not None:
                slot.release()
            self._metrics.query_done(rpc, code.name, time.monotonic() - started)

    def _run_stream(self, rpc, role, fn, request, context):
        started = time.monotonic()
        code = grpc.StatusCode.OK
        slot = None
        try:
            slot = self._admit(context, rpc, role, True)
            yield from fn(self, request, context)
            if not context.is_active():
                code = grpc.StatusCode.CANCELLED
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details = self._map_error(rpc, exc, request)
            context.abort(code, details)
        finally:
            if slot is not None:
                slot.release()
            self._metrics.query_done(rpc, code.name, time.monotonic() - started)

    # -- helpers ------------------------------------------------------------------------

    def _call_on_reactor(self, fn, *args):
        """Run ``fn(*args)`` on the reactor and wait for its Deferred.  gRPC thread.

        The timeout is applied on the reactor; it fails with
        ``defer.TimeoutError`` (mapped to UNAVAILABLE).
        """

        def call():
            d = defer.maybeDeferred(fn, *args)
            d.addTimeout(self._timeout, self._reactor)
            return d

        return threads.blockingCallFromThread(self._reactor, call)

    def _snapshot(self, job_id: str, node_id: str = ""):
        """The job's snapshot; NOT_FOUND when unknown.  ``node_id`` (a request's) naming
        another node reads that node's archive where the backend can (IRemoteNodes);
        otherwise it is ignored (this node's data only)."""
        storage = self._storage
        if node_id and IRemoteNodes.providedBy(storage) and node_id != storage.node_id:
            snap = storage.node_snapshot(node_id, job_id)
            if snap is None:
                raise RpcStatus(grpc.StatusCode.NOT_FOUND,
                                f"job {job_id} not found in the archive of node {node_id}")
            return snap
        snap = self._storage.snapshot(job_id)
        if snap is None:
            snap = self._call_on_reactor(self._storage.open_job, job_id)
        if snap is None:
            raise RpcStatus(grpc.StatusCode.NOT_FOUND, f"job {job_id} not found")
        return snap

    def _check_page(self, limit: int, offset: int) -> None:
        for name, value in (("limit", limit), ("offset", offset)):
            if value < 0 or value > self._max_limit:
                raise BadRequest(f"{name} {value} is out of range: expected 0..{self._max_limit}")

    @staticmethod
    def _check_range(start: int, end: int, unit: str = "start_time/end_time") -> None:
        if start > 0 and end > 0 and start > end:
            raise BadRequest(f"inverted range: {unit} {start} > {end}")

    def _report(self, stats: ReadStats) -> None:
        self._metrics.members_inflated(stats.members_inflated)
        self._metrics.members_skipped(stats.members_skipped)
        self._metrics.corrupt_members(stats.corrupt_members)

    def _vanished(self, job_id: str) -> RpcStatus:
        """The status of a read whose snapshot lost a file to DeleteJob or retention.

        A snapshot names the files published when the read began; a segment
        deleted meanwhile cannot be opened any more.  The job is NOT_FOUND
        when it is gone; otherwise ABORTED (retention dropped a segment, or a
        DeleteJob is still removing the job's files): a retry reads what is
        left, or finds the job gone.
        """
        if self._storage.job_info(job_id) is None:
            return RpcStatus(grpc.StatusCode.NOT_FOUND, f"job {job_id} was deleted during the read")
        return RpcStatus(
            grpc.StatusCode.ABORTED,
            f"a file of job {job_id} was deleted during the read (by retention or DeleteJob); "
            "retry the query",
        )

    def _log_chunks(self, request, context) -> Iterator[tuple]:
        """Validate a log query and yield its records in chunks.

        A chunk is ``(streams, timestamps, sequences, contents)``, four equally
        long sequences: from the snapshot's ``iter_log_chunks`` when it provides
        IBulkLogReads (no per-message objects on the way), else one chunk per
        LogRecord of ``iter_logs``.
        """
        job_id = check_job_id(request.job_uuid)
        stream = int(request.stream)
        if stream not in (0, 1, 2):
            raise BadRequest(
                f"invalid stream {stream}: expected 0 (both), 1 (stdout) or 2 (stderr)"
            )
        self._check_page(request.limit, request.offset)
        self._check_range(request.start_time, request.end_time)
        snap = self._snapshot(job_id, request.node_id)
        stats = ReadStats()
        args = (stream, request.start_time, request.end_time, request.offset, request.limit)
        cancelled = self._cancelled(context)
        try:
            if IBulkLogReads.providedBy(snap):
                yield from snap.iter_log_chunks(*args, stats=stats, cancelled=cancelled)
            else:
                records: Iterator[LogRecord] = snap.iter_logs(
                    *args, stats=stats, cancelled=cancelled
                )
                for rec in records:
                    yield (rec.stream,), (rec.timestamp,), (rec.sequence,), (rec.content,)
        finally:
            self._report(stats)

    def _log_lines(self, request, context) -> Iterator[persist_pb2.LogLine]:
        job_id = request.job_uuid
        line = persist_pb2.LogLine
        for streams, timestamps, sequences, contents in self._log_chunks(request, context):
            for st, ts, seq, content in zip(streams, timestamps, sequences, contents, strict=True):
                yield line(job_uuid=job_id, stream=st, timestamp=ts, sequence=seq, content=content)

    def _log_batches(self, request, context) -> Iterator[persist_pb2.LogLineBatch]:
        """LogLineBatch messages of at most batch_max_items lines / batch_max_bytes of content.

        A line larger than batch_max_bytes travels alone.  Lines are added to
        the batch in place (cheaper than building LogLine objects and copying
        them in), which is what lets one stream carry hundreds of thousands of
        lines per second.
        """
        job_id = request.job_uuid
        max_items, max_bytes = self._batch_max_items, self._batch_max_bytes
        batch = persist_pb2.LogLineBatch()
        add = batch.lines.add
        count = size = 0
        for streams, timestamps, sequences, contents in self._log_chunks(request, context):
            i, n = 0, len(contents)
            while i < n:
                # As many of the chunk's next lines as the batch still has room for.
                j = min(n, i + max_items - count)
                sizes = list(accumulate(map(len, contents[i:j])))
                k = bisect_right(sizes, max_bytes - size)
                if k == 0:
                    if count:
                        yield batch
                        batch = persist_pb2.LogLineBatch()
                        add = batch.lines.add
                        count = size = 0
                        continue
                    k = 1  # a line larger than batch_max_bytes travels alone
                j = i + k
                for st, ts, seq, content in zip(
                    streams[i:j], timestamps[i:j], sequences[i:j], contents[i:j], strict=True
                ):
                    m = add()
                    m.job_uuid = job_id
                    m.stream = st
                    m.timestamp = ts
                    m.sequence = seq
                    m.content = content
                count += k
                size += sizes[k - 1]
                i = j
                if count >= max_items:
                    yield batch
                    batch = persist_pb2.LogLineBatch()
                    add = batch.lines.add
                    count = size = 0
        if count:
            yield batch

    def _metrics_of(self, request, context) -> Iterator[persist_pb2.Metric]:
        job_id = check_job_id(request.job_uuid)
        self._check_page(request.limit, request.offset)
        self._check_range(request.start_time, request.end_time)
        snap = self._snapshot(job_id, request.node_id)
        stats = ReadStats()
        records: Iterator[MetricRecord] = snap.iter_metrics(
            request.start_time,
            request.end_time,
            request.offset,
            request.limit,
            stats=stats,
            cancelled=self._cancelled(context),
        )
        try:
            for rec in records:
                yield metric_message(job_id, rec)
        finally:
            self._report(stats)

    def _events_of(self, kind: events.EventKind, request, context):
        """Validate a telemetry query and yield the kind's messages (``kind.persist_class``).

        The rules of QueryMetrics: inclusive range on bounds > 0, then offset,
        then limit; an unknown job is NOT_FOUND, a known job without events of
        the kind an empty stream.  node_id naming another node reads its archive.
        """
        job_id = check_job_id(request.job_uuid)
        self._check_page(request.limit, request.offset)
        self._check_range(request.start_time, request.end_time)
        snap = self._snapshot(job_id, request.node_id)
        stats = ReadStats()
        records = snap.iter_events(
            kind.name,
            request.start_time,
            request.end_time,
            request.offset,
            request.limit,
            stats=stats,
            cancelled=self._cancelled(context),
        )
        message = events.event_message
        try:
            for rec in records:
                yield message(kind, rec.data, job_id)
        finally:
            self._report(stats)

    def _batches(self, items, size_of, make):
        """Group items into messages of at most batch_max_items / batch_max_bytes.

        An item larger than batch_max_bytes travels alone.
        """
        max_items, max_bytes = self._batch_max_items, self._batch_max_bytes
        batch: list = []
        size = 0
        for item in items:
            n = size_of(item)
            if batch and (len(batch) >= max_items or size + n > max_bytes):
                yield make(batch)
                batch, size = [], 0
            batch.append(item)
            size += n
        if batch:
            yield make(batch)

    # -- search ---------------------------------------------------------------------------

    def _search_jobs(self, request) -> list:
        """The job ids a SearchLogs request names, validated; in ListJobs order for all_jobs."""
        if not request.all_jobs:
            return [check_job_id(request.job_uuid)]
        if request.job_uuid:
            raise BadRequest("give job_uuid or all_jobs, not both")
        self._check_range(request.jobs_since, request.jobs_until, "jobs_since/jobs_until")
        _total, page = self._storage.list_jobs_page(request.jobs_since, request.jobs_until, 0, 0)
        return [info.job_id for info in page]

    def _search_limits(self, request) -> ScanLimits:
        if request.max_scan_bytes < 0:
            raise BadRequest(f"max_scan_bytes {request.max_scan_bytes} is negative")
        max_bytes = self._search_max_bytes
        if request.max_scan_bytes and (not max_bytes or request.max_scan_bytes < max_bytes):
            max_bytes = request.max_scan_bytes
        deadline = None
        if self._search_max_seconds:
            deadline = self._clock() + self._search_max_seconds
        return ScanLimits(max_bytes, deadline, self._clock)

    def _search_chunks(self, snap, matcher, request, limits, stats, cancelled):
        """Matching messages of one job in chunks: the snapshot's own scan (ILogSearch),
        else its log read searched message by message."""
        stream, start, end = int(request.stream), request.start_time, request.end_time
        if ILogSearch.providedBy(snap):
            extra = {} if self._search_submit is None else {"submit": self._search_submit}
            yield from snap.search_log_chunks(
                matcher, stream, start, end, limits=limits, window=self._search_window,
                stats=stats, cancelled=cancelled, **extra,
            )
            return
        if IBulkLogReads.providedBy(snap):
            chunks = snap.iter_log_chunks(stream, start, end, stats=stats, cancelled=cancelled)
        else:
            chunks = (
                ((r.stream,), (r.timestamp,), (r.sequence,), (r.content,))
                for r in snap.iter_logs(stream, start, end, stats=stats, cancelled=cancelled)
            )
        for streams, timestamps, sequences, contents in chunks:
            keep = []
            for i, content in enumerate(contents):
                limits.check(len(content), timestamps[i])
                limits.charge(len(content))
                if matcher.matches(content):
                    keep.append(i)
            if keep:
                yield (
                    [streams[i] for i in keep], [timestamps[i] for i in keep],
                    [sequences[i] for i in keep], [contents[i] for i in keep],
                )

    def _search(self, request, context) -> Iterator[persist_pb2.SearchLogsResponse]:
        """SearchLogs: matches in batches (batch_max_items / batch_max_bytes), then a
        last message with the summary."""
        stream = int(request.stream)
        if stream not in (0, 1, 2):
            raise BadRequest(
                f"invalid stream {stream}: expected 0 (both), 1 (stdout) or 2 (stderr)"
            )
        self._check_page(request.limit, request.offset)
        self._check_range(request.start_time, request.end_time)
        try:
            matcher = compile_matcher(request.pattern, request.regex, request.ignore_case)
        except BadPattern as e:
            raise BadRequest(f"pattern: {e}") from None
        job_ids = self._search_jobs(request)
        limits = self._search_limits(request)
        cancelled = self._cancelled(context)
        count_only = request.count_only
        offset, limit = request.offset, request.limit
        max_items, max_bytes = self._batch_max_items, self._batch_max_bytes
        summary = persist_pb2.SearchSummary()
        batch = persist_pb2.SearchLogsResponse()
        size = 0
        done = False
        for job_id in job_ids:
            if done or cancelled():
                break
            try:
                snap = self._snapshot(job_id)
            except RpcStatus as e:
                if request.all_jobs and e.code is grpc.StatusCode.NOT_FOUND:
                    continue  # deleted since it was listed
                raise
            summary.jobs_searched += 1
            stats = ReadStats()
            chunks = self._search_chunks(snap, matcher, request, limits, stats, cancelled)
            try:
                for streams, timestamps, sequences, contents in chunks:
                    n = len(contents)
                    summary.matches += n
                    if count_only:
                        continue
                    i = min(offset, n)
                    offset -= i
                    j = n if not limit else min(n, i + limit)
                    if limit:
                        limit -= j - i
                    for k in range(i, j):
                        line = batch.lines.add()
                        line.job_uuid = job_id
                        line.stream = streams[k]
                        line.timestamp = timestamps[k]
                        line.sequence = sequences[k]
                        line.content = contents[k]
                        size += len(contents[k])
                        if len(batch.lines) >= max_items or size >= max_bytes:
                            yield batch
                            batch = persist_pb2.SearchLogsResponse()
                            size = 0
                    if request.limit and not limit:
                        done = True
                        break
            except SearchLimitExceeded as e:
                e.job_id = job_id
                if len(batch.lines):
                    yield batch
                raise
            except DataVanished:
                if not request.all_jobs:
                    raise
                # Deleted while it was read: its matches so far stand, the search goes on.
            finally:
                chunks.close()
                self._report(stats)
        summary.bytes_scanned = limits.bytes_scanned
        summary.members_scanned = limits.members_scanned
        batch.summary.CopyFrom(summary)
        yield batch

    # -- RPCs -------------------------------------------------------------------------------

    @_unary("Ping", ROLE_VIEWER, limited=False)
    def Ping(self, request, context):
        return persist_pb2.PingResponse(healthy=self.healthy(), timestamp=time.time_ns())

    @_streaming("QueryLogs", ROLE_VIEWER)
    def QueryLogs(self, request, context):
        yield from self._log_lines(request, context)

    @_streaming("QueryLogsBatched", ROLE_VIEWER)
    def QueryLogsBatched(self, request, context):
        yield from self._log_batches(request, context)

    @_streaming("QueryMetrics", ROLE_VIEWER)
    def QueryMetrics(self, request, context):
        yield from self._metrics_of(request, context)

    @_streaming("QueryMetricsBatched", ROLE_VIEWER)
    def QueryMetricsBatched(self, request, context):
        yield from self._batches(
            self._metrics_of(request, context),
            lambda metric: metric.ByteSize(),
            lambda metrics: persist_pb2.MetricBatch(metrics=metrics),
        )

    QueryExecEvents = _event_rpc(events.KINDS_BY_NAME["exec"])
    QueryConnectEvents = _event_rpc(events.KINDS_BY_NAME["connect"])
    QueryAcceptEvents = _event_rpc(events.KINDS_BY_NAME["accept"])
    QuerySocketDataEvents = _event_rpc(events.KINDS_BY_NAME["socket_data"])
    QueryMmapEvents = _event_rpc(events.KINDS_BY_NAME["mmap"])
    QueryMprotectEvents = _event_rpc(events.KINDS_BY_NAME["mprotect"])
    QueryFileEvents = _event_rpc(events.KINDS_BY_NAME["file"])

    @_streaming("QueryEventsBatched", ROLE_VIEWER)
    def QueryEventsBatched(self, request, context):
        kind = events.KINDS_BY_TYPE.get(int(request.kind))
        if kind is None:
            raise BadRequest(
                f"invalid event kind {int(request.kind)}: expected one of "
                + ", ".join(f"{k.msg_type} ({k.name})" for k in events.KINDS)
            )
        field = kind.batch_field
        yield from self._batches(
            self._events_of(kind, request, context),
            lambda event: event.ByteSize(),
            lambda items: persist_pb2.EventBatch(kind=kind.msg_type, **{field: items}),
        )

    @staticmethod
    def _check_stream(value) -> int:
        stream = int(value)
        if stream not in (0, 1, 2):
            raise BadRequest(
                f"invalid stream {stream}: expected 0 (both), 1 (stdout) or 2 (stderr)"
            )
        return stream

    @_streaming("TailLogs", ROLE_VIEWER)
    def TailLogs(self, request, context):
        """The last ``lines`` lines (of the range), in arrival order, as LogLineBatches."""
        job_id = check_job_id(request.job_uuid)
        stream = self._check_stream(request.stream)
        self._check_range(request.start_time, request.end_time)
        lines = int(request.lines)
        if lines < 0 or lines > self._max_limit:
            raise BadRequest(f"lines {lines} is out of range: expected 0..{self._max_limit}")
        snap = self._snapshot(job_id)
        stats = ReadStats()
        try:
            chunks = follow.tail_chunks(
                snap, stream, lines, request.start_time, request.end_time, stats,
                self._cancelled(context),
            )
            yield from follow.batches(
                job_id, chunks, self._batch_max_items, self._batch_max_bytes
            )
        finally:
            self._report(stats)

    @_streaming("FollowLogs", ROLE_VIEWER)
    def FollowLogs(self, request, context):
        """Stored lines from the requested point, then new lines until the call ends."""
        yield from self._follow(request, context, follow.follow_batches)

    @_streaming("FollowLogs", ROLE_VIEWER)
    def follow_logs_serialized(self, request, context):
        """FollowLogs with its responses already serialized (bytes), for a method
        handler whose response serializer passes bytes through (grpc_server.py): the
        live lines of a job are serialized once per delivery and the same bytes sent
        to each of its followers, instead of once per follower by grpc."""
        yield from self._follow(request, context, follow.follow_wire)

    def _follow(self, request, context, produce):
        hub = self._follow_hub
        if hub is None:
            raise RpcStatus(
                grpc.StatusCode.UNIMPLEMENTED,
                "FollowLogs is not available: this service has no writer to follow",
            )
        job_id = check_job_id(request.job_uuid)
        stream = self._check_stream(request.stream)
        start_from = int(request.start_from)
        if start_from not in (follow.FOLLOW_FROM_START, follow.FOLLOW_FROM_TAIL,
                              follow.FOLLOW_FROM_NOW):
            raise BadRequest(
                f"invalid start_from {start_from}: expected 0 (start), 1 (tail) or 2 (now)"
            )
        tail_lines = int(request.tail_lines)
        if tail_lines < 0 or tail_lines > self._max_limit:
            raise BadRequest(
                f"tail_lines {tail_lines} is out of range: expected 0..{self._max_limit}"
            )
        if request.idle_timeout_ms < 0:
            raise BadRequest(f"idle_timeout_ms {request.idle_timeout_ms} must be >= 0")
        try:
            start = self._call_on_reactor(hub.start, job_id, stream)
        except follow.FollowEnded as e:
            raise RpcStatus(e.code, e.details) from None
        follower = start.follower
        # Wake the thread at once when the call ends (client cancel, deadline, stop).
        context.add_callback(
            lambda: follower.end(grpc.StatusCode.CANCELLED, "the call ended")
        )
        stats = ReadStats()
        cancelled = self._cancelled(context)
        try:
            yield from produce(
                start, job_id, stream, start_from, tail_lines, request.start_time,
                request.idle_timeout_ms / 1000.0, stats, cancelled,
                self._batch_max_items, self._batch_max_bytes,
            )
        except follow.FollowEnded as e:
            raise RpcStatus(e.code, e.details) from None
        finally:
            self._report(stats)
            self._reactor.callFromThread(hub.remove, follower)

    @_unary("GetJobInfo", ROLE_VIEWER)
    def GetJobInfo(self, request, context):
        job_id = check_job_id(request.job_uuid)
        info = self._storage.job_info(job_id)
        if info is None:
            info = self._snapshot(job_id).info
        return persist_pb2.GetJobInfoResponse(**_job_info_fields(info))

    @_unary("ListJobs", ROLE_VIEWER)
    def ListJobs(self, request, context):
        since, until = request.since, request.until
        self._check_range(since, until, "since/until")
        self._check_page(request.limit, request.offset)
        total, page = self._storage.list_jobs_page(since, until, request.offset, request.limit)
        return persist_pb2.ListJobsResponse(
            jobs=[persist_pb2.JobInfo(**_job_info_fields(j)) for j in page],
            total_count=min(total, _INT32_MAX),
        )

    @_unary("GetStats", ROLE_VIEWER)
    def GetStats(self, request, context):
        jobs, logs, metrics, size = self._storage.totals()
        by_kind = {name: n for name, n in self._storage.event_totals().items() if n}
        ingest = self._ingest_stats() or {}
        return persist_pb2.GetStatsResponse(
            total_jobs=jobs,
            total_logs=min(logs, _INT64_MAX),
            total_metrics=min(metrics, _INT64_MAX),
            total_size_bytes=min(size, _INT64_MAX),
            messages_received=int(ingest.get("messages_received", 0)),
            messages_written=int(ingest.get("messages_written", 0)),
            write_errors=int(ingest.get("write_errors", 0)),
            total_events=min(sum(by_kind.values()), _INT64_MAX),
            total_events_by_kind=by_kind,
        )

    @_unary("DeleteJob", ROLE_ADMIN)
    def DeleteJob(self, request, context):
        job_id = check_job_id(request.job_uuid)
        known = (
            self._storage.job_info(job_id) is not None or self._storage.snapshot(job_id) is not None
        )
        freed = int(self._call_on_reactor(self._delete_job, job_id) or 0)
        # docs/wire.md: success=true when the job's data is gone.  An unknown job's
        # data is gone too, so deleting it succeeds (idempotent delete).
        if known or freed:
            message = f"deleted job {job_id}: {freed} bytes freed"
        else:
            message = f"job {job_id} not found; nothing to delete"
        if self._delete_note:
            message += f"; {self._delete_note}"
        return persist_pb2.DeleteJobResponse(success=True, message=message)

    @_unary("CleanupOldData", ROLE_ADMIN)
    def CleanupOldData(self, request, context):
        if self._cleanup is None:
            raise RpcStatus(
                grpc.StatusCode.UNIMPLEMENTED,
                "CleanupOldData is not available: retention is not configured on this service",
            )
        result = self._call_on_reactor(self._cleanup, bool(request.dry_run))
        return persist_pb2.CleanupResponse(
            jobs_deleted=min(int(result.jobs_deleted), _INT32_MAX),
            bytes_freed=int(result.bytes_freed),
            deleted_job_ids=list(result.deleted_job_ids),
        )

    @_streaming("SearchLogs", ROLE_VIEWER)
    def SearchLogs(self, request, context):
        yield from self._search(request, context)

    @_unary("AggregateMetrics", ROLE_VIEWER)
    def AggregateMetrics(self, request, context):
        job_id = check_job_id(request.job_uuid)
        self._check_range(request.start_time, request.end_time)
        try:
            fields = aggregate.parse_fields(list(request.fields))
            functions = aggregate.parse_functions(list(request.functions))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if request.step_ns < 0:
            raise BadRequest(f"step_ns {request.step_ns} is negative (0 = auto)")
        if request.max_points < 0 or request.max_points > self._aggregate_max_points:
            raise BadRequest(
                f"max_points {request.max_points} is out of range: expected "
                f"0..{self._aggregate_max_points} (query.aggregateMaxPoints; 0 = 100)"
            )
        snap = self._snapshot(job_id)
        info = snap.info
        start = request.start_time if request.start_time > 0 else info.first_timestamp
        end = request.end_time if request.end_time > 0 else info.last_timestamp
        span = max(0, end - start)
        # Auto keeps two buckets in hand: a range cut on epoch-aligned steps touches up
        # to span // step + 2 of them.
        step = request.step_ns or aggregate.auto_step(
            span, max(1, min(request.max_points or 100, self._aggregate_max_points - 2))
        )
        most = span // step + 2
        if request.step_ns and most > self._aggregate_max_points:
            raise BadRequest(
                f"step {step} ns over {span} ns gives up to {most} points, more than "
                f"{self._aggregate_max_points} (query.aggregateMaxPoints): use a larger step "
                "or a narrower time range"
            )
        agg = aggregate.Aggregator(step, fields, functions)
        stats = ReadStats()
        cancelled = self._cancelled(context)
        too_many = (
            f"more than {self._aggregate_max_points} points "
            "(query.aggregateMaxPoints): use a larger step or a narrower time range"
        )
        try:
            if IMetricColumns.providedBy(snap):
                # Only the asked fields, parsed in bulk per member on the query pool.
                extra = {} if self._search_submit is None else {"submit": self._search_submit}
                for times, columns in snap.iter_metric_columns(
                    fields, request.start_time, request.end_time, window=self._search_window,
                    stats=stats, cancelled=cancelled, **extra,
                ):
                    agg.add_columns(times, columns)
                    if agg.bucket_count() > self._aggregate_max_points:
                        raise BadRequest(too_many)
            else:
                for rec in snap.iter_metrics(
                    request.start_time, request.end_time, stats=stats, cancelled=cancelled
                ):
                    agg.add(rec.timestamp, rec.data)
                    if agg.bucket_count() > self._aggregate_max_points:
                        raise BadRequest(too_many)
        finally:
            self._report(stats)
        if cancelled():
            raise RpcStatus(grpc.StatusCode.CANCELLED, "AggregateMetrics: the call ended")
        response = persist_pb2.AggregateMetricsResponse(
            step_ns=step, fields=list(fields), functions=list(functions), samples=agg.samples
        )
        wanted = [f for f in functions if f != "rate"]
        rate = "rate" in functions
        for key, count, field_stats in agg.points():
            point = response.points.add(timestamp=key, count=count)
            for name, fs in zip(fields, field_stats, strict=True):
                value = point.values.add(field=name)
                for function in wanted:
                    setattr(value, function, fs.result(function))
                if rate and name in aggregate.COUNTERS:
                    r = fs.result("rate")
                    if r is not None:
                        value.rate = r
                        value.has_rate = True
        return response
