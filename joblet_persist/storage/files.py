"""A cap on the data files that readers hold open at once.  Any thread.

The local backend opens a segment for one append, one scan or one index
write and closes it when that operation ends, on the storage pool: at most
two descriptors per pool thread (a file, and its directory while it is
fsync'd).  Queries run on gRPC threads, one per RPC, and a query may read
several segments; without a cap their descriptors would grow with the number
of concurrent queries times the segments each touches.

``storage.maxOpenFiles`` is therefore split in two: ``2 * writer.threads``
for the pool, which cannot exceed it, and the rest for queries, shared
through a FileBudget.  A query keeps at most ``QUERY_FILES`` files open and
gives them all back before it hands records to its caller (a slow client
never holds descriptors while it is not reading), and it never waits for a
slot while it holds one: when the budget is exhausted it first closes its
own files.  Nobody waits while holding a slot, so the budget cannot
deadlock; waiters are served in arrival order.

A segment is opened by a walk from the data directory that never follows a
symlink (storage.safefs); the walk holds up to two directory descriptors for
the moment of the open, outside the budget (tap.py's descriptor reserve
covers them).
"""

from __future__ import annotations

import threading
from collections import deque

from joblet_persist.storage import safefs
from joblet_persist.storage.remote import RemotePath

#: Descriptors the storage pool may hold per thread (a file and its directory).
POOL_FILES_PER_THREAD = 2

#: Components of a segment path below the data directory: logs/<job>/<name>.
SEGMENT_DEPTH = 3

#: Files a single query keeps open at most (least recently used closed first).
QUERY_FILES = 4



def _safe_open(path: str, mode: str = "rb"):
    """Open segment ``path`` (``logs/<job>/<name>`` deep in the data directory) to read."""
    if mode != "rb":
        raise ValueError(f"queries open segments read-only, not {mode!r}")
    return safefs.open_read(path, SEGMENT_DEPTH)


#: Opens a segment for a query, never through a symlink (safefs); tests observe the
#: files queries open through this.
_open_file = _safe_open


def query_share(max_open_files: int, pool_threads: int) -> int:
    """Slots left to queries by ``max_open_files``, or ValueError naming the keys."""
    pool = POOL_FILES_PER_THREAD * pool_threads
    share = max_open_files - pool
    if share < 1:
        raise ValueError(
            f"storage.maxOpenFiles is {max_open_files}, but the write pool alone may hold "
            f"{pool} files ({POOL_FILES_PER_THREAD} per thread, writer.threads = "
            f"{pool_threads}) and queries need at least 1 more: set storage.maxOpenFiles "
            f"to {pool + 1} or more, or lower writer.threads"
        )
    return share


class FileBudget:
    """At most ``limit`` slots held at once among the threads sharing it.  Any thread.

    ``acquire`` blocks until a slot is free, first come first served;
    ``try_acquire`` takes one only when it is free and nobody is waiting.
    ``in_use``, ``peak`` and ``waits`` (acquisitions that had to wait) are
    for metrics and tests.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a file budget needs at least 1 slot, not {limit!r}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self.waits = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque = deque()

    def _take(self) -> None:
        self.in_use += 1
        if self.in_use > self.peak:
            self.peak = self.in_use

    def try_acquire(self) -> bool:
        with self._cond:
            if self._queue or self.in_use >= self.limit:
                return False
            self._take()
            return True

    def acquire(self) -> None:
        with self._cond:
            if not self._queue and self.in_use < self.limit:
                self._take()
                return
            self.waits += 1
            ticket = object()
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.in_use >= self.limit:
                    self._cond.wait()
                self._take()
            finally:
                self._queue.remove(ticket)
                # The next in line may be able to go too (or this one gave up).
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if self.in_use <= 0:
                raise RuntimeError("FileBudget released more often than acquired")
            self.in_use -= 1
            self._cond.notify_all()


class OpenFiles:
    """One query's open files: at most ``QUERY_FILES``, each holding a budget slot.

    Owned by one thread.  ``get(path)`` returns an open binary file for
    ``path``, reusing one this query opened before; ``release_all()`` closes
    them all (the query reopens what it needs next).  Without a budget
    (``None``), files are only limited to ``QUERY_FILES``.
    """

    def __init__(self, budget: FileBudget | None, limit: int = QUERY_FILES) -> None:
        self._budget = budget
        self._limit = max(1, limit)
        self._files: dict = {}  # path -> file, least recently used first
        self.opened = 0

    def __len__(self) -> int:
        return len(self._files)

    def get(self, path: str):
        f = self._files.pop(path, None)
        if f is not None:
            self._files[path] = f  # most recently used
            return f
        if len(self._files) >= self._limit:
            self._close(next(iter(self._files)))
        if isinstance(path, RemotePath):
            # A remote segment (storage.remote) holds no descriptor: no budget slot.
            f = path.open()
            self.opened += 1
            self._files[path] = f
            return f
        budget = self._budget
        if budget is not None and not budget.try_acquire():
            # Never wait while holding a slot: give ours back first.
            self.release_all()
            budget.acquire()
        try:
            f = _open_file(path, "rb")
        except BaseException:
            if budget is not None:
                budget.release()
            raise
        self.opened += 1
        self._files[path] = f
        return f

    def _close(self, path: str) -> None:
        f = self._files.pop(path)
        try:
            f.close()
        finally:
            if self._budget is not None and not isinstance(path, RemotePath):
                self._budget.release()

    def release_all(self) -> None:
        while self._files:
            self._close(next(iter(self._files)))
