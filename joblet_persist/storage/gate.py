"""JobGate: per-job bookkeeping of work in flight, and exclusive access for deletions.

Reactor thread only: every method is ``@reactor_only`` (or a property read
there).  Leaf module: it creates Deferreds but never imports the reactor.

LocalStorage brackets each load, append and file removal of a job with
``begin(job)`` / ``end(job)``.  A deletion runs through ``exclusive``: it waits
until the job's work in flight has ended, and while it runs, new work on the
job waits for it (``deleting(job)`` / ``after_deletion``) and then starts
afresh.  ``wait_quiescent()`` fires once no job has work in flight and no
deletion runs: storage's stop waits for it before the final index write.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from joblet_persist.threads import reactor_only


class JobGate:
    """Counts each job's work in flight and serialises deletions.  Reactor thread."""

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}  # job -> loads/appends/removals in flight
        self._idle_waiters: dict[str, list] = {}
        self._deleting: dict[str, list] = {}  # job -> Deferreds waiting for its deletion
        self._quiescent_waiters: list = []

    @reactor_only
    def begin(self, job_id: str) -> None:
        """A load, append or removal of the job starts."""
        self._pending[job_id] = self._pending.get(job_id, 0) + 1

    @reactor_only
    def end(self, job_id: str) -> None:
        """The work started by the matching ``begin`` ended (successfully or not)."""
        remaining = self._pending[job_id] - 1
        if remaining:
            self._pending[job_id] = remaining
            return
        del self._pending[job_id]
        for d in self._idle_waiters.pop(job_id, ()):
            d.callback(None)
        self._check_quiescent()

    def end_after(self, result, job_id: str):
        """``end(job_id)``, then pass ``result`` on: an addBoth callback."""
        self.end(job_id)
        return result

    @reactor_only
    def busy(self, job_id: str) -> bool:
        """Work on the job is in flight, or it is being deleted."""
        return job_id in self._pending or job_id in self._deleting

    @reactor_only
    def deleting(self, job_id: str) -> bool:
        """A deletion of the job (``exclusive``) is in progress."""
        return job_id in self._deleting

    @reactor_only
    def wait_idle(self, job_id: str):
        """Deferred firing once the job has no work in flight."""
        if job_id not in self._pending:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.setdefault(job_id, []).append(d)
        return d

    @reactor_only
    def wait_quiescent(self):
        """Deferred firing once no job has work in flight and no deletion runs."""
        if not self._pending and not self._deleting:
            return defer.succeed(None)
        d = defer.Deferred()
        self._quiescent_waiters.append(d)
        return d

    @reactor_only
    def after_deletion(self, job_id: str, retry: Callable):
        """Deferred running ``retry()`` once the deletion of ``job_id`` in progress ends."""
        d = defer.Deferred()
        self._deleting[job_id].append(d)
        d.addCallback(lambda _: retry())
        return d

    @reactor_only
    def exclusive(self, job_id: str, retry: Callable, operation: Callable):
        """Run ``operation()`` once nothing else touches the job; Deferred of its result.

        When a deletion of the job is already in progress, ``retry()`` runs
        after it instead.  New work on the job waits until ``operation`` is done.
        """
        if job_id in self._deleting:
            return self.after_deletion(job_id, retry)
        self._deleting[job_id] = []
        d = self.wait_idle(job_id)
        d.addCallback(lambda _: operation())

        def finished(result):
            for waiter in self._deleting.pop(job_id):
                waiter.callback(None)
            self._check_quiescent()
            return result

        d.addBoth(finished)
        return d

    def _check_quiescent(self) -> None:
        if self._pending or self._deleting or not self._quiescent_waiters:
            return
        waiters, self._quiescent_waiters = self._quiescent_waiters, []
        for d in waiters:
            d.callback(None)
