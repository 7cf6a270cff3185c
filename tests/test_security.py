"""Tests for joblet_persist.security: PEM values, listener checks, roles from certificates.

The end-to-end TLS checks over a real gRPC connection are in
tests/integration/test_grpc.py (TLSTests).
"""

from __future__ import annotations

import functools
import os
import tempfile

import grpc
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.config import ConfigError, config_from_string, default_config, read_pem
from joblet_persist.grpc_server import GrpcServerService
from joblet_persist.logs import Logger
from joblet_persist.query import PersistServicer
from joblet_persist.rules import is_loopback_host, listen_host, parse_host_port
from joblet_persist.security import (
    LISTENER_ADMIN_SOCKET,
    LISTENER_TLS_TCP,
    LISTENER_VIEWER_SOCKET,
    ROLE_ADMIN,
    ROLE_VIEWER,
    Authorizer,
    ListenerContext,
    ListenerServicer,
    PermissionDenied,
    Unauthenticated,
    certificate_ous,
    check_tcp_listener,
    config_warnings,
    plaintext_tcp_warning,
    role_for_ous,
    server_credentials,
)
from joblet_persist.tap import warn_exposed_settings
from tests.fakes import FakeContext, FakeStorage, ImmediateReactor, make_pki


@functools.lru_cache(maxsize=1)
def _pki():
    return make_pki(("admin", "viewer", "other", ""))


def _tls_context(ou: str, peer: str = "ipv4:192.0.2.1:4000") -> FakeContext:
    return FakeContext(
        peer=peer,
        auth={"transport_security_type": [b"ssl"], "x509_pem_cert": [_pki().clients[ou][0]]},
    )


class PemTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        fd, path = tempfile.mkstemp(prefix="jp-pem")
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        return path

    def test_text_and_path(self):
        """A value is PEM text itself or the path of a PEM file."""
        pem = _pki().ca_cert
        self.assertEqual(read_pem(pem.decode(), "security.caCert"), pem)
        self.assertEqual(read_pem(self.write(pem), "security.caCert"), pem)

    def test_errors_name_the_key(self):
        """An unreadable path or a file without PEM data is a ConfigError naming the key."""
        e = self.assertRaises(ConfigError, read_pem, "/nonexistent/ca.pem", "security.caCert")
        self.assertIn("security.caCert", str(e))
        self.assertIn("/nonexistent/ca.pem", str(e))
        e = self.assertRaises(ConfigError, read_pem, self.write(b"junk"), "security.serverKey")
        self.assertIn("security.serverKey", str(e))

    def test_credentials_need_ca_for_client_certs(self):
        """Requiring client certificates without a CA is refused."""
        p = _pki()
        tls = {"server_cert": p.server_cert, "server_key": p.server_key, "ca_cert": None}
        self.assertRaises(ValueError, server_credentials, tls)
        tls["require_client_cert"] = False
        self.assertIsInstance(server_credentials(tls), grpc.ServerCredentials)


class AddressTests(SynchronousTestCase):
    def test_split(self):
        """host:port and [v6]:port split; malformed addresses (an empty host included)
        are ValueErrors."""
        self.assertEqual(parse_host_port("127.0.0.1:50052"), ("127.0.0.1", 50052))
        self.assertEqual(parse_host_port("[::1]:0"), ("::1", 0))
        for bad in ("127.0.0.1", "host:port", "h:70000", "", ":50052"):
            self.assertRaises(ValueError, parse_host_port, bad)
        self.assertEqual(listen_host(":50052"), "")  # grpc's every-interface form
        self.assertEqual(listen_host("[::1]:50052"), "::1")
        self.assertRaises(ValueError, listen_host, ":70000")

    def test_loopback(self):
        """localhost, 127/8 and ::1 are loopback; other names and addresses are not."""
        for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback_host(host), host)
        for host in ("", "0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com"):
            self.assertFalse(is_loopback_host(host), host)

    def test_plaintext_only_on_loopback(self):
        """Plaintext TCP needs the opt-in and a loopback address; TLS allows any address."""
        check_tcp_listener("127.0.0.1:50052", None, True)
        check_tcp_listener("[::1]:50052", None, True)
        for address in ("127.0.0.1:50052", "[::1]:50052"):
            e = self.assertRaises(ValueError, check_tcp_listener, address, None)
            self.assertIn(address, str(e))
            self.assertIn("server.allowPlaintextTcp", str(e))
        for address in ("0.0.0.0:50052", ":50052", "10.0.0.1:1", "myhost:1"):
            for allow in (False, True):
                e = self.assertRaises(ValueError, check_tcp_listener, address, None, allow)
                self.assertIn(address, str(e))
                self.assertIn("TLS", str(e))
        check_tcp_listener("0.0.0.0:50052", {"server_cert": b"x", "server_key": b"y"})
        check_tcp_listener("127.0.0.1:50052", {"server_cert": b"x", "server_key": b"y"})

    def test_server_service_refuses_plaintext_non_loopback(self):
        """GrpcServerService refuses to be built for plaintext on a non-loopback address."""
        servicer = PersistServicer(
            FakeStorage(),
            ImmediateReactor(),
            is_healthy=lambda: True,
            ingest_stats=dict,
            delete_job=lambda job_id: None,
        )
        e = self.assertRaises(
            ValueError, GrpcServerService, servicer, tcp_address="0.0.0.0:50052", tls=None
        )
        self.assertIn("0.0.0.0:50052", str(e))
        self.assertRaises(ValueError, GrpcServerService, servicer)
        # Loopback plaintext without the opt-in is refused too.
        e = self.assertRaises(
            ValueError, GrpcServerService, servicer, tcp_address="127.0.0.1:0", tls=None
        )
        self.assertIn("server.allowPlaintextTcp", str(e))
        GrpcServerService(servicer, tcp_address="127.0.0.1:0", allow_plaintext_tcp=True)


