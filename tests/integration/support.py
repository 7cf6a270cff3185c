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
        # No path= argument: with one, Twisted forks instead of using posix_spawn, and a
        # child forked from a test process running gRPC threads can die before exec.
        self.transport = reactor.spawnProcess(self.proto, sys.executable, argv, env=env)
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


# -- ingest, crash and disk-full tests: configs, in-process services, frames, gRPC, files --

import gzip  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

import yaml  # noqa: E402


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def service_config_text(directory: str, sections: dict | None = None) -> str:
    """YAML for a service with its sockets in ``directory`` and its data in ``directory/data``.

    No TCP gRPC, no monitoring listeners, no free-space floor; ``sections`` (nested dicts of
    YAML keys) are merged over that, e.g. ``{"writer": {"flushInterval": "30s"}}``.
    """
    config = {
        "server": {"grpcSocket": f"{directory}/grpc.sock", "grpcAddress": ""},
        "ipc": {"socket": f"{directory}/ipc.sock"},
        "storage": {"dataDir": f"{directory}/data", "retention": {"minFreeBytes": 0}},
        "monitoring": {"enabled": False},
    }
    return yaml.safe_dump(_merge(config, sections or {}), sort_keys=False)


def write_service_config(directory: str, sections: dict | None = None) -> str:
    """``service_config_text`` written to ``directory/persist.yml``; returns the path."""
    path = os.path.join(directory, "persist.yml")
    with open(path, "w") as f:
        f.write(service_config_text(directory, sections))
    return path


@defer.inlineCallbacks
def start_service(testcase, config_text: str):
    """Build the whole service in-process on the real reactor and start it.

    Fires with the root service (``root.components`` holds the parts) once every child has
    started; the service is stopped at cleanup unless the test stopped it.
    """
    from joblet_persist.config import config_from_string
    from joblet_persist.tap import build_service

    root = build_service(config_from_string(config_text), reactor)
    testcase.addCleanup(stop_service, root)
    root.startService()
    yield root.started
    return root


def stop_service(root) -> defer.Deferred:
    """Stop a service started by ``start_service`` (no-op when already stopped)."""
    if not root.running:
        return defer.succeed(None)
    return defer.maybeDeferred(root.stopService)


def frame(body: bytes) -> bytes:
    """One IPC frame: big-endian u32 length, then the body."""
    return struct.pack(">I", len(body)) + body


def envelope(msg_type: int, job: str, data: bytes = b"", timestamp: int = 0,
             sequence: int = 0) -> bytes:
    """A serialized joblet.ipc.IPCMessage (without length prefix)."""
    from joblet_persist._proto import ipc_pb2

    return ipc_pb2.IPCMessage(
        version=1, type=msg_type, job_uuid=job, timestamp=timestamp, sequence=sequence, data=data
    ).SerializeToString()


def log_frame(job: str, stream: int, timestamp: int, sequence: int, content: bytes) -> bytes:
    """A framed LOG message whose LogLine carries the given fields."""
    from joblet_persist._proto import ipc_pb2

    line = ipc_pb2.LogLine(
        job_uuid=job, stream=stream, timestamp=timestamp, sequence=sequence, content=content
    ).SerializeToString()
    return frame(envelope(1, job, line, timestamp, sequence))


def metric_values(n: int) -> dict:
    """Distinct, exactly representable metric values for sample ``n`` (MetricData fields)."""
    return {
        "cpu_usage": n + 0.125,
        "memory_usage": (1 << 50) + n,
        "gpu_usage": n / 4,
        "disk_io": {"read_bytes": (1 << 40) + n, "write_bytes": 2 * n + 1, "read_ops": n,
                    "write_ops": 3 * n},
        "network_io": {"rx_bytes": (1 << 45) + n, "tx_bytes": n + 7, "rx_packets": 5 * n,
                       "tx_packets": 9},
    }


def metric_frame(job: str, timestamp: int, sequence: int, values: dict) -> bytes:
    """A framed METRIC message; ``values`` as returned by ``metric_values``."""
    from joblet_persist._proto import ipc_pb2

    data = ipc_pb2.MetricData(
        cpu_usage=values["cpu_usage"],
        memory_usage=values["memory_usage"],
        gpu_usage=values["gpu_usage"],
        disk_io=ipc_pb2.DiskIO(**values["disk_io"]),
        network_io=ipc_pb2.NetworkIO(**values["network_io"]),
    )
    payload = ipc_pb2.Metric(
        job_uuid=job, timestamp=timestamp, sequence=sequence, data=data
    ).SerializeToString()
    return frame(envelope(2, job, payload, timestamp, sequence))


