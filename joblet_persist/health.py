"""The service's health verdict, shared by /health, Ping and the gRPC health service.

Reactor thread: HealthMonitor asks the storage backend's ``IFreeSpace`` probe
(which runs off the reactor) on a timer and applies the result on the reactor.
``healthy`` is a plain attribute replaced whole by the reactor, so gRPC threads
may read it without a round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from twisted.internet import defer, task

from joblet_persist.logs import Logger
from joblet_persist.storage.api import IFreeSpace
from joblet_persist.threads import reactor_only

#: The storage detail when the backend cannot be probed (it provides no IFreeSpace).
_NO_PROBE = {"writable": True, "error": None, "free_bytes": None,
             "detail": "storage backend offers no writability probe"}


class HealthMonitor:
    """Combines the storage probe with live checks into one verdict.  Reactor thread.

    ``space`` provides ``storage.api.IFreeSpace`` (the storage backend), or is
    None for a backend that cannot be probed: its storage check then passes.

    ``checks`` maps a name to a callable returning ``(ok: bool, detail: str)``, or
    ``(ok, detail, extra)`` whose ``extra`` dict adds fields to the check's entry in
    ``details``; evaluated whenever the verdict is refreshed (after each probe and on
    ``refresh()``).

    ``add_probe(make)`` adds blocking work to each probe round: ``make()`` (reactor)
    returns ``(thd_fn, apply)``; ``thd_fn()`` runs through ``run_in_thread`` (the
    service's pool) and ``apply(result)`` on the reactor, before the verdict is
    recomputed.  A failing probe is logged, never fatal.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        space,
        *,
        min_free_bytes: int = 0,
        interval: float = 5.0,
        run_in_thread: Optional[Callable[..., defer.Deferred]] = None,
    ):
        if space is not None and not IFreeSpace.providedBy(space):
            raise TypeError(f"{space!r} does not provide IFreeSpace")
        self._clock = clock
        self._space = space
        self._min_free = min_free_bytes
        self._interval = interval
        self._run = run_in_thread
        self._checks: dict[str, Callable[[], tuple]] = {}
        self._probes: list[Callable[[], tuple]] = []
        self._disk: Optional[dict] = None
        self._loop: Optional[task.LoopingCall] = None
        self.healthy = False
        self.details: dict = {}

    @reactor_only
    def set_min_free_bytes(self, nbytes: int) -> None:
        """Change the free-space floor (SIGHUP reload); applied at the next refresh."""
        self._min_free = nbytes

    @reactor_only
    def add_check(self, name: str, check: Callable[[], tuple]) -> None:
        self._checks[name] = check

    @reactor_only
    def add_probe(self, make: Callable[[], tuple]) -> None:
        """Run ``make()``'s ``(thd_fn, apply)`` in every probe round (see the class)."""
        if self._run is None:
            raise TypeError("add_probe needs a HealthMonitor built with run_in_thread")
        self._probes.append(make)

    @reactor_only
    def start(self) -> defer.Deferred:
        """Probe once now (the Deferred fires after it), then every interval."""
        self._loop = task.LoopingCall(self.probe_now)
        self._loop.clock = self._clock
        started = self._loop.start(self._interval, now=False)
        started.addErrback(lambda f: self.log.failure("health loop stopped", f))
        return self.probe_now()

    @reactor_only
    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.healthy = False

    @reactor_only
    def probe_now(self) -> defer.Deferred:
        if self._space is None:
            d = defer.succeed(None)
            d.addCallback(lambda _: self._set_disk(dict(_NO_PROBE)))
        else:
            d = defer.maybeDeferred(self._space.probe_space)
            d.addCallbacks(
                lambda probe: self._set_disk(dataclasses.asdict(probe)),
                lambda f: self._set_disk(
                    {"writable": False, "error": str(f.value), "free_bytes": None}
                ),
            )
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

    def _set_disk(self, disk: dict) -> None:
        self._disk = disk

    @reactor_only
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
                "detail": disk.get("detail", "data directory writable")
                if writable
                else disk["error"],
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
