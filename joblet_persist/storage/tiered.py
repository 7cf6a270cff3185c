"""TieredStorage: the local backend as the hot tier, an S3 archive as the cold one.

Built by storage/backends.py when ``archive.s3.enabled``.  It provides the
same interfaces as LocalStorage (tests/storage_contract.py runs against it
with a real S3 server), so the writer, queries, retention and lifecycle use
it as they use LocalStorage:

- Writes, loads, unloads and space probes go to the local backend.
- Retention frees local space through ``ILocalTier`` (``release_job``,
  ``release_part``) and ``drop_segment``: a segment the archive holds
  (``IArchivedCheck``, the shipper) leaves the local disk and is recorded
  here as an ``ArchivedSegment`` (its key and member table, taken from the
  local snapshot, no S3 call).  ``delete_job``/``delete_part`` delete the
  data wherever it is (the archived objects go through the shipper).
- Snapshots merge, per kind, the local segments and the archive-only ones by
  segment index; an archive-only segment's view reads by ranged GETs guided
  by its member table (storage.remote), so a query fetches the members it
  returns, not the object.  JobInfo, ListJobs and the totals include
  archive-only segments and jobs.
- At start the catalog of archive-only segments is rebuilt from a paginated
  listing of this node's prefix (and the sidecars of the segments not on
  local disk): a node that lost its disk answers for its archived jobs.  The
  listing runs in the background and is retried with backoff while S3 is
  unreachable; local data is served meanwhile.
- ``IRemoteNodes.node_snapshot`` reads another node's archive in the same
  bucket (a request's node_id).

Threading: methods documented "reactor thread" run there and return
Deferreds; S3 calls run on this backend's own small pool (``archive-read``)
or, for a query's ranged GETs, on the gRPC handler thread that reads; never
on the reactor.
"""

from __future__ import annotations

import dataclasses
import os
from operator import itemgetter
from typing import Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from joblet_persist.archive import layout, tier
from joblet_persist.archive.tier import (
    ArchivedJob,
    ArchivedSegment,
    combine_info,
    local_segment_exists,
)
from joblet_persist.logs import Logger
from joblet_persist.storage.api import (
    EVENT_OF_KIND,
    KINDS_OF_PART,
    ICompressionBacklog,
    IFreeSpace,
    IIdleUnload,
    ILocalTier,
    InvalidJobId,
    IOrdinalBase,
    IRemoteNodes,
    IRetentionSegments,
    IStorageBackend,
    Part,
    SegmentKind,
    StorageUnavailable,
    check_job_id,
    is_valid_job_id,
)
from joblet_persist.storage.format import KIND_LEGACY
from joblet_persist.storage.segment import segment_index
from joblet_persist.storage.snapshot import LocalJobSnapshot
from joblet_persist.threads import reactor_only

#: Another node's archived job is listed again after this many seconds (a paged query
#: reads the same job many times in a row).
REMOTE_CACHE_SECONDS = 30.0
#: Entries of the other-nodes cache.
REMOTE_CACHE_ENTRIES = 256


def _index_of(path: str) -> int:
    return segment_index(path, -1)


