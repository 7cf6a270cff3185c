"""LocalStorage: the local-directory storage backend.

Layout under ``data_dir``::

    logs/<job>/stdout.log.gz  stdout_000001.log.gz ...   (segments of stdout)
    logs/<job>/stderr.log.gz  stderr_000001.log.gz ...
    metrics/<job>/metrics.jsonl.gz  metrics_000001.jsonl.gz ...
    events/<job>/exec_events.jsonl.gz  exec_events_000001.jsonl.gz ...  (one set per event kind)
    job_index.json

Threading: ``LocalStorage`` is a reactor-side object.  Every method documented
"reactor thread" mutates its state and must run on the reactor thread; the
blocking work (scanning headers, compressing, appending, fsync, rmtree) is
handed to the injected ``run_in_thread`` runner as module-level ``thd_*``
functions that only take arguments and return results.  The results are
applied back on the reactor thread, which then *publishes* them: it builds a
new immutable ``LocalJobSnapshot`` (sharing the unchanged tuples) and stores it
in a dict.  Methods documented "any thread" only read those dicts and the
immutable objects in them (a single dict lookup or ``dict.copy()``, atomic in
CPython), so gRPC threads never see a partially applied append.

Persistent ordinals: every stored message carries an ordinal that orders both
streams of a job in arrival order, also across restarts.  When a job is
loaded its ordinal base is the largest ordinal in its files + 1; a batch's
ordinals are ``base + arrival`` (arrivals come from the writer, strictly
increasing per job within one process run).

LocalStorage decides when things happen and composes the pieces that hold
each concern: ``catalog.JobCatalog`` (the job index in memory and its
debounced write), ``gate.JobGate`` (per-job work in flight, exclusive
deletions), ``loaded.LoadedJobs`` (jobs in memory, their loading and
snapshots), ``jobstate.JobState`` (a job's segments and counts),
``findings.Findings`` (what was found wrong on disk), ``syncer.DirtyPaths``
(the "interval" fsync policy), ``snapshot`` (the published view) and
``diskwork`` (the ``thd_*`` pool work).

This module may create Deferreds because it is the reactor-side half of the
storage package; it never imports the reactor: the clock and the thread runner
are injected.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from joblet_persist import events
from joblet_persist.logs import Logger
from joblet_persist.storage import jobindex, safefs, segment, space
from joblet_persist.storage.api import (
    KIND_OF_EVENT,
    KIND_OF_STREAM,
    EventBatch,
    ICompressionBacklog,
    IFreeSpace,
    IIdleUnload,
    IOrdinalBase,
    IRetentionSegments,
    IStorageBackend,
    JobInfo,
    LogBatch,
    MetricBatch,
    Part,
    SegmentKind,
    SpaceProbe,
    StorageUnavailable,
    check_job_id,
)
from joblet_persist.storage.catalog import JobCatalog
from joblet_persist.storage.compress import FixedLevel, ILevelPolicy
from joblet_persist.storage.diskwork import (
    ALL_TOPS,
    PART_TOPS,
    AppendResult,
    thd_append_events,
    thd_append_logs,
    thd_append_metrics,
    thd_remove_file,
    thd_remove_job,
    thd_then_dispose,
)
from joblet_persist.storage.durability import FSYNC_POLICIES
from joblet_persist.storage.files import FileBudget
from joblet_persist.storage.findings import Findings, NullStorageMetrics
from joblet_persist.storage.gate import JobGate
from joblet_persist.storage.jobstate import JobState
from joblet_persist.storage.loaded import LoadedJobs
from joblet_persist.storage.snapshot import LocalJobSnapshot
from joblet_persist.storage.syncer import DirtyPaths
from joblet_persist.threads import reactor_only

#: Every segment kind, for membership tests that any value may take (a tuple: no hashing).
_SEGMENT_KINDS = tuple(SegmentKind)


def _unavailable(failure: Failure, what: str) -> Failure:
    """Errback: an OSError of ``what`` (a deletion) as StorageUnavailable.  Reactor thread."""
    if failure.check(OSError):
        raise StorageUnavailable(f"{what} failed: {failure.value}") from failure.value
    return failure


# -- reactor-side state ---------------------------------------------------------


def _finding(name: str) -> property:
    return property(lambda self: getattr(self.findings, name), doc=f"findings.{name}")


@implementer(
    IStorageBackend, IRetentionSegments, IIdleUnload, IFreeSpace, IOrdinalBase, ICompressionBacklog
)
class LocalStorage:
    """IStorageBackend on a local directory of gzip segment files.

    Provides every optional capability of storage.api: segment-level
    retention, idle unloading and free-space probing; its snapshots provide
    IBulkLogReads.  OSErrors of reads and deletions leave it as the seam's
    errors (DataVanished, StorageUnavailable).

    ``run_in_thread(f, *args, **kwargs) -> Deferred`` runs blocking ``f`` on
    the CPU/IO pool.  ``clock`` provides ``seconds()`` and ``callLater``.
    ``fsync`` is "batch" (fsync each append before it is published),
    "interval" (append without fsync; ``sync_dirty()`` fsyncs what changed: it
    runs ``sync_interval`` seconds after the first unsynced append, with every
    index write, and on stop; the writer may also call it) or "never".
    ``metrics`` is an object with the methods of NullStorageMetrics.
    ``file_budget`` caps the files queries hold open at once (see
    storage.files); the pool's own files are bounded by its thread count.
    ``modes`` (safefs.FileModes) are the permissions and group of the files
    and directories it creates.  ``line_tables`` (storage.lineTables) lets
    members of newline-terminated messages carry line tables; False writes
    only the encoding older releases read.  Nothing under the data directory is followed
    through a symlink (see safefs): such entries are refused, logged and
    counted (``unsafe_entries``, metrics ``unsafe_entry()``).
    """

    # The counters of what was found wrong on disk (storage.findings), any thread.
    skipped_metric_payloads = _finding("skipped_metric_payloads")
    index_write_errors = _finding("index_write_errors")
    repaired_segments = _finding("repaired_segments")
    damaged_regions = _finding("damaged_regions")
    shrunk_segments = _finding("shrunk_segments")
    unsafe_entries = _finding("unsafe_entries")
    disordered_jobs = _finding("disordered_jobs")
    unsupported_segments = _finding("unsupported_segments")

    def __init__(
        self,
        data_dir: str,
        run_in_thread,
        *,
        compressor,
        segment_max_bytes: int,
        fsync: str,
        clock,
        index_interval: float = 5.0,
        sync_interval: float = 1.0,
        log: Optional[Logger] = None,
        metrics=None,
        file_budget: Optional[FileBudget] = None,
        modes: safefs.FileModes = safefs.DEFAULT_MODES,
        line_tables: bool = True,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"invalid fsync policy {fsync!r}: expected one of {FSYNC_POLICIES}")
        if segment_max_bytes <= 0:
            raise ValueError(f"segment_max_bytes must be positive, not {segment_max_bytes!r}")
        self._data_dir = data_dir
        self._index_path = jobindex.index_path(data_dir)
        self._run = run_in_thread
        # A level policy (compress.FixedLevel / AdaptiveLevel) picks each batch's
        # compressor; a plain Compressor is a fixed level.
        self._levels = (
            compressor if ILevelPolicy.providedBy(compressor) else FixedLevel(compressor)
        )
        self._segment_max_bytes = segment_max_bytes
        self._fsync = fsync
        self._clock = clock
        self._log = log if log is not None else Logger(namespace="joblet_persist.storage.local")
        self._metrics = metrics if metrics is not None else NullStorageMetrics()
        self._modes = modes
        # Whether members of newline-terminated messages get line tables (FLAG_LINES);
        # False writes only the encoding older releases read (storage.lineTables).
        self._line_tables = line_tables
        #: Shared by the snapshots' readers; None: only the per-query limit applies.
        self.file_budget = file_budget

        self._started = False
        self._stopped = False
        # The job index: published infos, totals, ListJobs' order, debounced writes.
        self._catalog = JobCatalog(clock, index_interval, self._write_index)
        # Work in flight per job, and deletions that need the job to themselves.
        self._gate = JobGate()
        #: What was found wrong on disk: counted, logged, reported (its counters
        #: are also LocalStorage attributes, above).
        self.findings = Findings(self._log, self._metrics)
        # Jobs in memory: their state, loading and published snapshots.
        self._jobs = LoadedJobs(
            data_dir, run_in_thread, clock, self._gate, self._catalog, self.findings, file_budget
        )
        # Reactor-only state.
        self._busy: set = set()  # (job, kind) with an append in flight
        # Paths to fsync under the "interval" policy, fsync'd within sync_interval.
        self._dirty = DirtyPaths(run_in_thread, clock, sync_interval, self._log)
        #: Jobs whose in-memory state was dropped by unload_idle.
        self.unloaded_jobs = 0

    # -- any thread ---------------------------------------------------------

    @property
    def data_dir(self) -> str:
        """The data directory.  Any thread."""
        return self._data_dir

    def snapshot(self, job_id: str) -> Optional[LocalJobSnapshot]:
        """The job's latest published snapshot if it is loaded, else None.  Any thread.

        Raises InvalidJobId for an invalid id.
        """
        check_job_id(job_id)
        return self._jobs.snapshot(job_id)

    @reactor_only
    def ordinal_base(self, job_id: str) -> Optional[int]:
        """IOrdinalBase: the loaded job's ordinal base, or None.  Reactor thread."""
        state = self._jobs.get(check_job_id(job_id))
        return None if state is None else state.base

    def job_info(self, job_id: str) -> Optional[JobInfo]:
        """The job's summary from the job index, or None.  Any thread."""
        check_job_id(job_id)
        return self._catalog.get(job_id)

    def list_jobs(self) -> tuple:
        """Every known job's JobInfo, sorted by job id.  Any thread (JobCatalog.list_jobs)."""
        return self._catalog.list_jobs()

    def totals(self) -> tuple[int, int, int, int]:
        """(jobs, log messages, metric samples, bytes) over the job index.  Any thread; O(1)."""
        return self._catalog.totals()

    def list_jobs_page(self, since: int, until: int, offset: int, limit: int):
        """ListJobs in O(log jobs + page): ``(total, infos)``.  Any thread.

        See JobCatalog.list_jobs_page.
        """
        return self._catalog.list_jobs_page(since, until, offset, limit)

    def event_totals(self) -> dict:
        """Event kind name -> stored events over the job index.  Any thread."""
        return self._catalog.event_totals()

    def part_sizes(self, job_id: str) -> tuple:
        """Bytes of each Part (logs, metrics, events) of a job in the index, zeros if unknown.

        Any thread.
        """
        return self._catalog.part_sizes(job_id)

    # -- reactor thread: lifecycle --------------------------------------------

    @reactor_only
    def start(self):
        """Load, rebuild or refresh the job index.  Reactor thread; Deferred."""
        d = self._run(jobindex.thd_open_index, self._data_dir, self._modes)
        d.addCallback(self._index_opened)
        return d

    def _index_opened(self, load: jobindex.IndexLoad):
        self._catalog.load(load.jobs, load.parts)
        self._started = True
        if load.rebuilt:
            self._log.info(
                "job index {path} {reason}: rebuilt from the files ({count} jobs)",
                path=self._index_path,
                reason=load.reason,
                count=len(self._catalog),
            )
        elif load.changed:
            self._log.info(
                "job index {path}: refreshed {count} jobs from the files",
                path=self._index_path,
                count=len(load.changed),
            )
        if load.needs_write:
            return self.flush_index().addCallback(lambda _: None)
        return None

    @reactor_only
    def stop(self):
        """Wait for work in flight, write the index, fsync dirty files.  Reactor thread; Deferred.

        Appends, loads and deletions after stop() fail with RuntimeError.
        """
        if self._stopped:
            return defer.succeed(None)
        self._stopped = True
        if not self._started:
            # Never loaded: writing the (empty) in-memory index would clobber the file.
            return defer.succeed(None)
        self._catalog.stop_writes()
        self._dirty.stop_timer()
        d = self._gate.wait_quiescent()
        d.addCallback(lambda _: self.flush_index())
        d.addCallback(lambda _: self.sync_dirty())
        d.addErrback(lambda f: self._log.failure("storage stop: fsync of dirty files failed", f))
        d.addCallback(lambda _: None)
        return d

    def _check_running(self):
        if not self._started:
            raise RuntimeError("LocalStorage is not started")
        if self._stopped:
            raise RuntimeError("LocalStorage is stopped")

    # -- reactor thread: loading a job -------------------------------------------

    @reactor_only
    def open_job(self, job_id: str):
        """Deferred firing with the job's snapshot, or None if the job is unknown.

        Reactor thread.  The first call scans the headers of the job's segments
        on the pool (cutting torn tails); concurrent calls share that scan;
        later calls fire at once.
        """
        try:
            check_job_id(job_id)
            self._check_running()
        except (ValueError, RuntimeError):
            return defer.fail()
        if self._gate.deleting(job_id):
            return self._gate.after_deletion(job_id, lambda: self.open_job(job_id))
        state = self._jobs.get(job_id)
        if state is not None:
            state.last_used = self._clock.seconds()
            return defer.succeed(self._jobs.snapshot(job_id))
        d = self._jobs.load(job_id)
        d.addCallback(lambda state: None if state is None else self._jobs.snapshot(job_id))
        return d

    def set_new_job_floor(self, floor) -> None:
        """``floor(job_id)`` -> ``({SegmentKind: index}, ordinal base)`` or None: what a
        remote tier (storage/tiered.py) still holds of a job.  When such a job gets data
        again (with no files here, or loaded from the files of a part that was not
        released), each kind's segments continue after those indexes and its ordinals
        from at least that base, so no segment name (an archive key) is reused and
        ordinal_base stays above the archived ordinals.  Reactor thread (called at
        wiring time)."""
        self._jobs.floor = floor

    @reactor_only
    def unload_idle(self, idle: float) -> int:
        """Forget the in-memory state of jobs not used for ``idle`` seconds.  Reactor thread.

        A job's segment list, member index and published snapshot are dropped
        when nothing was appended to it, loaded or opened for a query for
        ``idle`` seconds and no append, load or deletion of it is in flight;
        its job index entry stays.  The next append or query loads it again
        from its files (as after a restart), so memory follows the jobs in use,
        not every job on disk.  Queries holding an older snapshot read on
        undisturbed.  Returns the number of jobs unloaded.
        """
        cutoff = self._clock.seconds() - idle
        unloaded = self._jobs.unload(cutoff, self._in_flight)
        self.unloaded_jobs += unloaded
        return unloaded

    @reactor_only
    def resident(self, job_id: str) -> bool:
        """Whether the job's state is in memory or being loaded, written or deleted."""
        return job_id in self._jobs or self._in_flight(job_id)

    def _in_flight(self, job_id: str) -> bool:
        """A load, append or deletion of the job is in progress.  Reactor thread."""
        return self._gate.busy(job_id) or self._jobs.loading(job_id)

    @property
    def loaded_jobs(self) -> int:
        """Jobs whose state is in memory.  Any thread."""
        return len(self._jobs)

    # -- reactor thread: appends ---------------------------------------------------

    @reactor_only
    def append_logs(self, batch: LogBatch):
        """Append one log batch; Deferred firing with the bytes written.  Reactor thread.

        The batch is encoded and appended on the pool, then published.  On
        failure nothing is published and the Deferred fails with the original
        error; the same batch may be retried.
        """
        try:
            job_id = check_job_id(batch.job_id)
            kind = KIND_OF_STREAM.get(batch.stream)
            if kind is None:
                raise ValueError(f"invalid stream {batch.stream!r} for a log batch")
            count = _column_length(
                batch.timestamps, batch.sequences, batch.arrivals, batch.contents
            )
        except ValueError:
            return defer.fail()
        if count == 0:
            return defer.succeed(0)

        columns = (batch.timestamps, batch.sequences, batch.arrivals, batch.contents)
        return self._append(job_id, kind, (thd_append_logs, columns, False))

    @reactor_only
    def append_metrics(self, batch: MetricBatch):
        """Append one metric batch; like append_logs.  Reactor thread.

        Undecodable payloads are left out and counted (``skipped_metric_payloads``).
        """
        try:
            job_id = check_job_id(batch.job_id)
            count = _column_length(
                batch.timestamps, batch.sequences, batch.arrivals, batch.payloads
            )
        except ValueError:
            return defer.fail()
        if count == 0:
            return defer.succeed(0)

        columns = (job_id, batch.timestamps, batch.sequences, batch.arrivals, batch.payloads)
        work = (thd_append_metrics, columns, batch.disposable)
        return self._append(job_id, SegmentKind.METRICS, work)

    @reactor_only
    def append_events(self, batch: EventBatch):
        """Append one event batch of one kind; like append_metrics.  Reactor thread.

        The JSON lines are built on the pool; payloads that do not decode are
        left out and counted (``skipped_metric_payloads`` counts them too).
        """
        try:
            job_id = check_job_id(batch.job_id)
            kind = KIND_OF_EVENT.get(batch.kind)
            if kind is None:
                raise ValueError(f"unknown event kind {batch.kind!r} for an event batch")
            count = _column_length(
                batch.timestamps, batch.sequences, batch.arrivals, batch.payloads
            )
        except ValueError:
            return defer.fail()
        if count == 0:
            return defer.succeed(0)
        columns = (
            job_id,
            events.KINDS_BY_NAME[batch.kind],
            batch.timestamps,
            batch.sequences,
            batch.arrivals,
            batch.payloads,
        )
        work = (thd_append_events, columns, batch.disposable)
        return self._append(job_id, kind, work)

    def _append(self, job_id: str, kind: SegmentKind, work: tuple):
        """Append a batch: ``work`` is ``(thd_append_*, its batch columns, whether the batch
        is disposable)``.  Reactor thread."""
        try:
            self._check_running()
        except RuntimeError:
            return defer.fail()
        if self._gate.deleting(job_id):
            return self._gate.after_deletion(job_id, lambda: self._append(job_id, kind, work))
        key = (job_id, kind)
        if key in self._busy:
            return defer.fail(
                RuntimeError(f"an append to {kind} of job {job_id} is already in flight")
            )
        self._busy.add(key)
        self._gate.begin(job_id)
        d = self._jobs.for_append(job_id)
        d.addCallback(self._write_batch, kind, work)
        d.addBoth(self._append_finished, job_id, key)
        return d

    def _write_batch(self, state: JobState, kind: str, work):
        directory = jobindex.job_dir(self._data_dir, kind, state.job_id)
        index, path, expected_size = state.next_append(kind, directory, self._segment_max_bytes)
        thd, columns, disposable = work
        # A disposable batch's columns are emptied on the pool thread once it is stored.
        call = (thd_then_dispose, thd, columns) if disposable else (thd,)
        d = self._run(
            *call,
            path,
            directory,
            expected_size,
            self._fsync == "batch",
            self._choose_compressor(json_lines=thd is not thd_append_logs),
            state.base,
            *columns,
            modes=self._modes,
            line_tables=self._line_tables,
        )
        d.addCallbacks(
            self._appended,
            self._write_failed,
            callbackArgs=(state, kind, index, path),
            errbackArgs=(state, kind, index, work),
        )
        return d

    def _choose_compressor(self, json_lines: bool = False):
        """The compressor of the next batch, from the level policy; counted per level.
        ``json_lines``: a batch of metric or event JSON lines (the policy may give those a
        faster level at full speed)."""
        compressor = self._levels.choose(json_lines)
        self._metrics.compression_level(compressor.level)
        return compressor

    @property
    def compression(self):
        """The level policy (compress.FixedLevel or AdaptiveLevel).  Reactor thread."""
        return self._levels

    def set_compression_backlog(self, backlog) -> None:
        """Let the level policy follow ``backlog()``: the writer's buffered bytes as a
        fraction of its high-water mark.  Reactor thread (the composition root)."""
        self._levels.set_backlog(backlog)

    def _write_failed(self, failure: Failure, state: JobState, kind: str, index: int, work):
        """A segment cut or removed behind the service's back: close it, write a new one.

        Reactor thread.  Appending where the file now ends would put members at
        offsets the published view does not expect; the batch goes to a new
        segment instead, at once (no retry delay, nothing lost of the batch).
        The old segment keeps the members that still lie within the file
        (none if it is gone) and the job's counts are recomputed.  Any other
        error is passed on (the writer retries the batch).
        """
        if failure.check(safefs.UnsafeEntry):
            self.findings.unsafe(
                state.job_id,
                failure.value,
                "the append fails and is retried by the writer (other jobs are not affected)",
            )
            return failure
        if not failure.check(segment.SegmentShorterThanExpected):
            return failure
        old = state.close_shrunk(kind, index, failure.value.actual_size)
        if old is None:
            return failure
        self.findings.shrunk(state.job_id, old, failure.value)
        self._jobs.publish(state)
        return self._write_batch(state, kind, work)

    def _appended(self, result: AppendResult, state: JobState, kind: str, index: int, path: str):
        """Publish a completed append.  Reactor thread."""
        if result.skipped:
            self.findings.skipped_payloads(state.job_id, result.skipped)
        if not result.members:
            return result.written
        state.apply_append(kind, index, path, result, self._clock.seconds())
        if self._fsync == "interval":
            self._dirty.add((path, *result.dirty_dirs))
        self._jobs.publish(state)
        return result.written

    def _append_finished(self, result, job_id: str, key):
        self._busy.discard(key)
        self._gate.end(job_id)
        return result

    # -- reactor thread: deletion ------------------------------------------------------

    @reactor_only
    def delete_job(self, job_id: str):
        """Delete all of a job's files; Deferred firing with the bytes freed.  Reactor thread.

        Waits for the job's loads and appends in flight first; appends and
        open_job calls made meanwhile wait for the deletion and then see a
        fresh (or unknown) job.  An unknown job frees 0 bytes.
        """
        d = self._exclusive(job_id, self.delete_job, self._remove, ALL_TOPS, False)
        return d.addErrback(_unavailable, f"deleting job {job_id}")

    @reactor_only
    def delete_part(self, job_id: str, part: Part):
        """Delete a job's logs, metrics or events (a Part); Deferred[bytes freed].

        Reactor thread; used by retention.  Like delete_job for one of the
        job's two directories.  The job is then reloaded from what remains
        (keeping its created_at); when nothing remains it is gone.
        """
        tops = PART_TOPS.get(part) if isinstance(part, str) else None
        if tops is None:
            return defer.fail(ValueError(f"unknown part {part!r}: expected one of {', '.join(Part)}"))
        d = self._exclusive(job_id, lambda j: self.delete_part(j, part), self._remove, tops, True)
        return d.addErrback(_unavailable, f"deleting the {part} of job {job_id}")

    def _exclusive(self, job_id: str, retry, operation, *args):
        """Run ``operation(job_id, *args)`` once nothing else touches the job (JobGate).

        New appends, loads and deletions of the job wait until it is done.
        """
        try:
            check_job_id(job_id)
            self._check_running()
        except (ValueError, RuntimeError):
            return defer.fail()
        return self._gate.exclusive(job_id, lambda: retry(job_id), lambda: operation(job_id, *args))

    def _remove(self, job_id: str, tops: tuple, reload: bool):
        self._gate.begin(job_id)
        d = self._run(thd_remove_job, self._data_dir, job_id, tops)
        d.addBoth(self._removed, job_id, tops, reload)
        d.addBoth(self._gate.end_after, job_id)
        return d

    def _removed(self, result, job_id: str, tops: tuple, reload: bool):
        # Even when rmtree failed part way, forget the state: it is rebuilt
        # from whatever is left in the files.
        self._jobs.forget(job_id)
        prefixes = tuple(os.path.join(self._data_dir, top, job_id) + os.sep for top in tops)
        self._dirty.discard_under(prefixes)
        if reload and job_id in self._catalog:
            d = self._jobs.load(job_id)
            d.addErrback(
                lambda f: self._log.failure("reloading job {job} failed", f, job=job_id)
            )
        else:
            if job_id in self._catalog:
                self._catalog.drop_info(job_id)
            d = defer.succeed(None)
        d.addCallback(lambda _: self.flush_index())
        d.addCallback(lambda _: result)
        return d

    @reactor_only
    def drop_segment(self, job_id: str, kind: SegmentKind, index: int):
        """Remove one closed segment of a job; Deferred firing with the bytes freed.

        Reactor thread; used by retention to cap a job's size.  ``kind`` is a
        SegmentKind ("stdout", "stderr", "metrics").  The segment being written
        (the last of its kind) is refused with ValueError; an unknown segment frees 0.
        The segment leaves the published snapshot at once and its file is
        removed on the pool: a query that already holds the older snapshot and
        has not opened the file yet gets DataVanished for it.
        """
        try:
            check_job_id(job_id)
            self._check_running()
            if kind not in _SEGMENT_KINDS:
                raise ValueError(f"unknown segment kind {kind!r}")
        except (ValueError, RuntimeError):
            return defer.fail()
        if self._gate.deleting(job_id):
            return self._gate.after_deletion(job_id, lambda: self.drop_segment(job_id, kind, index))
        if job_id not in self._jobs:
            d = self._jobs.load(job_id)
            d.addCallback(
                lambda state: 0 if state is None else self.drop_segment(job_id, kind, index)
            )
            return d
        state = self._jobs.get(job_id)
        try:
            dropped = state.drop(kind, index)
        except ValueError:
            return defer.fail()
        if dropped is None:
            return defer.succeed(0)
        self._jobs.publish(state)
        self._gate.begin(job_id)
        d = self._run(thd_remove_file, dropped.path)
        d.addBoth(self._gate.end_after, job_id)
        return d.addErrback(_unavailable, f"dropping segment {kind} {index} of job {job_id}")

    # -- reactor thread: segments for retention -------------------------------------------

    @reactor_only
    def segment_usage(self, job_id: str) -> tuple:
        """SegmentUsage of each segment of a loaded job (() when not loaded).

        Reactor thread.  ``last_segment`` marks the segment of each kind that
        appends go to.
        """
        state = self._jobs.get(job_id)
        if state is None:
            return ()
        return state.usage()

    # -- reactor thread: the job index ---------------------------------------------------

    def _write_index(self, jobs: dict, parts: dict):
        """Write the job index (JobCatalog's write); Deferred[True, or False if it failed].

        Reactor thread; the write runs on the pool.  After stop() it is the
        final write, reconciled with the files.  A failure is logged, counted
        and written again within the interval.
        """
        if self._stopped:
            # The last write: recount jobs whose files changed underneath (a segment
            # cut or removed outside the service) so the index left behind agrees.
            d = self._run(
                jobindex.thd_write_reconciled,
                self._index_path,
                self._data_dir,
                jobs,
                parts,
                self._modes,
            )
            d.addCallback(self._reconciled)
        else:
            d = self._run(jobindex.thd_write, self._index_path, jobs, parts, self._modes)
        if self._fsync == "interval" and self._dirty:
            self.sync_dirty().addErrback(
                lambda f: self._log.failure("fsync of dirty segment files failed", f)
            )
        return d.addCallbacks(lambda _: True, self._index_write_failed)

    def _reconciled(self, changed: list) -> None:
        if changed:
            self._log.warn(
                "job index {path}: {count} jobs whose files changed outside the service were "
                "recounted from the files before the final write: {jobs}",
                path=self._index_path,
                count=len(changed),
                jobs=" ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""),
            )

    def _index_write_failed(self, failure: Failure) -> bool:
        self.findings.index_write_failed(self._index_path, failure)
        self._catalog.write_again()
        return False

    @reactor_only
    def flush_index(self):
        """Write the job index now; Deferred firing with True, or False if it failed.

        Reactor thread.  The write includes every change made before the call;
        it cancels the pending debounced write.  A failure is logged, counted
        and retried later; the Deferred never fails.
        """
        return self._catalog.flush()

    # -- reactor thread: durability and health --------------------------------------------

    @reactor_only
    def sync_dirty(self):
        """fsync the files and directories appended to without fsync.  Reactor thread.

        Used with the "interval" policy (with the other policies nothing is
        dirty).  Deferred firing with the number of paths synced; on failure
        the paths stay dirty and the Deferred fails.
        """
        return self._dirty.sync()

    @reactor_only
    def probe_space(self):
        """Deferred[SpaceProbe]: create, fsync and remove a small file; the free space.

        Reactor thread (IFreeSpace); the probe runs on the pool.  Never fails.
        """

        def failed(f):
            return SpaceProbe(False, str(f.value), None)

        return self._run(space.thd_probe_disk, self._data_dir).addErrback(failed)

    @reactor_only
    def free_bytes(self):
        """Deferred[Optional[int]]: free bytes on the data directory's filesystem.

        Reactor thread (IFreeSpace); statvfs runs on the pool.  Never fails.
        """
        return self._run(space.thd_free_bytes, self._data_dir).addErrback(lambda _: None)


def _column_length(*columns) -> int:
    length = len(columns[0])
    for column in columns[1:]:
        if len(column) != length:
            raise ValueError("batch columns have different lengths")
    return length
