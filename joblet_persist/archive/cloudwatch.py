"""The CloudWatch shipper: replays durable local data to CloudWatch Logs and metrics.

Reactor thread (the blocking reads and calls run on the backend's own pool).

Local storage stays the write path: the shipper reads what storage has
published (fsync'd) through the storage read API (``IJobSnapshot.iter_logs``,
``iter_metrics``, ``iter_events``), so ingest never waits for CloudWatch.
Every ``interval`` a round runs:

1. DeleteJob's pending stream deletions (recorded durably in the cursor file
   before DeleteJob answered) are carried out.
2. Every stored job is looked at (jobs found fully shipped and not written
   since are skipped): for each kind of its data that ``routes`` ships, the
   messages past the stream's cursor that the route lets go (``durable``: all
   published ones; ``close``: those of closed segments, all once the job is
   idle; ``idle``: all once the job is idle) are the backlog.
3. Each stream's backlog is read in chunks (at most ``READ_MESSAGES``
   messages or ``READ_BYTES`` bytes), encoded (cloudwatch_codec), cut into
   PutLogEvents batches that honour every limit, and sent in order; the
   metrics stream's samples also go to PutMetricData.  After each batch the
   stream's cursor moves past the messages it completed; the cursor file
   (``<dataDir>/archive_cloudwatch.json``) is replaced atomically at most once
   a second and at the end of every round.

A cursor is ``[segment index, messages of that segment shipped]``: counting
from a segment keeps it valid when retention drops older (shipped) segments.
Delivery is at least once: a crash or failure after a batch was accepted and
before the cursor file was written sends that batch again (readers drop a
repeated first part of a split chunk).

Failures: throttling, service unavailable, HTTP 5xx and connection errors end
the round and are retried after a delay doubling from ``retryInitial`` up to
``retryMax`` with jitter (x0.5 to x1.5).  Any other error is counted and
reported (log, metrics, health) and that one stream is retried with the same
backoff while the others go on: nothing is skipped silently.  Messages
CloudWatch would refuse for their timestamp (older than 14 days or more than
2 hours ahead) are not sent: they are counted, stay in local storage, and
their segments are never reported as archived to retention.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet import defer, task
from zope.interface import implementer

from joblet_persist.archive import cloudwatch_api as api
from joblet_persist.archive import cloudwatch_codec as codec
from joblet_persist.archive.cloudwatch_tier import merge_job_info, remote_job_info
from joblet_persist.debounce import PendingWrites
from joblet_persist.logs import Logger
from joblet_persist.retention import IArchivedCheck
from joblet_persist.storage import safefs
from joblet_persist.storage.api import (
    EVENT_OF_KIND,
    KINDS_OF_PART,
    PART_OF_KIND,
    STREAM_STDERR,
    STREAM_STDOUT,
    SegmentKind,
)
from joblet_persist.storage.segment import segment_index
from joblet_persist.threads import reactor_only

CURSOR_FILENAME = "archive_cloudwatch.json"
CURSOR_VERSION = 1
#: At most this many messages, or about this many bytes, are read per chunk of a stream.
READ_MESSAGES = 20_000
READ_BYTES = 8 * 1024 * 1024


def cursor_path(data_dir: str) -> str:
    return os.path.join(data_dir, CURSOR_FILENAME)


# -- the durable cursor ----------------------------------------------------------------


@dataclass
class Cursors:
    """How far each stream was shipped, the pending deletions, the kept segments.

    ``streams[job][kind] = [segment index, messages of it shipped]``;
    ``kept[job][kind] = [segment indexes]`` of segments holding messages not
    sent for their timestamp; ``deletes[job] = when DeleteJob asked``.
    ``jobs[job]`` is the job's summary (JobInfo fields) as last seen locally: what
    GetJobInfo answers once the local copy is gone (cloudwatch_tier).
    ``target`` is (log group, node id): a file written for another target is
    ignored (everything is shipped to the new one).  Reactor thread.
    """

    target: tuple
    streams: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    deletes: dict = field(default_factory=dict)
    jobs: dict = field(default_factory=dict)

    def get(self, job_id: str, kind: str) -> tuple[int, int]:
        seg, n = self.streams.get(job_id, {}).get(str(kind), (0, 0))
        return seg, n

    def set(self, job_id: str, kind: str, seg: int, n: int) -> None:
        self.streams.setdefault(job_id, {})[str(kind)] = [seg, n]

    def keep(self, job_id: str, kind: str, segs) -> None:
        if segs:
            have = self.kept.setdefault(job_id, {}).setdefault(str(kind), [])
            have.extend(s for s in sorted(set(segs)) if s not in have)

    def forget_job(self, job_id: str) -> None:
        self.streams.pop(job_id, None)
        self.kept.pop(job_id, None)
        self.jobs.pop(job_id, None)

    def to_bytes(self) -> bytes:
        group, node_id = self.target
        doc = {"version": CURSOR_VERSION, "log_group": group, "node_id": node_id,
               "streams": self.streams, "kept": self.kept, "deletes": self.deletes,
               "jobs": self.jobs}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, target: tuple) -> Cursors:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != CURSOR_VERSION:
            raise ValueError("unknown cursor file version")
        if (doc.get("log_group"), doc.get("node_id")) != tuple(target):
            return cls(tuple(target))
        streams, kept, deletes = doc.get("streams"), doc.get("kept"), doc.get("deletes")
        jobs = doc.get("jobs", {})
        if not all(isinstance(v, dict) for v in (streams, kept, deletes, jobs)):
            raise ValueError("cursor streams/kept/deletes/jobs are not objects")
        for kinds in streams.values():
            for pos in kinds.values():
                if not (isinstance(pos, list) and len(pos) == 2
                        and all(isinstance(v, int) and v >= 0 for v in pos)):
                    raise ValueError(f"bad cursor {pos!r}")
        return cls(tuple(target), streams, kept, deletes, jobs)


def thd_read_cursors(data_dir: str) -> Optional[bytes]:
    """The cursor file's bytes, None when there is none.  Pool thread."""
    return safefs.thd_read_state_file(cursor_path(data_dir))


