"""An operator's first steps against a real ``twistd -n joblet-persist``: the CLI finds it
without flags, /metrics passes promtool and negotiates its format, scrapes stay out of the
info log."""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import textwrap

import treq
from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from tests.integration.support import ROOT, TwistdProcess, free_port, short_tempdir, wait_for

_CTL = (
    "import os, sys; os.chdir(sys.argv[1]); from joblet_persist.cli import main; "
    "sys.exit(main(sys.argv[2:]))"
)


def run_ctl(cwd: str, *args: str) -> defer.Deferred:
    """``joblet-persist-ctl ARGS`` run in ``cwd`` with no locating environment; fires with
    (stdout, stderr, exit code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLET_PERSIST_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return utils.getProcessOutputAndValue(sys.executable, ["-c", _CTL, cwd, *args], env=env)


class _ServiceCase(unittest.TestCase):
    """A real twistd started as the README does (with free monitoring ports)."""

    timeout = 90

    def setUp(self):
        self.dir = short_tempdir(self)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.config = os.path.join(self.dir, "ports.yml")
        with open(self.config, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""\
                    monitoring:
                      metricsPort: {self.metrics_port}
                      healthPort: {self.health_port}
                    """
                )
            )

    async def start(self):
        """twistd as the README runs it (--data-dir DIR/data; the config only moves the
        monitoring ports off the defaults), waited for until /health answers 200."""
        proc = TwistdProcess(
            self, self.dir, ["--config", self.config, "--data-dir", os.path.join(self.dir, "data")]
        )

        async def healthy():
            try:
                r = await treq.get(f"http://127.0.0.1:{self.health_port}/health",
                                   persistent=False)
                await r.content()
                return r.code == 200
            except Exception:
                return False

        try:
            await wait_for(healthy, timeout=45, what="/health 200")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        self.addCleanup(self.stop, proc)
        return proc

    async def stop(self, proc):
        if not proc.proto.ended.called:
            proc.signal("TERM")
            await proc.wait_exit(20)

    async def get_metrics(self, **headers):
        # A plain Agent: treq would ask for gzip and decode it itself.
        from twisted.internet import protocol
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers

        r = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.metrics_port}/metrics".encode(),
            Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
        )
        done = defer.Deferred()

        class Body(protocol.Protocol):
            data = b""

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                done.callback(self.data)

        r.deliverBody(Body())
        return r, await done

