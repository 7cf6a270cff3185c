"""Prometheus conventions of /metrics: series of alerting counters exist at 0, build info,
format and compression negotiation (metrics.py, web.py)."""

from __future__ import annotations

import gzip
import json
import os
import re

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import __version__
from joblet_persist.health import HealthMonitor
from joblet_persist.metrics import PersistMetrics
from joblet_persist.web import MonitoringApp, _accepts_gzip
from tests.fakes import FakeStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh():
    """A registry as a just-started service exports it, before any event."""
    from joblet_persist.storage.files import FileBudget

    m = PersistMetrics(CollectorRegistry(), process=False)
    m.set_storage_source(lambda: (0, 0))
    m.set_event_source(lambda: {})
    m.set_file_budget(FileBudget(1))
    m.set_health_source(HealthMonitor(task.Clock(), FakeStorage()))
    return m


def _expressions():
    """(where, PromQL) of every shipped alert and dashboard panel."""
    with open(os.path.join(ROOT, "deploy", "prometheus-alerts.yml")) as f:
        for rule in yaml.safe_load(f)["groups"][0]["rules"]:
            yield rule["alert"], rule["expr"]
    with open(os.path.join(ROOT, "deploy", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target["expr"]


class SeriesExistAtZeroTests(SynchronousTestCase):
    def test_alert_and_panel_series_exist_before_any_event(self):
        """Every counter an alert or panel reads has its series (with the label values the
        expression selects) at 0 from the first scrape, so increase() sees the first event."""
        m = _fresh()
        samples = {}
        for family in m.registry.collect():
            for s in family.samples:
                samples.setdefault(s.name, []).append(s.labels)
        missing = []
        for where, expr in _expressions():
            for name, selector in re.findall(r"\b(persist_[a-z_]+_total)(\{[^}]*\})?", expr):
                wanted = dict(re.findall(r'(\w+)="([^"$]+)"', selector or ""))
                have = samples.get(name, [])
                if not any(all(labels.get(k) == v for k, v in wanted.items()) for labels in have):
                    missing.append((where, name, wanted))
        self.assertEqual(missing, [])

    def test_known_label_values_start_at_zero(self):
        """The alerts' labelled counters list every known label value at 0."""
        text = _text(_fresh().registry)
        for line in (
            'persist_ipc_frames_rejected_total{reason="bad_envelope"} 0.0',
            'persist_ipc_frames_rejected_total{reason="stalled_frame"} 0.0',
            'persist_storage_errors_total{kind="index_write_failed"} 0.0',
            'persist_query_members_total{result="corrupt"} 0.0',
            'persist_query_requests_total{code="INTERNAL",rpc="QueryLogs"} 0.0',
            'persist_ipc_messages_received_total{type="log"} 0.0',
            'persist_ipc_events_rejected_total{kind="mmap",reason="bad_payload"} 0.0',
        ):
            self.assertIn(line, text)

    def test_build_info(self):
        """persist_build_info is 1 with the package version and the Python version."""
        families = {f.name: f for f in text_string_to_metric_families(_text(_fresh().registry))}
        (sample,) = families["persist_build_info"].samples
        self.assertEqual(sample.value, 1)
        self.assertEqual(sample.labels["version"], __version__)
        self.assertRegex(sample.labels["python"], r"^3\.\d+\.\d+")

    def test_no_gauge_with_a_counter_suffix(self):
        """No gauge is named like a counter (`_total`), as promtool requires."""
        for family in _fresh().registry.collect():
            if family.type != "counter":
                self.assertFalse(family.name.endswith("_total"), family.name)


def _text(registry):
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


class NegotiationTests(SynchronousTestCase):
    def setUp(self):
        m = _fresh()
        app = MonitoringApp(HealthMonitor(task.Clock(), FakeStorage()), m.registry,
                            version=__version__)
        self.agent = RequestTraversalAgent(app.resource())

    def get(self, **headers):
        # The raw agent: treq's client would add Accept-Encoding and decode gzip itself.
        from twisted.internet import defer, protocol
        from twisted.web.http_headers import Headers

        class Body(protocol.Protocol):
            def __init__(self):
                self.data, self.done = b"", defer.Deferred()

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                self.done.callback(self.data)

        d = self.agent.request(
            b"GET", b"http://x/metrics",
            Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
        )
        response = self.successResultOf(d)
        collect = Body()
        response.deliverBody(collect)
        self.agent.flush()
        return response, self.successResultOf(collect.done)

    def test_classic_text_by_default(self):
        """Without an Accept header: the classic text format, uncompressed."""
        r, body = self.get()
        self.assertEqual(r.headers.getRawHeaders("content-type"),
                         ["text/plain; version=0.0.4; charset=utf-8"])
        self.assertIsNone(r.headers.getRawHeaders("content-encoding"))
        self.assertIn(b"persist_build_info", body)

    def test_openmetrics_when_asked(self):
        """Accept: application/openmetrics-text gets OpenMetrics (ends with # EOF)."""
        r, body = self.get(accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
        self.assertTrue(
            r.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
        )
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_gzip_when_accepted(self):
        """Accept-Encoding: gzip gets a gzip body with Content-Encoding: gzip."""
        r, body = self.get(accept_encoding="deflate, gzip")
        self.assertEqual(r.headers.getRawHeaders("content-encoding"), ["gzip"])
        self.assertIn(b"persist_build_info", gzip.decompress(body))
        self.assertIn("Accept-Encoding", r.headers.getRawHeaders("vary")[0])

    def test_accept_encoding_parsing(self):
        """gzip is used when listed (or *) without q=0."""
        for header, expected in (("gzip", True), ("br, GZIP;q=0.5", True), ("*", True),
                                 ("gzip;q=0", False), ("identity", False), ("", False),
                                 ("gzip;q=x", False)):
            self.assertEqual(_accepts_gzip(header), expected, header)