def thd_write_cursors(data_dir: str, data: bytes,
                      modes: safefs.FileModes = safefs.DEFAULT_MODES) -> None:
    """Replace the cursor file atomically (safefs.thd_replace_file).  Pool thread."""
    safefs.thd_replace_file(cursor_path(data_dir), data, modes)


# -- reading a stream's backlog (pool thread) ----------------------------------------------


def segment_counts(snapshot, kind: SegmentKind) -> list[tuple[int, int]]:
    """``[(segment index, messages)]`` of one kind of a published local snapshot.  Any thread."""
    return [(segment_index(v.path, 0), sum(m.count for m in v.members))
            for v in snapshot.views(kind)]


def position_to_offset(counts: list, seg: int, n: int) -> int:
    """The read offset of cursor ``(seg, n)`` over the segments present now."""
    offset = 0
    for index, count in counts:
        if index < seg:
            offset += count
        elif index == seg:
            offset += min(n, count)
    return offset


def offset_to_position(counts: list, offset: int) -> tuple[int, int]:
    """The cursor of read offset ``offset``: the segment it falls in, and how far."""
    for index, count in counts:
        if offset < count:
            return index, offset
        offset -= count
    if counts:
        last, count = counts[-1]
        return last, count + offset
    return 0, offset


@dataclass
class Prepared:
    """A chunk of one stream read and encoded: its batches and what else they carry."""

    read: int  # messages read (the cursor moves this far once every batch is sent)
    batches: list
    out_of_range: list  # offsets (from the chunk's start) of messages not sent
    datums: Optional[list] = None  # metrics: per message, its PutMetricData datums
    nbytes: int = 0


