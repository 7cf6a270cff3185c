"""Tests for joblet_persist.reload: what SIGHUP applies, refuses and reports."""

from __future__ import annotations

import os
import signal

from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.config import default_config, load_config
from joblet_persist.logs import Logger
from joblet_persist.reload import (
    Reloader,
    ReloadResult,
    SighupService,
    changed_keys,
    install_sighup,
)
from joblet_persist.retention import RetentionPolicy

BASE = """
storage:
  retention:
    logMaxAge: 30d
    minFreeBytes: 100MiB
logging:
  level: info
"""

DATA_DIR = "/srv/jp"


class _Harness:
    """A config file, a Reloader over it, and a record of everything applied and logged."""

    def __init__(self, testcase: SynchronousTestCase, text: str = BASE, **kwargs):
        self.path = testcase.mktemp()
        self.write(text)
        self.calls: list = []
        self.events: list = []
        self.log = Logger(namespace="test.reload", observer=self._logged)
        self.reloader = Reloader(
            self.path,
            DATA_DIR,
            lambda policy: self.calls.append(("retention", policy)),
            lambda level: self.calls.append(("level", level)),
            current=load_config(self.path, data_dir=DATA_DIR),
            log=self.log,
            **kwargs,
        )
        self.testcase = testcase

    def _logged(self, event):
        self.events.append(event)
        self.calls.append(("log", event["log_level"], formatEvent(event)))

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def reload(self) -> ReloadResult:
        return self.testcase.successResultOf(self.reloader.reload())

    def texts(self, level=None) -> list[str]:
        return [
            formatEvent(e) for e in self.events if level is None or e["log_level"] == level
        ]