class OperatorTests(_ServiceCase):
    async def test_cli_finds_the_service_without_flags(self):
        """From the directory where the service runs with --data-dir ./data (the README's
        setup), `joblet-persist-ctl ping` with no flag finds its socket; from elsewhere it
        fails with exit 5 naming every place it looked."""
        await self.start()
        out, err, code = await run_ctl(self.dir, "ping")
        self.assertEqual(code, 0, err)
        self.assertIn(b"healthy", out)
        elsewhere = short_tempdir(self)
        out, err, code = await run_ctl(elsewhere, "ping")
        self.assertEqual((code, out), (5, b""))
        self.assertIn(os.path.join(elsewhere, "data", "run", "persist-grpc.sock").encode(), err)
        self.assertIn(b"/opt/joblet/run/persist-grpc.sock", err)

    async def test_metrics_negotiation_and_quiet_scrapes(self):
        """/metrics answers the classic text format by default, OpenMetrics when asked, gzip
        when accepted; persist_build_info names the version; the labelled counters the
        alerts use exist at 0; scrapes and health checks are not logged at info level."""
        from joblet_persist import __version__

        proc = await self.start()
        r, body = await self.get_metrics()
        self.assertTrue(r.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        text = body.decode()
        self.assertIn("persist_build_info{python=", text)
        self.assertIn(f'version="{__version__}"', text)
        self.assertIn('persist_ipc_frames_rejected_total{reason="oversized"} 0.0', text)
        self.assertIn('persist_storage_errors_total{kind="segment_shrunk"} 0.0', text)
        self.assertIn('persist_query_members_total{result="corrupt"} 0.0', text)
        self.assertNotIn("persist_storage_bytes_total", text)

        r, body = await self.get_metrics(accept="application/openmetrics-text; version=1.0.0")
        self.assertTrue(
            r.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
        )
        self.assertTrue(body.endswith(b"# EOF\n"))

        r, body = await self.get_metrics(accept_encoding="gzip")
        self.assertEqual(r.headers.getRawHeaders("content-encoding"), ["gzip"])
        self.assertIn(b"persist_build_info", gzip.decompress(body))

        for _ in range(3):
            await self.get_metrics()
        await treq.get(f"http://127.0.0.1:{self.health_port}/health", persistent=False)
        proc.signal("TERM")
        await proc.wait_exit(20)
        self.assertNotIn("GET /metrics", proc.output)
        self.assertNotIn("GET /health", proc.output)

    async def test_promtool_check_metrics(self):
        """`promtool check metrics` (Prometheus's own linter) passes on the live /metrics."""
        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest(
                "promtool is not installed (Debian: apt-get install prometheus)"
            )
        await self.start()
        _, body = await self.get_metrics()
        result = defer.Deferred()

        from twisted.internet import protocol

        class Collect(protocol.ProcessProtocol):
            def __init__(self):
                self.output = bytearray()

            def connectionMade(self):
                self.transport.write(body)
                self.transport.closeStdin()

            def outReceived(self, data):
                self.output += data

            errReceived = outReceived

            def processEnded(self, reason):
                result.callback((reason.value.exitCode, bytes(self.output)))

        reactor.spawnProcess(Collect(), promtool, [promtool, "check", "metrics"],
                             env=dict(os.environ))
        code, output = await result
        self.assertEqual(code, 0, output.decode("utf-8", "replace"))




class CheckConfigTests(unittest.TestCase):
    """`twistd joblet-persist --check-config` and start-up failures, with a real twistd."""

    timeout = 60

    def setUp(self):
        self.dir = short_tempdir(self)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    async def run_twistd(self, *args):
        proc = TwistdProcess(self, self.dir, list(args))
        code = await proc.wait_exit(45)
        return code, proc.output

    async def test_check_config_prints_the_effective_configuration(self):
        """A valid file: exit 0 and the effective configuration as YAML, defaults filled
        in, nothing started (no socket, no data directory)."""
        import yaml

        path = self.write("ok.yml", "storage:\n  retention:\n    interval: 2m\n")
        data = os.path.join(self.dir, "data")
        code, out = await self.run_twistd("--check-config", "--config", path, "--data-dir", data)
        self.assertEqual(code, 0, out)
        document = yaml.safe_load(out)
        self.assertEqual(document["storage"]["retention"]["interval"], 120.0)
        self.assertEqual(document["storage"]["dataDir"], data)
        self.assertEqual(document["server"]["grpcSocket"],
                         os.path.join(data, "run", "persist-grpc.sock"))
        self.assertFalse(os.path.exists(data))

    async def test_check_config_error_names_file_line_and_key(self):
        """An invalid value: exit 1 and one line naming the file, the key's line and the
        key, no traceback."""
        path = self.write(
            "bad.yml",
            """\
            storage:
              retention:
                interval: 5m
                minFreeBytes: lots
            """,
        )
        code, out = await self.run_twistd("--check-config", "--config", path)
        self.assertEqual(code, 1, out)
        self.assertEqual(out.strip().count("\n"), 0, out)
        self.assertIn(f"{path}, line 4: storage.retention.minFreeBytes:", out)
        self.assertNotIn("Traceback", out)

    async def assert_one_line_failure(self, config_text, expected):
        path = self.write("c.yml", config_text)
        code, out = await self.run_twistd("--config", path, "--data-dir",
                                          os.path.join(self.dir, "data"))
        self.assertNotEqual(code, 0, out)
        self.assertNotIn("Traceback", out)
        failures = [line for line in out.splitlines() if "startup failed" in line]
        self.assertEqual(len(failures), 1, out)
        self.assertIn(expected, failures[0])
        # Every line is in the log format (a timestamp first): nothing from gRPC core.
        for line in out.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT", out)

    async def test_port_in_use_is_one_line(self):
        """A monitoring port in use ends start-up with one line naming the address."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            await self.assert_one_line_failure(
                f"monitoring:\n  metricsPort: {port}\n  healthPort: 0\n",
                f"metrics-http: cannot listen on 127.0.0.1:{port}: Address already in use",
            )

    async def test_grpc_port_in_use_is_one_line(self):
        """A gRPC TCP port in use: one line, and no line of gRPC core's own."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            await self.assert_one_line_failure(
                f"monitoring:\n  enabled: false\nserver:\n  grpcAddress: 127.0.0.1:{port}\n"
                "  allowPlaintextTcp: true\n",
                f"grpc: cannot listen on 127.0.0.1:{port}",
            )

    async def test_socket_path_not_creatable_is_one_line(self):
        """An IPC socket path whose directory cannot be made: one line naming the path."""
        blocker = self.write("file", "not a directory\n")
        await self.assert_one_line_failure(
            f"monitoring:\n  enabled: false\nipc:\n  socket: {blocker}/ipc.sock\n",
            blocker,
        )


