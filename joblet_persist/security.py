"""Transport security and authorization for the gRPC query API.

The listener a call came in on decides how its role is found (least
privilege: a caller nothing vouches for gets no role):

- the admin Unix socket (``server.grpcSocket``, mode 0600 by default): the
  socket file's permissions are the access control, every caller is ``admin``;
- the viewer Unix socket (``server.grpcViewerSocket``, optional, mode 0660
  and a configured group): every caller is ``viewer``;
- TLS TCP: the role comes from the verified client certificate's subject OU
  (``admin_ou`` -> ``admin``, ``viewer_ou`` -> ``viewer``); a certificate with
  neither OU is refused with PERMISSION_DENIED, a TLS caller without a
  certificate (``requireClientCert: false``) with UNAUTHENTICATED;
- plaintext TCP, only on a loopback address and only with
  ``server.allowPlaintextTcp: true``: loopback callers are ``admin`` (any
  local user; the service warns about it at start).

gRPC cannot tell two Unix socket listeners of one server apart (the peer is
``unix:`` and the auth context is the same on both), so every listener has
its own grpc server, and the servicer sees the call's context wrapped in a
``ListenerContext`` that names the listener.  A context that names no listener
gets a role only from a client certificate.

``viewer`` may Ping, query, get job info, list jobs and read stats; only
``admin`` may DeleteJob and CleanupOldData.

Threading: the Authorizer runs on gRPC handler threads; it keeps no mutable
state apart from an lru_cache of parsed certificates (thread-safe).  The helpers that build
credentials run on the reactor thread in ``startService`` (reading PEM files
is a one-off blocking read at startup).  ``config_warnings`` is pure.
"""

from __future__ import annotations

import functools
import urllib.parse
from typing import Optional

import grpc

from joblet_persist.rules import is_loopback_host, listen_host

ROLE_ADMIN = "admin"
ROLE_VIEWER = "viewer"
_RANK = {ROLE_VIEWER: 1, ROLE_ADMIN: 2}

#: The kinds of gRPC listener; each has its own grpc server (see the module doc).
LISTENER_ADMIN_SOCKET = "admin-socket"
LISTENER_VIEWER_SOCKET = "viewer-socket"
LISTENER_TLS_TCP = "tls-tcp"
LISTENER_PLAINTEXT_TCP = "plaintext-tcp"

#: File mode bits that let other users (neither owner nor group) use a socket.
OTHER_ACCESS_BITS = 0o006


class Unauthenticated(Exception):
    """The caller has no usable identity (maps to UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """The caller's role does not allow the RPC (maps to PERMISSION_DENIED)."""


# -- configuration values ------------------------------------------------------


def server_credentials(tls: dict) -> grpc.ServerCredentials:
    """grpc server credentials from the ``tls`` dict of GrpcServerService
    (``server_cert``, ``server_key``, ``ca_cert`` PEM bytes, ``require_client_cert``)."""
    require = bool(tls.get("require_client_cert", True))
    ca = tls.get("ca_cert") or None
    if require and not ca:
        raise ValueError("client certificates are required but no CA certificate is configured")
    return grpc.ssl_server_credentials(
        [(tls["server_key"], tls["server_cert"])],
        root_certificates=ca,
        require_client_auth=require,
    )


def check_tcp_listener(address: str, tls: Optional[dict], allow_plaintext: bool = False) -> None:
    """Refuse plaintext gRPC on TCP unless opted in, and always on a non-loopback address.

    Raises ValueError naming the address and the keys to change.
    """
    host = listen_host(address)
    if tls is not None:
        return
    if not is_loopback_host(host):
        raise ValueError(
            f"refusing to serve plaintext gRPC on {address}: a non-loopback address "
            "needs TLS (security.serverCert and security.serverKey); "
            "or bind server.grpcAddress to 127.0.0.1"
        )
    if not allow_plaintext:
        raise ValueError(
            f"refusing to serve plaintext gRPC on {address}: TCP needs TLS "
            "(security.serverCert and security.serverKey), or server.allowPlaintextTcp: true "
            "to accept every local user as admin"
        )