class ReloaderTests(SynchronousTestCase):
    def test_applies_retention_and_level(self):
        """Changed retention keys become a new RetentionPolicy and a changed level a LogLevel;
        both are applied, named in the log with old and new values, and become current."""
        h = _Harness(self)
        h.write(BASE.replace("30d", "7d").replace("level: info", "level: debug"))
        result = h.reload()
        self.assertEqual(
            result, ReloadResult(("storage.retention.logMaxAge", "logging.level"), ())
        )
        applied = [c for c in h.calls if c[0] != "log"]
        self.assertEqual(
            applied,
            [
                ("retention", RetentionPolicy.from_config(h.reloader.current.storage.retention)),
                ("level", LogLevel.debug),
            ],
        )
        self.assertEqual(applied[0][1].log_max_age, 7 * 86400.0)
        self.assertEqual(applied[0][1].min_free_bytes, 100 * 1024 * 1024)
        self.assertEqual(h.reloader.current.storage.retention.log_max_age, 7 * 86400.0)
        self.assertEqual(h.reloader.current.logging.level, "debug")
        [summary] = h.texts(LogLevel.info)
        self.assertIn("storage.retention.logMaxAge 2592000.0 -> 604800.0", summary)
        self.assertIn("logging.level 'info' -> 'debug'", summary)
        self.assertEqual(h.texts(LogLevel.warn), [])

    def test_broken_config_keeps_the_old_settings(self):
        """A file that does not load is refused whole: nothing is applied, the ConfigError
        (naming file and key) is logged as an error, and a later good file still applies."""
        h = _Harness(self)
        before = h.reloader.current
        h.write(BASE.replace("30d", "7d") + "  bogusKey: 1\n")
        result = h.reload()
        self.assertIsNotNone(result.error)
        self.assertIn("logging.bogusKey", result.error)
        self.assertEqual([c for c in h.calls if c[0] != "log"], [])
        self.assertIs(h.reloader.current, before)
        [error] = h.texts(LogLevel.error)
        self.assertIn("running settings are kept", error)
        self.assertIn(h.path, error)
        self.assertIn("logging.bogusKey", error)

        h.write("storage: [not, a, mapping")
        self.assertIn("invalid YAML", h.reload().error)
        os.unlink(h.path)
        self.assertIn("cannot read", h.reload().error)
        self.assertEqual([c for c in h.calls if c[0] != "log"], [])

        h.write(BASE.replace("30d", "7d"))
        self.assertEqual(h.reload().applied, ("storage.retention.logMaxAge",))

    def test_keys_needing_a_restart_are_warned_by_name(self):
        """Every changed key outside retention and the level is named in a warning, not
        applied, and named again by the next reload since it is still not in effect."""
        h = _Harness(self)
        h.write(
            BASE.replace("retention:\n", "retention:\n    interval: 1m\n")
            + "writer:\n  flushInterval: 2s\n"
            + "ipc:\n  maxConnections: 10\n"
            + "server:\n  grpcWorkers: 8\n"
        )
        result = h.reload()
        expected = (
            "server.grpcWorkers",
            "ipc.maxConnections",
            "storage.retention.interval",
            "writer.flushInterval",
        )
        self.assertEqual(result, ReloadResult((), expected))
        self.assertEqual([c for c in h.calls if c[0] != "log"], [])
        [warning] = h.texts(LogLevel.warn)
        for key in expected:
            self.assertIn(key, warning)
        self.assertEqual(h.events[-1]["not_applied"], list(expected))
        self.assertEqual(h.reloader.current.writer.flush_interval, 1.0)

        self.assertEqual(h.reload().not_applied, expected)

    def test_secret_values_are_not_logged(self):
        """A changed TLS key is named, but its value appears nowhere in the log."""
        h = _Harness(self)
        pem = "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n-----END PRIVATE KEY-----\\n"
        h.write(
            BASE
            + "security:\n  requireClientCert: false\n  serverCert: /etc/c.pem\n"
            + f'  serverKey: "{pem}"\n'
        )
        result = h.reload()
        self.assertIn("security.serverKey", result.not_applied)
        self.assertFalse(any("c2VjcmV0" in text for text in h.texts()))

    def test_interval_is_applied_when_the_root_can(self):
        """With apply_interval, storage.retention.interval is applied like the policy."""
        intervals: list = []
        h = _Harness(self, apply_interval=intervals.append)
        h.write(BASE.replace("retention:\n", "retention:\n    interval: 1m\n"))
        result = h.reload()
        self.assertEqual(result, ReloadResult(("storage.retention.interval",), ()))
        self.assertEqual(intervals, [60.0])
        self.assertEqual(h.reloader.current.storage.retention.interval, 60.0)
        self.assertEqual([c for c in h.calls if c[0] == "retention"], [])

    def test_failing_apply_keeps_that_setting_and_applies_the_rest(self):
        """When applying the policy raises, it is logged, those keys stay old (and are
        reported not applied), the level is still applied and reload does not fail."""
        h = _Harness(self)

        def broken(policy):
            raise RuntimeError("cannot")

        h.reloader._apply_retention = broken
        h.write(BASE.replace("30d", "7d").replace("level: info", "level: warn"))
        result = h.reload()
        self.assertEqual(
            result, ReloadResult(("logging.level",), ("storage.retention.logMaxAge",))
        )
        self.assertEqual(h.reloader.current.storage.retention.log_max_age, 30 * 86400.0)
        [critical] = [e for e in h.events if e["log_level"] == LogLevel.critical]
        self.assertIsInstance(critical["log_failure"].value, RuntimeError)
        self.assertEqual(h.reload().applied, ())  # the policy is retried, fails again
        self.assertEqual(h.reload().not_applied, ("storage.retention.logMaxAge",))

    def test_summary_is_logged_while_the_more_verbose_level_is_in_effect(self):
        """Raising the level logs the summary and the restart warning before the level
        changes; lowering it logs them after, so they are visible either way."""
        h = _Harness(self)
        restart = "writer:\n  flushInterval: 2s\n"
        h.write(BASE.replace("level: info", "level: error") + restart)
        h.reload()
        self.assertEqual(
            [c[:2] for c in h.calls],
            [("log", LogLevel.info), ("log", LogLevel.warn), ("level", LogLevel.error)],
        )
        h.calls.clear()
        h.write(BASE.replace("level: info", "level: debug") + restart)
        h.reload()
        self.assertEqual(
            [c[:2] for c in h.calls],
            [("level", LogLevel.debug), ("log", LogLevel.info), ("log", LogLevel.warn)],
        )

    def test_data_dir_paths_are_not_changes(self):
        """Reloading with the --data-dir the service started with finds no change, and an
        unchanged file is reported as such."""
        h = _Harness(self)
        self.assertEqual(h.reload(), ReloadResult())
        self.assertEqual(h.texts(), [f"reload: {h.path}: no changes"])
        self.assertEqual(h.calls[0][0], "log")
        self.assertEqual(len(h.calls), 1)

    def test_without_a_config_file_nothing_is_reloaded(self):
        """A service started without --config has nothing to re-read."""
        events: list = []
        reloader = Reloader(
            None,
            None,
            self.fail,
            self.fail,
            current=default_config(),
            log=Logger(observer=events.append),
        )
        self.assertEqual(self.successResultOf(reloader.reload()), ReloadResult())
        self.assertIn("without --config", formatEvent(events[0]))

    def test_file_is_read_in_the_thread_runner_and_reloads_queue(self):
        """The file is loaded through run_in_thread; a second reload waits for the first and
        then sees its result as current."""
        pending: list = []

        def manual(f, *args, **kwargs):
            d = defer.Deferred()
            pending.append((d, f, args, kwargs))
            return d

        h = _Harness(self, run_in_thread=manual)
        h.write(BASE.replace("30d", "7d"))
        first = h.reloader.reload()
        second = h.reloader.reload()
        self.assertEqual(len(pending), 1)
        self.assertNoResult(first)
        d, f, args, kwargs = pending.pop()
        self.assertEqual((f, args, kwargs), (load_config, (h.path,), {"data_dir": DATA_DIR}))
        d.callback(f(*args, **kwargs))
        self.assertEqual(self.successResultOf(first).applied, ("storage.retention.logMaxAge",))
        self.assertNoResult(second)
        d, f, args, kwargs = pending.pop()
        d.callback(f(*args, **kwargs))
        self.assertEqual(self.successResultOf(second), ReloadResult())

    def test_unexpected_error_is_logged_and_keeps_the_settings(self):
        """An error that is not a ConfigError (e.g. the thread pool is already stopped) is
        logged with its traceback and the reload fires with it; nothing is applied."""
        h = _Harness(self, run_in_thread=lambda f, *a, **kw: defer.fail(RuntimeError("no pool")))
        before = h.reloader.current
        h.write(BASE.replace("30d", "7d"))
        result = h.reload()
        self.assertIn("no pool", result.error)
        self.assertIs(h.reloader.current, before)
        [event] = h.events
        self.assertIsInstance(event["log_failure"].value, RuntimeError)

    def test_changed_keys_uses_yaml_names(self):
        """changed_keys names keys as they are written in YAML, dotted, in file order."""
        old = default_config()
        new = load_config(self._write("ipc:\n  socketMode: '0660'\nlogging:\n  format: json\n"))
        self.assertEqual(changed_keys(old, new), ["ipc.socketMode", "logging.format"])
        self.assertEqual(changed_keys(old, old), [])

    def _write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path


