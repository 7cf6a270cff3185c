"""Tests for metrics.py, health.py and web.py."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.health import HealthMonitor
from joblet_persist.metrics import PersistMetrics
from joblet_persist.storage.api import SpaceProbe
from joblet_persist.storage.space import thd_probe_disk
from joblet_persist.web import MonitoringApp
from tests.fakes import FakeStorage


def _space(writable=True, error=None, free_bytes=1) -> FakeStorage:
    """A storage backend whose IFreeSpace probe reports these values."""
    storage = FakeStorage()
    storage.space = SpaceProbe(writable, error, free_bytes)
    return storage


def _samples(registry):
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class EventMetricsTests(SynchronousTestCase):
    def test_events_rejected_and_stored_by_kind(self):
        """Event rejections are exported by kind and reason, stored events by kind (read
        from the storage source at scrape time)."""
        m = PersistMetrics(CollectorRegistry(), process=False)
        totals = {"exec": 3, "file": 2}
        m.set_event_source(lambda: totals)
        m.event_rejected("mmap", "bad_payload")
        m.event_rejected("mmap", "bad_payload")
        m.event_rejected("exec", "invalid_job_id")
        samples = _samples(m.registry)
        rejected = "persist_ipc_events_rejected_total"
        self.assertEqual(samples[(rejected, (("kind", "mmap"), ("reason", "bad_payload")))], 2)
        self.assertEqual(samples[(rejected, (("kind", "exec"), ("reason", "invalid_job_id")))], 1)
        self.assertEqual(samples[("persist_events_stored", (("kind", "exec"),))], 3)
        totals["exec"] = 7
        self.assertEqual(_samples(m.registry)[("persist_events_stored", (("kind", "exec"),))], 7)


class MetricsDocumentedTests(SynchronousTestCase):
    """docs/operations.md lists every exported metric; the alert rules use only those."""

    ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__file__))

    def exported(self) -> set:
        from joblet_persist.storage.files import FileBudget

        m = PersistMetrics(CollectorRegistry(), process=False)
        m.set_storage_source(lambda: (0, 0))
        m.set_event_source(lambda: {"exec": 1})
        m.set_file_budget(FileBudget(1))
        h = HealthMonitor(task.Clock(), _space())
        h.probe_now()
        m.set_health_source(h)
        m.frame_rejected("bad_envelope")
        m.query_done("Ping", "OK", 0.001)
        names = set()
        for family in m.registry.collect():
            suffix = "_total" if family.type == "counter" else ""
            names.add(family.name + suffix)
        return names

    def test_every_metric_documented(self):
        import os

        with open(os.path.join(self.ROOT, "docs", "operations.md")) as f:
            doc = f.read()
        missing = sorted(n for n in self.exported() if f"`{n}`" not in doc)
        self.assertEqual(missing, [], "metrics not in docs/operations.md")

    def test_alerts_use_exported_metrics(self):
        import os
        import re

        import yaml

        with open(os.path.join(self.ROOT, "deploy", "prometheus-alerts.yml")) as f:
            rules = yaml.safe_load(f)["groups"][0]["rules"]
        exported = self.exported()
        unknown = []
        for rule in rules:
            for name in re.findall(r"\bpersist_[a-z_]+", rule["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name not in exported and base not in exported:
                    unknown.append((rule["alert"], name))
        self.assertEqual(unknown, [])


class MetricsTests(SynchronousTestCase):
    def test_hot_counters_exported(self):
        """Per-frame counters kept as plain ints appear as Prometheus counters by type and
        reason, with bytes, connections and storage totals."""
        m = PersistMetrics(CollectorRegistry(), process=False)
        m.frame_received(1, 100)
        m.frame_received(1, 50)
        m.frames_received({2: 3, 7: 1}, 40)
        m.frame_rejected("bad_envelope")
        m.connection_opened()
        m.set_storage_source(lambda: (4, 1234))
        s = _samples(m.registry)
        self.assertEqual(s[("persist_ipc_messages_received_total", (("type", "log"),))], 2)
        self.assertEqual(s[("persist_ipc_messages_received_total", (("type", "metric"),))], 3)
        self.assertEqual(s[("persist_ipc_messages_received_total", (("type", "mmap_event"),))], 1)
        self.assertEqual(s[("persist_ipc_bytes_received_total", ())], 190)
        self.assertEqual(
            s[("persist_ipc_frames_rejected_total", (("reason", "bad_envelope"),))], 1
        )
        self.assertEqual(s[("persist_ipc_connections", ())], 1)
        self.assertEqual(s[("persist_jobs", ())], 4)
        self.assertEqual(s[("persist_storage_bytes", ())], 1234)

    def test_health_exported(self):
        """The health verdict and each check appear as gauges."""
        h = HealthMonitor(task.Clock(), _space())
        h.add_check("ingest", lambda: (False, "not listening"))
        h.probe_now()
        m = PersistMetrics(CollectorRegistry(), process=False)
        m.set_health_source(h)
        s = _samples(m.registry)
        self.assertEqual(s[("persist_healthy", ())], 0)
        self.assertEqual(s[("persist_health_check_ok", (("check", "storage"),))], 1)
        self.assertEqual(s[("persist_health_check_ok", (("check", "ingest"),))], 0)

    def test_backpressure_time_from_clock(self):
        """Backpressure seconds accumulate from the injected clock while active."""
        clock = task.Clock()
        m = PersistMetrics(CollectorRegistry(), process=False)
        m.set_clock(clock.seconds)
        m.backpressure(True)
        clock.advance(2.5)
        m.backpressure(True)  # repeated: no double counting
        clock.advance(0.5)
        m.backpressure(False)
        clock.advance(10)
        self.assertEqual(m.backpressure_seconds(), 3.0)
        s = _samples(m.registry)
        self.assertEqual(s[("persist_backpressure_seconds_total", ())], 3.0)
        self.assertEqual(s[("persist_backpressure_active", ())], 0)

    def test_write_and_query_metrics(self):
        """Writer and query calls feed the histogram and labelled counters."""
        m = PersistMetrics(CollectorRegistry(), process=False)
        m.write_done(0.02, 10, 1000)
        m.write_error()
        m.query_done("QueryLogs", "OK", 0.003)
        m.members_inflated(2)
        m.retention_deleted(1, 500)
        s = _samples(m.registry)
        self.assertEqual(s[("persist_write_latency_seconds_count", ())], 1)
        self.assertEqual(s[("persist_messages_written_total", ())], 10)
        self.assertEqual(s[("persist_write_errors_total", ())], 1)
        self.assertEqual(
            s[("persist_query_requests_total", (("code", "OK"), ("rpc", "QueryLogs")))], 1
        )
        self.assertEqual(s[("persist_query_members_total", (("result", "inflated"),))], 2)
        self.assertEqual(s[("persist_retention_bytes_freed_total", ())], 500)


class CompressionLevelMetricTests(SynchronousTestCase):
    def test_level_child_looked_up_once(self):
        """compression_level (once per batch, on the reactor thread) counts every batch under
        its level but calls the Counter's labels() only once per level."""
        m = PersistMetrics(CollectorRegistry(), process=False)
        calls = []
        labels = m.compression_batches.labels

        def spy(**kw):
            calls.append(kw)
            return labels(**kw)

        m.compression_batches.labels = spy
        for level in (5, 5, 1, 5, 1):
            m.compression_level(level)
        self.assertEqual(calls, [{"level": "5"}, {"level": "1"}])
        value = m.registry.get_sample_value
        self.assertEqual(value("persist_compression_batches_total", {"level": "5"}), 3)
        self.assertEqual(value("persist_compression_batches_total", {"level": "1"}), 2)
        self.assertEqual(value("persist_compression_level"), 1)


