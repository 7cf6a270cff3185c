"""Unit tests of the CloudWatch backend: event encoding, PutLogEvents batching, the
shipper's rounds (cursor, retries, routes, deletes), the reader, the configuration.

The shipper runs on a task.Clock with a synchronous thread runner, over a fake
storage of published snapshots and fake boto3 clients that record every call
(no network; the real CloudWatch API, moto's server, is exercised by
tests/integration/test_cloudwatch.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from botocore.exceptions import ClientError, EndpointConnectionError
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.archive import cloudwatch_api as api
from joblet_persist.archive import cloudwatch_codec as codec
from joblet_persist.archive.cloudwatch import (
    CloudWatchShipper,
    Cursors,
    cursor_path,
    offset_to_position,
    position_to_offset,
)
from joblet_persist.archive.cloudwatch_read import CloudWatchJobSnapshot, CloudWatchReader
from joblet_persist.config import ConfigError, config_from_string
from joblet_persist.retention import IArchivedCheck
from joblet_persist.storage.api import (
    IJobSnapshot,
    JobInfo,
    LogRecord,
    MetricRecord,
    Part,
    SegmentKind,
    StoredEvent,
)
from joblet_persist.storage.format import MemberInfo
from joblet_persist.storage.reader import SegmentView
from joblet_persist.storage.segment import segment_name
from joblet_persist.storage.snapshot import LocalJobSnapshot

WALL0 = 1_800_000_000.0  # the fake wall clock's start (Unix seconds)
NOW_NS = int(WALL0 * 1e9)
DAY_NS = 24 * 3600 * 10**9
NODE = "node-a"
GROUP = "/joblet/node-a/jobs"


def _tempdir(testcase) -> str:
    path = tempfile.mkdtemp(prefix="jpcw")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def _client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "Call")


# -- fakes ----------------------------------------------------------------------------------


class FakeLogs:
    """A boto3 "logs" client that keeps groups and streams in memory, like the service.

    ``fail`` maps an operation name to a list of exceptions raised by its next calls.
    GetLogEvents sorts by timestamp (stable) and pages like CloudWatch: the forward
    token repeats at the end.
    """

    def __init__(self):
        self.groups: dict = {}
        self.streams: dict = {}
        self.calls: list = []
        self.fail: dict = {}

    def _call(self, op, **kw):
        self.calls.append((op, kw))
        errors = self.fail.get(op)
        if errors:
            raise errors.pop(0)

    def create_log_group(self, logGroupName, **kw):
        self._call("create_log_group", logGroupName=logGroupName, **kw)
        if logGroupName in self.groups:
            raise _client_error("ResourceAlreadyExistsException")
        self.groups[logGroupName] = dict(kw)

    def put_retention_policy(self, logGroupName, retentionInDays):
        self._call("put_retention_policy", logGroupName=logGroupName, days=retentionInDays)
        self.groups[logGroupName]["retention"] = retentionInDays

    def create_log_stream(self, logGroupName, logStreamName):
        self._call("create_log_stream", logGroupName=logGroupName, logStreamName=logStreamName)
        if logGroupName not in self.groups:
            raise _client_error("ResourceNotFoundException")
        if (logGroupName, logStreamName) in self.streams:
            raise _client_error("ResourceAlreadyExistsException")
        self.streams[(logGroupName, logStreamName)] = []

    def put_log_events(self, logGroupName, logStreamName, logEvents):
        self._call("put_log_events", logGroupName=logGroupName, logStreamName=logStreamName,
                   n=len(logEvents))
        if (logGroupName, logStreamName) not in self.streams:
            raise _client_error("ResourceNotFoundException")
        stamps = [e["timestamp"] for e in logEvents]
        assert stamps == sorted(stamps), "not chronological"
        assert len(logEvents) <= codec.MAX_BATCH_EVENTS
        assert sum(codec.event_size(e["message"]) for e in logEvents) <= codec.MAX_BATCH_BYTES
        assert stamps[-1] - stamps[0] <= codec.MAX_BATCH_SPAN_MS
        for e in logEvents:
            assert 0 < len(e["message"].encode()) <= codec.MAX_EVENT_BYTES
        self.streams[(logGroupName, logStreamName)].extend(
            (e["timestamp"], e["message"]) for e in logEvents)
        return {"nextSequenceToken": "x"}

    def get_log_events(self, logGroupName, logStreamName, startFromHead, limit,
                       nextToken=None, startTime=None, endTime=None):
        self._call("get_log_events", logStreamName=logStreamName, nextToken=nextToken)
        if (logGroupName, logStreamName) not in self.streams:
            raise _client_error("ResourceNotFoundException")
        events = sorted(self.streams[(logGroupName, logStreamName)], key=lambda e: e[0])
        start = int(nextToken[2:]) if nextToken else 0
        page = events[start:start + limit]
        end = start + len(page)
        return {"events": [{"timestamp": t, "message": m} for t, m in page],
                "nextForwardToken": f"f/{end}"}

    def get_paginator(self, name):
        assert name == "describe_log_streams"
        logs = self

        class Paginator:
            def paginate(self, logGroupName, logStreamNamePrefix):
                logs._call("describe_log_streams", prefix=logStreamNamePrefix)
                if logGroupName not in logs.groups:
                    raise _client_error("ResourceNotFoundException")
                names = [s for g, s in logs.streams if g == logGroupName
                         and s.startswith(logStreamNamePrefix)]
                yield {"logStreams": [{"logStreamName": n} for n in names]}

        return Paginator()

    def describe_log_streams(self, logGroupName, logStreamNamePrefix, limit):
        pages = list(self.get_paginator("describe_log_streams").paginate(
            logGroupName=logGroupName, logStreamNamePrefix=logStreamNamePrefix))
        return pages[0]

    def delete_log_stream(self, logGroupName, logStreamName):
        self._call("delete_log_stream", logStreamName=logStreamName)
        self.streams.pop((logGroupName, logStreamName), None)

    def messages(self, stream: str) -> list:
        return [m for _t, m in self.streams.get((GROUP, stream), [])]


class FakeMetrics:
    def __init__(self):
        self.calls: list = []
        self.fail: list = []

    def put_metric_data(self, Namespace, MetricData):
        if self.fail:
            raise self.fail.pop(0)
        assert len(MetricData) <= 1000
        self.calls.append((Namespace, MetricData))


class FakeSnapshot:
    """A published job: per kind, a list of segments, each a list of records."""

    # The views of a kind, picked from the attributes below as a LocalJobSnapshot does.
    views = LocalJobSnapshot.views

    def __init__(self, job_id, info, data: dict):
        self.job_id = job_id
        self.info = info
        self._data = data
        views = {}
        for kind, segments in data.items():
            views[kind] = tuple(
                SegmentView(f"/d/{segment_name(kind, index)}",
                            (MemberInfo(0, 1, 1, len(records), 0, 0, 0, 0, 0, 0, 0),))
                for index, records in segments)
        self.stdout = views.get(SegmentKind.STDOUT, ())
        self.stderr = views.get(SegmentKind.STDERR, ())
        self.metrics = views.get(SegmentKind.METRICS, ())
        self.events = {name: views[kind] for name, kind in
                       (("exec", SegmentKind.EXEC_EVENTS),) if kind in views}
        self.reads = []

    def _records(self, kind, offset, limit):
        self.reads.append((kind, offset, limit))
        flat = [r for _i, seg in self._data.get(kind, ()) for r in seg]
        end = offset + limit if limit else None
        yield from flat[offset:end]

    def iter_logs(self, stream, offset=0, limit=0, **_kw):
        kind = SegmentKind.STDOUT if stream == 1 else SegmentKind.STDERR
        return self._records(kind, offset, limit)

    def iter_metrics(self, offset=0, limit=0, **_kw):
        return self._records(SegmentKind.METRICS, offset, limit)

    def iter_events(self, kind, offset=0, limit=0, **_kw):
        assert kind == "exec"
        return self._records(SegmentKind.EXEC_EVENTS, offset, limit)


class FakeStorage:
    def __init__(self):
        self.jobs: dict = {}

    def put(self, job_id, data, last_updated=int(WALL0) - 3600):
        info = JobInfo(job_id, int(WALL0) - 7200, last_updated, 0, 0, 0, 0, 0)
        self.jobs[job_id] = FakeSnapshot(job_id, info, data)

    def list_jobs(self):
        return tuple(s.info for s in self.jobs.values())

    def job_info(self, job_id):
        s = self.jobs.get(job_id)
        return s.info if s is not None else None

    def open_job(self, job_id):
        return defer.succeed(self.jobs.get(job_id))


def _log(stream, i, content=None, ts=None):
    return LogRecord(stream, ts if ts is not None else NOW_NS - DAY_NS + i * 10**6, i,
                     content if content is not None else b"line %d\n" % i)


def _logs(stream, n, start=0):
    return [_log(stream, i) for i in range(start, start + n)]


def _sample(i, ts=None):
    return MetricRecord(ts if ts is not None else NOW_NS - DAY_NS + i * 10**9, i, {
        "cpu_usage": 12.5, "memory_usage": 1000 + i, "gpu_usage": 0.0,
        "disk_io": {"read_bytes": 1, "write_bytes": 2, "read_ops": 3, "write_ops": 4},
        "network_io": {"rx_bytes": 5, "tx_bytes": 6},
    })


def _cfg(extra: str = ""):
    text = ("server:\n  nodeId: node-a\narchive:\n  cloudwatch:\n    enabled: true\n"
            "    retentionDays: 30\n    kmsKeyId: arn:aws:kms:us-east-1:1:key/k\n"
            "    metricDimensions: {Cluster: c1}\n" + extra)
    return config_from_string(text).archive.cloudwatch


class Harness:
    """A shipper over a FakeStorage and fake clients, on a Clock, with a sync runner."""

    def __init__(self, testcase, cfg=None, data_dir=None, storage=None, jitter=0.5):
        self.clock = task.Clock()
        self.data_dir = data_dir or _tempdir(testcase)
        self.storage = storage or FakeStorage()
        self.logs = FakeLogs()
        self.metrics = FakeMetrics()
        self.cfg = cfg or _cfg()

        def run(f, *args):
            return defer.maybeDeferred(f, *args)

        self.shipper = CloudWatchShipper(
            self.cfg, NODE, self.data_dir, self.storage, self.clock, run,
            make_clients=lambda cfg: api.Clients(self.logs, self.metrics),
            wall=lambda: WALL0 + self.clock.seconds(), jitter=lambda: jitter,
        )

    def start(self, testcase):
        testcase.successResultOf(self.shipper.start())
        testcase.addCleanup(self.shipper.stop)

    def cursor_file(self) -> dict:
        with open(cursor_path(self.data_dir), "rb") as f:
            return json.loads(f.read())


# -- encoding ---------------------------------------------------------------------------------


class CodecTests(SynchronousTestCase):
    def test_ordinary_text_is_sent_as_it_is(self):
        """A UTF-8 chunk that fits is its own message: the console shows it unchanged."""
        self.assertEqual(codec.encode_chunk("héllo wörld\n".encode()), ["héllo wörld\n"])

    def test_binary_is_escaped_readably_and_losslessly(self):
        """A chunk that is not UTF-8 keeps its text readable, bytes as \\xNN, backslashes
        doubled; it decodes to the exact bytes."""
        content = b"ok \xff\xfe path C:\\x41 done"
        [message] = codec.encode_chunk(content)
        self.assertEqual(message, "\u241ex1/1 ok \\xff\\xfe path C:\\\\x41 done")
        [joined] = codec.join_events([(5, message)])
        self.assertEqual((joined.timestamp_ms, joined.content), (5, content))

    def test_empty_and_marker_chunks_use_the_envelope(self):
        """CloudWatch refuses empty messages, and a chunk that starts with the marker
        would read as an envelope: both are wrapped, and come back exactly."""
        for content in (b"", "\u241et1/1 x".encode()):
            messages = codec.encode_chunk(content)
            self.assertTrue(messages[0].startswith("\u241et1/1 "))
            self.assertEqual([j.content for j in codec.join_events((1, m) for m in messages)],
                             [content])

    def test_long_chunks_are_split_under_the_event_cap_and_joined(self):
        """A 300 KB chunk (text, multi-byte text, binary) becomes several events, each
        within the event size cap; reading joins them back to one message."""
        for content in (b"a" * 300_000, "é€".encode() * 60_000, bytes(range(256)) * 1200):
            messages = codec.encode_chunk(content)
            self.assertGreater(len(messages), 1)
            for m in messages:
                self.assertLessEqual(len(m.encode()), codec.MAX_EVENT_BYTES)
            joined = list(codec.join_events((1, m) for m in messages))
            self.assertEqual([(j.content, j.parts) for j in joined],
                             [(content, len(messages))])

    def test_a_resent_split_chunk_is_read_once(self):
        """At-least-once delivery may repeat the first parts of a split chunk (a batch sent
        again after a failure): the incomplete copy is dropped, the message read once."""
        content = b"z" * 600_000
        messages = codec.encode_chunk(content)
        events = [(1, m) for m in messages[:2]] + [(1, m) for m in messages] + [(2, "next")]
        self.assertEqual([j.content for j in codec.join_events(events)], [content, b"next"])

    @given(st.binary(max_size=300), st.integers(4, 40))
    def test_escaped_split_round_trip(self, content, limit):
        """Any bytes, escaped and cut at any piece size, join back exactly."""
        try:
            text, escaped = content.decode(), False
        except UnicodeDecodeError:
            text, escaped = codec.escape_bytes(content), True
        pieces = codec._split_text(text, limit, escaped)
        self.assertTrue(all(len(p.encode()) <= limit for p in pieces))
        if escaped:
            self.assertEqual(b"".join(codec.unescape_text(p) for p in pieces), content)
        else:
            self.assertEqual("".join(pieces).encode(), content)

    def test_records_are_lossless_json(self):
        """Metric samples and events keep their nanosecond timestamp and sequence."""
        [m] = codec.encode_record(123456789012345678, 42, {"a": [1, "é"]})
        self.assertEqual(codec.decode_record(m.encode()), (123456789012345678, 42, {"a": [1, "é"]}))


class BatchTests(SynchronousTestCase):
    now_ms = NOW_NS // 10**6

    def test_at_most_10000_events(self):
        """A batch never holds more than 10,000 events."""
        msgs = [(self.now_ms, ["x"])] * 25_000
        batches, skipped = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([len(b.events) for b in batches], [10_000, 10_000, 5_000])
        self.assertEqual([b.done for b in batches], [10_000, 20_000, 25_000])
        self.assertEqual(skipped, 0)

    def test_at_most_1048576_bytes_counting_26_per_event(self):
        """Bytes are the UTF-8 size plus 26 per event; a batch stays within 1,048,576."""
        body = "é" * 50_000  # 100,000 UTF-8 bytes, 100,026 counted
        msgs = [(self.now_ms, [body])] * 25
        batches, _ = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([len(b.events) for b in batches], [10, 10, 5])
        for b in batches:
            self.assertEqual(b.size, len(b.events) * 100_026)
            self.assertLessEqual(b.size, codec.MAX_BATCH_BYTES)

    def test_timestamps_never_go_backwards_within_a_batch(self):
        """Stored order is kept; a timestamp going backwards starts a new batch."""
        msgs = [(self.now_ms - 10, ["a"]), (self.now_ms, ["b"]), (self.now_ms - 5, ["c"]),
                (self.now_ms - 1, ["d"])]
        batches, _ = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([[e["message"] for e in b.events] for b in batches],
                         [["a", "b"], ["c", "d"]])

    def test_a_batch_spans_at_most_24_hours(self):
        """Events more than 24 hours after a batch's first start a new batch."""
        day = 24 * 3600 * 1000
        t0 = self.now_ms - 3 * day
        msgs = [(t0, ["a"]), (t0 + day, ["b"]), (t0 + day + 1, ["c"])]
        batches, _ = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([[e["message"] for e in b.events] for b in batches], [["a", "b"], ["c"]])

    def test_out_of_range_timestamps_are_counted_not_sent(self):
        """Older than 14 days or over 2 hours ahead: not batched, counted, passed over."""
        day = 24 * 3600 * 1000
        msgs = [(self.now_ms - 15 * day, ["old"]), (self.now_ms, ["ok"]),
                (self.now_ms + 3 * 3600 * 1000, ["future"])]
        batches, skipped = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([[e["message"] for e in b.events] for b in batches], [["ok"]])
        self.assertEqual((skipped, batches[0].done), (2, 3))

    def test_parts_of_one_message_stay_together(self):
        """A split message whose parts fit in one batch is not cut between batches."""
        part = "p" * 200_000
        msgs = [(self.now_ms, [part] * 3), (self.now_ms, [part] * 3)]
        batches, _ = codec.plan_batches(msgs, self.now_ms)
        self.assertEqual([len(b.events) for b in batches], [3, 3])
        self.assertEqual([b.done for b in batches], [1, 2])