def thd_prepare(snapshot, kind: SegmentKind, offset: int, limit: int, now_ms: int,
                node_id: str, dimensions: tuple) -> Prepared:
    """Read up to ``limit`` messages of ``kind`` from ``offset`` and plan their batches.

    Pool thread; reads through the snapshot's published data only.
    """
    limit = min(limit, READ_MESSAGES)
    messages: list = []
    datums: Optional[list] = [] if kind is SegmentKind.METRICS else None
    nbytes = 0
    if kind in (SegmentKind.STDOUT, SegmentKind.STDERR):
        stream = STREAM_STDOUT if kind is SegmentKind.STDOUT else STREAM_STDERR
        records = snapshot.iter_logs(stream, offset=offset, limit=limit)
        try:
            for rec in records:
                messages.append((codec.ns_to_ms(rec.timestamp), codec.encode_chunk(rec.content)))
                nbytes += len(rec.content)
                if nbytes >= READ_BYTES:
                    break
        finally:
            records.close()
    else:
        if kind is SegmentKind.METRICS:
            records = snapshot.iter_metrics(offset=offset, limit=limit)
        else:
            records = snapshot.iter_events(EVENT_OF_KIND[kind], offset=offset, limit=limit)
        try:
            for rec in records:
                ts = codec.ns_to_ms(rec.timestamp)
                parts = codec.encode_record(rec.timestamp, rec.sequence, rec.data)
                messages.append((ts, parts))
                nbytes += sum(len(p) for p in parts)
                if datums is not None:
                    datums.append(api.metric_datums(snapshot.job_id, node_id, dimensions, ts,
                                                    rec.data))
                if nbytes >= READ_BYTES:
                    break
        finally:
            records.close()
    batches, _n = codec.plan_batches(messages, now_ms)
    skipped = [i for i, (ts, _p) in enumerate(messages) if not codec.in_range(ts, now_ms)]
    return Prepared(len(messages), batches, skipped, datums, nbytes)


# -- the shipper ---------------------------------------------------------------------------


