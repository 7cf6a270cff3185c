"""A real S3 API for the tests: ``moto_server`` in a child process, and a gate in front of it.

``S3Server`` starts moto's HTTP server (``python -m moto.server``) on a free
loopback port, waits until it answers, and stops it at the end of the test;
``restart()`` stops it and starts it again on the same port (moto keeps its
data in memory: a restarted server is empty).  ``S3Gate`` is a TCP forwarder
of the test's own between the service and the server: ``close()`` refuses
new connections and drops open ones (S3 unreachable, while the server keeps
its objects), ``open()`` lets them through again on the same port, with
``slowdown = True`` every new connection is answered with S3's 503 SlowDown, and
``set_fault`` drops requests or answers midway or slows the answers down.

No boto3 client is mocked or patched: the service talks HTTP to a real
S3-compatible server.  The service finds credentials in the standard AWS
environment variables that ``aws_environment`` returns.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from twisted.internet import defer, protocol, reactor
from twisted.protocols import portforward

from tests.integration.support import free_port, wait_for

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


def aws_environment() -> dict:
    """Environment for a process that talks to the test server: static credentials, no
    shared config files, no instance metadata lookups."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def use_aws_environment(testcase) -> None:
    """Set ``aws_environment()`` in os.environ for the test (children inherit it)."""
    for key, value in aws_environment().items():
        old = os.environ.get(key)
        os.environ[key] = value
        if old is None:
            testcase.addCleanup(os.environ.pop, key, None)
        else:
            testcase.addCleanup(os.environ.__setitem__, key, old)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


