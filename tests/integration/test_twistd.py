"""A real ``twistd -n joblet-persist`` process: start, health, Ping, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import textwrap
import time

import grpc
import treq
from twisted.internet import threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from tests.integration.support import (
    ROOT,
    TwistdProcess,
    _ChildProtocol,
    check_gzip_files,
    free_port,
    in_thread,
    log_frame,
    send_in_pieces,
    short_tempdir,
    wait_for,
    write_config,
    write_service_config,
)


def _ping(sock_path: str) -> persist_pb2.PingResponse:
    with grpc.insecure_channel(f"unix:{sock_path}") as channel:
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        return stub.Ping(persist_pb2.PingRequest(), timeout=2)


class TwistdSmokeTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = short_tempdir(self)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.config = write_config(
            self.dir, metrics_port=self.metrics_port, health_port=self.health_port
        )

    async def _health(self):
        try:
            response = await treq.get(f"http://127.0.0.1:{self.health_port}/health", persistent=False)
        except Exception:
            return None
        body = await response.content()
        return response.code, json.loads(body)

    async def test_start_health_ping_sigterm(self):
        """twistd starts the service, /health answers 200, Ping over the Unix socket says
        healthy, /metrics serves Prometheus text, and SIGTERM ends the process cleanly within
        10 s with its sockets removed."""
        proc = TwistdProcess(self, self.dir, ["--config", self.config])

        async def healthy():
            result = await self._health()
            return result is not None and result[0] == 200 and result

        try:
            code, body = await wait_for(healthy, timeout=30, what="/health 200")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        self.assertEqual(body["status"], "healthy")
        self.assertTrue(body["checks"]["storage"]["ok"])

        ipc_sock = os.path.join(self.dir, "ipc.sock")
        grpc_sock = os.path.join(self.dir, "grpc.sock")
        self.assertEqual(stat.S_IMODE(os.stat(ipc_sock).st_mode), 0o600)

        response = await threads.deferToThread(_ping, grpc_sock)
        self.assertTrue(response.healthy)
        self.assertGreater(response.timestamp, 0)

        metrics = await treq.get(f"http://127.0.0.1:{self.metrics_port}/metrics", persistent=False)
        text = (await metrics.content()).decode()
        self.assertIn("persist_ipc_messages_received_total", text)
        self.assertIn("persist_write_latency_seconds", text)

        proc.signal("TERM")
        code = await proc.wait_exit(10)
        # twistd re-raises the stopping signal after a clean shutdown, so the exit status
        # says "terminated by SIGTERM", as service managers expect.
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        self.assertIn("Server Shut Down.", proc.output)
        self.assertNotIn("Traceback", proc.output)
        self.assertFalse(os.path.exists(ipc_sock), "IPC socket left behind")
        self.assertFalse(os.path.exists(grpc_sock), "gRPC socket left behind")

    async def test_bad_config_fails_with_named_key(self):
        """A config with an unknown key makes twistd exit non-zero with an error naming the
        key and the file."""
        path = os.path.join(self.dir, "bad.yml")
        with open(path, "w") as f:
            f.write("storage:\n  dataDirectory: /tmp/x\n")
        proc = TwistdProcess(self, self.dir, ["--config", path])
        code = await proc.wait_exit(30)
        self.assertNotEqual(code, 0)
        self.assertIn("storage.dataDirectory", proc.output)
        self.assertIn(path, proc.output)


#: Runs twistd after replacing the servicer's log read with a loop that spins forever and
#: never checks cancellation (what a reader that makes no progress does).  Test code only:
#: the service itself has no such hook.
_SPINNING_TWISTD = textwrap.dedent(
    """\
    import sys
    from joblet_persist import query

    def _spin(self, request, context):
        print("test: query spinning, ignoring cancellation", file=sys.stderr, flush=True)
        while True:
            pass
        yield

    query.PersistServicer._log_chunks = _spin
    from twisted.scripts.twistd import run
    run()
    """
)


class _SpinningTwistd(TwistdProcess):
    """``twistd -n joblet-persist`` whose QueryLogs handlers spin forever."""

    def __init__(self, testcase, workdir: str, args: list[str]):
        from twisted.internet import reactor

        self.testcase = testcase
        self.workdir = workdir
        self.proto = _ChildProtocol()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-c", _SPINNING_TWISTD, "-n", "--pidfile=", "--logfile=-",
                "joblet-persist", *args]
        self.transport = reactor.spawnProcess(self.proto, sys.executable, argv, env=env)
        testcase.addCleanup(self._kill)


class TwistdShutdownBoundTests(unittest.TestCase):
    timeout = 90

    async def test_sigterm_exits_within_grace_while_a_query_spins(self):
        """With a QueryLogs handler spinning at 100% CPU and ignoring cancellation, SIGTERM
        still ends the process within server.shutdownGrace plus the stop bound (1 s) and a
        little scheduling: the rest of the stop runs (a frame received just before the signal
        is flushed to disk, the sockets are removed) and the exit is clean, no traceback."""
        directory = short_tempdir(self)
        health_port = free_port()
        grace = 1.0
        config = write_service_config(directory, {
            "server": {"shutdownGrace": f"{grace:g}s"},
            "writer": {"flushInterval": "1h"},
            "monitoring": {"enabled": True, "metricsPort": free_port(), "healthPort": health_port},
        })
        proc = _SpinningTwistd(self, directory, ["--config", config])
        grpc_sock = os.path.join(directory, "grpc.sock")
        ipc_sock = os.path.join(directory, "ipc.sock")

        async def healthy():
            try:
                response = await treq.get(f"http://127.0.0.1:{health_port}/health",
                                          persistent=False)
            except Exception:
                return False
            return response.code == 200

        await wait_for(healthy, timeout=30, what="/health 200")
        job = "5e1f5e1f-0000-4111-8222-933333333333"
        await in_thread(send_in_pieces, ipc_sock, log_frame(job, 1, 1, 1, b"kept\n"))

        def query():
            with grpc.insecure_channel(f"unix:{grpc_sock}") as channel:
                stub = persist_pb2_grpc.PersistServiceStub(channel)
                try:
                    list(stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=job), timeout=60))
                except grpc.RpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

        querying = in_thread(query)
        await wait_for(lambda: "test: query spinning" in proc.output, timeout=20,
                       what="the query in flight")
        started = time.monotonic()
        proc.signal("TERM")
        code = await proc.wait_exit(grace + 30)
        elapsed = time.monotonic() - started
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        # Typically grace + 1 s + 0.25 s.  The spinning thread holds the GIL for 5 ms slices,
        # which slows the rest of the stop on a loaded machine; the old code never exited.
        self.assertLess(elapsed, grace + 1.0 + 8.0, f"SIGTERM to exit took {elapsed:.2f}s")
        self.assertEqual(await querying, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("handler threads still running", proc.output)
        self.assertIn("Server Shut Down.", proc.output)
        self.assertNotIn("Traceback", proc.output)
        self.assertFalse(os.path.exists(grpc_sock) or os.path.exists(ipc_sock))
        decoded = check_gzip_files(self, os.path.join(directory, "data"))
        self.assertEqual(list(decoded.values()), [b"kept\n"])
