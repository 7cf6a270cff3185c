"""Tests for joblet_persist.framing.decode_log_frames (the C extension and its pure-Python twin)
and the bulk receive path built on it: IngestProtocol handing groups to ``add_logs``, and
BatchingWriter.add_logs.

The decoders are checked against a reference built on the generated protobuf classes (upb):
whatever upb decodes, the decoders must decode identically or leave to the general decoder.
"""

from __future__ import annotations

import struct
from array import array

from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from joblet_persist import events, framing, ingest
from joblet_persist._proto import ipc_pb2
from joblet_persist.ingest import IngestFactory
from joblet_persist.writer import (
    MESSAGE_MEMORY,
    MESSAGE_OVERHEAD,
    BatchingWriter,
    IBulkLogWriter,
    IBulkOtherWriter,
    IGroupWriter,
    IIngestWriter,
    WriterStopped,
)
from tests import test_ingest, test_writer
from tests.fakes import FakeStorage
from tests.test_events import SAMPLES, encode_event, valid_events
from tests.test_events import _event_wire_field as event_wire_field
from tests.test_storage_format import _wire_field as metric_wire_field

try:
    from joblet_persist._speedups import decode_log_frames as decode_c
except ImportError:
    decode_c = None

MASK64 = (1 << 64) - 1
JOBS = ["0b7c6a1e-3f7e-4d2a-9c1b-123456789abc", "job-2", "", "ünï\u20accode", "\U0010ffff"]


# -- the reference: upb through the generated classes ---------------------------------------

_ENVELOPE_WIRE = {1: 0, 2: 0, 3: 2, 4: 0, 5: 0, 6: 2}
_LOGLINE_WIRE = {1: 2, 2: 0, 3: 0, 4: 0, 5: 2}


def _plain_structure(raw: bytes, known: dict, single=()) -> bool:
    """upb's own list of the message's top-level fields (parsed as an empty message, every
    field is unknown): no group, every known field with its own wire type, the fields in
    ``single`` at most once."""
    seen = set()
    for f in unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(raw)):
        if f.wire_type == 3:
            return False
        wire = known.get(f.field_number)
        if wire is not None and f.wire_type != wire:
            return False
        if f.field_number in single:
            if f.field_number in seen:
                return False
            seen.add(f.field_number)
    return True


def reference_frame(body: bytes):
    """(job, stream, timestamp, sequence, content) of a canonical LOG frame, else None."""
    try:
        env = ipc_pb2.IPCMessage.FromString(body)
        if env.type != 1 or not _plain_structure(body, _ENVELOPE_WIRE, (6,)):
            return None
        line = ipc_pb2.LogLine.FromString(env.data)
        if not _plain_structure(env.data, _LOGLINE_WIRE):
            return None
    except DecodeError:
        return None
    if line.stream not in (1, 2):
        return None
    return env.job_uuid, line.stream, line.timestamp, line.sequence, line.content


def reference_other(body: bytes):
    """(type, job, timestamp, sequence, data, length) of a frame whose envelope is canonical
    and whose type is not LOG, else None."""
    try:
        env = ipc_pb2.IPCMessage.FromString(body)
    except DecodeError:
        return None
    if env.type == 1 or not _plain_structure(body, _ENVELOPE_WIRE, (6,)):
        return None
    return env.type, env.job_uuid, env.timestamp, env.sequence, env.data, len(body)


def reference_decode(data: bytes, offset: int, max_length: int, arrivals: dict, others=None,
                     grouped: bool = False):
    """decode_log_frames written the straightforward way, on the generated classes.  With
    ``grouped`` (and ``others``), a metric or event frame whose payload is plain
    (reference_payload_time) joins the group (job, -type), and one that is not, after such
    a group of its (job, type) exists, stops the walk ("slow")."""
    groups: dict = {}
    nxt: dict = {}
    pos, end = offset, len(data)
    while True:
        if end - pos < 4:
            reason = "end" if pos == end else "partial"
            break
        (length,) = struct.unpack_from(">I", data, pos)
        if length > max_length:
            reason = "slow"
            break
        if pos + 4 + length > end:
            reason = "partial"
            break
        body = data[pos + 4 : pos + 4 + length]
        got = reference_frame(body)
        if got is None:
            other = None if others is None else reference_other(body)
            if other is None:
                reason = "slow"
                break
            arrival = None
            if 2 <= other[0] <= 9:
                msg_type, job, env_ts, env_seq, payload = other[:5]
                time = (reference_payload_time(msg_type, payload, env_ts, env_seq)
                        if grouped else None)
                if grouped and time is None and (job, -msg_type) in groups:
                    reason = "slow"
                    break
                arrival = nxt.get(job, arrivals.get(job, 0))
                nxt[job] = arrival + 1
                if time is not None:
                    columns = groups.setdefault(
                        (job, -msg_type), [array("q"), array("Q"), array("q"), []]
                    )
                    for column, value in zip(columns, (*time, arrival, payload), strict=True):
                        column.append(value)
                    pos += 4 + length
                    continue
            others.append((*other, arrival))
            pos += 4 + length
            continue
        job, stream, timestamp, sequence, content = got
        arrival = nxt.get(job, arrivals.get(job, 0))
        nxt[job] = arrival + 1
        columns = groups.setdefault((job, stream), [[], [], [], []])
        for column, value in zip(columns, (timestamp, sequence, arrival, content), strict=True):
            column.append(value)
        pos += 4 + length
    arrivals.update(nxt)
    return pos, groups, reason

_METRIC_WIRE = {1: 2, 2: 0, 3: 0, 4: 2}
_METRIC_DATA_WIRE = {1: 1, 2: 0, 3: 1, 4: 2, 5: 2}
_IO_WIRE = {1: 0, 2: 0, 3: 0, 4: 0}
_U32_MAX = (1 << 32) - 1


def _wire_fields(raw: bytes) -> list:
    return list(unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(raw)))


def reference_payload_time(msg_type: int, payload: bytes, env_ts: int, env_seq: int):
    """Grouped mode's reference: the record time of a metric or event payload upb parses
    and whose structure is plain (every known field with its own wire type, no group,
    embedded messages once, uint32 values within 32 bits), else None.  Metrics: the
    payload's time, or the envelope's when the payload's timestamp is 0; events: the
    envelope's, or the payload's when the envelope's timestamp is 0."""
    try:
        if msg_type == 2:
            metric = ipc_pb2.Metric.FromString(payload)
            if not _plain_structure(payload, _METRIC_WIRE, (4,)):
                return None
            for f in _wire_fields(payload):
                if f.field_number != 4:
                    continue
                if not _plain_structure(f.data, _METRIC_DATA_WIRE, (4, 5)):
                    return None
                for g in _wire_fields(f.data):
                    if g.field_number in (4, 5) and not _plain_structure(g.data, _IO_WIRE):
                        return None
            if metric.timestamp:
                return metric.timestamp, metric.sequence
            return env_ts, env_seq
        kind = events.KINDS_BY_TYPE[msg_type]
        view = kind.view_class.FromString(payload)
        wire = {1: 2, 2: 0, 3: 0}
        u32 = set()
        for field in kind.fields:
            wire[field.number] = 2 if field.type in ("string", "repeated string") else 0
            if field.type == "uint32":
                u32.add(field.number)
        if not _plain_structure(payload, wire):
            return None
        if any(f.field_number in u32 and f.data > _U32_MAX for f in _wire_fields(payload)):
            return None
    except DecodeError:
        return None
    if env_ts:
        return env_ts, env_seq
    return view.timestamp, view.sequence


def reference_decode_grouped(data: bytes, offset: int, max_length: int, arrivals: dict,
                             others: list):
    """decode_log_frames(..., others, grouped=True) the straightforward way."""
    return reference_decode(data, offset, max_length, arrivals, others, grouped=True)

# -- wire-level encoding, with the liberties the format allows -------------------------------


def varint(value: int, pad: int = 0) -> bytes:
    """``value`` modulo 2**64 as a varint, ``pad`` bytes longer than needed (overlong)."""
    value &= MASK64
    digits = []
    while True:
        digits.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    digits += [0] * pad
    return bytes([d | 0x80 for d in digits[:-1]] + [digits[-1]])


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# Overlong encodings: none in most messages, some that stay within the limits, or any.
_pad_styles = st.sampled_from([
    st.just(0),
    st.just(0),
    st.sampled_from([0] * 6 + [1, 2, 3]),
    st.sampled_from([0] * 4 + [1, 2, 4, 5, 8, 9, 10]),
])