@implementer(IArchivedCheck)
class CloudWatchShipper:
    """Ships routed kinds of every stored job to CloudWatch; retention's IArchivedCheck.

    ``run`` runs blocking work on the backend's own pool; ``make_clients``
    builds the boto3 clients there (``cloudwatch_api.make_clients``).  ``wall``
    is the wall clock (CloudWatch's time limits are wall time), ``jitter``
    returns a float in [0, 1).
    """

    log = Logger()
    cursor_interval = 1.0

    def __init__(self, cfg, node_id: str, data_dir: str, storage, clock, run, *,
                 make_clients: Callable = api.make_clients, metrics=None,
                 wall: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random, modes=None):
        self._cfg = cfg
        self._node_id = node_id
        self._data_dir = data_dir
        self._storage = storage
        self._clock = clock
        self._run = run
        self._make_clients = make_clients
        self._metrics = metrics
        self._wall = wall
        self._jitter = jitter
        self._modes = modes
        self.group = api.log_group(cfg.log_group_prefix, node_id)
        self._kinds = tuple(k for k in SegmentKind
                            if cfg.route(PART_OF_KIND[k].value) != "never")
        self._cursors = Cursors((self.group, node_id))
        self._clients = None
        self._write_lock = defer.DeferredLock()
        self._stopping = threading.Event()
        self._loop: Optional[task.LoopingCall] = None
        self._round: Optional[defer.Deferred] = None
        self._group_ready = False
        self._streams_ready: set = set()
        self._counts: dict = {}  # (job, kind) -> [(segment index, messages)] at the last look
        self._looked_at: dict = {}  # job -> wall time of the last look
        self._settled: dict = {}  # job -> last_updated when found fully shipped
        self._pending_since: dict = {}  # (job, kind) -> wall time backlog was first seen
        self._backlog: dict = {}  # (job, kind) -> unshipped messages the route lets go
        self._blocked: dict = {}  # (job, kind) -> (failures, retry at, error) after a refusal
        self._failures = 0
        self._retry_at = 0.0
        self._unwritten = PendingWrites(clock)  # cursor changes not yet in the file
        self.last_error: Optional[str] = None
        self.shipped_events = 0
        self.shipped_messages = 0
        self.shipped_bytes = 0
        self.put_calls = 0
        self.metric_datums = 0
        self.out_of_range = 0
        self.rejected = 0
        self.errors = 0
        self.deleted_streams = 0
        self.rounds = 0

    # -- lifecycle ------------------------------------------------------------------

    @reactor_only
    @defer.inlineCallbacks
    def start(self):
        """Read the cursor file, build the clients (on the pool), start the rounds."""
        try:
            data = yield self._run(thd_read_cursors, self._data_dir)
            if data is not None:
                self._cursors = Cursors.from_bytes(data, (self.group, self._node_id))
        except (OSError, ValueError) as e:
            self.log.error(
                "cloudwatch: {path} is unreadable ({error}); every stream is shipped again",
                path=cursor_path(self._data_dir), error=str(e),
            )
        self._clients = yield self._run(self._make_clients, self._cfg)
        self._loop = task.LoopingCall(self._start_round)
        self._loop.clock = self._clock
        self._loop.start(self._cfg.interval, now=True)

    @reactor_only
    def stop(self):
        """Stop the rounds; waits for a round in progress (it ends after its current call)."""
        self._stopping.set()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        current = self._round
        if current is None or current.called:
            return defer.succeed(None)
        waiter = defer.Deferred()
        current.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def run_round(self) -> defer.Deferred:
        """Start a round now (unless one runs); fires when the running round ends.  Tests."""
        self._start_round()
        return self._round if self._round is not None else defer.succeed(None)

    # -- monitoring -------------------------------------------------------------------

    def set_metrics(self, metrics) -> None:
        """Report to ``metrics`` (metrics.CloudWatchMetrics)."""
        self._metrics = metrics

    @property
    def backlog_messages(self) -> int:
        return sum(self._backlog.values())

    def oldest_unshipped_seconds(self) -> float:
        """How long the oldest stream with a backlog has had one; 0 when none."""
        if not self._pending_since:
            return 0.0
        return max(0.0, self._wall() - min(self._pending_since.values()))

    def health_check(self) -> tuple:
        """``(ok, detail, extra)`` for the health monitor."""
        cfg = self._cfg
        backlog = self.backlog_messages
        age = self.oldest_unshipped_seconds()
        problems = []
        if cfg.backlog_unhealthy_messages and backlog > cfg.backlog_unhealthy_messages:
            problems.append(
                f"backlog {backlog} messages over archive.cloudwatch.backlogUnhealthyMessages "
                f"({cfg.backlog_unhealthy_messages})"
            )
        if cfg.backlog_unhealthy_age and age > cfg.backlog_unhealthy_age:
            problems.append(
                f"oldest unshipped data waiting {age:.0f}s, over "
                f"archive.cloudwatch.backlogUnhealthyAge ({cfg.backlog_unhealthy_age:.0f}s)"
            )
        if problems:
            detail = "; ".join(problems)
        elif self.last_error:
            detail = f"CloudWatch calls failing, retrying: {self.last_error}"
        elif self._blocked:
            (job_id, kind), (_n, _at, error) = min(self._blocked.items())
            detail = (f"{len(self._blocked)} streams refused, retrying: "
                      f"{api.stream_name(job_id, kind)}: {error}")
        else:
            detail = "shipping"
        extra = {
            "backlog_messages": backlog,
            "oldest_unshipped_seconds": round(age, 1),
            "consecutive_failures": self._failures,
            "blocked_streams": len(self._blocked),
            "out_of_range_messages": self.out_of_range,
        }
        return (not problems, detail, extra)

    # -- what the CloudWatch tier reads (cloudwatch_tier) ---------------------------------

    @property
    def logs_client(self):
        """The boto3 "logs" client (thread-safe), None before start."""
        return self._clients.logs if self._clients is not None else None

    def remote_info(self, job_id: str):
        """The job's summary as last seen locally, if CloudWatch holds some of its data;
        else None.  Reactor thread."""
        if not self.holds(job_id):
            return None
        return remote_job_info(self._cursors.jobs.get(job_id))

    def holds(self, job_id: str) -> bool:
        """Whether CloudWatch holds some of the job's data (not being deleted).  Any thread
        (membership tests and reads of entries replaced whole)."""
        if job_id in self._cursors.deletes:
            return False
        kinds = self._cursors.streams.get(job_id)
        return bool(kinds) and any(pos != [0, 0] for pos in list(kinds.values()))

    def remote_summary(self, job_id: str):
        """The job's kept summary (a dict of JobInfo fields, never mutated) or None.

        Any thread: each entry is replaced whole on the reactor, never changed in place.
        """
        return self._cursors.jobs.get(job_id)

    # -- IArchivedCheck (retention) ------------------------------------------------------

    def segment_archived(self, job_id: str, kind, index: int) -> bool:
        kind = SegmentKind(kind)
        if kind not in self._kinds:
            return True
        if index in self._cursors.kept.get(job_id, {}).get(str(kind), ()):
            return False  # holds messages CloudWatch would not take: kept here
        counts = self._counts.get((job_id, kind))
        if counts is None:
            return False
        seg, n = self._cursors.get(job_id, kind)
        if index < seg:
            return True
        if index > seg:
            return False
        return any(i == index and n >= c for i, c in counts)

    def part_archived(self, job_id: str, part) -> bool:
        kinds = [k for k in KINDS_OF_PART[part] if k in self._kinds]
        if not kinds:
            return True
        info = self._storage.job_info(job_id)
        looked = self._looked_at.get(job_id)
        if job_id in self._cursors.deletes or looked is None:
            return False
        if info is not None and info.last_updated >= int(looked) - 1:
            return False  # written since (or just before) the last look
        for kind in kinds:
            if self._cursors.kept.get(job_id, {}).get(str(kind)):
                return False
            counts = self._counts.get((job_id, kind), [])
            seg, n = self._cursors.get(job_id, kind)
            if position_to_offset(counts, seg, n) < sum(c for _i, c in counts):
                return False
        return True

    # -- DeleteJob -------------------------------------------------------------------------

    @reactor_only
    def delete_job(self, job_id: str) -> defer.Deferred:
        """Record that the job's streams must go; fires once that is durable.

        The streams are deleted in the next round and retried until CloudWatch
        confirms.  Metric data already sent through PutMetricData cannot be
        deleted (CloudWatch has no API for it): it expires after 15 months.
        """
        self._cursors.deletes[job_id] = int(self._wall())
        self._cursors.forget_job(job_id)
        for key in [k for k in self._backlog if k[0] == job_id]:
            self._forget_stream(key)
        self._settled.pop(job_id, None)
        self._looked_at.pop(job_id, None)
        return self._write_cursors()

    #: What DeleteJob's reply adds when this backend is configured.
    delete_note = ("its CloudWatch log streams are deleted; metric data already sent "
                   "through PutMetricData cannot be deleted (it expires after 15 months)")

    # -- rounds ------------------------------------------------------------------------------

    def _start_round(self):
        if self._round is not None and not self._round.called:
            return None
        d = self._round = self._one_round()
        d.addErrback(lambda f: self.log.failure("cloudwatch: round failed", f))
        return None

    @reactor_only
    @defer.inlineCallbacks
    def _one_round(self):
        self.rounds += 1
        remote_ok = self._clock.seconds() >= self._retry_at
        try:
            try:
                if remote_ok:
                    yield self._carry_out_deletes()
                work = yield self._look()
                if remote_ok:
                    yield self._ship(work)
            finally:
                if self._unwritten.count:
                    yield self._flush_cursors()
        except _RemoteFailed as e:
            self._remote_failed(e.args[0], e.args[1])

    @defer.inlineCallbacks
    def _carry_out_deletes(self):
        for job_id in sorted(self._cursors.deletes):
            if self._stopping.is_set():
                return
            try:
                n = yield self._run(api.thd_delete_job_streams, self._clients, self.group, job_id)
            except Exception as e:
                raise _RemoteFailed(f"deleting the log streams of job {job_id}", e) from None
            self.deleted_streams += n
            if self._metrics is not None:
                self._metrics.deleted(n)
            self._streams_ready = {s for s in self._streams_ready if s[0] != job_id}
            self._cursors.deletes.pop(job_id, None)
            yield self._write_cursors()
            self.log.info("cloudwatch: deleted {n} log streams of job {job}", n=n, job=job_id)

    @defer.inlineCallbacks
    def _look(self):
        """Open every job that may have unshipped data; the streams with a backlog."""
        wall = self._wall()
        idle_before = wall - self._cfg.idle_after
        work = []
        present = set()
        for info in self._storage.list_jobs():
            job_id = info.job_id
            present.add(job_id)
            if job_id in self._cursors.deletes:
                continue
            if self._settled.get(job_id) == info.last_updated:
                continue
            snapshot = yield self._storage.open_job(job_id)
            if snapshot is None:
                continue
            self._looked_at[job_id] = wall
            old = self._cursors.jobs.get(job_id)
            if old is not None and old.get("created_at", 0) < snapshot.info.created_at:
                # Local retention removed the whole job and new data started it afresh
                # (segment 0 again): its streams go on from there.
                self._cursors.streams.pop(job_id, None)
                self._cursors.kept.pop(job_id, None)
            fields = merge_job_info(old, snapshot.info)
            if self._cursors.jobs.get(job_id) != fields:
                self._cursors.jobs[job_id] = fields
                self._unwritten.note(self.cursor_interval)
            idle = snapshot.info.last_updated <= idle_before
            pending = False
            for kind in self._kinds:
                counts = segment_counts(snapshot, kind)
                self._counts[(job_id, kind)] = counts
                seg, n = self._cursors.get(job_id, kind)
                offset = position_to_offset(counts, seg, n)
                due = self._due(kind, counts, idle)
                key = (job_id, kind)
                if due > offset:
                    pending = True
                    self._backlog[key] = due - offset
                    self._pending_since.setdefault(key, wall)
                    work.append((job_id, kind, snapshot, offset, due))
                else:
                    self._forget_stream(key, keep_counts=True)
                if sum(c for _i, c in counts) > due:
                    pending = True  # held back by the route: look again next round
            if not pending and info.last_updated < int(wall) - 1:
                self._settled[job_id] = info.last_updated
        for key in [k for k in self._backlog if k[0] not in present]:
            self._forget_stream(key)  # the job is gone locally (retention, DeleteJob)
        for key in [k for k in self._counts if k[0] not in present]:
            del self._counts[key]
        return work

    def _due(self, kind: SegmentKind, counts: list, idle: bool) -> int:
        """How many of the stream's messages its route lets go now."""
        total = sum(c for _i, c in counts)
        when = self._cfg.route(PART_OF_KIND[kind].value)
        if when == "durable" or idle and when in ("close", "idle"):
            return total
        if when == "close":
            return total - (counts[-1][1] if counts else 0)
        return 0

    def _forget_stream(self, key, keep_counts: bool = False) -> None:
        self._backlog.pop(key, None)
        self._pending_since.pop(key, None)
        if not keep_counts:
            self._counts.pop(key, None)

    @defer.inlineCallbacks
    def _ship(self, work):
        now = self._clock.seconds()
        for job_id, kind, snapshot, offset, due in work:
            if self._stopping.is_set():
                return
            key = (job_id, kind)
            blocked = self._blocked.get(key)
            if blocked is not None and now < blocked[1]:
                continue
            try:
                yield self._ship_stream(job_id, kind, snapshot, offset, due)
            except _StreamRefused as e:
                self._stream_refused(key, e.args[0], e.args[1])
                continue
            self._blocked.pop(key, None)

    @defer.inlineCallbacks
    def _ship_stream(self, job_id, kind, snapshot, offset, due):
        cfg = self._cfg
        key = (job_id, kind)
        name = api.stream_name(job_id, kind)
        counts = self._counts.get(key, [])
        while offset < due and not self._stopping.is_set():
            now_ms = int(self._wall() * 1000)
            try:
                prepared = yield self._run(thd_prepare, snapshot, kind, offset, due - offset,
                                           now_ms, self._node_id, cfg.metric_dimensions)
            except Exception as e:
                # A local read failed (data deleted under it, I/O error): not CloudWatch's
                # fault; the stream is looked at again next round.
                self.log.info("cloudwatch: reading {stream} failed: {error}",
                              stream=name, error=str(e))
                return
            if prepared.read == 0:
                return
            if not self._group_ready:
                yield self._call(f"creating log group {self.group}", key,
                                 api.thd_ensure_group, self._clients, cfg, self.group)
                self._group_ready = True
            done = 0
            skipped = set(prepared.out_of_range)
            for batch in prepared.batches:
                ready = key in self._streams_ready
                result = yield self._call(f"PutLogEvents to {name}", key, api.thd_put_log_events,
                                          self._clients, cfg, self.group, name, batch.events,
                                          ready)
                self._streams_ready.add(key)
                refused = result.too_old + result.too_new + result.expired
                if refused:
                    self.rejected += refused
                    if self._metrics is not None:
                        self._metrics.rejected(refused)
                    self.log.warn("cloudwatch: {stream}: CloudWatch refused {n} events for "
                                  "their timestamps; they stay in local storage",
                                  stream=name, n=refused)
                if prepared.datums is not None:
                    datums = [d for i in range(done, batch.done) for d in prepared.datums[i]
                              if i not in skipped]
                    if datums:
                        yield self._call(f"PutMetricData for job {job_id}", key,
                                         api.thd_put_metric_data, self._clients,
                                         cfg.metric_namespace, datums)
                        self.metric_datums += len(datums)
                        if self._metrics is not None:
                            self._metrics.datums(len(datums))
                self.put_calls += 1
                self.shipped_events += len(batch.events)
                self.shipped_bytes += batch.size
                if self._metrics is not None:
                    self._metrics.shipped(len(batch.events), batch.size)
                flush = self._advance(job_id, kind, counts, offset, done, batch.done, prepared)
                done = batch.done
                if flush:
                    yield self._flush_cursors()
                self._failures, self.last_error = 0, None
            # Messages after the last batch were all out of range: the cursor passes them.
            if self._advance(job_id, kind, counts, offset, done, prepared.read, prepared):
                yield self._flush_cursors()
            offset += prepared.read
            if self._backlog.get(key):
                self._backlog[key] = max(0, due - offset)
        if offset >= due:
            self._forget_stream(key, keep_counts=True)

    def _advance(self, job_id, kind, counts, start, done, upto, prepared) -> bool:
        """Move the stream's cursor past messages ``done..upto`` of the chunk at ``start``;
        True when the cursor file is due to be written."""
        if upto <= done:
            return False
        skipped = [i for i in prepared.out_of_range if done <= i < upto]
        if skipped:
            self.out_of_range += len(skipped)
            if self._metrics is not None:
                self._metrics.out_of_range(len(skipped))
            self._cursors.keep(job_id, kind,
                               [offset_to_position(counts, start + i)[0] for i in skipped])
        self.shipped_messages += upto - done - len(skipped)
        seg, n = offset_to_position(counts, start + upto)
        self._cursors.set(job_id, kind, seg, n)
        key = (job_id, kind)
        if key in self._backlog:
            self._backlog[key] = max(0, self._backlog[key] - (upto - done))
        return self._unwritten.note(self.cursor_interval)

    @defer.inlineCallbacks
    def _call(self, what: str, key, f, *args):
        """Run one CloudWatch call on the pool; classify its failure."""
        try:
            result = yield self._run(f, *args)
        except Exception as e:
            if api.is_retryable(e):
                raise _RemoteFailed(what, e) from None
            raise _StreamRefused(what, e) from None
        return result

    def _stream_refused(self, key, what: str, error: Exception) -> None:
        failures = self._blocked.get(key, (0, 0.0, ""))[0] + 1
        delay = self._delay(failures)
        self._blocked[key] = (failures, self._clock.seconds() + delay, f"{what}: {error}")
        self.errors += 1
        if self._metrics is not None:
            self._metrics.error("refused")
        self.log.error("cloudwatch: {what} failed ({error}); this stream is retried in "
                       "{delay:.1f}s, its data stays in local storage",
                       what=what, error=str(error), delay=delay)

    def _remote_failed(self, what: str, error: Exception) -> None:
        self._failures += 1
        self.errors += 1
        if self._metrics is not None:
            self._metrics.error("retryable")
        delay = self._delay(self._failures)
        self._retry_at = self._clock.seconds() + delay
        self.last_error = f"{what}: {error}"
        self.log.warn("cloudwatch: {what} failed ({error}); retrying in {delay:.1f}s "
                      "(backlog {backlog} messages)",
                      what=what, error=str(error), delay=delay, backlog=self.backlog_messages)

    def _delay(self, failures: int) -> float:
        cfg = self._cfg
        delay = min(cfg.retry_max, cfg.retry_initial * 2 ** min(failures - 1, 30))
        return delay * (0.5 + self._jitter())

    def _flush_cursors(self):
        self._unwritten.writing()
        return self._write_cursors()

    def _write_cursors(self) -> defer.Deferred:
        def write():
            data = self._cursors.to_bytes()
            if self._modes is None:
                return self._run(thd_write_cursors, self._data_dir, data)
            return self._run(thd_write_cursors, self._data_dir, data, self._modes)

        return self._write_lock.run(write)


@implementer(IArchivedCheck)
class AllArchived:
    """Retention's IArchivedCheck over several archives: taken only when all took it."""

    def __init__(self, *archives):
        self._archives = [a for a in archives if a is not None]

    def segment_archived(self, job_id, kind, index) -> bool:
        return all(a.segment_archived(job_id, kind, index) for a in self._archives)

    def part_archived(self, job_id, part) -> bool:
        return all(a.part_archived(job_id, part) for a in self._archives)


class _RemoteFailed(Exception):
    """A retryable CloudWatch failure ``(what, error)``: ends the round."""


class _StreamRefused(Exception):
    """Another CloudWatch failure ``(what, error)``: this stream waits, the others go on."""
