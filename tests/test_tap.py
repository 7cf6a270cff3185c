"""Tests for joblet_persist.tap: the twistd plugin, its options and the composition root.

Unit tests: a MemoryReactorClock stands in for the reactor, nothing is started, so no
socket, thread or gRPC server is ever created (that is what most of them prove).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading

from prometheus_client import CollectorRegistry
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import logs, tap
from joblet_persist.config import config_from_string
from tests.test_ingest import SocketTransport

#: Children of the root service in start order (stop order is the reverse).
EXPECTED_ORDER = [
    "lock",
    "cpu-pool",
    "storage",
    "writer",
    "unload",
    "health",
    "ingest",
    "query-pool",
    "retention",
    "grpc",
    "metrics-http",
    "health-http",
]


def _tempdir(testcase) -> str:
    path = tempfile.mkdtemp(prefix="jptap", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def _unix_only_config(directory: str, ipc: str = "", storage: str = "", rest: str = ""):
    """Sockets and data under ``directory``, gRPC on TCP at its default; ``ipc`` and
    ``storage`` add keys to those sections, ``rest`` more sections."""
    return config_from_string(
        f"""\
server:
  grpcSocket: {directory}/run/grpc.sock
ipc:
  socket: {directory}/run/ipc.sock
{ipc}storage:
  dataDir: {directory}/data
{storage}{rest}"""
    )


def _config(directory: str, extra: str = ""):
    return config_from_string(
        f"""\
server:
  grpcSocket: {directory}/run/grpc.sock
  grpcAddress: 127.0.0.1:0
  allowPlaintextTcp: true
ipc:
  socket: {directory}/run/ipc.sock
storage:
  dataDir: {directory}/data
monitoring:
  metricsPort: 0
  healthPort: 0
{extra}""",
        source=os.path.join(directory, "persist.yml"),
    )


class PluginTests(SynchronousTestCase):
    def test_plugin_discovered(self):
        """twistd's plugin scan finds exactly one ``joblet-persist`` service maker, and it
        points at joblet_persist.tap (whose Options and makeService twistd uses)."""
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "joblet-persist"]
        self.assertEqual(len(makers), 1)
        maker = makers[0]
        self.assertEqual(maker.module, "joblet_persist.tap")
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)


class OptionsTests(SynchronousTestCase):
    def setUp(self):
        self.dir = _tempdir(self)

    def _write(self, text: str, name: str = "persist.yml") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_config_file_is_loaded(self):
        """--config FILE loads that file: its values replace the defaults and the config
        remembers the file it came from."""
        path = self._write("writer:\n  flushInterval: 250ms\nlogging:\n  level: warn\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.config.writer.flush_interval, 0.25)
        self.assertEqual(options.config.logging.level, "warn")
        self.assertEqual(options.config.source, path)

    def test_no_config_gives_defaults(self):
        """Without options the configuration is the documented default."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options.config.storage.data_dir, "/opt/joblet")
        self.assertEqual(options.config.monitoring.metrics_port, 9092)

    def test_data_dir_moves_data_and_sockets(self):
        """--data-dir DIR overrides storage.dataDir (also one set in the file) and puts the
        socket paths the file does not set under DIR/run/."""
        path = self._write("storage:\n  dataDir: /somewhere/else\n")
        data = os.path.join(self.dir, "d")
        options = tap.Options()
        options.parseOptions(["--config", path, "--data-dir", data])
        cfg = options.config
        self.assertEqual(cfg.storage.data_dir, data)
        self.assertEqual(os.path.dirname(cfg.ipc.socket), os.path.join(data, "run"))
        self.assertEqual(os.path.dirname(cfg.server.grpc_socket), os.path.join(data, "run"))

    def test_short_options(self):
        """-c and -d are the short forms of --config and --data-dir."""
        path = self._write("")
        options = tap.Options()
        options.parseOptions(["-c", path, "-d", self.dir])
        self.assertEqual(options.config.storage.data_dir, self.dir)

    def test_unknown_key_is_usage_error_naming_key_and_file(self):
        """An unknown key makes option parsing fail with a UsageError (what twistd prints
        before exiting non-zero) that names the key and the file."""
        path = self._write("storage:\n  dataDirectory: /tmp/x\n")
        options = tap.Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn("storage.dataDirectory", str(e))
        self.assertIn(path, str(e))

    def test_wrong_type_is_usage_error_naming_key_and_file(self):
        """A value of the wrong type is a UsageError naming the key and the file."""
        path = self._write("writer:\n  flushInterval: soon\n")
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn("writer.flushInterval", str(e))
        self.assertIn(path, str(e))

    def test_missing_file_is_usage_error(self):
        """A config file that does not exist is a UsageError naming it."""
        path = os.path.join(self.dir, "nope.yml")
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn(path, str(e))


