"""Tests for joblet_persist.logs: level filter, text/JSON output, twistd wiring, rate limiting."""

from __future__ import annotations

import io
import json
import logging
import sys

from twisted.logger import (
    LogLevel,
    eventsFromJSONLogFile,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import logs
from joblet_persist.config import config_from_string


class _Component:
    log = logs.Logger()


def _event(level=LogLevel.info, fmt="hello {who}", namespace="joblet_persist.test", **kw):
    return dict(
        log_level=level, log_format=fmt, log_namespace=namespace, log_time=1700000000.25, **kw
    )


class _LogStateMixin:
    """Restores the process-wide level, format and observer flag after each test."""

    def setUp(self):
        self.addCleanup(logs.set_level, logs.get_level())
        self.addCleanup(logs.set_format, logs.get_format())
        self.patch(logs._settings, "observer_installed", False)

    def capture_global(self) -> list:
        """Events reaching globalLogPublisher from now until the end of the test."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class LoggerTests(_LogStateMixin, SynchronousTestCase):
    def test_namespace_is_the_calling_module(self):
        """Logger() names its namespace after the module that creates it, as Twisted's does,
        and a class attribute names the class: the subclass does not hide the caller."""
        self.assertEqual(logs.Logger().namespace, __name__)
        self.assertEqual(_Component.log.namespace, f"{__name__}._Component")
        self.assertIsInstance(_Component.log, logs.Logger)

    def test_level_filters_our_loggers_and_changes_at_runtime(self):
        """Events below the configured level never reach globalLogPublisher; set_level
        takes effect for the very next event, in both directions."""
        events = self.capture_global()
        log = logs.Logger(namespace="joblet_persist.test_level")
        logs.set_level(LogLevel.warn)
        log.info("quiet {n}", n=1)
        log.warn("loud {n}", n=2)
        logs.set_level(LogLevel.debug)
        log.debug("debug {n}", n=3)
        logs.set_level(LogLevel.error)
        log.warn("quiet again {n}", n=4)
        log.error("error {n}", n=5)
        ours = [e["n"] for e in events if e.get("log_namespace") == "joblet_persist.test_level"]
        self.assertEqual(ours, [2, 3, 5])

    def test_class_attribute_logger_is_filtered(self):
        """A logger reached through a class attribute keeps the filtering observer."""
        events = self.capture_global()
        logs.set_level(LogLevel.error)
        _Component().log.warn("dropped")
        _Component().log.error("kept")
        texts = [formatEvent(e) for e in events if e.get("log_namespace", "").endswith("_Component")]
        self.assertEqual(texts, ["kept"])

    def test_explicit_observer_is_not_filtered(self):
        """A Logger given its own observer (as tests do) receives every event."""
        events: list = []
        logs.set_level(LogLevel.error)
        logs.Logger(observer=events.append).debug("seen")
        self.assertEqual([formatEvent(e) for e in events], ["seen"])

    def test_set_level_and_format_refuse_bad_values(self):
        """set_level takes only LogLevel constants and set_format only text or json."""
        self.assertRaises(ValueError, logs.set_level, "info")
        self.assertRaises(ValueError, logs.set_format, "xml")
        logs.configure(LogLevel.debug, "json")
        self.assertEqual((logs.get_level(), logs.get_format()), (LogLevel.debug, "json"))

    def test_predicate_passes_events_without_a_level(self):
        """An event without log_level (or namespace) is not dropped by the level filter."""
        from twisted.logger import PredicateResult

        predicate = logs.LevelPredicate(LogLevel.error)
        self.assertEqual(predicate({"log_format": "x"}), PredicateResult.maybe)
        self.assertEqual(predicate({"log_level": LogLevel.info}), PredicateResult.no)
        self.assertEqual(predicate({"log_level": LogLevel.critical}), PredicateResult.maybe)


class OutputTests(_LogStateMixin, SynchronousTestCase):
    def test_json_is_one_parseable_object_per_line(self):
        """In json format every event is exactly one line holding one JSON object that
        starts with time, level, namespace and text, even when the message has newlines."""
        out = io.StringIO()
        observer = logs.output_observer(out, get_format=lambda: "json")
        observer(_event(who="world"))
        observer(_event(LogLevel.warn, "two\nlines {job}", job="j1"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(
            list(first)[:4], ["time", "level", "namespace", "text"]
        )
        self.assertEqual(first["time"], "2023-11-14T22:13:20.250000Z")
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "joblet_persist.test")
        self.assertEqual(first["text"], "hello world")
        self.assertEqual(first["who"], "world")
        self.assertNotIn("log_flattened", first)
        self.assertEqual((second["level"], second["text"], second["job"]), ("warn", "two\nlines j1", "j1"))

    def test_json_line_breaks_inside_strings_are_escaped(self):
        """Unicode line and paragraph separators in a message do not split the line for
        readers that break lines at them; the decoded text is unchanged."""
        text = "a\u2028b\u2029c\x85d \u00e9"
        line = logs.event_as_json_line(_event(fmt="{t}", t=text))
        self.assertEqual(len(line.splitlines()), 1)
        self.assertEqual(json.loads(line)["text"], text)
        self.assertIn("\u00e9", line)

    def test_json_failure_has_a_traceback(self):
        """A logged failure becomes a ``traceback`` string, not a dump of frames."""
        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()
        line = logs.event_as_json_line(_event(LogLevel.critical, "it broke", log_failure=failure))
        record = json.loads(line)
        self.assertIn("ValueError: boom", record["traceback"])
        self.assertNotIn("log_failure", record)
        self.assertEqual(record["level"], "critical")

    def test_json_reads_back_with_twisted(self):
        """Lines are readable with twisted.logger.eventsFromJSONLogFile, which restores the
        level and formats the same text."""
        out = io.StringIO()
        observer = logs.output_observer(out, get_format=lambda: "json")
        observer(_event(LogLevel.warn, "disk {state}", state="full"))
        events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
        self.assertEqual(len(events), 1)
        self.assertIs(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(formatEvent(events[0]), "disk full")

    def test_json_keeps_leading_keys_and_survives_odd_fields(self):
        """A keyword named like a leading key does not replace it, and a field that cannot be
        serialized still gives a valid line."""
        record = json.loads(
            logs.event_as_json_line(_event(fmt="x {text}", text="kw", obj=object()))
        )
        self.assertEqual(record["text"], "x kw")
        self.assertEqual(record["obj"], {"unpersistable": True})

    def test_text_is_twistds_format(self):
        """In text format the output is byte for byte what twistd's own observer writes."""
        ours, theirs = io.StringIO(), io.StringIO()
        logs.output_observer(ours, get_format=lambda: "text")(_event(who="there"))
        textFileLogObserver(theirs)(_event(who="there"))
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("hello there", ours.getvalue())

    def test_format_and_level_follow_the_settings(self):
        """The default observer switches format and level when the settings change."""
        out = io.StringIO()
        observer = logs.output_observer(out)
        logs.configure(LogLevel.info, "text")
        observer(_event(fmt="as text"))
        logs.set_format("json")
        observer(_event(fmt="as json"))
        logs.set_level(LogLevel.error)
        observer(_event(LogLevel.warn, "dropped"))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("as text", lines[0])
        self.assertFalse(lines[0].startswith("{"))
        self.assertEqual(json.loads(lines[1])["text"], "as json")

    def test_observer_factory_writes_to_stdout_and_filters_everything(self):
        """The --logger factory writes to the stdout present when twistd calls it, marks
        itself installed, and applies the level to events of every namespace."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertFalse(logs.observer_installed())
        logs.configure(LogLevel.warn, "json")
        observer = logs.observer()
        self.assertTrue(logs.observer_installed())
        observer(_event(LogLevel.info, "twisted noise", namespace="twisted.web"))
        observer(_event(LogLevel.error, "kept", namespace="twisted.web"))
        lines = stdout.getvalue().splitlines()
        self.assertEqual([json.loads(line)["text"] for line in lines], ["kept"])


class _Sub:
    """Stands for our usage.Options: only ``parent`` matters."""

    def __init__(self, parent):
        self.parent = parent


class SelectTwistdLoggerTests(_LogStateMixin, SynchronousTestCase):
    def parent(self, **values):
        options = ServerOptions()
        for key, value in values.items():
            options[key] = value
        return options

    def test_selected_for_nodaemon_stdout_and_resolved_by_twistd(self):
        """Under -n with no --logfile FILE/--syslog/--logger, our observer is selected as a
        dotted name, which twistd's own postOptions turns into the factory."""
        for logfile in (None, "-"):
            parent = self.parent(nodaemon=True, logfile=logfile)
            self.assertTrue(logs.select_twistd_logger(_Sub(parent)))
            parent.postOptions()
            self.assertIs(parent["logger"], logs.observer)

    def test_explicit_choices_are_kept(self):
        """A log file, syslog, an explicit --logger or daemon mode keep twistd's choice."""
        cases = [
            dict(nodaemon=True, logfile="/var/log/persist.log"),
            dict(nodaemon=True, syslog=True),
            dict(nodaemon=True, logger="some.other.factory"),
            dict(nodaemon=False),
        ]
        for values in cases:
            parent = self.parent(**values)
            before = parent["logger"]
            self.assertFalse(logs.select_twistd_logger(_Sub(parent)), values)
            self.assertEqual(parent["logger"], before)

    def test_outside_twistd_does_nothing(self):
        """Options parsed on their own (no parent) are left alone."""
        self.assertFalse(logs.select_twistd_logger(object()))


class StartupTests(_LogStateMixin, SynchronousTestCase):
    CONFIG = """
server:
  nodeId: node-7
security:
  serverCert: /etc/joblet/persist.crt
  serverKey: |
    -----BEGIN PRIVATE KEY-----
    c2VjcmV0LWtleS1ieXRlcw==
    -----END PRIVATE KEY-----
  requireClientCert: false
logging:
  format: json
"""

    def test_startup_line_states_listeners_and_config_without_secrets(self):
        """The startup line names every listener and the effective configuration, with the
        TLS key hidden."""
        config = config_from_string(self.CONFIG)
        line = logs.startup_line(
            config, {"ipc": "unix:/run/p.sock", "metrics": "http://127.0.0.1:9092/"}
        )
        self.assertIn("listening: ipc unix:/run/p.sock, metrics http://127.0.0.1:9092/", line)
        described = json.loads(line.split("configuration: ", 1)[1])
        self.assertEqual(described, config.describe())
        self.assertEqual(described["security"]["serverKey"], "<set>")
        self.assertNotIn("c2VjcmV0", line)
        self.assertNotIn("PRIVATE KEY", line)

    def test_log_startup_warns_when_json_cannot_be_honoured(self):
        """With format json but twistd's own observer, a warning says how to fix it; with
        our observer installed there is no warning."""
        config = config_from_string(self.CONFIG)
        events: list = []
        log = logs.Logger(observer=events.append)
        logs.log_startup(config, {"ipc": "unix:/x"}, log=log)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info, LogLevel.warn])
        self.assertIn(logs.OBSERVER_NAME, formatEvent(events[1]))
        self.assertEqual(events[0]["config"], config.describe())

        events.clear()
        logs._settings.observer_installed = True
        logs.log_startup(config, {"ipc": "unix:/x"}, log=log)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])