class HealthTests(SynchronousTestCase):
    def test_real_probe_on_writable_and_missing_dir(self):
        """The disk probe reports a writable directory with its free space."""
        d = self.mktemp()
        result = thd_probe_disk(d)
        self.assertTrue(result.writable)
        self.assertGreater(result.free_bytes, 0)

    def test_verdict_combines_probe_floor_and_checks(self):
        """Healthy only when the probe says writable, free space is above the floor and every
        live check passes; the verdict is refreshed from the clock-driven loop."""
        clock = task.Clock()
        storage = _space(free_bytes=1000)
        listening = [True]
        h = HealthMonitor(clock, storage, min_free_bytes=500, interval=5)
        h.add_check("ingest", lambda: (listening[0], "x"))
        self.assertFalse(h.healthy)
        h.start()
        self.assertTrue(h.healthy)
        storage.space = SpaceProbe(True, None, 100)
        clock.advance(5)
        self.assertFalse(h.healthy)
        self.assertFalse(h.details["disk_space"]["ok"])
        storage.space = SpaceProbe(False, "/nonexistent: read-only file system", 1000)
        clock.advance(5)
        self.assertFalse(h.healthy)
        self.assertIn("read-only", h.details["storage"]["detail"])
        storage.space = SpaceProbe(True, None, 1000)
        clock.advance(5)
        self.assertTrue(h.healthy)
        listening[0] = False
        self.assertFalse(h.refresh())
        h.stop()
        self.assertFalse(h.healthy)

    def test_backend_without_probe(self):
        """A backend without IFreeSpace is not probed: its storage check passes and says so,
        the free-space floor is not judged, and a non-IFreeSpace object is refused."""
        h = HealthMonitor(task.Clock(), None, min_free_bytes=500)
        self.successResultOf(h.probe_now())
        self.assertTrue(h.healthy)
        self.assertIn("no writability probe", h.details["storage"]["detail"])
        self.assertNotIn("disk_space", h.details)
        self.assertIsNone(h.free_bytes)
        self.assertRaises(TypeError, HealthMonitor, task.Clock(), object())

    def test_broken_check_is_unhealthy_not_a_crash(self):
        """A check that raises makes the verdict unhealthy with the error as detail."""
        h = HealthMonitor(task.Clock(), _space())

        def boom():
            raise ValueError("broken")

        h.add_check("boom", boom)
        h.probe_now()
        self.assertFalse(h.healthy)
        self.assertIn("broken", h.details["boom"]["detail"])


