"""Tests for joblet_persist.ingest: framing, validation, rejections, connection management."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from joblet_persist import events
from joblet_persist._proto import ipc_pb2
from joblet_persist.ingest import (
    IIngestMetrics,
    IngestFactory,
    IngestProtocol,
    NullIngestMetrics,
    RejectionLog,
)
from joblet_persist.storage.api import is_valid_job_id
from joblet_persist.writer import IIngestWriter, WriterStopped

JOB = "0b7c6a1e-3f7e-4d2a-9c1b-123456789abc"
JOB2 = "job-2"


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def envelope(msg_type, job=JOB, data=b"", timestamp=0, sequence=0) -> bytes:
    return ipc_pb2.IPCMessage(
        version=1, type=msg_type, job_uuid=job, timestamp=timestamp, sequence=sequence, data=data
    ).SerializeToString()


def log_body(content=b"hello\n", stream=1, job=JOB, ts=1_700_000_000_000_000_000, seq=1,
             payload_job=None) -> bytes:
    line = ipc_pb2.LogLine(
        job_uuid=job if payload_job is None else payload_job,
        stream=stream,
        timestamp=ts,
        sequence=seq,
        content=content,
    )
    # Envelope values differ from the payload's (which are the ones stored), staying in range.
    env_ts = ts - 5 if ts > 0 else ts + 5
    env_seq = seq - 5 if seq >= 5 else seq + 5
    return envelope(1, job, line.SerializeToString(), env_ts, env_seq)


def metric_body(job=JOB, ts=1_700_000_000_000_000_000, seq=3, env_ts=11, env_seq=12,
                cpu=12.5) -> tuple[bytes, bytes]:
    payload = ipc_pb2.Metric(
        job_uuid="ignored", timestamp=ts, sequence=seq,
        data=ipc_pb2.MetricData(cpu_usage=cpu, memory_usage=1 << 40),
    ).SerializeToString()
    return envelope(2, job, payload, env_ts, env_seq), payload


@implementer(IIngestWriter)
class RecordingWriter:
    """Records what the protocol hands over; ``stopped`` makes add_* raise WriterStopped."""

    def __init__(self):
        self.calls = []
        self.stopped = False

    def add_log(self, job_id, stream, timestamp, sequence, content):
        if self.stopped:
            raise WriterStopped("stopping")
        self.calls.append(("log", job_id, stream, timestamp, sequence, content))

    def add_metric(self, job_id, timestamp, sequence, payload):
        if self.stopped:
            raise WriterStopped("stopping")
        self.calls.append(("metric", job_id, timestamp, sequence, payload))

    def add_event(self, job_id, kind, timestamp, sequence, payload):
        if self.stopped:
            raise WriterStopped("stopping")
        self.calls.append(("event", job_id, kind, timestamp, sequence, payload))


class FakeSocket:
    """The socket behind a SocketTransport: records ``shutdown(how)`` calls."""

    def __init__(self):
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)


class SocketTransport(StringTransport):
    """A StringTransport with a socket (``getHandle``), so that ``disconnect_all`` drains it
    (read side shut down, reading resumed) instead of closing it at once.

    ``loseConnection`` closes at once: it records the ``clock`` time in ``closed_at`` and
    runs the protocol's ``connectionLost``, as the reactor would once the (empty) write
    buffer is flushed.  ``peer_closed()`` is the peer's end of file.
    """

    def __init__(self, clock):
        super().__init__()
        self.socket = FakeSocket()
        self.clock = clock
        self.closed_at = None
        self.protocol = None

    def getHandle(self):
        return self.socket

    def loseConnection(self):
        if self.disconnecting:
            return
        super().loseConnection()
        self.closed_at = self.clock.seconds()
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def peer_closed(self):
        """The peer closed its end: the protocol's connectionLost, without loseConnection."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class RecordingMetrics:
    def __init__(self):
        self.received: dict[int, int] = {}
        self.received_bytes = 0
        self.rejected: list[str] = []
        self.events_rejected: list[tuple[str, str]] = []
        self.connections = 0

    def frame_received(self, msg_type, nbytes):
        self.received[msg_type] = self.received.get(msg_type, 0) + 1
        self.received_bytes += nbytes

    def frames_received(self, counts, nbytes):
        for msg_type, n in counts.items():
            self.received[msg_type] = self.received.get(msg_type, 0) + n
        self.received_bytes += nbytes

    def frame_rejected(self, reason):
        self.rejected.append(reason)

    def event_rejected(self, kind, reason):
        self.events_rejected.append((kind, reason))

    def connection_opened(self):
        self.connections += 1

    def connection_closed(self):
        self.connections -= 1

    def set_partial_budget(self, budget):
        self.budget = budget