class BuildServiceTests(SynchronousTestCase):
    def setUp(self):
        self.dir = _tempdir(self)
        self.reactor = MemoryReactorClock()

    def build(self, extra: str = ""):
        return tap.build_service(
            _config(self.dir, extra), self.reactor, registry=CollectorRegistry()
        )

    def test_children_in_start_order(self):
        """The root holds the components in dependency order: the data directory lock first
        (released last), pool, storage, writer, health, ingest, retention, gRPC, then the
        monitoring listeners (stopped in reverse).  The order matches the one documented in
        tap.py."""
        root = self.build()
        self.assertEqual([child.name for child in root], EXPECTED_ORDER)
        parts = root.components
        self.assertIs(root.getServiceNamed("lock"), parts["lock"])
        self.assertEqual(parts["lock"].data_dir, parts["storage"].data_dir)
        self.assertIs(root.getServiceNamed("grpc"), parts["grpc"])
        self.assertIs(root.getServiceNamed("ingest"), parts["ingest"])
        self.assertIs(root.getServiceNamed("cpu-pool"), parts["pool"])
        self.assertEqual([w.name for w in parts["web"]], ["metrics-http", "health-http"])

    def test_components_exposed(self):
        """root.components names every part the tests and benchmarks reach for, wired to the
        configuration (sockets, data directory)."""
        root = self.build()
        parts = root.components
        self.assertEqual(
            set(parts),
            {"config", "lock", "metrics", "pool", "storage", "writer", "factory", "health", "ingest",
             "servicer", "retention", "grpc", "web", "archive", "cloudwatch"},
        )
        self.assertEqual(parts["ingest"].path, os.path.join(self.dir, "run", "ipc.sock"))
        self.assertEqual(parts["grpc"].unix_socket, os.path.join(self.dir, "run", "grpc.sock"))
        self.assertEqual(parts["storage"].data_dir, os.path.join(self.dir, "data"))

    def test_nothing_created_before_start(self):
        """build_service only builds objects: no listener on the reactor, no timer, no
        thread, no thread pool, no gRPC server, nothing on disk; no child is running."""
        threads_before = set(threading.enumerate())
        root = self.build()
        r = self.reactor
        self.assertEqual((r.tcpServers, r.unixServers, r.tcpClients, r.unixClients),
                         ([], [], [], []))
        self.assertEqual(r.getDelayedCalls(), [])
        self.assertEqual(set(threading.enumerate()), threads_before)
        parts = root.components
        self.assertIsNone(parts["pool"].pool)
        self.assertIsNone(parts["grpc"]._server)
        self.assertIsNone(parts["grpc"]._executor)
        self.assertIsNone(parts["grpc"].tcp_port)
        self.assertFalse(parts["ingest"].listening)
        self.assertEqual([w.port for w in parts["web"]], [None, None])
        self.assertFalse(root.running)
        self.assertFalse(any(child.running for child in root))
        self.assertFalse(root.started.called)
        self.assertEqual(sorted(os.listdir(self.dir)), [])

    def test_same_port_for_metrics_and_health(self):
        """When /metrics and /health share a (non-zero) port, one listener serves both."""
        cfg = config_from_string(
            f"""\
server:
  grpcSocket: {self.dir}/run/grpc.sock
  grpcAddress: ""
ipc:
  socket: {self.dir}/run/ipc.sock
storage:
  dataDir: {self.dir}/data
monitoring:
  metricsPort: 19092
  healthPort: 19092
"""
        )
        root = tap.build_service(cfg, self.reactor, registry=CollectorRegistry())
        self.assertEqual([child.name for child in root], EXPECTED_ORDER[:-1])

    def test_monitoring_disabled(self):
        """monitoring.enabled: false leaves the HTTP listeners out."""
        cfg = _unix_only_config(self.dir, rest="monitoring:\n  enabled: false\n")
        root = tap.build_service(cfg, self.reactor, registry=CollectorRegistry())
        self.assertEqual([child.name for child in root], EXPECTED_ORDER[:-2])
        self.assertEqual(root.components["web"], [])

    def test_drain_timeout_reaches_ingest_stop(self):
        """ipc.drainTimeout is how long the ingest service's stop drains the IPC
        connections: one whose peer never closes is closed, and the stop completes, exactly
        when it expires (MemoryReactorClock: no socket is created)."""
        cfg = _unix_only_config(self.dir, ipc="  drainTimeout: 7.5s\n")
        root = tap.build_service(cfg, self.reactor, registry=CollectorRegistry())
        ingest, factory = root.components["ingest"], root.components["factory"]
        ingest.startService()
        self.assertEqual([s[0] for s in self.reactor.unixServers], [cfg.ipc.socket])
        proto = factory.buildProtocol(None)
        transport = SocketTransport(self.reactor)
        transport.protocol = proto
        proto.makeConnection(transport)

        d = ingest.stopService()
        self.assertEqual(transport.socket.shutdowns, [socket.SHUT_RD])
        self.reactor.advance(7.5 - 2**-10)
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)
        self.reactor.advance(2**-10)
        self.assertEqual(transport.closed_at, 7.5)
        self.successResultOf(d)

    def test_registry_is_injected(self):
        """Metrics go to the given registry (never the global one)."""
        registry = CollectorRegistry()
        root = tap.build_service(_config(self.dir), self.reactor, registry=registry)
        self.assertIs(root.components["metrics"].registry, registry)
        self.assertIsNotNone(registry.get_sample_value("persist_backpressure_active"))


