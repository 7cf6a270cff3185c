"""IPC ingest: frames from joblet-core on the Unix socket, validated and handed to the writer.

Everything in this module runs on the reactor thread.

Wire format (WIRE.md section 1): a 4-byte big-endian unsigned length N, then N bytes of a
serialized ``joblet.ipc.IPCMessage``; frames split anywhere, several arrive per read.

Per frame, checks in this order; the first that fails rejects the frame with a reason, counted
through ``metrics.frame_rejected(reason)`` and logged at most once per reason per
``reject_log_interval`` seconds (with the number of rejections not logged).  The connection
keeps reading after any rejection:

- ``oversized``: the length prefix exceeds ``max_frame_bytes``.  The frame's bytes are skipped
  as they arrive (nothing is buffered), so the stream stays in sync and nothing else is lost.
- ``bad_envelope``: the bytes do not parse as an IPCMessage.
- ``unsupported_type``: types 3..9 (eBPF telemetry), received but not stored yet.
- ``unknown_type``: type 0 or a number this version does not know (an empty frame is type 0).
- ``invalid_job_id``: the envelope's ``job_uuid`` (the routing key; the payload's copy is
  ignored) is not a safe job id (``storage.api.is_valid_job_id``).
- ``bad_payload``: ``data`` does not parse as a LogLine (LOG) or a Metric (METRIC).
- ``invalid_stream``: a LogLine whose stream is not 1 (stdout) or 2 (stderr).
- ``stopping``: the writer is stopping and accepts nothing more.
- ``truncated_frame``: the connection closed in the middle of a frame.
- ``too_many_connections`` (not a frame): a connection beyond ``max_connections`` was refused.

Accepted LOG frames go to ``writer.add_log(job, stream, timestamp, sequence, content)`` with
timestamp and sequence from the LogLine payload.  METRIC payloads are parsed here, on the
reactor thread, so that a payload storage could not convert never reaches (and blocks) a
storage batch; samples are rare (about one per second per job), so this costs little.  They go
to ``writer.add_metric(job, timestamp, sequence, payload)`` with the payload bytes as received
and timestamp/sequence from the Metric payload, or from the envelope when the payload's
timestamp is 0 (unset).

Counting received frames (``persist_ipc_messages_received_total``): LOG frames on the fast path
are counted in local integers and reported once per read through
``metrics.frames_received({1: count}, nbytes)``; every other frame whose envelope decodes is
reported through ``metrics.frame_received(msg_type, nbytes)``.  Both count rejected frames too,
except ``bad_envelope`` ones (they have no type); ``nbytes`` is the frame's length without its
prefix.  Implementations must be cheap (integer increments read by a collector).

Speed: the receive loop scans each read with ``struct.unpack_from`` at an offset, never
re-slicing the whole buffer; a frame incomplete at the end of a read is collected as a list of
chunks and joined once, so a multi-MiB frame split over many reads costs linear time.  LOG
frames are decoded with one protobuf parse of a private message type identical to IPCMessage
except that field 6 is typed as an embedded LogLine (same wire type as ``bytes``); anything that
does not parse that way, and every other type, takes the plain two-step decode.  The results are
the same, except for an envelope that repeats field 6 (no encoder does): the fused parse merges
the occurrences where the plain one keeps the last.
"""

from __future__ import annotations

import struct
from typing import Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from twisted.internet import defer, protocol
from twisted.protocols.basic import Int32StringReceiver

from joblet_persist._proto import ipc_pb2
from joblet_persist.logs import Logger
from joblet_persist.storage.api import is_valid_job_id
from joblet_persist.writer import WriterStopped

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "IngestFactory",
    "IngestProtocol",
    "NullIngestMetrics",
    "RejectionLog",
]

DEFAULT_MAX_FRAME_BYTES = 128 * 1024 * 1024

MSG_LOG = 1
MSG_METRIC = 2
_UNSUPPORTED_TYPES = range(3, 10)

_HEADER = struct.Struct(">I")

log = Logger()


def _build_log_envelope():
    """IPCMessage with ``data`` (field 6) declared as an embedded LogLine.

    Built from the generated descriptors, so field numbers and types stay those of
    proto/ipc.proto.  Parsing a LOG frame with it decodes envelope and payload in one call.
    """
    src = descriptor_pb2.FileDescriptorProto()
    ipc_pb2.DESCRIPTOR.CopyToProto(src)
    package = "joblet_persist.ingest_fused"
    fused = descriptor_pb2.FileDescriptorProto(
        name="joblet_persist/ingest_fused.proto", package=package, syntax=src.syntax
    )
    fused.enum_type.extend(src.enum_type)
    for msg in src.message_type:
        if msg.name not in ("IPCMessage", "LogLine"):
            continue
        copy = fused.message_type.add()
        copy.CopyFrom(msg)
        for field in copy.field:
            if field.type_name:
                field.type_name = field.type_name.replace(f".{src.package}.", f".{package}.")
            if msg.name == "IPCMessage" and field.number == 6:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                field.type_name = f".{package}.LogLine"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fused)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.IPCMessage"))


