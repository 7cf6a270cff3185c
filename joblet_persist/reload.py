"""SIGHUP: re-read the configuration file and apply what can change without a restart.

What a reload applies: ``storage.retention.*`` (the retention policy; ``interval`` only when
the composition root gives a way to reschedule the retention timer) and ``logging.level``.
Every other changed key is named in a warning and takes effect at the next restart.  A file
that does not load (YAML error, unknown key, bad value) is refused as a whole: the
ConfigError is logged and the running settings stay.  A reload never stops the service.

``install_sighup`` puts a Python signal handler on SIGHUP that only schedules the reload on
the reactor (``callFromThread`` is safe in a signal handler; twistd's own SIGUSR1 log
rotation does the same), and restores the previous handler on uninstall.  ``SighupService``
does both in ``startService``/``stopService``.

Threading: ``Reloader.reload`` runs on the reactor thread; the file is read and parsed by the
injected ``run_in_thread`` (the service's pool) so that no file I/O happens on the reactor.
The signal handler runs on the main thread (the reactor's, under twistd) between bytecodes.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import LogLevel

from joblet_persist.logs import Logger
from joblet_persist.retention import RetentionPolicy

__all__ = [
    "LEVEL_KEY",
    "RETENTION_INTERVAL_KEY",
    "RETENTION_POLICY_KEYS",
    "ReloadResult",
    "Reloader",
    "SighupService",
    "changed_keys",
    "install_sighup",
]

#: The YAML keys of ``RetentionPolicy`` (applied with ``apply_retention``).
RETENTION_POLICY_KEYS = tuple(
    "storage.retention." + _name
    for _name in (
        "logMaxAge",
        "metricMaxAge",
        "eventMaxAge",
        "jobMaxBytes",
        "totalMaxBytes",
        "minFreeBytes",
        "activeWindow",
    )
)
#: Applied with ``apply_interval`` when one is given; otherwise it needs a restart.
RETENTION_INTERVAL_KEY = "storage.retention.interval"
#: Applied with ``apply_level``.
LEVEL_KEY = "logging.level"

_log = Logger()


# ---------------------------------------------------------------------------------------
# Comparing configurations.


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted YAML key -> value for every key of a Config (sections are nested dataclasses)."""
    out: dict[str, Any] = {}
    for item in dataclasses.fields(obj):
        if item.name == "source":
            continue
        value = getattr(obj, item.name)
        key = prefix + _camel(item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_leaves(value, key + "."))
        else:
            out[key] = value
    return out


def changed_keys(old: Any, new: Any) -> list[str]:
    """The dotted YAML keys whose values differ between two ``Config`` objects, in file order."""
    before, after = _leaves(old), _leaves(new)
    return [key for key in after if before.get(key) != after[key]]


