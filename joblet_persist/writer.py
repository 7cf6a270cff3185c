"""The batching writer: buffers received messages and appends them to storage in batches.

Everything in this module runs on the reactor thread.  Blocking work (compression, the append,
fsync) happens inside the storage backend, which hands it to its pool and returns a Deferred.

Shape (after twisted's ``_AggregateSmallWrites``, with Buildbot ``Debouncer``'s stop contract):

- One buffer per (job, stream) for LOG messages, one per job for metric samples and one per
  (job, event kind) for telemetry events, held as
  columns (timestamps, sequences, arrivals, contents/payloads) so that a flushed buffer becomes a
  ``LogBatch``/``MetricBatch``/``EventBatch`` without per-message work.
- A buffer is sealed into a batch when it reaches ``batch_max_messages`` or
  ``batch_max_bytes``, and once every ``flush_interval`` seconds when it is not empty: the
  timer ticks ``FLUSH_PHASES`` times per interval and each tick seals the buffers of its phase
  (phases are dealt out in turn as buffers are created) and any buffer whose oldest message
  has waited a whole interval (a late tick), so that the many buffers that only fill by the
  timer (a job's metrics and each event kind) reach the pool a share at a time instead of all
  at once.  Sealed batches of one buffer form a queue: at most one append is in flight per
  buffer, the next is sent when it completes, so per (job, stream) order is arrival order.
  Different buffers append in parallel.
- A failed append stays at the head of its queue and is retried after a backoff
  (``retry_initial`` doubling up to ``retry_max``); nothing is dropped and order is kept.
- Backpressure: when buffered bytes (open, queued and in flight) exceed ``high_water_bytes``,
  ``on_pause()`` is called once; when they fall below ``low_water_bytes``, ``on_resume()``
  once.
- Health: ``on_health_change(healthy)`` is called when ``healthy`` flips, i.e. when the first
  append starts failing (False) and when the last failing one succeeds or is dropped (True),
  so that the service's health verdict follows at once instead of at its next probe.

Batch sizes count each message as its content (or payload) length plus ``MESSAGE_OVERHEAD``
bytes.  Backpressure counts the memory buffered messages really hold: their content plus
``MESSAGE_MEMORY`` bytes of Python objects each (a bytes object, three ints and four list
slots), so that ``high_water_bytes`` bounds the writer's memory, not just its content.  A
metric or event message holds less (its ints are packed: 24 bytes and one list slot), so the
bound is conservative for them.

Arrival ordinals: every message of a job gets the next value of a per-job counter shared by both
log streams and the metrics, so that storage can merge the streams in arrival order.  The
counters are the plain dict ``arrivals`` (job id -> next arrival), public so that the ingest
protocol's frame decoder (``framing.decode_log_frames``) numbers LOG frames in bulk with the
same counters that ``add_log``/``add_metric`` use (``add_logs`` takes the numbers it assigned).
A counter lives as long as the job is known to the writer (for the process run), or until
``discard_job``.
"""

from __future__ import annotations

import enum
from array import array
from collections import deque
from typing import Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from joblet_persist.grouping import extend_groups, is_packed, new_columns, new_packed_columns
from joblet_persist.logs import Logger
from joblet_persist.storage.api import (
    KIND_OF_EVENT,
    KIND_OF_STREAM,
    STREAM_STDERR,
    STREAM_STDOUT,
    EventBatch,
    LogBatch,
    MetricBatch,
    SegmentKind,
)
from joblet_persist.threads import reactor_only

__all__ = [
    "MESSAGE_MEMORY",
    "MESSAGE_OVERHEAD",
    "BatchingWriter",
    "BufferKey",
    "IGroupWriter",
    "IIngestWriter",
    "NullWriterMetrics",
    "WriterStopped",
]

#: Bytes a message adds to its batch's size in addition to its content: the columns' entries.
MESSAGE_OVERHEAD = 32

#: Memory a buffered message holds beyond its content, for backpressure: 170-171 bytes
#: measured with tracemalloc on CPython 3.11 (64-bit) for the objects the frame decoder
#: creates (bytes header 33, timestamp int 36, sequence and arrival ints 28 each, list slots).
MESSAGE_MEMORY = 170

_MEMORY_EXTRA = MESSAGE_MEMORY - MESSAGE_OVERHEAD

#: Ticks of the flush timer per flush interval: each seals the open buffers of one phase
#: (buffers get their phases in turn), so every buffer is sealed once per interval.
FLUSH_PHASES = 4



class BufferKey(enum.IntEnum):
    """Which of a job's buffers: its index in ``_Job.buffers``.

    The log buffers' values are their stream numbers, so a LOG frame's stream
    indexes its buffer directly on the hot path.  METRICS is not a stream:
    stream 0 on the wire (STREAM_UNSPECIFIED) means "both log streams" in a
    query, which has nothing to do with this buffer.
    """

    METRICS = 0
    STDOUT = STREAM_STDOUT
    STDERR = STREAM_STDERR
    # Telemetry events: one buffer per kind, valued by the kind's IPC message type
    # (events.EventKind.msg_type), so an event frame's type indexes its buffer.
    EXEC_EVENTS = 3
    CONNECT_EVENTS = 4
    ACCEPT_EVENTS = 5
    SOCKET_DATA_EVENTS = 6
    MMAP_EVENTS = 7
    MPROTECT_EVENTS = 8
    FILE_EVENTS = 9


