"""Debouncer: run a function at most once per interval, at once when flushed or stopped.
PendingWrites: when a state file changed in memory is due to be written again.

Reactor thread: every method is ``@reactor_only``, and the function runs on the
reactor thread (it may hand blocking work to a pool and return a Deferred).
The clock is injected (the reactor, or ``task.Clock`` in tests); nothing here
imports the reactor.  Buildbot's ``buildbot.util.debounce.Debouncer`` is the
model.

The rules, for "write the job index when it changed, but not more often than
every few seconds":

- A call requests a run: if neither a timer nor a run is pending, a timer of
  ``interval`` seconds starts, and the run happens when it fires.  Calls while
  the timer waits are absorbed by it.
- At most one run is in flight.  Calls during a run are remembered: when the
  run ends, a new timer starts (so runs start at least ``interval`` apart).
- ``flush()`` runs now (cancelling the timer), or right after the run in
  flight ends when there is one, and fires with the result of that run, which
  includes every change made before the call.
- ``stop()`` starts no more timers; a requested run happens at once (unless
  ``flush=False``: then only an explicit ``flush()`` runs it), and the
  returned Deferred fires when the run in flight, if any, has ended.

The function's Deferred (or value) is the run's result: it is handed to the
``flush()`` callers waiting for that run; a failure of a run that nobody
flushed is the function's to log (the debouncer passes it to no one).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from joblet_persist.threads import reactor_only

_RUNNING = object()  # marks a run whose Deferred has not been returned yet


class Debouncer:
    """Runs ``function()`` at most once per ``interval`` seconds.  Reactor thread.

    ``clock`` provides ``callLater``; ``function`` takes no arguments and
    returns a value or a Deferred.
    """

    def __init__(self, clock, interval: float, function: Callable[[], Any]) -> None:
        self._clock = clock
        self._interval = interval
        self._function = function
        self._timer = None
        self._running = None  # the run in flight (its Deferred, or _RUNNING), or None
        self._requested = False  # a call came since the last run started
        self._waiters: list = []  # flush() Deferreds of the run in flight
        self._next: list = []  # flush() Deferreds that need a run after the one in flight
        self._stopped = False

    @property
    def requested(self) -> bool:
        """A call came since the last run started (a run is due).  Reactor thread."""
        return self._requested

    @property
    def running(self) -> bool:
        """A run is in flight.  Reactor thread."""
        return self._running is not None

    @reactor_only
    def __call__(self) -> None:
        """Request a run within ``interval`` seconds.  Reactor thread."""
        self._requested = True
        self._schedule()

    @reactor_only
    def flush(self) -> defer.Deferred:
        """Run now (or right after the run in flight); Deferred with that run's result.

        Reactor thread.  Works after ``stop()`` too.
        """
        d = defer.Deferred()
        if self._running is not None:
            self._next.append(d)
            return d
        self._cancel_timer()
        self._waiters.append(d)
        self._run()
        return d

    @reactor_only
    def stop(self, flush: bool = True) -> defer.Deferred:
        """Start no more timers; Deferred firing (with None) once no run is in flight.

        Reactor thread.  A requested run happens now (after the run in flight,
        if any) unless ``flush`` is False.  Calls after stop() are remembered
        (``requested``) but only ``flush()`` runs them.
        """
        self._stopped = True
        self._cancel_timer()
        if flush and self._requested:
            d = self.flush()
        elif self._running is not None:
            d = defer.Deferred()
            self._waiters.append(d)
        else:
            return defer.succeed(None)
        return d.addBoth(lambda _: None)

    def _schedule(self) -> None:
        if self._timer is None and self._running is None and not self._stopped:
            self._timer = self._clock.callLater(self._interval, self._fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _fired(self) -> None:
        self._timer = None
        if self._running is None:
            self._run()

    def _run(self) -> None:
        self._requested = False
        self._running = _RUNNING
        d = defer.maybeDeferred(self._function)
        if self._running is _RUNNING:
            self._running = d
        d.addBoth(self._ran)

    def _ran(self, result) -> None:
        self._running = None
        waiters, self._waiters = self._waiters, []
        if self._next:
            self._waiters, self._next = self._next, []
            self._run()
        elif self._requested:
            self._schedule()
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return None


class PendingWrites:
    """Changes made in memory to a state file since it was last written, and whether the
    last write is old enough to write it again: for a file rewritten at most once per
    interval while work goes on, and whenever a round of work ends with changes pending
    (the archive's S3 manifest and CloudWatch cursors).  Reactor thread."""

    __slots__ = ("_clock", "count", "_written_at")

    def __init__(self, clock):
        self._clock = clock
        self.count = 0
        self._written_at = 0.0

    def note(self, interval: float) -> bool:
        """One more change; True when the file was last written ``interval`` seconds ago or
        more (it is due)."""
        self.count += 1
        return self._clock.seconds() - self._written_at >= interval

    def writing(self) -> None:
        """The file is being written now, with every change so far."""
        self.count = 0
        self._written_at = self._clock.seconds()