class _FakeReactor:
    def __init__(self):
        self.queued: list = []

    def callFromThread(self, f, *args, **kwargs):
        self.queued.append((f, args, kwargs))

    def run_queued(self):
        queued, self.queued = self.queued, []
        for f, args, kwargs in queued:
            f(*args, **kwargs)


class SighupTests(SynchronousTestCase):
    def setUp(self):
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(
            signal.signal, signal.SIGHUP, original if original is not None else signal.SIG_DFL
        )
        self.previous_calls: list = []
        signal.signal(signal.SIGHUP, self._previous)
        self.reactor = _FakeReactor()
        self.events: list = []
        self.log = Logger(observer=self.events.append)

    def _previous(self, signum, frame):
        self.previous_calls.append(signum)

    def deliver(self):
        handler = signal.getsignal(signal.SIGHUP)
        handler(signal.SIGHUP, None)

    def test_handler_defers_reload_to_the_reactor_and_uninstall_restores(self):
        """The installed handler only queues the reload with callFromThread; the reload runs
        when the reactor runs the call; uninstall puts the previous handler back."""
        reloads: list = []
        uninstall = install_sighup(self.reactor, lambda: reloads.append(1), log=self.log)
        self.assertIsNot(signal.getsignal(signal.SIGHUP), self._previous)
        self.deliver()
        self.deliver()
        self.assertEqual(reloads, [])
        self.assertEqual(len(self.reactor.queued), 2)
        self.reactor.run_queued()
        self.assertEqual(reloads, [1, 1])
        self.assertEqual(self.previous_calls, [])
        uninstall()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self._previous)
        uninstall()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self._previous)

    def test_failing_reload_is_logged_not_raised(self):
        """An exception or a failed Deferred from reload is logged; the handler survives."""
        calls: list = []

        def reload():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("sync")
            return defer.fail(RuntimeError("async"))

        uninstall = install_sighup(self.reactor, reload, log=self.log)
        self.addCleanup(uninstall)
        self.deliver()
        self.deliver()
        self.reactor.run_queued()
        self.assertEqual(
            [str(e["log_failure"].value) for e in self.events], ["sync", "async"]
        )

    def test_uninstall_leaves_a_newer_handler_alone(self):
        """If someone replaced our handler, uninstall does not clobber theirs."""
        uninstall = install_sighup(self.reactor, lambda: None)

        def newer(signum, frame):
            pass

        signal.signal(signal.SIGHUP, newer)
        uninstall()
        self.assertIs(signal.getsignal(signal.SIGHUP), newer)

    def test_default_previous_handler_is_restored(self):
        """When SIGHUP had its default action, uninstall restores SIG_DFL."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        uninstall = install_sighup(self.reactor, lambda: None)
        uninstall()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    def test_service_installs_on_start_and_removes_on_stop(self):
        """SighupService holds the handler exactly while it is running."""
        reloads: list = []
        svc = SighupService(self.reactor, lambda: reloads.append(1))
        self.assertEqual(svc.name, "sighup")
        svc.startService()
        self.deliver()
        self.reactor.run_queued()
        self.assertEqual(reloads, [1])
        svc.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self._previous)
