"""Telemetry event frames (IPC types 3..9) through ingest, the writer and LocalStorage.

Frames are hand-encoded from the protocol's field numbers (tests.test_events' encoder), not
built with the project's generated classes.  Unit tests: synchronous thread runner,
task.Clock, StringTransport.
"""

from __future__ import annotations

import gzip
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import events
from joblet_persist.ingest import IngestFactory
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.local import LocalStorage
from joblet_persist.writer import BatchingWriter
from tests.test_events import IPC, SAMPLES, encode_event, f_int, f_len, stored_json, valid_events
from tests.test_ingest import JOB, RecordingMetrics, RecordingWriter, envelope, frame
from tests.test_storage_local import sync_runner

U64_MAX = (1 << 64) - 1


def expected_data(msg_type, values, job, ts, seq):
    """The stored JSON object of an event, built from the protocol tables."""
    obj = {"job_uuid": job, "timestamp": ts, "sequence": seq}
    for _number, name, type_ in IPC[msg_type][1]:
        value = values.get(name, [] if type_ == "strs" else "" if type_ == "str" else 0)
        if type_ == "strs":
            value = [stored_json(v) for v in value]
        elif type_ == "str":
            value = stored_json(value)
        obj[name] = value
    return obj


class IngestEventUnitTests(SynchronousTestCase):
    """The protocol validates event frames and hands them to ``writer.add_event``."""

    def setUp(self):
        self.clock = task.Clock()
        self.writer = RecordingWriter()
        self.metrics = RecordingMetrics()

    def feed(self, *bodies):
        factory = IngestFactory(self.writer, self.metrics, self.clock, max_frame_bytes=1 << 20)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"".join(frame(b) for b in bodies))
        return proto

    def test_every_kind_accepted(self):
        """A frame of each type 3..9 goes to add_event with its kind name, the envelope's
        timestamp and sequence, and the payload as received; it is counted as received."""
        bodies = []
        for t in range(3, 10):
            payload = encode_event(t, SAMPLES[t], ts=5, seq=6)
            bodies.append(envelope(t, JOB, payload, timestamp=100 + t, sequence=200 + t))
        self.feed(*bodies)
        self.assertEqual(self.metrics.rejected, [])
        self.assertEqual(
            self.writer.calls,
            [
                ("event", JOB, events.KINDS_BY_TYPE[t].name, 100 + t, 200 + t,
                 encode_event(t, SAMPLES[t], ts=5, seq=6))
                for t in range(3, 10)
            ],
        )
        self.assertEqual({t: self.metrics.received[t] for t in range(3, 10)},
                         dict.fromkeys(range(3, 10), 1))

    def test_payload_time_when_envelope_has_none(self):
        """An envelope without a timestamp takes timestamp and sequence from the payload."""
        self.feed(envelope(7, JOB, encode_event(7, SAMPLES[7], ts=77, seq=78)))
        self.assertEqual(self.writer.calls[0][3:5], (77, 78))

    def test_bad_payload_rejected_and_reading_continues(self):
        """A payload that does not decode as its type is rejected as bad_payload (counted,
        nothing handed over) and the frames after it are still taken."""
        good = envelope(9, JOB, encode_event(9, SAMPLES[9]), timestamp=1, sequence=1)
        for bad in (b"\xff\xff\xff", b"\x0a\x05ab", f_len(4, "not a varint")[:3]):
            self.writer.calls, self.metrics.rejected = [], []
            self.feed(envelope(3, JOB, bad), good)
            self.assertEqual(self.metrics.rejected, ["bad_payload"])
            self.assertEqual([c[2] for c in self.writer.calls], ["file"])
        self.assertEqual(self.metrics.events_rejected, [("exec", "bad_payload")] * 3)

    def test_invalid_job_and_stopping(self):
        """An invalid envelope job id is rejected as invalid_job_id; after the writer stops,
        events are rejected as stopping."""
        payload = encode_event(4, SAMPLES[4])
        self.feed(envelope(4, "../etc", payload))
        self.assertEqual(self.metrics.rejected, ["invalid_job_id"])
        self.writer.stopped = True
        self.feed(envelope(4, JOB, payload, timestamp=1))
        self.assertEqual(self.metrics.rejected, ["invalid_job_id", "stopping"])
        self.assertEqual(self.metrics.events_rejected,
                         [("connect", "invalid_job_id"), ("connect", "stopping")])
        self.assertEqual(self.writer.calls, [])

    def test_edge_cases_accepted(self):
        """Max uint64 addr and length, empty strings, 1,000 args, invalid UTF-8 and unknown
        fields are all accepted."""
        big = encode_event(8, {"addr": U64_MAX, "length": U64_MAX, "comm": ""})
        many = encode_event(3, {"args": [f"a{i}" for i in range(1000)]})
        raw = encode_event(9, {"path": b"\xff\xfe/x", "comm": b"\xc3("})
        unknown = encode_event(5, SAMPLES[5]) + f_int(99, 1) + f_len(100, b"zz")
        self.feed(*(envelope(t, JOB, p, timestamp=1) for t, p in
                    ((8, big), (3, many), (9, raw), (5, unknown))))
        self.assertEqual(self.metrics.rejected, [])
        self.assertEqual([c[2] for c in self.writer.calls], ["mprotect", "exec", "file", "accept"])


