"""A real S3 API for synchronous test cases: moto's server in a child process.

tests/integration/s3server.py starts moto from a running reactor (trial
TestCase).  Synchronous test cases (the storage contract suite, which fires
Deferreds synchronously) start it here instead, once per class: ``start()``
spawns ``python -m moto.server`` on a free loopback port and waits, bounded,
until it answers; ``stop()`` kills it and waits for it to exit.  No boto3
client is mocked: the code under test talks HTTP to the server.

trial runs no class-level fixtures, so ``shared()`` starts one server per test
process on first use (each test takes a bucket of its own) and stops it when
the process exits.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time

from tests.integration.s3server import ACCESS_KEY, REGION, SECRET_KEY, aws_environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


class MotoServer:
    """moto's S3 server on ``127.0.0.1:port`` for the life of a test class."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = None
        self._saved_env: dict = {}

    def start(self, timeout: float = 30.0) -> None:
        for key, value in aws_environment().items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer on port {self.port}")
            time.sleep(0.05)  # setup only: waiting for the child to listen

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def client(self, url: str | None = None, timeout: float = 5.0):
        """A boto3 client of the server (or of ``url``), path-style, short timeouts."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        ).client("s3", endpoint_url=url or self.url, config=Config(
            s3={"addressing_style": "path"}, connect_timeout=timeout, read_timeout=timeout,
            retries={"max_attempts": 2, "mode": "standard"},
        ))


_SHARED: list = []


def shared() -> MotoServer:
    """The test process's moto server, started on first use, stopped at exit."""
    if not _SHARED:
        server = MotoServer()
        server.start()
        atexit.register(server.stop)
        _SHARED.append(server)
    return _SHARED[0]
