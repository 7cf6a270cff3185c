"""Small Service classes the composition root (tap.py) wires together.

Reactor thread: every method here runs on the reactor; blocking work goes to
the thread pools these services own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import sys
import time
from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet import unix as _unix
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from joblet_persist.logs import Logger
from joblet_persist.threads import reactor_only


class StartRefused(Exception):
    """A service refuses to start for a reason the operator must act on.

    The message says it all; OrderedMultiService logs it as one error line,
    without a traceback.
    """


def start_failure_reason(failure: Failure) -> Optional[str]:
    """One line for a start failure the operator fixes (refused, address in use, a path
    that cannot be created); None for a bug, which is logged with its traceback."""
    from twisted.internet.error import CannotListenError

    value = failure.value
    if failure.check(StartRefused):
        return str(value)
    if failure.check(CannotListenError):
        cause = value.socketError
        detail = getattr(cause, "strerror", None) or str(cause)
        if value.interface is None and isinstance(value.port, (str, bytes)):
            where = os.fsdecode(value.port)  # a Unix socket path
        else:
            where = f"{value.interface or '*'}:{value.port}"
        return f"cannot listen on {where}: {detail}"
    if failure.check(OSError):
        if value.strerror and value.filename:
            return f"{value.strerror}: {value.filename}"
        return " ".join(str(value).split())
    return None


class OrderedMultiService(service.MultiService):
    """Starts children in order and stops them in reverse, one after another.

    Stock MultiService stops children concurrently and drops their errors.
    Here a child's ``startService``/``stopService`` may return a Deferred; the
    next child waits for it.  A failed stop is logged and the remaining
    children are still stopped.  ``started`` fires once every child started
    (or fails with the first start error, which also stops the reactor via
    ``on_start_failure``).
    """

    log = Logger()

    def __init__(self, on_start_failure: Optional[Callable] = None):
        super().__init__()
        self._on_start_failure = on_start_failure
        self.started: defer.Deferred = defer.Deferred()
        self._starting: Optional[defer.Deferred] = None

    def privilegedStartService(self):
        # Nothing here needs privileges; children are started in startService.
        pass

    @reactor_only
    def startService(self):
        service.Service.startService(self)
        self._starting = self._start_children()
        return self._starting

    @defer.inlineCallbacks
    def _start_children(self):
        name = None
        try:
            for child in list(self):
                name = child.name
                yield defer.maybeDeferred(child.startService)
        except Exception:
            failure = Failure()
            reason = start_failure_reason(failure)
            if failure.check(StartRefused):
                self.log.error("startup refused: {reason}", reason=reason)
            elif reason is not None:
                self.log.error("startup failed: {name}: {reason}", name=name, reason=reason)
            else:
                self.log.failure("startup failed; stopping", failure)
            self.started.errback(failure)
            if self._on_start_failure is not None:
                self._on_start_failure(failure)
            return
        self.started.callback(None)

    @defer.inlineCallbacks
    @reactor_only
    def stopService(self):
        service.Service.stopService(self)
        if self._starting is not None and not self._starting.called:
            # Let a start in progress finish (or fail) before stopping.
            yield self._starting
        for child in reversed(list(self)):
            if not child.running:
                continue
            # Each step is logged, so the stop order (docs/operations.md) can be read from
            # the log, and a step that hangs is named by its "stopping" line (debug).
            name = child.name or repr(child)
            self.log.debug("stopping {name}", name=name)
            began = time.monotonic()
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("error stopping {name}", name=name)
            else:
                self.log.info("stopped {name} in {seconds:.3f} s", name=name,
                              seconds=time.monotonic() - began)


class ThreadPoolService(service.Service):
    """Owns a ThreadPool created in startService and joined in stopService.

    ``run(f, *args, **kwargs)`` hands blocking work to the pool and returns a
    Deferred fired on the reactor.

    ``switch_interval`` (seconds), when given, is the interpreter's thread switch interval
    (``sys.setswitchinterval``) while the service runs, restored at stop: how long a thread
    that wants the GIL back waits before the thread holding it is asked to let go.  The
    pool's threads take the GIL back several times per task (after each compression, each
    write) while the reactor thread holds it for whole reads.
    """

    def __init__(self, reactor, name: str, size: int, switch_interval: Optional[float] = None):
        self._reactor = reactor
        self._size = max(1, size)
        self._switch_interval = switch_interval
        self._saved_switch_interval: Optional[float] = None
        self.setName(name)
        self.pool: Optional[ThreadPool] = None

    @reactor_only
    def startService(self):
        super().startService()
        if self._switch_interval is not None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self._switch_interval)
        self.pool = ThreadPool(minthreads=0, maxthreads=self._size, name=self.name)
        self.pool.start()

    @reactor_only
    def stopService(self):
        super().stopService()
        pool, self.pool = self.pool, None
        if pool is not None:
            # The pool is idle by now (its users stopped before us); joining is quick.
            pool.stop()
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    @reactor_only
    def run(self, f, *args, **kwargs) -> defer.Deferred:
        if self.pool is None:
            return defer.fail(RuntimeError(f"thread pool {self.name} is not running"))
        return threads.deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)


class ExecutorService(service.Service):
    """Owns a ``concurrent.futures.ThreadPoolExecutor`` created in startService.

    For work that gRPC handler threads hand out and wait for themselves (the
    search's member scans): ``submit(fn, *args)`` returns a Future and may be
    called from any thread; without a running executor (before start, after
    stop) the work runs at once on the caller's thread.  Stop cancels the work
    not started and does not wait for the rest (the gRPC service, stopped
    before, has ended its calls).
    """

    def __init__(self, name: str, size: int):
        self._size = max(1, size)
        self.setName(name)
        self.executor = None

    @property
    def size(self) -> int:
        return self._size

    @reactor_only
    def startService(self):
        from concurrent.futures import ThreadPoolExecutor

        super().startService()
        self.executor = ThreadPoolExecutor(self._size, thread_name_prefix=self.name)

    @reactor_only
    def stopService(self):
        super().stopService()
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn, *args):
        executor = self.executor
        if executor is not None:
            try:
                return executor.submit(fn, *args)
            except RuntimeError:
                pass  # shut down meanwhile: run it here
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future


class CallbackService(service.Service):
    """A service whose start and stop are given callables (each may return a Deferred)."""

    def __init__(self, name: str, start: Callable, stop: Callable):
        self.setName(name)
        self._start = start
        self._stop = stop

    @reactor_only
    def startService(self):
        super().startService()
        return self._start()

    @reactor_only
    def stopService(self):
        super().stopService()
        return self._stop()


def unix_socket_is_live(path: str) -> bool:
    """Whether a process listens on the Unix socket at ``path``.  Never blocks.

    A non-blocking connect answers at once: it succeeds, or fails with EAGAIN
    when the listener's backlog is full (Linux) or EINPROGRESS (elsewhere), when
    someone listens; it fails with ECONNREFUSED when the file is a socket nobody
    listens on (left by a crash).  A blocking connect would wait on a live but
    busy listener, and a timeout would then be taken for "stale".  Any other
    error (the file vanished, no permission) counts as not live, as it always
    has.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    return err in (0, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS)


def replace_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a crash; refuse to steal a live one.

    Raises OSError naming the path when another process still listens there or
    the path is not a socket.  Never blocks on the listener (unix_socket_is_live),
    so the reactor thread may call it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    if unix_socket_is_live(path):
        raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on this socket")
    try:
        os.unlink(path)  # nobody listens: stale
    except FileNotFoundError:
        pass


def _path_identity(path: str):
    """(st_dev, st_ino) of ``path`` itself (not followed), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


class _OwnedUnixPort(_unix.Port):
    """A Unix listening port that removes its socket file on close only if the path
    still names the file it bound (``identity``).

    The stock port unlinks whatever sits at the path: after the file was deleted that
    fails, and after someone else put a file there it would delete theirs.
    """

    identity = None

    def connectionLost(self, reason):
        path = self._bindPath
        if self.identity is not None and _path_identity(path) == self.identity:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        # Skip unix.Port's unconditional unlink (no lock file: wantPID is never set).
        _unix.tcp.Port.connectionLost(self, reason)


def _listen_unix(reactor, path: str, factory, backlog: int, mode: int):
    """Listen on ``path``; returns the listening port.  Reactor thread."""
    from twisted.internet.posixbase import PosixReactorBase

    if isinstance(reactor, PosixReactorBase):
        port = _OwnedUnixPort(path, factory, backlog, mode, reactor)
        port.startListening()
        return port
    # Test reactors (MemoryReactor) record the call and create no file.
    return reactor.listenUNIX(path, factory, backlog=backlog, mode=mode)


class UnixListenerService(service.Service):
    """Listens on a Unix socket with a given file mode; removes the file on stop.

    ``on_stop`` runs after the listening port closed (used to drain ingest
    connections); it may return a Deferred.

    The socket file's identity ((st_dev, st_ino), taken right after bind) is kept, so the
    path can be checked later: ``thd_check_path`` (pool thread) looks at the path and
    ``apply_path_check`` (reactor) acts on the answer.  A deleted file is recreated at the
    same path with the same mode (``recreated`` counts it, ``on_recreated`` is called); a
    path that now names another file is left alone and reported (``path_problem``), since
    stealing it could break whoever put it there.  Connections already open are not
    affected either way.  The file is removed on stop only if it is still ours.
    """

    log = Logger()

    def __init__(self, reactor, name: str, path: str, factory, mode: int = 0o600,
                 backlog: int = 128, on_stop: Optional[Callable] = None,
                 on_recreated: Optional[Callable[[], None]] = None):
        self.setName(name)
        self._reactor = reactor
        self.path = path
        self._factory = factory
        self._mode = mode
        self._backlog = backlog
        self._on_stop = on_stop
        self._on_recreated = on_recreated
        self.port = None
        self.identity = None
        self.recreated = 0
        self.path_problem: Optional[str] = None
        self._generation = 0

    def _listen(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # listenUNIX applies the mode with chmod right after bind.
        old = os.umask(0o177)
        try:
            port = _listen_unix(self._reactor, self.path, self._factory, self._backlog,
                                self._mode)
        finally:
            os.umask(old)
        identity = _path_identity(self.path)
        if hasattr(port, "identity"):
            port.identity = identity
        self._generation += 1
        return port, identity

    @reactor_only
    def startService(self):
        super().startService()
        replace_stale_unix_socket(self.path)
        self.port, self.identity = self._listen()
        self.log.info("{name} listening on unix:{path} mode {mode:04o}",
                      name=self.name, path=self.path, mode=self._mode)

    @defer.inlineCallbacks
    @reactor_only
    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            # We never listened (e.g. another process holds the socket): the file is not ours.
            return
        self._generation += 1
        yield defer.maybeDeferred(port.stopListening)
        if self._on_stop is not None:
            yield defer.maybeDeferred(self._on_stop)
        if self.identity is None or _path_identity(self.path) == self.identity:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @property
    def listening(self) -> bool:
        return self.port is not None

    def check(self) -> tuple[bool, str]:
        """Health check: listening, and the path is still our socket."""
        if self.port is None:
            return False, "not listening"
        if self.path_problem is not None:
            return False, self.path_problem
        detail = f"unix:{self.path}"
        if self.recreated:
            detail += f" (socket file recreated {self.recreated} times after it was deleted)"
        return True, detail

    @reactor_only
    def path_probe(self):
        """``(thd_check_path, apply_path_check)`` bound to the current listener, for the
        health monitor's periodic probe.  Reactor thread."""
        generation = self._generation
        return (lambda: self.thd_check_path(generation)), self.apply_path_check

    def thd_check_path(self, generation: int):
        """Pool thread: ``(generation, identity of the path or None)``."""
        return generation, _path_identity(self.path)

    @reactor_only
    def apply_path_check(self, result) -> None:
        """Reactor thread: act on ``thd_check_path``'s answer (ignored when the listener
        changed since the check started)."""
        generation, found = result
        if generation != self._generation or self.port is None or self.identity is None:
            return
        if found == self.identity:
            self.path_problem = None
            return
        if found is not None:
            if self.path_problem is None:
                self.log.error(
                    "{path} is no longer this service's {name} socket (another file "
                    "replaced it); new connections cannot reach the service; not replacing "
                    "it: remove it and the socket is recreated", path=self.path,
                    name=self.name)
            self.path_problem = (
                f"{self.path} is no longer this service's socket: another file replaced it; "
                "new connections cannot reach the service"
            )
            return
        self._recreate()

    @reactor_only
    def _recreate(self) -> None:
        old = self.port
        try:
            self.port, self.identity = self._listen()
        except Exception as e:
            self.path_problem = f"{self.path} was deleted and could not be recreated: {e}"
            self.log.error("{name} socket {path} was deleted and could not be recreated: "
                           "{error}", name=self.name, path=self.path, error=e)
            return
        self.path_problem = None
        self.recreated += 1
        if self._on_recreated is not None:
            self._on_recreated()
        self.log.warn("{name} socket {path} was deleted; listening again at the same path "
                      "(mode {mode:04o})", name=self.name, path=self.path, mode=self._mode)
        # The old port listens on a file nobody can reach; close it (it removes nothing).
        d = defer.maybeDeferred(old.stopListening)
        d.addErrback(lambda f: self.log.failure("closing the old {name} listener failed", f,
                                                name=self.name))


class TCPListenerService(service.Service):
    """Listens on TCP host:port (port 0 picks a free one, see ``.port_number``)."""

    log = Logger()

    def __init__(self, reactor, name: str, host: str, port: int, factory):
        self.setName(name)
        self._reactor = reactor
        self._host = host
        self._port_number = port
        self._factory = factory
        self.port = None

    @reactor_only
    def startService(self):
        super().startService()
        self.port = self._reactor.listenTCP(self._port_number, self._factory,
                                            interface=self._host)
        self.log.info("{name} listening on http://{host}:{port}/", name=self.name,
                      host=self._host, port=self.port_number)

    @reactor_only
    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)

    @property
    def port_number(self) -> int:
        return self.port.getHost().port if self.port is not None else self._port_number