class _Child(protocol.ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data[-65536:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class S3Server:
    """moto's S3 server as a child process on ``127.0.0.1:port``."""

    def __init__(self, testcase, port: int | None = None):
        self.testcase = testcase
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._child: _Child | None = None
        self._transport = None
        testcase.addCleanup(self.stop)

    @defer.inlineCallbacks
    def start(self):
        """Start the server and wait until it answers HTTP."""
        self._child = _Child()
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        env = dict(os.environ)
        # No path= argument: Twisted then uses posix_spawn, no fork (see SpawnedTwistd).
        self._transport = reactor.spawnProcess(self._child, sys.executable, argv, env=env)
        child = self._child

        def up():
            if child.ended.called:
                raise AssertionError(f"moto_server exited: {child.output.decode(errors='replace')}")
            from twisted.internet import threads

            return threads.deferToThread(_answers, self.port)

        yield wait_for(up, timeout=30, interval=0.1, what=f"moto_server on port {self.port}")

    def stop(self) -> defer.Deferred:
        """Stop the server (SIGKILL) and wait for it to exit; a no-op when not running."""
        child, self._child = self._child, None
        if child is None or child.ended.called:
            return defer.succeed(None)
        try:
            self._transport.signalProcess("KILL")
        except Exception:
            pass
        return child.ended

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing is answered."""
        self._transport.signalProcess(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a frozen server go on (SIGCONT); a no-op when it is not running."""
        if self._child is not None and not self._child.ended.called:
            self._transport.signalProcess(signal.SIGCONT)

    @defer.inlineCallbacks
    def restart(self):
        """Stop the server and start it again on the same port (empty: moto keeps no data)."""
        yield self.stop()
        yield self.start()

    def client(self):
        """A boto3 client of the test's own, for setting up and checking the bucket."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        ).client("s3", endpoint_url=self.url, config=Config(s3={"addressing_style": "path"}))


_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_SLOWDOWN_BODY)
) + _SLOWDOWN_BODY


class _SlowDown(protocol.Protocol):
    """Answers the first request of a connection with S3's 503 SlowDown, then closes."""

    def __init__(self):
        self.seen = b""

    def dataReceived(self, data):
        self.seen += data
        if b"\r\n\r\n" in self.seen and self.transport is not None:
            self.transport.write(_SLOWDOWN)
            self.transport.loseConnection()


_METHODS = (b"GET ", b"PUT ", b"POST ", b"DELETE ", b"HEAD ")


class _GateClient(portforward.ProxyClient):
    """The server side of a forwarded connection: responses, possibly dropped or slowed."""

    def connectionMade(self):
        super().connectionMade()
        # When the server closes its side, Twisted would stop this connection's producer
        # (the client's connection) at once, before a held answer is delivered.
        self.transport.unregisterProducer()
        self._held = bytearray()
        self._flush_call = None

    def dataReceived(self, data):
        gate = self.peer.factory.gate
        if data.startswith(b"HTTP/1.") and gate.take("drop-response"):
            # The server has done the request; the client never learns it did.
            self.peer.transport.write(data[: len(data) // 2])
            self.peer.transport.abortConnection()
            self.transport.abortConnection()
            return
        if gate.fault == "slow" or self._held:
            if data.startswith(b"HTTP/1."):
                gate.take("slow")
            self._held += data
            if self._flush_call is None:
                self._flush_call = reactor.callLater(gate.slow_seconds, self._flush)
            return
        super().dataReceived(data)

    def _flush(self):
        self._flush_call = None
        data, self._held = bytes(self._held), bytearray()
        if self.peer is not None and data:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        peer = self.peer
        if self._flush_call is not None and self._flush_call.active() and peer is not None:
            # The server closed after its answer: deliver the answer (late), then close.
            self._flush_call.cancel()
            self._flush_call = None
            self.peer = None
            gate = peer.factory.gate
            gate.pending_calls.add(
                reactor.callLater(gate.slow_seconds, self._flush_and_close, peer))
            return
        super().connectionLost(reason)

    def _flush_and_close(self, peer):
        data, self._held = bytes(self._held), bytearray()
        if peer is not None and peer.transport is not None:
            if data:
                peer.transport.write(data)
            peer.transport.loseConnection()


class _GateClientFactory(portforward.ProxyClientFactory):
    protocol = _GateClient


class _GateServer(portforward.ProxyServer):
    """The client side of a forwarded connection: requests noted, possibly dropped."""

    clientProtocolFactory = _GateClientFactory

    def dataReceived(self, data):
        gate = self.factory.gate
        if data.startswith(_METHODS):
            method, _, rest = data.partition(b" ")
            gate.requests.append((time.monotonic(), method.decode(),
                                  rest.partition(b" ")[0].decode(errors="replace")))
            if gate.take("drop-request"):
                # Half a request reaches the server, then both connections are cut.
                self.peer.transport.write(data[: len(data) // 2])
                self.peer.transport.abortConnection()
                self.transport.abortConnection()
                return
        super().dataReceived(data)


class _GateFactory(portforward.ProxyFactory):
    protocol = _GateServer

    def __init__(self, host, port, gate):
        super().__init__(host, port)
        self.gate = gate

    def buildProtocol(self, addr):
        if self.gate.slowdown:
            p = _SlowDown()
            self.gate.slowdowns += 1
            self.gate.requests.append((time.monotonic(), "503", ""))
        else:
            p = super().buildProtocol(addr)
        self.gate.connections.add(p)
        return p


class S3Gate:
    """A TCP forwarder on its own loopback port to ``target_port``; can refuse and drop."""

    def __init__(self, testcase, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: set = set()
        #: While True, every connection gets a 503 SlowDown instead of reaching the server.
        self.slowdown = False
        self.slowdowns = 0
        #: A fault applied to requests passing through: "drop-request" (half the request
        #: is forwarded, then both connections are cut), "drop-response" (the server
        #: answers, half the answer is forwarded, then both are cut), "slow" (every answer
        #: is held ``slow_seconds``), or None.  ``fault_times`` limits how many requests
        #: it hits (None: all); ``faulted`` counts those it hit.
        self.fault: str | None = None
        self.fault_times: int | None = None
        self.faulted = 0
        self.slow_seconds = 1.0
        #: (monotonic time, method, path) of every request seen ("503" for a SlowDown).
        self.requests: list = []
        self.pending_calls: set = set()
        self._listening = None
        testcase.addCleanup(self.close)

    def set_fault(self, fault: str | None, times: int | None = None) -> None:
        """Apply ``fault`` (see ``fault``) to the next ``times`` requests (None: all)."""
        self.fault, self.fault_times = fault, times

    def take(self, fault: str) -> bool:
        """True when ``fault`` applies to this request (and count it)."""
        if self.fault != fault or self.fault_times == 0:
            return False
        if self.fault_times is not None:
            self.fault_times -= 1
        self.faulted += 1
        return True

    def open(self) -> None:
        """Accept and forward connections (on the same port each time)."""
        if self._listening is None:
            factory = _GateFactory("127.0.0.1", self.target_port, self)
            self._listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")

    def close(self) -> defer.Deferred:
        """Refuse new connections and drop the open ones (S3 unreachable)."""
        listening, self._listening = self._listening, None
        for call in list(self.pending_calls):
            if call.active():
                call.cancel()
        self.pending_calls.clear()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abortConnection()
        self.connections.clear()
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)
