"""Tests for joblet_persist.services: ordered start/stop, listeners, stale sockets."""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.services import (
    CallbackService,
    OrderedMultiService,
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
