"""Tests for reading files of the older Go service (joblet_persist.storage.legacy)."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import struct
import zlib

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist._proto import ipc_pb2
from joblet_persist.storage import format as fmt
from joblet_persist.storage.api import LogRecord, MetricRecord, ReadStats
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.legacy import (
    LEGACY_ORDINAL_BASE,
    parse_legacy_log_member,
    parse_legacy_metric_member,
)
from joblet_persist.storage.reader import SegmentView, iter_logs, iter_metrics
from joblet_persist.storage.segment import thd_append, thd_scan_segment

GO_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # what Go's gzip.NewWriter emits


def go_member(lines) -> bytes:
    """One gzip member as Go's compress/gzip writes it, holding JSON lines."""
    data = b"".join(json.dumps(obj, separators=(",", ":")).encode() + b"\n" for obj in lines)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return GO_HEADER + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def go_log(stream, ts, seq, content, key="job_uuid") -> dict:
    """A log line as Go's json.Marshal of the LogLine struct (omitempty) writes it."""
    obj = {key: "job-1"}
    if stream:
        obj["stream"] = stream
    if ts:
        obj["timestamp"] = ts
    if seq:
        obj["sequence"] = seq
    if content:
        obj["content"] = base64.b64encode(content).decode()
    return obj


def write(path, blob):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)


def views(path):
    return (SegmentView(path, thd_scan_segment(path, False).members),)


class ParseTests(SynchronousTestCase):
    """The liberal JSON-line parsers."""

    def test_log_lines(self):
        """Both id spellings, omitted zero fields, stream names and bad lines are handled."""
        data = b"".join(
            [
                b'{"job_id":"j","stream":1,"timestamp":5,"sequence":1,"content":"aGkK"}\n',
                b'{"job_uuid":"j","stream":2,"timestamp":6,"content":"AP8="}\n',
                b'{"job_uuid":"j","stream":"STREAM_TYPE_STDERR","timestamp":"7"}\n',
                b"not json at all\n",
                b"[1,2,3]\n",
                b"\n",
                b'{"jobId":"j","Stream":"stdout","Timestamp":"1970-01-01T00:00:01.5Z",'
                b'"content":"plain text, not base64!"}\n',
                b'{"stream":1,"timestamp":{"seconds":2,"nanos":3},"sequence":"9","content":""}',
            ]
        )
        self.assertEqual(
            parse_legacy_log_member(data),
            [
                (1, 5, 1, b"hi\n"),
                (2, 6, 0, b"\x00\xff"),
                (2, 7, 0, b""),
                (1, 1_500_000_000, 0, b"plain text, not base64!"),
                (1, 2_000_000_003, 9, b""),
            ],
        )

    def test_metric_lines(self):
        """snake_case, camelCase, flat and string-valued metric lines normalize alike."""
        full = {
            "cpu_usage": 1.5,
            "memory_usage": 2048,
            "gpu_usage": 0.0,
            "disk_io": {"read_bytes": 1, "write_bytes": 2, "read_ops": 3, "write_ops": 4},
            "network_io": {"rx_bytes": 5, "tx_bytes": 6, "rx_packets": 7, "tx_packets": 8},
        }
        lines = [
            {"job_uuid": "j", "timestamp": 10, "sequence": 1, "data": full},
            {"jobId": "j", "timestamp": "11", "sequence": "2", "data": {
                "cpuUsage": 1.5, "memoryUsage": "2048", "gpuUsage": 0,
                "diskIO": {"readBytes": 1, "writeBytes": 2, "readOps": 3, "writeOps": 4},
                "networkIo": {"rxBytes": 5, "txBytes": 6, "rxPackets": 7, "txPackets": 8},
            }},
            {"job_id": "j", "timestamp": 12, "sequence": 3, **full},
            {"timestamp": 13},
        ]  # fmt: skip
        data = b"\n".join(json.dumps(x).encode() for x in lines)
        got = parse_legacy_metric_member(data)
        self.assertEqual([g["timestamp"] for g in got], [10, 11, 12, 13])
        self.assertEqual([g["sequence"] for g in got], [1, 2, 3, 0])
        self.assertEqual([g["job_uuid"] for g in got], ["j", "j", "j", ""])
        for g in got[:3]:
            self.assertEqual(g["data"], full)
        self.assertEqual(got[3]["data"]["disk_io"]["read_ops"], 0)
        self.assertEqual(got[3]["data"]["cpu_usage"], 0.0)
        # The normalized shape is exactly what this service writes itself.
        ours = json.loads(fmt.metric_json_line("", ipc_pb2.Metric(timestamp=13).SerializeToString()))
        self.assertEqual(got[3], ours)