_LogEnvelope = _build_log_envelope()
_parse_log_envelope = _LogEnvelope.FromString
_parse_envelope = ipc_pb2.IPCMessage.FromString
_parse_log_line = ipc_pb2.LogLine.FromString
_parse_metric = ipc_pb2.Metric.FromString


class NullIngestMetrics:
    """The ingest metrics interface, doing nothing.  Reactor thread.

    ``joblet_persist.metrics.PersistMetrics`` implements it with plain integer counters.
    """

    def frame_received(self, msg_type: int, nbytes: int) -> None:
        """One frame of ``msg_type`` (``nbytes`` long) was read; it may still be rejected."""

    def frames_received(self, counts: dict[int, int], nbytes: int) -> None:
        """Bulk form: ``counts`` maps message type to frames read, ``nbytes`` their total."""

    def frame_rejected(self, reason: str) -> None:
        """A frame (or a connection, ``too_many_connections``) was rejected."""

    def connection_opened(self) -> None:
        """An IPC connection was accepted."""

    def connection_closed(self) -> None:
        """An accepted IPC connection closed."""


class RejectionLog:
    """Counts rejections by reason and logs them at a bounded rate.  Reactor thread.

    At most one log line per reason per ``interval`` seconds of ``clock``; the line reports
    how many rejections of that reason were not logged since the previous line.
    """

    def __init__(self, clock, metrics=None, interval: float = 60.0):
        self._clock = clock
        self._metrics = metrics if metrics is not None else NullIngestMetrics()
        self._interval = interval
        # reason -> [time of the last line, rejections not logged since]
        self._state: dict[str, list] = {}

    def reject(self, reason: str, detail: str) -> None:
        """Count one rejection of ``reason``; log it unless one was logged recently."""
        self._metrics.frame_rejected(reason)
        now = self._clock.seconds()
        state = self._state.get(reason)
        if state is not None and now - state[0] < self._interval:
            state[1] += 1
            return
        suppressed = state[1] if state is not None else 0
        self._state[reason] = [now, 0]
        log.warn(
            "rejected IPC input ({reason}): {detail}; {suppressed} more {reason} rejections "
            "since the previous report",
            reason=reason,
            detail=detail,
            suppressed=suppressed,
        )


class _JobIdCache:
    """Job ids already known to be valid, bounded in size.  Reactor thread."""

    __slots__ = ("ids", "max_size")

    def __init__(self, max_size: int = 4096):
        self.ids: set[str] = set()
        self.max_size = max_size

    def admit(self, job_id: str) -> bool:
        if not is_valid_job_id(job_id):
            return False
        ids = self.ids
        if len(ids) >= self.max_size:
            ids.clear()
        ids.add(job_id)
        return True


