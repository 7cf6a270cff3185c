"""The S3 archive shipper: copies durable segments to a bucket.  Reactor thread.

Local storage stays the write path: the shipper only reads files that are
already on disk, so nothing ingest or queries do ever waits for S3.  Every
``interval`` a round runs:

1. With ``maxAge``, at most once per ``retentionInterval``, the node's prefix is
   listed and jobs whose newest object is older (and that are gone locally)
   get a deletion record (a tombstone) in the manifest.  Then the pending
   deletions (DeleteJob's, recorded durably before it answered, and those) are
   carried out: paginated listing of the job's prefix, batched DeleteObjects.
2. The segment files of every job storage lists are stat'ed on the archive
   pool (``layout.thd_scan_jobs``).  A file is *due* when the manifest has no
   entry matching its (size, inode, mtime) and its kind's route
   (``archive.s3.routes``) says so: ``close``: it is closed (not the highest
   index of its kind) or it is the open segment of a job idle for
   ``uploadIdleAfter`` (no write for that long); ``durable``: always;
   ``idle``: once the whole job is idle.  The backlog (bytes and age of
   the due files) is what the metrics and the health check report.
3. Due files are uploaded oldest first (``s3.thd_upload_segment``); the
   manifest is rewritten atomically at most once a second while they go on,
   and at the end of the round (it is rewritten whole: at most once a second
   keeps that cost off the reactor's hot path with many jobs).  A file that grows after its
   upload (the open segment of a job that became active again) no longer
   matches and is uploaded again, whole, once it is due again.

A failing S3 call ends the round's uploads and deletions; they are retried
after a delay that doubles from ``retryInitial`` up to ``retryMax``, with
jitter (x0.5 to x1.5).  The scan goes on every round, so the backlog stays
current during an outage.  A crash between an upload and the manifest write
uploads that segment again after the restart (identical bytes, same key):
delivery is at least once.

The shipper is also retention's ``IArchivedCheck``: a segment, part or job
that the archive has not taken is never deleted by local retention.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Optional

from twisted.internet import defer, task
from zope.interface import implementer

from joblet_persist.archive import layout
from joblet_persist.debounce import PendingWrites
from joblet_persist.logs import Logger
from joblet_persist.retention import IArchivedCheck
from joblet_persist.storage.api import PART_OF_KIND, ILocalTier, SegmentKind
from joblet_persist.storage.segment import segment_name
from joblet_persist.threads import reactor_only


@implementer(IArchivedCheck)
class S3Shipper:
    """Uploads closed (and idle open) segments, deletes a deleted job's objects.

    ``run`` runs blocking work on the archive's own pool; ``s3`` is the module
    of blocking S3 calls (``joblet_persist.archive.s3``), ``make_client`` builds
    the boto3 client on that pool.  ``wall`` is the wall clock (file mtimes are
    wall time), ``jitter`` returns a float in [0, 1).
    """

    log = Logger()

    #: The manifest is rewritten at most this often while uploads go on (and at the end of
    #: every round): a crash uploads again what the last second took.
    manifest_interval = 1.0

    def __init__(self, cfg, node_id: str, data_dir: str, storage, clock, run, *,
                 s3, make_client: Callable, metrics=None, wall: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random, modes=None):
        self._cfg = cfg
        self._node_id = node_id
        self._data_dir = data_dir
        self._storage = storage
        self._clock = clock
        self._run = run
        self._s3 = s3
        self._make_client = make_client
        self._metrics = metrics
        self._wall = wall
        self._jitter = jitter
        self._modes = modes
        self._route = layout.routed_kinds(cfg.routes)  # {SegmentKind: mode}, never left out
        self._kinds = tuple(self._route)
        self._target = (cfg.bucket, cfg.prefix, node_id)
        self._client = None
        self._manifest = layout.Manifest.empty(self._target)
        self._write_lock = defer.DeferredLock()
        self._stopping = threading.Event()
        self._loop: Optional[task.LoopingCall] = None
        self._round: Optional[defer.Deferred] = None
        self._scan: dict = {}
        self._settled: dict = {}  # job -> (last_updated,) when found fully archived
        self._scan_wall = 0.0
        self._failures = 0
        self._held: dict = {}  # job -> DeleteJobs whose local deletion is still running
        self._verify_at: dict = {}  # job -> clock time of its deletion's checking pass
        self._expire_at = 0.0  # clock time of the next archive.s3.maxAge sweep
        self._retry_at = 0.0
        self._unwritten = PendingWrites(clock)  # uploads not yet in the manifest file
        self.last_error: Optional[str] = None
        self.backlog_bytes = 0
        self.backlog_segments = 0
        self._oldest_mtime: Optional[float] = None
        self.uploaded_bytes = 0
        self.uploaded_segments = 0
        self.upload_errors = 0
        self.deleted_objects = 0
        self.expired_jobs = 0
        self.rounds = 0

    # -- lifecycle ----------------------------------------------------------------

    @reactor_only
    @defer.inlineCallbacks
    def start(self):
        """Read the manifest, build the client (on the pool), start the rounds."""
        try:
            data = yield self._run(layout.thd_read_manifest, self._data_dir)
            if data is not None:
                self._manifest = layout.Manifest.from_bytes(data, self._target)
        except (OSError, ValueError) as e:
            # A damaged or refused (symlink) manifest costs uploads again, never the service.
            self.log.error(
                "archive: {path} is unreadable ({error}); every segment is uploaded again",
                path=layout.manifest_path(self._data_dir), error=str(e),
            )
        self._client = yield self._run(self._make_client, self._cfg)
        self._loop = task.LoopingCall(self._start_round)
        self._loop.clock = self._clock
        self._loop.start(self._cfg.interval, now=True)

    @reactor_only
    def stop(self):
        """Stop the rounds; waits for a round in progress (an upload ends between parts)."""
        self._stopping.set()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        current = self._round
        if current is None or current.called:
            return defer.succeed(None)
        waiter = defer.Deferred()
        current.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    # -- what monitoring reads ----------------------------------------------------

    def set_metrics(self, metrics) -> None:
        """Report uploads, errors and deletions to ``metrics`` (metrics.ArchiveMetrics)."""
        self._metrics = metrics

    def oldest_unarchived_seconds(self) -> float:
        """Age of the oldest due segment (since its last write); 0 when none."""
        if self._oldest_mtime is None:
            return 0.0
        return max(0.0, self._wall() - self._oldest_mtime)

    def health_check(self) -> tuple:
        """``(ok, detail, extra)`` for the health monitor."""
        cfg = self._cfg
        age = self.oldest_unarchived_seconds()
        problems = []
        if cfg.backlog_unhealthy_bytes and self.backlog_bytes > cfg.backlog_unhealthy_bytes:
            problems.append(
                f"backlog {self.backlog_bytes} bytes over archive.s3.backlogUnhealthyBytes "
                f"({cfg.backlog_unhealthy_bytes})"
            )
        if cfg.backlog_unhealthy_age and age > cfg.backlog_unhealthy_age:
            problems.append(
                f"oldest unarchived segment {age:.0f}s old, over "
                f"archive.s3.backlogUnhealthyAge ({cfg.backlog_unhealthy_age:.0f}s)"
            )
        if problems:
            detail = "; ".join(problems)
        elif self.last_error:
            detail = f"uploads failing, retrying: {self.last_error}"
        else:
            detail = "archiving"
        extra = {
            "backlog_bytes": self.backlog_bytes,
            "backlog_segments": self.backlog_segments,
            "oldest_unarchived_seconds": round(age, 1),
            "consecutive_failures": self._failures,
        }
        return (not problems, detail, extra)

    # -- IArchivedCheck (retention) -------------------------------------------------

    def segment_archived(self, job_id: str, kind, index: int) -> bool:
        if kind not in self._kinds:
            return True
        name = segment_name(kind, index)
        for f in self._scan.get(job_id, ()):
            if f.kind == kind and f.name == name:
                return self._manifest.matches(f)
        return False

    def part_archived(self, job_id: str, part) -> bool:
        kinds = [k for k in self._kinds if PART_OF_KIND[k] == part]
        if not kinds:
            return True
        files = self._scan.get(job_id)
        if files is None or job_id in self._manifest.deletes:
            return False
        info = self._storage.job_info(job_id)
        if info is not None and info.last_updated >= int(self._scan_wall) - 1:
            return False  # written since (or just before) the scan: not known to be taken
        return all(self._manifest.matches(f) for f in files if f.kind in kinds)

    # -- DeleteJob --------------------------------------------------------------------

    @reactor_only
    def delete_job(self, job_id: str, hold: bool = False) -> defer.Deferred:
        """Record that the job's archived objects must go; fires once that is durable.

        From then on no segment of the job is uploaded.  The deletion itself
        runs in a later round, after any upload of the job in flight (rounds
        upload one segment at a time and delete between uploads, so the
        listing sees every object an upload made: nothing is resurrected), and
        is retried until S3 confirms every key.  With ``hold`` it also waits
        for ``release_delete(job_id)``: DeleteJob holds it while the local
        files go, so that no file still on disk is uploaded after the objects
        were deleted.
        """
        self._manifest.deletes[job_id] = int(self._wall())
        self._manifest.forget_job(job_id)
        self._scan.pop(job_id, None)
        self._settled.pop(job_id, None)
        self._verify_at.pop(job_id, None)
        if hold:
            self._held[job_id] = self._held.get(job_id, 0) + 1
        return self._write_manifest()

    @reactor_only
    def release_delete(self, job_id: str) -> None:
        """The local deletion that ``delete_job(job_id, hold=True)`` waited for has ended."""
        left = self._held.get(job_id, 0) - 1
        if left > 0:
            self._held[job_id] = left
        else:
            self._held.pop(job_id, None)

    # -- rounds ---------------------------------------------------------------------

    def _start_round(self):
        if self._round is not None and not self._round.called:
            return None  # a slow round still runs: the next tick starts the next one
        d = self._round = self._one_round()
        d.addErrback(lambda f: self.log.failure("archive: round failed", f))
        return None

    @reactor_only
    @defer.inlineCallbacks
    def _one_round(self):
        self.rounds += 1
        remote_ok = self._clock.seconds() >= self._retry_at
        try:
            if remote_ok:
                yield self._expire_old_jobs()
                yield self._carry_out_deletes()
            due = yield self._rescan()
            if remote_ok:
                yield self._upload(due)
        except _RemoteFailed as e:
            self._remote_failed(e.args[0], e.args[1])

    def _verify_grace(self) -> float:
        """How long after a deletion a request of ours may still land in S3: a request
        that failed on our side (a timeout, a cut connection) may still be carried out
        by the store; two attempts of ``requestTimeout`` each, plus a round."""
        return 2 * self._cfg.request_timeout + self._cfg.interval

    @defer.inlineCallbacks
    def _carry_out_deletes(self):
        """Delete the tombstoned jobs' objects; each tombstone stays until a second listing,
        ``_verify_grace`` later, finds the prefix empty (an upload request that failed on
        our side but was still carried out by the store is deleted by that pass)."""
        cfg = self._cfg
        for job_id in sorted(self._manifest.deletes):
            if self._stopping.is_set():
                return
            if job_id in self._held:
                continue  # its local files are still being deleted
            verify_at = self._verify_at.get(job_id)
            if verify_at is not None and self._clock.seconds() < verify_at:
                continue
            prefix = layout.job_prefix(cfg.prefix, self._node_id, job_id)
            try:
                n = yield self._run(self._s3.thd_delete_prefix, self._client, cfg.bucket, prefix)
            except Exception as e:
                raise _RemoteFailed(f"deleting the archive of job {job_id}", e) from None
            self.deleted_objects += n
            if self._metrics is not None:
                self._metrics.deleted(n)
            if job_id in self._held or job_id not in self._manifest.deletes:
                continue  # a DeleteJob came meanwhile and holds: it starts over
            if verify_at is None or n:
                if verify_at is not None:
                    self.log.warn("archive: {n} objects of deleted job {job} appeared after "
                                  "its deletion (a late request); deleted", n=n, job=job_id)
                else:
                    self.log.info("archive: deleted {n} objects of job {job}", n=n, job=job_id)
                self._verify_at[job_id] = self._clock.seconds() + self._verify_grace()
                continue
            self._verify_at.pop(job_id, None)
            self._manifest.deletes.pop(job_id, None)
            yield self._write_manifest()

    @defer.inlineCallbacks
    def _expire_old_jobs(self):
        """``archive.s3.maxAge``: tombstone the archived jobs whose newest object is older.

        At most once per ``retentionInterval``: a paginated listing of the node's
        prefix.  A job that still has segment files on the local disk, or that
        storage saw written within maxAge, is kept (it would be uploaded again);
        the tombstoned jobs are deleted like DeleteJob's, right after.
        """
        cfg = self._cfg
        if not cfg.max_age or self._clock.seconds() < self._expire_at:
            return
        node_prefix = layout.node_prefix(cfg.prefix, self._node_id)
        try:
            ages = yield self._run(self._s3.thd_job_ages, self._client, cfg.bucket, node_prefix)
        except Exception as e:
            raise _RemoteFailed("listing the archive for archive.s3.maxAge", e) from None
        wall = self._wall()
        old = []
        for job_id, newest in sorted(ages.items()):
            info = self._storage.job_info(job_id)
            if (wall - newest > cfg.max_age and job_id not in self._manifest.deletes
                    and (info is None or info.last_updated < wall - cfg.max_age)):
                old.append(job_id)
        local = yield self._run(layout.thd_scan_jobs, self._data_dir, old, tuple(SegmentKind))
        expired = [job_id for job_id in old if not local.get(job_id)]
        self._expire_at = self._clock.seconds() + cfg.retention_interval
        if not expired:
            return
        for job_id in expired:
            self._manifest.deletes[job_id] = int(wall)
            self._manifest.forget_job(job_id)
            self._scan.pop(job_id, None)
            self._settled.pop(job_id, None)
        yield self._write_manifest()
        if ILocalTier.providedBy(self._storage):
            # A tiered backend lists archive-only jobs: forget them with their objects
            # (they have no local files, so this deletes nothing on disk).
            for job_id in expired:
                yield self._storage.delete_job(job_id)
        self.expired_jobs += len(expired)
        if self._metrics is not None:
            self._metrics.expired(len(expired))
        self.log.info(
            "archive: {n} archived jobs older than archive.s3.maxAge ({age:.0f}s) "
            "are being deleted: {jobs}",
            n=len(expired), age=cfg.max_age, jobs=", ".join(expired[:10]),
        )

    @defer.inlineCallbacks
    def _rescan(self):
        infos = [info for info in self._storage.list_jobs()
                 if info.job_id not in self._manifest.deletes]
        # A job found fully archived by an earlier scan and not written since is not listed
        # again: a round costs directory listings for the jobs that changed, not for all.
        settled = {
            info.job_id for info in infos
            if self._settled.get(info.job_id, (None,))[0] == info.last_updated
        }
        jobs = [info.job_id for info in infos if info.job_id not in settled]
        wall = self._wall()
        fresh = yield self._run(layout.thd_scan_jobs, self._data_dir, jobs, self._kinds)
        scanned = {job_id: self._scan[job_id] for job_id in settled if job_id in self._scan}
        scanned.update(fresh)
        self._scan, self._scan_wall = scanned, wall
        self._settled = {job_id: v for job_id, v in self._settled.items() if job_id in settled}
        for job_id in [j for j in self._manifest.segments if j not in scanned]:
            self._manifest.forget_job(job_id)  # deleted locally (retention): nothing to match
        self._manifest.prune(fresh)
        idle_after = self._cfg.upload_idle_after
        idle_ns = int((wall - idle_after) * 1e9)
        # A job is idle when storage saw no write for uploadIdleAfter and no file changed.
        idle_jobs = {
            info.job_id for info in infos
            if info.last_updated <= wall - idle_after
            and all(f.mtime_ns <= idle_ns for f in scanned.get(info.job_id, ()))
        }

        def is_due(f) -> bool:
            if f.size == 0 or self._manifest.matches(f):
                return False  # empty: a crash between creating a segment and its first write
            route = self._route[f.kind]
            if route == "durable":
                return True  # whatever is on disk, the open segment again as it grows
            if route == "close":
                return not f.last or f.mtime_ns <= idle_ns
            return f.job_id in idle_jobs  # "idle"

        due = [f for files in scanned.values() for f in files if is_due(f)]
        due.sort(key=lambda f: (f.mtime_ns, f.job_id, f.kind, f.index))
        self._set_backlog(due)
        self._settle(infos, fresh, wall)
        return due

    def _settle(self, infos, fresh: dict, wall: float) -> None:
        """Remember the jobs of ``fresh`` found fully archived and not written since."""
        for info in infos:
            files = fresh.get(info.job_id)
            if (files is not None and info.last_updated < int(wall) - 1
                    and all(self._manifest.matches(f) for f in files)):
                self._settled[info.job_id] = (info.last_updated,)

    def _set_backlog(self, due) -> None:
        self.backlog_bytes = sum(f.size for f in due)
        self.backlog_segments = len(due)
        self._oldest_mtime = due[0].mtime_ns / 1e9 if due else None

    @defer.inlineCallbacks
    def _upload(self, due):
        try:
            yield self._upload_due(due)
        finally:
            # Whatever ended the uploads (done, S3 failing, stopping), what they took is
            # written down before the round ends.
            if self._unwritten.count:
                yield self._flush_manifest()
        if due and not self._stopping.is_set():
            self._settle(self._storage.list_jobs(), {j: self._scan[j] for j in
                                                     {f.job_id for f in due} if j in self._scan},
                         self._scan_wall)

    @defer.inlineCallbacks
    def _upload_due(self, due):
        remaining = list(due)
        while remaining:
            f = remaining[0]
            if self._stopping.is_set():
                return
            if f.job_id in self._manifest.deletes:
                remaining.pop(0)
                continue
            try:
                up = yield self._run(self._s3.thd_upload_segment, self._client, self._cfg,
                                     self._node_id, f, self._stopping)
            except self._s3.NoCompleteMember:
                remaining.pop(0)  # nothing complete to archive yet; never an empty object
                self._set_backlog(remaining)
                continue
            except self._s3.LocalUnreadable as e:
                # The local file is gone or unreadable (deleted meanwhile): not S3's fault.
                remaining.pop(0)
                self.log.info("archive: skipped {path}: {error}", path=f.path, error=str(e))
                self._set_backlog(remaining)
                continue
            except self._s3.UploadCancelled:
                return
            except Exception as e:
                raise _RemoteFailed(f"uploading {f.path}", e) from None
            remaining.pop(0)
            if f.job_id not in self._manifest.deletes:
                self._manifest.record(f.job_id, f.kind, f.name, up.stamp)
            self.uploaded_bytes += up.size
            self.uploaded_segments += 1
            if self._metrics is not None:
                self._metrics.uploaded(up.size)
            self._failures, self.last_error = 0, None
            self._set_backlog(remaining)
            if self._unwritten.note(self.manifest_interval):
                yield self._flush_manifest()

    def _flush_manifest(self):
        self._unwritten.writing()
        return self._write_manifest()

    def _remote_failed(self, what: str, error: Exception) -> None:
        self._failures += 1
        self.upload_errors += 1
        if self._metrics is not None:
            self._metrics.upload_error()
        cfg = self._cfg
        delay = min(cfg.retry_max, cfg.retry_initial * 2 ** min(self._failures - 1, 30))
        delay *= 0.5 + self._jitter()
        self._retry_at = self._clock.seconds() + delay
        self.last_error = f"{what}: {error}"
        self.log.warn(
            "archive: {what} failed ({error}); retrying in {delay:.1f}s "
            "(backlog {backlog} bytes)",
            what=what, error=str(error), delay=delay, backlog=self.backlog_bytes,
        )

    def _write_manifest(self) -> defer.Deferred:
        def write():
            data = self._manifest.to_bytes()
            if self._modes is None:
                return self._run(layout.thd_write_manifest, self._data_dir, data)
            return self._run(layout.thd_write_manifest, self._data_dir, data, self._modes)

        return self._write_lock.run(write)


class _RemoteFailed(Exception):
    """An S3 call failed: ``(what, error)``; ends the round's remote work."""