class WebTests(SynchronousTestCase):
    def _app(self, writable=True):
        h = HealthMonitor(task.Clock(), _space(writable, None if writable else "ro", 10))
        h.probe_now()
        m = PersistMetrics(CollectorRegistry(), process=False)
        m.frame_received(1, 10)
        return StubTreq(MonitoringApp(h, m.registry, node_id="n1").resource())

    def test_health_200_json(self):
        """/health answers 200 with JSON per-check detail when healthy."""
        client = self._app()
        response = self.successResultOf(client.get("http://x/health"))
        self.assertEqual(response.code, 200)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["status"], "healthy")
        self.assertEqual(body["node_id"], "n1")
        self.assertTrue(body["checks"]["storage"]["ok"])

    def test_health_503_when_unhealthy(self):
        """/health answers 503 when storage is not writable."""
        client = self._app(writable=False)
        response = self.successResultOf(client.get("http://x/health"))
        self.assertEqual(response.code, 503)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body["status"], "unhealthy")

    def test_metrics_text(self):
        """/metrics serves the Prometheus text format of the registry."""
        client = self._app()
        response = self.successResultOf(client.get("http://x/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )
        text = self.successResultOf(response.content()).decode()
        self.assertIn('persist_ipc_messages_received_total{type="log"} 1.0', text)

    def test_unknown_path_404(self):
        """An unknown path is a 404 JSON error, not a 500."""
        client = self._app()
        response = self.successResultOf(client.get("http://x/nope"))
        self.assertEqual(response.code, 404)