class BuilderTests(SynchronousTestCase):
    """The composition root in pieces: one builder per subsystem, no forward references."""

    def setUp(self):
        self.dir = _tempdir(self)
        self.reactor = MemoryReactorClock()

    def test_docstring_lists_the_real_start_order(self):
        """tap.py's docstring lists the root's children in the order build_service and
        makeService really give them (numbered list, one child per line)."""
        import re

        documented = []
        for line in tap.__doc__.splitlines():
            m = re.match(r"\s*\d+\. (.+?)\s{3,}", line)
            if m:
                documented += m.group(1).split(", ")
        self.assertEqual(documented, EXPECTED_ORDER + ["sighup", "sdnotify"])

    def test_builders_take_only_what_earlier_ones_built(self):
        """Each builder runs with the configuration and the parts of the builders before
        it, in the order build_service calls them; the writer's backpressure reaches the
        ingest factory only once build_ingest bound it."""
        from joblet_persist.metrics import PersistMetrics

        cfg = _config(self.dir)
        metrics = PersistMetrics(CollectorRegistry())
        st = tap.build_storage(cfg, self.reactor, metrics)
        self.assertEqual([st.lock.name, st.pool.name, st.service.name],
                         ["lock", "cpu-pool", "storage"])
        health = tap.build_health(cfg, self.reactor, st, metrics)
        wr = tap.build_writer(cfg, self.reactor, st, health, metrics)
        self.assertRaises(RuntimeError, wr.pause)
        ing = tap.build_ingest(cfg, self.reactor, st, wr, health, metrics)
        wr.pause()
        self.assertTrue(ing.factory.paused)
        wr.resume()
        self.assertFalse(ing.factory.paused)
        lc = tap.build_lifecycle(cfg, self.reactor, st, wr, health, metrics)
        q = tap.build_queries(cfg, self.reactor, st, wr, lc, metrics)
        web = tap.build_monitoring(cfg, self.reactor, health, metrics)
        self.assertEqual([lc.unloader.name, lc.health_service.name, q.pool.name,
                          lc.retention_timer.name, q.grpc.name] + [w.name for w in web],
                         EXPECTED_ORDER[4:6] +
                         EXPECTED_ORDER[7:])
        self.assertEqual(list(health._checks),
                         ["writer", "ingest", "ipc_connections", "ipc_partial_frames",
                          "ipc_events", "grpc"])

    def test_late_bound_calls_its_target_once_bound(self):
        """LateBound refuses a call before bind (naming itself) and a second bind, and
        passes arguments and the result through once bound."""
        late = tap.LateBound("writer pause")
        e = self.assertRaises(RuntimeError, late, 1)
        self.assertIn("writer pause", str(e))
        late.bind(lambda *a: ("called", a))
        self.assertEqual(late(1, 2), ("called", (1, 2)))
        self.assertRaises(RuntimeError, late.bind, print)