class IngestTestMixin:
    def setUp(self):
        self.clock = task.Clock()
        self.writer = RecordingWriter()
        self.metrics = RecordingMetrics()

    def make_factory(self, **kwargs):
        kwargs.setdefault("max_frame_bytes", 1 << 20)
        return IngestFactory(self.writer, self.metrics, self.clock, **kwargs)

    def connect(self, factory=None):
        factory = factory if factory is not None else self.make_factory()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def connect_socket(self, factory):
        """A connection whose transport has a socket (SocketTransport)."""
        proto = factory.buildProtocol(None)
        transport = SocketTransport(self.clock)
        transport.protocol = proto
        proto.makeConnection(transport)
        return proto, transport

    def feed(self, data: bytes, splits=(), factory=None):
        """Deliver ``data`` cut at the given offsets on a fresh connection."""
        proto, transport = self.connect(factory)
        last = 0
        for cut in sorted(set(splits)):
            proto.dataReceived(data[last:cut])
            last = cut
        proto.dataReceived(data[last:])
        return proto, transport


def reference(bodies: list[bytes]):
    """What the rules in ingest's docstring say should happen to each frame: an oracle
    written the straightforward way (two plain parses per frame)."""
    calls, rejected = [], []
    for body in bodies:
        try:
            env = ipc_pb2.IPCMessage.FromString(body)
        except Exception:
            rejected.append("bad_envelope")
            continue
        if env.type in (1, 2):
            if not is_valid_job_id(env.job_uuid):
                rejected.append("invalid_job_id")
                continue
            try:
                payload = (ipc_pb2.LogLine if env.type == 1 else ipc_pb2.Metric).FromString(
                    env.data
                )
            except Exception:
                rejected.append("bad_payload")
                continue
            if env.type == 1:
                if payload.stream not in (1, 2):
                    rejected.append("invalid_stream")
                    continue
                calls.append(("log", env.job_uuid, payload.stream, payload.timestamp,
                              payload.sequence, payload.content))
            else:
                ts, seq = payload.timestamp, payload.sequence
                if not ts:
                    ts, seq = env.timestamp, env.sequence
                calls.append(("metric", env.job_uuid, ts, seq, env.data))
        elif 3 <= env.type <= 9:
            if not is_valid_job_id(env.job_uuid):
                rejected.append("invalid_job_id")
                continue
            try:
                kind, ts, seq = events.check_event(
                    env.type, env.data, env.job_uuid, env.timestamp, env.sequence
                )
            except events.EventDecodeError as e:
                rejected.append(e.reason)
                continue
            calls.append(("event", env.job_uuid, kind.name, ts, seq, env.data))
        else:
            rejected.append("unknown_type")
    return calls, rejected


def _mixed_bodies():
    metric, _ = metric_body()
    return [
        log_body(b"first\n"),
        b"",  # empty frame: an IPCMessage with type 0
        metric,
        log_body(b"", stream=2, seq=2),
        envelope(5, data=b"\x00\x01"),
        log_body(b"x" * 300, seq=3),
    ]


