"""Retention: decide what to delete (a pure planner) and carry it out (reactor side).

``plan_retention`` is a pure function of the job set, the policy, ``now`` and
the free space: deterministic, tested without fakes.  ``RetentionRunner``
gathers its inputs from storage on the reactor thread, runs the planner, and
applies the plan through storage (deletions run on the pool).  The same runner
serves the periodic timer and the CleanupOldData RPC (with ``dry_run``).

Rules, in order (docs/operations.md explains them to operators):

1. Age: a job idle (no data) for longer than ``log_max_age`` loses its logs,
   longer than ``metric_max_age`` its metrics; a job that loses both is
   deleted whole.  Active jobs (data within ``active_window``, or data still
   buffered) are never deleted by age.
2. Per-job cap: a job over ``job_max_bytes`` loses its oldest closed segments
   (logs and metrics alike, oldest first) until it fits.  The segment being
   written (the last of each stream) is never dropped.
3. Quota and free-space floor: while the data is over ``total_max_bytes``, or
   the filesystem has less than ``min_free_bytes`` free, whole jobs are deleted,
   least recently updated first.  Active jobs are spared; if only active jobs
   remain, the shortfall is reported and backpressure protects the disk.

With an archive (tiering: the backend provides ``ILocalTier``), every rule
frees local copies only: a job or part is *released* (``release_job``,
``release_part``: the archived segments stay readable from the archive) and
a dropped segment stays readable there too; sizes are local bytes, and jobs
the archive alone holds are not retention's.  ``IArchivedCheck`` keeps what
the archive has not taken on disk either way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import Interface

from joblet_persist.logs import Logger
from joblet_persist.storage.api import (
    PART_OF_KIND,
    IFreeSpace,
    ILocalTier,
    IRetentionSegments,
    Part,
    SegmentUsage,
)


class Target(enum.StrEnum):
    """What one retention action deletes: a whole job, one Part of it, or one segment."""

    JOB = "job"
    LOGS = Part.LOGS.value
    METRICS = Part.METRICS.value
    EVENTS = Part.EVENTS.value
    SEGMENT = "segment"


#: The Part a part-deleting Target deletes (storage.delete_part), and back.
PART_OF_TARGET = {Target.LOGS: Part.LOGS, Target.METRICS: Part.METRICS, Target.EVENTS: Part.EVENTS}
TARGET_OF_PART = {part: target for target, part in PART_OF_TARGET.items()}


class IArchivedCheck(Interface):
    """What an archive (S3) has taken; retention never deletes what it has not.

    Reactor thread, answered from the archive's last scan and its manifest;
    "don't know" is False.  Kinds and parts the archive does not take count
    as taken.
    """

    def segment_archived(job_id, kind, index):
        """True when segment ``index`` of ``kind`` of the job is archived as it is on disk."""

    def part_archived(job_id, part):
        """True when every segment of the job's ``part`` (a Part) is archived as it is on disk."""


@dataclass(frozen=True)
class RetentionPolicy:
    log_max_age: float = 0.0  # seconds; 0 disables
    metric_max_age: float = 0.0
    event_max_age: float = 0.0
    job_max_bytes: int = 0
    total_max_bytes: int = 0
    min_free_bytes: int = 0
    active_window: float = 600.0

    @classmethod
    def from_config(cls, retention) -> RetentionPolicy:
        return cls(
            log_max_age=retention.log_max_age,
            metric_max_age=retention.metric_max_age,
            event_max_age=retention.event_max_age,
            job_max_bytes=retention.job_max_bytes,
            total_max_bytes=retention.total_max_bytes,
            min_free_bytes=retention.min_free_bytes,
            active_window=retention.active_window,
        )


@dataclass(frozen=True)
class JobUsage:
    job_id: str
    last_updated: float  # Unix seconds
    log_bytes: int
    metric_bytes: int
    # Segment detail; only needed (and only gathered) for jobs over the per-job cap.
    segments: Optional[tuple[SegmentUsage, ...]] = None
    event_bytes: int = 0  # telemetry events (all kinds)

    @property
    def size_bytes(self) -> int:
        return self.log_bytes + self.metric_bytes + self.event_bytes


