"""Klein app for monitoring: /health (JSON) and /metrics (Prometheus text).

Reactor thread: Klein serves requests on the reactor; both handlers only read
state the reactor owns.
"""

from __future__ import annotations

import json

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


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
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)

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