class LegacyFileTests(SynchronousTestCase):
    """Go-written files: scanned, queried, extended by this service."""

    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "logs", "job-1")
        self.out_path = os.path.join(self.dir, "stdout.log.gz")
        self.err_path = os.path.join(self.dir, "stderr.log.gz")
        # Go flushed both files on every batch, so empty members are common.
        out_batches = [
            [go_log(1, 100, 1, b"o1\n"), go_log(1, 100, 2, b"o2\n", key="job_id")],
            [],
            [go_log(1, 102, 5, b""), go_log(1, 103, 6, b"o4\n")],
        ]
        err_batches = [[go_log(2, 101, 3, b"e1\n")], [go_log(2, 101, 4, b"\x00e2")], []]
        write(self.out_path, b"".join(go_member(b) for b in out_batches))
        write(self.err_path, b"".join(go_member(b) for b in err_batches))
        self.streams = {1: views(self.out_path), 2: views(self.err_path)}

    def test_scan(self):
        """Members without a JP subfield are legacy, counted, with file-relative ordinals."""
        result = thd_scan_segment(self.out_path, True)
        self.assertFalse(result.truncated)
        self.assertEqual([m.kind for m in result.members], [fmt.KIND_LEGACY] * 3)
        self.assertEqual([m.count for m in result.members], [2, 0, 2])
        first, empty, last = result.members
        self.assertEqual((first.first_ordinal, first.last_ordinal), (LEGACY_ORDINAL_BASE, LEGACY_ORDINAL_BASE + 1))
        self.assertEqual(last.first_ordinal, LEGACY_ORDINAL_BASE + 2)
        self.assertEqual((last.min_timestamp, last.max_timestamp), (102, 103))
        self.assertEqual((last.first_sequence, last.last_sequence), (5, 6))
        self.assertEqual(result.valid_size, os.path.getsize(self.out_path))

    def test_query_each_stream_and_merged(self):
        """Each stream reads in file order; stream 0 merges them by (timestamp, sequence)."""
        out = [LogRecord(1, 100, 1, b"o1\n"), LogRecord(1, 100, 2, b"o2\n"),
               LogRecord(1, 102, 5, b""), LogRecord(1, 103, 6, b"o4\n")]  # fmt: skip
        err = [LogRecord(2, 101, 3, b"e1\n"), LogRecord(2, 101, 4, b"\x00e2")]
        self.assertEqual(list(iter_logs(self.streams, 1)), out)
        self.assertEqual(list(iter_logs(self.streams, 2)), err)
        merged = out[:2] + err + out[2:]
        self.assertEqual(list(iter_logs(self.streams, 0)), merged)
        self.assertEqual(list(iter_logs(self.streams, 0, offset=1, limit=3)), merged[1:4])
        self.assertEqual(list(iter_logs(self.streams, 0, start_time=101, end_time=102)), merged[2:5])

    def test_empty_members_are_not_inflated(self):
        """Empty legacy members are passed over by their count."""
        stats = ReadStats()
        list(iter_logs(self.streams, 0, stats=stats))
        self.assertEqual(stats.members_inflated, 4)
        self.assertEqual(stats.members_skipped, 2)

    def test_one_file_with_both_streams(self):
        """A single legacy file holding both streams serves each stream once."""
        path = os.path.join(self.dir, "both.log.gz")
        write(path, go_member([go_log(1, 1, 1, b"a"), go_log(2, 2, 2, b"b"), go_log(0, 3, 3, b"c")]))
        only_stdout = {1: views(path)}
        self.assertEqual(
            list(iter_logs(only_stdout, 2)), [LogRecord(2, 2, 2, b"b")]
        )
        # A record without a stream belongs to the stream the file is listed under.
        self.assertEqual([r.content for r in iter_logs(only_stdout, 1)], [b"a", b"c"])
        both = {1: views(path), 2: views(path)}
        self.assertEqual([r.content for r in iter_logs(both, 0)], [b"a", b"b", b"c"])
        self.assertEqual([r.stream for r in iter_logs(both, 0)], [1, 2, 1])

    def test_upgrade_appends_new_members_after_legacy_ones(self):
        """This service appends to a Go file; legacy data stays first and readable."""
        scan = thd_scan_segment(self.out_path, True)
        comp = make_compressor("zlib", 6)
        pieces = fmt.encode_log_members([200, 201], [0, 1], [0, 1], [b"n1\n", b"n2\n"], comp)
        blob = b"".join(p for p, _ in pieces)
        thd_append(self.out_path, blob, scan.valid_size, True)
        rescan = thd_scan_segment(self.out_path, False)
        self.assertEqual(rescan.members[:3], scan.members)
        self.assertEqual(rescan.members[3], dataclasses.replace(pieces[0][1], offset=scan.valid_size))
        streams = {1: (SegmentView(self.out_path, rescan.members),), 2: self.streams[2]}
        got = list(iter_logs(streams, 1, offset=3))
        self.assertEqual(got, [LogRecord(1, 103, 6, b"o4\n"), LogRecord(1, 200, 0, b"n1\n"),
                               LogRecord(1, 201, 1, b"n2\n")])  # fmt: skip
        merged = [r.content for r in iter_logs(streams, 0, limit=7)]
        self.assertEqual(merged, [b"o1\n", b"o2\n", b"e1\n", b"\x00e2", b"", b"o4\n", b"n1\n"])
        # zcat shows the Go JSON lines followed by the raw new bytes.
        with gzip.open(self.out_path) as g:
            self.assertTrue(g.read().endswith(b'"content":"bzQK"}\nn1\nn2\n'))

    def test_torn_legacy_tail_is_cut(self):
        """A Go member cut short by a crash at the end of the file is the torn tail."""
        good = os.path.getsize(self.out_path)
        torn = go_member([go_log(1, 500, 9, b"lost" * 100)])
        with open(self.out_path, "ab") as f:
            f.write(torn[: len(torn) // 2])
        result = thd_scan_segment(self.out_path, True)
        self.assertTrue(result.truncated)
        self.assertEqual(os.path.getsize(self.out_path), good)
        self.assertEqual(len(result.members), 3)

    def test_torn_legacy_member_in_the_middle(self):
        """Go appended after a torn member on restart: the later members are still read."""
        torn = go_member([go_log(1, 50, 1, b"partial" * 50)])
        blob = (
            go_member([go_log(1, 10, 1, b"before\n")])
            + torn[: len(torn) - 30]
            + go_member([go_log(1, 60, 1, b"after\n")])
        )
        path = os.path.join(self.dir, "torn.log.gz")
        write(path, blob)
        result = thd_scan_segment(path, True)
        self.assertFalse(result.truncated)
        self.assertEqual(len(result.holes), 1)
        got = list(iter_logs({1: (SegmentView(path, result.members),)}, 1))
        self.assertEqual([r.content for r in got], [b"before\n", b"after\n"])


class LegacyMetricTests(SynchronousTestCase):
    """Go metric files read through iter_metrics."""

    def test_go_metrics_then_new_metrics(self):
        """Legacy samples (snake or camel keys) come first, then samples we wrote."""
        path = os.path.join(self.mktemp(), "metrics", "job-1", "metrics.jsonl.gz")
        go = [
            {"job_uuid": "job-1", "timestamp": 1_700_000_000_000_000_001, "sequence": 1,
             "data": {"cpu_usage": 5.5, "memory_usage": 100, "disk_io": {"read_bytes": 7}}},
            {"jobId": "job-1", "timestamp": 1_700_000_000_000_000_002, "sequence": 2,
             "data": {"cpuUsage": 6.5, "networkIO": {"rxBytes": 9}}},
        ]  # fmt: skip
        write(path, go_member(go[:1]) + go_member([]) + go_member(go[1:]))
        scan = thd_scan_segment(path, True)
        line = fmt.metric_json_line(
            "job-1",
            ipc_pb2.Metric(
                timestamp=1_700_000_000_000_000_003, sequence=3,
                data=ipc_pb2.MetricData(cpu_usage=7.5),
            ).SerializeToString(),
        )  # fmt: skip
        pieces = fmt.encode_metric_members(
            [1_700_000_000_000_000_003], [3], [0], [line], make_compressor("zlib", 6)
        )
        thd_append(path, pieces[0][0], scan.valid_size, False)
        segments = (SegmentView(path, thd_scan_segment(path, False).members),)
        got = list(iter_metrics(segments))
        self.assertEqual([(r.timestamp, r.sequence) for r in got],
                         [(1_700_000_000_000_000_001, 1), (1_700_000_000_000_000_002, 2),
                          (1_700_000_000_000_000_003, 3)])  # fmt: skip
        self.assertEqual([r.data["cpu_usage"] for r in got], [5.5, 6.5, 7.5])
        self.assertEqual(got[0].data["disk_io"]["read_bytes"], 7)
        self.assertEqual(got[1].data["network_io"]["rx_bytes"], 9)
        self.assertEqual(got[1].data["memory_usage"], 0)
        self.assertEqual(
            list(iter_metrics(segments, offset=1, limit=1)),
            [MetricRecord(got[1].timestamp, 2, got[1].data)],
        )
        self.assertEqual(
            list(iter_metrics(segments, start_time=1_700_000_000_000_000_002)), got[1:]
        )


class LegacyEventTests(SynchronousTestCase):
    def test_go_events_then_new_events(self):
        """Event files of the older Go service (plain gzip JSON lines, Go's keys, zero values
        omitted) read first, then events this service appended, with range/offset/limit;
        the query message reads Go's lines."""
        from joblet_persist import events
        from joblet_persist.storage.reader import iter_events

        kind = events.KINDS_BY_NAME["connect"]
        path = os.path.join(self.mktemp(), "events", "job-1", kind.segment_name(0))
        go = [
            {"job_uuid": "job-1", "timestamp": 1_700_000_000_000_000_001, "sequence": 1,
             "pid": 7, "comm": "curl", "dst_addr": "10.0.0.1", "dst_port": 443},
            {"job_uuid": "job-1", "timestamp": 1_700_000_000_000_000_002, "sequence": 2,
             "srcAddr": "10.0.0.9"},
        ]  # fmt: skip
        write(path, go_member(go[:1]) + go_member(go[1:]))
        scan = thd_scan_segment(path, True)
        payload = ipc_pb2.ConnectEvent(pid=9, comm="wget").SerializeToString()
        line = events.payload_json_line(kind, payload, "job-1", 1_700_000_000_000_000_003, 3)
        pieces = fmt.encode_event_members(
            kind.msg_type, [1_700_000_000_000_000_003], [3], [0], [line],
            make_compressor("zlib", 6),
        )
        thd_append(path, pieces[0][0], scan.valid_size, False)
        segments = (SegmentView(path, thd_scan_segment(path, False).members),)
        got = list(iter_events(segments, kind.msg_type))
        self.assertEqual([(r.timestamp, r.sequence) for r in got],
                         [(1_700_000_000_000_000_001, 1), (1_700_000_000_000_000_002, 2),
                          (1_700_000_000_000_000_003, 3)])  # fmt: skip
        messages = [events.event_message(kind, r.data, "job-1") for r in got]
        self.assertEqual([(m.pid, m.comm, m.dst_port) for m in messages],
                         [(7, "curl", 443), (0, "", 0), (9, "wget", 0)])
        self.assertEqual(messages[1].src_addr, "10.0.0.9")
        self.assertEqual(
            [r.sequence for r in iter_events(segments, kind.msg_type, offset=1, limit=1)], [2]
        )
        self.assertEqual(
            [r.sequence for r in iter_events(segments, kind.msg_type,
                                             start_time=1_700_000_000_000_000_002)], [2, 3]
        )
