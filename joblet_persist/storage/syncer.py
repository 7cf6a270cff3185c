"""DirtyPaths: the "interval" fsync policy's bookkeeping of what still needs an fsync.

Reactor thread: every method is ``@reactor_only``; the fsyncs themselves run
on the pool (``diskwork.thd_fsync_paths`` through the injected runner).  Leaf
module: it creates Deferreds but never imports the reactor.

Appends under the "interval" policy skip fsync and ``add`` the file and the
directories they changed.  ``sync()`` fsyncs them all; a Debouncer runs it at
most ``interval`` seconds after the first unsynced append.  Its run only starts
the fsyncs (runs may overlap), so an append during an fsync starts the next
timer at once: nothing waits longer than the interval plus one fsync.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from twisted.internet import defer

from joblet_persist.debounce import Debouncer
from joblet_persist.storage.diskwork import thd_fsync_paths
from joblet_persist.threads import reactor_only


class DirtyPaths:
    """Paths appended to without fsync, and their timed fsync.  Reactor thread."""

    def __init__(self, run_in_thread: Callable, clock, interval: float, log) -> None:
        self._run = run_in_thread
        self._log = log
        self._paths: set = set()
        self._timer = Debouncer(clock, interval, self._timer_fired)

    def __bool__(self) -> bool:
        return bool(self._paths)

    @reactor_only
    def add(self, paths: Iterable[str]) -> None:
        """Remember ``paths`` for the next fsync, due within the interval."""
        self._paths.update(paths)
        self._timer()

    @reactor_only
    def discard_under(self, prefixes: tuple) -> None:
        """Forget paths under any of ``prefixes`` (directories ending in os.sep): removed."""
        self._paths = {p for p in self._paths if not (p + os.sep).startswith(prefixes)}

    @reactor_only
    def stop_timer(self) -> None:
        """No more timed fsyncs; ``sync()`` still works (stop calls it last)."""
        self._timer.stop(flush=False)

    @reactor_only
    def sync(self):
        """fsync every remembered path; Deferred[number of paths synced].

        On failure the paths are remembered again and the Deferred fails.
        """
        if not self._paths:
            return defer.succeed(0)
        paths = sorted(self._paths)
        self._paths = set()

        def failed(f):
            self._paths.update(paths)
            return f

        d = self._run(thd_fsync_paths, paths)
        d.addCallbacks(lambda _: len(paths), failed)
        return d

    def _timer_fired(self) -> None:
        self.sync().addErrback(
            lambda f: self._log.failure("fsync of dirty segment files failed", f)
        )