class EventHealthTests(SynchronousTestCase):
    """The ``ipc_events`` health check reports what happened to event frames."""

    def test_health_reports_accepted_and_rejected_events(self):
        """Across connections of one factory, /health's ipc_events entry counts accepted
        events by kind and rejected ones by reason and kind, names the last rejection and
        says "rejecting" for a minute after it; it never fails the verdict."""
        from joblet_persist.health import HealthMonitor

        clock = task.Clock()
        clock.advance(1_700_000_000)
        writer = RecordingWriter()
        factory = IngestFactory(writer, RecordingMetrics(), clock, max_frame_bytes=1 << 20)
        health = HealthMonitor(clock, None)
        health.add_check("ipc_events", factory.events.check)
        health._disk = {"writable": True, "error": None, "free_bytes": None}

        self.assertTrue(health.refresh())
        entry = health.details["ipc_events"]
        self.assertEqual((entry["ok"], entry["detail"], entry["rejected_total"]),
                         (True, "0 telemetry events accepted, 0 rejected", 0))
        self.assertIsNone(entry["last_rejected"])

        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        for proto in (first, second):
            proto.makeConnection(StringTransport())
        exec_frame = frame(envelope(3, JOB, encode_event(3, SAMPLES[3]), timestamp=1))
        file_frame = frame(envelope(9, JOB, encode_event(9, SAMPLES[9]), timestamp=2))
        first.dataReceived(exec_frame + frame(envelope(3, JOB, b"\xff\xff")) + file_frame)
        clock.advance(10)
        second.dataReceived(exec_frame + frame(envelope(4, "../x", encode_event(4, SAMPLES[4]))))
        self.assertEqual([c[2] for c in writer.calls], ["exec", "file", "exec"])

        clock.advance(5)
        self.assertTrue(health.refresh())
        entry = health.details["ipc_events"]
        self.assertTrue(entry["ok"])
        self.assertEqual(entry["accepted_total"], 3)
        self.assertEqual(entry["accepted_by_kind"], {"exec": 2, "file": 1})
        self.assertEqual(entry["rejected_total"], 2)
        self.assertEqual(entry["rejected_by_reason"], {"bad_payload": 1, "invalid_job_id": 1})
        self.assertEqual(entry["rejected_by_kind"],
                         {"connect": {"invalid_job_id": 1}, "exec": {"bad_payload": 1}})
        self.assertEqual(entry["last_rejected"], {"kind": "connect", "reason": "invalid_job_id"})
        self.assertEqual(entry["last_rejected_seconds_ago"], 5)
        self.assertEqual(
            entry["detail"],
            "rejecting telemetry events (last: connect invalid_job_id, 5 s ago): "
            "3 telemetry events accepted, 2 rejected",
        )

        clock.advance(60)
        self.assertTrue(health.refresh())
        entry = health.details["ipc_events"]
        self.assertEqual(entry["detail"], "3 telemetry events accepted, 2 rejected")
        self.assertEqual(entry["last_rejected_seconds_ago"], 65)