def plaintext_tcp_warning(address: str) -> str:
    """The start-up warning of an opted-in plaintext TCP listener on ``address``."""
    return (
        f"gRPC serves plaintext TCP on {address} (server.allowPlaintextTcp: true): every "
        "local user who can connect to it is admin and may read every job's output and "
        "delete jobs; configure TLS (security.serverCert, security.serverKey, "
        "security.caCert) or use the Unix sockets instead"
    )


def config_warnings(config) -> list[str]:
    """Settings that are accepted but expose the service to other users.  Pure.

    Each message names the key (and the file).  ``config`` is a
    ``joblet_persist.config.Config``.  The plaintext TCP listener's warning is
    logged by the gRPC service itself, with the port it bound.
    """
    source = config.source
    found = []
    modes = [
        ("ipc.socketMode", config.ipc.socket, config.ipc.socket_mode, "send data as any job"),
        (
            "server.grpcSocketMode",
            config.server.grpc_socket,
            config.server.grpc_socket_mode,
            "act as admin (read every job's output, delete jobs)",
        ),
        (
            "server.grpcViewerSocketMode",
            config.server.grpc_viewer_socket,
            config.server.grpc_viewer_socket_mode,
            "read every job's output",
        ),
    ]
    for key, path, mode, what in modes:
        if path and mode & OTHER_ACCESS_BITS:
            found.append(
                f"{source}: {key}: {mode:04o} lets every local user connect to {path} and "
                f"{what}; use a mode without access for others (e.g. 0600 or 0660)"
            )
    monitoring = config.monitoring
    if monitoring.enabled and not is_loopback_host(monitoring.bind_address):
        found.append(
            f"{source}: monitoring.bindAddress: {monitoring.bind_address} is not a loopback "
            "address: /metrics and /health (job counts, sizes, node id) are served to the "
            "network without authentication"
        )
    return found


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


class ListenerContext:
    """A grpc.ServicerContext that also names the listener the call came in on.

    Every attribute but ``joblet_listener`` is the wrapped context's.  Built per
    call on a gRPC handler thread by ``ListenerServicer``.
    """

    __slots__ = ("_context", "joblet_listener")

    def __init__(self, context, listener: str):
        self._context = context
        self.joblet_listener = listener

    def __getattr__(self, name):
        return getattr(self._context, name)


class ListenerServicer:
    """The servicer as one listener's grpc server sees it.  gRPC handler threads.

    Each RPC method of ``servicer`` is called with the context wrapped in a
    ``ListenerContext`` naming ``listener``; everything else (the concurrency
    limit, the stopping flag) stays the one servicer's, shared by all listeners.
    """

    def __init__(self, servicer, listener: str):
        self._servicer = servicer
        self._listener = listener

    def __getattr__(self, name):
        method = getattr(self._servicer, name)
        if not callable(method):
            return method
        listener = self._listener

        @functools.wraps(method)
        def call(request, context):
            return method(request, ListenerContext(context, listener))

        return call


class Authorizer:
    """Decides a caller's role from the gRPC context.  gRPC handler threads."""

    def __init__(self, admin_ou: str = "admin", viewer_ou: str = "viewer"):
        self.admin_ou = admin_ou
        self.viewer_ou = viewer_ou

    def role(self, context) -> str:
        """``admin`` or ``viewer``; raises Unauthenticated or PermissionDenied."""
        listener = getattr(context, "joblet_listener", None)
        if listener == LISTENER_ADMIN_SOCKET:
            return ROLE_ADMIN
        if listener == LISTENER_VIEWER_SOCKET:
            return ROLE_VIEWER
        peer = context.peer() or ""
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
        if security == b"insecure" and listener == LISTENER_PLAINTEXT_TCP:
            host = _peer_host(peer)
            if host is not None and is_loopback_host(host):
                return ROLE_ADMIN
            raise Unauthenticated("plaintext connections are only accepted from loopback")
        if security == b"insecure":
            raise Unauthenticated("this listener accepts no plaintext callers")
        raise Unauthenticated("a client certificate is required")

    def check(self, context, required: str, rpc: str) -> str:
        """Return the caller's role if it is at least ``required``, else raise."""
        role = self.role(context)
        if _RANK[role] < _RANK[required]:
            raise PermissionDenied(f"{rpc} requires the {required} role; this client is {role}")
        return role
