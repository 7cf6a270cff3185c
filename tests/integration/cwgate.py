"""A fault-injecting HTTP forwarder of the tests' own, in front of moto's CloudWatch APIs.

``FaultGate`` listens on its own loopback port and forwards each connection to
the server, unless a fault is set:

- ``mode = "throttle"``: every new connection's first request is answered with
  CloudWatch's ``ThrottlingException`` (HTTP 400, JSON 1.1 error body and
  ``x-amzn-ErrorType`` header), then closed;
- ``mode = "unavailable"``: answered with HTTP 503 ``ServiceUnavailableException``;
- ``mode = "slow"``: forwarded, but only after ``delay`` seconds;
- ``close()``: new connections refused, open ones dropped (CloudWatch unreachable).

Setting a fault drops the open (keep-alive) connections so that it applies to the
next request.  ``faults`` counts the requests answered with a fault.
"""

from __future__ import annotations

import json

from twisted.internet import defer, protocol, reactor
from twisted.protocols import portforward

from tests.integration.support import free_port

_FAULTS = {
    "throttle": (400, "Bad Request", "ThrottlingException", "Rate exceeded"),
    "unavailable": (503, "Service Unavailable", "ServiceUnavailableException",
                    "The service is unavailable"),
}


def _fault_response(mode: str) -> bytes:
    status, reason, code, message = _FAULTS[mode]
    body = json.dumps({"__type": code, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-amz-json-1.1\r\n"
            f"x-amzn-ErrorType: {code}\r\nx-amzn-RequestId: fault\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Fault(protocol.Protocol):
    """Answers the first request (once its headers and body are in) with a fault, closes."""

    def __init__(self, gate, mode):
        self.gate, self.mode, self.seen, self.done = gate, mode, b"", False

    def dataReceived(self, data):
        self.seen += data
        head, sep, body = self.seen.partition(b"\r\n\r\n")
        if not sep or self.done:
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(body) >= length:
            self.done = True
            self.gate.faults += 1
            self.transport.write(_fault_response(self.mode))
            self.transport.loseConnection()


class _Slow(portforward.ProxyServer):
    """Forwards, after the gate's delay (the client's bytes wait in the kernel meanwhile)."""

    def connectionMade(self):
        self.transport.pauseProducing()
        self.delayed = reactor.callLater(self.factory.gate.delay, self._go)

    def _go(self):
        if self.transport is not None and self.transport.connected:
            portforward.ProxyServer.connectionMade(self)

    def connectionLost(self, reason):
        if self.delayed.active():
            self.delayed.cancel()
        portforward.ProxyServer.connectionLost(self, reason)


class _GateFactory(portforward.ProxyFactory):
    def __init__(self, host, port, gate):
        super().__init__(host, port)
        self.gate = gate

    def buildProtocol(self, addr):
        mode = self.gate.mode
        if mode in _FAULTS:
            p = _Fault(self.gate, mode)
        elif mode == "slow":
            p = _Slow()
            p.factory = self
        else:
            p = super().buildProtocol(addr)
        self.gate.connections.add(p)
        return p


class FaultGate:
    """A forwarder on its own loopback port to ``target_port``, with faults on demand."""

    def __init__(self, testcase, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: set = set()
        self.mode = None
        self.delay = 1.0
        self.faults = 0
        self._listening = None
        testcase.addCleanup(self.close)

    def set_mode(self, mode, delay: float = 1.0) -> None:
        """``None`` (forward), "throttle", "unavailable" or "slow"; drops open connections."""
        self.mode, self.delay = mode, delay
        self._drop()

    def open(self) -> None:
        if self._listening is None:
            factory = _GateFactory("127.0.0.1", self.target_port, self)
            self._listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")

    def _drop(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abortConnection()
        self.connections.clear()

    def close(self) -> defer.Deferred:
        """Refuse new connections and drop the open ones."""
        listening, self._listening = self._listening, None
        self._drop()
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)