class IngestEventStorageTests(SynchronousTestCase):
    """Event frames through the real writer into LocalStorage, read back exactly."""

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.storage = LocalStorage(
            self.data_dir, sync_runner, compressor=make_compressor("zlib", 6), clock=self.clock,
            index_interval=5.0, segment_max_bytes=1 << 20, fsync="batch",
        )
        self.successResultOf(self.storage.start())
        self.writer = BatchingWriter(self.storage, self.clock, batch_max_messages=50)
        self.metrics = RecordingMetrics()
        factory = IngestFactory(self.writer, self.metrics, self.clock, max_frame_bytes=1 << 20)
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(StringTransport())
        self.jobs = 0

    def tearDown(self):
        self.successResultOf(self.writer.stop())
        self.successResultOf(self.storage.stop())

    def stored(self, job, kind):
        snap = self.successResultOf(self.storage.open_job(job))
        return [(r.timestamp, r.sequence, r.data) for r in snap.iter_events(kind)]

    def zcat(self, job, kind):
        path = os.path.join(self.data_dir, "events", job, events.KINDS_BY_NAME[kind].segment_name(0))
        with gzip.open(path) as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def test_all_kinds_stored_per_job_and_kind(self):
        """Every kind is stored in its own file under events/<job>/, readable with zcat
        (JSON lines in arrival order), read back through the snapshot, counted per kind."""
        sent = {}
        data = b""
        for i in range(20):
            t = 3 + i % 7
            values = SAMPLES[t]
            data += frame(envelope(t, JOB, encode_event(t, values), timestamp=1000 + i,
                                   sequence=i))
            sent.setdefault(IPC[t][0], []).append(expected_data(t, values, JOB, 1000 + i, i))
        # Split at every boundary that matters: one byte at a time for part of the stream.
        for k in range(0, 40):
            self.proto.dataReceived(data[k:k + 1])
        self.proto.dataReceived(data[40:])
        self.successResultOf(self.writer.flush_all())
        for kind, expected in sent.items():
            self.assertEqual([d for _t, _s, d in self.stored(JOB, kind)], expected)
            self.assertEqual(self.zcat(JOB, kind), expected)
        info = self.storage.job_info(JOB)
        self.assertEqual(info.event_counts, {k: len(v) for k, v in sent.items()})
        self.assertEqual(sorted(os.listdir(os.path.join(self.data_dir, "events", JOB))),
                         sorted(events.KINDS_BY_NAME[k].segment_name(0) for k in sent))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(valid_events(), min_size=1, max_size=12), st.data())
    def test_fuzzed_payloads_round_trip(self, items, data):
        """Any valid event payload (hypothesis over every field type, invalid UTF-8
        included), possibly with garbage frames in between, is stored and read back as
        the protocol tables say; the garbage is rejected as bad_payload."""
        self.jobs += 1
        job = f"fuzz-{self.jobs}"
        expected: dict = {}
        stream = b""
        bad = 0
        for msg_type, values, ts, seq in items:
            ts = abs(ts) or 1
            stream += frame(envelope(msg_type, job, encode_event(msg_type, values), ts, seq))
            expected.setdefault(IPC[msg_type][0], []).append(
                expected_data(msg_type, values, job, ts, seq)
            )
            if data.draw(st.booleans()):
                stream += frame(envelope(msg_type, job, b"\xff\xff"))
                bad += 1
        cut = data.draw(st.integers(0, len(stream)))
        before = len(self.metrics.rejected)
        self.proto.dataReceived(stream[:cut])
        self.proto.dataReceived(stream[cut:])
        self.successResultOf(self.writer.flush_all())
        self.assertEqual(self.metrics.rejected[before:], ["bad_payload"] * bad)
        for kind, rows in expected.items():
            self.assertEqual([d for _t, _s, d in self.stored(job, kind)], rows)


