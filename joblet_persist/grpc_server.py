"""The gRPC server's lifecycle as a Twisted service.

Reactor thread: ``startService`` and ``stopService`` run on the reactor.  The
grpc server and its handler thread pool are created in ``startService``
(twistd may fork after ``makeService``).  Shutdown never blocks the reactor:
``server.stop(grace)`` returns a ``threading.Event`` that a private thread
waits for, before it shuts the executor down; ``stopService`` returns a
Deferred that fires on the reactor when all of that is done.

Each listener (the admin Unix socket, the optional viewer Unix socket, TCP)
has a grpc server of its own, so that a call's role can follow the listener
it came in on (security.py: gRPC reports the same peer for every Unix
socket).  The servers share one handler thread pool and one servicer, so the
concurrency limit and Ping's spare threads stay global.

Stopping is bounded whatever the handlers do: RPCs in flight get the grace
period, then their calls are cancelled and the servicer tells its readers to
stop (``abandon_reads``); handler threads that still run ``stop_bound``
seconds later are left behind.  They are daemon threads of our own executor
(``DaemonThreadExecutor``), which nothing joins at interpreter exit, so they
cannot hold the process open the way ``concurrent.futures`` worker threads do.

Besides ``joblet.persist.PersistService`` each server carries
``grpc.health.v1.Health`` (SERVING / NOT_SERVING from the servicer's health
verdict, for the overall service "" and for ``joblet.persist.PersistService``)
and server reflection.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from twisted.application import service
from twisted.internet import defer, task
from twisted.python.failure import Failure

from joblet_persist import reflection_v1
from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from joblet_persist.logs import Logger
from joblet_persist.rules import parse_mode
from joblet_persist.security import (
    LISTENER_ADMIN_SOCKET,
    LISTENER_PLAINTEXT_TCP,
    LISTENER_TLS_TCP,
    LISTENER_VIEWER_SOCKET,
    ListenerServicer,
    check_tcp_listener,
    plaintext_tcp_warning,
    server_credentials,
)
from joblet_persist.services import replace_stale_unix_socket

PERSIST_SERVICE_NAME = persist_pb2.DESCRIPTOR.services_by_name["PersistService"].full_name

#: Handler threads beyond the concurrency limit, so that Ping, health checks
#: and reflection always find a free thread.
SPARE_WORKERS = 4

#: Seconds that handlers get, after the grace period, to notice that their
#: call was cancelled; the stop then completes whatever they still do.
STOP_BOUND = 1.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DaemonThreadExecutor(futures.Executor):
    """A thread pool for gRPC handlers whose threads never hold the process open.

    Any thread.  Like ``futures.ThreadPoolExecutor`` (threads started on
    demand up to ``max_workers``, idle ones reused), but its threads are
    daemon threads that nothing joins at interpreter exit.
    ``ThreadPoolExecutor`` joins its workers at exit (``threading._register_atexit``),
    so one handler stuck in a read that ignores cancellation would keep the
    process alive after SIGTERM, until SIGKILL.  Here the stop waits for
    handlers up to a bound (``join(timeout)``) and then lets them be: the data
    is flushed by the rest of the stop, and a handler left behind only reads.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "grpc-query"):
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = futures.Future()
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._worker,
                    name=f"{self._prefix}_{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
            return future

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)  # wake the next worker: we are shutting down
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:
                    future.set_exception(e)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; with ``wait``, wait for every worker (unbounded)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._work.put(None)
        if wait:
            self.join(None)

    def join(self, timeout: Optional[float]) -> list[threading.Thread]:
        """Wait up to ``timeout`` seconds (None: forever) for the workers to end after
        ``shutdown``; returns those still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]


class _HealthServicer(health.HealthServicer):
    """grpc.health.v1.Health whose status follows ``healthy()``.

    ``refresh()`` recomputes the status and notifies watchers; it may block on
    a slow watcher, so it runs on gRPC threads only: in Check (on demand) and
    when the reactor's poll sees a change (handed to the executor).
    """

    def __init__(self, healthy):
        super().__init__()
        self._healthy = healthy
        self.serving: Optional[bool] = None

    def refresh(self) -> None:
        serving = bool(self._healthy())
        if serving != self.serving:
            self.serving = serving
            status = _SERVING if serving else _NOT_SERVING
            self.set("", status)
            self.set(PERSIST_SERVICE_NAME, status)

    def Check(self, request, context):
        self.refresh()
        return super().Check(request, context)


class _MethodHandler(grpc.GenericRpcHandler):
    """A generic handler of one method of PersistService (``method_handler``)."""

    def __init__(self, method: str, method_handler: grpc.RpcMethodHandler):
        self._method = f"/{PERSIST_SERVICE_NAME}/{method}"
        self.method_handler = method_handler

    def service(self, handler_call_details):
        if handler_call_details.method == self._method:
            return self.method_handler
        return None


def follow_logs_handler(servicer) -> _MethodHandler:
    """The FollowLogs handler with a pass-through response serializer: the servicer's
    ``follow_logs_serialized`` yields serialized LogLineBatch messages, the very bytes
    the generated handler would send for the same messages."""
    return _MethodHandler("FollowLogs", grpc.unary_stream_rpc_method_handler(
        servicer.follow_logs_serialized,
        request_deserializer=persist_pb2.FollowLogsRequest.FromString,
        response_serializer=None,
    ))


class _AllStopped:
    """The events of several ``grpc.Server.stop`` calls, waited for as one
    (``wait(timeout)`` and ``is_set()`` like ``threading.Event``'s).  Any thread."""

    def __init__(self, events):
        self._events = list(events)

    def is_set(self) -> bool:
        return all(event.is_set() for event in self._events)

    def wait(self, timeout=None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                return False
        return True


class _Servers:
    """The grpc servers of the listeners, started and stopped together.

    ``stop(grace)`` stops every server at once (the grace periods run in
    parallel) and returns an object whose ``wait()`` waits for all of them,
    like ``grpc.Server.stop``'s event.
    """

    def __init__(self, servers):
        self.servers = list(servers)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self, grace):
        return _AllStopped([server.stop(grace) for server in self.servers])


class GrpcServerService(service.Service):
    """Serves ``servicer`` on Unix sockets and/or TCP.  Reactor thread.

    - ``unix_socket``: the admin socket's path (every caller is admin); a
      stale socket file from a crash is replaced, a live one (another server
      answers) or a non-socket file is an error.  The file mode is set right
      after the bind, before the server starts.
    - ``viewer_socket``: the read-only socket's path (every caller is viewer),
      with ``viewer_socket_mode`` and ``viewer_socket_gid`` (None keeps the
      process's group) applied likewise.
    - ``tcp_address``: ``host:port`` (port 0 picks a free one; see
      ``tcp_port`` after start).  ``tls``: ``{"server_cert", "server_key",
      "ca_cert", "require_client_cert"}`` with PEM bytes; roles then come from
      client certificates.  Without ``tls`` the address must be loopback and
      ``allow_plaintext_tcp`` true (callers are admin; a warning is logged).
    - ``max_message_bytes`` limits received requests; ``max_send_message_bytes``
      (default: the same) limits sent messages, which must hold the largest
      stored line.
    - The handler pool has ``max(max_workers, limit + SPARE_WORKERS)``
      threads, where ``limit`` is the servicer's concurrency limit (set from
      ``max_concurrent_rpcs`` when given), so that Ping never queues behind
      queries.
    """

    name = "grpc"
    log = Logger()

    def __init__(
        self,
        servicer,
        *,
        unix_socket: Optional[str] = None,
        unix_socket_mode=0o600,
        viewer_socket: Optional[str] = None,
        viewer_socket_mode=0o660,
        viewer_socket_gid: Optional[int] = None,
        tcp_address: Optional[str] = None,
        tls: Optional[dict] = None,
        allow_plaintext_tcp: bool = False,
        max_workers: int = 16,
        max_message_bytes: int = 16 << 20,
        max_send_message_bytes: Optional[int] = None,
        max_concurrent_rpcs: Optional[int] = None,
        shutdown_grace: float = 5.0,
        stop_bound: float = STOP_BOUND,
        health_interval: float = 1.0,
        reactor=None,
    ):
        if not unix_socket and not viewer_socket and not tcp_address:
            raise ValueError("no gRPC listener configured: set a Unix socket or a TCP address")
        if tcp_address:
            check_tcp_listener(tcp_address, tls, allow_plaintext_tcp)
        if max_concurrent_rpcs is not None:
            servicer.set_max_concurrent_rpcs(max_concurrent_rpcs)
        self.servicer = servicer
        self.unix_socket = unix_socket or None
        self._unix_mode = parse_mode(unix_socket_mode)
        self.viewer_socket = viewer_socket or None
        self._viewer_mode = parse_mode(viewer_socket_mode)
        self._viewer_gid = viewer_socket_gid
        self.tcp_address = tcp_address or None
        self._tls = tls
        self._allow_plaintext_tcp = bool(allow_plaintext_tcp)
        self._max_workers = max(1, int(max_workers))
        self._max_message_bytes = int(max_message_bytes)
        self._max_send_message_bytes = int(
            max_message_bytes if max_send_message_bytes is None else max_send_message_bytes
        )
        self._grace = float(shutdown_grace)
        self._stop_bound = float(stop_bound)
        self._health_interval = float(health_interval)
        self._reactor = reactor
        self.tcp_port: Optional[int] = None
        self._server: Optional[_Servers] = None
        self._executor: Optional[DaemonThreadExecutor] = None
        self._health: Optional[_HealthServicer] = None
        self._health_loop: Optional[task.LoopingCall] = None

    @property
    def workers(self) -> int:
        """Size of the handler thread pool."""
        return max(self._max_workers, self.servicer.max_concurrent_rpcs + SPARE_WORKERS)

    def _get_reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # -- start ------------------------------------------------------------------------

    def startService(self):
        if self.tcp_address:
            check_tcp_listener(self.tcp_address, self._tls, self._allow_plaintext_tcp)
        reactor = self._get_reactor()
        executor = DaemonThreadExecutor(self.workers, thread_name_prefix="grpc-query")
        health_servicer = _HealthServicer(self.servicer.healthy)
        server = _Servers([])
        try:
            if self.unix_socket:
                listener = self._new_server(executor, health_servicer, LISTENER_ADMIN_SOCKET)
                server.servers.append(listener)
                self._bind_unix(listener, self.unix_socket, self._unix_mode, None)
            if self.viewer_socket:
                listener = self._new_server(executor, health_servicer, LISTENER_VIEWER_SOCKET)
                server.servers.append(listener)
                self._bind_unix(listener, self.viewer_socket, self._viewer_mode, self._viewer_gid)
            if self.tcp_address:
                kind = LISTENER_TLS_TCP if self._tls is not None else LISTENER_PLAINTEXT_TCP
                listener = self._new_server(executor, health_servicer, kind)
                server.servers.append(listener)
                self.tcp_port = self._bind_tcp(listener)
            health_servicer.refresh()
            server.start()
        except BaseException:
            server.stop(None)
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._server, self._executor, self._health = server, executor, health_servicer
        service.Service.startService(self)
        self._health_loop = task.LoopingCall(self._poll_health)
        self._health_loop.clock = reactor
        self._health_loop.start(self._health_interval, now=False)
        self.log.info(
            "gRPC serving on {where}",
            where=", ".join(self._listeners()),
        )
        if self.tcp_address and self._tls is None:
            host = self.tcp_address.rpartition(":")[0]
            self.log.warn("{detail}", detail=plaintext_tcp_warning(f"{host}:{self.tcp_port}"))

    def _new_server(self, executor, health_servicer, listener: str) -> grpc.Server:
        """One listener's grpc server: the servicer as that listener sees it, health and
        reflection, on the shared handler pool."""
        server = grpc.server(
            executor,
            options=[
                ("grpc.max_send_message_length", self._max_send_message_bytes),
                ("grpc.max_receive_message_length", self._max_message_bytes),
                # A second server on the same port must fail, not share it.
                ("grpc.so_reuseport", 0),
            ],
        )
        listener_servicer = ListenerServicer(self.servicer, listener)
        # FollowLogs sends bytes serialized once per delivery and shared by every
        # follower (query.follow_logs_serialized), so its handler passes them through
        # instead of serializing per call.  A call finds it whether the client's stub
        # registered the method (the registered handlers, where the last registration
        # of a method wins) or not (the generic handlers, asked in order).
        follow_handler = follow_logs_handler(listener_servicer)
        server.add_generic_rpc_handlers((follow_handler,))
        persist_pb2_grpc.add_PersistServiceServicer_to_server(listener_servicer, server)
        server.add_registered_method_handlers(
            PERSIST_SERVICE_NAME, {"FollowLogs": follow_handler.method_handler}
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # Reflection v1alpha and v1 (grpcio-reflection serves only v1alpha).
        reflection_v1.enable((PERSIST_SERVICE_NAME, health.SERVICE_NAME), server)
        return server

    def _listeners(self) -> list[str]:
        where = []
        if self.unix_socket:
            where.append(f"unix:{self.unix_socket} (admin)")
        if self.viewer_socket:
            where.append(f"unix:{self.viewer_socket} (viewer)")
        if self.tcp_address:
            host = self.tcp_address.rpartition(":")[0]
            scheme = "tls" if self._tls else "plaintext"
            where.append(f"{host}:{self.tcp_port} ({scheme})")
        return where

    def _bind_unix(self, server: grpc.Server, path: str, mode: int, gid: Optional[int]) -> None:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        replace_stale_unix_socket(path)
        self._add_port(server.add_insecure_port, f"unix:{path}")
        # The socket file exists once bound; nothing is served before start().
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)

    def _bind_tcp(self, server: grpc.Server) -> int:
        if self._tls is not None:
            creds = server_credentials(self._tls)
            return self._add_port(lambda a: server.add_secure_port(a, creds), self.tcp_address)
        return self._add_port(server.add_insecure_port, self.tcp_address)

    @staticmethod
    def _add_port(add, address: str) -> int:
        if not address.startswith("unix:"):
            # gRPC core would print its own line (outside the log format) for a port in use.
            _check_tcp_free(address)
        try:
            port = add(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port

    def _poll_health(self) -> None:
        """Reactor thread: hand a health change to a gRPC thread (watchers may block)."""
        health_servicer, executor = self._health, self._executor
        if health_servicer is None or executor is None:
            return
        if self.servicer.healthy() != health_servicer.serving:
            try:
                executor.submit(health_servicer.refresh)
            except RuntimeError:
                pass  # the executor is shutting down

    # -- stop -------------------------------------------------------------------------

    def stopService(self):
        """Refuse new RPCs, let in-flight ones finish within the grace period,
        then shut the handler pool down and remove the socket file.  Returns a
        Deferred fired on the reactor within ``shutdown_grace + stop_bound``
        seconds, whatever the handlers do.

        At the end of the grace period gRPC cancels the calls still running and
        the servicer's ``abandon_reads`` makes its readers' ``cancelled()`` true;
        handlers get ``stop_bound`` seconds more to return.  Those still running
        then (a read that ignores cancellation) are logged and left behind:
        their threads are daemon threads and do not keep the process alive.
        """
        service.Service.stopService(self)
        self.servicer.set_stopping()
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        self._health_loop = None
        server, executor, health_servicer = self._server, self._executor, self._health
        self._server = self._executor = self._health = None
        if server is None:
            return defer.succeed(None)
        reactor = self._get_reactor()
        done = defer.Deferred()
        grace, bound = self._grace, self._stop_bound
        servicer, log = self.servicer, self.log

        def thd_stop():
            try:
                deadline = time.monotonic() + grace + bound
                # Watchers are notified from here, never from the reactor.
                health_servicer.enter_graceful_shutdown()
                stopped = server.stop(grace)
                stopped.wait(grace)
                servicer.abandon_reads()
                executor.shutdown(wait=False, cancel_futures=True)
                stopped.wait(max(0.0, deadline - time.monotonic()))
                stuck = executor.join(max(0.0, deadline - time.monotonic()))
                if stuck:
                    log.warn(
                        "gRPC stop: {count} handler threads still running {seconds:g}s after "
                        "the grace period ended; not waiting for them ({names})",
                        count=len(stuck), seconds=bound, names=", ".join(t.name for t in stuck),
                    )
                elif not stopped.is_set():
                    log.warn("gRPC stop: the server had not finished {seconds:g}s after the "
                             "grace period ended; not waiting for it", seconds=bound)
            except BaseException:
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, None)

        threading.Thread(target=thd_stop, name="grpc-stop", daemon=True).start()
        done.addCallback(lambda _: self._remove_socket())
        return done

    def _remove_socket(self) -> None:
        for path in (self.unix_socket, self.viewer_socket):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def _check_tcp_free(address: str) -> None:
    """Raise OSError naming ``address`` when it cannot be bound now (in use, not local).

    Bound and released at once with SO_REUSEADDR, as gRPC binds; a port taken in between
    still fails in gRPC itself.
    """
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return  # gRPC reports what it makes of the address
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            raise OSError(f"cannot listen on {address}: {e.strerror or e}") from None