class FramingTests(IngestTestMixin, SynchronousTestCase):
    def test_single_log_frame(self):
        """A LOG frame becomes add_log with the envelope's job id (not the payload's) and the
        payload's stream, timestamp, sequence and content."""
        body = log_body(b"out\n", stream=2, ts=123, seq=9, payload_job="someone-else")
        self.feed(frame(body))
        self.assertEqual(self.writer.calls, [("log", JOB, 2, 123, 9, b"out\n")])
        self.assertEqual(self.metrics.received, {1: 1})
        self.assertEqual(self.metrics.received_bytes, len(body))
        self.assertEqual(self.metrics.rejected, [])

    def test_several_frames_per_read(self):
        """Many frames in one read are all delivered, in order."""
        bodies = [log_body(b"%d" % i, seq=i) for i in range(50)]
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual([c[4] for c in self.writer.calls], list(range(50)))
        self.assertEqual(self.metrics.received, {1: 50})

    def test_every_split_point(self):
        """A stream of mixed frames cut into two reads at every byte offset, and delivered
        one byte per read, gives exactly the same result as one read."""
        bodies = _mixed_bodies()
        data = b"".join(map(frame, bodies))
        expected = reference(bodies)
        self.assertEqual(len(expected[0]), 4)
        for cut in range(len(data) + 1):
            self.writer.calls, self.metrics.rejected = [], []
            self.feed(data, [cut])
            self.assertEqual((self.writer.calls, self.metrics.rejected), expected, cut)
        self.writer.calls, self.metrics.rejected = [], []
        self.feed(data, range(len(data)))
        self.assertEqual((self.writer.calls, self.metrics.rejected), expected)

    @given(
        st.lists(
            st.one_of(
                st.builds(
                    log_body,
                    content=st.binary(max_size=200),
                    stream=st.integers(0, 3),
                    job=st.sampled_from([JOB, JOB2, "", "../x", "a/b"]),
                    ts=st.integers(0, 2**63 - 1),
                    seq=st.integers(0, 2**64 - 6),
                ),
                st.builds(lambda ts, seq: metric_body(ts=ts, seq=seq)[0],
                          st.integers(0, 2**62), st.integers(0, 2**62)),
                st.builds(envelope, st.integers(0, 12), st.sampled_from([JOB, "..", "ok"]),
                          st.binary(max_size=20)),
                st.binary(max_size=40),
            ),
            max_size=12,
        ),
        st.lists(st.integers(0, 4000), max_size=12),
    )
    def test_random_frames_random_splits(self, bodies, splits):
        """Any sequence of frames (valid or not), cut at any offsets, gives the result that
        the documented rules give frame by frame, and leaves nothing buffered."""
        self.writer.calls, self.metrics.rejected = [], []
        data = b"".join(map(frame, bodies))
        proto, transport = self.feed(data, [s for s in splits if s <= len(data)])
        self.assertEqual((self.writer.calls, self.metrics.rejected), reference(bodies))
        proto.connectionLost(None)
        self.assertEqual(self.metrics.rejected, reference(bodies)[1])
        self.assertFalse(transport.disconnecting)

    def test_large_frame_across_many_reads(self):
        """A 3 MiB frame arriving in 64 KiB reads is delivered once, intact, and the frame
        after it in the last read too."""
        content = bytes(range(256)) * (3 * 4096)
        data = frame(log_body(content)) + frame(log_body(b"next", seq=2))
        self.feed(data, range(65536, len(data), 65536),
                  factory=self.make_factory(max_frame_bytes=4 << 20))
        self.assertEqual([c[5] for c in self.writer.calls], [content, b"next"])

    def test_zero_length_frame(self):
        """A 0-length frame decodes to an empty IPCMessage (type 0): unknown_type, and the
        connection goes on."""
        self.feed(frame(b"") + frame(log_body()))
        self.assertEqual(self.metrics.rejected, ["unknown_type"])
        self.assertEqual(self.metrics.received, {0: 1, 1: 1})
        self.assertEqual(len(self.writer.calls), 1)

    def test_metric_frame(self):
        """A METRIC frame becomes add_metric with the payload bytes as received and the
        payload's timestamp and sequence."""
        body, payload = metric_body(ts=777, seq=4)
        self.feed(frame(body))
        self.assertEqual(self.writer.calls, [("metric", JOB, 777, 4, payload)])
        self.assertEqual(self.metrics.received, {2: 1})

    def test_metric_without_payload_timestamp(self):
        """A Metric payload with timestamp 0 takes timestamp and sequence from the
        envelope."""
        body, payload = metric_body(ts=0, seq=4, env_ts=55, env_seq=66)
        self.feed(frame(body))
        self.assertEqual(self.writer.calls, [("metric", JOB, 55, 66, payload)])

    def test_stringReceived_handles_one_frame(self):
        """stringReceived, Int32StringReceiver's per-frame hook, handles a frame body."""
        proto, _ = self.connect()
        proto.stringReceived(log_body(b"direct"))
        self.assertEqual(self.writer.calls[0][5], b"direct")

    def test_max_length_from_constructor(self):
        """MAX_LENGTH is the configured frame limit, not the inherited 99999."""
        proto, _ = self.connect(self.make_factory(max_frame_bytes=12345))
        self.assertEqual(proto.MAX_LENGTH, 12345)
        self.assertEqual(IngestProtocol(self.writer, RejectionLog(self.clock)).MAX_LENGTH,
                         128 * 1024 * 1024)