class StdlibBridgeTests(SynchronousTestCase):
    def test_records_become_events(self):
        """Records of the stdlib logger arrive as events with the mapped level and the
        logger's name as namespace; exceptions arrive as failures; uninstall undoes it."""
        events: list = []
        std = logging.getLogger("joblet_persist.test_bridge")
        parent = logging.getLogger("joblet_persist")
        before = (parent.level, parent.propagate, list(parent.handlers))
        uninstall = logs.bridge_stdlib_logging(observer=events.append)
        self.addCleanup(uninstall)
        std.warning("index %s is corrupt", "job_index.json")
        std.debug("detail")
        try:
            raise KeyError("x")
        except KeyError:
            std.exception("rebuild failed")
        self.assertEqual(
            [(e["log_level"], e["log_namespace"], formatEvent(e)) for e in events],
            [
                (LogLevel.warn, "joblet_persist.test_bridge", "index job_index.json is corrupt"),
                (LogLevel.debug, "joblet_persist.test_bridge", "detail"),
                (LogLevel.error, "joblet_persist.test_bridge", "rebuild failed"),
            ],
        )
        self.assertIsInstance(events[2]["log_failure"].value, KeyError)
        uninstall()
        self.assertEqual((parent.level, parent.propagate, list(parent.handlers)), before)
