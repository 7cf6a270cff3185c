"""The service's own log: level filter, text or JSON output, rate limiting, startup line.

How twistd sets up logging, and where this module plugs in
------------------------------------------------------------

``twistd`` parses its options (ours included: ``Options.postOptions`` in tap.py), calls
``makeService``, then ``AppLogger.start`` chooses *one* observer and calls
``globalLogBeginner.beginLoggingTo([observer])``, which replays every event buffered so far
(including those logged in ``makeService``) and redirects ``sys.stdout``/``sys.stderr`` into
the log.  Only then does it call ``startService`` and run the reactor.  The observer is, in
order of precedence: the factory named by ``twistd --logger NAME`` (called with no
arguments), an ``ILogObserver`` component of a ``.tac`` application, or its own text
observer (``--syslog``, ``--logfile FILE``, or stdout under ``-n``).

Two settings come from the configuration:

* ``logging.level``: every ``joblet_persist.logs.Logger`` sends its events through one
  module-level filter in front of ``globalLogPublisher``; ``set_level`` changes it at any
  time (SIGHUP, see reload.py).  This works whichever observer twistd chose.
* ``logging.format``: the output format is a property of the observer, so it is the
  observer that has to change.  ``observer`` is a ``--logger`` factory that writes to stdout,
  as text (byte for byte twistd's own format) or as one JSON object per line, following
  ``set_format``; it also applies the level filter to Twisted's own events.
  ``select_twistd_logger`` (called from ``Options.postOptions``) selects it when twistd would
  have written text to stdout anyway (``-n`` without ``--logfile FILE`` or ``--syslog``), so
  ``logging.format: json`` needs no extra flag under systemd.  Replacing the observer
  instead of adding a second one is what keeps every line from appearing twice; the
  alternative, removing twistd's observer from ``globalLogPublisher`` in ``startService``,
  needs its private observer list.  With ``--logfile FILE``, ``--syslog`` or a daemonized
  twistd the log stays text and ``log_startup`` says so in a warning.

Threading: ``Logger`` may be used from any thread (as ``twisted.logger.Logger``);
``set_level``/``set_format`` are single attribute stores, read by the observers on whatever
thread emits.  Nothing here imports the reactor.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Callable, Mapping, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    PredicateResult,
    eventAsJSON,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.logger import Logger as _TwistedLogger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "FORMATS",
    "LevelPredicate",
    "Logger",
    "OBSERVER_NAME",
    "bridge_stdlib_logging",
    "configure",
    "event_as_json_line",
    "get_format",
    "get_level",
    "log_startup",
    "observer",
    "observer_installed",
    "output_observer",
    "select_twistd_logger",
    "set_format",
    "set_level",
    "startup_line",
]

#: Values of ``logging.format``.
FORMATS = ("text", "json")

#: The ``--logger`` value that selects ``observer``.
OBSERVER_NAME = "joblet_persist.logs.observer"


class LevelPredicate:
    """Passes events at or above ``level``; changeable at runtime.

    Unlike ``twisted.logger.LogLevelFilterPredicate`` it lets an event without
    ``log_level`` or ``log_namespace`` through (such an event is not ours to judge, and
    dropping it would hide it from every observer).  Any thread.
    """

    def __init__(self, level: LogLevel = LogLevel.info) -> None:
        self.level = level

    def __call__(self, event: Mapping[str, Any]) -> PredicateResult:
        level = event.get("log_level")
        if level is not None and level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


class _Settings:
    """Process-wide logging state; a single instance, ``_settings``."""

    def __init__(self) -> None:
        self.predicate = LevelPredicate(LogLevel.info)
        self.format = "text"
        self.observer_installed = False


_settings = _Settings()

#: Where every ``joblet_persist.logs.Logger`` sends its events by default.
_filtered_publisher = FilteringLogObserver(globalLogPublisher, [_settings.predicate])


def set_level(level: LogLevel) -> None:
    """Drop events below ``level`` from now on (our loggers, and all events with ``observer``)."""
    if level not in tuple(LogLevel.iterconstants()):
        raise ValueError(f"not a twisted.logger.LogLevel: {level!r}")
    _settings.predicate.level = level


def get_level() -> LogLevel:
    """The level set last (``info`` until ``set_level`` is called)."""
    return _settings.predicate.level


def set_format(fmt: str) -> None:
    """Make ``observer`` write ``"text"`` or ``"json"`` from the next event on."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _settings.format = fmt


def get_format() -> str:
    """The format set last (``"text"`` until ``set_format`` is called)."""
    return _settings.format