class IngestProtocol(Int32StringReceiver):
    """One joblet-core connection: frames in, ``writer.add_log``/``add_metric`` out.

    Reactor thread.  Keeps Int32StringReceiver's interface (``MAX_LENGTH``,
    ``stringReceived`` for one frame, ``lengthLimitExceeded``) with a faster ``dataReceived``.
    Pausing is done on the transport (``pauseProducing`` stops reads); frames of a read
    already received are always delivered.
    """

    def __init__(
        self,
        writer,
        rejections: RejectionLog,
        metrics=None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        job_ids: Optional[_JobIdCache] = None,
    ):
        self.MAX_LENGTH = max_frame_bytes
        self._add_log = writer.add_log
        self._add_metric = writer.add_metric
        self._reject = rejections.reject
        metrics = metrics if metrics is not None else NullIngestMetrics()
        self._frame_received = metrics.frame_received
        self._frames_received = getattr(metrics, "frames_received", None) or self._bulk_fallback
        self._job_ids = job_ids if job_ids is not None else _JobIdCache()
        self._valid_ids = self._job_ids.ids
        # Receive state between reads; at most one of these is set.
        self._head = b""  # 1-3 bytes of a length prefix
        self._chunks: list[bytes] = []  # parts of the current frame's body ...
        self._need = 0  # ... and how many body bytes are still missing
        self._skip = 0  # bytes of an oversized frame still to be skipped
        self._lost_waiters: list[defer.Deferred] = []

    def _bulk_fallback(self, counts: dict[int, int], nbytes: int) -> None:
        # Metrics objects without the bulk method: spread the bytes over single calls.
        for msg_type, count in counts.items():
            for i in range(count):
                self._frame_received(msg_type, nbytes // count + (i < nbytes % count))

    # -- receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split ``data`` into frames and handle each.  Reactor thread, once per read."""
        off = 0
        if self._need:
            need = self._need
            n = len(data)
            if n < need:
                self._chunks.append(data)
                self._need = need - n
                return
            chunks = self._chunks
            chunks.append(data[:need] if n > need else data)
            self._chunks = []
            self._need = 0
            self.stringReceived(b"".join(chunks))
            if n == need:
                return
            off = need
        elif self._skip:
            n = len(data)
            if n <= self._skip:
                self._skip -= n
                return
            off = self._skip
            self._skip = 0
        elif self._head:
            data = self._head + data
            self._head = b""

        end = len(data)
        unpack_from = _HEADER.unpack_from
        parse = _parse_log_envelope
        valid_ids = self._valid_ids
        add_log = self._add_log
        max_length = self.MAX_LENGTH
        nlog = 0
        nlog_bytes = 0
        try:
            while end - off >= 4:
                (length,) = unpack_from(data, off)
                start = off + 4
                stop = start + length
                if length > max_length:
                    self.lengthLimitExceeded(length)
                    if stop > end:
                        self._skip = stop - end
                        off = end
                        break
                    off = stop
                    continue
                if stop > end:
                    # Incomplete: keep the body part received so far, join it when complete.
                    self._chunks = [data[start:]]
                    self._need = stop - end
                    off = end
                    break
                frame = data[start:stop]
                off = stop
                try:
                    env = parse(frame)
                except DecodeError:
                    self._decode_slowly(frame)
                    continue
                if env.type != MSG_LOG:
                    self._decode_slowly(frame)
                    continue
                nlog += 1
                nlog_bytes += length
                job_id = env.job_uuid
                if job_id not in valid_ids and not self._admit(job_id):
                    continue
                line = env.data
                stream = line.stream
                if stream != 1 and stream != 2:
                    self._reject("invalid_stream", f"LogLine stream {stream} for job {job_id}")
                    continue
                try:
                    add_log(job_id, stream, line.timestamp, line.sequence, line.content)
                except WriterStopped:
                    self._reject("stopping", f"LOG for job {job_id} after the writer stopped")
        finally:
            if nlog:
                self._frames_received({MSG_LOG: nlog}, nlog_bytes)
        if off < end:
            self._head = data[off:]

    def stringReceived(self, frame: bytes) -> None:
        """Handle one complete frame (without its length prefix).  Reactor thread."""
        try:
            env = _parse_log_envelope(frame)
        except DecodeError:
            self._decode_slowly(frame)
            return
        if env.type != MSG_LOG:
            self._decode_slowly(frame)
            return
        self._frames_received({MSG_LOG: 1}, len(frame))
        job_id = env.job_uuid
        if job_id not in self._valid_ids and not self._admit(job_id):
            return
        line = env.data
        self._accept_log(job_id, line)

    def lengthLimitExceeded(self, length: int) -> None:
        """A length prefix above ``MAX_LENGTH``: count it; its bytes are skipped, not read."""
        self._reject("oversized", f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH}")

    def _decode_slowly(self, frame: bytes) -> None:
        """Every frame that is not a well-formed LOG frame: decode envelope, then payload."""
        try:
            env = _parse_envelope(frame)
        except DecodeError:
            self._reject("bad_envelope", f"{len(frame)}-byte frame is not an IPCMessage")
            return
        msg_type = env.type
        self._frame_received(msg_type, len(frame))
        if msg_type == MSG_LOG:
            job_id = env.job_uuid
            if job_id not in self._valid_ids and not self._admit(job_id):
                return
            try:
                line = _parse_log_line(env.data)
            except DecodeError:
                self._reject("bad_payload", f"LOG payload for job {job_id} is not a LogLine")
                return
            self._accept_log(job_id, line)
        elif msg_type == MSG_METRIC:
            job_id = env.job_uuid
            if job_id not in self._valid_ids and not self._admit(job_id):
                return
            payload = env.data
            try:
                metric = _parse_metric(payload)
            except DecodeError:
                self._reject("bad_payload", f"METRIC payload for job {job_id} is not a Metric")
                return
            if metric.timestamp:
                timestamp, sequence = metric.timestamp, metric.sequence
            else:
                timestamp, sequence = env.timestamp, env.sequence
            try:
                self._add_metric(job_id, timestamp, sequence, payload)
            except WriterStopped:
                self._reject("stopping", f"METRIC for job {job_id} after the writer stopped")
        elif msg_type in _UNSUPPORTED_TYPES:
            self._reject("unsupported_type", f"message type {msg_type} is not stored yet")
        else:
            self._reject("unknown_type", f"message type {msg_type}")

    def _accept_log(self, job_id: str, line) -> None:
        stream = line.stream
        if stream != 1 and stream != 2:
            self._reject("invalid_stream", f"LogLine stream {stream} for job {job_id}")
            return
        try:
            self._add_log(job_id, stream, line.timestamp, line.sequence, line.content)
        except WriterStopped:
            self._reject("stopping", f"LOG for job {job_id} after the writer stopped")

    def _admit(self, job_id: str) -> bool:
        if self._job_ids.admit(job_id):
            return True
        self._reject("invalid_job_id", f"job id {job_id[:160]!r}")
        return False

    # -- connection and producer --------------------------------------------

    def connectionMade(self) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory._connection_made(self)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        """Count a frame cut off by the close; complete frames were delivered on arrival."""
        if self._head or self._need:
            have = len(self._head) or sum(map(len, self._chunks))
            self._reject("truncated_frame", f"connection closed with {have} bytes of a frame")
        self._head = b""
        self._chunks = []
        self._need = 0
        self._skip = 0
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory._connection_lost(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def pauseProducing(self) -> None:
        """Stop reading from the transport.  Frames already received are still delivered."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Read from the transport again."""
        self.paused = False
        self.transport.resumeProducing()


class IngestFactory(protocol.Factory):
    """Builds IngestProtocols for the IPC listener and tracks the live ones.  Reactor thread.

    Refuses connections beyond ``max_connections`` (``buildProtocol`` returns None, so the
    listening port closes the socket at once; counted as ``too_many_connections``).
    ``pause_all``/``resume_all`` are the writer's backpressure hooks; while paused, new
    connections start paused.
    """

    noisy = False

    def __init__(
        self,
        writer,
        metrics=None,
        clock=None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_connections: int = 1024,
        *,
        reject_log_interval: float = 60.0,
        job_id_cache_size: int = 4096,
    ):
        if clock is None:
            raise TypeError("IngestFactory needs a clock (the reactor or task.Clock)")
        self._writer = writer
        self._metrics = metrics if metrics is not None else NullIngestMetrics()
        self._clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.rejections = RejectionLog(clock, self._metrics, reject_log_interval)
        self._job_ids = _JobIdCache(job_id_cache_size)
        self._protocols: dict[IngestProtocol, None] = {}
        self._paused = False

    @property
    def paused(self) -> bool:
        """True between ``pause_all()`` and ``resume_all()``."""
        return self._paused

    def connection_count(self) -> int:
        """Number of live connections."""
        return len(self._protocols)

    def buildProtocol(self, addr) -> Optional[IngestProtocol]:
        if len(self._protocols) >= self.max_connections:
            self.rejections.reject(
                "too_many_connections",
                f"refused a connection: {self.max_connections} are already open",
            )
            return None
        p = IngestProtocol(
            self._writer,
            self.rejections,
            self._metrics,
            self.max_frame_bytes,
            self._job_ids,
        )
        p.factory = self
        return p

    def _connection_made(self, p: IngestProtocol) -> None:
        self._protocols[p] = None
        self._metrics.connection_opened()
        if self._paused:
            _pause(p.transport)

    def _connection_lost(self, p: IngestProtocol) -> None:
        if p in self._protocols:
            del self._protocols[p]
            self._metrics.connection_closed()

    def pause_all(self) -> None:
        """Stop reading on every connection, and on new ones until ``resume_all``."""
        self._paused = True
        for p in self._protocols:
            _pause(p.transport)

    def resume_all(self) -> None:
        """Read again on every connection."""
        self._paused = False
        for p in self._protocols:
            _resume(p.transport)

    def disconnect_all(self) -> defer.Deferred:
        """Close every connection; Deferred firing when all of them have closed.

        Frames completely received before the close have been handed to the writer already;
        a frame cut off is counted as ``truncated_frame``.
        """
        waits = []
        for p in list(self._protocols):
            d = defer.Deferred()
            p._lost_waiters.append(d)
            waits.append(d)
            p.transport.loseConnection()
        if not waits:
            return defer.succeed(None)
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _pause(transport) -> None:
    if transport is not None and not getattr(transport, "disconnecting", False):
        transport.pauseProducing()


def _resume(transport) -> None:
    if transport is not None and not getattr(transport, "disconnecting", False):
        transport.resumeProducing()
