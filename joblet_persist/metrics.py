"""Prometheus metrics of the service, on an injected CollectorRegistry.

Nothing here uses the global registry: the composition root creates one
registry per service, tests create a fresh one each.

Hot paths (one call per IPC frame) only bump plain integers in dicts; a custom
collector turns them into counters when Prometheus scrapes.  Those methods run
on the reactor thread, and the collector reads the dicts from the scraping
thread (also the reactor: Klein serves /metrics there), so no locking is
needed.  Query metrics are updated from gRPC threads through prometheus-client
objects, which are thread-safe.

docs/operations.md lists every metric with its meaning.
"""

from __future__ import annotations

import platform
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from zope.interface import implementer

from joblet_persist import __version__, events
from joblet_persist._proto import ipc_pb2, persist_pb2
from joblet_persist.ingest import IIngestMetrics

_TYPE_NAMES = {
    value.number: value.name.removeprefix("MESSAGE_TYPE_").lower()
    for value in ipc_pb2.DESCRIPTOR.enum_types_by_name["MessageType"].values
}

# Known label values of the labelled counters the shipped alerts and dashboard use: their
# series exist at 0 from the first scrape, so increase()/rate() see the first event.
FRAME_REJECT_REASONS = (
    "oversized", "bad_envelope", "bad_payload", "invalid_job_id", "invalid_stream",
    "unknown_type", "truncated_frame", "stopping", "too_many_connections",
    "over_budget", "stalled_frame",
)
STORAGE_ERROR_KINDS = (
    "index_write_failed", "metric_payload_skipped", "segment_shrunk", "overlapping_segments",
    "unsafe_entry", "unsupported_member",
)
QUERY_MEMBER_RESULTS = ("inflated", "skipped", "corrupt")
EVENT_REJECT_REASONS = ("bad_payload", "invalid_job_id", "stopping")
#: Status codes a query RPC is counted under from the start: success and the server-side
#: failures JobletPersistQueryErrors alerts on.
QUERY_CODES = ("OK", "INTERNAL", "UNKNOWN", "DATA_LOSS")
QUERY_RPCS = tuple(
    m.name for m in persist_pb2.DESCRIPTOR.services_by_name["PersistService"].methods
)


def message_type_name(msg_type: int) -> str:
    """The label value for an IPC message type number ("log", "metric", ...)."""
    return _TYPE_NAMES.get(msg_type, "other")


