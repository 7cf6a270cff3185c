"""JobCatalog: the job index in memory, its totals, ListJobs' order and its debounced write.

Threading: the catalog is changed on the reactor thread only (``load``,
``set_info``, ``drop_info``, ``flush``, ``stop_writes``: marked
``@reactor_only``).  The lookups (``get``, ``list_jobs``, ``list_jobs_page``,
``totals``, ``part_sizes``) run on any thread: they read dicts and lists that
the reactor replaces or changes with single, GIL-atomic operations (a dict
store, a copy-on-write list), so gRPC threads never see half of a change.

Writing the index file is not the catalog's business: it calls the injected
``write(jobs, parts)`` (a copy of the infos and of the part sizes) through a
Debouncer, at most once per ``interval`` seconds after a change, and at once
on ``flush()``.  ``write`` returns a Deferred; the catalog never touches a file
or a thread pool, so it is tested alone with ``task.Clock``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from operator import itemgetter
from typing import Callable, Optional

from joblet_persist.debounce import Debouncer
from joblet_persist.storage.api import EVENT_COUNT_FIELDS, JobInfo, Part
from joblet_persist.threads import reactor_only

_NO_PARTS = (0,) * len(Part)

_created = itemgetter(0)


class JobCatalog:
    """Every known job's JobInfo and part sizes, with running totals.  See the module doc.

    ``clock`` provides ``callLater``; ``write(jobs, parts) -> Deferred`` writes
    the index (it should not fail: the caller logs and counts failures and
    calls ``write_again()`` to retry).
    """

    def __init__(self, clock, interval: float, write: Callable) -> None:
        self._write = write
        self._writes = Debouncer(clock, interval, self._write_now)
        self._index: dict[str, JobInfo] = {}
        self._parts: dict[str, tuple] = {}  # job -> bytes of each Part (logs, metrics, events)
        self._version = 0
        self._list_cache: tuple = (-1, ())
        self._total_size = 0
        self._total_logs = 0
        self._total_metrics = 0
        self._total_events = dict.fromkeys(EVENT_COUNT_FIELDS, 0)
        # (-created_at, job id) of every indexed job, sorted: ListJobs' order.
        self._order: list = []

    # -- any thread ---------------------------------------------------------

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, job_id: str) -> Optional[JobInfo]:
        """The job's JobInfo, or None.  Any thread."""
        return self._index.get(job_id)

    def list_jobs(self) -> tuple:
        """Every known job's JobInfo, sorted by job id.  Any thread.

        The tuple is rebuilt at most once per change of the index, not per call.
        """
        version = self._version
        cached_version, jobs = self._list_cache
        if cached_version == version:
            return jobs
        # dict.copy() is atomic under the GIL; the reactor may mutate meanwhile.
        jobs = tuple(sorted(self._index.copy().values(), key=lambda info: info.job_id))
        # If the index changed after ``version`` was read, the cache is marked
        # older than it is and the next call rebuilds it: never stale for long.
        self._list_cache = (version, jobs)
        return jobs

    def totals(self) -> tuple[int, int, int, int]:
        """(jobs, log messages, metric samples, bytes) over the job index.  Any thread; O(1)."""
        return len(self._index), self._total_logs, self._total_metrics, self._total_size

    def event_totals(self) -> dict:
        """Event kind name -> stored events over the job index.  Any thread; O(kinds)."""
        return dict(self._total_events)

    def list_jobs_page(self, since: int, until: int, offset: int, limit: int):
        """ListJobs in O(log jobs + page): ``(total, infos)``.  Any thread.

        Jobs with ``since <= created_at <= until`` (a bound <= 0 is open),
        newest first, ties by job id; ``total`` counts them all, ``infos`` are
        the JobInfos from ``offset``, at most ``limit`` (0 = all).  The order
        is kept up to date as jobs come and go, so no call sorts the index.
        """
        order = self._order
        hi = bisect_right(order, -since, key=_created) if since > 0 else len(order)
        lo = bisect_left(order, -until, key=_created) if until > 0 else 0
        total = max(0, hi - lo)
        start = lo + offset
        stop = hi if not limit else min(hi, start + limit)
        index = self._index
        infos = [info for _, job in order[start:stop] if (info := index.get(job)) is not None]
        return total, infos

    def part_sizes(self, job_id: str) -> tuple:
        """Bytes of each Part of a job (logs, metrics, events), zeros if unknown.  Any thread."""
        return self._parts.get(job_id, _NO_PARTS)

    # -- reactor thread -------------------------------------------------------

    @reactor_only
    def load(self, jobs: dict, parts: dict) -> None:
        """Replace the whole catalog (the index as read or rebuilt at start).  Reactor thread."""
        self._index = dict(jobs)
        self._parts = dict(parts)
        self._total_size = self._total_logs = self._total_metrics = 0
        self._total_events = dict.fromkeys(EVENT_COUNT_FIELDS, 0)
        for info in self._index.values():
            self._count_totals(info, 1)
        self._order = sorted((-info.created_at, job) for job, info in self._index.items())
        self._version += 1

    @reactor_only
    def set_info(self, job_id: str, info: JobInfo, parts: tuple) -> None:
        """Add or replace a job's entry; the index is written within the interval."""
        old = self._index.get(job_id)
        if old is None:
            self._count_totals(info, 1)
            self._reorder(add=(-info.created_at, job_id))
        else:
            self._count_totals(old, -1)
            self._count_totals(info, 1)
            if old.created_at != info.created_at:
                self._reorder((-old.created_at, job_id), (-info.created_at, job_id))
        self._index[job_id] = info
        self._parts[job_id] = parts
        self._changed()

    @reactor_only
    def drop_info(self, job_id: str) -> None:
        """Remove a job's entry (it must be there); the index is written within the interval."""
        old = self._index.pop(job_id)
        self._parts.pop(job_id, None)
        self._count_totals(old, -1)
        self._reorder(remove=(-old.created_at, job_id))
        self._changed()

    @reactor_only
    def write_again(self) -> None:
        """The last write failed: write again within the interval.  Reactor thread."""
        self._writes()

    @reactor_only
    def flush(self):
        """Write the index now; Deferred with the result of ``write``.  Reactor thread.

        The write includes every change made before the call; it replaces the
        pending debounced write, and follows the write in flight if there is one.
        """
        return self._writes.flush()

    @reactor_only
    def stop_writes(self) -> None:
        """Start no more debounced writes; only ``flush()`` writes from now on."""
        self._writes.stop(flush=False)

    def _changed(self) -> None:
        self._version += 1
        self._writes()

    def _write_now(self):
        return self._write(self._index.copy(), self._parts.copy())

    def _count_totals(self, info: JobInfo, sign: int) -> None:
        self._total_size += sign * info.size_bytes
        self._total_logs += sign * info.log_count
        self._total_metrics += sign * info.metric_count
        if info.event_count:
            totals = dict(self._total_events)  # copy on write: read on any thread
            for name, field_name in EVENT_COUNT_FIELDS.items():
                totals[name] += sign * getattr(info, field_name)
            self._total_events = totals

    def _reorder(self, remove=None, add=None) -> None:
        """Replace ``_order`` by a copy with ``remove`` taken out and ``add`` put in.

        Copy on write: readers on other threads take the list as it was, whole.
        """
        order = list(self._order)
        if remove is not None:
            i = bisect_left(order, remove)
            if i < len(order) and order[i] == remove:
                del order[i]
        if add is not None:
            insort(order, add)
        self._order = order