#: The event kind name of each event buffer (EventBatch.kind).
_EVENT_OF_BUFFER = {
    BufferKey.EXEC_EVENTS: "exec",
    BufferKey.CONNECT_EVENTS: "connect",
    BufferKey.ACCEPT_EVENTS: "accept",
    BufferKey.SOCKET_DATA_EVENTS: "socket_data",
    BufferKey.MMAP_EVENTS: "mmap",
    BufferKey.MPROTECT_EVENTS: "mprotect",
    BufferKey.FILE_EVENTS: "file",
}
#: The buffer of each event kind name.
BUFFER_OF_EVENT = {name: key for key, name in _EVENT_OF_BUFFER.items()}

#: The stored kind of each buffer's data (for messages naming the buffer).
_KIND_OF_BUFFER = {
    BufferKey.METRICS: SegmentKind.METRICS,
    BufferKey.STDOUT: KIND_OF_STREAM[STREAM_STDOUT],
    BufferKey.STDERR: KIND_OF_STREAM[STREAM_STDERR],
    **{key: KIND_OF_EVENT[name] for key, name in _EVENT_OF_BUFFER.items()},
}
_LOG_BUFFERS = (BufferKey.STDOUT, BufferKey.STDERR)

#: The decoder's group code of metric samples is -MSG_METRIC_CODE; events are -3..-9 (their
#: IPC message types, which are their buffers' indexes).
MSG_METRIC_CODE = 2
_FIRST_EVENT_TYPE = min(_EVENT_OF_BUFFER)
_LAST_EVENT_TYPE = max(_EVENT_OF_BUFFER)

log = Logger()


class WriterStopped(RuntimeError):
    """Raised by ``add_log``/``add_metric``/``add_event`` once ``stop()`` has been called."""


class IIngestWriter(Interface):
    """What the IPC ingest protocol hands accepted messages to.  Reactor thread.

    Each method buffers one message whose job id is already validated; it raises
    WriterStopped when the writer accepts nothing more.  BatchingWriter provides it and
    the bulk forms below (IBulkLogWriter, IBulkOtherWriter).
    """

    def add_log(job_id, stream, timestamp, sequence, content):
        """One LOG message: ``stream`` 1 (stdout) or 2 (stderr), ``content`` bytes."""

    def add_metric(job_id, timestamp, sequence, payload):
        """One metric sample: ``payload`` a serialized ``joblet.ipc.Metric``."""

    def add_event(job_id, kind, timestamp, sequence, payload):
        """One telemetry event of ``kind`` (an event kind name: ``"exec"``, ...):
        ``payload`` the IPC payload ``events.check_event`` accepted, ``timestamp`` and
        ``sequence`` the ones it returned."""


class IBulkLogWriter(IIngestWriter):
    """A writer that also takes a read's LOG frames in groups.  Reactor thread.

    The ingest protocol then decodes a whole read at once (``framing.decode_log_frames``),
    advancing ``arrivals`` itself, and hands each (job, stream) group to ``add_logs``.
    """

    arrivals = Attribute("dict job id -> the job's next arrival number, shared with ingest")

    def add_logs(job_id, stream, timestamps, sequences, arrivals, contents):
        """Several LOG messages of one (job, stream), in order (equally long columns)."""


class IBulkOtherWriter(IIngestWriter):
    """A writer that also takes a read's metric and event frames in bulk.  Reactor thread."""

    def add_metrics(job_id, timestamps, sequences, arrivals, payloads):
        """Several metric samples of one job, in order."""

    def add_events(job_id, kind, timestamps, sequences, arrivals, payloads):
        """Several telemetry events of one job and ``kind``, in order."""


class IGroupWriter(IBulkLogWriter, IBulkOtherWriter):
    """A writer that takes all of the frame decoder's groups of one read in one call."""

    def add_groups(groups):
        """Buffer every group of ``groups`` ((job id, code) -> four columns; code 1/2 a log
        stream, -2 metric samples, -t events of IPC message type t), job ids validated."""


class NullWriterMetrics:
    """The writer's metrics interface, doing nothing.  Reactor thread.

    A real implementation (``joblet_persist.metrics.PersistMetrics``) receives:
    ``write_done`` once per appended batch, ``write_error`` once per failed append,
    ``buffered`` whenever a batch completes or is dropped and on every flush tick (never per
    message), ``backpressure`` when ingest is paused (True) or resumed (False).
    """

    def write_done(self, seconds: float, messages: int, nbytes: int) -> None:
        """A batch was appended: ``seconds`` since it was handed to storage (on the injected
        clock), ``messages`` in it, ``nbytes`` of raw content/payload bytes."""

    def durable(self, age: float) -> None:
        """A batch was appended: its oldest message had been buffered ``age`` seconds
        before (on the injected clock): how long data waits before it survives a crash."""

    def write_error(self) -> None:
        """An append failed; it will be retried."""

    def buffered(self, nbytes: int) -> None:
        """Bytes currently held by the writer (open, queued and in flight)."""

    def backpressure(self, active: bool) -> None:
        """Ingest was paused (True) or resumed (False)."""


class _Sealed:
    """One batch handed (or about to be handed) to storage."""

    __slots__ = ("batch", "count", "nbytes", "serial", "opened_at", "abandoned")

    def __init__(self, batch, count: int, nbytes: int, serial: int, opened_at: float):
        self.batch = batch
        self.count = count
        self.nbytes = nbytes
        self.serial = serial
        self.opened_at = opened_at  # when its oldest message was buffered (clock seconds)
        # Set when the batch is given up (discard_job, stop timeout): a late result is ignored.
        self.abandoned = False


class _Job:
    """Per-job state: the job's buffers (its arrival counter is in ``BatchingWriter.arrivals``)."""

    __slots__ = ("job_id", "buffers", "held", "discarding")

    def __init__(self, job_id: str, held: bool):
        self.job_id = job_id
        # Indexed by BufferKey.
        self.buffers: list[Optional[_Buffer]] = [None] * len(BufferKey)
        # True while a discard_job of an earlier incarnation of this job id is pending: batches
        # are queued but not sent, so that they reach storage after its delete_job started.
        self.held = held
        self.discarding = False


def _new_columns(key: BufferKey) -> tuple:
    """A buffer's empty columns.  A log stream's are lists of ints, ints, ints and bytes that
    the garbage collector does not track (grouping.new_columns): its full passes skip every
    buffered message.  Metrics and events keep their ints packed (grouping.new_packed_columns,
    as the decoder's groups hold them), so that appending a group copies three buffers and
    storage reads them without an object per value."""
    return new_columns() if key in _LOG_BUFFERS else new_packed_columns()


def _packed(typecode: str, column):
    """``column`` as a packed int column of ``typecode``: itself when it is one, else a copy
    (OverflowError for a value out of range)."""
    return column if is_packed(column, typecode) else array(typecode, column)


class _Buffer:
    """One (job, stream) or (job, metrics) buffer: open columns plus its queue of batches."""

    __slots__ = (
        "job",
        "key",
        "timestamps",
        "sequences",
        "arrivals",
        "contents",
        "nbytes",
        "queue",
        "inflight",
        "retry_call",
        "retry_delay",
        "serial",
        "done_serial",
        "waiters",
        "opened_at",
        "phase",
    )

    def __init__(self, job: _Job, key: BufferKey, retry_delay: float, phase: int = 0):
        self.job = job
        self.key = key
        self.phase = phase  # which of the flush timer's FLUSH_PHASES ticks seals it
        self.timestamps, self.sequences, self.arrivals, self.contents = _new_columns(key)
        self.nbytes = 0
        self.queue: deque[_Sealed] = deque()
        self.inflight: Optional[_Sealed] = None
        self.retry_call = None
        self.retry_delay = retry_delay
        self.serial = 0  # serial of the last sealed batch
        self.done_serial = 0  # serial of the last batch appended (or dropped)
        self.waiters: list[tuple[int, defer.Deferred]] = []
        self.opened_at = 0.0  # when the open columns got their first message

    def describe(self) -> str:
        return f"{self.job.job_id}/{_KIND_OF_BUFFER[self.key]}"