@implementer(
    IStorageBackend, IRetentionSegments, IIdleUnload, IFreeSpace, ILocalTier, IRemoteNodes,
    ICompressionBacklog, IOrdinalBase,
)
class TieredStorage:
    """The local backend plus the archive-only segments of its jobs.  See the module docstring.

    ``local`` is a started-by-us LocalStorage; ``make_source()`` (blocking,
    run on the pool at start) returns the archive.tier.ArchiveSource to read
    with; ``kinds`` are the SegmentKinds the archive takes; ``target`` is the
    shipper's manifest target (bucket, prefix, node id).  ``run_remote(f,
    *args)`` runs blocking S3 work and returns a Deferred; by default a pool
    of this backend's own, started in ``start`` on ``reactor``.
    """

    log = Logger()

    def __init__(self, local, *, node_id: str, data_dir: str, kinds, make_source: Callable,
                 clock, target: tuple, run_remote: Optional[Callable] = None, reactor=None,
                 budget=None, list_page: int = 1000, retry_initial: float = 1.0,
                 retry_max: float = 300.0, modes=None):
        self.local = local
        self.node_id = node_id
        self._data_dir = data_dir
        self._kinds = frozenset(kinds)
        self._make_source = make_source
        self._clock = clock
        self._target = tuple(target)
        self._run_remote = run_remote
        self._reactor = reactor
        self._budget = budget
        self._list_page = list_page
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._pool = None
        self._source = None
        self._check = None
        self._stopping = False
        self._retry_call = None
        # Published (any thread reads; the reactor replaces entries whole).
        self._archived: dict[str, ArchivedJob] = {}
        self._merged_cache: dict = {}
        self._remote_cache: dict = {}
        # A released job that gets data again continues after its archived segments.
        local.set_new_job_floor(self._floor)
        # Reactor only: jobs deleted since start, which the rebuild must not bring back.
        self._deleted: set = set()
        # Reactor only: the highest segment index of each kind the start listing found per
        # job (names a restarted job must not reuse, whatever its sidecars say).
        self._listed_top: dict = {}
        # Reactor only: the floors file's jobs (tier.thd_write_floors), read at start, and
        # its writes (one in flight, another queued when the floors change meanwhile).
        self._saved: dict = {}
        self._modes = modes
        self._saving: Optional[defer.Deferred] = None
        self._save_again = False
        #: Fires when the catalog rebuilt from the bucket listing is in place.
        self.rebuilt: defer.Deferred = defer.Deferred()
        self.rebuild_errors = 0

    # -- wiring -----------------------------------------------------------------

    def set_archive_check(self, check) -> None:
        """``check`` (retention.IArchivedCheck: the shipper) says which segments the
        archive holds as they are on disk; only those are released."""
        self._check = check

    # -- lifecycle (reactor thread) ------------------------------------------------

    @reactor_only
    @defer.inlineCallbacks
    def start(self):
        yield self.local.start()
        if self._run_remote is None:
            from twisted.internet import threads
            from twisted.python.threadpool import ThreadPool

            self._pool = ThreadPool(0, 2, name="archive-read")
            self._pool.start()
            pool, reactor = self._pool, self._reactor
            self._run_remote = lambda f, *a: threads.deferToThreadPool(reactor, pool, f, *a)
        try:
            data = yield self._run_remote(tier.thd_read_floors, self._data_dir)
            if data is not None:
                self._saved = tier.floors_from_bytes(data, self._target)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log.error("archive: {path} is unreadable ({error}); it is rewritten",
                           path=tier.floors_path(self._data_dir), error=str(e))
        self._source = yield self._run_remote(self._make_source)
        d = self._rebuild()
        d.addErrback(lambda f: self.log.failure("archive: rebuilding the catalog failed", f))
        d.addBoth(lambda _: self.rebuilt.callback(len(self._archived)))

    @reactor_only
    def stop(self):
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            # The rebuild waiting to retry the listing ends now (it sees _stopping).
            self._retry_call.reset(0)
        d = self.local.stop()
        saving = self._saving
        if saving is not None and not saving.called:
            waiter = defer.Deferred()
            saving.addBoth(lambda r: (waiter.callback(None), r)[1])
            d.addCallback(lambda result: waiter.addCallback(lambda _: result))

        def stopped(result):
            if self._pool is not None:
                pool, self._pool = self._pool, None
                # Joining waits at most for the S3 calls in flight (bounded by their timeouts).
                return self._run_stop(pool).addCallback(lambda _: result)
            return result

        return d.addCallback(stopped)

    def _run_stop(self, pool):
        """Join ``pool`` off the reactor (on the reactor's own pool)."""
        from twisted.internet import threads

        reactor = self._reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), pool.stop)

    @defer.inlineCallbacks
    def _rebuild(self):
        """List this node's prefix (retrying while S3 is unreachable), then take in the
        archived segments of every job that are not on local disk."""
        delay = self._retry_initial
        while True:
            if self._stopping:
                return
            try:
                listed = yield self._run_remote(self._source.thd_list, self.node_id, "",
                                                self._list_page)
                break
            except StorageUnavailable as e:
                self.rebuild_errors += 1
                self.log.warn("archive: {error}; retrying in {delay:.0f}s", error=e.cause,
                              delay=delay)
                d = defer.Deferred()
                self._retry_call = self._clock.callLater(delay, d.callback, None)
                yield d
                delay = min(self._retry_max, delay * 2)
        pending = yield self._run_remote(self._thd_pending_deletes)
        by_job: dict = {}
        for obj in listed:
            if obj.job_id not in pending and SegmentKind(obj.kind) in self._kinds:
                by_job.setdefault(obj.job_id, []).append(obj)
                # Every listed name stays reserved, even before (or without) its sidecar.
                top = self._listed_top.setdefault(obj.job_id, {})
                top[obj.kind] = max(top.get(obj.kind, -1), obj.index)
        for job_id in sorted(by_job):
            if self._stopping:
                return
            try:
                found = yield self._run_remote(self._thd_job, job_id, by_job[job_id])
            except StorageUnavailable as e:
                self.rebuild_errors += 1
                self.log.warn("archive: job {job} left out of the catalog: {error}",
                              job=job_id, error=e.cause)
                continue
            if found is None or job_id in self._deleted:
                continue
            current = self._archived.get(job_id)
            if current is not None:
                found = current.with_segments(
                    [s for segs in found.segments.values() for s in segs],
                    found.created_at, found.last_updated,
                )
            self._archived[job_id] = found
        self.log.info("archive: {jobs} jobs have archive-only segments", jobs=len(self._archived))
        self._save_floors()

    def _thd_job(self, job_id: str, objects: list) -> Optional[ArchivedJob]:
        data_dir = self._data_dir
        return self._source.thd_job(self.node_id, job_id, objects,
                                    skip=lambda obj: local_segment_exists(data_dir, obj))

    def _thd_pending_deletes(self) -> frozenset:
        """Jobs whose archived objects DeleteJob asked to remove (the shipper's manifest)."""
        try:
            data = layout.thd_read_manifest(self._data_dir)
            if data is None:
                return frozenset()
            return frozenset(layout.Manifest.from_bytes(data, self._target).deletes)
        except (OSError, ValueError):
            return frozenset()

    def _floor(self, job_id: str):
        """``({kind: last archived index}, ordinal base)`` of a job with archive-only
        segments, for a local job that starts again or is loaded from the files of a part
        that was not released (LocalStorage.set_new_job_floor)."""
        arch = self._archived.get(job_id)
        saved_indexes, saved_base = self._saved.get(job_id, ({}, 0))
        indexes = dict(saved_indexes)
        for kind, index in self._listed_top.get(job_id, {}).items():
            indexes[kind] = max(indexes.get(kind, -1), index)
        top = saved_base - 1
        if arch is not None:
            for kind, segs in arch.segments.items():
                if segs:
                    indexes[kind] = max(indexes.get(kind, -1), segs[-1].index)
                for seg in segs:
                    for m in seg.members:
                        if m.count and m.kind != KIND_LEGACY and m.last_ordinal > top:
                            top = m.last_ordinal
        if not indexes:
            return None
        # Without the member tables (sidecars not read yet) the ordinals start at 0: the
        # names stay unique, and reads fall back to stored order (storage/reader.py).
        return indexes, top + 1

    def _save_floors(self) -> None:
        """Write the floors of the jobs with archive-only segments (the floors file), so
        that they hold after a restart before S3 answers.  Reactor thread; one write in
        flight, the latest state written last."""
        if self._saving is not None:
            self._save_again = True
            return
        jobs = (set(self._archived) | set(self._saved)) - self._deleted
        floors = {job: f for job in sorted(jobs) if (f := self._floor(job)) is not None}
        data = tier.floors_to_bytes(self._target, floors)
        args = (self._data_dir, data) + ((self._modes,) if self._modes is not None else ())
        d = self._saving = defer.Deferred()

        def done(result):
            self._saving = None
            d.callback(None)
            if isinstance(result, Failure):
                self.log.failure("archive: writing {path} failed; retried at the next change",
                                 result, path=tier.floors_path(self._data_dir))
            if self._save_again:
                self._save_again = False
                self._save_floors()

        self._run_remote(tier.thd_write_floors, *args).addBoth(done)

    # -- writes and loads: the local backend -------------------------------------

    def append_logs(self, batch):
        return self.local.append_logs(batch)

    def append_metrics(self, batch):
        return self.local.append_metrics(batch)

    def append_events(self, batch):
        return self.local.append_events(batch)

    @reactor_only
    def open_job(self, job_id: str):
        d = self.local.open_job(job_id)
        d.addCallback(lambda snap: self.snapshot(job_id))
        return d

    @reactor_only
    def delete_job(self, job_id: str):
        """Delete the job everywhere: its local files here, its archive-only segments from
        the catalog (the shipper deletes the objects); Deferred[local bytes freed]."""
        if is_valid_job_id(job_id):
            self._deleted.add(job_id)
            self._listed_top.pop(job_id, None)
            had = self._archived.pop(job_id, None) is not None
            if self._saved.pop(job_id, None) is not None or had:
                self._save_floors()
        return self.local.delete_job(job_id)

    @reactor_only
    def delete_part(self, job_id: str, part: Part):
        if is_valid_job_id(job_id) and part in KINDS_OF_PART:
            self._forget_kinds(job_id, KINDS_OF_PART[part])
        return self.local.delete_part(job_id, part)

    def _forget_kinds(self, job_id: str, kinds) -> None:
        arch = self._archived.get(job_id)
        if arch is None:
            return
        left = {k: segs for k, segs in arch.segments.items() if k not in kinds}
        if any(left.values()):
            self._archived[job_id] = dataclasses.replace(arch, segments=left)
        else:
            del self._archived[job_id]

    # -- ILocalTier and IRetentionSegments (reactor thread) -------------------------

    @reactor_only
    @defer.inlineCallbacks
    def release_job(self, job_id: str):
        yield self._release(job_id, tuple(SegmentKind))
        freed = yield self.local.delete_job(job_id)
        return freed

    @reactor_only
    @defer.inlineCallbacks
    def release_part(self, job_id: str, part: Part):
        if part not in KINDS_OF_PART:
            raise ValueError(f"unknown part {part!r}: expected one of {', '.join(Part)}")
        yield self._release(job_id, KINDS_OF_PART[part])
        freed = yield self.local.delete_part(job_id, part)
        return freed

    @defer.inlineCallbacks
    def _release(self, job_id: str, kinds):
        """Record the archived copies of the job's local segments of ``kinds`` (the
        archived kinds among them), or fail with StorageUnavailable, recording nothing,
        when one of them is not archived as it is on disk."""
        check_job_id(job_id)
        snap = yield self.local.open_job(job_id)
        if snap is None:
            return
        info = self.local.job_info(job_id)
        released = []
        for kind in kinds:
            if kind not in self._kinds:
                continue
            for view in snap.views(kind):
                if not view.members:
                    continue  # nothing to keep (a placeholder of JobState.empty's floor)
                seg = self._archived_copy(job_id, kind, view)
                if seg is None:
                    raise StorageUnavailable(
                        f"job {job_id}: segment {os.path.basename(view.path)} is not archived "
                        "yet; its local copy is kept"
                    )
                released.append(seg)
        self._add(job_id, released, info)

    def _archived_copy(self, job_id: str, kind: SegmentKind, view) -> Optional[ArchivedSegment]:
        """The ArchivedSegment of a local segment the archive holds as it is; else None."""
        index = _index_of(view.path)
        if self._check is None or index < 0 or not self._check.segment_archived(job_id, kind, index):
            return None
        members = tuple(view.members)
        size = members[-1].offset + members[-1].size if members else 0
        name = os.path.basename(view.path)
        bucket, prefix, node_id = self._target
        key = layout.object_key(prefix, node_id, job_id, kind, name)
        return ArchivedSegment(kind, index, name, key, size, members)

    def _add(self, job_id: str, segments: list, info) -> None:
        if not segments:
            return
        created = info.created_at if info is not None else 0
        updated = info.last_updated if info is not None else 0
        current = self._archived.get(job_id) or ArchivedJob(job_id, 0, 0, {})
        self._archived[job_id] = current.with_segments(segments, created, updated)
        self._deleted.discard(job_id)
        self._save_floors()

    @reactor_only
    def drop_segment(self, job_id: str, kind: SegmentKind, index: int):
        """Remove a closed local segment (IRetentionSegments); one the archive holds as it
        is stays readable from there."""
        snap = self.local.snapshot(job_id) if is_valid_job_id(job_id) else None
        if snap is not None and kind in self._kinds:
            for view in snap.views(kind):
                if _index_of(view.path) == index:
                    seg = self._archived_copy(job_id, kind, view)
                    if seg is not None and seg.members:
                        self._add(job_id, [seg], self.local.job_info(job_id))
        return self.local.drop_segment(job_id, kind, index)

    def segment_usage(self, job_id: str):
        return self.local.segment_usage(job_id)

    # -- IOrdinalBase (reactor thread) ---------------------------------------------

    @reactor_only
    def ordinal_base(self, job_id: str):
        """The local backend's: every append goes there, and a loaded job's base is
        already above the ordinals of its archive-only segments (the floor the local
        backend takes from ``_floor`` when it loads or starts the job)."""
        return self.local.ordinal_base(job_id)

    # -- ICompressionBacklog -------------------------------------------------------

    def set_compression_backlog(self, backlog) -> None:
        """The local tier compresses what is written."""
        if ICompressionBacklog.providedBy(self.local):
            self.local.set_compression_backlog(backlog)

    # -- IIdleUnload, IFreeSpace -------------------------------------------------

    @property
    def loaded_jobs(self) -> int:
        return self.local.loaded_jobs

    @property
    def unloaded_jobs(self) -> int:
        return self.local.unloaded_jobs

    def unload_idle(self, idle: float) -> int:
        return self.local.unload_idle(idle)

    def resident(self, job_id: str) -> bool:
        return self.local.resident(job_id)

    def probe_space(self):
        return self.local.probe_space()

    def free_bytes(self):
        return self.local.free_bytes()

    # -- any thread -----------------------------------------------------------------

    def snapshot(self, job_id: str):
        """The job's snapshot: local segments and archive-only ones merged; None when the
        job is unknown, or has local data that is not loaded (open_job loads it)."""
        check_job_id(job_id)
        local = self.local.snapshot(job_id)
        arch = self._archived.get(job_id)
        if arch is None or self._source is None:
            return local
        if local is None and self.local.job_info(job_id) is not None:
            return None
        cached = self._merged_cache.get(job_id)
        if cached is not None and cached[0] is local and cached[1] is arch:
            return cached[2]
        merged = self._merge(job_id, local, arch)
        if len(self._merged_cache) > 4096:
            self._merged_cache.clear()
        self._merged_cache[job_id] = (local, arch, merged)
        return merged

    def _merge(self, job_id: str, local: Optional[LocalJobSnapshot], arch: ArchivedJob):
        source = self._source
        views, used = {}, {}
        for kind in SegmentKind:
            here = local.views(kind) if local is not None else ()
            # An empty local segment (a placeholder) never hides the archived one.
            have = {_index_of(v.path) for v in here if v.members}
            remote = [s for s in arch.segments.get(kind, ()) if s.index not in have]
            used[kind] = tuple(remote)
            if not remote:
                views[kind] = here
                continue
            both = [(_index_of(v.path), v) for v in here]
            both += [(s.index, source.view(job_id, s)) for s in remote]
            both.sort(key=itemgetter(0))
            views[kind] = tuple(v for _, v in both)
        effective = dataclasses.replace(arch, segments={k: v for k, v in used.items() if v})
        info = combine_info(local.info if local is not None else None, effective)
        return LocalJobSnapshot(
            job_id=job_id,
            info=info,
            stdout=views[SegmentKind.STDOUT],
            stderr=views[SegmentKind.STDERR],
            metrics=views[SegmentKind.METRICS],
            budget=local.budget if local is not None else self._budget,
            events={EVENT_OF_KIND[k]: views[k] for k in EVENT_OF_KIND if views[k]},
        )

    def job_info(self, job_id: str):
        check_job_id(job_id)
        return combine_info(self.local.job_info(job_id), self._archived.get(job_id))

    def list_jobs(self) -> tuple:
        infos = self.local.list_jobs()
        archived = dict(self._archived)
        if not archived:
            return infos
        by_id = {info.job_id: info for info in infos}
        for job_id, arch in archived.items():
            by_id[job_id] = combine_info(by_id.get(job_id), arch)
        return tuple(by_id[j] for j in sorted(by_id))

    def list_jobs_page(self, since: int, until: int, offset: int, limit: int):
        if not self._archived:
            return self.local.list_jobs_page(since, until, offset, limit)
        found = [
            i for i in self.list_jobs()
            if (since <= 0 or i.created_at >= since) and (until <= 0 or i.created_at <= until)
        ]
        found.sort(key=lambda i: (-i.created_at, i.job_id))
        page = found[offset:offset + limit] if limit else found[offset:]
        return len(found), tuple(page)

    def totals(self) -> tuple:
        if not self._archived:
            return self.local.totals()
        infos = self.list_jobs()
        return (len(infos), sum(i.log_count for i in infos), sum(i.metric_count for i in infos),
                sum(i.size_bytes for i in infos))

    def event_totals(self) -> dict:
        if not self._archived:
            return self.local.event_totals()
        totals: dict = {}
        for info in self.list_jobs():
            for name, n in info.event_counts.items():
                totals[name] = totals.get(name, 0) + n
        return totals

    def part_sizes(self, job_id: str) -> tuple:
        """Bytes of each Part on local disk (what retention can free here)."""
        return self.local.part_sizes(job_id)

    # -- IRemoteNodes ------------------------------------------------------------------

    def node_snapshot(self, node_id: str, job_id: str):
        """Another node's archived job as a snapshot read by ranged GETs, or None.

        Blocking: lists the job's prefix and reads its sidecars (cached for
        REMOTE_CACHE_SECONDS).  Any thread but the reactor.
        """
        check_job_id(job_id)
        if not is_valid_job_id(node_id):
            raise InvalidJobId(f"invalid node id {node_id[:160]!r}: expected 1-128 characters "
                               "of [A-Za-z0-9._-], starting with a letter or digit")
        if node_id == self.node_id:
            raise ValueError("node_snapshot reads other nodes; this node's jobs: snapshot()")
        source = self._source
        if source is None:
            raise StorageUnavailable("the archive is not started yet")
        now = self._clock.seconds()
        cached = self._remote_cache.get((node_id, job_id))
        if cached is not None and cached[0] > now:
            return cached[1]
        arch = source.thd_job(node_id, job_id)
        snap = None
        if arch is not None:
            snap = LocalJobSnapshot(
                job_id=job_id,
                info=arch.info(),
                stdout=tuple(source.view(job_id, s) for s in arch.segments.get(SegmentKind.STDOUT, ())),
                stderr=tuple(source.view(job_id, s) for s in arch.segments.get(SegmentKind.STDERR, ())),
                metrics=tuple(source.view(job_id, s) for s in arch.segments.get(SegmentKind.METRICS, ())),
                budget=self._budget,
                events={
                    EVENT_OF_KIND[k]: tuple(source.view(job_id, s) for s in segs)
                    for k, segs in arch.segments.items() if k in EVENT_OF_KIND and segs
                },
            )
        if len(self._remote_cache) >= REMOTE_CACHE_ENTRIES:
            self._remote_cache.clear()
        self._remote_cache[(node_id, job_id)] = (now + REMOTE_CACHE_SECONDS, snap)
        return snap


def make_tiered(config, local, *, clock, metrics=None, file_budget=None, run_remote=None,
                make_client=None) -> TieredStorage:
    """TieredStorage over ``local`` for ``archive.s3`` (storage/backends.py calls it)."""
    from joblet_persist.archive.tier import ArchiveSource, make_read_client
    from joblet_persist.storage.safefs import FileModes

    s3c = config.archive.s3
    on_read = metrics.archive_reads() if metrics is not None else (lambda n: None)
    client_of = make_client or make_read_client

    def make_source():
        return ArchiveSource(client_of(s3c), s3c.bucket, s3c.prefix, on_read=on_read)

    return TieredStorage(
        local,
        node_id=config.server.node_id,
        data_dir=config.storage.data_dir,
        kinds=tuple(layout.routed_kinds(s3c.routes)),
        make_source=make_source,
        clock=clock,
        target=(s3c.bucket, s3c.prefix, config.server.node_id),
        modes=FileModes(config.storage.file_mode, config.storage.dir_mode, config.storage.group),
        run_remote=run_remote,
        reactor=clock,
        budget=file_budget,
        retry_initial=s3c.retry_initial,
        retry_max=s3c.retry_max,
    )


__all__ = ["TieredStorage", "make_tiered"]
