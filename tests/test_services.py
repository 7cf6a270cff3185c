"""Tests for joblet_persist.services: ordered start/stop, listeners, stale sockets."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile

from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.services import (
    CallbackService,
    DataDirLockService,
    OrderedMultiService,
    StartRefused,
    ThreadPoolService,
    UnixListenerService,
    flock_holders,
    read_proc_locks,
    replace_stale_unix_socket,
    unix_socket_is_live,
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
    """DataDirLockService: flock on the data directory.  flock locks belong to an open file
    description, so two services in one process exclude each other like two processes."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp", dir="/tmp")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, True))
        self.data_dir = os.path.join(self.dir, "data")

    def service(self, cmdlines=None, data_dir=None):
        cmdlines = cmdlines if cmdlines is not None else {}
        svc = DataDirLockService(data_dir or self.data_dir, read_cmdline=cmdlines.get)
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc

    def test_lock_taken_without_adding_files(self):
        """Starting creates the data directory, holds an exclusive flock on it that others
        cannot take (the kernel lists this process as the holder), and adds no file."""
        svc = self.service()
        svc.startService()
        self.assertTrue(svc.running and svc.locked)
        self.assertEqual(os.listdir(self.data_dir), [])
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.stat(self.data_dir)
        self.assertIn(os.getpid(), flock_holders(read_proc_locks(), st.st_dev, st.st_ino))

    def test_second_instance_refused_naming_the_first(self):
        """While one service holds the lock, a second refuses to start with StartRefused naming
        the data directory, the holder's PID and its command line, and is not running;
        stopping it leaves the first one's lock in place."""
        first = self.service()
        first.startService()
        pid = os.getpid()
        second = self.service(cmdlines={pid: "python3 twistd -n joblet-persist --config /a.yml"})
        e = self.assertRaises(StartRefused, second.startService)
        self.assertEqual(
            str(e),
            f"data directory {self.data_dir} is in use by pid {pid} (python3 twistd -n "
            "joblet-persist --config /a.yml); only one joblet-persist may use a data directory",
        )
        self.assertFalse(second.running or second.locked)
        second.stopService()
        self.assertRaises(StartRefused, self.service().startService)

    def test_same_directory_through_a_symlink_is_the_same_lock(self):
        """A second service given another path to the same directory (a symlink) is refused."""
        self.service().startService()
        link = os.path.join(self.dir, "link")
        os.symlink(self.data_dir, link)
        e = self.assertRaises(StartRefused, self.service(data_dir=link).startService)
        self.assertIn(f"data directory {link} is in use by pid {os.getpid()}", str(e))

    def test_holder_unknown(self):
        """When /proc/locks does not name the holder, the refusal says so instead of naming
        a wrong process."""
        self.service().startService()
        second = DataDirLockService(self.data_dir, read_locks=lambda: "")
        e = self.assertRaises(StartRefused, second.startService)
        self.assertIn("in use by another process (/proc/locks does not say which)", str(e))

    def test_stop_releases_the_lock(self):
        """After stop, another service can take the lock."""
        first = self.service()
        first.startService()
        first.stopService()
        self.assertFalse(first.locked)
        second = self.service()
        second.startService()
        self.assertTrue(second.locked)

    def test_data_dir_that_is_a_file_refused(self):
        """A data directory path that is a regular file is refused with a message naming it."""
        with open(self.data_dir, "w") as f:
            f.write("not a directory")
        e = self.assertRaises(StartRefused, self.service().startService)
        self.assertIn(f"cannot lock the data directory {self.data_dir}", str(e))

    def test_flock_holders_parses_proc_locks(self):
        """flock_holders matches device (hex major:minor) and inode, skips waiters, POSIX
        locks and other files."""
        dev = os.makedev(254, 0)
        text = (
            "1: POSIX  ADVISORY  WRITE 11 fe:00:77 0 EOF\n"
            "2: FLOCK  ADVISORY  WRITE 22 fe:00:77 0 EOF\n"
            "2: -> FLOCK  ADVISORY  WRITE 33 fe:00:77 0 EOF\n"
            "3: FLOCK  ADVISORY  WRITE 44 fe:00:78 0 EOF\n"
            "4: FLOCK  ADVISORY  WRITE 55 fe:01:77 0 EOF\n"
        )
        self.assertEqual(flock_holders(text, dev, 77), [22])


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

    def test_busy_live_socket_refused_without_waiting(self):
        """A live listener whose backlog is full (every pending slot taken) is still seen
        as live, at once: the probe is a non-blocking connect, so it neither waits on the
        listener (which would block the reactor) nor takes a wait that ran out for a
        stale socket and deletes the live one."""
        import errno

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(0)
        self.addCleanup(s.close)
        while True:  # fill the backlog: the next connect would wait
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            self.addCleanup(c.close)
            if c.connect_ex(self.path) == errno.EAGAIN:
                break
        self.assertTrue(unix_socket_is_live(self.path))
        e = self.assertRaises(OSError, replace_stale_unix_socket, self.path)
        self.assertEqual(e.errno, errno.EADDRINUSE)
        self.assertTrue(os.path.exists(self.path))

    def test_liveness_of_stale_and_missing(self):
        """unix_socket_is_live: False for a socket nobody listens on and for no file."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.close()
        self.assertFalse(unix_socket_is_live(self.path))
        os.unlink(self.path)
        self.assertFalse(unix_socket_is_live(self.path))

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


class ThreadPoolSwitchIntervalTests(SynchronousTestCase):
    """ThreadPoolService sets the interpreter's switch interval while it runs (the cpu-pool:
    writer.switchInterval) and restores the one it found at stop."""

    def setUp(self):
        before = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, before)
        sys.setswitchinterval(0.004)

    def test_set_while_running_and_restored(self):
        pool = ThreadPoolService(MemoryReactorClock(), "cpu-pool", 1, switch_interval=0.001)
        pool.startService()
        self.assertAlmostEqual(sys.getswitchinterval(), 0.001)
        pool.stopService()
        self.assertAlmostEqual(sys.getswitchinterval(), 0.004)

    def test_left_alone_without_one(self):
        pool = ThreadPoolService(MemoryReactorClock(), "query-pool", 1)
        pool.startService()
        self.assertAlmostEqual(sys.getswitchinterval(), 0.004)
        pool.stopService()
        self.assertAlmostEqual(sys.getswitchinterval(), 0.004)