class RoleTests(SynchronousTestCase):
    def test_ous(self):
        """The subject OU values are read from the certificate."""
        self.assertEqual(certificate_ous(_pki().clients["viewer"][0]), ("viewer",))
        self.assertEqual(certificate_ous(_pki().clients[""][0]), ())
        self.assertRaises(ValueError, certificate_ous, b"not a certificate")

    def test_role_for_ous(self):
        """admin OU wins over viewer OU; neither gives no role; OU names are configurable."""
        self.assertEqual(role_for_ous(("viewer", "admin"), "admin", "viewer"), ROLE_ADMIN)
        self.assertEqual(role_for_ous(("viewer",), "admin", "viewer"), ROLE_VIEWER)
        self.assertIsNone(role_for_ous(("ops",), "admin", "viewer"))
        self.assertEqual(role_for_ous(("ops",), "ops", "dev"), ROLE_ADMIN)
        self.assertIsNone(role_for_ous((), "", ""))

    def test_transport_roles(self):
        """Admin socket and opted-in loopback plaintext callers are admin; remote plaintext
        is refused."""
        a = Authorizer()
        self.assertEqual(a.role(FakeContext(peer="unix:")), ROLE_ADMIN)
        self.assertEqual(a.role(FakeContext(peer="unix:/run/x.sock")), ROLE_ADMIN)
        self.assertEqual(a.role(FakeContext(peer="ipv4:127.0.0.1:5555")), ROLE_ADMIN)
        self.assertEqual(a.role(FakeContext(peer="ipv6:[::1]:5555")), ROLE_ADMIN)
        self.assertRaises(Unauthenticated, a.role, FakeContext(peer="ipv4:10.0.0.2:5555"))
        self.assertRaises(Unauthenticated, a.role, FakeContext(peer="ipv4:127.0.0.1:1", auth={}))

    def test_listener_decides(self):
        """The listener a call came in on decides, not the peer: the viewer socket gives
        viewer, and a Unix or loopback peer on no known listener (or on the TLS listener)
        gets no role without a certificate."""
        a = Authorizer()
        self.assertEqual(a.role(FakeContext(listener=LISTENER_VIEWER_SOCKET)), ROLE_VIEWER)
        self.assertEqual(a.role(FakeContext(listener=LISTENER_ADMIN_SOCKET)), ROLE_ADMIN)
        for listener in (None, "", LISTENER_TLS_TCP, "something-else"):
            for peer in ("unix:", "ipv4:127.0.0.1:5", "ipv6:[::1]:5"):
                ctx = FakeContext(peer=peer, listener=listener)
                if listener is None:
                    del ctx.joblet_listener
                self.assertRaises(Unauthenticated, a.role, ctx)
        # A certificate still decides on the TLS listener.
        ctx = _tls_context("viewer")
        self.assertEqual(ctx.joblet_listener, LISTENER_TLS_TCP)
        self.assertEqual(a.role(ctx), ROLE_VIEWER)

    def test_listener_context_and_servicer(self):
        """ListenerServicer hands each RPC method the call's context wrapped with the
        listener's name; every other attribute of the context is the original's."""
        seen = []

        class Servicer:
            value = 7

            def Ping(self, request, context):
                seen.append((request, context.joblet_listener, context.peer()))
                return "pong"

        wrapped = ListenerServicer(Servicer(), LISTENER_VIEWER_SOCKET)
        self.assertEqual(wrapped.Ping("req", FakeContext(peer="unix:")), "pong")
        self.assertEqual(seen, [("req", LISTENER_VIEWER_SOCKET, "unix:")])
        self.assertEqual(wrapped.value, 7)
        ctx = ListenerContext(FakeContext(peer="ipv4:1.2.3.4:5"), LISTENER_ADMIN_SOCKET)
        self.assertEqual(ctx.peer(), "ipv4:1.2.3.4:5")
        self.assertEqual(Authorizer().role(ctx), ROLE_ADMIN)

    def test_certificate_roles(self):
        """TLS callers get their role from the certificate OU; none or no cert is refused."""
        a = Authorizer("admin", "viewer")
        self.assertEqual(a.role(_tls_context("admin")), ROLE_ADMIN)
        self.assertEqual(a.role(_tls_context("viewer")), ROLE_VIEWER)
        e = self.assertRaises(PermissionDenied, a.role, _tls_context("other"))
        self.assertIn("'other'", str(e))
        self.assertRaises(PermissionDenied, a.role, _tls_context(""))
        # TLS on loopback without a certificate is not trusted like plaintext loopback.
        no_cert = FakeContext(peer="ipv4:127.0.0.1:1", auth={"transport_security_type": [b"ssl"]})
        self.assertRaises(Unauthenticated, a.role, no_cert)
        garbage = FakeContext(
            peer="ipv4:1.2.3.4:1",
            auth={"transport_security_type": [b"ssl"], "x509_pem_cert": [b"garbage"]},
        )
        self.assertRaises(Unauthenticated, a.role, garbage)

    def test_check(self):
        """check() allows a role at least as strong as required and names the RPC otherwise."""
        a = Authorizer()
        self.assertEqual(a.check(_tls_context("admin"), ROLE_VIEWER, "Ping"), ROLE_ADMIN)
        self.assertEqual(a.check(_tls_context("viewer"), ROLE_VIEWER, "Ping"), ROLE_VIEWER)
        e = self.assertRaises(
            PermissionDenied, a.check, _tls_context("viewer"), ROLE_ADMIN, "DeleteJob"
        )
        self.assertIn("DeleteJob", str(e))