class CursorTests(SynchronousTestCase):
    def test_position_survives_dropped_segments(self):
        """A cursor counts within a segment: dropping older (shipped) segments does not
        move it, and offsets convert both ways."""
        counts = [(0, 5), (1, 5), (2, 3)]
        self.assertEqual(offset_to_position(counts, 7), (1, 2))
        self.assertEqual(position_to_offset(counts, 1, 2), 7)
        self.assertEqual(position_to_offset([(1, 5), (2, 3)], 1, 2), 2)
        self.assertEqual(offset_to_position(counts, 13), (2, 3))

    def test_file_for_another_target_is_ignored(self):
        """A cursor file written for another log group or node starts everything afresh."""
        c = Cursors((GROUP, NODE))
        c.set("j", "stdout", 2, 7)
        self.assertEqual(Cursors.from_bytes(c.to_bytes(), (GROUP, NODE)).get("j", "stdout"),
                         (2, 7))
        other = Cursors.from_bytes(c.to_bytes(), ("/joblet/other/jobs", "other"))
        self.assertEqual(other.get("j", "stdout"), (0, 0))
        with self.assertRaises(ValueError):
            Cursors.from_bytes(b'{"version": 9}', (GROUP, NODE))


# -- the shipper -------------------------------------------------------------------------------