class RejectionTests(IngestTestMixin, SynchronousTestCase):
    def assertRejectedThenContinues(self, body, reason):
        good = log_body(b"after")
        proto, transport = self.feed(frame(body) + frame(good))
        self.assertEqual(self.metrics.rejected, [reason])
        self.assertEqual(self.writer.calls, [("log", JOB, 1, 1_700_000_000_000_000_000, 1,
                                              b"after")])
        self.assertFalse(transport.disconnecting)

    def test_bad_envelope(self):
        """Bytes that are not an IPCMessage: bad_envelope, not counted as received."""
        self.assertRejectedThenContinues(b"\xff\xff\xff\xff", "bad_envelope")
        self.assertEqual(self.metrics.received, {1: 1})

    def test_event_types_go_to_add_event(self):
        """Types 3..9 are counted as received and handed to the writer's add_event (part
        of IIngestWriter; there is no writer without it and no unsupported_type)."""
        for t in range(3, 10):
            self.writer.calls, self.metrics.rejected = [], []
            self.feed(frame(envelope(t, data=b"", timestamp=7, sequence=8)))
            kind = events.KINDS_BY_TYPE[t].name
            self.assertEqual(self.writer.calls, [("event", JOB, kind, 7, 8, b"")])
            self.assertEqual(self.metrics.rejected, [])
        self.assertEqual({t: self.metrics.received[t] for t in range(3, 10)},
                         dict.fromkeys(range(3, 10), 1))

    def test_recording_writer_provides_interface(self):
        """The test double provides IIngestWriter, as BatchingWriter does."""
        self.assertTrue(verifyObject(IIngestWriter, self.writer))

    def test_writer_without_add_event_refused(self):
        """add_event is part of the writer interface, not an optional extra: a writer
        without it is refused when the protocol is built, instead of its event frames
        being dropped as unsupported at run time."""

        class LogsOnlyWriter:
            def add_log(self, job_id, stream, timestamp, sequence, content):
                pass

            def add_metric(self, job_id, timestamp, sequence, payload):
                pass

        with self.assertRaises(AttributeError) as cm:
            IngestProtocol(LogsOnlyWriter(), RejectionLog(self.clock))
        self.assertIn("add_event", str(cm.exception))

    def test_unknown_types(self):
        """Type 0 and numbers beyond 9 are unknown_type."""
        for t in (0, 10, 1000):
            self.writer.calls, self.metrics.rejected = [], []
            self.assertRejectedThenContinues(envelope(t), "unknown_type")

    def test_invalid_job_ids(self):
        """Job ids that could become unsafe paths are rejected, on LOG and METRIC."""
        for job in ("", "../etc", "a/b", ".hidden", "x" * 129, "a..b"):
            for body in (log_body(job=job), metric_body(job=job)[0]):
                self.writer.calls, self.metrics.rejected = [], []
                self.assertRejectedThenContinues(body, "invalid_job_id")

    def test_bad_payloads(self):
        """A LOG whose data is not a LogLine, or a METRIC whose data is not a Metric."""
        for t in (1, 2):
            self.writer.calls, self.metrics.rejected = [], []
            self.assertRejectedThenContinues(envelope(t, data=b"\x0a\x05ab"), "bad_payload")
        # A string field with invalid UTF-8 is a decoding error too.
        self.writer.calls, self.metrics.rejected = [], []
        self.assertRejectedThenContinues(envelope(1, data=b"\x0a\x02\xff\xfe"), "bad_payload")

    def test_invalid_stream(self):
        """A LogLine with stream 0 (unset) or an unknown number is rejected."""
        for stream in (0, 3, 99):
            self.writer.calls, self.metrics.rejected = [], []
            self.assertRejectedThenContinues(log_body(stream=stream), "invalid_stream")

    def test_writer_stopping(self):
        """Frames arriving after the writer stopped are counted as stopping, not raised."""
        self.writer.stopped = True
        self.feed(frame(log_body()) + frame(metric_body()[0]) + frame(log_body()))
        self.assertEqual(self.metrics.rejected, ["stopping"] * 3)

    def test_oversized_frame_skipped(self):
        """A frame above the limit is counted as oversized and skipped chunk by chunk
        without being buffered; the connection stays open and the next frame is delivered."""
        factory = self.make_factory(max_frame_bytes=1000)
        big = frame(log_body(b"x" * 5000))
        data = big + frame(log_body(b"after"))
        proto, transport = self.connect(factory)
        for i in range(0, len(data), 100):
            proto.dataReceived(data[i : i + 100])
            # Never more than the current read is held, whatever the oversized frame's size.
            self.assertLessEqual(sum(map(len, proto._chunks)) + len(proto._head), 100)
        self.assertEqual(self.metrics.rejected, ["oversized"])
        self.assertEqual([c[5] for c in self.writer.calls], [b"after"])
        self.assertFalse(transport.disconnecting)

    def test_oversized_frame_in_one_read(self):
        """An oversized frame wholly inside one read is skipped and the rest of the read is
        handled."""
        factory = self.make_factory(max_frame_bytes=10)
        self.feed(frame(log_body(b"x" * 20)) + frame(b"") + frame(log_body(b"y" * 20)),
                  factory=factory)
        self.assertEqual(self.metrics.rejected, ["oversized", "unknown_type", "oversized"])

    def test_frame_at_limit_accepted(self):
        """A frame exactly max_frame_bytes long is accepted."""
        body = log_body(b"z" * 100)
        self.feed(frame(body), factory=self.make_factory(max_frame_bytes=len(body)))
        self.assertEqual(len(self.writer.calls), 1)

    def test_truncated_frame_on_close(self):
        """Complete frames before a close are delivered; a partial body or a partial length
        prefix at the close is counted as truncated_frame; a clean close counts nothing."""
        data = frame(log_body(b"complete"))
        for tail in (frame(log_body(b"cut"))[:-3], b"\x00\x00"):
            self.writer.calls, self.metrics.rejected = [], []
            proto, _ = self.feed(data + tail)
            self.assertEqual([c[5] for c in self.writer.calls], [b"complete"])
            proto.connectionLost(None)
            self.assertEqual(self.metrics.rejected, ["truncated_frame"])
        self.metrics.rejected = []
        proto, _ = self.feed(data)
        proto.connectionLost(None)
        self.assertEqual(self.metrics.rejected, [])

    def test_job_id_cache_is_bounded(self):
        """Valid job ids are cached up to the configured size; every frame is still
        checked and delivered."""
        factory = self.make_factory(job_id_cache_size=2)
        jobs = [f"job{i}" for i in range(5)]
        proto, _ = self.feed(b"".join(frame(log_body(job=j)) for j in jobs * 2), factory=factory)
        self.assertEqual([c[1] for c in self.writer.calls], jobs * 2)
        self.assertLessEqual(len(proto._valid_ids), 2)

    def test_rejections_logged_at_bounded_rate(self):
        """Rejections of one reason produce at most one log line per interval, and the next
        line reports how many were not logged; other reasons are logged independently."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)

        def lines():
            return [(e["reason"], e["suppressed"]) for e in logged if "reason" in e
                    and e.get("log_namespace") == "joblet_persist.ingest"]

        factory = self.make_factory(reject_log_interval=10.0)
        proto, _ = self.connect(factory)
        bad = frame(envelope(12))
        proto.dataReceived(bad * 5)
        proto.dataReceived(frame(b"\xff"))
        self.assertEqual(lines(), [("unknown_type", 0), ("bad_envelope", 0)])
        self.clock.advance(9.9)
        proto.dataReceived(bad)
        self.assertEqual(len(lines()), 2)
        self.clock.advance(0.1)
        proto.dataReceived(bad)
        self.assertEqual(lines()[2:], [("unknown_type", 5)])
        self.assertEqual(self.metrics.rejected.count("unknown_type"), 7)


class FactoryTests(IngestTestMixin, SynchronousTestCase):
    def test_max_connections(self):
        """Connections beyond max_connections are refused (buildProtocol returns None, the
        port closes them) and counted; after a close a new one is accepted."""
        factory = self.make_factory(max_connections=2)
        p1, _ = self.connect(factory)
        self.connect(factory)
        self.assertEqual(factory.connection_count(), 2)
        self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual(self.metrics.rejected, ["too_many_connections"])
        p1.connectionLost(None)
        self.assertEqual(factory.connection_count(), 1)
        self.assertIsNotNone(factory.buildProtocol(None))
        self.assertEqual(self.metrics.connections, 1)

    def test_pause_and_resume_all(self):
        """pause_all pauses every connection's transport, resume_all resumes them, and a
        connection made while paused starts paused."""
        factory = self.make_factory()
        transports = [self.connect(factory)[1] for _ in range(3)]
        factory.pause_all()
        self.assertTrue(factory.paused)
        self.assertEqual({t.producerState for t in transports}, {"paused"})
        _, late = self.connect(factory)
        self.assertEqual(late.producerState, "paused")
        factory.resume_all()
        self.assertFalse(factory.paused)
        self.assertEqual({t.producerState for t in transports + [late]}, {"producing"})
        _, later = self.connect(factory)
        self.assertEqual(later.producerState, "producing")

    def test_pause_skips_closing_transports(self):
        """A connection that is already closing is left alone by pause_all/resume_all."""
        factory = self.make_factory()
        _, closing = self.connect(factory)
        _, open_ = self.connect(factory)
        closing.loseConnection()
        factory.pause_all()
        factory.resume_all()
        factory.pause_all()
        self.assertEqual((closing.producerState, open_.producerState),
                         ("producing", "paused"))

    def test_disconnect_all(self):
        """disconnect_all closes every connection and fires only after each one's
        connectionLost."""
        factory = self.make_factory()
        conns = [self.connect(factory) for _ in range(2)]
        d = factory.disconnect_all()
        self.assertEqual([t.disconnecting for _, t in conns], [True, True])
        self.assertNoResult(d)
        conns[0][0].connectionLost(None)
        self.assertNoResult(d)
        conns[1][0].connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(factory.connection_count(), 0)
        self.assertEqual(self.metrics.connections, 0)

    def test_disconnect_all_without_connections(self):
        """disconnect_all with nothing connected fires at once."""
        self.successResultOf(self.make_factory().disconnect_all())

    def test_pause_all_while_draining(self):
        """While disconnect_all drains, pause_all (the writer's backpressure) pauses no
        connection: each keeps being read and its frames reach the writer.  The factory
        still records the pause, so the writer's resume_all after the drain leaves it
        unpaused, with no connection, timer or rejection left over."""
        factory = self.make_factory()
        conns = [self.connect_socket(factory) for _ in range(2)]
        factory.pause_all()
        self.assertEqual({t.producerState for _, t in conns}, {"paused"})

        d = factory.disconnect_all(drain_timeout=10.0)
        # Each read side is shut down, and reading resumes despite the earlier pause.
        self.assertEqual([t.socket.shutdowns for _, t in conns], [[socket.SHUT_RD]] * 2)
        self.assertEqual({t.producerState for _, t in conns}, {"producing"})
        self.assertEqual([t.disconnecting for _, t in conns], [False, False])

        factory.pause_all()
        self.assertTrue(factory.paused)
        self.assertEqual({t.producerState for _, t in conns}, {"producing"})
        for i, (proto, _) in enumerate(conns):
            proto.dataReceived(frame(log_body(b"queued %d" % i)))
        self.assertEqual([c[5] for c in self.writer.calls], [b"queued 0", b"queued 1"])
        factory.resume_all()
        factory.pause_all()
        self.assertEqual({t.producerState for _, t in conns}, {"producing"})
        self.assertNoResult(d)

        for _, transport in conns:
            transport.peer_closed()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([t.closed_at for _, t in conns], [None, None])
        self.assertEqual(factory.connection_count(), 0)
        self.assertEqual(self.metrics.connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(factory.paused)
        factory.resume_all()
        self.assertFalse(factory.paused)
        self.assertEqual(self.metrics.rejected, [])

    def test_drain_timeout_closes_remaining_connections(self):
        """A connection still open when drain_timeout expires is closed at exactly that
        moment (not a tick before), and disconnect_all's Deferred fires then; a frame it
        cut off is counted as truncated_frame.  A connection whose peer closed earlier is
        not closed again."""
        factory = self.make_factory()
        (_, early), (late_proto, late) = [self.connect_socket(factory) for _ in range(2)]
        fired = []
        d = factory.disconnect_all(drain_timeout=7.5)
        d.addCallback(lambda _: fired.append(self.clock.seconds()))

        self.clock.advance(1.0)
        early.peer_closed()
        late_proto.dataReceived(frame(log_body(b"cut"))[:-2])
        self.clock.advance(7.5 - 1.0 - 2**-10)
        self.assertFalse(late.disconnecting)
        self.assertEqual(factory.connection_count(), 1)
        self.assertEqual(fired, [])
        self.assertNoResult(d)

        self.clock.advance(2**-10)
        self.assertEqual(late.closed_at, 7.5)
        self.assertEqual(fired, [7.5])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(early.closed_at, None)
        self.assertEqual(factory.connection_count(), 0)
        self.assertEqual(self.metrics.connections, 0)
        self.assertEqual(self.metrics.rejected, ["truncated_frame"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_ends_when_every_peer_closed(self):
        """disconnect_all's Deferred fires as soon as the last peer closes, before
        drain_timeout; the timer is cancelled, so nothing is closed when it would have
        expired."""
        factory = self.make_factory()
        conns = [self.connect_socket(factory) for _ in range(2)]
        fired = []
        d = factory.disconnect_all(drain_timeout=7.5)
        d.addCallback(lambda _: fired.append(self.clock.seconds()))

        self.clock.advance(1.0)
        conns[0][1].peer_closed()
        self.assertEqual(fired, [])
        self.clock.advance(1.0)
        conns[1][1].peer_closed()
        self.assertEqual(fired, [2.0])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

        self.clock.advance(10.0)
        self.assertEqual([t.closed_at for _, t in conns], [None, None])
        self.assertEqual(self.metrics.rejected, [])

    def test_writer_backpressure_wiring(self):
        """A real BatchingWriter above its high-water mark pauses every connection through
        the factory, and resumes them once its appends complete."""
        from joblet_persist.writer import BatchingWriter
        from tests.fakes import FakeStorage

        storage = FakeStorage(auto=False)
        box = []
        writer = BatchingWriter(storage, self.clock, batch_max_messages=1,
                                high_water_bytes=500, low_water_bytes=100,
                                on_pause=lambda: box[0].pause_all(),
                                on_resume=lambda: box[0].resume_all())
        factory = IngestFactory(writer, self.metrics, self.clock)
        box.append(factory)
        proto, transport = self.connect(factory)
        proto.dataReceived(frame(log_body(b"x" * 200)))
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(frame(log_body(b"x" * 200)))
        self.assertEqual(transport.producerState, "paused")
        while storage.pending():
            storage.pending()[0].succeed()
        self.assertEqual(transport.producerState, "producing")

    def test_protocol_pause_producing(self):
        """The protocol as a producer pauses and resumes its transport."""
        proto, transport = self.connect()
        proto.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_factory_needs_clock(self):
        """The factory refuses to run without an injected clock."""
        self.assertRaises(TypeError, IngestFactory, self.writer, self.metrics)


class MetricsInterfaceTests(IngestTestMixin, SynchronousTestCase):
    def test_recording_metrics_provide_the_interface(self):
        """The test double and NullIngestMetrics have every method of IIngestMetrics, and
        PersistMetrics declares it."""
        self.assertTrue(verifyObject(IIngestMetrics, self.metrics, tentative=True))
        self.assertTrue(verifyObject(IIngestMetrics, NullIngestMetrics()))
        from prometheus_client import CollectorRegistry

        from joblet_persist.metrics import PersistMetrics

        persist = PersistMetrics(CollectorRegistry(), process=False)
        self.assertTrue(IIngestMetrics.providedBy(persist))
        self.assertTrue(verifyObject(IIngestMetrics, persist))

    def test_metrics_missing_a_method_are_refused_at_construction(self):
        """A metrics object without one of IIngestMetrics' methods (the bulk count, the
        event rejection count, the partial-frame budget export) is refused when the factory
        or a protocol is built, naming the method, instead of its counts being silently
        dropped or replaced at run time."""
        for missing in ("frames_received", "event_rejected", "set_partial_budget"):
            partial = type("Partial", (), {
                name: (lambda self, *args: None)
                for name in ("frame_received", "frames_received", "frame_rejected",
                             "event_rejected", "connection_opened", "connection_closed",
                             "set_partial_budget")
                if name != missing
            })()
            e = self.assertRaises(TypeError, IngestFactory, self.writer, partial, self.clock)
            self.assertIn(missing, str(e))
            e = self.assertRaises(TypeError, IngestProtocol, self.writer,
                                  RejectionLog(self.clock), partial)
            self.assertIn(missing, str(e))


class PersistMetricsTests(IngestTestMixin, SynchronousTestCase):
    def test_with_service_metrics(self):
        """The service's PersistMetrics accepts every call the protocol and factory make."""
        from prometheus_client import CollectorRegistry

        from joblet_persist.metrics import PersistMetrics

        metrics = PersistMetrics(CollectorRegistry(), process=False)
        factory = IngestFactory(self.writer, metrics, self.clock, max_connections=1)
        bodies = [log_body(), metric_body()[0], envelope(12), b"\xff", log_body(job="../x")]
        proto, _ = self.feed(b"".join(map(frame, bodies)) + b"\x00", factory=factory)
        self.assertIsNone(factory.buildProtocol(None))
        proto.connectionLost(None)
        self.assertEqual(metrics.received_total(), 4)
        # unknown_type, bad_envelope, invalid_job_id, too_many_connections, truncated_frame
        self.assertEqual(metrics.rejected_total(), 5)
