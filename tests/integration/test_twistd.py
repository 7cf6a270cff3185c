"""A real ``twistd -n joblet-persist`` process: start, health, Ping, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import stat

import grpc
import treq
from twisted.internet import threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from tests.integration.support import (
    TwistdProcess,
    free_port,
    short_tempdir,
    wait_for,
    write_config,
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
