"""sd_notify messages and the watchdog (sdnotify.py), with a Clock and real datagrams."""

from __future__ import annotations

import os
import socket

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import sdnotify


class _Reactor(task.Clock):
    """A Clock that records system event triggers."""

    def __init__(self):
        super().__init__()
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f))


class NotifyTests(SynchronousTestCase):
    def setUp(self):
        self.sent = []

    def service(self, environ, pid=42):
        notifier = sdnotify.Notifier(environ, sender=lambda a, m: self.sent.append((a, m)))
        return sdnotify.NotifyService(_Reactor(), environ=environ, notifier=notifier, pid=pid,
                                      status=lambda: "serving here")

    def test_ready_and_stopping(self):
        """Start sends READY=1 with a STATUS, stop sends STOPPING=1; '@' is abstract."""
        svc = self.service({"NOTIFY_SOCKET": "@jp/notify"})
        svc.startService()
        svc.stopService()
        self.assertEqual([a for a, _ in self.sent], ["\0jp/notify"] * 2)
        ready, stopping = (m.split("\n") for _, m in self.sent)
        self.assertEqual(ready[:2], ["READY=1", "STATUS=serving here"])
        self.assertEqual(stopping[0], "STOPPING=1")

    def test_no_socket_no_messages(self):
        """Without $NOTIFY_SOCKET (or with a malformed one) nothing is sent and no
        watchdog runs, whatever $WATCHDOG_USEC says."""
        for env in ({}, {"NOTIFY_SOCKET": "relative"}, {"WATCHDOG_USEC": "1000000"}):
            svc = self.service(env)
            svc.startService()
            svc.stopService()
            self.assertIsNone(svc.watchdog_interval)
        self.assertEqual(self.sent, [])

    def test_watchdog_pets_every_half_period_until_the_reactor_stops(self):
        """WATCHDOG_USEC=2 s: WATCHDOG=1 at start and every 1 s, also after STOPPING=1,
        until the reactor's after-shutdown trigger ends it."""
        svc = self.service({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "2000000"})
        clock = svc._reactor
        svc.startService()
        clock.advance(1)
        clock.advance(1)
        svc.stopService()
        clock.advance(1)
        messages = [m for _, m in self.sent]
        self.assertEqual(messages.count("WATCHDOG=1"), 4)
        self.assertTrue(messages[-2].startswith("STOPPING=1"))
        ((phase, event, stop),) = clock.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        stop()
        clock.advance(5)
        self.assertEqual([m for _, m in self.sent].count("WATCHDOG=1"), 4)

    def test_watchdog_for_another_pid_or_invalid_is_off(self):
        """$WATCHDOG_PID naming another process, or a bad $WATCHDOG_USEC: no watchdog."""
        for env in ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"},
                    {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"}):
            svc = self.service({"NOTIFY_SOCKET": "/run/n", **env}, pid=42)
            self.assertIsNone(svc.watchdog_interval, env)
        svc = self.service({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "300000",
                            "WATCHDOG_PID": "42"}, pid=42)
        self.assertEqual(svc.watchdog_interval, 0.15)

    def test_real_datagram_and_failure_logged_once(self):
        """send() delivers one datagram to a real socket (path and abstract); a socket
        that is gone makes notify() return False without raising."""
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="jn", dir="/tmp")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "n.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            self.assertTrue(sdnotify.Notifier({"NOTIFY_SOCKET": path}).notify("READY=1"))
            self.assertEqual(server.recv(100), b"READY=1")
        name = f"@jp-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind("\0" + name[1:])
            self.assertTrue(sdnotify.Notifier({"NOTIFY_SOCKET": name}).notify("WATCHDOG=1"))
            self.assertEqual(server.recv(100), b"WATCHDOG=1")
        os.unlink(path)
        gone = sdnotify.Notifier({"NOTIFY_SOCKET": path})
        self.assertFalse(gone.notify("READY=1"))
        self.assertFalse(gone.notify("READY=1"))
        self.flushLoggedErrors()