@dataclass(frozen=True)
class Action:
    """One deletion: ``what`` it deletes (a Target: ``segment`` names the segment)."""

    what: Target
    job_id: str
    size_bytes: int
    reason: str
    segment: Optional[SegmentUsage] = None


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    # Bytes still over quota / under the free floor after the plan (0 when met).
    shortfall_bytes: int = 0

    @property
    def deleted_job_ids(self) -> list[str]:
        return [a.job_id for a in self.actions if a.what == Target.JOB]

    @property
    def bytes_freed(self) -> int:
        return sum(a.size_bytes for a in self.actions)


def plan_retention(
    jobs: Sequence[JobUsage],
    policy: RetentionPolicy,
    now: float,
    *,
    free_bytes: Optional[int] = None,
    busy: frozenset[str] | set[str] = frozenset(),
    archive=None,
) -> Plan:
    """Decide what retention deletes.  Pure; any thread.

    ``busy`` names jobs with data buffered or in flight: active whatever their
    last_updated says.  ``archive`` (an IArchivedCheck, or None without an
    archive) keeps every rule from deleting what the archive has not taken:
    a job only when all its parts are archived, a part or a segment only when
    it is.
    """

    def part_taken(job: JobUsage, part: Part) -> bool:
        return archive is None or archive.part_archived(job.job_id, part)

    bytes_of_part = {
        Part.LOGS: lambda job: job.log_bytes,
        Part.METRICS: lambda job: job.metric_bytes,
        Part.EVENTS: lambda job: job.event_bytes,
    }

    def job_taken(job: JobUsage) -> bool:
        # A part without data has nothing the archive could lack.
        return all(
            bytes_of_part[part](job) == 0 or part_taken(job, part) for part in Part
        )

    actions: list[Action] = []
    remaining: dict[str, int] = {}  # job -> bytes left after earlier rules
    deleted: set[str] = set()

    def active(job: JobUsage) -> bool:
        return job.job_id in busy or now - job.last_updated <= policy.active_window

    # 1. Age.
    for job in jobs:
        size = job.size_bytes
        if not active(job):
            idle = now - job.last_updated
            parts = (
                (Target.LOGS, job.log_bytes, policy.log_max_age, "log age"),
                (Target.METRICS, job.metric_bytes, policy.metric_max_age, "metric age"),
                (Target.EVENTS, job.event_bytes, policy.event_max_age, "event age"),
            )
            # A part is old once past its age, and deletable only once the archive took it.
            old = [
                max_age > 0 and idle > max_age and part_taken(job, PART_OF_TARGET[target])
                for target, _b, max_age, _r in parts
            ]
            if any(old) and job_taken(job) and all(
                o or nbytes == 0 for o, (_t, nbytes, _a, _r) in zip(old, parts, strict=True)
            ):
                actions.append(Action(Target.JOB, job.job_id, size, "age"))
                deleted.add(job.job_id)
                continue
            for o, (target, nbytes, _a, reason) in zip(old, parts, strict=True):
                if o and nbytes:
                    actions.append(Action(target, job.job_id, nbytes, reason))
                    size -= nbytes
        remaining[job.job_id] = size

    # 2. Per-job cap: oldest closed segments first.
    if policy.job_max_bytes > 0:
        dropped_parts = {(a.job_id, a.what) for a in actions if a.what in PART_OF_TARGET}
        for job in jobs:
            if job.job_id in deleted or remaining[job.job_id] <= policy.job_max_bytes:
                continue
            if job.segments is None:
                continue
            candidates = [
                s
                for s in job.segments
                if not s.last_segment
                and (job.job_id, TARGET_OF_PART[PART_OF_KIND[s.kind]]) not in dropped_parts
                and (archive is None or archive.segment_archived(job.job_id, s.kind, s.index))
            ]
            candidates.sort(key=lambda s: (s.index, s.kind))
            for seg in candidates:
                if remaining[job.job_id] <= policy.job_max_bytes:
                    break
                actions.append(Action(Target.SEGMENT, job.job_id, seg.size_bytes, "job cap", seg))
                remaining[job.job_id] -= seg.size_bytes

    # 3. Quota and free-space floor: whole jobs, least recently updated first.
    total = sum(remaining.values())
    need = 0
    if policy.total_max_bytes > 0 and total > policy.total_max_bytes:
        need = total - policy.total_max_bytes
    if policy.min_free_bytes > 0 and free_bytes is not None and free_bytes < policy.min_free_bytes:
        need = max(need, policy.min_free_bytes - free_bytes)
    if need > 0:
        order = sorted(
            (j for j in jobs if j.job_id not in deleted and not active(j) and job_taken(j)),
            key=lambda j: (j.last_updated, j.job_id),
        )
        for job in order:
            if need <= 0:
                break
            size = remaining[job.job_id]
            # Earlier partial actions on this job are folded into one whole-job deletion.
            actions = [a for a in actions if a.job_id != job.job_id]
            actions.append(Action(Target.JOB, job.job_id, job.size_bytes, "quota"))
            deleted.add(job.job_id)
            need -= size
    return Plan(tuple(actions), max(need, 0))