def configure(level: LogLevel, fmt: str) -> None:
    """Apply ``logging.level`` and ``logging.format``: ``config.logging.log_level, .format``.

    Call it in ``makeService`` (before twistd starts logging) so that even the buffered
    startup events are filtered and formatted as configured.
    """
    set_format(fmt)
    set_level(level)


class Logger(_TwistedLogger):
    """``twisted.logger.Logger`` whose events pass the ``logging.level`` filter.

    Use it exactly like Twisted's (module-level ``log = Logger()`` or a class attribute).
    Without an explicit ``observer`` events go through the module's level filter to
    ``globalLogPublisher``; an explicit ``observer`` (tests) receives every event unfiltered.
    """

    def __init__(
        self,
        namespace: Optional[str] = None,
        source: Optional[object] = None,
        observer: Optional[ILogObserver] = None,
    ) -> None:
        if namespace is None:
            # As Twisted does: the module of the code creating the logger.  Looked up here,
            # since from the base class' __init__ the caller would be this method.
            frame = inspect.currentframe()
            caller = frame.f_back if frame is not None else None
            namespace = caller.f_globals.get("__name__", "<unknown>") if caller else "<unknown>"
            del frame, caller
        if observer is None:
            observer = _filtered_publisher
        super().__init__(namespace, source, observer)


# ---------------------------------------------------------------------------------------
# Output: text (twistd's format) or one JSON object per line.