# ---------------------------------------------------------------------------------------
# The reloader.


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did.

    ``applied``: changed keys now in effect.  ``not_applied``: changed keys that need a
    restart (or whose apply step raised).  ``error``: the ConfigError text when the file was
    refused (then nothing changed).
    """

    applied: tuple[str, ...] = ()
    not_applied: tuple[str, ...] = ()
    error: Optional[str] = None


def _synchronous(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


class Reloader:
    """Re-reads the configuration file and applies retention and the log level.  Reactor thread.

    ``config_path`` and ``data_dir`` are the ``--config`` and ``--data-dir`` the service was
    started with (``data_dir`` keeps the paths it implies from looking changed); ``current``
    is the configuration in effect.  ``apply_retention(RetentionPolicy)``,
    ``apply_level(LogLevel)`` and the optional ``apply_interval(seconds)`` make a change
    effective; each is called only when its keys changed.  ``run_in_thread(f, *args,
    **kwargs) -> Deferred`` reads the file (default: in the calling thread, for tests);
    ``load`` is ``joblet_persist.config.load_config`` (injectable for tests).

    ``current`` is updated to what is in effect after each reload, so a key that needs a
    restart is reported again by every reload until the restart.
    """

    def __init__(
        self,
        config_path: Optional[str],
        data_dir: Optional[str],
        apply_retention: Callable[[RetentionPolicy], None],
        apply_level: Callable[[LogLevel], None],
        *,
        current: Any,
        apply_interval: Optional[Callable[[float], None]] = None,
        run_in_thread: Callable[..., defer.Deferred] = _synchronous,
        load: Optional[Callable[..., Any]] = None,
        log: Optional[Logger] = None,
    ) -> None:
        if load is None:
            from joblet_persist.config import load_config as load
        self._path = config_path
        self._data_dir = data_dir
        self._apply_retention = apply_retention
        self._apply_level = apply_level
        self._apply_interval = apply_interval
        self._run = run_in_thread
        self._load = load
        self._log = log if log is not None else _log
        self.current = current
        self._lock = defer.DeferredLock()

    def reload(self) -> defer.Deferred:
        """Reload once; Deferred[ReloadResult], never failing.

        A reload requested while one is running waits for it, so two quick SIGHUPs apply
        the file twice in order rather than interleaved.
        """
        return self._lock.run(self._guarded)

    @defer.inlineCallbacks
    def _guarded(self):
        try:
            result = yield self._reload()
        except Exception as e:
            # Not a configuration problem (a stopped thread pool, a bug): log it and go on;
            # nothing was applied.
            self._log.failure("reload failed; the running settings are kept")
            result = ReloadResult(error=f"reload failed: {e!r}")
        return result

    @defer.inlineCallbacks
    def _reload(self):
        from joblet_persist.config import ConfigError

        if self._path is None:
            self._log.info(
                "reload: the service was started without --config; nothing to reload"
            )
            return ReloadResult()
        try:
            new = yield self._run(self._load, self._path, data_dir=self._data_dir)
        except ConfigError as e:
            self._log.error(
                "reload refused, the running settings are kept: {error}", error=str(e)
            )
            return ReloadResult(error=str(e))
        return self._apply(new)

    def _apply(self, new: Any) -> ReloadResult:
        old = self.current
        changed = changed_keys(old, new)
        if not changed:
            self._log.info("reload: {path}: no changes", path=self._path)
            return ReloadResult()
        before, after = _leaves(old), _leaves(new)
        applied: list[str] = []
        failed: list[str] = []
        effective = old

        policy_keys = [k for k in changed if k in RETENTION_POLICY_KEYS]
        if policy_keys:
            policy = RetentionPolicy.from_config(new.storage.retention)
            if self._call(self._apply_retention, policy, "retention policy"):
                applied += policy_keys
                effective = _replace_retention(effective, new, _policy_fields())
            else:
                failed += policy_keys

        if RETENTION_INTERVAL_KEY in changed and self._apply_interval is not None:
            if self._call(self._apply_interval, new.storage.retention.interval, "interval"):
                applied.append(RETENTION_INTERVAL_KEY)
                effective = _replace_retention(effective, new, ("interval",))
            else:
                failed.append(RETENTION_INTERVAL_KEY)

        level_changed = LEVEL_KEY in changed
        handled = set(applied) | set(failed) | ({LEVEL_KEY} if level_changed else set())
        restart = [k for k in changed if k not in handled]
        # The summary and the warning are logged while the more verbose of the two levels
        # is in effect, so that they are seen whichever way the level moves.
        stricter = level_changed and new.logging.log_level > old.logging.log_level
        if stricter:
            self._report(applied + [LEVEL_KEY], restart, before, after)
        if level_changed:
            if self._call(self._apply_level, new.logging.log_level, "log level"):
                applied.append(LEVEL_KEY)
                logging_cfg = dataclasses.replace(effective.logging, level=new.logging.level)
                effective = dataclasses.replace(effective, logging=logging_cfg)
            else:
                failed.append(LEVEL_KEY)
        if not stricter:
            self._report(applied, restart, before, after)
        self.current = effective
        return ReloadResult(tuple(applied), tuple(failed + restart))

    def _report(self, applied: list[str], restart: list[str], before: dict, after: dict) -> None:
        if applied:
            changes = "; ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in applied)
            self._log.info(
                "reload: applied {changes}",
                changes=changes,
                applied={k: after[k] for k in applied},
            )
        if restart:
            self._log.warn(
                "reload: changed keys not applied, they take effect after a restart: {keys}",
                keys=", ".join(restart),
                not_applied=restart,
            )

    def _call(self, apply: Callable[[Any], Any], value: Any, what: str) -> bool:
        try:
            apply(value)
        except Exception:
            self._log.failure("reload: applying the new {what} failed; the old one stays", what=what)
            return False
        return True


def _policy_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RetentionPolicy))


def _replace_retention(cfg: Any, new: Any, names: tuple[str, ...]) -> Any:
    """``cfg`` with the retention attributes ``names`` taken from ``new``."""
    values = {name: getattr(new.storage.retention, name) for name in names}
    retention = dataclasses.replace(cfg.storage.retention, **values)
    storage = dataclasses.replace(cfg.storage, retention=retention)
    return dataclasses.replace(cfg, storage=storage)


# ---------------------------------------------------------------------------------------
# The signal.


def install_sighup(
    reactor: Any, reload: Callable[[], Any], *, log: Optional[Logger] = None
) -> Callable[[], None]:
    """Call ``reload()`` on the reactor thread for every SIGHUP; returns ``uninstall``.

    Must be called on the main thread (Python delivers signals there).  The handler only
    does ``reactor.callFromThread``; ``reload`` runs later on the reactor, and an exception
    or failed Deferred from it is logged, never raised.  ``uninstall()`` puts the previous
    handler back (``SIG_DFL`` when it was not set from Python) if ours is still installed,
    and leaves a handler installed later by someone else alone; calling it twice is harmless.
    """
    log = log if log is not None else _log

    def run_reload() -> None:
        try:
            d = defer.maybeDeferred(reload)
        except Exception:  # maybeDeferred catches; this is only for a broken reactor hook
            log.failure("SIGHUP: reload failed")
            return
        d.addErrback(lambda f: log.failure("SIGHUP: reload failed", f))

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(run_reload)

    previous = signal.signal(signal.SIGHUP, handler)
    if previous is None:
        previous = signal.SIG_DFL
    installed = [True]

    def uninstall() -> None:
        if not installed[0]:
            return
        installed[0] = False
        if signal.getsignal(signal.SIGHUP) is handler:
            signal.signal(signal.SIGHUP, previous)

    return uninstall


class SighupService(service.Service):
    """Installs the SIGHUP handler in ``startService`` and removes it in ``stopService``.

    Reactor thread (twistd runs both on the main thread).
    """

    def __init__(self, reactor: Any, reload: Callable[[], Any], name: str = "sighup") -> None:
        self.setName(name)
        self._reactor = reactor
        self._reload = reload
        self._uninstall: Optional[Callable[[], None]] = None

    def startService(self) -> None:
        super().startService()
        self._uninstall = install_sighup(self._reactor, self._reload)

    def stopService(self) -> None:
        super().stopService()
        uninstall, self._uninstall = self._uninstall, None
        if uninstall is not None:
            uninstall()