@dataclass
class CleanupResult:
    """What a retention run deleted (or would delete, for a dry run)."""

    jobs_deleted: int = 0
    bytes_freed: int = 0
    deleted_job_ids: list[str] = field(default_factory=list)
    actions: tuple[Action, ...] = ()
    dry_run: bool = False
    errors: int = 0


class RetentionRunner:
    """Runs the planner against live storage and applies the plan.  Reactor thread.

    ``storage`` provides ``storage.api.IStorageBackend`` (``list_jobs``,
    ``part_sizes``, ``delete_job``, ``delete_part``).  The per-job cap needs
    ``IRetentionSegments`` (``segment_usage``, ``drop_segment``): without it
    jobs over the cap are left alone.  The free-space floor needs
    ``IFreeSpace`` (``free_bytes``): without it only the quota applies.
    ``discard_job(job_id)`` (the writer's) runs before a whole job is deleted so
    that no buffered batch resurrects it.  ``archive`` (an IArchivedCheck)
    keeps what an archive has not taken yet.

    The plan's deletions are applied up to ``concurrency`` at a time.  Each one
    waits for its files to be removed on the pool and for the job index to be
    written; run concurrently, those index writes coalesce (one in flight, one
    queued for every other deletion waiting), so a run costs a few index
    writes instead of one per deleted job, and keeps up with jobs that finish
    faster than one index write (O(jobs)) per job would allow.
    """

    log = Logger()

    #: Deletions of one run applied at once.
    concurrency = 16

    def __init__(
        self,
        storage,
        policy: RetentionPolicy,
        clock,
        *,
        busy_jobs: Callable[[], set[str]],
        discard_job: Callable[[str], defer.Deferred],
        metrics=None,
        archive=None,
    ):
        self._storage = storage
        self._archive = archive
        self.policy = policy
        self._clock = clock
        self._busy = busy_jobs
        self._discard = discard_job
        self._metrics = metrics
        self._lock = defer.DeferredLock()

    def run(self, dry_run: bool = False) -> defer.Deferred:
        """Plan and (unless dry_run) apply; Deferred[CleanupResult].

        Runs do not overlap: a run requested while one is in progress waits for
        it first.
        """
        return self._lock.run(self._run, dry_run)

    @defer.inlineCallbacks
    def _run(self, dry_run: bool):
        policy = self.policy
        storage = self._storage
        infos = list(storage.list_jobs())
        free = None
        if policy.min_free_bytes > 0 and IFreeSpace.providedBy(storage):
            free = yield storage.free_bytes()
        now = self._clock.seconds()
        busy = set(self._busy())
        segmented = IRetentionSegments.providedBy(storage)
        tiered = ILocalTier.providedBy(storage)
        jobs = []
        for info in infos:
            if tiered:
                # Only local copies are retention's to drop: a job the archive alone holds
                # (its local copy released) has nothing here.
                log_bytes, metric_bytes, event_bytes = self._storage.part_sizes(info.job_id)
                if log_bytes + metric_bytes + event_bytes == 0:
                    continue
            segments = None
            if segmented and policy.job_max_bytes > 0 and info.size_bytes > policy.job_max_bytes:
                yield self._storage.open_job(info.job_id)
                segments = self._storage.segment_usage(info.job_id)
            log_bytes, metric_bytes, event_bytes = self._storage.part_sizes(info.job_id)
            jobs.append(JobUsage(info.job_id, float(info.last_updated), log_bytes, metric_bytes,
                                 segments, event_bytes))
        plan = plan_retention(jobs, policy, now, free_bytes=free, busy=busy,
                              archive=self._archive)
        result = CleanupResult(actions=plan.actions, dry_run=dry_run)
        if plan.shortfall_bytes:
            self.log.warn(
                "retention: {shortfall} bytes still over quota or under the free-space floor; "
                "only active jobs remain",
                shortfall=plan.shortfall_bytes,
            )
        if dry_run:
            result.deleted_job_ids = plan.deleted_job_ids
            result.jobs_deleted = len(result.deleted_job_ids)
            result.bytes_freed = plan.bytes_freed
            return result
        semaphore = defer.DeferredSemaphore(self.concurrency)

        def attempt(action: Action) -> defer.Deferred:
            d = defer.maybeDeferred(self._apply, action)
            return d.addCallbacks(lambda freed: (True, freed), lambda f: (False, f))

        outcomes = yield defer.gatherResults(
            [semaphore.run(attempt, action) for action in plan.actions]
        )
        for action, (ok, freed) in zip(plan.actions, outcomes, strict=True):
            if not ok:
                result.errors += 1
                self.log.failure(
                    "retention: deleting {what} of job {job} failed; retried next run",
                    freed,
                    what=action.what,
                    job=action.job_id,
                )
                continue
            result.bytes_freed += freed or 0
            if action.what == Target.JOB:
                result.deleted_job_ids.append(action.job_id)
        result.jobs_deleted = len(result.deleted_job_ids)
        if self._metrics is not None:
            self._metrics.retention_deleted(result.jobs_deleted, result.bytes_freed)
        if plan.actions:
            self.log.info(
                "retention: deleted {jobs} jobs and {parts} parts, {nbytes} bytes freed",
                jobs=result.jobs_deleted,
                parts=len(plan.actions) - result.jobs_deleted,
                nbytes=result.bytes_freed,
            )
        return result

    def _apply(self, action: Action) -> defer.Deferred:
        storage = self._storage
        # With a remote tier (ILocalTier), retention frees the local copies: what the
        # archive holds stays readable through the backend.
        tiered = ILocalTier.providedBy(storage)
        if action.what == Target.JOB:
            d = self._discard(action.job_id)
            if tiered:
                d.addCallback(lambda _: storage.release_job(action.job_id))
            else:
                d.addCallback(lambda _: storage.delete_job(action.job_id))
            return d
        if action.what in PART_OF_TARGET:
            if tiered:
                return storage.release_part(action.job_id, PART_OF_TARGET[action.what])
            return storage.delete_part(action.job_id, PART_OF_TARGET[action.what])
        seg = action.segment
        return storage.drop_segment(action.job_id, seg.kind, seg.index)


class RetentionTimerService(service.Service):
    """Runs retention every ``interval`` seconds.  Reactor thread.

    Each run's errors are logged and the loop goes on; stopping waits for a
    run in progress.
    """

    log = Logger()

    def __init__(self, clock, runner: RetentionRunner, interval: float):
        self.setName("retention")
        self._clock = clock
        self._runner = runner
        self._interval = interval
        self._loop: Optional[task.LoopingCall] = None
        self._current: Optional[defer.Deferred] = None

    def startService(self):
        super().startService()
        if self._interval <= 0:
            return
        self._loop = task.LoopingCall(self._run_once)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def _run_once(self) -> defer.Deferred:
        d = self._runner.run(dry_run=False)
        d.addErrback(lambda f: self.log.failure("retention run failed; retried next interval", f))
        self._current = d
        return d

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        current, self._current = self._current, None
        if current is not None and not current.called:
            waiter = defer.Deferred()
            current.addBoth(lambda r: (waiter.callback(None), r)[1])
            return waiter
