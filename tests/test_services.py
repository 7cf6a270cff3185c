"""Tests for joblet_persist.services: ordered start/stop, listeners, stale sockets."""

from __future__ import annotations

import os
import socket
import stat
import tempfile

from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.services import (
    LOCK_FILE_NAME,
    CallbackService,
    DataDirLockService,
    OrderedMultiService,
    StartRefused,
    UnixListenerService,
    replace_stale_unix_socket,
)


class _Recorder(service.Service):
    def __init__(self, name, events, stop_deferred=None, fail_stop=False):
        self.setName(name)
        self.events = events
        self.stop_deferred = stop_deferred
        self.fail_stop = fail_stop

    def startService(self):
        super().startService()
        self.events.append(("start", self.name))

    def stopService(self):
        super().stopService()
        self.events.append(("stop", self.name))
        if self.fail_stop:
            raise RuntimeError(f"{self.name} failed to stop")
        return self.stop_deferred


class OrderedMultiServiceTests(SynchronousTestCase):
    def test_start_in_order_stop_in_reverse_waiting(self):
        """Children start in insertion order; on stop each waits for the previous child's
        Deferred, in reverse order, and the root's Deferred fires only after the last."""
        events = []
        gate = defer.Deferred()
        root = OrderedMultiService()
        for name, d in (("a", None), ("b", gate), ("c", None)):
            _Recorder(name, events, d).setServiceParent(root)
        root.startService()
        self.successResultOf(root.started)
        self.assertEqual(events, [("start", "a"), ("start", "b"), ("start", "c")])
        stopped = root.stopService()
        self.assertEqual(events[3:], [("stop", "c"), ("stop", "b")])
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(events[5:], [("stop", "a")])

    def test_failed_stop_does_not_stop_the_rest(self):
        """A child whose stop raises is logged; the children before it still stop."""
        events = []
        root = OrderedMultiService()
        _Recorder("a", events).setServiceParent(root)
        _Recorder("b", events, fail_stop=True).setServiceParent(root)
        root.startService()
        self.successResultOf(root.stopService())
        self.assertEqual(events[-2:], [("stop", "b"), ("stop", "a")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_async_start_waits_and_failure_reported(self):
        """A child whose start returns a Deferred delays the next child; a start failure
        fails ``started``, calls on_start_failure and does not start later children."""
        events = []
        gate = defer.Deferred()
        failures = []
        root = OrderedMultiService(on_start_failure=failures.append)
        CallbackService("slow", lambda: gate, lambda: None).setServiceParent(root)
        _Recorder("after", events).setServiceParent(root)
        root.startService()
        self.assertEqual(events, [])
        gate.errback(RuntimeError("cannot start"))
        self.failureResultOf(root.started, RuntimeError)
        self.assertEqual(len(failures), 1)
        self.assertEqual(events, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


    def test_start_refused_is_one_line_without_traceback(self):
        """A child refusing to start with StartRefused is logged as one error line carrying
        its message (no traceback, no logged failure), and on_start_failure still runs."""
        failures = []
        root = OrderedMultiService(on_start_failure=failures.append)

        def refuse():
            raise StartRefused("data directory /d is in use by pid 7")

        CallbackService("lock", refuse, lambda: None).setServiceParent(root)
        with capturedLogs() as events:
            root.startService()
        self.failureResultOf(root.started, StartRefused)
        self.assertEqual(len(failures), 1)
        mine = [e for e in events if "startup" in formatEvent(e)]
        self.assertEqual([formatEvent(e) for e in mine],
                         ["startup refused: data directory /d is in use by pid 7"])
        self.assertNotIn("log_failure", mine[0])
        self.assertEqual(self.flushLoggedErrors(), [])


class DataDirLockTests(SynchronousTestCase):
    """DataDirLockService: flock on <data dir>/persist.lock.  flock locks belong to an open
    file description, so two services in one process exclude each other like two processes."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp", dir="/tmp")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, True))
        self.data_dir = os.path.join(self.dir, "data")
        self.path = os.path.join(self.data_dir, LOCK_FILE_NAME)

    def service(self, pid=4242, cmdlines=None):
        cmdlines = cmdlines if cmdlines is not None else {}
        svc = DataDirLockService(
            self.data_dir, pid=lambda: pid, hostname=lambda: "node-a", now=lambda: 0.0,
            read_cmdline=cmdlines.get,
        )
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc

    def read(self) -> str:
        with open(self.path) as f:
            return f.read()

    def test_lock_taken_and_holder_recorded(self):
        """Starting creates the data directory and a 0640 lock file holding our PID, host and
        start time, and holds an exclusive flock on it that others cannot take."""
        old = os.umask(0o022)
        try:
            svc = self.service()
            svc.startService()
        finally:
            os.umask(old)
        self.assertTrue(svc.running and svc.locked)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o640)
        self.assertEqual(self.read(), "pid=4242\nhost=node-a\nstarted=1970-01-01T00:00:00Z\n")
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        import fcntl

        self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_second_instance_refused_naming_the_first(self):
        """While one service holds the lock, a second refuses to start with StartRefused naming
        the data directory, the holder's PID and its command line; it changes nothing in the
        lock file and is not running."""
        first = self.service(pid=4242)
        first.startService()
        second = self.service(
            pid=5353, cmdlines={4242: "python3 twistd -n joblet-persist --config /etc/a.yml"}
        )
        e = self.assertRaises(StartRefused, second.startService)
        message = str(e)
        self.assertIn(f"data directory {self.data_dir} is in use by pid 4242", message)
        self.assertIn("(python3 twistd -n joblet-persist --config /etc/a.yml)", message)
        self.assertIn("on host node-a", message)
        self.assertIn(self.path, message)
        self.assertFalse(second.running or second.locked)
        self.assertIn("pid=4242\n", self.read())
        # Stopping the refused service does not release the first one's lock.
        second.stopService()
        self.assertRaises(StartRefused, self.service(pid=6464).startService)

    def test_holder_without_pid_yet(self):
        """A lock held by a process that has not written its PID is still refused, with a
        message that says the PID is unknown rather than a wrong one."""
        import fcntl

        os.makedirs(self.data_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        e = self.assertRaises(StartRefused, self.service().startService)
        self.assertIn("another process (its PID is not recorded", str(e))

    def test_stop_releases_the_lock(self):
        """After stop the lock file is emptied (no stale PID) and another service can start."""
        first = self.service(pid=1)
        first.startService()
        first.stopService()
        self.assertFalse(first.locked)
        self.assertEqual(self.read(), "")
        second = self.service(pid=2)
        second.startService()
        self.assertTrue(second.locked)
        self.assertTrue(self.read().startswith("pid=2\n"))

    def test_symlinked_lock_file_refused(self):
        """A symlink planted at the lock file's path is not followed: start is refused with
        a message naming the path, and the link's target is neither created nor changed."""
        os.makedirs(self.data_dir)
        target = os.path.join(self.dir, "outside")
        with open(target, "w") as f:
            f.write("precious")
        os.symlink(target, self.path)
        e = self.assertRaises(StartRefused, self.service().startService)
        self.assertIn(self.path, str(e))
        self.assertIn("symbolic link", str(e))
        with open(target) as f:
            self.assertEqual(f.read(), "precious")

    def test_fifo_at_lock_path_refused(self):
        """Something other than a regular file at the lock path (a FIFO) is refused without
        blocking."""
        os.makedirs(self.data_dir)
        os.mkfifo(self.path)
        e = self.assertRaises(StartRefused, self.service().startService)
        self.assertIn("not a regular file", str(e))


class StaleSocketTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp", dir="/tmp")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, True))
        self.path = os.path.join(self.dir, "s.sock")

    def test_stale_socket_removed(self):
        """A socket file nobody listens on (left by a crash) is removed."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.close()
        replace_stale_unix_socket(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_live_socket_refused(self):
        """A socket another process listens on is not stolen: the error names the path."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        self.addCleanup(s.close)
        e = self.assertRaises(OSError, replace_stale_unix_socket, self.path)
        self.assertIn(self.path, str(e))
        self.assertTrue(os.path.exists(self.path))

    def test_regular_file_refused(self):
        """A regular file at the socket path is never deleted."""
        with open(self.path, "w") as f:
            f.write("data")
        e = self.assertRaises(OSError, replace_stale_unix_socket, self.path)
        self.assertIn("not a socket", str(e))

    def test_missing_is_fine(self):
        """No file at the path: nothing to do."""
        replace_stale_unix_socket(self.path)

    def test_listener_service_mode_and_cleanup(self):
        """UnixListenerService listens with the requested mode, runs on_stop after the
        port closed, and removes the socket file."""
        reactor = MemoryReactorClock()
        calls = []
        svc = UnixListenerService(reactor, "ipc", self.path, object(), mode=0o640,
                                  on_stop=lambda: calls.append("drained"))
        svc.startService()
        self.assertEqual(reactor.unixServers[0][0], self.path)
        self.assertEqual(reactor.unixServers[0][3], 0o640)
        open(self.path, "w").close()  # MemoryReactor creates no file; stand in for it
        self.successResultOf(svc.stopService())
        self.assertEqual(calls, ["drained"])
        self.assertFalse(os.path.exists(self.path))


class ListenerNeverStartedTests(SynchronousTestCase):
    def test_failed_listen_leaves_other_process_socket(self):
        """When listening fails because another process owns the socket, stopping the
        service does not delete that process's live socket file."""
        d = tempfile.mkdtemp(prefix="jp", dir="/tmp")
        self.addCleanup(lambda: __import__("shutil").rmtree(d, True))
        path = os.path.join(d, "s.sock")
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(path)
        live.listen(1)
        self.addCleanup(live.close)
        svc = UnixListenerService(MemoryReactorClock(), "ipc", path, object())
        self.assertRaises(OSError, svc.startService)
        self.successResultOf(defer.maybeDeferred(svc.stopService))
        self.assertTrue(os.path.exists(path))