@implementer(IGroupWriter)
class BatchingWriter:
    """Buffers messages per (job, stream) and appends them to storage in batches.

    Reactor thread only.  ``storage`` provides ``append_logs(LogBatch)`` and
    ``append_metrics(MetricBatch)`` returning Deferreds (see ``storage.api.IStorageBackend``);
    ``clock`` provides ``callLater`` and ``seconds`` (the reactor, or ``task.Clock`` in tests).

    Plain int counters for GetStats: ``messages_received`` (accepted by ``add_*``),
    ``messages_written`` (appended), ``write_errors`` (failed appends, each retried).
    """

    def __init__(
        self,
        storage,
        clock,
        *,
        flush_interval: float = 1.0,
        batch_max_messages: int = 20000,
        batch_max_bytes: int = 2 * 1024 * 1024,
        high_water_bytes: int = 128 * 1024 * 1024,
        low_water_bytes: int = 64 * 1024 * 1024,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        stop_timeout: float = 10.0,
        on_pause: Callable[[], object] = lambda: None,
        on_resume: Callable[[], object] = lambda: None,
        on_health_change: Callable[[bool], object] = lambda healthy: None,
        metrics=None,
    ):
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, not {flush_interval!r}")
        if batch_max_messages < 1 or batch_max_bytes < 1:
            raise ValueError("batch_max_messages and batch_max_bytes must be >= 1")
        if low_water_bytes > high_water_bytes:
            raise ValueError(
                f"low_water_bytes ({low_water_bytes}) must not exceed "
                f"high_water_bytes ({high_water_bytes})"
            )
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("retry_initial must be > 0 and retry_max >= retry_initial")
        self._storage = storage
        self._clock = clock
        self._flush_interval = flush_interval
        self._batch_max_messages = batch_max_messages
        self._batch_max_bytes = batch_max_bytes
        self._high_water = high_water_bytes
        self._low_water = low_water_bytes
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._stop_timeout = stop_timeout
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_health_change = on_health_change
        self._metrics = metrics if metrics is not None else NullWriterMetrics()

        self._jobs: dict[str, _Job] = {}
        # (job id, decoder group code) -> the job's buffer, for add_groups; cleared whenever
        # a job leaves _jobs, so an entry always names a buffer of the job's current _Job.
        self._group_buffers: dict[tuple[str, int], _Buffer] = {}
        #: Job id -> the job's next arrival ordinal (see the module docstring).  Always this
        #: dict object: the ingest protocol holds on to it.
        self.arrivals: dict[str, int] = {}
        # Buffers whose open columns are not empty, in the order they became so.
        self._dirty: dict[_Buffer, None] = {}
        # Buffers with a batch queued or in flight.
        self._busy: set[_Buffer] = set()
        # Buffers whose in-flight batch failed and awaits its retry.
        self._failing: set[_Buffer] = set()
        # Job ids with a discard_job in progress -> number of such calls.
        self._discards: dict[str, int] = {}
        self._buffered = 0
        self._paused = False
        self._timer = None
        self._tick_count = 0
        self._next_phase = 0
        self._stopping = False
        self._stop_deferreds: list[defer.Deferred] = []
        self._stop_done = False
        self._stop_deadline = None
        #: Job id -> ``tap(stream, arrivals, timestamps, sequences, contents)``, called with
        #: every LOG message accepted for the job, in arrival order per call (FollowLogs:
        #: follow.FollowHub).  Empty unless someone follows: one dict lookup per call then.
        self.log_taps: dict[str, Callable] = {}

        self.messages_received = 0
        self.messages_written = 0
        self.write_errors = 0

    # -- state ------------------------------------------------------------

    @reactor_only
    def busy_jobs(self) -> set[str]:
        """Job ids with data buffered, queued or in flight (retention spares them)."""
        jobs = {buf.job.job_id for buf in self._dirty}
        jobs.update(buf.job.job_id for buf in self._busy)
        return jobs

    @reactor_only
    def pending_logs(self, job_id: str) -> list[tuple]:
        """The job's LOG messages accepted and not yet appended.  Reactor thread.

        ``[(stream, arrivals, timestamps, sequences, contents)]``: per log stream,
        the batch in flight (or failing and awaiting its retry), the queued
        batches and the open columns, in arrival order within each stream.  A
        batch leaves this list in the same reactor turn in which storage
        publishes it (its append's callback chain), so together with the
        job's published snapshot taken in the same turn it holds every
        accepted message exactly once (FollowLogs' hand-off).
        """
        job = self._jobs.get(job_id)
        if job is None:
            return []
        out = []
        for stream in _LOG_BUFFERS:
            buf = job.buffers[stream]
            if buf is None:
                continue
            sealed = [buf.inflight] if buf.inflight is not None else []
            for item in (*sealed, *buf.queue):
                if not item.abandoned:
                    b = item.batch
                    out.append((int(stream), b.arrivals, b.timestamps, b.sequences, b.contents))
            if buf.timestamps:
                out.append((
                    int(stream),
                    tuple(buf.arrivals),
                    tuple(buf.timestamps),
                    tuple(buf.sequences),
                    tuple(buf.contents),
                ))
        return out

    @property
    def buffered_bytes(self) -> int:
        """Accounted bytes received and not yet appended (open, queued and in flight)."""
        return self._buffered

    @property
    def paused(self) -> bool:
        """True while ingest is paused by backpressure."""
        return self._paused

    @property
    def healthy(self) -> bool:
        """False while any append has failed and not yet succeeded on retry."""
        return not self._failing

    @property
    def failed_pending(self) -> int:
        """Number of buffers whose batch failed and is waiting for its retry (0 = healthy)."""
        return len(self._failing)

    # -- lifecycle ----------------------------------------------------------

    @reactor_only
    def start(self) -> None:
        """Start the flush timer.  Reactor thread."""
        if self._stopping:
            raise WriterStopped("a stopped writer cannot be restarted")
        if self._timer is None:
            self._timer = self._clock.callLater(self._flush_interval / FLUSH_PHASES, self._tick)

    @reactor_only
    def stop(self) -> defer.Deferred:
        """Flush everything and wait for it to be appended.  Reactor thread; Deferred.

        Stops the timer, seals every buffer at once, retries failing appends at once, and fires
        when nothing is queued or in flight.  Failures during stop are retried every
        ``retry_initial`` seconds; after ``stop_timeout`` seconds the remaining data is given
        up, logged as an error naming the jobs and message counts lost, and the Deferred fires
        anyway.  From the call on, ``add_*`` raises ``WriterStopped``.
        """
        d = defer.Deferred()
        if self._stop_done:
            d.callback(None)
            return d
        self._stop_deferreds.append(d)
        if self._stopping:
            return d
        self._stopping = True
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        for buf in list(self._failing):
            if buf.retry_call is not None and buf.retry_call.active():
                buf.retry_call.cancel()
                buf.retry_call = None
                self._retry(buf)
        self._seal_all()
        if self._busy:
            self._stop_deadline = self._clock.callLater(self._stop_timeout, self._give_up)
        self._maybe_stopped()
        return d

    # -- the hot path -----------------------------------------------------

    @reactor_only
    def add_log(self, job_id: str, stream: int, timestamp: int, sequence: int, content: bytes):
        """Buffer one LOG message.  Reactor thread, once per received frame.

        ``job_id`` must already be validated; ``stream`` is 1 (stdout) or 2 (stderr).
        """
        if self._stopping:
            raise WriterStopped("writer is stopping")
        if stream != 1 and stream != 2:
            raise ValueError(f"stream must be 1 or 2, not {stream!r}")
        self._add(job_id, stream, timestamp, sequence, content)
        tap = self.log_taps.get(job_id)
        if tap is not None:
            tap(stream, (self.arrivals[job_id] - 1,), (timestamp,), (sequence,), (content,))

    @reactor_only
    def add_logs(
        self,
        job_id: str,
        stream: int,
        timestamps: list[int],
        sequences: list[int],
        arrivals: list[int],
        contents: list[bytes],
    ):
        """Buffer several LOG messages of one (job, stream), in order.  Reactor thread.

        The bulk form of ``add_log``, for the frame decoder's groups: four equally long
        columns, with the arrival ordinals already assigned from ``self.arrivals`` (the caller
        advanced the job's counter).  The buffer is sealed exactly where successive
        ``add_log`` calls would seal it, so batches stay within ``batch_max_messages`` and
        ``batch_max_bytes`` plus one message.  The lists are copied, not kept.
        """
        if self._stopping:
            raise WriterStopped("writer is stopping")
        if stream != 1 and stream != 2:
            raise ValueError(f"stream must be 1 or 2, not {stream!r}")
        if not timestamps:
            return
        self._add_many(job_id, stream, timestamps, sequences, arrivals, contents)
        tap = self.log_taps.get(job_id)
        if tap is not None:
            tap(stream, arrivals, timestamps, sequences, contents)

    def _add_logs_sealing(self, buf: _Buffer, timestamps, sequences, arrivals, contents):
        """``add_logs`` for a group that reaches a threshold: fill, seal, repeat."""
        max_bytes = self._batch_max_bytes
        max_messages = self._batch_max_messages
        n = len(timestamps)
        i = 0
        while i < n:
            # Take messages up to the one that reaches a threshold (it is included, as in
            # add_log, which seals after appending).
            room = max_messages - len(buf.timestamps)
            limit = min(n, i + room)
            size = buf.nbytes
            j = i
            while j < limit:
                size += len(contents[j]) + MESSAGE_OVERHEAD
                j += 1
                if size >= max_bytes:
                    break
            if not buf.timestamps:
                self._opened(buf)
            buf.timestamps.extend(timestamps[i:j])
            buf.sequences.extend(sequences[i:j])
            buf.arrivals.extend(arrivals[i:j])
            buf.contents.extend(contents[i:j])
            buf.nbytes = size
            if size >= max_bytes or len(buf.timestamps) >= max_messages:
                self._seal(buf)
            i = j

    @reactor_only
    def add_metric(self, job_id: str, timestamp: int, sequence: int, payload: bytes):
        """Buffer one metric sample (a serialized ``joblet.ipc.Metric``).  Reactor thread."""
        if self._stopping:
            raise WriterStopped("writer is stopping")
        self._add(job_id, BufferKey.METRICS, timestamp, sequence, payload)

    @reactor_only
    def add_event(self, job_id: str, kind: str, timestamp: int, sequence: int, payload: bytes):
        """Buffer one telemetry event of ``kind`` (an event kind name: ``"exec"``, ...).

        Reactor thread.  ``payload`` is the IPC payload, already accepted by
        ``events.check_event``; ``timestamp`` and ``sequence`` the ones it returned.
        """
        if self._stopping:
            raise WriterStopped("writer is stopping")
        self._add(job_id, BUFFER_OF_EVENT[kind], timestamp, sequence, payload)

    @reactor_only
    def add_metrics(self, job_id: str, timestamps, sequences, arrivals, payloads):
        """Buffer several metric samples of one job, in order: the bulk form of
        ``add_metric``, with arrival ordinals assigned by the caller as for ``add_logs``."""
        if self._stopping:
            raise WriterStopped("writer is stopping")
        self._add_many(job_id, BufferKey.METRICS, timestamps, sequences, arrivals, payloads)

    @reactor_only
    def add_events(self, job_id: str, kind: str, timestamps, sequences, arrivals, payloads):
        """Buffer several telemetry events of one job and ``kind``, in order: the bulk form
        of ``add_event``, with arrival ordinals assigned by the caller as for ``add_logs``."""
        if self._stopping:
            raise WriterStopped("writer is stopping")
        self._add_many(job_id, BUFFER_OF_EVENT[kind], timestamps, sequences, arrivals, payloads)

    @reactor_only
    def add_groups(self, groups: dict) -> None:
        """Buffer all the frame decoder's groups of one read, in one call.  Reactor thread.

        ``groups`` maps ``(job_id, code)`` to four equally long columns (timestamps,
        sequences, arrivals, payloads) as ``add_logs`` takes them: ``code`` 1 or 2 is a log
        stream, ``-2`` metric samples, ``-t`` telemetry events of IPC message type ``t``
        (3..9).  Every job id must already be validated and every group be non-empty.  The
        same as one ``add_logs``/``add_metrics``/``add_events`` call per group in the
        dict's order (batches seal at the same places, log taps see the same calls), minus
        their per-call cost: the groups that fit their open buffers are appended in one
        call (``grouping.extend_groups``), the others one by one.  Raises
        WriterStopped, having buffered nothing, once the writer is stopping; ValueError,
        having buffered nothing, for an unknown code.
        """
        if self._stopping:
            raise WriterStopped("writer is stopping")
        cache = self._group_buffers
        for key in groups:
            if key not in cache:
                code = key[1]
                if code == 1 or code == 2:
                    index = code
                elif code == -MSG_METRIC_CODE:
                    index = BufferKey.METRICS
                elif -_LAST_EVENT_TYPE <= code <= -_FIRST_EVENT_TYPE:
                    index = -code
                else:
                    raise ValueError(f"unknown group code {code!r} for job {key[0]!r}")
                job = self._jobs.get(key[0])
                if job is None:
                    job = self._new_job(key[0])
                buf = job.buffers[index]
                if buf is None:
                    buf = job.buffers[index] = self._new_buffer(job, index)
                cache[key] = buf
        # Runs of groups that fit their open buffers in one call each; between them, the
        # group that opens or seals its buffer, in the groups' order.
        high_water = self._high_water
        max_bytes = self._batch_max_bytes
        max_messages = self._batch_max_messages
        position = 0
        while True:
            messages, nbytes, key, position = extend_groups(
                groups, cache, max_bytes, max_messages, MESSAGE_OVERHEAD, position
            )
            if messages:
                self.messages_received += messages
                self._buffered += nbytes + _MEMORY_EXTRA * messages
                if self._buffered > high_water and not self._paused:
                    self._pause()
            if key is None:
                break
            self._extend(cache[key], *groups[key])
            if self._buffered > high_water and not self._paused:
                self._pause()
        taps = self.log_taps
        if taps:
            for key, (timestamps, sequences, arrivals, items) in groups.items():
                if key[1] > 0 and timestamps:
                    tap = taps.get(key[0])
                    if tap is not None:
                        tap(key[1], arrivals, timestamps, sequences, items)

    def _add_many(self, job_id: str, index: int, timestamps, sequences, arrivals, items):
        """Buffer several messages in the job's buffer ``index`` (a stream number or a
        BufferKey), sealed exactly where successive single calls would seal it."""
        n = len(timestamps)
        if not n:
            return
        job = self._jobs.get(job_id)
        if job is None:
            job = self._new_job(job_id)
        buf = job.buffers[index]
        if buf is None:
            buf = job.buffers[index] = self._new_buffer(job, index)
        self._extend(buf, timestamps, sequences, arrivals, items)
        if self._buffered > self._high_water and not self._paused:
            self._pause()

    def _extend(self, buf: _Buffer, timestamps, sequences, arrivals, items) -> None:
        """Buffer a non-empty run of messages in ``buf``, counted, and sealed exactly where
        successive single calls would seal it (the caller checks the high-water mark)."""
        if type(buf.timestamps) is not list:
            # A packed buffer takes packed columns; a copy first, so that a value out of
            # range raises before anything is buffered.
            timestamps = _packed("q", timestamps)
            sequences = _packed("Q", sequences)
            arrivals = _packed("q", arrivals)
        n = len(timestamps)
        nbytes = sum(map(len, items)) + MESSAGE_OVERHEAD * n
        self.messages_received += n
        self._buffered += nbytes + _MEMORY_EXTRA * n
        if (buf.nbytes + nbytes < self._batch_max_bytes
                and len(buf.timestamps) + n < self._batch_max_messages):
            if not buf.timestamps:
                self._opened(buf)
            buf.timestamps.extend(timestamps)
            buf.sequences.extend(sequences)
            buf.arrivals.extend(arrivals)
            buf.contents.extend(items)
            buf.nbytes += nbytes
        else:
            self._add_logs_sealing(buf, timestamps, sequences, arrivals, items)

    def _add(self, job_id: str, index: int, timestamp: int, sequence: int, item: bytes):
        """Append one message to the job's buffer ``index`` (a BufferKey or a stream number)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self._new_job(job_id)
        buf = job.buffers[index]
        if buf is None:
            buf = job.buffers[index] = self._new_buffer(job, index)
        arrivals = self.arrivals
        arrival = arrivals.get(job_id, 0)
        timestamps = buf.timestamps
        if type(timestamps) is not list:
            # A packed (metric or event) buffer: _extend's copy refuses a value out of range
            # before anything is buffered.
            self._extend(buf, (timestamp,), (sequence,), (arrival,), (item,))
            arrivals[job_id] = arrival + 1
            if self._buffered > self._high_water and not self._paused:
                self._pause()
            return
        if not timestamps:
            self._opened(buf)
        timestamps.append(timestamp)
        buf.sequences.append(sequence)
        arrivals[job_id] = arrival + 1
        buf.arrivals.append(arrival)
        buf.contents.append(item)
        n = len(item) + MESSAGE_OVERHEAD
        buf.nbytes += n
        self._buffered += n + _MEMORY_EXTRA
        self.messages_received += 1
        if buf.nbytes >= self._batch_max_bytes or len(timestamps) >= self._batch_max_messages:
            self._seal(buf)
        if self._buffered > self._high_water and not self._paused:
            self._pause()

    @reactor_only
    def unload_idle(self, idle: float, resident: Callable[[str], bool] = lambda job: True) -> int:
        """Forget jobs that received nothing for ``idle`` seconds.  Reactor thread.

        A job is forgotten when none of its buffers opened in the last ``idle``
        seconds and none holds data, a queued or in-flight batch, a retry or a
        waiter, and it is not held by a discard.  Its arrival counter goes with
        it only when ``resident(job_id)`` is false, i.e. storage holds no state
        for the job either: the ordinals storage derives from the counter must
        keep increasing, and storage recomputes its base from the files when it
        loads the job again.  Returns the number of jobs forgotten.
        """
        cutoff = self._clock.seconds() - idle
        busy = self._busy
        forgotten = 0
        for job_id, job in list(self._jobs.items()):
            if job.held or job.discarding or resident(job_id):
                continue
            idle_job = True
            for buf in job.buffers:
                if buf is not None and (
                    buf.opened_at > cutoff
                    or buf.timestamps
                    or buf.queue
                    or buf.inflight is not None
                    or buf.retry_call is not None
                    or buf.waiters
                    or buf in busy
                ):
                    idle_job = False
                    break
            if idle_job:
                del self._jobs[job_id]
                self._group_buffers.clear()
                self.arrivals.pop(job_id, None)
                forgotten += 1
        return forgotten

    def _opened(self, buf: _Buffer) -> None:
        """An empty buffer gets its first message: the flush timer covers it from now on."""
        self._dirty[buf] = None
        buf.opened_at = self._clock.seconds()

    def _new_buffer(self, job: _Job, index: int) -> _Buffer:
        """A new buffer of ``job``; the flush phases are dealt out in turn."""
        phase = self._next_phase
        self._next_phase = (phase + 1) % FLUSH_PHASES
        return _Buffer(job, BufferKey(index), self._retry_initial, phase)

    def _new_job(self, job_id: str) -> _Job:
        job = self._jobs[job_id] = _Job(job_id, held=job_id in self._discards)
        return job

    # -- flushing -----------------------------------------------------------

    @reactor_only
    def flush_all(self) -> defer.Deferred:
        """Seal every buffer now; Deferred firing when all of it has been appended.

        Reactor thread.  Covers everything buffered at call time (data added later may or may
        not be included).  Fires also when that data is given up by ``discard_job`` or a stop
        timeout; it never fails.
        """
        self._seal_all()
        waits = [self._wait_done(buf, buf.serial) for buf in self._busy]
        if not waits:
            return defer.succeed(None)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    @reactor_only
    def discard_job(self, job_id: str) -> defer.Deferred:
        """Drop a job's buffered data before it is deleted.  Reactor thread; Deferred.

        Open and queued batches of the job are dropped at once, a failing batch's retry is
        cancelled and the batch dropped, and its arrival counter is forgotten; the Deferred
        fires once the job's in-flight appends have finished (an in-flight append that fails
        is not retried).  Data arriving meanwhile starts a fresh job whose batches are held
        back until the Deferred has fired: the caller starts ``storage.delete_job``
        synchronously in its callback, so these batches reach storage after the delete began.
        """
        self.arrivals.pop(job_id, None)
        job = self._jobs.pop(job_id, None)
        if job is None:
            return defer.succeed(None)
        self._group_buffers.clear()
        job.discarding = True
        self._discards[job_id] = self._discards.get(job_id, 0) + 1
        waits = []
        for buf in job.buffers:
            if buf is None:
                continue
            self._drop_open(buf)
            while buf.queue:
                self._drop_sealed(buf, buf.queue.pop())
            sealed = buf.inflight
            if sealed is not None:
                if buf.retry_call is not None:
                    # Failed and waiting for its retry: nothing is running, drop it now.
                    buf.retry_call.cancel()
                    buf.retry_call = None
                    self._set_failing(buf, False)
                    buf.inflight = None
                    self._drop_sealed(buf, sealed)
                else:
                    waits.append(self._wait_done(buf, sealed.serial))
            self._update_busy(buf)
        self._after_decrease()

        def finished(_):
            remaining = self._discards[job_id] - 1
            if remaining:
                self._discards[job_id] = remaining
            else:
                del self._discards[job_id]
            return None

        def release(result):
            fresh = self._jobs.get(job_id)
            if fresh is not None and fresh.held and job_id not in self._discards:
                fresh.held = False
                for buf in fresh.buffers:
                    if buf is not None:
                        self._pump(buf)
            return result

        d = defer.gatherResults(waits) if waits else defer.succeed(None)
        d.addCallback(finished)
        result = defer.Deferred()
        # The caller's callbacks run first (result.callback), then held batches are released.
        d.addCallback(lambda _: (result.callback(None), release(None)))
        return result

    def _tick(self) -> None:
        """Seal the open buffers of this tick's phase: each buffer's turn comes once per
        flush interval, so nothing waits longer, and the buffers that only fill by the tick
        (a job's metrics and each event kind) reach the pool a share at a time."""
        self._timer = None
        self._tick_count += 1
        phase = self._tick_count % FLUSH_PHASES
        # A buffer whose oldest message is a whole interval old goes too (a tick can be late).
        oldest = self._clock.seconds() - self._flush_interval
        try:
            for buf in [buf for buf in self._dirty if buf.phase == phase or buf.opened_at <= oldest]:
                self._seal(buf)
            self._metrics.buffered(self._buffered)
        except Exception:
            log.failure("periodic flush failed")
        if not self._stopping:
            self._timer = self._clock.callLater(self._flush_interval / FLUSH_PHASES, self._tick)

    def _seal_all(self) -> None:
        for buf in list(self._dirty):
            self._seal(buf)

    def _seal(self, buf: _Buffer) -> None:
        """Turn the buffer's open columns into a batch at the tail of its queue."""
        count = len(buf.timestamps)
        if not count:
            return
        job = buf.job
        if buf.key in _LOG_BUFFERS:
            batch = LogBatch(
                job.job_id, buf.key.value, buf.timestamps, buf.sequences, buf.arrivals, buf.contents
            )
        elif buf.key is BufferKey.METRICS:
            batch = MetricBatch(
                job.job_id, buf.timestamps, buf.sequences, buf.arrivals, buf.contents,
                disposable=True,
            )
        else:
            batch = EventBatch(
                job.job_id,
                _EVENT_OF_BUFFER[buf.key],
                buf.timestamps,
                buf.sequences,
                buf.arrivals,
                buf.contents,
                disposable=True,
            )
        buf.serial += 1
        sealed = _Sealed(batch, count, buf.nbytes, buf.serial, buf.opened_at)
        # The lists now belong to the batch, which crosses to a pool thread: never mutate them.
        # Metric and event batches are disposable: storage empties their columns on its pool
        # thread once they are stored (nothing here reads them afterwards), so that their
        # messages are not freed on this thread.  Log batches are not: pending_logs reads
        # the batch in flight until storage has published it.
        buf.timestamps, buf.sequences, buf.arrivals, buf.contents = _new_columns(buf.key)
        buf.nbytes = 0
        self._dirty.pop(buf, None)
        buf.queue.append(sealed)
        self._busy.add(buf)
        self._pump(buf)

    def _pump(self, buf: _Buffer) -> None:
        """Send the buffer's next batch unless one is in flight (or the job is held)."""
        if buf.inflight is not None or not buf.queue or buf.job.held:
            return
        sealed = buf.inflight = buf.queue.popleft()
        self._send(buf, sealed)

    def _send(self, buf: _Buffer, sealed: _Sealed) -> None:
        started = self._clock.seconds()
        key = buf.key
        if key in _LOG_BUFFERS:
            append = self._storage.append_logs
        elif key is BufferKey.METRICS:
            append = self._storage.append_metrics
        else:
            append = self._storage.append_events
        try:
            d = append(sealed.batch)
        except Exception:
            d = defer.fail(Failure())
        d.addCallbacks(
            self._append_done,
            self._append_failed,
            callbackArgs=(buf, sealed, started),
            errbackArgs=(buf, sealed),
        )

    def _append_done(self, result, buf: _Buffer, sealed: _Sealed, started: float) -> None:
        if sealed.abandoned:
            return
        buf.inflight = None
        self._buffered -= sealed.nbytes + _MEMORY_EXTRA * sealed.count
        self.messages_written += sealed.count
        self._set_failing(buf, False)
        buf.retry_delay = self._retry_initial
        now = self._clock.seconds()
        self._metrics.write_done(
            now - started,
            sealed.count,
            sealed.nbytes - sealed.count * MESSAGE_OVERHEAD,
        )
        self._metrics.durable(now - sealed.opened_at)
        self._update_busy(buf)
        self._mark_done(buf, sealed.serial)
        self._after_decrease()
        self._pump(buf)
        self._maybe_stopped()

    def _append_failed(self, failure: Failure, buf: _Buffer, sealed: _Sealed) -> None:
        if sealed.abandoned:
            return
        self.write_errors += 1
        self._metrics.write_error()
        if buf.job.discarding:
            log.failure(
                "append of {count} messages for {key} failed while the job is being deleted; "
                "dropping them",
                failure,
                count=sealed.count,
                key=buf.describe(),
            )
            buf.inflight = None
            self._set_failing(buf, False)
            self._drop_sealed(buf, sealed)
            self._update_busy(buf)
            self._after_decrease()
            self._maybe_stopped()
            return
        if self._stopping:
            delay = self._retry_initial
        else:
            delay = buf.retry_delay
            buf.retry_delay = min(delay * 2, self._retry_max)
        log.failure(
            "append of {count} messages for {key} failed; retrying in {delay}s",
            failure,
            count=sealed.count,
            key=buf.describe(),
            delay=delay,
        )
        self._set_failing(buf, True)
        buf.retry_call = self._clock.callLater(delay, self._retry, buf)

    def _retry(self, buf: _Buffer) -> None:
        buf.retry_call = None
        sealed = buf.inflight
        if sealed is not None and not sealed.abandoned:
            self._send(buf, sealed)

    # -- bookkeeping ----------------------------------------------------------

    def _drop_open(self, buf: _Buffer) -> None:
        n = buf.nbytes + _MEMORY_EXTRA * len(buf.timestamps)
        if buf.timestamps:
            buf.timestamps, buf.sequences, buf.arrivals, buf.contents = _new_columns(buf.key)
            buf.nbytes = 0
            self._buffered -= n
        self._dirty.pop(buf, None)

    def _drop_sealed(self, buf: _Buffer, sealed: _Sealed) -> None:
        # Waiters are released by _update_busy once the buffer is idle: a dropped queued batch
        # must not release a waiter for the (older) batch still in flight.
        sealed.abandoned = True
        self._buffered -= sealed.nbytes + _MEMORY_EXTRA * sealed.count

    def _mark_done(self, buf: _Buffer, serial: int) -> None:
        if serial > buf.done_serial:
            buf.done_serial = serial
        if buf.waiters:
            ready = [d for s, d in buf.waiters if s <= buf.done_serial]
            buf.waiters = [(s, d) for s, d in buf.waiters if s > buf.done_serial]
            for d in ready:
                d.callback(None)

    def _wait_done(self, buf: _Buffer, serial: int) -> defer.Deferred:
        if buf.done_serial >= serial:
            return defer.succeed(None)
        d = defer.Deferred()
        buf.waiters.append((serial, d))
        return d

    def _update_busy(self, buf: _Buffer) -> None:
        if buf.inflight is None and not buf.queue:
            self._busy.discard(buf)
            # Nothing before this point can still be waited for.
            self._mark_done(buf, buf.serial)
        else:
            self._busy.add(buf)

    def _set_failing(self, buf: _Buffer, failing: bool) -> None:
        """Mark ``buf``'s in-flight batch as failing or not; report a flip of ``healthy``."""
        was_healthy = not self._failing
        if failing:
            self._failing.add(buf)
        else:
            self._failing.discard(buf)
        healthy = not self._failing
        if healthy != was_healthy:
            try:
                self._on_health_change(healthy)
            except Exception:
                log.failure("reporting the writer's health failed")

    def _pause(self) -> None:
        self._paused = True
        self._metrics.backpressure(True)
        self._metrics.buffered(self._buffered)
        try:
            self._on_pause()
        except Exception:
            log.failure("pausing ingest failed")

    def _after_decrease(self) -> None:
        self._metrics.buffered(self._buffered)
        if self._paused and self._buffered < self._low_water:
            self._paused = False
            self._metrics.backpressure(False)
            try:
                self._on_resume()
            except Exception:
                log.failure("resuming ingest failed")

    def _maybe_stopped(self) -> None:
        if not self._stopping or self._stop_done or self._busy:
            return
        self._stop_done = True
        if self._stop_deadline is not None and self._stop_deadline.active():
            self._stop_deadline.cancel()
        self._stop_deadline = None
        deferreds, self._stop_deferreds = self._stop_deferreds, []
        for d in deferreds:
            d.callback(None)

    def _give_up(self) -> None:
        """Stop timeout: abandon whatever is still queued, failing or in flight."""
        self._stop_deadline = None
        lost: dict[str, int] = {}
        for buf in list(self._busy):
            batches = list(buf.queue)
            if buf.inflight is not None:
                batches.insert(0, buf.inflight)
            buf.queue.clear()
            buf.inflight = None
            if buf.retry_call is not None and buf.retry_call.active():
                buf.retry_call.cancel()
            buf.retry_call = None
            for sealed in batches:
                lost[buf.describe()] = lost.get(buf.describe(), 0) + sealed.count
                self._drop_sealed(buf, sealed)
            self._update_busy(buf)
        for buf in list(self._failing):
            self._set_failing(buf, False)
        if lost:
            log.error(
                "writer stop timed out after {timeout}s: {total} messages were not stored: "
                "{lost}",
                timeout=self._stop_timeout,
                total=sum(lost.values()),
                lost=", ".join(f"{key}: {n}" for key, n in sorted(lost.items())),
            )
        self._after_decrease()
        self._maybe_stopped()