@st.composite
def wire_field(draw, number: int, wire: int, value, pads=st.just(0)):
    """One field: tag, then the value for its wire type (int for 0/1/5, bytes for 2, a list of
    encoded fields for a group); ``pads`` draws how overlong each varint is."""
    tag = varint(number << 3 | wire, draw(pads))
    if wire == 0:
        return tag + varint(value, draw(pads))
    if wire == 1:
        return tag + struct.pack("<Q", value & MASK64)
    if wire == 5:
        return tag + struct.pack("<I", value & 0xFFFFFFFF)
    if wire == 2:
        return tag + varint(len(value), draw(pads)) + value
    return tag + b"".join(value) + varint(number << 3 | 4)


_u64 = st.integers(0, MASK64)
_i64 = st.integers(-(1 << 63), (1 << 63) - 1)
_u32 = st.one_of(st.integers(0, 0xFFFFFFFF), _u64)
_odd_enums = [0, 3, 9, -1, (1 << 32) + 1, (1 << 32) + 2, 1 << 63]
_type = st.sampled_from([1] * 14 + [2] + _odd_enums)
_stream = st.sampled_from([1] * 7 + [2] * 7 + _odd_enums)
_job_bytes = st.sampled_from(
    [j.encode() for j in JOBS] * 6
    + [b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"a\x80"]
)


@st.composite
def unknown_field(draw, known: int, pads):
    """A field unknown to a message whose field numbers go up to ``known``."""
    number = draw(st.one_of(st.integers(known + 1, 40), st.sampled_from([(1 << 29) - 1, 0])))
    wire = draw(st.sampled_from([0, 1, 2, 5, 0, 2, 3]))
    if wire == 2:
        value = draw(st.binary(max_size=12))
    elif wire == 3:
        value = [draw(wire_field(1, 0, draw(_u64)))]
    else:
        value = draw(_u64)
    return draw(wire_field(number, wire, value, pads))


@st.composite
def wrong_wire_field(draw, wires: dict, pads):
    """A known field number sent with another wire type than its own."""
    number = draw(st.sampled_from(sorted(wires)))
    wire = draw(st.sampled_from([w for w in (0, 1, 2, 5) if w != wires[number]]))
    value = draw(st.binary(max_size=4)) if wire == 2 else draw(_u64)
    return draw(wire_field(number, wire, value, pads))


@st.composite
def mutate(draw, fields: list, extras) -> bytes:
    """Usually the fields as given; sometimes with some dropped, duplicated, reordered, and
    extra fields from ``extras`` added."""
    if draw(st.integers(0, 2)):
        return b"".join(fields)
    fields = [f for f in fields if draw(st.integers(0, 7))]
    fields += draw(st.lists(st.sampled_from(fields), max_size=2)) if fields else []
    fields += draw(st.lists(extras, max_size=3))
    return b"".join(draw(st.permutations(fields)))


@st.composite
def log_line(draw) -> bytes:
    pads = draw(_pad_styles)
    fields = [
        draw(wire_field(1, 2, draw(_job_bytes), pads)),
        draw(wire_field(2, 0, draw(_stream), pads)),
        draw(wire_field(3, 0, draw(_i64), pads)),
        draw(wire_field(4, 0, draw(_u64), pads)),
        draw(wire_field(5, 2, draw(st.binary(max_size=40)), pads)),
    ]
    extras = st.one_of(unknown_field(5, pads), wrong_wire_field(_LOGLINE_WIRE, pads))
    return draw(mutate(fields, extras))


@st.composite
def envelope(draw) -> bytes:
    pads = draw(_pad_styles)
    fields = [
        draw(wire_field(1, 0, draw(_u32), pads)),
        draw(wire_field(2, 0, draw(_type), pads)),
        draw(wire_field(3, 2, draw(_job_bytes), pads)),
        draw(wire_field(4, 0, draw(_i64), pads)),
        draw(wire_field(5, 0, draw(_u64), pads)),
        draw(wire_field(6, 2, draw(log_line()), pads)),
    ]
    extras = st.one_of(
        unknown_field(6, pads), wrong_wire_field(_ENVELOPE_WIRE, pads), repeated_data(pads)
    )
    return draw(mutate(fields, extras))


@st.composite
def repeated_data(draw, pads) -> bytes:
    """One more data field (upb merges repeated embedded messages)."""
    return draw(wire_field(6, 2, draw(log_line()), pads))


def canonical_body(job, stream, timestamp, sequence, content, **env) -> bytes:
    """A LOG frame body as protobuf serializes it."""
    line = ipc_pb2.LogLine(
        job_uuid=job, stream=stream, timestamp=timestamp, sequence=sequence, content=content
    ).SerializeToString()
    return ipc_pb2.IPCMessage(
        version=env.get("version", 1), type=env.get("type", 1), job_uuid=job,
        timestamp=env.get("env_ts", 7), sequence=env.get("env_seq", 8), data=line,
    ).SerializeToString()


_canonical_bodies = st.builds(
    canonical_body,
    st.sampled_from(JOBS),
    st.sampled_from([1, 2]),
    _i64,
    _u64,
    st.binary(max_size=60),
)

_any_bodies = st.one_of(
    _canonical_bodies, envelope(), st.binary(max_size=30), st.just(b""),
    st.builds(lambda t: canonical_body("j", 1, 1, 1, b"x", type=t), st.integers(0, 12)),
)


_mixed_bodies = st.one_of(
    _canonical_bodies, _canonical_bodies, _canonical_bodies,
    st.builds(
        lambda t, job, ts, seq, payload, version: ipc_pb2.IPCMessage(
            version=version, type=t, job_uuid=job, timestamp=ts, sequence=seq, data=payload
        ).SerializeToString(),
        st.sampled_from([2, 3, 4, 5, 6, 7, 8, 9, 0, 10, 12, -1]), st.sampled_from(JOBS),
        _i64, _u64, st.binary(max_size=30), st.integers(0, 0xFFFFFFFF),
    ),
    envelope(), st.binary(max_size=20),
)



@st.composite
def _other_bodies(draw) -> bytes:
    """A metric or event frame (type 2..9) of canonical envelope whose payload is as an
    encoder writes it, or has wire liberties (unknown fields, wrong wire types, groups,
    repeated embedded messages, 10-byte varints, uint32 values past 32 bits, bad UTF-8), or
    is cut short; envelope time set or 0."""
    msg_type = draw(st.integers(2, 9))
    style = draw(st.sampled_from(["encoder", "encoder", "liberties", "cut"]))
    if msg_type == 2:
        if style == "liberties":
            payload = b"".join(draw(st.lists(metric_wire_field(range(1, 5)), max_size=6)))
        else:
            payload = test_ingest.metric_body(ts=draw(st.sampled_from([0, 5, -1])),
                                              seq=draw(_u64))[1]
    elif style == "liberties":
        payload = b"".join(draw(st.lists(event_wire_field(), max_size=8)))
    else:
        kind_type, values, ts, seq = draw(valid_events())
        msg_type = kind_type
        payload = encode_event(msg_type, values, ts=ts, seq=seq)
    if style == "cut":
        payload = payload[: draw(st.integers(0, len(payload)))]
    return ipc_pb2.IPCMessage(
        version=1, type=msg_type, job_uuid=draw(st.sampled_from(JOBS[:3])),
        timestamp=draw(st.sampled_from([0, 7, -(1 << 63)])), sequence=draw(_u64), data=payload,
    ).SerializeToString()


_grouped_bodies = st.one_of(_canonical_bodies, _other_bodies(), _other_bodies(), _mixed_bodies)


# -- the decoders ----------------------------------------------------------------------------