class ShipperTests(SynchronousTestCase):
    def test_ships_every_kind_to_upstreams_names(self):
        """Logs, metrics and events go to {job}-stdout, -stderr, -metrics, -exec-events of
        group /joblet/{node}/jobs, created lazily with the configured KMS key and
        retention; samples also go to PutMetricData with the nine metrics and units."""
        h = Harness(self)
        h.storage.put("job-1", {
            SegmentKind.STDOUT: [(0, _logs(1, 3))],
            SegmentKind.STDERR: [(0, _logs(2, 2))],
            SegmentKind.METRICS: [(0, [_sample(0), _sample(1)])],
            SegmentKind.EXEC_EVENTS: [(0, [StoredEvent(NOW_NS - 5, 9, {"pid": 1})])],
        })
        h.start(self)
        self.assertEqual(h.logs.groups[GROUP],
                         {"kmsKeyId": "arn:aws:kms:us-east-1:1:key/k", "retention": 30})
        self.assertEqual(h.logs.messages("job-1-stdout"), ["line 0\n", "line 1\n", "line 2\n"])
        self.assertEqual(h.logs.messages("job-1-stderr"), ["line 0\n", "line 1\n"])
        [m0, _m1] = h.logs.messages("job-1-metrics")
        self.assertEqual(codec.decode_record(m0.encode())[:2], (_sample(0).timestamp, 0))
        [ev] = h.logs.messages("job-1-exec-events")
        self.assertEqual(codec.decode_record(ev.encode()), (NOW_NS - 5, 9, {"pid": 1}))
        [(namespace, datums)] = h.metrics.calls
        self.assertEqual(namespace, "Joblet/Jobs")
        self.assertEqual(len(datums), 18)
        units = {d["MetricName"]: d["Unit"] for d in datums}
        self.assertEqual(units, {name: unit for name, _path, unit in api.METRICS})
        self.assertEqual(datums[0]["Dimensions"], [
            {"Name": "JobUUID", "Value": "job-1"}, {"Name": "NodeID", "Value": NODE},
            {"Name": "Cluster", "Value": "c1"}])
        self.assertEqual(h.cursor_file()["streams"]["job-1"]["stdout"], [0, 3])
        self.assertEqual(h.shipper.backlog_messages, 0)

    def test_resumes_from_the_durable_cursor(self):
        """After a restart only what the cursor file does not cover is sent: in order,
        nothing twice, nothing lost."""
        h = Harness(self)
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 4))]})
        h.start(self)
        self.successResultOf(h.shipper.stop())
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 4)), (1, _logs(1, 3, 4))]},
                      last_updated=int(WALL0) + 10)
        again = Harness(self, data_dir=h.data_dir, storage=h.storage)
        again.logs = h.logs
        again.start(self)
        self.assertEqual(h.logs.messages("j-stdout"), [f"line {i}\n" for i in range(7)])
        self.assertEqual(h.storage.jobs["j"].reads[-1], (SegmentKind.STDOUT, 4, 3))

    def test_throttling_is_retried_with_backoff_and_jitter(self):
        """ThrottlingException, 5xx and connection errors ship nothing, are counted and
        retried after a delay that doubles (x jitter); then everything goes, in order."""
        h = Harness(self, jitter=0.0)  # x0.5
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 3))]})
        h.logs.fail["put_log_events"] = [
            _client_error("ThrottlingException"), _client_error("InternalFailure", 500),
            EndpointConnectionError(endpoint_url="http://x")]
        h.start(self)
        self.assertEqual(h.shipper.errors, 1)
        self.assertIn("ThrottlingException", h.shipper.health_check()[1])
        h.clock.advance(5)  # round at 5s: retry at 0.5s passed -> 500 -> retry in 1s
        self.assertEqual(h.shipper.errors, 2)
        h.clock.advance(5)  # connection error -> retry in 2s
        self.assertEqual(h.shipper.errors, 3)
        self.assertEqual(h.logs.messages("j-stdout"), [])
        h.clock.advance(5)
        self.assertEqual(h.logs.messages("j-stdout"), ["line 0\n", "line 1\n", "line 2\n"])
        self.assertEqual(h.shipper.health_check()[1], "shipping")

    def test_a_refused_stream_waits_and_the_others_go_on(self):
        """An error that is not retryable (InvalidParameterException) is counted and
        reported; that stream is retried later, the other streams are shipped meanwhile."""
        h = Harness(self)
        h.storage.put("a", {SegmentKind.STDOUT: [(0, _logs(1, 2))]})
        h.storage.put("b", {SegmentKind.STDOUT: [(0, _logs(1, 2))]})
        h.logs.fail["put_log_events"] = [_client_error("InvalidParameterException")]
        h.start(self)
        self.assertEqual(h.logs.messages("a-stdout"), [])
        self.assertEqual(h.logs.messages("b-stdout"), ["line 0\n", "line 1\n"])
        self.assertEqual(h.shipper.errors, 1)
        ok, detail, extra = h.shipper.health_check()
        self.assertIn("InvalidParameterException", detail)
        self.assertIn("a-stdout", detail)
        self.assertEqual(extra["blocked_streams"], 1)
        self.assertFalse(h.shipper.segment_archived("a", SegmentKind.STDOUT, 0))
        h.clock.advance(5)
        self.assertEqual(h.logs.messages("a-stdout"), ["line 0\n", "line 1\n"])
        self.assertTrue(h.shipper.segment_archived("a", SegmentKind.STDOUT, 0))
        self.assertEqual(h.shipper.health_check()[1], "shipping")

    def test_out_of_range_messages_stay_local_and_are_counted(self):
        """15-day-old and 3-hour-future messages are not sent, counted, and the segments
        holding them are never reported archived (retention keeps them)."""
        h = Harness(self)
        h.storage.put("j", {SegmentKind.STDOUT: [
            (0, [_log(1, 0, ts=NOW_NS - 15 * DAY_NS)]),
            (1, [_log(1, 1), _log(1, 2, ts=NOW_NS + 3 * 3600 * 10**9), _log(1, 3)]),
            (2, [_log(1, 4)]),
        ]})
        h.start(self)
        self.assertEqual(h.logs.messages("j-stdout"), ["line 1\n", "line 3\n", "line 4\n"])
        self.assertEqual(h.shipper.out_of_range, 2)
        self.assertEqual([h.shipper.segment_archived("j", SegmentKind.STDOUT, i)
                          for i in range(3)], [False, False, True])
        self.assertEqual(h.cursor_file()["kept"], {"j": {"stdout": [0, 1]}})

    def test_routes(self):
        """``close`` ships closed segments only until the job is idle, ``idle`` nothing
        until then, ``never`` nothing at all (and counts as taken for retention)."""
        h = Harness(self, cfg=_cfg("    routes: {logs: close, metrics: idle, events: never}\n"))
        h.storage.put("j", {
            SegmentKind.STDOUT: [(0, _logs(1, 2)), (1, _logs(1, 1, 2))],
            SegmentKind.METRICS: [(0, [_sample(0)])],
            SegmentKind.EXEC_EVENTS: [(0, [StoredEvent(NOW_NS, 1, {})])],
        }, last_updated=int(WALL0))
        h.start(self)
        self.assertEqual(h.logs.messages("j-stdout"), ["line 0\n", "line 1\n"])
        self.assertEqual(h.logs.messages("j-metrics"), [])
        self.assertEqual(h.shipper.backlog_messages, 0)  # held back by the route: not late
        self.assertFalse(h.shipper.segment_archived("j", SegmentKind.STDOUT, 1))
        self.assertTrue(h.shipper.segment_archived("j", SegmentKind.EXEC_EVENTS, 0))
        h.clock.advance(305)  # idle now
        self.assertEqual(h.logs.messages("j-stdout"), ["line 0\n", "line 1\n", "line 2\n"])
        self.assertEqual(len(h.logs.messages("j-metrics")), 1)
        self.assertEqual(h.logs.messages("j-exec-events"), [])
        self.assertEqual(h.shipper.backlog_messages, 0)

    def test_health_degrades_past_the_backlog_threshold(self):
        """While CloudWatch is down the backlog is measured; past the threshold health
        turns unhealthy naming the key, and recovers once it is shipped."""
        h = Harness(self, cfg=_cfg("    backlogUnhealthyMessages: 3\n"))
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 5))]})
        h.logs.fail["create_log_group"] = [_client_error("ServiceUnavailableException", 503)]
        h.start(self)
        ok, detail, extra = h.shipper.health_check()
        self.assertFalse(ok)
        self.assertIn("archive.cloudwatch.backlogUnhealthyMessages", detail)
        self.assertEqual(extra["backlog_messages"], 5)
        h.clock.advance(5)
        self.assertTrue(h.shipper.health_check()[0])

    def test_delete_job_is_durable_then_removes_the_streams(self):
        """DeleteJob records the deletion in the cursor file before answering; the next
        round deletes the job's streams (not another job's whose id shares a prefix)."""
        h = Harness(self)
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 1))],
                            SegmentKind.STDERR: [(0, _logs(2, 1))]})
        h.storage.put("j-2", {SegmentKind.STDOUT: [(0, _logs(1, 1))]})
        h.start(self)
        del h.storage.jobs["j"]
        self.successResultOf(h.shipper.delete_job("j"))
        self.assertIn("j", h.cursor_file()["deletes"])
        self.assertNotIn("j", h.cursor_file()["streams"])
        h.logs.fail["describe_log_streams"] = [_client_error("ThrottlingException")]
        h.clock.advance(5)
        self.assertIn(("/joblet/node-a/jobs", "j-stdout"), h.logs.streams)
        h.clock.advance(5)
        self.assertEqual(sorted(s for _g, s in h.logs.streams), ["j-2-stdout"])
        self.assertEqual(h.cursor_file()["deletes"], {})
        self.assertIn("PutMetricData cannot be deleted", h.shipper.delete_note)

    def test_a_job_started_afresh_after_local_removal_is_shipped(self):
        """When local retention removed a whole job and new data starts it again (a later
        created_at, segment 0 again), the new messages are shipped after the old ones."""
        h = Harness(self)
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 3))]})
        h.start(self)
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 2, 10))]},
                      last_updated=int(WALL0) + 10)
        h.storage.jobs["j"].info = dataclasses.replace(h.storage.jobs["j"].info,
                                                       created_at=int(WALL0))
        h.clock.advance(5)
        self.assertEqual(h.logs.messages("j-stdout"),
                         ["line 0\n", "line 1\n", "line 2\n", "line 10\n", "line 11\n"])

    def test_is_an_archived_check(self):
        """The shipper is retention's IArchivedCheck: a part is taken once every message
        of it is shipped and the job was not written since."""
        h = Harness(self)
        self.assertTrue(IArchivedCheck.providedBy(h.shipper))
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 2))]})
        self.assertFalse(h.shipper.part_archived("j", Part.LOGS))
        h.start(self)
        self.assertTrue(h.shipper.part_archived("j", Part.LOGS))


