"""Klein app for monitoring: /health (JSON) and /metrics (Prometheus exposition).

Reactor thread: Klein serves requests on the reactor; both handlers only read
state the reactor owns.

/metrics negotiates like prometheus-client's own exporters: the ``Accept`` header picks
the classic text format or OpenMetrics (``choose_encoder``), and ``Accept-Encoding:
gzip`` compresses the body.  ``MonitoringSite`` logs each request at debug level
(a scrape every 15 s must not fill the info log).
"""

from __future__ import annotations

import gzip
import json

from klein import Klein
from prometheus_client.exposition import choose_encoder
from twisted.web.server import Site

from joblet_persist.logs import Logger


def _accepts_gzip(header: str) -> bool:
    """True when an Accept-Encoding header allows gzip (``gzip;q=0`` refuses it)."""
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().replace(" ", "")
            if not q.startswith("q="):
                return True
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
    return False


class MonitoringApp:
    """Serves the health verdict and the metrics registry."""

    app = Klein()

    def __init__(self, health, registry, *, node_id: str = "", version: str = ""):
        self._health = health
        self._registry = registry
        self._node_id = node_id
        self._version = version

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        healthy = self._health.refresh()
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "status": "healthy" if healthy else "unhealthy",
            "node_id": self._node_id,
            "version": self._version,
            "checks": self._health.details,
        }
        return json.dumps(body, sort_keys=True).encode() + b"\n"

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request):
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        request.setHeader(b"Content-Type", content_type.encode())
        request.setHeader(b"Vary", b"Accept, Accept-Encoding")
        if _accepts_gzip((request.getHeader(b"accept-encoding") or b"").decode("latin-1")):
            request.setHeader(b"Content-Encoding", b"gzip")
            body = gzip.compress(body, compresslevel=6, mtime=0)
        return body

    @app.handle_errors(Exception)
    def _error(self, request, failure):
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            code = failure.value.code or 500
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"error": failure.value.name}).encode() + b"\n"
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": "internal error"}).encode() + b"\n"

    def resource(self):
        return self.app.resource()


class MonitoringSite(Site):
    """A Site whose access log goes to the service log at debug level (twisted.web's own
    goes to the log at info level, a line per scrape); reactor thread."""

    noisy = False
    _log = Logger(namespace="joblet_persist.web")

    def log(self, request):
        self._log.debug(
            "{method} {path} {code} {length} bytes from {client}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            code=request.code,
            length=request.sentLength,
            client=getattr(request.getClientAddress(), "host", "-"),
        )