def metric_message_values(metric) -> dict:
    """The ``metric_values``-shaped dict of a received joblet.persist.Metric."""
    d = metric.data
    return {
        "cpu_usage": d.cpu_usage,
        "memory_usage": d.memory_usage,
        "gpu_usage": d.gpu_usage,
        "disk_io": {k: getattr(d.disk_io, k)
                    for k in ("read_bytes", "write_bytes", "read_ops", "write_ops")},
        "network_io": {k: getattr(d.network_io, k)
                       for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")},
    }


def in_thread(f, *args, **kwargs) -> defer.Deferred:
    """Run blocking ``f`` on a new thread of its own; Deferred fired on the reactor.

    Unlike deferToThread, many of these run truly at once (the reactor's pool is small).
    """
    d = defer.Deferred()

    def run():
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True, name=getattr(f, "__name__", "helper")).start()
    return d


def send_in_pieces(path: str, data: bytes, sizes=(1, 3, 7, 4093, 2, 65537, 5, 131)) -> int:
    """Connect to the IPC socket at ``path``, send ``data`` cut at the cycling ``sizes``, close.

    Blocking (run it with ``in_thread``).  Returns the number of bytes sent.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(path)
        pos = i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            sock.sendall(data[pos:pos + n])
            pos += n
            i += 1
    finally:
        sock.close()
    return len(data)


def grpc_call(sock_path: str, fn, timeout: float = 10.0):
    """Blocking: ``fn(stub, timeout)`` on a fresh channel to the gRPC Unix socket."""
    import grpc

    from joblet_persist._proto import persist_pb2_grpc

    with grpc.insecure_channel(f"unix:{sock_path}") as channel:
        return fn(persist_pb2_grpc.PersistServiceStub(channel), timeout)


def query_logs(sock_path: str, job: str, stream: int = 0, timeout: float = 30.0) -> list:
    """Blocking: every LogLine of QueryLogs for ``job`` (``stream`` 0 = merged)."""
    from joblet_persist._proto import persist_pb2

    request = persist_pb2.QueryLogsRequest(job_uuid=job, stream=stream)
    return grpc_call(
        sock_path, lambda stub, t: list(stub.QueryLogs(request, timeout=t)), timeout
    )


def query_metrics(sock_path: str, job: str, timeout: float = 30.0) -> list:
    """Blocking: every Metric of QueryMetrics for ``job``."""
    from joblet_persist._proto import persist_pb2

    request = persist_pb2.QueryMetricsRequest(job_uuid=job)
    return grpc_call(
        sock_path, lambda stub, t: list(stub.QueryMetrics(request, timeout=t)), timeout
    )


def ping(sock_path: str, timeout: float = 2.0):
    """Blocking: a PingResponse, or None when the service does not answer."""
    import grpc

    from joblet_persist._proto import persist_pb2

    try:
        return grpc_call(sock_path, lambda stub, t: stub.Ping(persist_pb2.PingRequest(),
                                                              timeout=t), timeout)
    except grpc.RpcError:
        return None


def gz_files(data_dir: str) -> list[str]:
    """Every ``*.gz`` file under ``data_dir``, sorted."""
    found = []
    for root, _dirs, files in os.walk(data_dir):
        found.extend(os.path.join(root, name) for name in files if name.endswith(".gz"))
    return sorted(found)


def gzip_dc(path: str) -> bytes:
    """Blocking: ``gzip -dc path`` (the system tool); fails on any gzip error."""
    return subprocess.run(["gzip", "-dc", path], check=True, capture_output=True).stdout


def check_gzip_files(testcase, data_dir: str) -> dict[str, bytes]:
    """Blocking: every .gz under ``data_dir`` passes ``gzip -t`` and decodes completely with
    Python's gzip to what ``gzip -dc`` gives.  Returns path -> decoded bytes."""
    decoded = {}
    for path in gz_files(data_dir):
        test = subprocess.run(["gzip", "-t", path], capture_output=True)
        testcase.assertEqual(test.returncode, 0, f"gzip -t {path}: {test.stderr!r}")
        with open(path, "rb") as f:
            raw = f.read()
        data = gzip.decompress(raw)
        testcase.assertEqual(data, gzip_dc(path), path)
        decoded[path] = data
    return decoded


class SpawnedTwistd(TwistdProcess):
    """A TwistdProcess started with posix_spawn instead of fork.

    reactor.spawnProcess forks when it must change the working directory; the forked child
    then runs gRPC's fork handlers, whose poller dies on the descriptors Twisted closes before
    exec, killing the child before twistd ever runs ("epoll_wait error: Bad file descriptor").
    That happens once the test process has used a gRPC channel.  Without a working directory
    argument Twisted uses posix_spawnp, which runs no fork handlers.  The child runs in the
    test's working directory: every path in its configuration must be absolute.
    """

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
        self.transport = reactor.spawnProcess(self.proto, sys.executable, argv, env=env)
        testcase.addCleanup(self._kill)


__all__ += [  # noqa: PLE0604
    "SpawnedTwistd",
    "service_config_text",
    "write_service_config",
    "start_service",
    "stop_service",
    "frame",
    "envelope",
    "log_frame",
    "metric_values",
    "metric_frame",
    "metric_message_values",
    "in_thread",
    "send_in_pieces",
    "grpc_call",
    "query_logs",
    "query_metrics",
    "ping",
    "gz_files",
    "gzip_dc",
    "check_gzip_files",
]
