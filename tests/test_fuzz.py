"""Property-based fuzzing of hostile and broken input: IPC frames and gRPC request fields.

IPC: byte streams of frames (valid LOG and METRIC envelopes with random fields and job ids,
raw protobuf wire data built field by field with repeated, unknown, mistyped and malformed
fields, random bytes, oversized length prefixes, a last frame cut short) are cut at random
offsets and fed to an ``IngestProtocol`` on a ``StringTransport``.  An oracle written the plain
way (``IPCMessage.FromString`` and the rules of ingest's docstring) says what must happen to
each frame; the protocol must do exactly that, count every rejection, and never raise.

gRPC: every request field of every RPC (random and malicious job ids, streams, negative and
huge limits and offsets, inverted and random ranges) against ``PersistServicer`` over
``FakeStorage``: the status code is the one the validation rules give, never INTERNAL or
UNKNOWN, and successful answers hold what the storage holds.

The ``check_*`` functions are the properties; the tests run them under hypothesis with the
profile of tests/__init__.py, and bench/fuzz_long.py runs them with many more examples.
"""

from __future__ import annotations

import struct

import grpc
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from joblet_persist import ingest
from joblet_persist._proto import ipc_pb2
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.ingest import IngestFactory
from joblet_persist.query import PersistServicer
from joblet_persist.storage.api import is_valid_job_id
from joblet_persist.writer import BatchingWriter, IIngestWriter
from tests.fakes import Aborted, FakeContext, FakeStorage, ImmediateReactor, log_batch

MAX_FRAME = 300
VALID_IDS = ["0b7c6a1e-3f7e-4d2a-9c1b-123456789abc", "job-2", "J", "a.b_c-d"]
BAD_IDS = ["", "..", "../etc/passwd", "a/b", "-x", ".hidden", "a..b", "x" * 129, "sp ace",
           "nul\x00", "ünï", "a\\b", "/abs"]

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)

job_ids = st.one_of(
    st.sampled_from(VALID_IDS),
    st.sampled_from(VALID_IDS),
    st.sampled_from(VALID_IDS),
    st.sampled_from(BAD_IDS),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True),
    st.text(max_size=10),
)


# -- raw protobuf wire data ------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf varint of a value in 0..2**64-1."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


