"""The service's health verdict, shared by /health, Ping and the gRPC health service.

Reactor thread: HealthMonitor runs its disk probe on the pool on a timer and
applies the result on the reactor.  ``healthy`` is a plain attribute replaced
whole by the reactor, so gRPC threads may read it without a round trip.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional

from twisted.internet import defer, task

from joblet_persist.logs import Logger

_PROBE_NAME = ".health-probe"


def thd_probe_disk(data_dir: str) -> dict:
    """Check that data_dir is writable and how much space is free.  Pool thread.

    Writes, fsyncs and removes a small file; returns
    ``{"writable": bool, "error": str | None, "free_bytes": int | None}``.
    """
    result: dict = {"writable": False, "error": None, "free_bytes": None}
    try:
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, _PROBE_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
        result["writable"] = True
    except OSError as e:
        result["error"] = f"{data_dir}: {os.strerror(e.errno) if e.errno else e}"
        if e.errno == errno.ENOSPC:
            result["error"] = f"{data_dir}: no space left on device"
    try:
        st = os.statvfs(data_dir)
        result["free_bytes"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    return result


class HealthMonitor:
    """Combines the disk probe with live checks into one verdict.  Reactor thread.

    ``checks`` maps a name to a callable returning ``(ok: bool, detail: str)``, or
    ``(ok, detail, extra)`` whose ``extra`` dict adds fields to the check's entry in
    ``details``; evaluated whenever the verdict is refreshed (after each probe and on
    ``refresh()``).

    ``add_probe(make)`` adds blocking work to each probe round: ``make()`` (reactor)
    returns ``(thd_fn, apply)``; ``thd_fn()`` runs on the pool and ``apply(result)`` on the
    reactor, before the verdict is recomputed.  A failing probe is logged, never fatal.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        run_in_thread: Callable[..., defer.Deferred],
        data_dir: str,
        *,
        min_free_bytes: int = 0,
        interval: float = 5.0,
        probe: Callable[[str], dict] = thd_probe_disk,
    ):
        self._clock = clock
        self._run = run_in_thread
        self._data_dir = data_dir
        self._min_free = min_free_bytes
        self._interval = interval
        self._probe = probe
        self._checks: dict[str, Callable[[], tuple]] = {}
        self._probes: list[Callable[[], tuple]] = []
        self._disk: Optional[dict] = None
        self._loop: Optional[task.LoopingCall] = None
        self.healthy = False
        self.details: dict = {}

    def set_min_free_bytes(self, nbytes: int) -> None:
        """Change the free-space floor (SIGHUP reload); applied at the next refresh."""
        self._min_free = nbytes

    def add_check(self, name: str, check: Callable[[], tuple]) -> None:
        self._checks[name] = check

    def add_probe(self, make: Callable[[], tuple]) -> None:
        """Run ``make()``'s ``(thd_fn, apply)`` in every probe round (see the class)."""
        self._probes.append(make)

    def start(self) -> defer.Deferred:
        """Probe once now (the Deferred fires after it), then every interval."""
        self._loop = task.LoopingCall(self.probe_now)
        self._loop.clock = self._clock
        started = self._loop.start(self._interval, now=False)
        started.addErrback(lambda f: self.log.failure("health loop stopped", f))
        return self.probe_now()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.healthy = False

    def probe_now(self) -> defer.Deferred:
        d = self._run(self._probe, self._data_dir)

        def applied(result):
            self._disk = result

        def failed(f):
            self._disk = {"writable": False, "error": str(f.value), "free_bytes": None}

        d.addCallbacks(applied, failed)
        rounds = [d]
        for make in self._probes:
            try:
                thd_fn, apply = make()
                extra = self._run(thd_fn)
                extra.addCallback(apply)
            except Exception:
                extra = defer.fail()
            extra.addErrback(lambda f: self.log.failure("health probe failed", f))
            rounds.append(extra)
        done = defer.gatherResults(rounds, consumeErrors=True)
        done.addCallback(lambda _: self.refresh())
        return done

    def refresh(self) -> bool:
        """Recompute the verdict from the last probe and the live checks."""
        details: dict = {}
        ok_all = True
        disk = self._disk
        if disk is None:
            details["storage"] = {"ok": False, "detail": "not probed yet"}
            ok_all = False
        else:
            writable = disk["writable"]
            details["storage"] = {
                "ok": writable,
                "detail": "data directory writable" if writable else disk["error"],
            }
            ok_all &= writable
            free = disk["free_bytes"]
            if self._min_free and free is not None:
                enough = free >= self._min_free
                details["disk_space"] = {
                    "ok": enough,
                    "detail": f"{free} bytes free, floor {self._min_free}",
                }
                ok_all &= enough
        for name, check in self._checks.items():
            extra = None
            try:
                result = check()
                ok, detail = result[0], result[1]
                if len(result) > 2:
                    extra = result[2]
            except Exception as e:  # a broken check is a failed check, never a crash
                ok, detail = False, f"check failed: {e!r}"
            entry = {"ok": bool(ok), "detail": detail}
            if extra:
                entry.update((k, v) for k, v in extra.items() if k not in entry)
            details[name] = entry
            ok_all &= bool(ok)
        self.details = details
        self.healthy = ok_all
        return ok_all

    @property
    def free_bytes(self) -> Optional[int]:
        return None if self._disk is None else self._disk["free_bytes"]
