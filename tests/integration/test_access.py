"""Least privilege, tried as a hostile local user against a real ``twistd joblet-persist``.

The hostile user is uid/gid 65534 (nobody/nogroup): tests/integration/hostile_client.py runs
in a child process started with ``user=``/``group=`` (so these tests need root and skip
otherwise) and reports what it could reach.  Also here: the default configuration opens no
TCP listener, a TCP address without TLS or the opt-in stops startup with a clear message,
the warnings of exposed settings reach the log, and a line larger than the old 16 MiB
message limit is read back byte-exact.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist import cli
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist._proto import persist_pb2_grpc
from joblet_persist.config import QUERY_MESSAGE_OVERHEAD
from tests.fakes import make_pki
from tests.integration.support import (
    ROOT,
    SpawnedTwistd,
    free_port,
    in_thread,
    log_frame,
    ping,
    send_in_pieces,
    service_config_text,
    short_tempdir,
    start_service,
    wait_for,
)

JOB = "7f3e2a10-hostile-test"
NOBODY = 65534
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile_client.py")
LINES = [b"secret line 1\n", b"token=hunter2\n", b"\x00\xffbinary\n"]


def _site_packages() -> str:
    import grpc as module

    return os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))


def _python_for_nobody() -> str | None:
    """An interpreter that uid 65534 can run and that imports grpc with our PYTHONPATH.

    The test's own interpreter may sit under a directory only root may enter (pyenv in
    /root); the system interpreter of the same version loads the same packages."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            done = _as_nobody(
                [candidate, "-c", "import grpc, joblet_persist._proto.persist_pb2_grpc"]
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


def _as_nobody(argv: list) -> subprocess.CompletedProcess:
    """Blocking: run ``argv`` as uid/gid 65534 from ``/``, output captured, 60 s at most."""
    return subprocess.run(
        argv,
        env=_nobody_env(),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=60,
        cwd="/",
    )


def _nobody_env() -> dict:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([ROOT, _site_packages()]),
        "HOME": "/",
    }


def _run_as_nobody(python: str, spec: dict) -> dict:
    """Blocking: run the hostile client as uid/gid 65534; its JSON report.

    A client that gRPC's own core aborts (SIGABRT after a "Check failed" of its poller,
    which the client library does rarely at channel shutdown) is run once more: its
    attempts are independent reads, and the abort says nothing about what it could reach.
    Any other failure, or a second abort, fails the test."""
    for attempt in (1, 2):
        done = _as_nobody([python, CLIENT, json.dumps(spec)])
        aborted = done.returncode == -signal.SIGABRT and b"Check failed" in done.stderr
        if not (aborted and attempt == 1):
            break
    if done.returncode != 0:
        raise AssertionError(f"hostile client failed: {done.stderr.decode(errors='replace')}")
    return json.loads(done.stdout)


def _frames(job: str) -> bytes:
    return b"".join(log_frame(job, 1, 1_000 + i, i + 1, content) for i, content in enumerate(LINES))


def _query_logs(target: str, job: str, credentials=None, max_receive: int = 0) -> list:
    """Blocking: every LogLine of ``job``."""
    options = [("grpc.max_receive_message_length", max_receive)] if max_receive else []
    if credentials is None:
        channel = grpc.insecure_channel(target, options)
    else:
        channel = grpc.secure_channel(target, credentials, options)
    with channel:
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        return list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=job), timeout=60))


class _TwistdBase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.dir = short_tempdir(self)
        # Everyone may enter the directory: only the sockets' own modes keep others out.
        os.chmod(self.dir, 0o755)

    def write(self, name: str, data, mode: int = 0o644) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def start(self, config_text: str, extra_args=()):
        config = self.write("persist.yml", textwrap.dedent(config_text))
        self.proc = SpawnedTwistd(self, self.dir, ["--config", config, *extra_args])
        return self.proc

    @defer.inlineCallbacks
    def stop(self):
        self.proc.signal("TERM")
        code = yield self.proc.wait_exit(30)
        # twistd re-raises the stopping signal after a clean shutdown.
        self.assertIn(code, (0, -signal.SIGTERM), self.proc.output)