class MakeServiceTests(SynchronousTestCase):
    def setUp(self):
        self.dir = _tempdir(self)
        # makeService applies process-wide log settings: record them instead of changing
        # this process' logging, and restore the level and format it sets.
        self.bridged = []
        self.patch(logs, "bridge_stdlib_logging", lambda *a, **kw: self.bridged.append(a))
        level, fmt = logs.get_level(), logs.get_format()
        self.addCleanup(logs.configure, level, fmt)

    def test_make_service_adds_sighup_last_and_installs_nothing(self):
        """makeService is build_service plus a SIGHUP service and the systemd notifier,
        last; building it installs no signal handler (that happens in startService) and
        creates nothing."""
        path = os.path.join(self.dir, "persist.yml")
        with open(path, "w") as f:
            f.write(
                f"ipc:\n  socket: {self.dir}/i.sock\nserver:\n  grpcSocket: {self.dir}/g.sock\n"
                f"storage:\n  dataDir: {self.dir}/data\nlogging:\n  level: warn\n"
            )
        options = tap.Options()
        options.parseOptions(["--config", path])
        before = signal.getsignal(signal.SIGHUP)
        reactor = MemoryReactorClock()
        root = tap.makeService(options, reactor=reactor)
        self.assertEqual([child.name for child in root],
                         EXPECTED_ORDER + ["sighup", "sdnotify"])
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        self.assertEqual((reactor.tcpServers, reactor.unixServers), ([], []))
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertIsNone(root.components["grpc"]._server)
        self.assertEqual(self.bridged, [()])
        self.assertEqual(logs.get_level().name, "warn")


class DescriptorLimitTests(SynchronousTestCase):
    """ensure_descriptor_limit raises the soft RLIMIT_NOFILE to what the config may use."""

    def setUp(self):
        import resource

        self.resource = resource
        self.events = []
        self.calls = []
        from twisted.logger import Logger

        self.log = Logger(observer=self.events.append)
        # Defaults: 256 data files + 1024 IPC connections + the reserve.
        self.config = config_from_string("")
        self.needed = 256 + 1024 + tap.DESCRIPTOR_RESERVE

    def run_with(self, soft, hard, fail=None):
        def getrlimit(which):
            self.assertEqual(which, self.resource.RLIMIT_NOFILE)
            return soft, hard

        def setrlimit(which, limits):
            self.calls.append(limits)
            if fail is not None:
                raise fail

        return tap.ensure_descriptor_limit(self.config, self.log, getrlimit, setrlimit)

    def formats(self):
        return [e["log_format"] for e in self.events]

    def test_enough_already(self):
        self.assertEqual(self.run_with(20000, 20000), (self.needed, 20000))
        self.assertEqual(self.calls, [])
        self.assertEqual(self.events, [])

    def test_soft_limit_raised_to_what_is_needed(self):
        self.assertEqual(self.run_with(1024, 524288), (self.needed, self.needed))
        self.assertEqual(self.calls, [(self.needed, 524288)])
        self.assertIn("raised the open file limit", self.formats()[0])

    def test_hard_limit_too_low_warns_naming_the_keys(self):
        needed, soft = self.run_with(512, 1024)
        self.assertEqual(self.calls, [(1024, 1024)])
        self.assertEqual(soft, 1024)
        warning = self.events[-1]
        self.assertEqual(warning["log_level"].name, "warn")
        self.assertIn("storage.maxOpenFiles", warning["log_format"])
        self.assertIn("ipc.maxConnections", warning["log_format"])
        self.assertEqual(warning["needed"], self.needed)

    def test_refused_raise_warns(self):
        needed, soft = self.run_with(1024, 524288, fail=ValueError("not allowed"))
        self.assertEqual(soft, 1024)
        self.assertIn("could not raise", self.formats()[0])
        self.assertIn("below the", self.formats()[1])


class UnloadTimerTests(SynchronousTestCase):
    """The unload timer drops idle jobs every minute and survives a failure."""

    def test_timer_unloads_and_keeps_running_after_a_failure(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        reactor = MemoryReactorClock()
        root = tap.build_service(_config(directory), reactor, registry=CollectorRegistry())
        parts = root.components
        unload = [s for s in root if s.name == "unload"][0]
        self.assertEqual(unload.step, 60.0)
        calls = []

        def failing(idle):
            calls.append(idle)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return 0

        self.patch(parts["storage"], "unload_idle", failing)
        unload.startService()
        reactor.advance(60)
        reactor.advance(60)
        self.assertEqual(calls, [600.0, 600.0, 600.0])  # at start, then every minute
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        unload.stopService()

    def test_zero_disables_unloading(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        root = tap.build_service(
            _unix_only_config(directory, storage="  unloadIdleAfter: 0\n"),
            MemoryReactorClock(), registry=CollectorRegistry(),
        )
        self.assertNotIn("unload", [s.name for s in root])