class SystemdNotifyTests(unittest.TestCase):
    """A real twistd with a NOTIFY_SOCKET of the test's own: the sd_notify protocol."""

    timeout = 60

    async def test_ready_watchdog_stopping(self):
        """READY=1 arrives once the IPC and gRPC sockets and the monitoring port accept;
        WATCHDOG=1 follows every half WATCHDOG_USEC; SIGTERM sends STOPPING=1 before the
        process ends."""
        import socket

        from twisted.internet.protocol import DatagramProtocol

        d = short_tempdir(self)
        data = os.path.join(d, "data")
        health_port, metrics_port = free_port(), free_port()
        config = os.path.join(d, "c.yml")
        with open(config, "w") as f:
            f.write(f"monitoring:\n  metricsPort: {metrics_port}\n  healthPort: {health_port}\n")
        received = []

        def listening():
            """At the moment a message arrives: do the listeners accept connections?"""
            ok = []
            for family, address in ((socket.AF_UNIX, os.path.join(data, "run", "persist-ipc.sock")),
                                    (socket.AF_UNIX, os.path.join(data, "run", "persist-grpc.sock")),
                                    (socket.AF_INET, ("127.0.0.1", health_port))):
                with socket.socket(family) as s:
                    ok.append(s.connect_ex(address) == 0)
            return all(ok)

        class Collect(DatagramProtocol):
            def datagramReceived(self, datagram, addr):
                text = datagram.decode()
                received.append((text, listening() if text.startswith("READY=1") else None))

        port = reactor.listenUNIXDatagram(os.path.join(d, "notify"), Collect())
        self.addCleanup(port.stopListening)
        saved = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        os.environ["NOTIFY_SOCKET"] = os.path.join(d, "notify")
        os.environ["WATCHDOG_USEC"] = "400000"
        try:
            proc = TwistdProcess(self, d, ["--config", config, "--data-dir", data])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        def count(prefix):
            return sum(1 for text, _ in received if text.startswith(prefix))

        try:
            await wait_for(lambda: count("READY=1") and count("WATCHDOG=1") >= 3, timeout=30,
                           what="READY=1 and three WATCHDOG=1")
        except AssertionError:
            self.fail(f"no READY=1/WATCHDOG=1: {received}\n{proc.output}")
        (ready,) = [r for r in received if r[0].startswith("READY=1")]
        self.assertTrue(ready[1], "READY=1 before every listener accepted")
        self.assertIn("STATUS=serving", ready[0])
        proc.signal("TERM")
        await proc.wait_exit(20)
        await wait_for(lambda: count("STOPPING=1"), timeout=5, what="STOPPING=1")
        self.assertEqual(count("READY=1"), 1)


class StopOrderTests(_ServiceCase):
    """docs/operations.md's stop order is what the log of a real stop shows."""

    async def test_each_stop_step_is_logged_in_the_documented_order(self):
        """SIGTERM: one `stopped NAME` line per component, in the order docs/operations.md
        lists (leaving out the optional components this configuration does not have)."""
        import re

        proc = await self.start()
        proc.signal("TERM")
        await proc.wait_exit(20)
        logged = re.findall(r"\] stopped (\S+) in \d+\.\d+ s$", proc.output, re.M)
        with open(os.path.join(ROOT, "docs", "operations.md")) as f:
            doc = f.read()
        listed = doc[doc.index("in this order:\n`sdnotify`"):]
        listed = re.findall(r"`([a-z-]+)`", listed[: listed.index(".\n")])
        self.assertGreaterEqual(len(logged), 12, proc.output)
        self.assertEqual(logged, [name for name in listed if name in logged], proc.output)
        self.assertEqual(set(logged) - set(listed), set())
        self.assertIn("Server Shut Down.", proc.output[proc.output.rindex("stopped lock"):])


class UnwritableSocketTests(unittest.TestCase):
    """A socket directory the service's user cannot write, with a real twistd run as an
    unprivileged user (root would be allowed to write anywhere)."""

    timeout = 60

    async def test_socket_directory_not_writable_is_one_line(self):
        """The IPC socket's directory is read-only to the service's user: start-up ends in
        one line naming the path and the reason, no traceback, non-zero exit."""
        from tests.integration.support import _ChildProtocol

        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0 or setpriv is None:
            raise unittest.SkipTest("needs root and setpriv to run twistd as another user")
        d = short_tempdir(self)
        os.chmod(d, 0o777)
        readonly = os.path.join(d, "ro")
        os.mkdir(readonly, 0o555)
        config = os.path.join(d, "c.yml")
        with open(config, "w") as f:
            f.write(f"monitoring:\n  enabled: false\nipc:\n  socket: {readonly}/ipc.sock\n")
        os.chmod(config, 0o644)
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proto = _ChildProtocol()
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "--logfile=-", "joblet-persist", "--config", config,
                "--data-dir", os.path.join(d, "data")]
        transport = reactor.spawnProcess(proto, setpriv, argv, env=env)
        self.addCleanup(lambda: proto.ended.called or transport.signalProcess("KILL"))
        ended = await proto.ended
        out = proto.output.decode("utf-8", "replace")
        self.assertNotEqual(getattr(ended, "exitCode", None), 0, out)
        self.assertNotIn("Traceback", out)
        failures = [line for line in out.splitlines() if "startup failed" in line]
        self.assertEqual(len(failures), 1, out)
        self.assertIn(f"ingest: cannot listen on {readonly}/ipc.sock: Permission denied",
                      failures[0])
