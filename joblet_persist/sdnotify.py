"""systemd readiness and watchdog notification (``Type=notify``, ``WatchdogSec=``).

The sd_notify protocol is one datagram per message to the Unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace), each a few
``KEY=VALUE`` lines (sd_notify(3)).  Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) everything here does nothing.

``NotifyService`` is the root's last child (tap.makeService): its ``startService`` runs once
every listener is up and sends ``READY=1``; its ``stopService`` runs first at shutdown and
sends ``STOPPING=1``.  When ``$WATCHDOG_USEC`` is set (and ``$WATCHDOG_PID``, if set, is this
process), a LoopingCall on the reactor sends ``WATCHDOG=1`` every half period: a reactor that
stops turning stops the petting, and systemd restarts the service.  The petting goes on
during shutdown (the final flush may take a while) until the reactor stops.

Reactor thread; sending a datagram to a local socket does not block.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping, Optional

from twisted.application import service
from twisted.internet.task import LoopingCall

from joblet_persist.logs import Logger

_log = Logger(namespace="joblet_persist.sdnotify")


def socket_address(environ: Mapping[str, str]) -> Optional[str]:
    """The notification socket's address (abstract names start with NUL), or None."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def send(address: str, message: str) -> None:
    """One sd_notify datagram; raises OSError when it cannot be sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode("utf-8"), address)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Seconds between WATCHDOG=1 messages (half of $WATCHDOG_USEC), or None when the
    watchdog is off or meant for another process ($WATCHDOG_PID)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (owner and owner != str(pid)):
        return None
    return usec / 2e6


class Notifier:
    """Sends sd_notify messages; a failure is logged once and never raised."""

    def __init__(self, environ: Mapping[str, str] = os.environ,
                 sender: Callable[[str, str], None] = send):
        self.address = socket_address(environ)
        self._send = sender
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            self._send(self.address, message)
        except OSError as e:
            if not self._failed:
                self._failed = True
                _log.warn("cannot notify systemd at {address}: {error}",
                          address=self.address.replace("\0", "@"), error=e)
            return False
        return True


class NotifyService(service.Service):
    """READY=1 when started (last child), STOPPING=1 when stopped (first), and the watchdog.

    ``status`` (called at start) gives the STATUS= text shown by ``systemctl status``.
    """

    name = "sdnotify"

    def __init__(self, reactor, *, environ: Mapping[str, str] = os.environ,
                 notifier: Optional[Notifier] = None, pid: Optional[int] = None,
                 status: Callable[[], str] = lambda: "serving"):
        self._reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier(environ)
        pid = os.getpid() if pid is None else pid
        self.watchdog_interval = (
            watchdog_interval(environ, pid) if self.notifier.enabled else None
        )
        self._status = status
        self._pet: Optional[LoopingCall] = None

    def startService(self):
        super().startService()
        self.notifier.notify(f"READY=1\nSTATUS={self._status()}\nMAINPID={os.getpid()}")
        if self.watchdog_interval is not None and self._pet is None:
            self._pet = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._pet.clock = self._reactor
            self._pet.start(self.watchdog_interval, now=True)
            # Keep petting while the other services stop; end with the reactor.
            self._reactor.addSystemEventTrigger("after", "shutdown", self.stop_watchdog)

    def stopService(self):
        super().stopService()
        self.notifier.notify("STOPPING=1\nSTATUS=stopping: flushing received data")

    def stop_watchdog(self) -> None:
        if self._pet is not None and self._pet.running:
            self._pet.stop()
        self._pet = None