# -- the reader ---------------------------------------------------------------------------------


class ReaderTests(SynchronousTestCase):
    def _shipped(self, data):
        h = Harness(self)
        h.storage.put("j", data)
        h.start(self)
        return h, CloudWatchReader(h.logs, GROUP, page_events=2)

    def test_round_trip_with_paging_offset_and_limit(self):
        """Read back page by page until the forward token repeats: one record per stored
        message with split content joined, ms timestamps, per-stream positions; both
        streams merged by timestamp; offset and limit exactly as the contract says."""
        big = bytes(range(256)) * 1200
        out = [_log(1, 0), _log(1, 1, content=big), _log(1, 2, content=b"")]
        err = [_log(2, 5, content=b"\xff\n")]
        h, reader = self._shipped({SegmentKind.STDOUT: [(0, out)], SegmentKind.STDERR: [(0, err)]})
        got = list(reader.iter_logs("j", 0))
        ms = lambda ns: ns // 10**6 * 10**6  # noqa: E731
        self.assertEqual(got, [
            LogRecord(1, ms(out[0].timestamp), 1, b"line 0\n"),
            LogRecord(1, ms(out[1].timestamp), 2, big),
            LogRecord(1, ms(out[2].timestamp), 3, b""),
            LogRecord(2, ms(err[0].timestamp), 1, b"\xff\n"),
        ])
        self.assertEqual(list(reader.iter_logs("j", 1, offset=1, limit=1)), [got[1]])
        self.assertEqual(list(reader.iter_logs("j", 0, start_time=got[1].timestamp,
                                                end_time=got[2].timestamp)), got[1:3])
        tokens = [c[1]["nextToken"] for c in h.logs.calls if c[0] == "get_log_events"]
        self.assertIn(None, tokens)
        self.assertEqual(list(reader.iter_logs("unknown", 0)), [])

    def test_snapshot_gives_metrics_and_events_back_exactly(self):
        """The IJobSnapshot over CloudWatch returns samples and events with their ns
        timestamps, sequences and data."""
        samples = [_sample(0), _sample(1)]
        event = StoredEvent(NOW_NS - 3, 4, {"pid": 7})
        _h, reader = self._shipped({SegmentKind.METRICS: [(0, samples)],
                                    SegmentKind.EXEC_EVENTS: [(0, [event])]})
        snap = CloudWatchJobSnapshot(reader, "j", None)
        self.assertTrue(IJobSnapshot.providedBy(snap))
        self.assertEqual(list(snap.iter_metrics()), samples)
        self.assertEqual(list(snap.iter_metrics(offset=1)), samples[1:])
        self.assertEqual(list(snap.iter_events("exec")), [event])
        self.assertTrue(reader.has_job("j"))
        self.assertFalse(reader.has_job("k"))


