"""Test doubles shared by the test suites.

- FakeStorage: an in-memory StorageBackend that implements the contract of
  ``joblet_persist.storage.api`` faithfully (arrival-order merging, inclusive
  time range on bounds > 0, then offset, then limit, snapshots that never
  change, jobs that must be opened before their snapshot is visible).  Each
  appended batch is one "member", so ReadStats counts are meaningful.
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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import grpc
from twisted.internet import defer, task

from joblet_persist._proto import ipc_pb2
from joblet_persist.storage.api import (
    LOG_STREAMS,
    JobInfo,
    JobSnapshot,
    LogBatch,
    LogRecord,
    MetricBatch,
    MetricRecord,
    ReadStats,
    StorageBackend,
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
    """The stored JSON object of a serialized ipc Metric (WIRE.md snake_case keys)."""
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


@dataclass(frozen=True)
class _Member:
    """One appended batch: a stream (0 for metrics) and its records in arrival order."""

    stream: int
    arrivals: tuple
    records: tuple
    corrupt: bool = False

    @property
    def size(self) -> int:
        if self.stream:
            return _MEMBER_OVERHEAD + sum(len(r.content) for r in self.records)
        return _MEMBER_OVERHEAD + 100 * len(self.records)


def _in_range(ts: int, start: int, end: int) -> bool:
    return (start <= 0 or ts >= start) and (end <= 0 or ts <= end)


def _check_page(offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise ValueError(f"offset and limit must be >= 0, got {offset}, {limit}")


def _iter_members(members, start, end, offset, limit, stats, cancelled):
    """Yield matching records of ``members`` merged in arrival order.

    Which records match is decided from per-record timestamps alone (what a
    member header holds), so members before the offset or outside the range
    are skipped without being "inflated"; each member that yields a record
    counts as inflated once.
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
                inflated.add(index)
                stats.members_inflated += 1
            yield record
    finally:
        stats.members_skipped += len(usable) - len(inflated)


class FakeSnapshot(JobSnapshot):
    """An immutable view of a FakeStorage job.  Any thread."""

    def __init__(self, job_id: str, info: JobInfo, logs: tuple, metrics: tuple):
        self.job_id = job_id
        self.info = info
        self._logs = logs
        self._metrics = metrics

    def iter_logs(
        self,
        stream,
        start_time=0,
        end_time=0,
        offset=0,
        limit=0,
        stats=None,
        cancelled=lambda: False,
    ):
        if stream not in (0, 1, 2):
            raise ValueError(f"invalid stream {stream!r}")
        _check_page(offset, limit)
        members = [m for m in self._logs if stream == 0 or m.stream == stream]
        return _iter_members(members, start_time, end_time, offset, limit, stats, cancelled)

    def iter_metrics(
        self, start_time=0, end_time=0, offset=0, limit=0, stats=None, cancelled=lambda: False
    ):
        _check_page(offset, limit)
        return _iter_members(
            list(self._metrics), start_time, end_time, offset, limit, stats, cancelled
        )


@dataclass
class _Job:
    created_at: int
    last_updated: int
    logs: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    def info(self, job_id: str) -> JobInfo:
        timestamps = [r.timestamp for m in self.logs + self.metrics for r in m.records]
        return JobInfo(
            job_id=job_id,
            created_at=self.created_at,
            last_updated=self.last_updated,
            log_count=sum(len(m.records) for m in self.logs),
            metric_count=sum(len(m.records) for m in self.metrics),
            size_bytes=sum(m.size for m in self.logs + self.metrics),
            first_timestamp=min(timestamps, default=0),
            last_timestamp=max(timestamps, default=0),
        )


class FakeStorage(StorageBackend):
    """In-memory StorageBackend.

    Reactor-side methods return already-fired Deferreds.  ``now`` gives Unix
    seconds for created_at/last_updated.  Jobs are "loaded" (their snapshot
    visible to ``snapshot()``) once appended to or opened; ``evict(job_id)``
    unloads one, as after a restart, so that ``open_job`` is needed again.
    """

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._jobs: dict[str, _Job] = {}
        self._loaded: dict[str, FakeSnapshot] = {}
        self._index: dict[str, JobInfo] = {}
        self.open_job_calls: list[str] = []
        self.deleted: list[str] = []
        self.running = False
        self.corrupt_next = False

    # reactor thread

    def start(self):
        self.running = True
        return defer.succeed(None)

    def stop(self):
        self.running = False
        return defer.succeed(None)

    def _job(self, job_id: str) -> _Job:
        check_job_id(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            now = int(self._now())
            job = self._jobs[job_id] = _Job(created_at=now, last_updated=now)
        return job

    def _publish(self, job_id: str) -> None:
        job = self._jobs[job_id]
        info = job.info(job_id)
        self._index[job_id] = info
        self._loaded[job_id] = FakeSnapshot(job_id, info, tuple(job.logs), tuple(job.metrics))

    def _member(self, stream, batch, records) -> _Member:
        if not (len(batch.timestamps) == len(batch.sequences) == len(batch.arrivals)):
            raise ValueError("batch columns differ in length")
        corrupt, self.corrupt_next = self.corrupt_next, False
        return _Member(stream, tuple(batch.arrivals), tuple(records), corrupt)

    def append_logs(self, batch: LogBatch):
        if batch.stream not in LOG_STREAMS:
            return defer.fail(ValueError(f"invalid stream {batch.stream!r}"))
        try:
            job = self._job(batch.job_id)
            member = self._member(
                batch.stream,
                batch,
                [
                    LogRecord(batch.stream, t, s, bytes(c))
                    for t, s, c in zip(
                        batch.timestamps, batch.sequences, batch.contents, strict=True
                    )
                ],
            )
        except ValueError as e:
            return defer.fail(e)
        job.logs.append(member)
        job.last_updated = int(self._now())
        self._publish(batch.job_id)
        return defer.succeed(member.size)

    def append_metrics(self, batch: MetricBatch):
        try:
            job = self._job(batch.job_id)
            member = self._member(
                0,
                batch,
                [
                    MetricRecord(t, s, metric_data(p))
                    for t, s, p in zip(
                        batch.timestamps, batch.sequences, batch.payloads, strict=True
                    )
                ],
            )
        except ValueError as e:
            return defer.fail(e)
        job.metrics.append(member)
        job.last_updated = int(self._now())
        self._publish(batch.job_id)
        return defer.succeed(member.size)

    def open_job(self, job_id: str):
        check_job_id(job_id)
        self.open_job_calls.append(job_id)
        if job_id not in self._jobs:
            return defer.succeed(None)
        if job_id not in self._loaded:
            self._publish(job_id)
        return defer.succeed(self._loaded[job_id])

    def delete_job(self, job_id: str):
        check_job_id(job_id)
        self.deleted.append(job_id)
        job = self._jobs.pop(job_id, None)
        self._loaded.pop(job_id, None)
        self._index.pop(job_id, None)
        freed = 0 if job is None else sum(m.size for m in job.logs + job.metrics)
        return defer.succeed(freed)

    def evict(self, job_id: str) -> None:
        """Forget the loaded snapshot (the index entry stays), as after a restart."""
        self._loaded.pop(job_id, None)

    # any thread

    def snapshot(self, job_id: str):
        return self._loaded.get(job_id)

    def job_info(self, job_id: str):
        return self._index.get(job_id)

    def list_jobs(self):
        return tuple(self._index.values())


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