@implementer(IIngestMetrics)
class PersistMetrics:
    """All metrics of one service instance.

    Method names are the interface the ingest protocol, writer, query servicer
    and retention call; each component also works without it (no-op
    defaults), so unit tests need not build a registry.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, *, process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        # Hot-path counters: plain ints read by _HotCollector at scrape time.
        self._received: dict[str, int] = dict.fromkeys(_TYPE_NAMES.values(), 0)
        self._received_bytes = 0
        self._rejected: dict[str, int] = dict.fromkeys(FRAME_REJECT_REASONS, 0)
        # (kind, reason) -> frames
        self._events_rejected: dict[tuple[str, str], int] = {
            (kind.name, reason): 0 for kind in events.KINDS for reason in EVENT_REJECT_REASONS
        }
        self._event_source: Optional[Callable[[], dict]] = None
        self._connections = 0
        self._storage_source: Optional[Callable[[], tuple[int, int]]] = None
        self._health_source = None
        self._file_budget = None
        self._partial_budget = None
        self._ipc_socket_recreated = 0
        self._loaded_source = None
        self._backpressure_since: Optional[float] = None
        self._backpressure_total = 0.0
        self._clock: Callable[[], float] = _monotonic

        r = self.registry
        self.write_latency = Histogram(
            "persist_write_latency_seconds",
            "Time from handing a batch to storage until it is appended and published.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.durability_lag = Histogram(
            "persist_durability_lag_seconds",
            "Age of a batch's oldest message when the batch was appended (and fsync'd under "
            "storage.fsync batch): how much recent data a crash can lose.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=r,
        )
        self.flush_messages = Histogram(
            "persist_flush_messages",
            "Messages per appended batch.",
            buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000),
            registry=r,
        )
        self.flush_bytes = Histogram(
            "persist_flush_bytes",
            "Raw content bytes per appended batch.",
            buckets=(1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20),
            registry=r,
        )
        self.messages_written = Counter(
            "persist_messages_written",
            "Messages appended to storage.",
            registry=r,
        )
        self.write_errors = Counter(
            "persist_write_errors",
            "Failed appends (disk full, I/O error); each is retried.",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "persist_writer_buffered_bytes",
            "Memory held by messages received and not yet appended (content plus per-message "
            "objects).",
            registry=r,
        )
        self.backpressure_active = Gauge(
            "persist_backpressure_active",
            "1 while ingest is paused because the writer is above its high-water mark.",
            registry=r,
        )
        self.query_requests = Counter(
            "persist_query_requests",
            "gRPC requests by method and status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.query_duration = Histogram(
            "persist_query_duration_seconds",
            "gRPC request handling time by method.",
            ["rpc"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=r,
        )
        self.query_members = Counter(
            "persist_query_members",
            "Storage members visited by queries: inflated, skipped without inflating, or corrupt.",
            ["result"],
            registry=r,
        )
        self.followers_active = Gauge(
            "persist_followers",
            "FollowLogs calls following a job right now.",
            registry=r,
        )
        self.follow_cutoffs = Counter(
            "persist_follow_cutoffs",
            "FollowLogs callers cut off because they fell behind by more than "
            "query.followBufferBytes.",
            registry=r,
        )
        self.storage_errors = Counter(
            "persist_storage_errors",
            "Storage problems that lose nothing else: undecodable metric payloads skipped, "
            "job index writes failed (retried), segments found cut outside the service, "
            "overlapping or out-of-order segments, symlinks refused under the data directory, "
            "segments holding a member of a later format (left as they are).",
            ["kind"],
            registry=r,
        )
        self.compression_batches = Counter(
            "persist_compression_batches",
            "Batches handed to the pool to be compressed, by the compression level chosen for "
            "them (fixed, or chosen per batch when storage.compressionLevel is adaptive).",
            ["level"],
            registry=r,
        )
        self.compression_level_current = Gauge(
            "persist_compression_level",
            "The compression level chosen for the latest batch.",
            registry=r,
        )
        self._compression_children: dict = {}  # level -> compression_batches child
        self.retention_deleted_jobs = Counter(
            "persist_retention_deleted_jobs",
            "Jobs (or job segments) deleted by retention.",
            registry=r,
        )
        self.retention_bytes_freed = Counter(
            "persist_retention_bytes_freed",
            "Bytes freed by retention.",
            registry=r,
        )
        for rpc in QUERY_RPCS:
            for code in QUERY_CODES:
                self.query_requests.labels(rpc=rpc, code=code)
        for result in QUERY_MEMBER_RESULTS:
            self.query_members.labels(result=result)
        for kind in STORAGE_ERROR_KINDS:
            self.storage_errors.labels(kind=kind)
        self.build_info = Gauge(
            "persist_build_info",
            "Always 1; the labels give the running version of joblet-persist and Python.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        r.register(_HotCollector(self))
        if process:
            ProcessCollector(registry=r)

    # -- wiring --------------------------------------------------------

    def set_clock(self, seconds: Callable[[], float]) -> None:
        """Use this time source for backpressure time (an injected clock)."""
        self._clock = seconds

    def set_storage_source(self, source: Callable[[], tuple[int, int]]) -> None:
        """``source()`` returns (jobs, bytes on disk); read at scrape time."""
        self._storage_source = source

    def set_event_source(self, source: Callable[[], dict]) -> None:
        """``source()`` returns event kind name -> stored events; read at scrape time."""
        self._event_source = source

    def set_loaded_source(self, source: Callable[[], tuple[int, int]]) -> None:
        """``source()`` returns (jobs loaded in memory, jobs unloaded so far)."""
        self._loaded_source = source

    def set_file_budget(self, budget) -> None:
        """``budget`` (storage.files.FileBudget) is exported at scrape time."""
        self._file_budget = budget

    def set_partial_budget(self, budget) -> None:
        """``budget`` (ingest.PartialFrameBudget) is exported at scrape time."""
        self._partial_budget = budget

    def ipc_socket_recreated(self) -> None:
        """The IPC socket file had vanished and the listener was recreated at its path."""
        self._ipc_socket_recreated += 1

    def set_health_source(self, health) -> None:
        """``health.healthy`` and ``health.details`` are exported at scrape time."""
        self._health_source = health

    def archive(self, backend: str, source) -> ArchiveMetrics:
        """The metrics of an archive backend, on this registry (once per backend)."""
        return ArchiveMetrics(self.registry, backend, source)

    def archive_reads(self, backend: str = "s3") -> Callable[[int], None]:
        """``read(nbytes)``: counts a read of archived data by a query (a ranged GET of an
        archive-only segment or a sidecar).  Any thread; call once per backend."""
        read_bytes = Counter(
            "persist_archive_read_bytes",
            "Bytes fetched from the archive to answer queries (ranged GETs and sidecars).",
            ["backend"], registry=self.registry,
        ).labels(backend)
        requests = Counter(
            "persist_archive_read_requests",
            "Requests made to the archive to answer queries (ranged GETs and sidecars).",
            ["backend"], registry=self.registry,
        ).labels(backend)

        def read(nbytes: int) -> None:
            read_bytes.inc(nbytes)
            requests.inc()

        return read

    def cloudwatch(self, source) -> CloudWatchMetrics:
        """The metrics of the CloudWatch backend, on this registry (once)."""
        return CloudWatchMetrics(self.registry, source)

    # -- ingest (reactor thread, per frame) -----------------------------

    def frame_received(self, msg_type: int, nbytes: int) -> None:
        name = _TYPE_NAMES.get(msg_type, "other")
        self._received[name] = self._received.get(name, 0) + 1
        self._received_bytes += nbytes

    def frames_received(self, counts: dict[int, int], nbytes: int) -> None:
        """Bulk form of frame_received: ``counts`` maps message type to frames."""
        received = self._received
        for msg_type, n in counts.items():
            name = _TYPE_NAMES.get(msg_type, "other")
            received[name] = received.get(name, 0) + n
        self._received_bytes += nbytes

    def frame_rejected(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def event_rejected(self, kind: str, reason: str) -> None:
        key = (kind, reason)
        self._events_rejected[key] = self._events_rejected.get(key, 0) + 1

    def connection_opened(self) -> None:
        self._connections += 1

    def connection_closed(self) -> None:
        self._connections -= 1

    # -- writer (reactor thread) ---------------------------------------

    def write_done(self, seconds: float, messages: int, nbytes: int) -> None:
        self.write_latency.observe(seconds)
        self.flush_messages.observe(messages)
        self.flush_bytes.observe(nbytes)
        self.messages_written.inc(messages)

    def durable(self, age: float) -> None:
        self.durability_lag.observe(age)

    def write_error(self) -> None:
        self.write_errors.inc()

    def buffered(self, nbytes: int) -> None:
        self.buffered_bytes.set(nbytes)

    def backpressure(self, active: bool) -> None:
        now = self._clock()
        if active and self._backpressure_since is None:
            self._backpressure_since = now
        elif not active and self._backpressure_since is not None:
            self._backpressure_total += now - self._backpressure_since
            self._backpressure_since = None
        self.backpressure_active.set(1 if active else 0)

    def backpressure_seconds(self) -> float:
        total = self._backpressure_total
        if self._backpressure_since is not None:
            total += self._clock() - self._backpressure_since
        return total

    # -- storage (reactor thread) ----------------------------------------

    def metric_payloads_skipped(self, count: int) -> None:
        self.storage_errors.labels(kind="metric_payload_skipped").inc(count)

    def index_write_failed(self) -> None:
        self.storage_errors.labels(kind="index_write_failed").inc()

    def segment_shrunk(self) -> None:
        self.storage_errors.labels(kind="segment_shrunk").inc()

    def overlapping_segments(self) -> None:
        self.storage_errors.labels(kind="overlapping_segments").inc()

    def unsafe_entry(self) -> None:
        self.storage_errors.labels(kind="unsafe_entry").inc()

    def unsupported_member(self) -> None:
        self.storage_errors.labels(kind="unsupported_member").inc()

    def compression_level(self, level: int) -> None:
        # Once per batch on the reactor thread: the labelled child is looked up once per level
        # (``labels()`` validates and locks on every call).
        child = self._compression_children.get(level)
        if child is None:
            child = self._compression_children[level] = self.compression_batches.labels(
                level=str(level)
            )
        child.inc()
        self.compression_level_current.set(level)

    # -- queries (gRPC threads) ----------------------------------------

    def query_done(self, rpc: str, code: str, seconds: float) -> None:
        self.query_requests.labels(rpc=rpc, code=code).inc()
        self.query_duration.labels(rpc=rpc).observe(seconds)

    def members_inflated(self, n: int) -> None:
        if n:
            self.query_members.labels(result="inflated").inc(n)

    def members_skipped(self, n: int) -> None:
        if n:
            self.query_members.labels(result="skipped").inc(n)

    def corrupt_members(self, n: int) -> None:
        if n:
            self.query_members.labels(result="corrupt").inc(n)

    # -- followers (reactor thread) ------------------------------------

    def followers(self, n: int) -> None:
        self.followers_active.set(n)

    def follower_cut_off(self) -> None:
        self.follow_cutoffs.inc()

    # -- retention (reactor thread) ------------------------------------

    def retention_deleted(self, jobs: int, nbytes: int) -> None:
        self.retention_deleted_jobs.inc(jobs)
        self.retention_bytes_freed.inc(nbytes)

    # -- reading back (tests, GetStats) --------------------------------

    def received_total(self) -> int:
        return sum(self._received.values())

    def rejected_total(self) -> int:
        return sum(self._rejected.values())


class ArchiveMetrics:
    """The metrics of one archive backend (``backend`` label: "s3"); reactor thread.

    Created by ``PersistMetrics.archive`` only when an archive is configured.
    ``source`` (the shipper) is read at scrape time for the backlog gauges.
    """

    def __init__(self, registry: CollectorRegistry, backend: str, source):
        def gauge(name, doc, read):
            g = Gauge(name, doc, ["backend"], registry=registry)
            g.labels(backend).set_function(read)
            return g

        self.backlog_bytes = gauge(
            "persist_archive_backlog_bytes",
            "Bytes of segments due for upload (closed, or open and idle) not yet archived.",
            lambda: source.backlog_bytes,
        )
        self.backlog_segments = gauge(
            "persist_archive_backlog_segments",
            "Segments due for upload not yet archived.",
            lambda: source.backlog_segments,
        )
        self.oldest = gauge(
            "persist_archive_oldest_unarchived_seconds",
            "Seconds since the last write of the oldest segment due for upload (0: none).",
            source.oldest_unarchived_seconds,
        )
        self._uploaded_bytes = Counter(
            "persist_archive_uploaded_bytes", "Segment bytes uploaded to the archive.",
            ["backend"], registry=registry,
        ).labels(backend)
        self._uploaded_segments = Counter(
            "persist_archive_uploaded_segments", "Segments uploaded to the archive.",
            ["backend"], registry=registry,
        ).labels(backend)
        self._errors = Counter(
            "persist_archive_upload_errors",
            "Failed archive calls (uploads and deletions); each is retried with backoff.",
            ["backend"], registry=registry,
        ).labels(backend)
        self._deleted = Counter(
            "persist_archive_deleted_objects",
            "Archived objects deleted (DeleteJob, archive maxAge).",
            ["backend"], registry=registry,
        ).labels(backend)
        self._expired = Counter(
            "persist_archive_expired_jobs",
            "Archived jobs deleted from the archive for being older than its maxAge.",
            ["backend"], registry=registry,
        ).labels(backend)

    def uploaded(self, nbytes: int) -> None:
        self._uploaded_bytes.inc(nbytes)
        self._uploaded_segments.inc()

    def upload_error(self) -> None:
        self._errors.inc()

    def deleted(self, count: int) -> None:
        self._deleted.inc(count)

    def expired(self, count: int) -> None:
        self._expired.inc(count)


class CloudWatchMetrics:
    """The metrics of the CloudWatch backend (archive.cloudwatch); reactor thread.

    ``source`` (the CloudWatchShipper) is read at scrape time for the backlog gauges.
    """

    def __init__(self, registry: CollectorRegistry, source):
        Gauge("persist_cloudwatch_backlog_messages",
              "Stored messages the routes let go to CloudWatch and not yet shipped.",
              registry=registry).set_function(lambda: source.backlog_messages)
        Gauge("persist_cloudwatch_oldest_unshipped_seconds",
              "How long the stream waiting longest has had unshipped data (0: none).",
              registry=registry).set_function(source.oldest_unshipped_seconds)
        self._events = Counter("persist_cloudwatch_events_shipped",
                               "Log events accepted by PutLogEvents.", registry=registry)
        self._bytes = Counter("persist_cloudwatch_event_bytes_shipped",
                              "Bytes of accepted log events, as PutLogEvents counts them.",
                              registry=registry)
        self._datums = Counter("persist_cloudwatch_metric_datums_shipped",
                               "Metric data points sent through PutMetricData.",
                               registry=registry)
        self._out_of_range = Counter(
            "persist_cloudwatch_out_of_range_messages",
            "Messages not sent because CloudWatch refuses their timestamp (older than 14 days "
            "or over 2 hours ahead); they stay in local storage.", registry=registry)
        self._rejected = Counter(
            "persist_cloudwatch_rejected_events",
            "Events CloudWatch accepted the request of but refused (rejectedLogEventsInfo).",
            registry=registry)
        self._errors = Counter(
            "persist_cloudwatch_errors",
            "Failed CloudWatch calls: retryable (throttling, 5xx, connection) or refused "
            "(any other error); both are retried with backoff.", ["kind"], registry=registry)
        for kind in ("retryable", "refused"):
            self._errors.labels(kind)  # exported at 0 from the start, for alert rules
        self._deleted = Counter("persist_cloudwatch_deleted_streams",
                                "Log streams deleted (DeleteJob).", registry=registry)

    def shipped(self, events: int, nbytes: int) -> None:
        self._events.inc(events)
        self._bytes.inc(nbytes)

    def datums(self, n: int) -> None:
        self._datums.inc(n)

    def out_of_range(self, n: int) -> None:
        self._out_of_range.inc(n)

    def rejected(self, n: int) -> None:
        self._rejected.inc(n)

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def deleted(self, n: int) -> None:
        self._deleted.inc(n)


def _monotonic() -> float:
    import time

    return time.monotonic()


class _HotCollector:
    """Exports the plain-int counters kept on the hot paths."""

    def __init__(self, metrics: PersistMetrics):
        self._m = metrics

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        m = self._m
        received = CounterMetricFamily(
            "persist_ipc_messages_received",
            "IPC frames received, by message type (including rejected ones).",
            labels=["type"],
        )
        for name, value in sorted(m._received.items()):
            received.add_metric([name], value)
        yield received
        yield CounterMetricFamily(
            "persist_ipc_bytes_received",
            "IPC frame bytes received.",
            value=m._received_bytes,
        )
        rejected = CounterMetricFamily(
            "persist_ipc_frames_rejected",
            "IPC frames rejected, by reason; nothing else is lost with them.",
            labels=["reason"],
        )
        for reason, value in sorted(m._rejected.items()):
            rejected.add_metric([reason], value)
        yield rejected
        events_rejected = CounterMetricFamily(
            "persist_ipc_events_rejected",
            "Telemetry event frames rejected, by event kind and reason (also counted in "
            "persist_ipc_frames_rejected).",
            labels=["kind", "reason"],
        )
        for (kind, reason), value in sorted(m._events_rejected.items()):
            events_rejected.add_metric([kind, reason], value)
        yield events_rejected
        if m._event_source is not None:
            stored = GaugeMetricFamily(
                "persist_events_stored",
                "Telemetry events stored, by event kind, over every job in the job index.",
                labels=["kind"],
            )
            for kind, value in sorted(m._event_source().items()):
                stored.add_metric([kind], value)
            yield stored
        yield GaugeMetricFamily(
            "persist_ipc_connections", "Open IPC connections.", value=m._connections
        )
        yield CounterMetricFamily(
            "persist_ipc_socket_recreated",
            "Times the IPC socket file was found deleted and the listener recreated at its path.",
            value=m._ipc_socket_recreated,
        )
        partial = m._partial_budget
        if partial is not None:
            yield GaugeMetricFamily(
                "persist_ipc_partial_bytes",
                "Bytes reserved by IPC frames still arriving (announced sizes).",
                value=partial.used,
            )
            if partial.limit is not None:
                yield GaugeMetricFamily(
                    "persist_ipc_partial_bytes_limit",
                    "ipc.maxPartialBytes: what frames still arriving may reserve in total.",
                    value=partial.limit,
                )
            yield GaugeMetricFamily(
                "persist_ipc_partial_waiting_connections",
                "IPC connections paused until the partial-frame budget frees.",
                value=partial.waiting,
            )
            yield CounterMetricFamily(
                "persist_ipc_partial_budget_waits",
                "Times a connection was paused because the partial-frame budget was used up.",
                value=partial.waits,
            )
        yield CounterMetricFamily(
            "persist_backpressure_seconds",
            "Time ingest spent paused by backpressure.",
            value=m.backpressure_seconds(),
        )
        if m._health_source is not None:
            yield GaugeMetricFamily(
                "persist_healthy",
                "1 when every health check passes (the verdict of /health and Ping).",
                value=1 if m._health_source.healthy else 0,
            )
            checks = GaugeMetricFamily(
                "persist_health_check_ok", "1 when the named health check passes.",
                labels=["check"],
            )
            for name, detail in sorted(m._health_source.details.items()):
                checks.add_metric([name], 1 if detail.get("ok") else 0)
            yield checks
        if m._loaded_source is not None:
            loaded, unloaded = m._loaded_source()
            yield GaugeMetricFamily(
                "persist_jobs_loaded",
                "Jobs whose state is in memory (used within storage.unloadIdleAfter).",
                value=loaded,
            )
            yield CounterMetricFamily(
                "persist_jobs_unloaded",
                "Idle jobs whose in-memory state was dropped (reloaded from files on next use).",
                value=unloaded,
            )
        budget = m._file_budget
        if budget is not None:
            yield GaugeMetricFamily(
                "persist_query_open_files",
                "Segment files queries hold open now.",
                value=budget.in_use,
            )
            yield GaugeMetricFamily(
                "persist_query_open_files_limit",
                "Files queries may hold open at once: storage.maxOpenFiles less the pool's share.",
                value=budget.limit,
            )
            yield CounterMetricFamily(
                "persist_query_open_file_waits",
                "Times a query waited for another to close a file (the limit was reached).",
                value=budget.waits,
            )
        if m._storage_source is not None:
            jobs, nbytes = m._storage_source()
            yield GaugeMetricFamily("persist_jobs", "Jobs with stored data.", value=jobs)
            # Was persist_storage_bytes_total (a gauge with a counter's suffix): renamed, see
            # docs/operations.md "Renamed metrics".
            yield GaugeMetricFamily(
                "persist_storage_bytes",
                "Bytes on disk under the data directory for job data.",
                value=nbytes,
            )