# -- configuration ---------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    def test_defaults(self):
        """Omitted keys take their documented defaults; off unless enabled."""
        cw = config_from_string("").archive.cloudwatch
        self.assertFalse(cw.enabled)
        self.assertEqual((cw.log_group_prefix, cw.metric_namespace, cw.interval, cw.retention_days),
                         ("/joblet", "Joblet/Jobs", 5.0, 0))
        self.assertEqual(dataclasses.asdict(cw.routes), {"logs": "durable", "metrics": "durable",
                                           "events": "durable"})

    def test_errors_name_the_key_and_file(self):
        """Unknown keys, wrong types and bad routes are errors naming key and file."""
        cases = {
            "archive:\n  cloudwatch:\n    bogus: 1\n": "archive.cloudwatch.bogus",
            "archive:\n  cloudwatch:\n    routes: {logs: soon}\n": "archive.cloudwatch.routes.logs",
            "archive:\n  cloudwatch:\n    routes: {traces: durable}\n":
                "archive.cloudwatch.routes.traces",
            "archive:\n  cloudwatch:\n    retentionDays: 2\n": "archive.cloudwatch.retentionDays",
            "archive:\n  cloudwatch:\n    interval: fast\n": "archive.cloudwatch.interval",
            "archive:\n  cloudwatch:\n    enabled: true\n": "server.nodeId",
            "archive:\n  cloudwatch:\n    metricDimensions: {NodeID: x}\n":
                "archive.cloudwatch.metricDimensions",
            # Reading what is gone locally from both CloudWatch and the S3 archive.
            "server: {nodeId: n1}\nstorage: {backend: cloudwatch}\narchive:\n"
            "  cloudwatch: {enabled: true}\n  s3: {enabled: true, bucket: b}\n":
                "storage.backend",
        }
        for text, key in cases.items():
            with self.assertRaises(ConfigError) as e:
                config_from_string(text, source="cw.yml")
            self.assertIn("cw.yml", str(e.exception))
            self.assertEqual(e.exception.key, key, text)

    def test_names(self):
        """Group and stream names follow upstream's layout."""
        self.assertEqual(api.log_group("/joblet/", "n"), "/joblet/n/jobs")
        self.assertEqual([api.stream_name("j", k) for k in SegmentKind][:4],
                         ["j-stdout", "j-stderr", "j-metrics", "j-exec-events"])
        self.assertTrue(os.path.basename(cursor_path("/d")).endswith(".json"))