def read_proc_cmdline(pid: int) -> Optional[str]:
    """The command line of ``pid`` from /proc, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    words = [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]
    return " ".join(words) or None


def read_proc_locks() -> str:
    """The text of /proc/locks ("" when it cannot be read)."""
    try:
        with open("/proc/locks") as f:
            return f.read()
    except OSError:
        return ""


def flock_holders(locks_text: str, dev: int, ino: int) -> list[int]:
    """PIDs holding a flock on the file ``(dev, ino)``, from the text of /proc/locks.

    Lines look like ``1: FLOCK  ADVISORY  WRITE 4127 fe:00:2171873 0 EOF`` (major
    and minor in hex, the inode in decimal); waiters (``1: -> FLOCK ...``) are
    skipped.
    """
    wanted = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    pids = []
    for line in locks_text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        pid, where = fields[4], fields[5]
        if where == wanted and pid.isdigit():
            pids.append(int(pid))
    return pids


class DataDirLockService(service.Service):
    """Holds an exclusive lock on the data directory while the service runs.

    Reactor thread; started first and stopped last, so nothing reads or
    writes the data, and no socket is replaced, before the lock is held.  The
    lock is ``flock(LOCK_EX | LOCK_NB)`` on the data directory itself (opened
    O_DIRECTORY | O_CLOEXEC): the kernel releases it when the process ends,
    however it ends (SIGKILL included), a child process never inherits it,
    and no file is added to the data directory (nothing to plant a symlink
    at, nothing stale after a crash).  Two paths to the same directory (a
    symlinked data directory) take the same lock.

    When another process holds the lock, ``startService`` raises StartRefused
    naming the data directory and that process: its PID from /proc/locks (the
    kernel's own record of the holder) and its command line from /proc when
    readable.
    """

    log = Logger()

    def __init__(self, data_dir: str, *,
                 read_locks: Callable[[], str] = read_proc_locks,
                 read_cmdline: Callable[[int], Optional[str]] = read_proc_cmdline):
        self.setName("lock")
        self.data_dir = data_dir
        self._read_locks = read_locks
        self._read_cmdline = read_cmdline
        self._fd: Optional[int] = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    @reactor_only
    def startService(self):
        try:
            os.makedirs(self.data_dir, mode=0o750, exist_ok=True)
            fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StartRefused(
                f"cannot lock the data directory {self.data_dir}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            st = os.fstat(fd)
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise StartRefused(
                    f"data directory {self.data_dir} is in use by {self._holder(st)}; "
                    "only one joblet-persist may use a data directory"
                ) from None
            raise StartRefused(
                f"cannot lock the data directory {self.data_dir}: {e.strerror or e}"
            ) from None
        self._fd = fd
        super().startService()
        self.log.info("data directory {dir} locked", dir=self.data_dir)

    def _holder(self, st: os.stat_result) -> str:
        pids = flock_holders(self._read_locks(), st.st_dev, st.st_ino)
        if not pids:
            return "another process (/proc/locks does not say which)"
        described = []
        for pid in pids:
            cmdline = self._read_cmdline(pid)
            described.append(f"pid {pid}" + (f" ({cmdline})" if cmdline else ""))
        return ", ".join(described)

    @reactor_only
    def stopService(self):
        super().stopService()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the lock