class HostileUserTests(_TwistdBase):
    """uid 65534 against a service with an admin socket, a viewer socket for its group and
    a mutual-TLS TCP listener."""

    def setUp(self):
        super().setUp()
        if os.getuid() != 0:
            raise unittest.SkipTest("needs root: the hostile client runs as uid 65534")
        self.python = _python_for_nobody()
        if self.python is None:
            raise unittest.SkipTest("no Python interpreter that uid 65534 can run with grpc")

    @defer.inlineCallbacks
    def test_hostile_user_gets_least_privilege(self):
        """As uid 65534: the admin (0600) and IPC sockets refuse the connection (EACCES);
        TCP without a client certificate yields nothing, plaintext or TLS; on the viewer
        socket (mode 0660, group nogroup) QueryLogs returns the job's lines but DeleteJob
        and CleanupOldData are PERMISSION_DENIED, and the job is still there afterwards."""
        pki = make_pki()
        cert = self.write("server.crt", pki.server_cert)
        key = self.write("server.key", pki.server_key, 0o600)
        ca = self.write("ca.crt", pki.ca_cert)
        port = free_port()
        d = self.dir
        self.start(
            f"""\
            server:
              grpcSocket: {d}/admin.sock
              grpcViewerSocket: {d}/viewer.sock
              grpcViewerSocketMode: "0660"
              grpcViewerSocketGroup: {NOBODY}
              grpcAddress: 127.0.0.1:{port}
            ipc:
              socket: {d}/ipc.sock
            storage:
              dataDir: {d}/data
              retention:
                minFreeBytes: 0
            writer:
              flushInterval: 50ms
            monitoring:
              enabled: false
            security:
              serverCert: {cert}
              serverKey: {key}
              caCert: {ca}
            """
        )
        admin = f"{d}/admin.sock"
        yield wait_for(lambda: in_thread(ping, admin), what="the service to answer Ping")
        yield in_thread(send_in_pieces, f"{d}/ipc.sock", _frames(JOB))

        def stored():
            try:
                lines = _query_logs(f"unix:{admin}", JOB)
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return len(lines) == len(LINES)

        yield wait_for(lambda: in_thread(stored), what="the lines to be stored")

        spec = {
            "job": JOB,
            "admin_socket": admin,
            "ipc_socket": f"{d}/ipc.sock",
            "viewer_socket": f"{d}/viewer.sock",
            "tcp": f"localhost:{port}",
            "ca": pki.ca_cert.decode(),
        }
        report = yield threads.deferToThread(_run_as_nobody, self.python, spec)

        self.assertEqual(report["admin_socket_connect"], "EACCES")
        self.assertEqual(report["ipc_socket_connect"], "EACCES")
        self.assertEqual(
            report["admin_socket"],
            {
                "QueryLogs": "UNAVAILABLE",
                "DeleteJob": "UNAVAILABLE",
                "CleanupOldData": "UNAVAILABLE",
            },
        )
        for attempt in ("tcp_plaintext", "tcp_tls_without_certificate"):
            self.assertEqual(
                report[attempt],
                {
                    "QueryLogs": "UNAVAILABLE",
                    "DeleteJob": "UNAVAILABLE",
                    "CleanupOldData": "UNAVAILABLE",
                },
                attempt,
            )
        self.assertEqual(report["viewer_socket_connect"], "connected")
        viewer = report["viewer_socket"]
        self.assertEqual(viewer["QueryLogs"], "OK")
        self.assertEqual([base64.b64decode(x) for x in viewer["lines"]], LINES)
        self.assertEqual(viewer["DeleteJob"], "PERMISSION_DENIED")
        self.assertEqual(viewer["CleanupOldData"], "PERMISSION_DENIED")

        # Nothing was deleted; root on the admin socket and an admin certificate over TLS
        # still read everything.
        lines = yield in_thread(_query_logs, f"unix:{admin}", JOB)
        self.assertEqual([line.content for line in lines], LINES)
        client_cert, client_key = pki.clients["admin"]
        creds = grpc.ssl_channel_credentials(pki.ca_cert, client_key, client_cert)
        lines = yield in_thread(_query_logs, f"localhost:{port}", JOB, creds)
        self.assertEqual(len(lines), len(LINES))
        self.assertNotIn("plaintext TCP", self.proc.output)
        yield self.stop()

    @defer.inlineCallbacks
    def test_default_configuration_opens_no_tcp(self):
        """With the server section left at its defaults (what the README's run command
        uses), the service listens on the admin Unix socket only: the startup line names no
        TCP listener, and uid 65534 cannot connect to either socket."""
        data = os.path.join(self.dir, "data")
        self.start("monitoring:\n  enabled: false\n", ["--data-dir", data])
        admin = os.path.join(data, "run", "persist-grpc.sock")
        yield wait_for(lambda: in_thread(ping, admin), what="the service to answer Ping")
        yield wait_for(lambda: "; configuration: " in self.proc.output, what="the startup line")
        listening = self.proc.output.split("listening: ", 1)[1].split("; configuration: ")[0]
        self.assertEqual(
            listening,
            f"ipc unix:{data}/run/persist-ipc.sock, grpc unix:{admin}",
        )
        self.assertNotIn("50052", self.proc.output)
        self.assertNotIn("plaintext TCP", self.proc.output)
        spec = {
            "job": JOB,
            "admin_socket": admin,
            "ipc_socket": os.path.join(data, "run", "persist-ipc.sock"),
        }
        report = yield threads.deferToThread(_run_as_nobody, self.python, spec)
        self.assertEqual(report["admin_socket_connect"], "EACCES")
        self.assertEqual(report["ipc_socket_connect"], "EACCES")
        yield self.stop()