# The property tests below run from several test classes (one per implementation): each run is
# self-contained, so Hypothesis' check against one test function serving several classes does
# not apply.
shared = settings(
    suppress_health_check=[*settings.default.suppress_health_check,
                           HealthCheck.differing_executors]
)
shared_fewer = settings(shared, max_examples=max(1, settings.default.max_examples // 2))


class DecoderTestsMixin:
    """decode_log_frames' contract; ``decode`` is the implementation under test."""

    decode = None

    def check(self, data: bytes, offset: int = 0, max_length: int = 1 << 30, arrivals=None,
              others: bool = False, grouped: bool = False):
        """Run the decoder and the reference on the same input; they must agree exactly, also
        on the arrivals dict afterwards (and on the ``others`` list when ``others``; with
        ``grouped`` too, the decoder's grouped mode).  Returns the result."""
        arrivals = arrivals or {}
        others = others or grouped
        want_arrivals = dict(arrivals)
        want_others = [] if others else None
        reference = reference_decode_grouped if grouped else reference_decode
        want = reference(data, offset, max_length, want_arrivals, want_others)
        got_arrivals = dict(arrivals)
        got_others = [] if others else None
        if grouped:
            got = type(self).decode(data, offset, max_length, got_arrivals, got_others, True)
        elif others:
            got = type(self).decode(data, offset, max_length, got_arrivals, got_others)
        else:
            got = type(self).decode(data, offset, max_length, got_arrivals)
        self.assertEqual(got, want)
        self.assertEqual(got_arrivals, want_arrivals)
        self.assertEqual(got_others, want_others)
        for item in got_others or ():
            self.assertEqual([type(v) for v in item[:6]], [int, str, int, int, bytes, int])
        self.assertIsInstance(got, tuple)
        pos, groups, reason = got
        seen: dict = {}
        for (job, code), columns in groups.items():
            self.assertIs(type(job), str)
            # Log streams' int columns are lists; metrics' and events' are packed.
            if code > 0:
                self.assertEqual([type(c) for c in columns], [list] * 4)
            else:
                self.assertEqual([type(c) for c in columns], [array, array, array, list])
                self.assertEqual([c.typecode for c in columns[:3]], ["q", "Q", "q"])
            # One str object per job id within a call.
            self.assertIs(seen.setdefault(job, job), job)
            self.assertEqual(len({len(c) for c in columns}), 1)
            self.assertTrue(all(type(c) is bytes for c in columns[3]))
            self.assertTrue(all(type(v) is int for c in columns[:3] for v in c))
        return got

    @shared
    @given(st.lists(_canonical_bodies, max_size=20))
    def test_canonical_frames(self, bodies):
        """Frames as protobuf serializes them are all decoded, in order, to the end."""
        data = b"".join(map(frame, bodies))
        pos, groups, reason = self.check(data)
        self.assertEqual((pos, reason), (len(data), "end"))
        self.assertEqual(sum(len(c[0]) for c in groups.values()), len(bodies))

    @shared_fewer
    @given(st.lists(envelope(), max_size=6))
    def test_wire_liberties(self, bodies):
        """Unknown fields of every wire type, groups, duplicated fields, overlong and maximal
        varints, tags and sizes, wrong wire types, reordered fields, a repeated data field,
        invalid UTF-8: decoded exactly as upb decodes them, or left to the general decoder.
        Each frame alone, then all of them in a row."""
        for body in bodies:
            self.check(frame(body))
        self.check(b"".join(map(frame, bodies)))

    @shared
    @given(st.lists(st.binary(max_size=40), max_size=8))
    def test_random_bodies(self, bodies):
        """Random bytes inside well-formed length prefixes."""
        self.check(b"".join(map(frame, bodies)))

    @shared
    @given(st.binary(max_size=200))
    def test_random_stream(self, data):
        """Random bytes as a whole stream, length prefixes included."""
        self.check(data)

    @shared
    @given(st.lists(_any_bodies, min_size=1, max_size=10), st.data())
    def test_truncated_and_offsets(self, bodies, data):
        """Any stream cut at any point, decoded from any offset."""
        stream = b"".join(map(frame, bodies))
        cut = data.draw(st.integers(0, len(stream)))
        offset = data.draw(st.integers(0, cut))
        self.check(stream[:cut], offset)

    @shared
    @given(st.lists(_canonical_bodies, min_size=1, max_size=6), st.data())
    def test_max_length_edges(self, bodies, data):
        """A frame longer than max_length stops the walk ("slow") whether or not it is
        complete; one exactly max_length long is decoded."""
        stream = b"".join(map(frame, bodies))
        lengths = sorted({len(b) for b in bodies})
        pick = data.draw(st.sampled_from(lengths))
        max_length = data.draw(st.sampled_from([pick - 1, pick, pick + 1, 0, -1, 1 << 70]))
        cut = data.draw(st.sampled_from([len(stream), len(stream) - 1]))
        self.check(stream[:cut], 0, max_length)

    @shared
    @given(
        st.lists(_canonical_bodies, max_size=10),
        st.dictionaries(st.sampled_from(JOBS), st.integers(-5, (1 << 62))),
    )
    def test_arrivals(self, bodies, arrivals):
        """Arrival numbers continue each job's counter (0 when missing) across both
        streams, in frame order; the dict holds the next numbers afterwards."""
        self.check(b"".join(map(frame, bodies)), arrivals=arrivals)

    @shared
    @given(st.lists(_mixed_bodies, max_size=20), st.data())
    def test_others_mixed_stream(self, bodies, data):
        """With an ``others`` list, frames of canonical envelope and another type than LOG
        (metrics, events, unknown types, any payload) are collected in frame order and the
        walk goes on; types 2..9 take arrival numbers in frame order with the LOG frames;
        anything else stops it as before.  Also cut anywhere and from any offset."""
        stream = b"".join(map(frame, bodies))
        self.check(stream, others=True)
        cut = data.draw(st.integers(0, len(stream)))
        offset = data.draw(st.integers(0, cut))
        self.check(stream[:cut], offset, others=True, arrivals={"j": 5, JOBS[0]: 1 << 40})

    @shared_fewer
    @given(st.lists(envelope(), max_size=6))
    def test_others_wire_liberties(self, bodies):
        """test_wire_liberties' frames (every type, every liberty) with an ``others`` list."""
        for body in bodies:
            self.check(frame(body), others=True)
        self.check(b"".join(map(frame, bodies)), others=True)

    @shared
    @given(st.lists(_grouped_bodies, max_size=20), st.data())
    def test_grouped_mixed_stream(self, bodies, data):
        """Grouped mode: metric and event frames whose payload is plain join their (job,
        -type) group with the record's time and their arrival number in frame order; others
        land in ``others`` as without it, and one after its (job, type)'s group stops the walk
        ("slow"); LOG frames as always.  Also cut anywhere and from any offset."""
        stream = b"".join(map(frame, bodies))
        self.check(stream, grouped=True)
        cut = data.draw(st.integers(0, len(stream)))
        offset = data.draw(st.integers(0, cut))
        self.check(stream[:cut], offset, grouped=True, arrivals={"j": 5, JOBS[0]: 1 << 40})

    @shared_fewer
    @given(st.lists(envelope(), max_size=6))
    def test_grouped_wire_liberties(self, bodies):
        """test_wire_liberties' frames (every type, every liberty) in grouped mode."""
        for body in bodies:
            self.check(frame(body), grouped=True)
        self.check(b"".join(map(frame, bodies)), grouped=True)

    def test_grouped_many_jobs(self):
        """Grouped mode over 40 jobs (the decoder's job table grows while groups are open):
        every metric and event frame lands in its job's group, as the reference says."""
        bodies = []
        for i in range(400):
            job = f"job-{i % 40}"
            slot = (i + i // 40) % 10
            if slot < 7:
                bodies.append(canonical_body(job, 1 + slot % 2, i, i, b"%d" % i))
            elif slot == 7:
                bodies.append(test_ingest.metric_body(job=job, seq=i)[0])
            else:
                msg_type = 3 + i % 7
                bodies.append(ipc_pb2.IPCMessage(
                    type=msg_type, job_uuid=job, timestamp=i, sequence=i,
                    data=encode_event(msg_type, SAMPLES[msg_type])).SerializeToString())
        pos, groups, reason = self.check(b"".join(map(frame, bodies)), grouped=True)
        self.assertEqual(reason, "end")
        self.assertEqual(sum(len(c[0]) for c in groups.values()), 400)
        self.assertEqual(len({job for job, _ in groups}), 40)

    def test_grouped_keeps_order(self):
        """Grouped mode by hand: a metric and an exec event of plain payload are grouped
        with the record's time (metric: its payload's; event: its envelope's, or its
        payload's when that is 0); a non-plain one before any group of its (job, type) goes
        to ``others``, one after such a group stops the walk at its start."""
        metric_wire, metric = test_ingest.metric_body(job="j", ts=40, seq=41, env_ts=1)
        ev = encode_event(3, SAMPLES[3], ts=50, seq=51)
        exec_env = ipc_pb2.IPCMessage(type=3, job_uuid="j", timestamp=9, sequence=8,
                                      data=ev).SerializeToString()
        exec_zero = ipc_pb2.IPCMessage(type=3, job_uuid="j", data=ev).SerializeToString()
        odd = ev + b"\x20\x01"  # pid again: still plain (the last one wins)
        exec_odd = ipc_pb2.IPCMessage(type=3, job_uuid="j", data=odd).SerializeToString()
        bad = ipc_pb2.IPCMessage(type=3, job_uuid="j", data=b"\x42\x01").SerializeToString()
        bad_first = ipc_pb2.IPCMessage(type=4, job_uuid="j", data=b"\x20\xff\xff\xff\xff\x1f",
                                       timestamp=3).SerializeToString()
        log = canonical_body("j", 1, 1, 1, b"x")
        stream = b"".join(map(frame, [bad_first, log, metric_wire, exec_env, exec_zero,
                                      exec_odd, bad, log]))
        others: list = []
        arrivals: dict = {}
        pos, groups, reason = type(self).decode(stream, 0, 1 << 20, arrivals, others, True)
        stop = sum(len(frame(b)) for b in [bad_first, log, metric_wire, exec_env, exec_zero,
                                           exec_odd])
        self.assertEqual((pos, reason), (stop, "slow"))
        self.assertEqual([o[:4] + o[5:] for o in others], [(4, "j", 3, 0, len(bad_first), 0)])
        self.assertEqual(groups, {
            ("j", 1): [[1], [1], [1], [b"x"]],
            ("j", -2): [array("q", [40]), array("Q", [41]), array("q", [2]), [metric]],
            ("j", -3): [array("q", [9, 50, 50]), array("Q", [8, 51, 51]), array("q", [3, 4, 5]),
                        [ev, ev, odd]],
        })
        self.assertEqual(arrivals, {"j": 6})
        # Not grouped without the flag; the flag needs the list.
        self.assertEqual(len(type(self).decode(stream, 0, 1 << 20, {}, [])[1]), 1)
        self.assertRaises(ValueError, type(self).decode, stream, 0, 1 << 20, {}, None, True)

    def test_grouped_extremes_are_exact(self):
        """The packed int columns of a metric or event group keep the 64-bit extremes
        exactly: the smallest int64 timestamp, the largest uint64 sequence, and the largest
        arrival numbers (2**63 - 1 is never given); a group of many frames (past the first growth of the C
        decoder's scratch) keeps every value in order."""
        ev = encode_event(3, SAMPLES[3], ts=50, seq=51)
        low = ipc_pb2.IPCMessage(type=3, job_uuid="j", timestamp=-(1 << 63), sequence=MASK64,
                                 data=ev).SerializeToString()
        many = [ipc_pb2.IPCMessage(type=3, job_uuid="k", timestamp=i + 1, sequence=i,
                                   data=ev).SerializeToString() for i in range(300)]
        arrivals = {"j": (1 << 63) - 3, "k": 5}
        pos, groups, reason = self.check(b"".join(map(frame, [low, low, *many])),
                                         arrivals=arrivals, grouped=True)
        self.assertEqual(reason, "end")
        ts, seq, arr, items = groups[("j", -3)]
        self.assertEqual((list(ts), list(seq), list(arr)),
                         ([-(1 << 63)] * 2, [MASK64] * 2, [(1 << 63) - 3, (1 << 63) - 2]))
        ts, seq, arr, items = groups[("k", -3)]
        self.assertEqual((list(ts), list(seq), list(arr)),
                         (list(range(1, 301)), list(range(300)), list(range(5, 305))))

    def test_others_keep_the_group(self):
        """LOG frames between metric and event frames make one group; the other frames come
        back as (type, job, envelope timestamp, sequence, payload, length, arrival)."""
        log = canonical_body("j", 1, 1, 1, b"x")
        metric = ipc_pb2.IPCMessage(type=2, job_uuid="j", timestamp=-5, sequence=MASK64,
                                    data=b"m").SerializeToString()
        exec_event = ipc_pb2.IPCMessage(type=3, job_uuid="k", data=b"e").SerializeToString()
        unknown = ipc_pb2.IPCMessage(type=-3, job_uuid="u").SerializeToString()
        stream = b"".join(map(frame, [log, metric, log, exec_event, unknown, log, b"", log]))
        others: list = []
        arrivals = {"k": 7}
        pos, groups, reason = type(self).decode(stream, 0, 1 << 20, arrivals, others)
        self.assertEqual((pos, reason), (len(stream), "end"))
        self.assertEqual(groups, {("j", 1): [[1] * 4, [1] * 4, [0, 2, 3, 4], [b"x"] * 4]})
        self.assertEqual(others, [
            (2, "j", -5, MASK64, b"m", len(metric), 1),
            (3, "k", 0, 0, b"e", len(exec_event), 7),
            (-3, "u", 0, 0, b"", len(unknown), None),
            (0, "", 0, 0, b"", 0, None),
        ])
        self.assertEqual(arrivals, {"j": 5, "k": 8})
        self.assertIs(others[0][1], next(iter(groups))[0])
        # Without the list, the first metric frame stops the walk.
        self.assertEqual(type(self).decode(stream, 0, 1 << 20, {})[::2], (len(log) + 4, "slow"))
        self.assertRaises(TypeError, type(self).decode, stream, 0, 100, {}, ())

    def test_exact_rules(self):
        """Hand-written cases of the wire-format rules, with their expected stop reason."""
        env = b"\x08\x01\x10\x01\x1a\x01j"
        line = b"\x10\x01\x18\x05\x20\x06\x2a\x01c"
        cases = {
            # 10-byte varints: negative int64, and only the 10th byte's lowest bit counts.
            "negative": (env + b"\x32\x0d\x10\x01\x18" + b"\xff" * 9 + b"\x01", "end"),
            "10th byte": (env + b"\x32\x0d\x10\x01\x18" + b"\x80" * 9 + b"\x7e", "end"),
            "11 bytes": (env + b"\x32\x0e\x10\x01\x18" + b"\x80" * 10 + b"\x00", "slow"),
            "stream 2**32+1": (env + b"\x32\x06\x10\x81\x80\x80\x80\x10", "end"),
            "stream -1": (env + b"\x32\x0b\x10" + b"\xff" * 9 + b"\x01", "slow"),
            "type 2**32+1": (b"\x10\x81\x80\x80\x80\x10\x1a\x01j\x32\x02\x10\x02", "end"),
            "tag 5 bytes": (env + b"\xb2\x80\x80\x80\x00\x02\x10\x01", "end"),
            "tag 6 bytes": (env + b"\xb2\x80\x80\x80\x80\x00\x02\x10\x01", "slow"),
            "size 5 bytes": (env + b"\x32\x82\x80\x80\x80\x00\x10\x01", "end"),
            "size 6 bytes": (env + b"\x32\x82\x80\x80\x80\x80\x00\x10\x01", "slow"),
            "field 0": (env + b"\x32\x02\x10\x01\x00\x00", "slow"),
            "wire type 6": (env + b"\x32\x02\x10\x01\x0e", "slow"),
            "unknown group": (env + b"\x32\x02\x10\x01\x3b\x08\x01\x3c", "slow"),
            "end group": (env + b"\x32\x02\x10\x01\x3c", "slow"),
            "unknown fields": (env + b"\x38\x05\x41" + b"\x00" * 8 + b"\x4a\x01z\x55\x00\x00\x00\x00"
                               + b"\x32\x02\x10\x01", "end"),
            "wrong wire type": (env + b"\x22\x00\x32\x02\x10\x01", "slow"),
            "repeated data": (env + b"\x32\x02\x10\x01\x32\x02\x10\x02", "slow"),
            "duplicate scalars": (env + b"\x10\x01\x1a\x01k\x32\x0e\x10\x02\x10\x01" + line[2:]
                                  + b"\x2a\x01d", "end"),
            "bad utf8 payload job": (env + b"\x32\x05\x0a\x01\xff\x10\x01", "slow"),
            "bad utf8 earlier job": (b"\x1a\x01\xff" + env + b"\x32\x02\x10\x01", "slow"),
            "surrogate": (b"\x10\x01\x1a\x03\xed\xa0\x80\x32\x02\x10\x01", "slow"),
            "max code point": (b"\x10\x01\x1a\x04\xf4\x8f\xbf\xbf\x32\x02\x10\x01", "end"),
            "no data": (env, "slow"),
            "empty frame": (b"", "slow"),
            "size past the end": (env + b"\x32\x09\x10\x01", "slow"),
        }
        for name, (body, reason) in cases.items():
            pos, groups, got = self.check(frame(body))
            self.assertEqual(got, reason, name)
            self.assertEqual(pos, len(body) + 4 if reason == "end" else 0, name)
        pos, groups, _ = self.check(frame(cases["negative"][0]))
        self.assertEqual(groups[("j", 1)][0], [-1])
        pos, groups, _ = self.check(frame(cases["duplicate scalars"][0]))
        self.assertEqual(groups, {("k", 1): [[5], [6], [0], [b"d"]]})

    def test_stop_offsets(self):
        """"slow" and "partial" return the start of the frame they stopped at; fewer than 4
        bytes left is "partial"; nothing left is "end"."""
        good = frame(canonical_body("j", 1, 1, 1, b"x"))
        bad = frame(b"\xff")
        decode = type(self).decode
        self.assertEqual(decode(good + bad + good, 0, 100, {})[::2], (len(good), "slow"))
        self.assertEqual(decode(good + good[:-1], 0, 100, {})[::2], (len(good), "partial"))
        self.assertEqual(decode(good + good[:3], 0, 100, {})[::2], (len(good), "partial"))
        self.assertEqual(decode(good, len(good), 100, {}), (len(good), {}, "end"))
        self.assertEqual(decode(good + good, 0, len(good) - 5, {})[::2], (0, "slow"))

    def test_arrivals_untouched_when_nothing_decoded(self):
        """Jobs are entered into arrivals only for decoded frames."""
        arrivals = {}
        type(self).decode(frame(canonical_body("j", 3, 1, 1, b"x")), 0, 100, arrivals)
        self.assertEqual(arrivals, {})

    def test_arrival_overflow(self):
        """A counter that would pass 2**63 - 1, or a value out of the int64 range, raises
        OverflowError and leaves the dict unchanged; a non-int raises TypeError."""
        data = frame(canonical_body("j", 1, 1, 1, b"x")) * 2
        decode = type(self).decode
        for start in ((1 << 63) - 2, 1 << 63, -(1 << 63) - 1):
            arrivals = {"j": start}
            self.assertRaises(OverflowError, decode, data, 0, 100, arrivals)
            self.assertEqual(arrivals, {"j": start})
        self.assertRaises(TypeError, decode, data, 0, 100, {"j": 1.5})
        arrivals = {"j": (1 << 63) - 3}
        decode(data, 0, 100, arrivals)
        self.assertEqual(arrivals, {"j": (1 << 63) - 1})

    def test_argument_errors(self):
        """Bad arguments raise the same errors in both implementations."""
        decode = type(self).decode
        data = frame(canonical_body("j", 1, 1, 1, b"x"))
        for bad in (bytearray(data), memoryview(data), data.decode("latin-1")):
            self.assertRaises(TypeError, decode, bad, 0, 100, {})
        self.assertRaises(TypeError, decode, data, 0, 100, [])
        self.assertRaises(TypeError, decode, data, 0.0, 100, {})
        self.assertRaises(TypeError, decode, data, 0, 100.0, {})
        self.assertRaises(TypeError, decode, data, 0, 100)
        for offset in (-1, len(data) + 1, 1 << 70, -(1 << 70)):
            self.assertRaises(ValueError, decode, data, offset, 100, {})

    def test_interning(self):
        """Equal job ids in one call are one str object, also across streams."""
        body1 = canonical_body("job-x", 1, 1, 1, b"a")
        body2 = canonical_body("job-x", 2, 1, 1, b"b")
        _, groups, _ = type(self).decode(frame(body1) + frame(body2), 0, 100, {})
        (a, _), (b, _) = groups
        self.assertIs(a, b)


class PythonDecoderTests(DecoderTestsMixin, SynchronousTestCase):
    """The pure-Python twin against the reference."""

    decode = staticmethod(framing.decode_log_frames_py)


class CDecoderTests(DecoderTestsMixin, SynchronousTestCase):
    """The C extension against the reference."""

    decode = staticmethod(decode_c) if decode_c is not None else None
    if decode_c is None:
        skip = "joblet_persist._speedups is not built (no compiler at install time?)"

    @given(st.binary(max_size=300), st.data())
    def test_same_as_python(self, data, draw):
        """The C and Python implementations return equal results on arbitrary input."""
        offset = draw.draw(st.integers(0, len(data)))
        max_length = draw.draw(st.integers(-1, 400))
        a1, a2 = {"j": 3}, {"j": 3}
        self.assertEqual(
            decode_c(data, offset, max_length, a1),
            framing.decode_log_frames_py(data, offset, max_length, a2),
        )
        self.assertEqual(a1, a2)
        o1, o2 = [], []
        self.assertEqual(
            decode_c(data, offset, max_length, a1, o1),
            framing.decode_log_frames_py(data, offset, max_length, a2, o2),
        )
        self.assertEqual((a1, o1), (a2, o2))
        o1, o2 = [], []
        self.assertEqual(
            decode_c(data, offset, max_length, a1, o1, True),
            framing.decode_log_frames_py(data, offset, max_length, a2, o2, True),
        )
        self.assertEqual((a1, o1), (a2, o2))

    @given(st.lists(_grouped_bodies, max_size=12), st.data())
    def test_grouped_same_as_python(self, bodies, draw):
        """Grouped mode: C and Python agree on streams of metric and event frames of any
        payload, from any offset and cut anywhere."""
        data = b"".join(map(frame, bodies))
        cut = draw.draw(st.integers(0, len(data)))
        offset = draw.draw(st.integers(0, cut))
        a1, a2, o1, o2 = {"j": 3}, {"j": 3}, [], []
        self.assertEqual(
            decode_c(data[:cut], offset, 1 << 20, a1, o1, True),
            framing.decode_log_frames_py(data[:cut], offset, 1 << 20, a2, o2, True),
        )
        self.assertEqual((a1, o1), (a2, o2))


class SelectionTests(SynchronousTestCase):
    def test_implementation_in_use(self):
        """decode_log_frames is the C one when it is built, the Python one otherwise, and
        IMPLEMENTATION says which."""
        if decode_c is not None:
            self.assertIs(framing.decode_log_frames, decode_c)
            self.assertIn("C extension", framing.IMPLEMENTATION)
        else:
            self.assertIs(framing.decode_log_frames, framing.decode_log_frames_py)
            self.assertIn("pure Python", framing.IMPLEMENTATION)


# -- the ingest protocol's bulk path ---------------------------------------------------------


@implementer(IBulkLogWriter)
class BulkWriter:
    """A writer with ``add_logs`` and the shared ``arrivals`` counters, recording every
    message with its arrival number."""

    def __init__(self):
        self.arrivals: dict[str, int] = {}
        self.messages = []
        self.group_calls = 0
        self.stopped = False

    def _next(self, job_id):
        arrival = self.arrivals.get(job_id, 0)
        self.arrivals[job_id] = arrival + 1
        return arrival

    def add_log(self, job_id, stream, timestamp, sequence, content):
        if self.stopped:
            raise WriterStopped("stopping")
        self.messages.append(
            ("log", job_id, stream, timestamp, sequence, content, self._next(job_id))
        )

    def add_logs(self, job_id, stream, timestamps, sequences, arrivals, contents):
        if self.stopped:
            raise WriterStopped("stopping")
        self.group_calls += 1
        for row in zip(timestamps, sequences, contents, arrivals, strict=True):
            self.messages.append(("log", job_id, stream, *row))

    def add_metric(self, job_id, timestamp, sequence, payload):
        if self.stopped:
            raise WriterStopped("stopping")
        self.messages.append(("metric", job_id, timestamp, sequence, payload, self._next(job_id)))

    def add_event(self, job_id, kind, timestamp, sequence, payload):
        if self.stopped:
            raise WriterStopped("stopping")
        self.messages.append(
            ("event", job_id, kind, timestamp, sequence, payload, self._next(job_id))
        )


class BulkIngestTests(test_ingest.IngestTestMixin, SynchronousTestCase):
    """IngestProtocol with a writer that takes groups (``add_logs`` and ``arrivals``)."""

    def setUp(self):
        super().setUp()
        self.writer = BulkWriter()

    def test_bulk_writer_provides_interface(self):
        """The bulk test double provides IIngestWriter, as BatchingWriter does."""
        self.assertTrue(verifyObject(IIngestWriter, self.writer))

    def in_arrival_order(self):
        """The writer's messages per job, sorted by arrival number, as test_ingest's
        reference writes its calls; also checks that arrivals are 0, 1, 2, ... per job."""
        per_job: dict = {}
        for message in self.writer.messages:
            per_job.setdefault(message[1], []).append(message)
        out = {}
        for job, messages in per_job.items():
            messages.sort(key=lambda m: m[-1])
            self.assertEqual([m[-1] for m in messages], list(range(len(messages))))
            out[job] = [m[:-1] for m in messages]
        return out

    def expected(self, bodies):
        calls, rejected = test_ingest.reference(bodies)
        per_job: dict = {}
        for call in calls:
            per_job.setdefault(call[1], []).append(call)
        return per_job, sorted(rejected)

    @shared
    @given(
        st.lists(
            st.one_of(
                st.builds(
                    test_ingest.log_body,
                    content=st.binary(max_size=50),
                    stream=st.integers(0, 3),
                    job=st.sampled_from([test_ingest.JOB, test_ingest.JOB2, "", "../x"]),
                    seq=st.integers(0, 2**40),
                ),
                st.builds(lambda seq: test_ingest.metric_body(seq=seq)[0], st.integers(0, 99)),
                st.builds(test_ingest.envelope, st.integers(0, 12)),
                envelope(),
                st.binary(max_size=30),
            ),
            max_size=20,
        ),
        st.lists(st.integers(0, 3000), max_size=6),
    )
    def test_random_frames_random_splits(self, bodies, splits):
        """Any frames cut anywhere: per job, the messages ordered by arrival number are the
        reference's calls in frame order (LOG and METRIC together), and the rejections are
        the reference's."""
        self.writer.messages, self.metrics.rejected = [], []
        self.writer.arrivals.clear()
        data = b"".join(map(frame, bodies))
        proto, _ = self.feed(data, [s for s in splits if s <= len(data)])
        proto.connectionLost(None)
        per_job, rejected = self.expected(bodies)
        self.assertEqual(self.in_arrival_order(), per_job)
        self.assertEqual(sorted(self.metrics.rejected), rejected)

    def test_one_call_per_group(self):
        """Frames of one read reach the writer as one add_logs call per (job, stream), and
        are counted once through frames_received with their exact byte total."""
        bodies = [test_ingest.log_body(b"%d" % i, stream=1 + i % 2, seq=i,
                                       job=(test_ingest.JOB, test_ingest.JOB2)[i % 3 == 0])
                  for i in range(30)]
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual(self.writer.group_calls, 4)
        self.assertEqual(self.metrics.received, {1: 30})
        self.assertEqual(self.metrics.received_bytes, sum(map(len, bodies)))
        self.assertEqual(sorted(m[4] for m in self.writer.messages), list(range(30)))

    def test_invalid_job_group_rejected(self):
        """A group whose job id is invalid is rejected frame by frame (one invalid_job_id
        each) and leaves no arrival counter behind."""
        bodies = [test_ingest.log_body(job="../x", seq=i) for i in range(3)]
        bodies.insert(1, test_ingest.log_body(seq=9))
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual(self.metrics.rejected, ["invalid_job_id"] * 3)
        self.assertEqual(self.writer.arrivals, {test_ingest.JOB: 1})
        self.assertEqual(self.metrics.received, {1: 4})

    def test_stopping_counts_every_frame(self):
        """When the writer is stopping, every frame of a refused group counts as stopping."""
        self.writer.stopped = True
        self.feed(b"".join(frame(test_ingest.log_body(seq=i)) for i in range(4)))
        self.assertEqual(self.metrics.rejected, ["stopping"] * 4)

    def test_slow_frames_share_the_counters(self):
        """A LOG frame the bulk decoder leaves to the general decoder (here: an unknown group
        field) and a METRIC frame take their arrival numbers from the same counters."""
        slow = test_ingest.log_body(b"slow", seq=2) + b"\x5b\x08\x01\x5c"
        bodies = [test_ingest.log_body(b"a", seq=1), slow, test_ingest.metric_body()[0],
                  test_ingest.log_body(b"b", seq=3)]
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual([m[-1] for m in self.writer.messages], [0, 1, 2, 3])
        self.assertEqual([m[5] for m in self.writer.messages if m[0] == "log"],
                         [b"a", b"slow", b"b"])

    def test_mixed_read_keeps_the_groups(self):
        """LOG frames of one read between metric and event frames still reach the writer as
        one add_logs call per (job, stream); every message's arrival number is its place in
        its job's frames; frames and bytes are counted exactly."""
        bodies, kinds = [], []
        for i in range(40):
            job = (test_ingest.JOB, test_ingest.JOB2)[i % 2]
            if i % 5 == 1:
                bodies.append(test_ingest.metric_body(job=job, seq=i)[0])
                kinds.append("metric")
            elif i % 5 == 3:
                t = 3 + i % 7
                bodies.append(test_ingest.envelope(
                    t, job, encode_event(t, SAMPLES[t]), timestamp=5, sequence=i))
                kinds.append("event")
            else:
                bodies.append(test_ingest.log_body(b"%d" % i, stream=1 + i // 20, seq=i, job=job))
                kinds.append("log")
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual(self.writer.group_calls, 4)
        self.assertEqual(self.metrics.rejected, [])
        per_job = self.in_arrival_order()
        for job in (test_ingest.JOB, test_ingest.JOB2):
            self.assertEqual([m[0] for m in per_job[job]],
                             [k for i, k in enumerate(kinds) if i % 2 == (job == test_ingest.JOB2)])
        self.assertEqual(self.writer.arrivals, {test_ingest.JOB: 20, test_ingest.JOB2: 20})
        self.assertEqual(self.metrics.received_bytes, sum(map(len, bodies)))
        self.assertEqual(sum(self.metrics.received.values()), 40)
        self.assertEqual(self.metrics.received[1], kinds.count("log"))

    def test_rejected_other_frames_renumber(self):
        """A metric or event frame rejected in the middle of a read (bad payload, invalid job,
        unknown type, a stopped writer's refusal) takes no arrival number: the job's later
        frames, LOG groups included, are numbered as if it had not been sent."""
        bad_metric = test_ingest.envelope(2, test_ingest.JOB, b"\xff")
        bad_event = test_ingest.envelope(4, test_ingest.JOB, b"\x20\xff")
        bad_job = test_ingest.metric_body(job="../x")[0]
        unknown = test_ingest.envelope(12, test_ingest.JOB)
        bodies = [test_ingest.log_body(b"a", seq=1), bad_metric, test_ingest.log_body(b"b", seq=2),
                  test_ingest.metric_body(seq=3)[0], bad_event, bad_job, unknown,
                  test_ingest.log_body(b"c", stream=2, seq=4), test_ingest.log_body(b"d", seq=5),
                  test_ingest.metric_body(seq=6)[0], test_ingest.log_body(b"../x", job="../x")]
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual(sorted(self.metrics.rejected),
                         ["bad_payload", "bad_payload", "invalid_job_id", "invalid_job_id",
                          "unknown_type"])
        messages = self.in_arrival_order()[test_ingest.JOB]
        self.assertEqual([m[0] for m in messages],
                         ["log", "log", "metric", "log", "log", "metric"])
        self.assertEqual([m[5] for m in messages if m[0] == "log"], [b"a", b"b", b"c", b"d"])
        self.assertEqual(self.writer.arrivals, {test_ingest.JOB: 6})

    def test_stopped_writer_other_frames(self):
        """A stopping writer refuses metric frames between LOG frames: each counts as
        stopping once, and no arrival number is used by them."""
        self.writer.stopped = True
        bodies = [test_ingest.log_body(seq=1), test_ingest.metric_body()[0],
                  test_ingest.log_body(seq=2)]
        self.feed(b"".join(map(frame, bodies)))
        self.assertEqual(self.metrics.rejected, ["stopping"] * 3)
        self.assertEqual(self.writer.messages, [])

    def test_stringReceived_one_frame(self):
        """stringReceived (one frame without its prefix) takes the same path."""
        proto, _ = self.connect()
        proto.stringReceived(test_ingest.log_body(b"direct"))
        proto.stringReceived(b"\xff")
        self.assertEqual([m[5] for m in self.writer.messages], [b"direct"])
        self.assertEqual(self.metrics.rejected, ["bad_envelope"])


@implementer(IBulkOtherWriter)
class BulkOthersWriter(BulkWriter):
    """BulkWriter with the bulk forms of add_metric and add_event (as BatchingWriter)."""

    def __init__(self):
        super().__init__()
        self.other_calls = 0
        self.single_calls = 0  # add_metric and add_event

    def add_metric(self, job_id, timestamp, sequence, payload):
        self.single_calls += 1
        super().add_metric(job_id, timestamp, sequence, payload)

    def add_event(self, job_id, kind, timestamp, sequence, payload):
        self.single_calls += 1
        super().add_event(job_id, kind, timestamp, sequence, payload)

    def add_metrics(self, job_id, timestamps, sequences, arrivals, payloads):
        if self.stopped:
            raise WriterStopped("stopping")
        self.other_calls += 1
        for row in zip(timestamps, sequences, payloads, arrivals, strict=True):
            self.messages.append(("metric", job_id, *row))

    def add_events(self, job_id, kind, timestamps, sequences, arrivals, payloads):
        if self.stopped:
            raise WriterStopped("stopping")
        self.other_calls += 1
        for row in zip(timestamps, sequences, payloads, arrivals, strict=True):
            self.messages.append(("event", job_id, kind, *row))


class BulkOthersIngestTests(BulkIngestTests):
    """The bulk path's tests with a writer that also takes metrics and events in bulk."""

    def setUp(self):
        super().setUp()
        self.writer = BulkOthersWriter()

    def test_one_call_per_job_and_type(self):
        """Metric and event frames of one read reach the writer as one add_metrics or
        add_events call per (job, type)."""
        job = test_ingest.JOB
        bodies = [test_ingest.log_body(b"x", seq=0)]
        for i in range(12):
            bodies.append(test_ingest.metric_body(seq=i)[0])
            bodies.append(test_ingest.envelope(3, job, encode_event(3, SAMPLES[3]), 5, i))
        factory = self.make_factory()
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        # The 12 metrics are one add_metrics call, the 12 exec events one add_events call.
        self.assertEqual(self.writer.other_calls, 2)
        self.assertEqual(len(self.writer.messages), 25)
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        self.assertEqual(self.writer.other_calls, 4)
        self.assertEqual(self.writer.arrivals, {job: 50})
        self.assertEqual(factory.events.accepted, {"exec": 24})
        self.in_arrival_order()


    def test_grouped_frames_in_one_call_each(self):
        """Metric and event frames of plain payload reach the writer as one add_metrics or
        add_events call per (job, type) of a read, the first ones of a job not yet seen
        included (nothing per frame), counted as received by type with their bytes, and as
        accepted events by kind; those of an invalid job id are all rejected, counted by
        reason and by event kind, and take no arrival numbers."""
        job = test_ingest.JOB
        bodies = []
        for i in range(12):
            bodies.append(test_ingest.metric_body(seq=i)[0])
            bodies.append(test_ingest.envelope(3, job, encode_event(3, SAMPLES[3]), 5, i))
            bodies.append(test_ingest.envelope(9, "../bad", encode_event(9, SAMPLES[9]), 5, i))
        factory = self.make_factory()
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        self.assertEqual((self.writer.other_calls, self.writer.single_calls), (2, 0))
        self.assertEqual(len(self.writer.messages), 24)
        self.assertEqual(self.metrics.received, {2: 12, 3: 12, 9: 12})
        self.assertEqual(self.metrics.received_bytes, sum(map(len, bodies)))
        self.assertEqual(factory.events.accepted, {"exec": 12})
        self.assertEqual(self.metrics.rejected, ["invalid_job_id"] * 12)
        self.assertEqual(self.metrics.events_rejected, [("file", "invalid_job_id")] * 12)
        self.assertEqual(self.writer.arrivals, {job: 24})
        self.in_arrival_order()

    def test_grouped_then_not_plain_keeps_order(self):
        """A metric whose payload is not plain, after plain ones of its job in the same read,
        reaches the writer after them, with the next arrival number; a bad payload there is
        rejected and frees its number."""
        job = test_ingest.JOB
        first, p1 = test_ingest.metric_body(seq=1)
        second, p2 = test_ingest.metric_body(seq=2)
        odd_payload = p2 + b"\x22\x00"  # a second, empty data field: upb merges it
        odd = test_ingest.envelope(2, job, odd_payload, 11, 12)
        bad = test_ingest.envelope(2, job, b"\xff", 11, 12)
        self.feed(b"".join(map(frame, [first, second, odd, bad, first])))
        metrics = [m for m in self.writer.messages if m[0] == "metric"]
        self.assertEqual([m[4] for m in sorted(metrics, key=lambda m: m[-1])],
                         [p1, p2, odd_payload, p1])
        self.assertEqual(self.metrics.rejected, ["bad_payload"])
        self.in_arrival_order()


@implementer(IGroupWriter)
class GroupsWriter(BulkOthersWriter):
    """BulkOthersWriter that also takes all of a read's groups in one ``add_groups`` call
    (as BatchingWriter), recorded and then handed to the bulk forms, group by group."""

    KINDS = {-k.msg_type: k.name for k in events.KINDS_BY_TYPE.values()}

    def __init__(self):
        super().__init__()
        self.groups_calls = []  # the keys of each add_groups call

    def add_groups(self, groups):
        if self.stopped:
            raise WriterStopped("stopping")
        self.groups_calls.append(list(groups))
        for (job_id, code), columns in groups.items():
            if code > 0:
                self.add_logs(job_id, code, *columns)
            elif code == -2:
                self.add_metrics(job_id, *columns)
            else:
                self.add_events(job_id, self.KINDS[code], *columns)


class GroupsIngestTests(BulkOthersIngestTests):
    """The bulk-others path's tests with a writer that takes a read's groups in one call."""

    def setUp(self):
        super().setUp()
        self.writer = GroupsWriter()

    def test_one_writer_call_per_read(self):
        """The LOG, metric and event groups of one read, of several jobs, reach the writer
        in one add_groups call (those of an invalid job id left out and rejected); each
        read makes its own call; events are counted as accepted by kind."""
        bodies = []
        for i in range(30):
            job = (test_ingest.JOB, test_ingest.JOB2, "../x")[i % 3]
            t = 2 + i % 8
            if t == 2:
                bodies.append(test_ingest.metric_body(job=job, seq=i)[0])
            elif t == 9:
                bodies.append(test_ingest.log_body(b"%d" % i, stream=1 + i % 2, seq=i, job=job))
            else:
                bodies.append(test_ingest.envelope(t, job, encode_event(t, SAMPLES[t]), 5, i))
        factory = self.make_factory()
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        (keys,) = self.writer.groups_calls
        self.assertEqual({job for job, _code in keys}, {test_ingest.JOB, test_ingest.JOB2})
        self.assertEqual(len(self.writer.messages), 20)
        self.assertEqual(len(self.metrics.rejected), 10)
        self.assertEqual(sum(factory.events.accepted.values()),
                         sum(1 for m in self.writer.messages if m[0] == "event"))
        self.in_arrival_order()
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        self.assertEqual(len(self.writer.groups_calls), 2)

    def test_stopping_rejects_every_group(self):
        """A stopping writer refuses the read's one add_groups call: every frame of every
        group counts as stopping once, events also by kind, and none is accepted."""
        self.writer.stopped = True
        bodies = [test_ingest.log_body(seq=1), test_ingest.metric_body()[0],
                  test_ingest.envelope(3, test_ingest.JOB, encode_event(3, SAMPLES[3]), 5, 2),
                  test_ingest.envelope(3, test_ingest.JOB, encode_event(3, SAMPLES[3]), 5, 3)]
        factory = self.make_factory()
        self.feed(b"".join(map(frame, bodies)), factory=factory)
        self.assertEqual(self.metrics.rejected, ["stopping"] * 4)
        self.assertEqual(self.metrics.events_rejected, [("exec", "stopping")] * 2)
        self.assertEqual(factory.events.accepted, {})


class PythonTwinGroupsIngestTests(GroupsIngestTests):
    """The add_groups path's tests with the pure-Python decoder."""

    def setUp(self):
        super().setUp()
        self.patch(ingest, "decode_log_frames", framing.decode_log_frames_py)


class ReadSizeTests(SynchronousTestCase):
    def test_reads_of_read_bytes(self):
        """A connection asks its transport for reads of ingest.READ_BYTES (256 KiB), not
        Twisted's default 64 KiB: the attribute the real Unix-socket transport reads."""
        from twisted.internet import unix

        self.assertEqual(ingest.READ_BYTES, 256 * 1024)
        self.assertEqual(unix.Server.bufferSize, 64 * 1024)
        factory = IngestFactory(BulkOthersWriter(), None, task.Clock())
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        transport.bufferSize = unix.Server.bufferSize
        proto.makeConnection(transport)
        self.assertEqual(transport.bufferSize, ingest.READ_BYTES)
        self.assertEqual(unix.Server.bufferSize, 64 * 1024)  # the class is left alone


class PythonTwinBulkOthersIngestTests(BulkOthersIngestTests):
    """The bulk-others path's tests (grouped mode) with the pure-Python decoder."""

    def setUp(self):
        super().setUp()
        self.patch(ingest, "decode_log_frames", framing.decode_log_frames_py)


class PythonTwinIngestFramingTests(test_ingest.FramingTests):
    """test_ingest's framing tests with the pure-Python decoder in the protocol."""

    def setUp(self):
        super().setUp()
        self.patch(ingest, "decode_log_frames", framing.decode_log_frames_py)

    # Its own Hypothesis test function (one function may not serve two test classes), with
    # the strategies of test_ingest's.
    @given(
        st.lists(
            st.one_of(
                st.builds(
                    test_ingest.log_body,
                    content=st.binary(max_size=200),
                    stream=st.integers(0, 3),
                    job=st.sampled_from([test_ingest.JOB, test_ingest.JOB2, "", "../x", "a/b"]),
                    ts=st.integers(0, 2**63 - 1),
                    seq=st.integers(0, 2**64 - 6),
                ),
                st.builds(lambda ts, seq: test_ingest.metric_body(ts=ts, seq=seq)[0],
                          st.integers(0, 2**62), st.integers(0, 2**62)),
                st.builds(test_ingest.envelope, st.integers(0, 12),
                          st.sampled_from([test_ingest.JOB, "..", "ok"]), st.binary(max_size=20)),
                st.binary(max_size=40),
            ),
            max_size=12,
        ),
        st.lists(st.integers(0, 4000), max_size=12),
    )
    def test_random_frames_random_splits(self, bodies, splits):
        """Any sequence of frames (valid or not), cut at any offsets, gives the result that
        the documented rules give frame by frame, and leaves nothing buffered."""
        inner = test_ingest.FramingTests.test_random_frames_random_splits.hypothesis.inner_test
        inner(self, bodies, splits)


class PythonTwinIngestRejectionTests(test_ingest.RejectionTests):
    """test_ingest's rejection tests with the pure-Python decoder in the protocol."""

    def setUp(self):
        super().setUp()
        self.patch(ingest, "decode_log_frames", framing.decode_log_frames_py)


class PythonTwinBulkIngestTests(BulkIngestTests):
    """The bulk path's tests with the pure-Python decoder in the protocol."""

    def setUp(self):
        super().setUp()
        self.patch(ingest, "decode_log_frames", framing.decode_log_frames_py)


class RealWriterIngestTests(SynchronousTestCase):
    def test_through_a_real_writer(self):
        """Frames of many jobs through IngestProtocol into a BatchingWriter with small limits:
        every message is appended once, per (job, stream) in frame order, with arrivals that
        follow frame order per job across streams and metrics, in batches within the
        limits."""
        clock = task.Clock()
        storage = FakeStorage(now=lambda: 1_700_000_000.0)
        writer = BatchingWriter(storage, clock, batch_max_messages=7, batch_max_bytes=400)
        factory = IngestFactory(writer, None, clock)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        jobs = [f"job-{i}" for i in range(5)]
        bodies, order = [], {}
        for i in range(600):
            job = jobs[(i * 7) % 5]
            if i % 50 == 49:
                body, payload = test_ingest.metric_body(job=job, seq=i)
                order.setdefault(job, []).append(payload)
            else:
                content = b"%d-" % i + b"x" * (i % 40)
                body = test_ingest.log_body(content, stream=1 + (i // 3) % 2, job=job, seq=i)
                order.setdefault(job, []).append(content)
            bodies.append(body)
        data = b"".join(map(frame, bodies))
        for start in range(0, len(data), 1000):
            proto.dataReceived(data[start : start + 1000])
        self.successResultOf(writer.flush_all())
        seen: dict = {}
        for call in storage.calls:
            batch = call.batch
            items = call.items
            self.assertLessEqual(len(items), 7)
            # Sealed once over the limit: without its last message a batch is below it.
            self.assertLess(sum(map(len, items[:-1])) + MESSAGE_OVERHEAD * (len(items) - 1), 400)
            for arrival, item in zip(batch.arrivals, items, strict=True):
                seen.setdefault(batch.job_id, {})[arrival] = item
        self.assertEqual({job: [s[a] for a in sorted(s)] for job, s in seen.items()}, order)
        self.assertEqual({job: sorted(s) for job, s in seen.items()},
                         {job: list(range(len(o))) for job, o in order.items()})
        self.assertEqual(writer.messages_written, 600)


# -- BatchingWriter.add_logs -----------------------------------------------------------------


class AddLogsTests(test_writer.WriterTestMixin, SynchronousTestCase):
    def batches(self):
        return [(c.key, list(c.batch.timestamps), list(c.batch.arrivals), c.items)
                for c in self.storage.calls]

    def add_group(self, job, stream, contents, first_ts=0):
        n = len(contents)
        start = self.writer.arrivals.get(job, 0)
        if n:
            self.writer.arrivals[job] = start + n
        self.writer.add_logs(job, stream, list(range(first_ts, first_ts + n)), [0] * n,
                             list(range(start, start + n)), list(contents))

    @given(
        st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 2),
                           st.lists(st.binary(max_size=30), max_size=12)), max_size=12),
        st.integers(1, 9),
        st.integers(1, 200),
    )
    def test_same_batches_as_add_log(self, groups, max_messages, max_bytes):
        """Groups given to add_logs are sealed into exactly the batches that the same
        messages given one by one to add_log produce, with the same accounting."""
        results = []
        for bulk in (False, True):
            self.make(auto=True, batch_max_messages=max_messages, batch_max_bytes=max_bytes,
                      high_water_bytes=1 << 30, low_water_bytes=0)
            ts = 0
            for job, stream, contents in groups:
                if bulk:
                    self.add_group(job, stream, contents, ts)
                else:
                    for i, content in enumerate(contents):
                        self.writer.add_log(job, stream, ts + i, 0, content)
                ts += len(contents)
            state = (self.batches(), self.writer.buffered_bytes, self.writer.messages_received,
                     dict(self.writer.arrivals))
            self.successResultOf(self.writer.flush_all())
            results.append((state, self.batches()))
        self.assertEqual(results[0], results[1])

    @given(
        st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["metric", "exec", "file"]),
                           st.lists(st.binary(max_size=30), max_size=12)), max_size=12),
        st.integers(1, 9),
        st.integers(1, 200),
    )
    def test_bulk_metrics_and_events_as_single_calls(self, groups, max_messages, max_bytes):
        """add_metrics and add_events seal exactly the batches that add_metric and add_event
        produce with the same messages one by one, with the same accounting, and refuse
        everything once the writer is stopping."""
        results = []
        for bulk in (False, True):
            self.make(auto=True, batch_max_messages=max_messages, batch_max_bytes=max_bytes,
                      high_water_bytes=1 << 30, low_water_bytes=0)
            ts = 0
            for job, kind, payloads in groups:
                n = len(payloads)
                if bulk:
                    start = self.writer.arrivals.get(job, 0)
                    if n:
                        self.writer.arrivals[job] = start + n
                    columns = (list(range(ts, ts + n)), [7] * n, list(range(start, start + n)),
                               list(payloads))
                    if kind == "metric":
                        self.writer.add_metrics(job, *columns)
                    else:
                        self.writer.add_events(job, kind, *columns)
                else:
                    for i, payload in enumerate(payloads):
                        if kind == "metric":
                            self.writer.add_metric(job, ts + i, 7, payload)
                        else:
                            self.writer.add_event(job, kind, ts + i, 7, payload)
                ts += n
            state = (self.batches(), self.writer.buffered_bytes, self.writer.messages_received,
                     dict(self.writer.arrivals))
            self.successResultOf(self.writer.flush_all())
            results.append((state, self.batches()))
        self.assertEqual(results[0], results[1])
        self.writer.stop()
        self.assertRaises(WriterStopped, self.writer.add_metrics, "a", [1], [1], [0], [b"x"])
        self.assertRaises(WriterStopped, self.writer.add_events, "a", "exec", [1], [1], [0],
                          [b"x"])

    def test_group_larger_than_a_batch_is_split(self):
        """One group of many messages becomes several batches, each within the limits."""
        self.make(auto=True, batch_max_messages=4, batch_max_bytes=10_000)
        self.add_group("a", 1, [b"x"] * 10)
        self.assertEqual([len(b[3]) for b in self.batches()], [4, 4])
        self.successResultOf(self.writer.flush_all())
        self.assertEqual([b[2] for b in self.batches()], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])

    def test_accounting_and_backpressure(self):
        """add_logs accounts content plus overhead per message, counts messages_received and
        pauses ingest past the high-water mark."""
        self.make(high_water_bytes=5 + 2 * MESSAGE_MEMORY + 50, low_water_bytes=10)
        self.add_group("a", 2, [b"12345", b""])
        self.assertEqual(self.writer.buffered_bytes, 5 + 2 * MESSAGE_MEMORY)
        self.assertEqual(self.writer.messages_received, 2)
        self.assertEqual(self.pauses, [])
        self.add_group("a", 2, [b"x" * 40])
        self.assertEqual(self.pauses, ["pause"])

    def test_refusals(self):
        """add_logs refuses a bad stream and, once stopping, everything."""
        self.make()
        self.assertRaises(ValueError, self.writer.add_logs, "a", 0, [1], [1], [0], [b"x"])
        self.writer.add_logs("a", 1, [], [], [], [])
        self.assertEqual(self.writer.messages_received, 0)
        self.writer.stop()
        self.assertRaises(WriterStopped, self.writer.add_logs, "a", 1, [1], [1], [0], [b"x"])

    def test_counters_shared_and_reset_by_discard(self):
        """add_log, add_metric and the arrivals dict given to the decoder are one set of
        counters; discard_job forgets the job's counter."""
        self.make(auto=True)
        self.writer.add_log("a", 1, 1, 1, b"x")
        self.add_group("a", 2, [b"y", b"z"])
        self.writer.add_metric("a", 1, 1, b"m")
        self.assertEqual(self.writer.arrivals, {"a": 4})
        self.successResultOf(self.writer.flush_all())
        self.assertEqual(sorted(a for b in self.batches() for a in b[2]), [0, 1, 2, 3])
        self.successResultOf(self.writer.discard_job("a"))
        self.assertEqual(self.writer.arrivals, {})
        self.writer.add_log("a", 1, 1, 1, b"again")
        self.assertEqual(self.writer.arrivals, {"a": 1})