def _iso_utc(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


#: Event keys left out of JSON lines: objects that only serialize as
#: ``{"unpersistable": true}``, and the failure (replaced by a ``traceback`` string: its
#: JSON form holds a repr of every frame's locals).
_JSON_DROPPED = ("log_logger", "log_source", "log_failure", "log_observer")


def event_as_json_line(event: Mapping[str, Any]) -> str:
    """One log event as one line of JSON (no newline inside, ``\\n`` at the end).

    The object starts with ``time`` (ISO 8601, UTC), ``level`` (``debug`` ... ``critical``),
    ``namespace`` and ``text`` (the formatted message), then ``traceback`` when the event
    carries a failure, then the event's own fields as ``twisted.logger.eventAsJSON`` writes
    them (``log_format``, ``log_level``, ``log_namespace``, ``log_time``, and every keyword
    given to the log call; values that do not serialize read ``{"unpersistable": true}``),
    without ``log_flattened``, ``log_logger``, ``log_source`` and ``log_failure``.
    So the file is both easy to ship and readable back with
    ``twisted.logger.eventsFromJSONLogFile``.  A keyword named like one of the leading keys
    does not replace it.  Any thread.
    """
    level = event.get("log_level")
    head: dict[str, Any] = {
        "time": _iso_utc(event.get("log_time")),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "text": formatEvent(dict(event)),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        head["traceback"] = failure.getTraceback()
    body = {k: v for k, v in event.items() if k not in _JSON_DROPPED}
    try:
        fields = json.loads(eventAsJSON(body))
    except Exception as e:  # a field whose repr or str raises: keep the line, say why
        fields = {"log_json_error": repr(e)}
    # The formatted ``text`` stands for Twisted's copy of every field formatted for text.
    fields.pop("log_flattened", None)
    for key, value in fields.items():
        head.setdefault(key, value)
    line = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    # JSON leaves these unescaped, but many readers (Python's splitlines among them) break
    # lines at them; they can only occur inside strings, where the escapes mean the same.
    for char, escape in _LINE_BREAKS:
        line = line.replace(char, escape)
    return line + "\n"


_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


@implementer(ILogObserver)
class _FormatObserver:
    """Writes each event to ``out`` as text or JSON, as ``get_format()`` says at that moment."""

    def __init__(self, out: IO[str], get_format: Callable[[], str]) -> None:
        self._text = textFileLogObserver(out)
        self._json = FileLogObserver(out, event_as_json_line)
        self._get_format = get_format

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self._get_format() == "json":
            self._json(event)
        else:
            self._text(event)


def output_observer(
    out: IO[str],
    *,
    get_format: Callable[[], str] = get_format,
    predicate: Optional[LevelPredicate] = None,
) -> ILogObserver:
    """An observer writing events at or above the level to ``out`` in the current format.

    ``predicate`` defaults to the module's (``set_level``); ``get_format`` to ``get_format``.
    """
    predicate = predicate if predicate is not None else _settings.predicate
    return FilteringLogObserver(_FormatObserver(out, get_format), [predicate])


def observer() -> ILogObserver:
    """Log observer factory for ``twistd --logger joblet_persist.logs.observer``.

    Writes every event (ours and Twisted's) at or above ``logging.level`` to the process'
    stdout, in ``logging.format``.  twistd calls it after ``makeService`` and before it
    redirects ``sys.stdout`` into the log, so the real stdout is captured here.  Use it with
    ``-n``: a daemonized twistd has no stdout.
    """
    _settings.observer_installed = True
    return output_observer(sys.stdout)


def observer_installed() -> bool:
    """True once twistd has called ``observer`` in this process."""
    return _settings.observer_installed


def select_twistd_logger(options: Any) -> bool:
    """Make twistd use ``observer`` where it would have written text to stdout itself.

    ``options`` is our ``usage.Options`` inside ``twistd``; call this from its
    ``postOptions``, which runs before twistd's own ``postOptions`` resolves ``--logger``.
    Chooses ``observer`` only when twistd's default would be its text observer on stdout
    (``-n``, no ``--logfile FILE``, no ``--syslog``, no ``--logger``), so no explicit
    choice is overridden.  Returns whether it did.  Outside twistd (no parent) it does
    nothing.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return False
    try:
        chosen = parent["logger"]
    except KeyError:
        return False
    if chosen is not None or not _get(parent, "nodaemon") or _get(parent, "syslog"):
        return False
    if _get(parent, "logfile") not in (None, "", "-"):
        return False
    parent["logger"] = OBSERVER_NAME
    return True


def _get(options: Any, key: str) -> Any:
    try:
        return options[key]
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------
# Startup line.


def startup_line(config: Any, listeners: Mapping[str, str]) -> str:
    """One line stating the listeners and the effective configuration.

    ``config`` is a ``joblet_persist.config.Config``; its ``describe()`` already hides the
    TLS key.  ``listeners`` maps a name to where it listens, e.g.
    ``{"ipc": "unix:/opt/joblet/run/persist-ipc.sock", "metrics": "http://127.0.0.1:9092/"}``.
    """
    from joblet_persist import __version__

    where = ", ".join(f"{name} {address}" for name, address in listeners.items()) or "nothing"
    described = json.dumps(config.describe(), sort_keys=False, separators=(",", ":"))
    return f"joblet-persist {__version__} started; listening: {where}; configuration: {described}"


def log_startup(config: Any, listeners: Mapping[str, str], log: Optional[Logger] = None) -> str:
    """Log ``startup_line`` at info (with ``config`` and ``listeners`` as fields).

    Also warns when ``logging.format`` is ``json`` but twistd did not install ``observer``
    (``--logfile FILE``, ``--syslog``, daemon mode): then the log is text.  Reactor thread,
    once every service started.  Returns the line.
    """
    log = log if log is not None else _log
    line = startup_line(config, listeners)
    log.info("{startup}", startup=line, config=config.describe(), listeners=dict(listeners))
    if config.logging.format == "json" and not observer_installed():
        log.warn(
            "logging.format is json, but twistd writes this log with its own text observer; "
            "run twistd -n without --logfile/--syslog, or pass --logger {name}",
            name=OBSERVER_NAME,
        )
    return line


# ---------------------------------------------------------------------------------------
# Rate limiting.


_STDLIB_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


class _StdlibHandler(logging.Handler):
    """Forwards ``logging`` records into twisted.logger, namespace = record's logger name."""

    def __init__(self, observer: Optional[ILogObserver]) -> None:
        super().__init__(logging.DEBUG)
        self._observer = observer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next((lv for num, lv in _STDLIB_LEVELS if record.levelno >= num), None)
            level = level if level is not None else LogLevel.debug
            log = Logger(namespace=record.name, observer=self._observer)
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                _, value, tb = record.exc_info
                log.failure("{text}", Failure(value, type(value), tb), level, text=text)
            else:
                log.emit(level, "{text}", text=text)
        except Exception:
            self.handleError(record)


def bridge_stdlib_logging(
    name: str = "joblet_persist", observer: Optional[ILogObserver] = None
) -> Callable[[], None]:
    """Send records of the stdlib logger ``name`` (and its children) into twisted.logger.

    Some leaves (storage/jobindex.py) log with ``logging``; bridged, their records obey
    ``logging.level`` and ``logging.format`` like the rest.  The stdlib logger's level is set
    to DEBUG (our filter decides) and it stops propagating to the root logger, so nothing is
    printed twice.  Returns a function that undoes all of it.  Call at startup.
    """
    std = logging.getLogger(name)
    handler = _StdlibHandler(observer)
    old_level, old_propagate = std.level, std.propagate
    std.addHandler(handler)
    std.setLevel(logging.DEBUG)
    std.propagate = False

    def uninstall() -> None:
        std.removeHandler(handler)
        std.setLevel(old_level)
        std.propagate = old_propagate

    return uninstall


_log = Logger()
