"""Thread ownership, made checkable.  Any thread (a leaf: no reactor import).

The reactor thread owns all mutable state (docs/architecture.md).  Methods that
may only run there are marked ``@reactor_only``.  In production the mark costs
nothing: the decorator returns the function unchanged.  With the environment
variable ``JOBLET_PERSIST_CHECK_THREADS=1`` set when this module is imported
(the test suite sets it, and twistd processes spawned by tests inherit it),
every call of a marked function asserts that it runs on the reactor thread and
raises :class:`WrongThread` naming the function and the thread otherwise.

"The reactor thread" is the thread registered as Twisted's I/O thread
(``threadable.ioThread``, set when a reactor starts running); before any
reactor ran, as in synchronous unit tests driven by ``task.Clock``, it is the
main thread.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, TypeVar

from twisted.python import threadable

F = TypeVar("F", bound=Callable)

#: Read once, at import: the decorator decides then whether to wrap at all.
CHECKING = os.environ.get("JOBLET_PERSIST_CHECK_THREADS", "") not in ("", "0")


class WrongThread(AssertionError):
    """A reactor-only function was called from another thread."""


def on_reactor_thread() -> bool:
    """True on the thread that owns the service's mutable state."""
    if threadable.ioThread is not None:
        return threadable.isInIOThread()
    return threading.current_thread() is threading.main_thread()


def reactor_only(f: F) -> F:
    """Mark ``f`` as reactor-thread only; checked when CHECKING is on."""
    if not CHECKING:
        return f

    @functools.wraps(f)
    def checked(*args, **kwargs):
        if not on_reactor_thread():
            raise WrongThread(
                f"{f.__qualname__} runs only on the reactor thread, "
                f"called from {threading.current_thread().name!r}"
            )
        return f(*args, **kwargs)

    return checked


def run_inline(fn: Callable, *args):
    """A ``submit`` that runs the work at once on the calling thread: a done Future with
    its result, or with the exception it raised.  Any thread."""
    from concurrent.futures import Future

    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # delivered to whoever takes the result
        future.set_exception(e)
    return future
