"""Transport security and authorization for the gRPC query API.

Three kinds of callers reach the servicer:

- the Unix socket listener (no TLS): the socket's file mode is the access
  control, so every caller there is trusted as ``admin``;
- plaintext TCP, which the service only binds on a loopback address: loopback
  callers are trusted like the Unix socket, as ``admin``;
- TLS TCP: the role comes from the verified client certificate's subject OU
  (``admin_ou`` -> ``admin``, ``viewer_ou`` -> ``viewer``); a certificate with
  neither OU is refused with PERMISSION_DENIED, a TLS caller without a
  certificate (``requireClientCert: false``) with UNAUTHENTICATED.

``viewer`` may Ping, query, get job info, list jobs and read stats; only
``admin`` may DeleteJob and CleanupOldData.

Threading: the Authorizer runs on gRPC handler threads; it keeps no mutable
state apart from an lru_cache of parsed certificates (thread-safe).  The helpers that build
credentials run on the reactor thread in ``startService`` (reading PEM files
is a one-off blocking read at startup).
"""

from __future__ import annotations

import functools
import ipaddress
import urllib.parse
from typing import Optional

import grpc

ROLE_ADMIN = "admin"
ROLE_VIEWER = "viewer"
_RANK = {ROLE_VIEWER: 1, ROLE_ADMIN: 2}


class Unauthenticated(Exception):
    """The caller has no usable identity (maps to UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """The caller's role does not allow the RPC (maps to PERMISSION_DENIED)."""


# -- configuration values ------------------------------------------------------


def read_pem(value: str, key: str, *, source: str | None = None) -> bytes:
    """PEM bytes of a ``security.*`` value (PEM text or a file path); ``""`` gives ``b""``.

    Reading is ``joblet_persist.config.read_pem``: an unreadable file or one
    without PEM data raises ConfigError naming ``key`` (and ``source``).
    """
    if not value:
        return b""
    from joblet_persist.config import read_pem as config_read_pem

    return config_read_pem(value, key, source=source)


def tls_settings(
    server_cert: str,
    server_key: str,
    ca_cert: str,
    require_client_cert: bool = True,
    *,
    source: str | None = None,
) -> Optional[dict]:
    """The ``tls`` argument of GrpcServerService from the security.* config values.

    Each value is PEM text or a file path.  Returns None when neither a server
    certificate nor a key is configured (no TLS).  Raises ValueError when only
    one of them is set, or when client certificates are required without a CA
    to verify them; ConfigError (from read_pem) when a file cannot be read.
    """
    cert = read_pem(server_cert, "security.serverCert", source=source)
    key = read_pem(server_key, "security.serverKey", source=source)
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("security.serverCert and security.serverKey must be set together")
    ca = read_pem(ca_cert, "security.caCert", source=source)
    if require_client_cert and not ca:
        raise ValueError("security.caCert is required when security.requireClientCert is true")
    return {
        "server_cert": cert,
        "server_key": key,
        "ca_cert": ca or None,
        "require_client_cert": bool(require_client_cert),
    }


def server_credentials(tls: dict) -> grpc.ServerCredentials:
    """grpc server credentials from a ``tls_settings`` dict."""
    require = bool(tls.get("require_client_cert", True))
    ca = tls.get("ca_cert") or None
    if require and not ca:
        raise ValueError("client certificates are required but no CA certificate is configured")
    return grpc.ssl_server_credentials(
        [(tls["server_key"], tls["server_cert"])],
        root_certificates=ca,
        require_client_auth=require,
    )


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port.

    Raises ValueError naming the address when it is malformed.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1).

    Other host names are not loopback: they could resolve anywhere.
    """
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_tcp_listener(address: str, tls: Optional[dict]) -> None:
    """Refuse plaintext gRPC on a non-loopback TCP address (ValueError)."""
    host, _ = split_host_port(address)
    if tls is None and not is_loopback_host(host):
        raise ValueError(
            f"refusing to serve plaintext gRPC on {address}: a non-loopback address "
            "needs TLS (security.serverCert and security.serverKey); "
            "or bind server.grpcAddress to 127.0.0.1"
        )


# -- client identity -------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def certificate_ous(pem: bytes) -> tuple[str, ...]:
    """The subject OU values of a PEM certificate.  Raises ValueError if unreadable."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    return tuple(
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    )


def role_for_ous(ous, admin_ou: str, viewer_ou: str) -> Optional[str]:
    """The strongest role the OU values grant, or None."""
    if admin_ou and admin_ou in ous:
        return ROLE_ADMIN
    if viewer_ou and viewer_ou in ous:
        return ROLE_VIEWER
    return None


def _peer_host(peer: str) -> Optional[str]:
    """The IP address of a ``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` peer string."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            rest = urllib.parse.unquote(peer[len(prefix) :])
            host = rest.rpartition(":")[0] if ":" in rest else rest
            return host.strip("[]")
    return None


class Authorizer:
    """Decides a caller's role from the gRPC context.  gRPC handler threads."""

    def __init__(self, admin_ou: str = "admin", viewer_ou: str = "viewer"):
        self.admin_ou = admin_ou
        self.viewer_ou = viewer_ou

    def role(self, context) -> str:
        """``admin`` or ``viewer``; raises Unauthenticated or PermissionDenied."""
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            return ROLE_ADMIN
        auth = context.auth_context() or {}
        certs = auth.get("x509_pem_cert")
        if certs:
            try:
                ous = certificate_ous(bytes(certs[0]))
            except ValueError:
                raise Unauthenticated("the client certificate cannot be parsed") from None
            role = role_for_ous(ous, self.admin_ou, self.viewer_ou)
            if role is None:
                shown = ", ".join(repr(o) for o in ous) or "none"
                raise PermissionDenied(
                    f"the client certificate's OU ({shown}) grants no role; "
                    f"expected OU {self.admin_ou!r} or {self.viewer_ou!r}"
                )
            return role
        security = (auth.get("transport_security_type") or [b""])[0]
        if security == b"insecure":
            host = _peer_host(peer)
            if host is not None and is_loopback_host(host):
                return ROLE_ADMIN
            raise Unauthenticated("plaintext connections are only accepted from loopback")
        raise Unauthenticated("a client certificate is required")

    def check(self, context, required: str, rpc: str) -> str:
        """Return the caller's role if it is at least ``required``, else raise."""
        role = self.role(context)
        if _RANK[role] < _RANK[required]:
            raise PermissionDenied(f"{rpc} requires the {required} role; this client is {role}")
        return role