@st.composite
def raw_field(draw, numbers, nested=None):
    """One field of raw wire data: any number in ``numbers`` (or a random one), any wire type,
    including groups, overlong varints, sizes that overrun the message and nested messages."""
    number = draw(st.one_of(st.sampled_from(numbers), st.integers(0, 40)))
    kind = draw(st.sampled_from(["varint", "varint", "len", "len", "fixed64", "fixed32",
                                 "group", "overlong", "badlen"]))
    if kind == "varint":
        return tag(number, 0) + varint(draw(st.one_of(st.integers(0, 10), UINT64)))
    if kind == "len":
        if nested is not None and draw(st.booleans()):
            body = draw(nested)
        else:
            body = draw(st.one_of(st.binary(max_size=20),
                                  st.text(max_size=8).map(lambda t: t.encode("utf-8")),
                                  st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80"])))
        return tag(number, 2) + varint(len(body)) + body
    if kind == "fixed64":
        return tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
    if kind == "group":
        return tag(number, 3) + draw(st.binary(max_size=6)) + tag(number, 4)
    if kind == "overlong":
        return tag(number, 0) + b"\xff" * draw(st.integers(9, 12)) + b"\x01"
    return tag(number, 2) + varint(draw(st.integers(5, 2**31))) + draw(st.binary(max_size=4))


raw_log_line = st.lists(raw_field([1, 2, 3, 4, 5]), max_size=7).map(b"".join)
raw_envelope = st.lists(raw_field([1, 2, 3, 4, 5, 6], nested=raw_log_line),
                        max_size=8).map(b"".join)


@st.composite
def raw_log_envelope(draw):
    """A LOG envelope with a valid job id whose LogLine is raw wire data: mostly accepted or
    rejected as bad_payload/invalid_stream, exercising the payload decoder's corners."""
    head = tag(2, 0) + varint(1) + tag(3, 2)
    job = draw(st.sampled_from(VALID_IDS)).encode()
    line = draw(raw_log_line)
    extra = draw(st.sampled_from([b"", tag(2, 0) + varint(1), tag(6, 2) + b"\x00"]))
    return head + varint(len(job)) + job + tag(6, 2) + varint(len(line)) + line + extra


# -- well-formed envelopes with random fields -----------------------------------------------


@st.composite
def log_envelope(draw):
    line = ipc_pb2.LogLine(
        job_uuid=draw(job_ids),
        stream=draw(st.one_of(st.sampled_from([1, 2]), st.sampled_from([1, 2]), INT32)),
        timestamp=draw(INT64), sequence=draw(UINT64), content=draw(st.binary(max_size=40)),
    )
    return ipc_pb2.IPCMessage(
        version=draw(st.integers(0, 2**32 - 1)), type=1, job_uuid=draw(job_ids),
        timestamp=draw(INT64), sequence=draw(UINT64), data=line.SerializeToString(),
    ).SerializeToString()


@st.composite
def metric_envelope(draw):
    if draw(st.booleans()):
        payload = ipc_pb2.Metric(
            job_uuid=draw(job_ids), timestamp=draw(st.one_of(st.just(0), INT64)),
            sequence=draw(UINT64),
            data=ipc_pb2.MetricData(cpu_usage=draw(st.floats(allow_nan=True)),
                                    memory_usage=draw(INT64)),
        ).SerializeToString()
    else:
        payload = draw(st.binary(max_size=30))
    return ipc_pb2.IPCMessage(
        type=2, job_uuid=draw(job_ids), timestamp=draw(st.one_of(st.integers(1, 99), INT64)),
        sequence=draw(UINT64),
        data=payload,
    ).SerializeToString()


@st.composite
def other_envelope(draw):
    return ipc_pb2.IPCMessage(
        type=draw(st.one_of(st.integers(0, 12), INT32)), job_uuid=draw(job_ids),
        data=draw(st.binary(max_size=30)),
    ).SerializeToString()


@st.composite
def merged_envelopes(draw):
    """Two serialized envelopes back to back: one message whose repeated fields merge."""
    return draw(st.one_of(log_envelope(), metric_envelope())) + draw(
        st.one_of(log_envelope(), raw_envelope)
    )


bodies = st.one_of(
    log_envelope(), log_envelope(), log_envelope(), log_envelope(),
    metric_envelope(), metric_envelope(), raw_log_envelope(), raw_log_envelope(),
    other_envelope(), merged_envelopes(), raw_envelope, st.binary(max_size=60),
    st.binary(min_size=MAX_FRAME + 1, max_size=MAX_FRAME + 40),  # oversized
)


@st.composite
def ipc_streams(draw):
    """(frame bodies, the byte stream, read boundaries, whether the last frame is cut)."""
    frame_bodies = draw(st.lists(bodies, max_size=12))
    data = b"".join(struct.pack(">I", len(b)) + b for b in frame_bodies)
    cut = False
    if frame_bodies and draw(st.booleans()):
        last = len(frame_bodies[-1]) + 4
        keep = draw(st.integers(1, last - 1))
        data = data[: len(data) - last + keep]
        cut = True
    splits = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    return frame_bodies, data, splits, cut


def expected_outcome(body: bytes, max_frame: int = MAX_FRAME):
    """What ingest must do with one complete frame: ("log", job, stream, ts, seq, content),
    ("metric", job, ts, seq, payload), ("event", job, kind, ts, seq, payload), or
    ("reject", reason)."""
    if len(body) > max_frame:
        return ("reject", "oversized")
    try:
        env = ipc_pb2.IPCMessage.FromString(body)
    except DecodeError:
        return ("reject", "bad_envelope")
    if env.type in (1, 2):
        if not is_valid_job_id(env.job_uuid):
            return ("reject", "invalid_job_id")
        try:
            payload = (ipc_pb2.LogLine if env.type == 1 else ipc_pb2.Metric).FromString(env.data)
        except DecodeError:
            return ("reject", "bad_payload")
        if env.type == 1:
            if payload.stream not in (1, 2):
                return ("reject", "invalid_stream")
            return ("log", env.job_uuid, payload.stream, payload.timestamp, payload.sequence,
                    payload.content)
        ts, seq = payload.timestamp, payload.sequence
        if not ts:
            ts, seq = env.timestamp, env.sequence
        return ("metric", env.job_uuid, ts, seq, env.data)
    if 3 <= env.type <= 9:
        if not is_valid_job_id(env.job_uuid):
            return ("reject", "invalid_job_id")
        from joblet_persist import events

        try:
            kind, ts, seq = events.check_event(
                env.type, env.data, env.job_uuid, env.timestamp, env.sequence
            )
        except events.EventDecodeError as e:
            return ("reject", e.reason)
        return ("event", env.job_uuid, kind.name, ts, seq, env.data)
    return ("reject", "unknown_type")


def _cut_outcome(frame_bodies, data) -> tuple:
    """For a cut last frame: the event ingest reports for it."""
    last = frame_bodies[-1]
    received = len(data) - sum(len(b) + 4 for b in frame_bodies[:-1])
    if received >= 4 and len(last) > MAX_FRAME:
        return ("reject", "oversized")  # rejected on its prefix; the rest is skipped
    return ("reject", "truncated_frame")


@implementer(IIngestWriter)
class _Events:
    """One ordered record of what the protocol did: writer calls and rejections."""

    def __init__(self):
        self.events: list = []
        self.received = 0

    # writer (IIngestWriter, one message at a time)
    def add_log(self, job_id, stream, timestamp, sequence, content):
        self.events.append(("log", job_id, stream, timestamp, sequence, bytes(content)))

    def add_metric(self, job_id, timestamp, sequence, payload):
        self.events.append(("metric", job_id, timestamp, sequence, bytes(payload)))

    def add_event(self, job_id, kind, timestamp, sequence, payload):
        self.events.append(("event", job_id, kind, timestamp, sequence, bytes(payload)))

    # metrics
    def frame_received(self, msg_type, nbytes):
        self.received += 1

    def frames_received(self, counts, nbytes):
        self.received += sum(counts.values())

    def frame_rejected(self, reason):
        self.events.append(("reject", reason))

    def event_rejected(self, kind, reason):
        self.last_event_rejected = (kind, reason)  # also reported through frame_rejected

    def connection_opened(self):
        pass

    def connection_closed(self):
        pass

    def set_partial_budget(self, budget):
        self.budget = budget


def _feed(factory, data: bytes, splits) -> None:
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    last = 0
    for cut in splits:
        proto.dataReceived(data[last:cut])
        last = cut
    proto.dataReceived(data[last:])
    proto.connectionLost(None)


def _oracle(frame_bodies, data, cut) -> list:
    events = [expected_outcome(b) for b in frame_bodies]
    if cut:
        events[-1] = _cut_outcome(frame_bodies, data)
    return events


def _received_count(frame_bodies, events) -> int:
    """Frames counted as received: every frame whose envelope decoded."""
    n = 0
    for _body, event in zip(frame_bodies, events, strict=True):
        if event[0] != "reject" or event[1] not in ("oversized", "bad_envelope",
                                                    "truncated_frame"):
            n += 1
    return n


def check_ingest_in_order(frame_bodies, data, splits, cut) -> None:
    """A writer that takes one message at a time sees exactly the oracle's accepted messages,
    interleaved with the rejections, in frame order; nothing raises; every frame has exactly
    one outcome; received counts every frame whose envelope decoded."""
    rec = _Events()
    factory = IngestFactory(rec, rec, task.Clock(), max_frame_bytes=MAX_FRAME,
                            reject_log_interval=1e9)
    _feed(factory, data, splits)
    expected = _oracle(frame_bodies, data, cut)
    assert rec.events == expected, (rec.events, expected)
    assert rec.received == _received_count(frame_bodies, expected), rec.received


def check_ingest_into_writer(frame_bodies, data, splits, cut) -> None:
    """Into the real BatchingWriter (its bulk path): per job, the stored messages ordered by
    their arrival ordinals are exactly the oracle's accepted messages of that job, logs and
    metrics interleaved in frame order; the rejections are the oracle's; accepted +
    rejected == frames."""
    storage = FakeStorage(now=lambda: 1_700_000_000.0)
    clock = task.Clock()
    writer = BatchingWriter(storage, clock, batch_max_messages=3, batch_max_bytes=64)
    writer.start()
    rec = _Events()
    factory = IngestFactory(writer, rec, clock, max_frame_bytes=MAX_FRAME,
                            reject_log_interval=1e9)
    _feed(factory, data, splits)
    writer.flush_all()
    expected = _oracle(frame_bodies, data, cut)

    by_job: dict = {}
    for batch in (c.batch for c in storage.calls if c.kind == "logs"):
        for ts, seq, arrival, content in zip(batch.timestamps, batch.sequences, batch.arrivals,
                                             batch.contents, strict=True):
            by_job.setdefault(batch.job_id, []).append(
                (arrival, ("log", batch.job_id, batch.stream, ts, seq, bytes(content))))
    for batch in (c.batch for c in storage.calls if c.kind == "metrics"):
        for ts, seq, arrival, payload in zip(batch.timestamps, batch.sequences, batch.arrivals,
                                             batch.payloads, strict=True):
            by_job.setdefault(batch.job_id, []).append(
                (arrival, ("metric", batch.job_id, ts, seq, bytes(payload))))
    for batch in (c.batch for c in storage.calls if c.kind == "events"):
        for ts, seq, arrival, payload in zip(batch.timestamps, batch.sequences, batch.arrivals,
                                             batch.payloads, strict=True):
            by_job.setdefault(batch.job_id, []).append(
                (arrival, ("event", batch.job_id, batch.kind, ts, seq, bytes(payload))))
    got = {}
    for job, items in by_job.items():
        arrivals = [a for a, _ in items]
        assert len(set(arrivals)) == len(arrivals), f"{job}: arrival ordinals repeat"
        got[job] = [event for _, event in sorted(items, key=lambda x: x[0])]
    want: dict = {}
    for event in expected:
        if event[0] != "reject":
            want.setdefault(event[1], []).append(event)
    assert got == want, (got, want)
    rejected = sorted(e[1] for e in rec.events)
    assert rejected == sorted(e[1] for e in expected if e[0] == "reject"), rejected
    accepted = sum(len(v) for v in got.values())
    assert accepted == writer.messages_received
    assert accepted + len(rejected) == len(frame_bodies)


class IngestFuzzTests(SynchronousTestCase):
    @given(ipc_streams())
    def test_frames_in_order_one_message_at_a_time(self, stream):
        """Random frame streams cut into random reads: each frame is accepted or rejected
        exactly as the oracle says, in frame order, and nothing raises."""
        check_ingest_in_order(*stream)

    @given(ipc_streams())
    def test_frames_into_the_batching_writer(self, stream):
        """The same streams into the real writer: per job, arrival order is frame order and
        the stored messages are the oracle's; every rejection is counted."""
        check_ingest_into_writer(*stream)

    @given(ipc_streams())
    def test_pure_python_decoder_gives_the_same_results(self, stream):
        """With the frame decoder's pure-Python twin in place of the C extension, the same
        properties hold (the twin is what runs where the extension is not built)."""
        from joblet_persist import framing

        twin = getattr(framing, "decode_log_frames_py", None)
        if twin is None:
            self.skipTest("no pure-Python frame decoder")
        original = ingest.decode_log_frames
        ingest.decode_log_frames = twin
        try:
            check_ingest_in_order(*stream)
            check_ingest_into_writer(*stream)
        finally:
            ingest.decode_log_frames = original


# -- gRPC requests ---------------------------------------------------------------------------

KNOWN = VALID_IDS[0]
OTHER = VALID_IDS[1]
MAX_LIMIT = 1000
BASE = 1_700_000_000_000_000_000
LINES = [(BASE + i * 10, i, b"line %d\n" % i) for i in range(30)]
SAMPLES = [(BASE + i * 10, i, {"cpu_usage": float(i)}) for i in range(8)]

rpc_job_ids = st.one_of(st.sampled_from([KNOWN, OTHER, "unknown-job"]), job_ids)
page = st.one_of(st.integers(-3, 40), st.sampled_from([MAX_LIMIT, MAX_LIMIT + 1]), INT32)
times = st.one_of(st.just(0), st.integers(BASE - 50, BASE + 400), INT64)


def _servicer():
    storage = FakeStorage(now=lambda: 1_700_000_000.0)
    for stream, lines in ((1, LINES[0::2]), (2, LINES[1::2])):
        storage.append_logs(log_batch(KNOWN, stream, lines, arrivals=[s for _, s, _ in lines]))
    from tests.fakes import metric_batch

    storage.append_metrics(metric_batch(KNOWN, SAMPLES))
    storage.append_logs(log_batch(OTHER, 1, LINES[:3]))

    class _Cleanup:
        jobs_deleted, bytes_freed, deleted_job_ids = 0, 0, []

    servicer = PersistServicer(
        storage,
        ImmediateReactor(),
        is_healthy=lambda: True,
        ingest_stats=lambda: {},
        delete_job=storage.delete_job,
        cleanup=lambda dry_run: defer.succeed(_Cleanup()),
        max_limit=MAX_LIMIT,
        batch_max_items=7,
        batch_max_bytes=50,
    )
    return servicer, storage


def _call(servicer, rpc: str, request):
    """(code, response or list of streamed messages)."""
    context = FakeContext()
    try:
        result = getattr(servicer, rpc)(request, context)
        if rpc.startswith("Query"):
            result = list(result)
    except Aborted as e:
        return e.code, None
    finally:
        context.terminate()
    return grpc.StatusCode.OK, result


def _select(records, start, end, offset, limit):
    chosen = [r for r in records
              if (start <= 0 or r[0] >= start) and (end <= 0 or r[0] <= end)]
    chosen = chosen[offset:]
    return chosen[:limit] if limit else chosen


def _page_ok(limit, offset) -> bool:
    return 0 <= limit <= MAX_LIMIT and 0 <= offset <= MAX_LIMIT


def _range_ok(start, end) -> bool:
    return not (start > 0 and end > 0 and start > end)


def check_query_logs(job, stream, start, end, limit, offset, batched: bool) -> None:
    """QueryLogs / QueryLogsBatched: the documented validation order gives the code; an OK
    answer is exactly the stored lines after range, offset and limit."""
    servicer, _ = _servicer()
    request = pb.QueryLogsRequest(job_uuid=job, stream=stream, start_time=start, end_time=end,
                                  limit=limit, offset=offset, node_id="n")
    code, result = _call(servicer, "QueryLogsBatched" if batched else "QueryLogs", request)
    if not is_valid_job_id(job) or stream not in (0, 1, 2) or not _page_ok(limit, offset) \
            or not _range_ok(start, end):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
        return
    if job not in (KNOWN, OTHER):
        assert code == grpc.StatusCode.NOT_FOUND, code
        return
    assert code == grpc.StatusCode.OK, code
    lines = [ln for b in result for ln in b.lines] if batched else result
    if batched:
        assert all(0 < len(b.lines) <= 7 for b in result)
    if job == KNOWN:
        source = LINES[stream - 1::2] if stream else LINES
    else:
        source = LINES[:3] if stream in (0, 1) else []
    want = _select(source, start, end, offset, limit)
    assert [(ln.timestamp, ln.sequence, ln.content) for ln in lines] == want


def check_query_metrics(job, start, end, limit, offset, batched: bool) -> None:
    """QueryMetrics / QueryMetricsBatched, likewise."""
    servicer, _ = _servicer()
    request = pb.QueryMetricsRequest(job_uuid=job, start_time=start, end_time=end, limit=limit,
                                     offset=offset)
    code, result = _call(servicer, "QueryMetricsBatched" if batched else "QueryMetrics",
                         request)
    if not is_valid_job_id(job) or not _page_ok(limit, offset) or not _range_ok(start, end):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
        return
    if job not in (KNOWN, OTHER):
        assert code == grpc.StatusCode.NOT_FOUND, code
        return
    assert code == grpc.StatusCode.OK, code
    metrics = [m for b in result for m in b.metrics] if batched else result
    want = _select(SAMPLES if job == KNOWN else [], start, end, offset, limit)
    assert [(m.timestamp, m.sequence) for m in metrics] == [(t, s) for t, s, _ in want]


def check_unary(job, since, until, limit, offset) -> None:
    """GetJobInfo, DeleteJob, ListJobs, GetStats, Ping, CleanupOldData with random fields."""
    servicer, storage = _servicer()
    code, info = _call(servicer, "GetJobInfo", pb.GetJobInfoRequest(job_uuid=job))
    if not is_valid_job_id(job):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    elif job in (KNOWN, OTHER):
        assert code == grpc.StatusCode.OK and info.job_uuid == job, code
    else:
        assert code == grpc.StatusCode.NOT_FOUND, code

    code, listed = _call(servicer, "ListJobs", pb.ListJobsRequest(since=since, until=until,
                                                                  limit=limit, offset=offset))
    if not _range_ok(since, until) or not _page_ok(limit, offset):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    else:
        assert code == grpc.StatusCode.OK, code
        created = 1_700_000_000
        matches = 2 if (since <= 0 or created >= since) and (until <= 0 or created <= until) \
            else 0
        assert listed.total_count == matches
        assert len(listed.jobs) == len(_select([0] * matches, 0, 0, offset, limit))

    for rpc, request in (("GetStats", pb.GetStatsRequest()), ("Ping", pb.PingRequest()),
                         ("CleanupOldData", pb.CleanupRequest(dry_run=bool(limit & 1)))):
        code, _ = _call(servicer, rpc, request)
        assert code == grpc.StatusCode.OK, (rpc, code)

    code, deleted = _call(servicer, "DeleteJob", pb.DeleteJobRequest(job_uuid=job, node_id="x"))
    if not is_valid_job_id(job):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code
        assert storage.deleted == []
    else:
        assert code == grpc.StatusCode.OK and deleted.success, code
        assert storage.job_info(job) is None
    assert servicer.active_rpcs == 0


class GrpcFuzzTests(SynchronousTestCase):
    @given(rpc_job_ids, st.one_of(st.integers(0, 3), INT32), times, times, page, page,
           st.booleans())
    def test_query_logs_fields(self, job, stream, start, end, limit, offset, batched):
        """Random QueryLogs requests: correct code (INVALID_ARGUMENT, NOT_FOUND or OK, never
        INTERNAL), and an OK answer holds exactly the selected lines."""
        check_query_logs(job, stream, start, end, limit, offset, batched)

    @given(rpc_job_ids, times, times, page, page, st.booleans())
    def test_query_metrics_fields(self, job, start, end, limit, offset, batched):
        """Random QueryMetrics requests, likewise."""
        check_query_metrics(job, start, end, limit, offset, batched)

    @given(rpc_job_ids, st.one_of(st.just(0), INT64), st.one_of(st.just(0), INT64), page, page)
    def test_unary_fields(self, job, since, until, limit, offset):
        """Random GetJobInfo, ListJobs and DeleteJob requests, plus GetStats, Ping and
        CleanupOldData: correct codes, never INTERNAL, no RPC slot left behind."""
        check_unary(job, since, until, limit, offset)
