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


class OperatorTests(unittest.TestCase):
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