class StartupTests(_TwistdBase):
    """What twistd says about TCP and exposed settings at start."""

    @defer.inlineCallbacks
    def test_tcp_without_tls_or_opt_in_stops_startup(self):
        """An explicit TCP address without TLS and without server.allowPlaintextTcp ends
        twistd with a non-zero status and one clear message naming the file and the keys,
        no traceback; nothing is listening."""
        d = self.dir
        port = free_port()
        self.start(
            f"""\
            server:
              grpcSocket: {d}/grpc.sock
              grpcAddress: 127.0.0.1:{port}
            ipc:
              socket: {d}/ipc.sock
            storage:
              dataDir: {d}/data
            monitoring:
              enabled: false
            """
        )
        code = yield self.proc.wait_exit(60)
        self.assertNotEqual(code, 0)
        output = self.proc.output
        self.assertIn(f"{d}/persist.yml: server.grpcAddress:", output)
        for key in ("security.serverCert", "security.serverKey", "server.allowPlaintextTcp"):
            self.assertIn(key, output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(f"{d}/grpc.sock"))

    @defer.inlineCallbacks
    def test_exposed_settings_warn_at_start(self):
        """Plaintext TCP opted in on loopback, a socket mode open to others and a
        non-loopback monitoring address each log a warning naming the key (and the
        address for TCP); the service still starts and serves."""
        d = self.dir
        port = free_port()
        self.start(
            f"""\
            server:
              grpcSocket: {d}/grpc.sock
              grpcAddress: 127.0.0.1:{port}
              allowPlaintextTcp: true
            ipc:
              socket: {d}/ipc.sock
              socketMode: "0666"
            storage:
              dataDir: {d}/data
              retention:
                minFreeBytes: 0
            monitoring:
              bindAddress: 0.0.0.0
              metricsPort: 0
              healthPort: 0
            """
        )
        yield wait_for(lambda: in_thread(ping, f"{d}/grpc.sock"), what="Ping")
        yield wait_for(
            lambda: f"127.0.0.1:{port} (server.allowPlaintextTcp" in self.proc.output,
            what="the plaintext TCP warning",
        )
        output = self.proc.output
        warnings = [line for line in output.splitlines() if "#warn]" in line]
        self.assertTrue(
            any(
                f"plaintext TCP on 127.0.0.1:{port}" in w and "every local user" in w
                for w in warnings
            ),
            output,
        )
        self.assertTrue(any("ipc.socketMode: 0666" in w for w in warnings), output)
        self.assertTrue(any("monitoring.bindAddress: 0.0.0.0" in w for w in warnings), output)
        yield self.stop()


class LargeLineTests(unittest.TestCase):
    """A line larger than gRPC's usual 16 MiB limit is stored and read back whole."""

    timeout = 120

    @defer.inlineCallbacks
    def test_20_mib_line_round_trip(self):
        """A 20 MiB LOG line (accepted at ingest, below ipc.maxFrameBytes) comes back
        byte-exact as one LogLine from QueryLogs, for a client that accepts 128 MiB
        messages as upstream's do, and through joblet-persist-ctl logs."""
        d = short_tempdir(self)
        root = yield start_service(
            self, service_config_text(d, {"writer": {"flushInterval": "50ms"}})
        )
        config = root.components["config"]
        self.assertGreaterEqual(
            config.grpc_send_message_bytes, config.ipc.max_frame_bytes + QUERY_MESSAGE_OVERHEAD
        )
        content = bytes(range(256)) * (20 * 1024 * 1024 // 256) + b"end\n"
        yield in_thread(
            send_in_pieces, f"{d}/ipc.sock", log_frame(JOB, 1, 5, 1, content), (1 << 20,)
        )
        target = f"unix:{d}/grpc.sock"

        def read():
            try:
                return _query_logs(target, JOB, max_receive=128 * 1024 * 1024)
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.NOT_FOUND:
                    return None
                raise

        lines = yield wait_for(lambda: in_thread(read), what="the line to be stored")
        self.assertEqual(len(lines), 1)
        self.assertEqual(len(lines[0].content), len(content))
        self.assertTrue(lines[0].content == content, "content differs")
        self.assertEqual((lines[0].timestamp, lines[0].sequence), (5, 1))

        def run_cli():
            import io

            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
            err = io.StringIO()
            code = cli.main(["--socket", f"{d}/grpc.sock", "logs", JOB], stdout=out, stderr=err)
            return code, out.buffer.getvalue(), err.getvalue()

        code, output, err = yield in_thread(run_cli)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(output == content, "joblet-persist-ctl output differs")
