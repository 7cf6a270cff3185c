"""LoadedJobs: the jobs whose state is in memory, their loading and their published snapshots.

Threading: everything here runs on the reactor thread (``@reactor_only``)
except ``snapshot`` and ``__len__``, which any thread may call: they read one
dict whose entries the reactor replaces whole (a GIL-atomic store), so a gRPC
thread sees either the old or the new immutable LocalJobSnapshot.

Loading a job scans its segments' headers on the pool (``jobindex.thd_scan_job``,
run by the injected runner); concurrent loads of a job share one scan.  The
scan is applied on the reactor: a ``JobState`` built from it, its findings
reported, and its snapshot and job index entry published.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from joblet_persist.storage import jobindex, safefs
from joblet_persist.storage.api import KIND_OF_EVENT, JobInfo, SegmentKind
from joblet_persist.storage.catalog import JobCatalog
from joblet_persist.storage.files import FileBudget
from joblet_persist.storage.findings import Findings
from joblet_persist.storage.gate import JobGate
from joblet_persist.storage.jobstate import JobState
from joblet_persist.storage.segment import segment_name
from joblet_persist.storage.snapshot import LocalJobSnapshot
from joblet_persist.threads import reactor_only


class LoadedJobs:
    """The in-memory jobs of LocalStorage.  See the module docstring for threads."""

    def __init__(
        self,
        data_dir: str,
        run_in_thread: Callable,
        clock,
        gate: JobGate,
        catalog: JobCatalog,
        findings: Findings,
        budget: Optional[FileBudget],
    ) -> None:
        self._data_dir = data_dir
        self._run = run_in_thread
        self._clock = clock
        self._gate = gate
        self._catalog = catalog
        self._findings = findings
        self._budget = budget
        #: ``floor(job_id)`` -> ``({kind: last index}, ordinal base)`` that another tier
        #: holds of a job, or None; LocalStorage.set_new_job_floor.  Applied to a job
        #: with no files here and to one loaded from its files (JobState.from_scan).
        self.floor: Optional[Callable] = None
        # Published state, read from any thread; mutated on the reactor only.
        self._snapshots: dict[str, LocalJobSnapshot] = {}
        # Reactor-only state.
        self._jobs: dict[str, JobState] = {}
        self._loading: dict[str, list] = {}  # job -> Deferreds waiting for its load

    # -- any thread -----------------------------------------------------------

    def snapshot(self, job_id: str) -> Optional[LocalJobSnapshot]:
        """The job's latest published snapshot if it is loaded, else None.  Any thread."""
        return self._snapshots.get(job_id)

    def __len__(self) -> int:
        """Jobs whose state is in memory.  Any thread."""
        return len(self._jobs)

    # -- reactor thread ---------------------------------------------------------

    @reactor_only
    def get(self, job_id: str) -> Optional[JobState]:
        """The job's state if it is in memory, else None."""
        return self._jobs.get(job_id)

    @reactor_only
    def loading(self, job_id: str) -> bool:
        """A scan of the job is in flight."""
        return job_id in self._loading

    @reactor_only
    def load(self, job_id: str):
        """Deferred firing with the job's JobState after a scan, or None if unknown."""
        d = defer.Deferred()
        waiters = self._loading.get(job_id)
        if waiters is not None:
            waiters.append(d)
            return d
        self._loading[job_id] = [d]
        self._gate.begin(job_id)
        scan = self._run(jobindex.thd_scan_job, self._data_dir, job_id, True)
        scan.addBoth(self._load_done, job_id)
        return d

    def _load_done(self, result, job_id: str) -> None:
        waiters = self._loading.pop(job_id)
        if isinstance(result, Failure) and result.check(safefs.UnsafeEntry):
            self._findings.unsafe(job_id, result.value, "the job cannot be loaded")
        if not isinstance(result, Failure):
            try:
                result = self._install(job_id, result)
            except Exception:
                result = Failure()
        self._gate.end(job_id)
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _install(self, job_id: str, scan: Optional[jobindex.JobScan]) -> Optional[JobState]:
        """Build and publish the state of a scanned job (None: the job has no files)."""
        state = self._jobs.get(job_id)
        if state is not None:
            return state
        if scan is None:
            if job_id in self._catalog:
                # The index knew a job whose files are gone.
                self._catalog.drop_info(job_id)
            return None
        info = scan.summary(self._catalog.get(job_id))
        if info.created_at == 0:
            now = int(self._clock.seconds())
            info = dataclasses.replace(info, created_at=now, last_updated=now)
        self._findings.scanned(job_id, scan)
        state = JobState.from_scan(
            job_id, scan, info, self._clock.seconds(), self._floor_of(job_id)
        )
        self._findings.check_order(job_id, state.segments)
        self._jobs[job_id] = state
        self.publish(state)
        return state

    @reactor_only
    def for_append(self, job_id: str):
        """Deferred firing with the job's state, loaded, or new when the job has no files."""
        state = self._jobs.get(job_id)
        if state is not None:
            return defer.succeed(state)

        def loaded(state):
            if state is None:
                # Unknown job: it starts now.  A concurrent append of another
                # stream may have created it in its own callback already.
                state = self._jobs.get(job_id)
            if state is None:
                now = int(self._clock.seconds())
                info = JobInfo(job_id, now, now, 0, 0, 0, 0, 0)
                floor = self._floor_of(job_id)
                state = JobState.empty(job_id, info, self._clock.seconds(), floor)
                self._jobs[job_id] = state
            return state

        return self.load(job_id).addCallback(loaded)

    def _floor_of(self, job_id: str):
        """The ``floor`` of JobState.empty (a new job) and JobState.from_scan (a job loaded
        from its files), from ``self.floor``; None without one."""
        found = self.floor(job_id) if self.floor is not None else None
        if not found:
            return None
        indexes, base = found
        return (
            {
                kind: (index, os.path.join(jobindex.job_dir(self._data_dir, kind, job_id),
                                           segment_name(kind, index)))
                for kind, index in indexes.items()
            },
            base,
        )

    @reactor_only
    def publish(self, state: JobState) -> None:
        """Replace the job's snapshot and index entry."""
        self._snapshots[state.job_id] = LocalJobSnapshot(
            job_id=state.job_id,
            info=state.info,
            stdout=state.views(SegmentKind.STDOUT),
            stderr=state.views(SegmentKind.STDERR),
            metrics=state.views(SegmentKind.METRICS),
            events={
                name: state.views(kind)
                for name, kind in KIND_OF_EVENT.items()
                if state.segments[kind]
            },
            budget=self._budget,
        )
        self._catalog.set_info(state.job_id, state.info, state.part_sizes())

    @reactor_only
    def forget(self, job_id: str) -> None:
        """Drop the job's state and snapshot (its index entry stays)."""
        self._jobs.pop(job_id, None)
        self._snapshots.pop(job_id, None)

    @reactor_only
    def unload(self, cutoff: float, in_flight: Callable[[str], bool]) -> int:
        """Forget jobs last used at or before ``cutoff`` with nothing ``in_flight``; the count."""
        unloaded = 0
        for job_id, state in list(self._jobs.items()):
            if state.last_used > cutoff or in_flight(job_id):
                continue
            del self._jobs[job_id]
            self._snapshots.pop(job_id, None)
            unloaded += 1
        return unloaded

    @reactor_only
    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs
