"""Helpers for integration tests: short socket paths, free ports, a twistd child process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import textwrap

from twisted.internet import defer, protocol, reactor, task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def short_tempdir(testcase, prefix: str = "jp") -> str:
    """A directory under /tmp whose paths fit AF_UNIX's ~104-byte limit; removed after the test."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: str, extra: str = "", *, metrics_port: int, health_port: int) -> str:
    """A config file for a service whose data and sockets live in ``directory``."""
    text = textwrap.dedent(
        f"""\
        server:
          grpcSocket: {directory}/grpc.sock
          grpcAddress: ""
        ipc:
          socket: {directory}/ipc.sock
        storage:
          dataDir: {directory}/data
        monitoring:
          metricsPort: {metrics_port}
          healthPort: {health_port}
        """
    )
    path = os.path.join(directory, "persist.yml")
    with open(path, "w") as f:
        f.write(text)
        if extra:
            f.write(textwrap.dedent(extra))
    return path


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class TwistdProcess:
    """``twistd -n joblet-persist`` as a child process of the test."""

    def __init__(self, testcase, workdir: str, args: list[str]):
        self.testcase = testcase
        self.workdir = workdir
        self.proto = _ChildProtocol()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=-",
            "joblet-persist",
            *args,
        ]
        self.transport = reactor.spawnProcess(self.proto, sys.executable, argv, env=env,
                                              path=workdir)
        testcase.addCleanup(self._kill)

    @property
    def output(self) -> str:
        return self.proto.output.decode("utf-8", "replace")

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    def _kill(self):
        if not self.proto.ended.called:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass
            return self.proto.ended

    def wait_exit(self, timeout: float) -> defer.Deferred:
        """Fires with the exit code (or -signal); fails if it takes longer than timeout."""
        d = defer.Deferred()

        def ended(value):
            code = getattr(value, "exitCode", None)
            sig = getattr(value, "signal", None)
            if not d.called:
                d.callback(code if code is not None else -(sig or 0))

        self.proto.ended.addCallback(ended)
        return d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` (may return a Deferred) until truthy, or fail after timeout."""
    deadline = reactor.seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield task.deferLater(reactor, interval, lambda: None)


__all__ = ["short_tempdir", "free_port", "write_config", "TwistdProcess", "wait_for", "signal"]