# -- the long-term store tier -------------------------------------------------------------


class TierTests(SynchronousTestCase):
    def _tier(self, local_parts: dict):
        """A tier over a fake local backend whose job "j" has ``local_parts`` data, and a
        shipper that shipped j's logs, metrics and one exec event (summary kept)."""
        from zope.interface import implementer

        from joblet_persist.archive.cloudwatch_tier import CloudWatchTier, TieredSnapshot
        from joblet_persist.storage.api import IFreeSpace, IStorageBackend

        h = Harness(self)
        h.storage.put("j", {SegmentKind.STDOUT: [(0, _logs(1, 2))],
                            SegmentKind.METRICS: [(0, [_sample(0)])],
                            SegmentKind.EXEC_EVENTS: [(0, [StoredEvent(NOW_NS, 1, {})])]})
        full = dataclasses.replace(h.storage.jobs["j"].info, log_count=2, metric_count=1,
                                   exec_events=1)
        h.storage.jobs["j"].info = full
        h.start(self)
        now = dataclasses.replace(full, **local_parts)

        @implementer(IStorageBackend, IFreeSpace)
        class Local:
            def snapshot(self, job_id):
                return FakeSnapshot("j", now, {}) if job_id == "j" else None

            def job_info(self, job_id):
                return now if job_id == "j" else None

            def open_job(self, job_id):
                return defer.succeed(self.snapshot(job_id))

        tier = CloudWatchTier(Local())
        tier.attach(h.shipper)
        return tier, TieredSnapshot

    def test_parts_gone_locally_are_read_from_cloudwatch(self):
        """The tier provides what the local backend provides; with the logs part gone
        locally, snapshot() defers to open_job, which hands out a snapshot reading the
        logs from CloudWatch and the metrics locally; job_info keeps the logs' count."""
        from joblet_persist.storage.api import IFreeSpace, IStorageBackend

        tier, tiered = self._tier({"log_count": 0})
        self.assertTrue(IStorageBackend.providedBy(tier) and IFreeSpace.providedBy(tier))
        self.assertIsNone(tier.snapshot("j"))
        snap = self.successResultOf(tier.open_job("j"))
        self.assertIsInstance(snap, tiered)
        self.assertEqual([r.content for r in snap.iter_logs(1)], [b"line 0\n", b"line 1\n"])
        self.assertEqual(list(snap.iter_metrics()), [])  # the (empty) local copy
        self.assertEqual((snap.info.log_count, snap.info.metric_count), (2, 1))
        self.assertEqual(tier.job_info("j").log_count, 2)

    def test_whole_job_gone_and_all_local(self):
        """A job held only in CloudWatch is opened from there with its kept summary; a job
        whose every part is local is the local backend's exactly."""
        from joblet_persist.archive.cloudwatch_read import CloudWatchJobSnapshot

        tier, _ = self._tier({})
        self.assertIsNotNone(tier.snapshot("j"))
        self.assertNotIsInstance(self.successResultOf(tier.open_job("j")), CloudWatchJobSnapshot)
        tier._local.snapshot = lambda job_id: None
        tier._local.open_job = lambda job_id: defer.succeed(None)
        tier._local.job_info = lambda job_id: None
        snap = self.successResultOf(tier.open_job("j"))
        self.assertIsInstance(snap, CloudWatchJobSnapshot)
        self.assertEqual(snap.info.log_count, 2)
        self.assertEqual([e.sequence for e in snap.iter_events("exec")], [1])
        self.assertEqual(tier.job_info("j").metric_count, 1)
        self.assertIsNone(tier.job_info("other"))

    def test_kept_summary_survives_a_dropped_part(self):
        """The shipper's kept summary keeps a part's counts when local retention drops it."""
        from joblet_persist.archive.cloudwatch_tier import merge_job_info

        old = dataclasses.asdict(JobInfo("j", 10, 20, 5, 3, 100, 1000, 2000, exec_events=2))
        new = JobInfo("j", 10, 30, 0, 4, 50, 1500, 3000)
        merged = merge_job_info(old, new)
        self.assertEqual((merged["log_count"], merged["metric_count"], merged["exec_events"]),
                         (5, 4, 2))
        self.assertEqual((merged["first_timestamp"], merged["last_timestamp"]), (1000, 3000))