class ExposedSettingsTests(SynchronousTestCase):
    """Accepted settings that expose data warn at start, naming the key and the file."""

    def warnings(self, text):
        config = config_from_string(text, source="/etc/jp.yml")
        events = []
        messages = warn_exposed_settings(config, log=Logger(observer=events.append))
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn] * len(messages))
        self.assertEqual([e["detail"] for e in events], messages)
        return messages

    def test_defaults_warn_nothing(self):
        """The default configuration has nothing to warn about."""
        self.assertEqual(config_warnings(default_config()), [])
        self.assertEqual(self.warnings(""), [])

    def test_socket_modes_open_to_others(self):
        """Any o+rw bit on a socket mode warns, naming the key; group access does not."""
        for mode in ("0666", "0777", "0606", "0602", "0604"):
            text = (
                f'ipc:\n  socketMode: "{mode}"\n'
                f'server:\n  grpcSocketMode: "{mode}"\n'
                f'  grpcViewerSocket: /run/v.sock\n  grpcViewerSocketMode: "{mode}"\n'
            )
            messages = self.warnings(text)
            self.assertEqual(len(messages), 3, messages)
            for message, key in zip(
                messages,
                ["ipc.socketMode", "server.grpcSocketMode", "server.grpcViewerSocketMode"],
                strict=True,
            ):
                self.assertTrue(message.startswith(f"/etc/jp.yml: {key}: {mode}"), message)
                self.assertIn("every local user", message)
        for mode in ("0600", "0660", "0670", "0601"):
            self.assertEqual(self.warnings(f'server:\n  grpcSocketMode: "{mode}"\n'), [])
        # A listener that is off does not warn about its mode.
        self.assertEqual(self.warnings('server:\n  grpcViewerSocketMode: "0666"\n'), [])

    def test_monitoring_bind_address(self):
        """A non-loopback monitoring.bindAddress warns; loopback ones and a disabled
        monitoring do not."""
        for address in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
            [message] = self.warnings(f"monitoring:\n  bindAddress: '{address}'\n")
            self.assertTrue(message.startswith("/etc/jp.yml: monitoring.bindAddress: "), message)
            self.assertIn(address, message)
        for address in ("127.0.0.1", "::1", "localhost"):
            self.assertEqual(self.warnings(f"monitoring:\n  bindAddress: '{address}'\n"), [])
        self.assertEqual(
            self.warnings("monitoring:\n  enabled: false\n  bindAddress: 0.0.0.0\n"), []
        )

    def test_plaintext_warning_names_address_and_risk(self):
        """The plaintext TCP warning names the address, the opt-in key and the risk."""
        message = plaintext_tcp_warning("127.0.0.1:50052")
        for fragment in (
            "127.0.0.1:50052",
            "server.allowPlaintextTcp",
            "every local user",
            "admin",
            "delete jobs",
        ):
            self.assertIn(fragment, message)


class AllStoppedTests(SynchronousTestCase):
    """The combined stop event of several listeners' grpc servers."""

    def test_waits_for_every_event_within_one_timeout(self):
        """wait() is true only when every server stopped; one timeout bounds the whole wait;
        is_set() follows all events."""
        import threading

        from joblet_persist.grpc_server import _AllStopped

        a, b = threading.Event(), threading.Event()
        both = _AllStopped([a, b])
        self.assertFalse(both.is_set())
        a.set()
        self.assertFalse(both.wait(0))
        self.assertFalse(both.is_set())
        b.set()
        self.assertTrue(both.wait(0))
        self.assertTrue(both.wait())
        self.assertTrue(both.is_set())
        self.assertTrue(_AllStopped([]).wait(0))
