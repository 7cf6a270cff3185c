"""IPC ingest: frames from joblet-core on the Unix socket, validated and handed to the writer.

Everything in this module runs on the reactor thread.

Wire format (docs/wire.md section 1): a 4-byte big-endian unsigned length N, then N bytes of a
serialized ``joblet.ipc.IPCMessage``; frames split anywhere, several arrive per read.

Per frame, checks in this order; the first that fails rejects the frame with a reason, counted
through ``metrics.frame_rejected(reason)`` and logged at most once per reason per
``reject_log_interval`` seconds (with the number of rejections not logged).  The connection
keeps reading after any rejection:

- ``oversized``: the length prefix exceeds ``max_frame_bytes``.  The frame's bytes are skipped
  as they arrive (nothing is buffered), so the stream stays in sync and nothing else is lost.
- ``bad_envelope``: the bytes do not parse as an IPCMessage.
- ``unknown_type``: type 0 or a number this version does not know (an empty frame is type 0).
- ``invalid_job_id``: the envelope's ``job_uuid`` (the routing key; the payload's copy is
  ignored) is not a safe job id (``storage.api.is_valid_job_id``).
- ``bad_payload``: ``data`` does not parse as a LogLine (LOG), a Metric (METRIC) or its
  telemetry event message (types 3..9, ``events.check_event``).
- ``invalid_stream``: a LogLine whose stream is not 1 (stdout) or 2 (stderr).
- ``stopping``: the writer is stopping and accepts nothing more.
- ``truncated_frame``: the connection closed in the middle of a frame.
- ``too_many_connections`` (not a frame): a connection beyond ``max_connections`` was refused.
- ``over_budget``: a frame that spans reads announces more bytes than a connection may hold
  in a partial frame (``PartialFrameBudget``: the per-connection cap, or the whole global
  budget).  Refused before anything is buffered: its bytes are skipped as they arrive.
- ``stalled_frame`` (then the connection closes): the connection held part of a frame and
  sent nothing more for ``partial_frame_timeout`` seconds while it was free to send.

Accepted LOG frames go to the writer with timestamp and sequence from the LogLine payload: in
bulk, ``writer.add_logs(job, stream, timestamps, sequences, arrivals, contents)``, one call per
(job, stream) per read, when the writer has ``add_logs`` and its arrival counters as the dict
``writer.arrivals`` (BatchingWriter); otherwise one ``writer.add_log(job, stream, timestamp,
sequence, content)`` per frame, in frame order.  METRIC payloads are parsed here, on the
reactor thread, so that a payload storage could not convert never reaches (and blocks) a
storage batch; samples are rare (about one per second per job), so this costs little.  They go
to ``writer.add_metric(job, timestamp, sequence, payload)`` with the payload bytes as received
and timestamp/sequence from the Metric payload, or from the envelope when the payload's
timestamp is 0 (unset).  Telemetry event frames (types 3..9) are validated the same way with
``events.check_event`` (a cheap parse; the stored JSON line is built later on a pool thread)
and go to ``writer.add_event(job, kind name, timestamp, sequence, payload)``, timestamp and
sequence from the envelope, or from the payload when the envelope's timestamp is 0.

Counting received frames (``persist_ipc_messages_received_total``): LOG frames of the bulk path
are counted in local integers and reported once per read through
``metrics.frames_received({1: count}, nbytes)``; every other frame whose envelope decodes is
reported through ``metrics.frame_received(msg_type, nbytes)``.  Both count rejected frames too,
except ``bad_envelope`` ones (they have no type); ``nbytes`` is the frame's length without its
prefix.  Implementations must be cheap (integer increments read by a collector).

Speed: each read goes to ``framing.decode_log_frames`` (a C extension, or its pure-Python twin
when it is not built), which walks the frames at an offset, never re-slicing the buffer, and
collects the canonical LOG frames into per-(job, stream) columns with their arrival numbers
taken from ``writer.arrivals``; a job id is then validated once per group, and each group is one
``add_logs`` call.  Metric and event frames (any frame of canonical envelope and another type)
do not stop the walk: the decoder hands them back in its ``others`` list with the arrival number
each would have in frame order, and ``_handle_others`` validates and hands them over first (the
writer numbers them from the same counters, set to the decoder's number before each call), then
the groups; a rejected one frees its number and the job's later numbers move down, groups
included.  With a writer that has ``add_metrics`` and ``add_events`` (BatchingWriter), the
accepted ones go over in one call per (job, type) per read, and the decoder runs in its
grouped mode: metric and event frames whose payload is canonical (nearly all: what encoders
write) come back in per-(job, type) groups with their record time, validated in C, and go to
the writer with no per-frame Python at all; only the rest takes the ``others`` route.  The decoder stops at any other frame, which gets the plain two-step decode
(envelope, then payload) before the walk resumes after it; the results are those of the plain
decode frame by frame (the order of writer calls across files aside).  A frame incomplete at the end of a read is collected as a list of
chunks (its length prefix included) and joined once, so a multi-MiB frame split over many reads
costs linear time.

Memory held by frames still arriving (``PartialFrameBudget``, shared by every connection of a
factory): when a frame is incomplete at the end of a read, its whole announced size is
reserved before anything of it is kept.  A frame that can never fit (above the per-connection
cap or the global limit) is refused (``over_budget``) and skipped; one that does not fit now
pauses its connection (reads stop; at most that one read is held) until earlier reservations
are released, first come first served.  Frames of at most one read (``SMALL_FRAME_BYTES``)
never wait, so the bound is the budget plus one read (``READ_BYTES``) per connection.  A connection holding a
reservation is never paused for budget, so it can always finish its frame; one that stops
sending is closed after ``partial_frame_timeout`` (``stalled_frame``).  Frames complete within one read reserve
nothing and cost nothing extra.  The chunks of a frame are freed together when it completes
or the connection closes, and ``release_memory`` (glibc ``malloc_trim``) is asked to return
freed heap pages to the system once many bytes were released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from array import array
from bisect import bisect_right
from collections import OrderedDict
from typing import Callable, Optional

from google.protobuf.message import DecodeError
from twisted.internet import defer, protocol
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from joblet_persist import events
from joblet_persist._proto import ipc_pb2
from joblet_persist.framing import IMPLEMENTATION as DECODER_IMPLEMENTATION
from joblet_persist.framing import decode_log_frames
from joblet_persist.grouping import census_groups
from joblet_persist.logs import Logger
from joblet_persist.storage.api import is_valid_job_id
from joblet_persist.threads import reactor_only
from joblet_persist.writer import IBulkLogWriter, IBulkOtherWriter, IGroupWriter, WriterStopped

__all__ = [
    "EventTally",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_PARTIAL_BYTES",
    "DEFAULT_PARTIAL_FRAME_TIMEOUT",
    "PartialFrameBudget",
    "IngestFactory",
    "IngestProtocol",
    "NullIngestMetrics",
    "RejectionLog",
]

DEFAULT_MAX_FRAME_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_PARTIAL_BYTES = 256 * 1024 * 1024
DEFAULT_PARTIAL_FRAME_TIMEOUT = 30.0
#: Bytes asked of the transport per read (Twisted's default is 64 KiB).  Each read costs a
#: decoder call and one writer call per (job, stream or type) in it; with logs, metrics and
#: events interleaved a job has up to ten such groups per read, so larger reads spread that
#: over more frames (mixed traffic: about a third less reactor time per frame than with
#: 64 KiB reads, docs/performance.md).  A connection waiting for budget holds at most one read.
READ_BYTES = 256 * 1024
#: Frames up to this size (at most one read of the transport) are reserved even beyond the
#: budget: a connection waiting for budget holds that much anyway, and small frames split
#: across reads must not queue behind large ones.  So the memory bound is
#: ``ipc.maxPartialBytes`` plus one read (``READ_BYTES``) per connection.
SMALL_FRAME_BYTES = 65536
#: How long a refused connection keeps the connection check unhealthy.
REFUSAL_WINDOW = 60.0

MSG_LOG = 1
MSG_METRIC = 2
_EVENT_TYPES = range(3, 10)

_HEADER = struct.Struct(">I")

log = Logger()


_parse_envelope = ipc_pb2.IPCMessage.FromString
_parse_log_line = ipc_pb2.LogLine.FromString
_parse_metric = ipc_pb2.Metric.FromString
# Event type -> (kind name, the parse events.check_event does).
_EVENT_VIEWS = {t: (k.name, k.view_class.FromString) for t, k in events.KINDS_BY_TYPE.items()}
#: The IPC message types of the telemetry events, ascending.
_EVENT_TYPES = tuple(sorted(_EVENT_VIEWS))


class IIngestMetrics(Interface):
    """What ingest reports to.  Reactor thread.

    Every method is required: the protocol and the factory check the object they are given
    when they are built (``require_ingest_metrics``), so a missing method is an error there,
    not a count silently lost at run time.  ``joblet_persist.metrics.PersistMetrics``
    implements it with plain integer counters; ``NullIngestMetrics`` does nothing.
    """

    def frame_received(msg_type, nbytes):
        """One frame of ``msg_type`` (``nbytes`` long) was read; it may still be rejected."""

    def frames_received(counts, nbytes):
        """Bulk form: ``counts`` maps message type to frames read, ``nbytes`` their total."""

    def frame_rejected(reason):
        """A frame (or a connection, ``too_many_connections``) was rejected."""

    def event_rejected(kind, reason):
        """A telemetry event frame of ``kind`` was rejected for ``reason`` (also reported
        through ``frame_rejected``)."""

    def connection_opened():
        """An IPC connection was accepted."""

    def connection_closed():
        """An accepted IPC connection closed."""

    def set_partial_budget(budget):
        """``budget`` (PartialFrameBudget) is exported at scrape time."""


def require_ingest_metrics(metrics):
    """``metrics``, or NullIngestMetrics() for None; TypeError naming what is missing when
    the object lacks a method of IIngestMetrics (or takes other arguments)."""
    if metrics is None:
        return NullIngestMetrics()
    try:
        verifyObject(IIngestMetrics, metrics, tentative=True)
    except Invalid as e:
        raise TypeError(f"ingest metrics {type(metrics).__name__} do not implement "
                        f"IIngestMetrics: {e}") from None
    return metrics


@implementer(IIngestMetrics)
class NullIngestMetrics:
    """The ingest metrics interface (IIngestMetrics), doing nothing.  Reactor thread."""

    def frame_received(self, msg_type: int, nbytes: int) -> None:
        """One frame of ``msg_type`` (``nbytes`` long) was read; it may still be rejected."""

    def frames_received(self, counts: dict[int, int], nbytes: int) -> None:
        """Bulk form: ``counts`` maps message type to frames read, ``nbytes`` their total."""

    def frame_rejected(self, reason: str) -> None:
        """A frame (or a connection, ``too_many_connections``) was rejected."""

    def event_rejected(self, kind: str, reason: str) -> None:
        """A telemetry event frame of ``kind`` (``"exec"``, ...) was rejected for ``reason``
        (also reported through ``frame_rejected``)."""

    def connection_opened(self) -> None:
        """An IPC connection was accepted."""

    def connection_closed(self) -> None:
        """An accepted IPC connection closed."""

    def set_partial_budget(self, budget) -> None:
        """``budget`` (PartialFrameBudget) is exported at scrape time."""


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


class EventTally:
    """Telemetry event frames accepted and rejected, for the ``ipc_events`` health check.

    Reactor thread; plain counters, shared by every connection of a factory.  ``clock``
    (``seconds()``) dates the last rejection; it may be None (no dates).
    """

    def __init__(self, clock=None):
        self._clock = clock
        self.accepted: dict[str, int] = {}  # kind -> frames handed to the writer
        self.rejected: dict[tuple[str, str], int] = {}  # (kind, reason) -> frames
        self.last_rejected: Optional[tuple] = None  # (time or None, kind, reason)

    def accept(self, kind: str) -> None:
        """One event frame of ``kind`` went to the writer."""
        self.accepted[kind] = self.accepted.get(kind, 0) + 1

    def reject(self, kind: str, reason: str) -> None:
        """One event frame of ``kind`` was rejected for ``reason``."""
        key = (kind, reason)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        now = self._clock.seconds() if self._clock is not None else None
        self.last_rejected = (now, kind, reason)

    def check(self, window: float = REFUSAL_WINDOW) -> tuple:
        """Health check ``(ok, detail, extra)``: what happened to telemetry event frames.

        Always ok: a rejected frame is the sender's problem and loses nothing else (and the
        verdict answers joblet-core's Ping).  The detail says when events were rejected
        within ``window`` seconds, and the fields give the totals by kind and by reason.
        """
        accepted = sum(self.accepted.values())
        rejected = sum(self.rejected.values())
        detail = f"{accepted} telemetry events accepted, {rejected} rejected"
        ago = None
        last = self.last_rejected
        if last is not None:
            if last[0] is not None and self._clock is not None:
                ago = round(self._clock.seconds() - last[0], 3)
            if ago is not None and ago < window:
                detail = (
                    f"rejecting telemetry events (last: {last[1]} {last[2]}, {ago:.0f} s ago): "
                    + detail
                )
        by_reason: dict[str, int] = {}
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, reason), n in sorted(self.rejected.items()):
            by_reason[reason] = by_reason.get(reason, 0) + n
            by_kind.setdefault(kind, {})[reason] = n
        extra = {
            "accepted_total": accepted,
            "accepted_by_kind": dict(sorted(self.accepted.items())),
            "rejected_total": rejected,
            "rejected_by_reason": by_reason,
            "rejected_by_kind": by_kind,
            "last_rejected": None if last is None else {"kind": last[1], "reason": last[2]},
            "last_rejected_seconds_ago": ago,
        }
        return True, detail, extra


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_memory() -> None:
    """Ask the C allocator to give freed heap pages back to the system (glibc
    ``malloc_trim``; nothing elsewhere).  Reactor thread; takes milliseconds at most.

    The chunks of a partial frame are read-sized (up to ``READ_BYTES``) allocations on the
    heap, often below glibc's (dynamic) mmap threshold: freed, they stay in the process
    until trimmed.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class PartialFrameBudget:
    """Bytes that frames still arriving may hold, shared by the connections of one factory.
    Reactor thread.

    ``limit`` bounds the sum of reservations (None: unbounded, usage still counted), except
    that frames of at most ``SMALL_FRAME_BYTES`` are always reserved at once;
    ``per_connection`` bounds one connection's frame.  ``reserve(protocol, n)`` either
    reserves ``n`` bytes (True), or queues the protocol (False): ``protocol._budget_granted()``
    is called when its turn comes, in arrival order; ``release(n)`` returns a reservation.
    ``trim_after`` bytes released by frames larger than ``SMALL_FRAME_BYTES`` (summed)
    schedule one ``release_memory`` call, at most one per ``trim_interval`` seconds.
    """

    def __init__(
        self,
        limit: Optional[int] = None,
        per_connection: Optional[int] = None,
        *,
        clock=None,
        trim_after: int = 16 * 1024 * 1024,
        trim: Callable[[], None] = release_memory,
    ):
        self.limit = limit
        self.per_connection = per_connection
        caps = [c for c in (limit, per_connection) if c is not None]
        #: The largest frame that may ever be buffered.
        self.frame_limit = min(caps) if caps else None
        self.used = 0
        self.refused = 0
        self.waits = 0
        self.last_refused: Optional[float] = None
        self._clock = clock
        self._waiters: OrderedDict = OrderedDict()
        self._trim_after = trim_after
        self._trim = trim
        self._released = 0
        self._trim_call = None
        self._last_trim = float("-inf")
        #: Seconds between two trims at least.
        self.trim_interval = 1.0

    @property
    def waiting(self) -> int:
        """Connections paused until budget frees."""
        return len(self._waiters)

    def fits(self, n: int) -> bool:
        """Whether a frame needing ``n`` bytes may ever be buffered."""
        return self.frame_limit is None or n <= self.frame_limit

    @reactor_only
    def refuse(self) -> None:
        """Count a frame refused because it can never fit."""
        self.refused += 1
        if self._clock is not None:
            self.last_refused = self._clock.seconds()

    @reactor_only
    def reserve(self, proto, n: int) -> bool:
        limit = self.limit
        if (
            limit is None
            or n <= SMALL_FRAME_BYTES
            or (not self._waiters and self.used + n <= limit)
        ):
            self.used += n
            return True
        self._waiters[proto] = n
        self.waits += 1
        return False

    @reactor_only
    def cancel(self, proto) -> None:
        """Forget a queued protocol (it closed, or finished its frame anyway)."""
        self._waiters.pop(proto, None)

    @reactor_only
    def release(self, n: int) -> None:
        self.used -= n
        self._grant()
        if n <= SMALL_FRAME_BYTES:
            return  # small frames' memory is reused at once: nothing to give back
        self._released += n
        if self._released >= self._trim_after and self._clock is not None:
            self._released = 0
            if self._trim_call is None:
                # After the closes of this reactor turn (one trim for a burst of them), and
                # at most once per trim_interval.
                delay = max(0.0, self._last_trim + self.trim_interval - self._clock.seconds())
                self._trim_call = self._clock.callLater(delay, self._run_trim)

    def _run_trim(self) -> None:
        self._trim_call = None
        self._last_trim = self._clock.seconds()
        self._trim()

    @reactor_only
    def stop(self) -> None:
        """Cancel a pending trim (the listener stopped)."""
        if self._trim_call is not None and self._trim_call.active():
            self._trim_call.cancel()
        self._trim_call = None

    def _grant(self) -> None:
        waiters = self._waiters
        limit = self.limit
        while waiters:
            proto, n = next(iter(waiters.items()))
            if limit is not None and self.used + n > limit:
                return
            del waiters[proto]
            self.used += n
            proto._budget_granted(n)

    def check(self, window: float = REFUSAL_WINDOW) -> tuple:
        """Health check: not ok while connections wait for budget or a frame was refused
        within ``window`` seconds; ``(ok, detail, extra)``."""
        recent = (
            self.last_refused is not None
            and self._clock is not None
            and self._clock.seconds() - self.last_refused < window
        )
        ok = not self._waiters and not recent
        limit = "unbounded" if self.limit is None else str(self.limit)
        detail = (
            f"{self.used} of {limit} bytes reserved by partial frames; "
            f"{len(self._waiters)} connections waiting; {self.refused} frames refused"
        )
        if not ok:
            detail = "partial-frame budget exhausted (ipc.maxPartialBytes): " + detail
        extra = {
            "used_bytes": self.used,
            "limit_bytes": self.limit,
            "waiting_connections": len(self._waiters),
            "refused_frames": self.refused,
            "waits": self.waits,
        }
        return ok, detail, extra


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
    """One joblet-core connection: frames in, ``writer.add_logs``/``add_log``/``add_metric``/
    ``add_event`` out; ``writer`` provides ``writer.IIngestWriter``, ``metrics``
    IIngestMetrics (checked here: TypeError when a method is missing; None counts nothing).

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
        *,
        budget: Optional[PartialFrameBudget] = None,
        clock=None,
        partial_frame_timeout: float = DEFAULT_PARTIAL_FRAME_TIMEOUT,
        event_tally: Optional[EventTally] = None,
    ):
        self.MAX_LENGTH = max_frame_bytes
        # writer provides writer.IIngestWriter.
        self._add_log = writer.add_log
        self._add_metric = writer.add_metric
        self._add_event = writer.add_event
        self._decode_frames = decode_log_frames
        if IBulkLogWriter.providedBy(writer):
            self._add_logs = writer.add_logs
            self._arrivals = writer.arrivals
            self._decode = self._decode_bulk
        else:
            # A writer taking one message at a time: one frame per decoder call keeps its
            # calls in frame order (across jobs too), at the price of speed.
            self._add_logs = self._add_logs_singly
            self._arrivals = {}
            self._decode = self._decode_one
        self._reject = rejections.reject
        metrics = require_ingest_metrics(metrics)
        self._frame_received = metrics.frame_received
        self._frames_received = metrics.frames_received
        count_rejected = metrics.event_rejected
        tally = event_tally if event_tally is not None else EventTally(clock)
        tally_rejected = tally.reject

        def event_rejected(kind: str, reason: str) -> None:
            count_rejected(kind, reason)
            tally_rejected(kind, reason)

        self._event_rejected = event_rejected
        self._event_accepted = tally.accept
        self._events_accepted = tally.accepted
        # Bulk forms of add_metric and add_event, when the writer has them (BatchingWriter).
        bulk = IBulkOtherWriter.providedBy(writer)
        self._add_metrics = writer.add_metrics if bulk else None
        self._add_events = writer.add_events if bulk else None
        # With the bulk forms (and the bulk decode), the decoder also groups the metric and
        # event frames whose payload is canonical: no per-frame work for them here.
        self._grouped = bulk and self._decode == self._decode_bulk
        # One writer call per read for all the decoder's groups, when the writer takes that.
        self._add_groups = (
            writer.add_groups if self._grouped and IGroupWriter.providedBy(writer) else None
        )
        self._job_ids = job_ids if job_ids is not None else _JobIdCache()
        self._valid_ids = self._job_ids.ids
        # Receive state between reads; at most one of these is set.
        self._head = b""  # 1-3 bytes of a length prefix
        self._chunks: list[bytes] = []  # parts of the current frame, length prefix included ...
        self._need = 0  # ... and how many of its bytes are still missing
        self._skip = 0  # bytes of an oversized (or refused) frame still to be skipped
        self._lost_waiters: list[defer.Deferred] = []
        # Memory of the frame being received: its reservation, or the wait for one.
        self._budget = budget if budget is not None else PartialFrameBudget()
        self._reserved = 0
        self._waiting = False
        # Stalled frames: time of the last bytes of an incomplete frame, and one timer
        # that outlives frames (rescheduled lazily rather than per read).
        self._clock = clock
        self._stall_timeout = partial_frame_timeout if clock is not None else 0
        self._progress_at = 0.0
        self._stall_timer = None

    # -- receiving ---------------------------------------------------------

    @reactor_only
    def dataReceived(self, data: bytes) -> None:
        """Split ``data`` into frames and handle each.  Reactor thread, once per read."""
        off = 0
        if self._need:
            need = self._need
            n = len(data)
            if n < need:
                self._chunks.append(data)
                self._need = need - n
                if self._stall_timeout:
                    self._progress_at = self._clock.seconds()
                return
            chunks = self._chunks
            chunks.append(data[:need] if n > need else data)
            self._chunks = []
            self._need = 0
            frame = b"".join(chunks)
            del chunks[:]
            try:
                self._receive(frame, 0)
            finally:
                del frame
                self._frame_done()
            if n == need:
                return
            off = need
        elif self._skip:
            n = len(data)
            if n <= self._skip:
                self._skip -= n
                if self._stall_timeout:
                    self._progress_at = self._clock.seconds()
                return
            off = self._skip
            self._skip = 0
        elif self._head:
            data = self._head + data
            self._head = b""

        end = len(data)
        off = self._receive(data, off)
        if off < end:
            if end - off < 4:
                self._head = data[off:]
            else:
                # Incomplete: keep the part received so far (once its size is reserved),
                # join it when complete.
                (length,) = _HEADER.unpack_from(data, off)
                if self._hold(4 + length, end - off):
                    self._chunks = [data[off:]]
                    self._need = off + 4 + length - end
            if self._stall_timeout:
                self._touch()
        elif self._skip and self._stall_timeout:
            self._touch()

    def _hold(self, size: int, have: int) -> bool:
        """Reserve ``size`` bytes for the frame just begun, or wait for them (reads pause);
        False when it can never fit: refused, and its bytes skipped."""
        budget = self._budget
        if not budget.fits(size):
            budget.refuse()
            self._reject(
                "over_budget",
                f"frame of {size - 4} bytes exceeds what a partial frame may hold "
                f"({budget.frame_limit} bytes: ipc.maxPartialBytes, "
                "ipc.maxPartialBytesPerConnection)",
            )
            self._skip = size - have
            return False
        if budget.reserve(self, size):
            self._reserved = size
        else:
            self._waiting = True
            _pause(self.transport)
        return True

    def _frame_done(self) -> None:
        """The frame in progress completed: return its reservation."""
        if self._waiting:
            # It arrived anyway (drain reads on regardless): no longer waiting.
            self._waiting = False
            self._budget.cancel(self)
        reserved, self._reserved = self._reserved, 0
        if reserved:
            self._budget.release(reserved)

    def _budget_granted(self, size: int) -> None:
        """Called by the budget: ``size`` bytes are reserved for this connection's frame."""
        self._waiting = False
        self._reserved = size
        if self._stall_timeout:
            self._progress_at = self._clock.seconds()
        factory = getattr(self, "factory", None)
        if factory is None or not factory.paused:
            _resume(self.transport)

    def _touch(self) -> None:
        """An incomplete frame made progress; make sure its stall timer runs."""
        self._progress_at = self._clock.seconds()
        if self._stall_timer is None:
            self._stall_timer = self._clock.callLater(self._stall_timeout, self._check_stall)

    def _check_stall(self) -> None:
        """Close the connection if its incomplete frame made no progress for the timeout
        while it could send; otherwise look again when it could have timed out."""
        self._stall_timer = None
        if not (self._need or self._head or self._skip) or self.transport is None:
            return  # between frames: idle connections are normal
        now = self._clock.seconds()
        factory = getattr(self, "factory", None)
        if self._waiting or (factory is not None and factory.paused):
            # Paused by us (budget, backpressure): the peer cannot make progress.
            self._progress_at = now
        due = self._progress_at + self._stall_timeout
        if now < due:
            self._stall_timer = self._clock.callLater(due - now, self._check_stall)
            return
        have = len(self._head) or sum(map(len, self._chunks))
        self._reject(
            "stalled_frame",
            f"no progress for {self._stall_timeout:g} s with {have} bytes of a frame "
            "(ipc.partialFrameTimeout); closing the connection",
        )
        self.transport.loseConnection()

    @reactor_only
    def stringReceived(self, frame: bytes) -> None:
        """Handle one complete frame (without its length prefix).  Reactor thread."""
        self._receive(_HEADER.pack(len(frame)) + frame, 0)

    def _receive(self, data: bytes, off: int) -> int:
        """Handle every complete frame of ``data`` from ``off`` on; return where the incomplete
        rest begins (``len(data)`` when there is none, or when an oversized frame is being
        skipped past the end).  Reactor thread."""
        end = len(data)
        decode = self._decode
        max_length = self.MAX_LENGTH
        arrivals = self._arrivals
        counts: dict = {}  # frames of the decoder's groups per type ...
        grouped_bytes = 0  # ... and their bytes
        others: list = []
        try:
            while off < end:
                start = off
                off, groups, reason = decode(data, off, max_length, arrivals, others)
                if others:
                    # Frames of other types met between the LOG frames: first, so that the
                    # groups' arrival numbers can be renumbered if one of them is rejected.
                    other_bytes = self._handle_others(others, groups)
                    others = []
                else:
                    other_bytes = 0
                if groups:
                    n = self._deliver(groups, counts)
                    grouped_bytes += off - start - 4 * n - other_bytes
                if reason == "slow":
                    # Not a canonical LOG frame (complete unless oversized): the plain decode.
                    (length,) = _HEADER.unpack_from(data, off)
                    stop = off + 4 + length
                    if length > max_length:
                        self.lengthLimitExceeded(length)
                        if stop > end:
                            self._skip = stop - end
                            return end
                    else:
                        self._decode_slowly(data[off + 4 : stop])
                    off = stop
                elif reason == "partial":
                    break
        finally:
            if counts:
                self._frames_received(counts, grouped_bytes)
        return off

    def _handle_others(self, others: list, groups: dict) -> int:
        """Handle the decoder's ``others`` (frames of other types than LOG, in frame order)
        with the arrival numbers it gave them; return their bytes, length prefixes included.

        Each frame of a job that the writer takes gets the number the decoder gave it, by
        setting the job's counter to that number just before the writer's call (the writer
        numbers metric and event frames from the same ``arrivals`` counters).  A frame the
        writer does not take (rejected) frees its number: the job's later frames, its groups'
        LOG frames included, move down by one, so that a job's numbers stay 0, 1, 2, ... in
        frame order across all kinds, exactly as with the plain decode frame by frame."""
        arrivals = self._arrivals
        handle = self._handle_other
        valid_ids = self._valid_ids
        add_metric = self._add_metric
        add_event = self._add_event
        event_accepted = self._event_accepted
        ends: dict = {}  # job -> the decoder's next number for it
        freed: Optional[dict] = None  # job -> the numbers of its rejected frames, ascending
        nbytes = 0
        counts: dict = {}  # frames taken by the inline path, per type ...
        counted = 0  # ... and their bytes
        bulk = self._add_metrics is not None and self._add_events is not None
        pending: dict = {}  # (job, type) -> columns for the bulk writer calls
        for msg_type, job_id, timestamp, sequence, payload, length, arrival in others:
            nbytes += 4 + length
            if arrival is None:
                handle(msg_type, job_id, timestamp, sequence, payload, length)
                continue
            if job_id not in ends:
                ends[job_id] = arrivals.get(job_id, arrival + 1)
            number = arrival
            if freed is not None and job_id in freed:
                number -= len(freed[job_id])
            arrivals[job_id] = number
            if job_id in valid_ids:
                # Inline, for frames that are accepted: what _handle_other does, without its
                # calls.  Anything else goes to _handle_other before any side effect.
                try:
                    if msg_type == MSG_METRIC:
                        metric = _parse_metric(payload)
                        if metric.timestamp:
                            timestamp, sequence = metric.timestamp, metric.sequence
                    else:
                        view = _EVENT_VIEWS[msg_type][1](payload)
                        if not timestamp:
                            timestamp, sequence = view.timestamp, view.sequence
                except DecodeError:
                    pass
                else:
                    counts[msg_type] = counts.get(msg_type, 0) + 1
                    counted += length
                    if bulk:
                        # One writer call per (job, type) of the read, after the loop.
                        group = pending.get((job_id, msg_type))
                        if group is None:
                            group = pending[(job_id, msg_type)] = ([], [], [], [])
                        group[0].append(timestamp)
                        group[1].append(sequence)
                        group[2].append(number)
                        group[3].append(payload)
                        continue
                    try:
                        if msg_type == MSG_METRIC:
                            add_metric(job_id, timestamp, sequence, payload)
                        else:
                            name = _EVENT_VIEWS[msg_type][0]
                            add_event(job_id, name, timestamp, sequence, payload)
                            event_accepted(name)
                        continue
                    except WriterStopped:
                        counts[msg_type] -= 1
                        counted -= length
            if pending:
                # Earlier frames of the same (job, type) must reach the writer first.
                self._add_pending(pending)
                pending = {}
            if not handle(msg_type, job_id, timestamp, sequence, payload, length):
                if freed is None:
                    freed = {}
                freed.setdefault(job_id, []).append(arrival)
        if pending:
            self._add_pending(pending)
        if counts:
            self._frames_received(counts, counted)
        for job_id, end in ends.items():
            if not is_valid_job_id(job_id):
                arrivals.pop(job_id, None)  # never stored: as _deliver does
            elif freed is not None and job_id in freed:
                arrivals[job_id] = end - len(freed[job_id])
            else:
                arrivals[job_id] = end
        if freed is not None:
            for (job_id, _stream), columns in groups.items():
                gaps = freed.get(job_id)
                if gaps:
                    renumbered = [a - bisect_right(gaps, a) for a in columns[2]]
                    # A metric or event group's arrivals stay packed (array('q')).
                    columns[2] = (renumbered if type(columns[2]) is list
                                  else array("q", renumbered))
        return nbytes

    def _add_pending(self, pending: dict) -> None:
        """Hand the inline path's (job, type) columns to the writer's bulk calls."""
        for (job_id, msg_type), (timestamps, sequences, arrivals, payloads) in pending.items():
            n = len(timestamps)
            try:
                if msg_type == MSG_METRIC:
                    self._add_metrics(job_id, timestamps, sequences, arrivals, payloads)
                    continue
                name = _EVENT_VIEWS[msg_type][0]
                self._add_events(job_id, name, timestamps, sequences, arrivals, payloads)
            except WriterStopped:
                what = "METRIC" if msg_type == MSG_METRIC else f"{_EVENT_VIEWS[msg_type][0]} event"
                for _ in range(n):
                    self._reject("stopping", f"{what} for job {job_id} after the writer stopped")
                    if msg_type != MSG_METRIC:
                        self._event_rejected(what[:-6], "stopping")
                continue
            accepted = self._events_accepted
            accepted[name] = accepted.get(name, 0) + n

    def _decode_bulk(self, data: bytes, off: int, max_length: int, arrivals: dict, others):
        """``decode_log_frames`` going on past the other frames of canonical envelope (they
        land in ``others``, or, with a bulk writer for them, in the groups when their payload
        is canonical)."""
        return self._decode_frames(data, off, max_length, arrivals, others, self._grouped)

    def _decode_one(self, data: bytes, off: int, max_length: int, arrivals: dict, others=None):
        """``decode_log_frames`` limited to the frame at ``off`` (writers without
        ``add_logs``, whose arrival numbers are their own: ``arrivals`` and ``others`` are
        not used, every frame is handled in frame order)."""
        end = len(data)
        if end - off >= 4:
            (length,) = _HEADER.unpack_from(data, off)
            stop = off + 4 + length
            if length <= max_length and stop < end:
                new, groups, reason = self._decode_frames(data[off:stop], 0, max_length, {})
                return off + new, groups, reason
        return self._decode_frames(data, off, max_length, {})

    def _deliver(self, groups: dict, counts: dict) -> int:
        """Hand the decoder's groups to the writer, each job id validated once; return the
        number of frames in them, and add them to ``counts`` by type.  Reactor thread.

        With a writer that has ``add_groups``: every group of the read in one writer call
        (the groups of invalid job ids taken out and rejected first); otherwise one call per
        group."""
        add_groups = self._add_groups
        if add_groups is not None:
            return self._deliver_all(add_groups, groups, counts)
        valid_ids = self._valid_ids
        add_logs = self._add_logs
        total = 0
        for (job_id, stream), (timestamps, sequences, arrivals, contents) in groups.items():
            n = len(timestamps)
            total += n
            if stream < 0:
                # Metric (-2) or event (-3..-9) frames of canonical payload (grouped mode).
                counts[-stream] = counts.get(-stream, 0) + n
                self._deliver_other(job_id, -stream, timestamps, sequences, arrivals, contents)
                continue
            counts[MSG_LOG] = counts.get(MSG_LOG, 0) + n
            if job_id not in valid_ids and not self._job_ids.admit(job_id):
                # Never stored: forget the arrival numbers the decoder gave these frames.
                self._arrivals.pop(job_id, None)
                detail = f"job id {job_id[:160]!r}"
                for _ in range(n):
                    self._reject("invalid_job_id", detail)
                continue
            try:
                add_logs(job_id, stream, timestamps, sequences, arrivals, contents)
            except WriterStopped:
                detail = f"LOG for job {job_id} after the writer stopped"
                for _ in range(n):
                    self._reject("stopping", detail)
        return total

    def _deliver_all(self, add_groups, groups: dict, counts: dict) -> int:
        """``_deliver`` through the writer's ``add_groups``: what one call per group does
        (rejections, counts, accepted events), for all groups of the read at once."""
        total, per_type, unknown = census_groups(groups, self._valid_ids, counts)
        invalid = None
        for key in unknown:
            if not self._job_ids.admit(key[0]):
                if invalid is None:
                    invalid = []
                invalid.append(key)
        if invalid is not None:
            per_type = list(per_type)
            for key in invalid:
                job_id, code = key
                n = len(groups.pop(key)[0])
                per_type[-code if code < 0 else MSG_LOG] -= n
                # Never stored: forget the arrival numbers the decoder gave these frames.
                self._arrivals.pop(job_id, None)
                name = _EVENT_VIEWS[-code][0] if code < -MSG_METRIC else None
                detail = f"job id {job_id[:160]!r}"
                for _ in range(n):
                    self._reject("invalid_job_id", detail)
                    if name is not None:
                        self._event_rejected(name, "invalid_job_id")
            if not groups:
                return total
        try:
            add_groups(groups)
        except WriterStopped:
            for (job_id, code), columns in groups.items():
                name = _EVENT_VIEWS[-code][0] if code < -MSG_METRIC else None
                if code > 0:
                    what = "LOG"
                elif name is None:
                    what = "METRIC"
                else:
                    what = f"{name} event"
                detail = f"{what} for job {job_id} after the writer stopped"
                for _ in range(len(columns[0])):
                    self._reject("stopping", detail)
                    if name is not None:
                        self._event_rejected(name, "stopping")
            return total
        accepted = self._events_accepted
        for msg_type in _EVENT_TYPES:
            n = per_type[msg_type]
            if n:
                name = _EVENT_VIEWS[msg_type][0]
                accepted[name] = accepted.get(name, 0) + n
        return total

    def _deliver_other(self, job_id, msg_type, timestamps, sequences, arrivals, payloads):
        """One metric or event group of the decoder: what ``_handle_other`` does for each of
        its frames, in one writer call (their payloads are canonical, so valid)."""
        n = len(timestamps)
        name = None if msg_type == MSG_METRIC else _EVENT_VIEWS[msg_type][0]
        if job_id not in self._valid_ids and not self._job_ids.admit(job_id):
            self._arrivals.pop(job_id, None)  # never stored
            detail = f"job id {job_id[:160]!r}"
            for _ in range(n):
                self._reject("invalid_job_id", detail)
                if name is not None:
                    self._event_rejected(name, "invalid_job_id")
            return
        try:
            if name is None:
                self._add_metrics(job_id, timestamps, sequences, arrivals, payloads)
                return
            self._add_events(job_id, name, timestamps, sequences, arrivals, payloads)
        except WriterStopped:
            what = "METRIC" if name is None else f"{name} event"
            for _ in range(n):
                self._reject("stopping", f"{what} for job {job_id} after the writer stopped")
                if name is not None:
                    self._event_rejected(name, "stopping")
            return
        accepted = self._events_accepted
        accepted[name] = accepted.get(name, 0) + n

    def _add_logs_singly(self, job_id, stream, timestamps, sequences, arrivals, contents):
        """``add_logs`` for writers that only have ``add_log`` (groups of one frame)."""
        add_log = self._add_log
        for timestamp, sequence, content in zip(timestamps, sequences, contents, strict=True):
            add_log(job_id, stream, timestamp, sequence, content)

    @reactor_only
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
        if msg_type == MSG_LOG:
            self._frame_received(msg_type, len(frame))
            job_id = env.job_uuid
            if job_id not in self._valid_ids and not self._admit(job_id):
                return
            try:
                line = _parse_log_line(env.data)
            except DecodeError:
                self._reject("bad_payload", f"LOG payload for job {job_id} is not a LogLine")
                return
            self._accept_log(job_id, line)
        else:
            self._handle_other(
                msg_type, env.job_uuid, env.timestamp, env.sequence, env.data, len(frame)
            )

    def _handle_other(
        self, msg_type: int, job_id: str, env_timestamp: int, env_sequence: int,
        payload: bytes, nbytes: int,
    ) -> None:
        """A frame of another type than LOG whose envelope decoded (``nbytes`` long); True
        when the writer took it."""
        self._frame_received(msg_type, nbytes)
        if msg_type == MSG_METRIC:
            if job_id not in self._valid_ids and not self._admit(job_id):
                return False
            try:
                metric = _parse_metric(payload)
            except DecodeError:
                self._reject("bad_payload", f"METRIC payload for job {job_id} is not a Metric")
                return False
            if metric.timestamp:
                timestamp, sequence = metric.timestamp, metric.sequence
            else:
                timestamp, sequence = env_timestamp, env_sequence
            try:
                self._add_metric(job_id, timestamp, sequence, payload)
            except WriterStopped:
                self._reject("stopping", f"METRIC for job {job_id} after the writer stopped")
                return False
            return True
        if msg_type in _EVENT_TYPES:
            return self._accept_event(msg_type, job_id, env_timestamp, env_sequence, payload)
        self._reject("unknown_type", f"message type {msg_type}")
        return False

    def _accept_event(
        self, msg_type: int, job_id: str, env_timestamp: int, env_sequence: int, payload: bytes
    ) -> None:
        """A telemetry event frame: validate its payload, hand it to the writer (True when it
        took it)."""
        name = events.KINDS_BY_TYPE[msg_type].name
        if job_id not in self._valid_ids and not self._admit(job_id):
            self._event_rejected(name, "invalid_job_id")
            return False
        try:
            kind, timestamp, sequence = events.check_event(
                msg_type, payload, job_id, env_timestamp, env_sequence
            )
        except events.EventDecodeError as e:
            self._reject(e.reason, str(e))
            self._event_rejected(name, e.reason)
            return False
        try:
            self._add_event(job_id, name, timestamp, sequence, payload)
        except WriterStopped:
            self._reject("stopping", f"{name} event for job {job_id} after the writer stopped")
            self._event_rejected(name, "stopping")
            return False
        self._event_accepted(name)
        return True

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

    @reactor_only
    def connectionMade(self) -> None:
        if hasattr(self.transport, "bufferSize"):
            # Twisted's connections read bufferSize bytes per read: see READ_BYTES.
            self.transport.bufferSize = READ_BYTES
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory._connection_made(self)

    @reactor_only
    def connectionLost(self, reason=protocol.connectionDone) -> None:
        """Count a frame cut off by the close; complete frames were delivered on arrival."""
        if self._head or self._need:
            have = len(self._head) or sum(map(len, self._chunks))
            self._reject("truncated_frame", f"connection closed with {have} bytes of a frame")
        self._head = b""
        self._chunks = []
        self._need = 0
        self._skip = 0
        self._frame_done()
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory._connection_lost(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    @reactor_only
    def pauseProducing(self) -> None:
        """Stop reading from the transport.  Frames already received are still delivered."""
        self.paused = True
        self.transport.pauseProducing()

    @reactor_only
    def resumeProducing(self) -> None:
        """Read from the transport again."""
        self.paused = False
        self.transport.resumeProducing()


class IngestFactory(protocol.Factory):
    """Builds IngestProtocols for the IPC listener and tracks the live ones.  Reactor thread.

    Refuses connections beyond ``max_connections`` (``buildProtocol`` returns None, so the
    listening port closes the socket at once; counted as ``too_many_connections``, and
    reported by ``connections_check`` for ``REFUSAL_WINDOW`` seconds).
    ``pause_all``/``resume_all`` are the writer's backpressure hooks; while paused, new
    connections start paused.  ``budget`` (a PartialFrameBudget built from
    ``max_partial_bytes`` and ``max_partial_bytes_per_connection``) bounds the memory of
    frames still arriving; ``partial_frame_timeout`` (0: never) closes connections whose
    frame stalls.  ``metrics`` provides IIngestMetrics (checked here, as by IngestProtocol).
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
        max_partial_bytes: Optional[int] = DEFAULT_MAX_PARTIAL_BYTES,
        max_partial_bytes_per_connection: Optional[int] = None,
        partial_frame_timeout: float = DEFAULT_PARTIAL_FRAME_TIMEOUT,
        trim: Callable[[], None] = release_memory,
    ):
        if clock is None:
            raise TypeError("IngestFactory needs a clock (the reactor or task.Clock)")
        self.budget = PartialFrameBudget(
            max_partial_bytes,
            max_partial_bytes_per_connection or max_frame_bytes,
            clock=clock,
            trim=trim,
        )
        self.partial_frame_timeout = partial_frame_timeout
        self.refused_connections = 0
        self.last_refused: Optional[float] = None
        self._writer = writer
        self._metrics = require_ingest_metrics(metrics)
        self._clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.rejections = RejectionLog(clock, self._metrics, reject_log_interval)
        #: Telemetry event frames accepted and rejected (the ``ipc_events`` health check).
        self.events = EventTally(clock)
        self._job_ids = _JobIdCache(job_id_cache_size)
        self._protocols: dict[IngestProtocol, None] = {}
        self._paused = False
        self._draining = False
        self._metrics.set_partial_budget(self.budget)

    @reactor_only
    def startFactory(self) -> None:
        """The listener starts: log once which frame decoder this process uses."""
        log.info("IPC frame decoder: {implementation}", implementation=DECODER_IMPLEMENTATION)

    @reactor_only
    def stopFactory(self) -> None:
        """The last listener stopped: no trim may run after it."""
        self.budget.stop()

    def connections_check(self, window: float = REFUSAL_WINDOW) -> tuple:
        """Health check: not ok while a connection was refused (``ipc.maxConnections``)
        within ``window`` seconds; ``(ok, detail, extra)``."""
        now = self._clock.seconds()
        recent = self.last_refused is not None and now - self.last_refused < window
        detail = (
            f"{len(self._protocols)} of {self.max_connections} connections open; "
            f"{self.refused_connections} refused"
        )
        if recent:
            detail = (
                f"refusing connections (ipc.maxConnections {self.max_connections} reached "
                f"{now - self.last_refused:.0f} s ago): " + detail
            )
        extra = {
            "open": len(self._protocols),
            "max": self.max_connections,
            "refused_total": self.refused_connections,
            "last_refused_seconds_ago": (
                None if self.last_refused is None else round(now - self.last_refused, 3)
            ),
        }
        return not recent, detail, extra

    @property
    def paused(self) -> bool:
        """True between ``pause_all()`` and ``resume_all()``."""
        return self._paused

    def connection_count(self) -> int:
        """Number of live connections."""
        return len(self._protocols)

    @reactor_only
    def buildProtocol(self, addr) -> Optional[IngestProtocol]:
        if len(self._protocols) >= self.max_connections:
            self.refused_connections += 1
            self.last_refused = self._clock.seconds()
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
            budget=self.budget,
            clock=self._clock,
            partial_frame_timeout=self.partial_frame_timeout,
            event_tally=self.events,
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

    @reactor_only
    def pause_all(self) -> None:
        """Stop reading on every connection, and on new ones until ``resume_all``.

        Not while ``disconnect_all`` drains the connections: that reads on regardless.
        """
        self._paused = True
        if self._draining:
            return
        for p in self._protocols:
            _pause(p.transport)

    @reactor_only
    def resume_all(self) -> None:
        """Read again on every connection."""
        self._paused = False
        now = self._clock.seconds()
        for p in self._protocols:
            # Time paused does not count against a frame in progress.
            p._progress_at = now
            if not p._waiting:  # waiting for budget: resumed when it is granted
                _resume(p.transport)

    @reactor_only
    def disconnect_all(self, drain_timeout: float = 5.0) -> defer.Deferred:
        """Close every connection; Deferred firing when all of them have closed.

        What a peer has already written is not lost: each connection's read side is shut
        down first (``shutdown(SHUT_RD)``), so that the peer's further writes fail (EPIPE)
        while the bytes already queued in the socket are still read, up to the end of file,
        and handed to the writer; the connection then closes.  Reading resumes even under
        backpressure (what is queued is bounded by the socket buffers).  A connection still
        open after ``drain_timeout`` seconds (``ipc.drainTimeout``), or whose transport has no
        socket, is closed with ``loseConnection``.  A frame cut off is counted as
        ``truncated_frame``.
        """
        self._draining = True
        waits = []
        for p in list(self._protocols):
            d = defer.Deferred()
            p._lost_waiters.append(d)
            waits.append(d)
            if not _shutdown_read(p.transport):
                p.transport.loseConnection()
        if not waits:
            return defer.succeed(None)
        timer = self._clock.callLater(drain_timeout, self._close_remaining)

        def closed(_):
            if timer.active():
                timer.cancel()

        return defer.gatherResults(waits).addCallback(closed)

    def _close_remaining(self) -> None:
        for p in list(self._protocols):
            if p.transport is not None:
                p.transport.loseConnection()


def _shutdown_read(transport) -> bool:
    """Shut down the read side of ``transport``'s socket and keep reading; False if impossible."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None or getattr(transport, "disconnecting", False):
        return False
    try:
        get_handle().shutdown(socket.SHUT_RD)
    except (OSError, AttributeError):
        return False
    transport.resumeProducing()
    return True


def _pause(transport) -> None:
    if transport is not None and not getattr(transport, "disconnecting", False):
        transport.pauseProducing()


def _resume(transport) -> None:
    if transport is not None and not getattr(transport, "disconnecting", False):
        transport.resumeProducing()
