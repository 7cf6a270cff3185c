"""Bulk decoding of LOG frames: the IPC receive path's hot loop.

Runs on the reactor thread (called by ``ingest.IngestProtocol.dataReceived``); it keeps no
state between calls.

``decode_log_frames(data, offset, max_length, arrivals) -> (new_offset, groups, stop_reason)``

Walks the frames of ``data`` (a ``bytes`` object: a 4-byte big-endian length N, then N bytes of
a serialized ``joblet.ipc.IPCMessage``, docs/wire.md section 1) from ``offset`` on, and collects
every *canonical LOG frame* into ``groups``, a dict keyed by ``(job_uuid, stream)`` whose values
are four lists ``[timestamps, sequences, arrivals, contents]`` (ints, ints, ints, bytes), in
frame order.  ``job_uuid`` is the envelope's (field 3); timestamp, sequence, stream and content
are the LogLine payload's.  Equal job ids are one ``str`` object within a call.

``arrivals`` maps a job id to its next arrival number (0 when missing): each collected frame
gets that number and the entry is incremented, so arrival numbers increase strictly per job
across both streams, in frame order.  The dict is updated once, at the end of a successful
call; values must be ints in the signed 64-bit range, and a counter that would pass
``2**63 - 1`` raises OverflowError.

A frame is canonical when its length is at most ``max_length``, the envelope parses, its
``type`` is 1 (LOG), its ``data`` (field 6, present at most once) parses as a LogLine and the
LogLine's stream is 1 or 2.  The call stops at the first frame that is not, and returns:

- ``"slow"``: ``new_offset`` is that frame's start (its length prefix).  The caller decodes it
  with the general decoder (which may still accept it, see below) and calls again after it.
- ``"partial"``: the frame at ``new_offset`` is incomplete, or fewer than 4 bytes are left.
- ``"end"``: every byte was consumed (``new_offset == len(data)``).

``decode_log_frames(data, offset, max_length, arrivals, others)`` with a list ``others`` (None
is the 4-argument call) does not stop at a frame whose *envelope* is canonical (the rules below
applied to the IPCMessage alone, ``data`` taken as bytes) and whose type is not 1 (LOG): it
appends ``(type, job_uuid, timestamp, sequence, data, length, arrival)`` to ``others`` and
goes on, so that LOG frames keep arriving in large groups between metric and event frames.  ``type`` is the
enum's low 32 bits as a signed int32, as upb keeps it (so 0 and numbers this version does not
know are there too), ``job_uuid`` a ``str``, ``timestamp`` (int64) and ``sequence`` (uint64) the envelope's,
``data`` the payload's bytes (``b""`` when absent, not parsed or checked), ``length`` the
frame's length without its prefix: what upb's IPCMessage parse gives.  ``arrival``: a frame
of type 2..9 (METRIC and the telemetry events) takes the job's next arrival number, in frame
order with the LOG frames (one str object per job id, as in ``groups``); other types get None
and no number.  The caller decides which of them it accepts, and renumbers when it rejects one
(``ingest.IngestProtocol._handle_others``).  A frame whose envelope is not canonical, and a LOG
frame that is not, still stop the call (``"slow"``).

``decode_log_frames(data, offset, max_length, arrivals, others, grouped)`` with ``grouped``
true (it needs the ``others`` list) also groups the metric and event frames whose *payload*
is canonical: a frame of type 2..9 (canonical envelope) whose ``data`` is a canonical Metric
(type 2) or event payload of its type (3..9, layouts in ``events.KINDS``) goes to
``groups[(job_uuid, -type)]``, four columns like a LOG group's: the record's timestamp and
sequence (a metric's are its payload's, or the envelope's when the payload's timestamp is 0;
an event's are the envelope's, or the payload's when the envelope's timestamp is 0: what
ingest stores), the arrival number, and the payload bytes; the three int columns are packed,
``array('q')``, ``array('Q')`` and ``array('q')`` (no int object per frame).  Such frames
need no further check: their payloads decode.  A frame of type 2..9 whose payload is not canonical goes to
``others`` as without ``grouped`` while its (job, type) has no group yet in this call, and
stops the call (``"slow"``) once it has one, so that the caller's general decoder hands it
to the writer after the group: a (job, type)'s frames reach the writer in frame order.

Canonical payloads, beyond the wire rules below: a Metric has ``job_uuid`` (1) valid UTF-8,
``timestamp`` (2) and ``sequence`` (3) varints, ``data`` (4) at most once, and inside it the
doubles 1 and 3 as fixed64, ``memory_usage`` (2) a varint, ``disk_io`` (4) and ``network_io``
(5) at most once each with varint fields 1..4; an event payload has ``job_uuid`` (1, bytes)
length-delimited, 2 and 3 varints, its string fields length-delimited and its integer fields
varints, a ``uint32`` value below 2**32 (upb would truncate a larger one).  Groups are never
canonical; unknown fields of wire types 0, 1, 2 and 5 are skipped; the last occurrence of a
scalar wins.

Protobuf wire format, as upb (the protobuf runtime) applies it to these messages:

- Varints have at most 10 bytes; the value is taken modulo 2**64 (int64 fields are the two's
  complement: negative values are 10-byte varints).  Enum fields (``type``, ``stream``) keep
  the low 32 bits as a signed int32, so a varint 2**32 + 1 is stream 1.
- Field tags have at most 5 bytes and a value below 2**32; field number 0 is malformed.
- Length-delimited sizes have at most 5 bytes, are below 2**31 - 1 and must fit in the
  enclosing message.
- Unknown fields of wire types 0, 1, 2 and 5 are skipped.
- A scalar field that appears several times: the last occurrence wins (``content`` included).
- Every occurrence of a string field (the envelope's and the payload's ``job_uuid``) must be
  valid UTF-8 (no surrogates, no overlong forms, nothing above U+10FFFF).

Not canonical although upb may accept them, so left to the general decoder: groups (wire types
3 and 4, also in unknown fields), a known field with another wire type than its own (upb keeps
it as an unknown field), and a second ``data`` field (upb would merge the embedded messages).
Everything upb rejects is not canonical either.

Two implementations with identical results: the C extension ``joblet_persist._speedups``
(built by ``pip install`` when a compiler is available) and the pure-Python
``decode_log_frames_py`` below; ``decode_log_frames`` is the C one when it could be imported.
``IMPLEMENTATION`` names the one in use.

The pure-Python one first lets upb parse a frame as ``joblet.ipc.views.LogFrame`` (the envelope
with ``data`` typed as a LogLine) and checks that the frame is byte for byte the canonical
serialization of what was parsed, unknown fields dropped: then it has each known field at most
once, with its own wire type, minimal varints and no unknown field or group, so upb's values are
the answer.  Any other frame upb parses goes through an exact walk of the wire format in Python
(slower, but encoders produce canonical frames).
"""

from __future__ import annotations

from array import array
from operator import index

from google.protobuf.message import DecodeError

from joblet_persist._proto import ipc_views_pb2
from joblet_persist.events import KINDS, STR, STRS, U32

_parse_log_frame = ipc_views_pb2.LogFrame.FromString

__all__ = ["IMPLEMENTATION", "decode_log_frames", "decode_log_frames_py"]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
_SIZE_LIMIT = 0x7FFFFFFF


class _NotCanonical(Exception):
    """The frame being parsed is not a canonical LOG frame."""


def _varint(data: bytes, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    """A varint of at most ``max_bytes`` bytes at ``pos``: (value modulo 2**64, next pos)."""
    value = 0
    shift = 0
    stop = min(end, pos + max_bytes)
    while pos < stop:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _MASK64, pos
        shift += 7
    raise _NotCanonical


def _size(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's size at ``pos``: (size, start of the bytes)."""
    if pos < end and data[pos] < 0x80:
        size = data[pos]
        pos += 1
    else:
        size, pos = _varint(data, pos, end, 5)
        if size >= _SIZE_LIMIT:
            raise _NotCanonical
    if size > end - pos:
        raise _NotCanonical
    return size, pos


def _value(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A varint field's value at ``pos`` (one-byte values without a call)."""
    if pos < end and data[pos] < 0x80:
        return data[pos], pos + 1
    return _varint(data, pos, end, 10)


def _skip(data: bytes, pos: int, end: int, field: int, wire: int) -> int:
    """Skip an unknown field's value; refuse field 0, groups and wire types 6 and 7."""
    if field == 0:
        raise _NotCanonical
    if wire == 0:
        return _varint(data, pos, end, 10)[1]
    if wire == 2:
        size, pos = _size(data, pos, end)
        return pos + size
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    else:
        raise _NotCanonical
    if pos > end:
        raise _NotCanonical
    return pos


def _parse_envelope(data: bytes, pos: int, end: int):
    """Walk one frame's envelope: (type's low 32 bits, job id bytes, timestamp, sequence,
    payload start, payload end); a missing payload is empty.

    Raises _NotCanonical or UnicodeDecodeError for an envelope that is not canonical.
    """
    msg_type = env_timestamp = env_sequence = 0
    job_raw = b""
    payload = payload_end = -1
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if field == 3:
            if wire != 2:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            job_raw = data[pos : pos + size]
            job_raw.decode()
            pos += size
        elif field == 6:
            if wire != 2 or payload >= 0:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            payload = pos
            pos += size
            payload_end = pos
        elif field == 2:
            if wire != 0:
                raise _NotCanonical
            msg_type, pos = _value(data, pos, end)
        elif field == 4:
            if wire != 0:
                raise _NotCanonical
            env_timestamp, pos = _value(data, pos, end)
        elif field == 5:
            if wire != 0:
                raise _NotCanonical
            env_sequence, pos = _value(data, pos, end)
        elif field == 1:
            if wire != 0:
                raise _NotCanonical
            pos = _value(data, pos, end)[1]
        else:
            pos = _skip(data, pos, end, field, wire)
    if payload < 0:
        payload = payload_end = end
    if env_timestamp > _INT64_MAX:
        env_timestamp -= 1 << 64
    return msg_type & _MASK32, job_raw, env_timestamp, env_sequence, payload, payload_end


def _parse_frame(data: bytes, pos: int, end: int):
    """Walk one frame body: (envelope job id, stream, timestamp, sequence, content).

    Raises _NotCanonical or UnicodeDecodeError for a frame that is not a canonical LOG frame.
    """
    msg_type, job_raw, _, _, payload, payload_end = _parse_envelope(data, pos, end)
    if msg_type != 1:
        raise _NotCanonical

    stream = timestamp = sequence = 0
    content = b""
    pos = payload
    end = payload_end
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if field == 5:
            if wire != 2:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            content = data[pos : pos + size]
            pos += size
        elif field == 3:
            if wire != 0:
                raise _NotCanonical
            timestamp, pos = _value(data, pos, end)
        elif field == 4:
            if wire != 0:
                raise _NotCanonical
            sequence, pos = _value(data, pos, end)
        elif field == 2:
            if wire != 0:
                raise _NotCanonical
            stream, pos = _value(data, pos, end)
        elif field == 1:
            if wire != 2:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            data[pos : pos + size].decode()
            pos += size
        else:
            pos = _skip(data, pos, end, field, wire)
    stream &= _MASK32
    if stream != 1 and stream != 2:
        raise _NotCanonical
    if timestamp > _INT64_MAX:
        timestamp -= 1 << 64
    return job_raw.decode(), stream, timestamp, sequence, content


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """A field tag at ``pos``: (field number, wire type, next pos)."""
    tag = data[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag, pos = _varint(data, pos, end, 5)
        if tag > _MASK32:
            raise _NotCanonical
    return tag >> 3, tag & 7, pos


def _int64(value: int) -> int:
    return value - (1 << 64) if value > _INT64_MAX else value


def _metric_io(data: bytes, pos: int, end: int) -> None:
    """Walk a canonical DiskIO / NetworkIO: four int64 fields 1..4."""
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if 1 <= field <= 4:
            if wire != 0:
                raise _NotCanonical
            pos = _varint(data, pos, end, 10)[1]
        else:
            pos = _skip(data, pos, end, field, wire)


def _metric_data(data: bytes, pos: int, end: int) -> None:
    """Walk a canonical MetricData: 1, 3 double, 2 int64, 4 and 5 embedded (once each)."""
    seen = set()
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if field == 1 or field == 3:
            if wire != 1 or end - pos < 8:
                raise _NotCanonical
            pos += 8
        elif field == 2:
            if wire != 0:
                raise _NotCanonical
            pos = _varint(data, pos, end, 10)[1]
        elif field == 4 or field == 5:
            if wire != 2 or field in seen:
                raise _NotCanonical
            seen.add(field)
            size, pos = _size(data, pos, end)
            _metric_io(data, pos, pos + size)
            pos += size
        else:
            pos = _skip(data, pos, end, field, wire)


def _metric_time(data: bytes, pos: int, end: int, env_timestamp: int, env_sequence: int):
    """The record time of a canonical Metric payload at data[pos:end]: the payload's
    timestamp and sequence, or the envelope's when the payload's timestamp is 0.

    Canonical: 1 job_uuid (valid UTF-8), 2 timestamp, 3 sequence, 4 data (at most once),
    every known field with its own wire type, no groups (also inside ``data``).  Raises
    _NotCanonical or UnicodeDecodeError otherwise."""
    timestamp = sequence = 0
    seen_data = False
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if field == 1:
            if wire != 2:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            data[pos : pos + size].decode()
            pos += size
        elif field == 2:
            if wire != 0:
                raise _NotCanonical
            timestamp, pos = _varint(data, pos, end, 10)
        elif field == 3:
            if wire != 0:
                raise _NotCanonical
            sequence, pos = _varint(data, pos, end, 10)
        elif field == 4:
            if wire != 2 or seen_data:
                raise _NotCanonical
            seen_data = True
            size, pos = _size(data, pos, end)
            _metric_data(data, pos, pos + size)
            pos += size
        else:
            pos = _skip(data, pos, end, field, wire)
    if timestamp:
        return _int64(timestamp), sequence
    return env_timestamp, env_sequence


# Event payload layouts from field number 4 on, per type: True for a length-delimited
# (string) field, else the largest value of a varint field the walk accepts as canonical
# (uint32 values past 32 bits are left to upb, which truncates them).
_EVENT_LAYOUTS = {
    kind.msg_type: tuple(
        True if field.type in (STR, STRS) else (_MASK32 if field.type == U32 else _MASK64)
        for field in kind.fields
    )
    for kind in KINDS
}


def _event_time(data: bytes, pos: int, end: int, layout: tuple, env_timestamp: int,
                env_sequence: int):
    """The record time of a canonical event payload at data[pos:end]: the envelope's
    timestamp and sequence, or the payload's when the envelope's timestamp is 0.

    Canonical: 1 job_uuid (bytes), 2 timestamp, 3 sequence and the kind's fields from 4 on
    with their own wire types, uint32 values within 32 bits, no groups.  Raises
    _NotCanonical otherwise."""
    timestamp = sequence = 0
    last = 3 + len(layout)
    while pos < end:
        field, wire, pos = _tag(data, pos, end)
        if field == 1 or (4 <= field <= last and layout[field - 4] is True):
            if wire != 2:
                raise _NotCanonical
            size, pos = _size(data, pos, end)
            pos += size
        elif field == 2 or field == 3:
            if wire != 0:
                raise _NotCanonical
            value, pos = _varint(data, pos, end, 10)
            if field == 2:
                timestamp = value
            else:
                sequence = value
        elif 4 <= field <= last:
            if wire != 0:
                raise _NotCanonical
            value, pos = _varint(data, pos, end, 10)
            if value > layout[field - 4]:
                raise _NotCanonical
        else:
            pos = _skip(data, pos, end, field, wire)
    if env_timestamp:
        return env_timestamp, env_sequence
    return _int64(timestamp), sequence


def _payload_time(msg_type: int, data: bytes, pos: int, end: int, env_timestamp: int,
                  env_sequence: int):
    """Grouped mode: the record time of a metric or event frame (type 2..9) whose payload
    data[pos:end] is canonical, or None."""
    try:
        if msg_type == 2:
            return _metric_time(data, pos, end, env_timestamp, env_sequence)
        return _event_time(data, pos, end, _EVENT_LAYOUTS[msg_type], env_timestamp,
                           env_sequence)
    except (_NotCanonical, UnicodeDecodeError):
        return None


def _other_frame(data: bytes, pos: int, end: int):
    """The ``others`` item of a frame body whose envelope is canonical and whose type is not
    LOG; None for any other frame."""
    try:
        msg_type, job_raw, timestamp, sequence, payload, payload_end = _parse_envelope(
            data, pos, end
        )
        job = job_raw.decode()
    except (_NotCanonical, UnicodeDecodeError):
        return None
    if msg_type == 1:
        return None
    if msg_type > 0x7FFFFFFF:
        msg_type -= 1 << 32
    return msg_type, job, timestamp, sequence, data[payload:payload_end], end - pos, payload


def decode_log_frames_py(
    data: bytes, offset: int, max_length: int, arrivals: dict, others: list | None = None,
    grouped: bool = False,
):
    """Pure-Python ``decode_log_frames`` (see the module docstring).  Reactor thread."""
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if not isinstance(arrivals, dict):
        raise TypeError(f"arrivals must be a dict, not {type(arrivals).__name__}")
    if others is not None and not isinstance(others, list):
        raise TypeError(f"others must be a list or None, not {type(others).__name__}")
    if grouped and others is None:
        raise ValueError("grouped needs an others list")
    offset = index(offset)
    max_length = index(max_length)
    end = len(data)
    if not 0 <= offset <= end:
        raise ValueError(f"offset {offset} outside the data (0..{end})")
    groups: dict = {}
    # job id -> [job id, stream 1 columns, stream 2 columns, next arrival]
    entries: dict = {}
    parse = _parse_log_frame
    pos = offset
    while True:
        if end - pos < 4:
            reason = "end" if pos == end else "partial"
            break
        length = int.from_bytes(data[pos : pos + 4], "big")
        if length > max_length:
            reason = "slow"
            break
        stop = pos + 4 + length
        if stop > end:
            reason = "partial"
            break
        body = data[pos + 4 : stop]
        try:
            frame = parse(body)
        except DecodeError:
            # Not even upb decodes it (with the payload as a LogLine).
            frame = None
        if frame is not None:
            frame.DiscardUnknownFields()
        if frame is not None and frame.SerializeToString() == body and frame.type == 1:
            line = frame.data
            stream = line.stream
            if stream != 1 and stream != 2:
                reason = "slow"
                break
            job = frame.job_uuid
            timestamp = line.timestamp
            sequence = line.sequence
            content = line.content
        else:
            try:
                job, stream, timestamp, sequence, content = _parse_frame(data, pos + 4, stop)
                other = None
            except (_NotCanonical, UnicodeDecodeError):
                other = None if others is None else _other_frame(data, pos + 4, stop)
                if other is None:
                    reason = "slow"
                    break
            if other is not None:
                if 2 <= other[0] <= 9:
                    job = other[1]
                    entry = entries.get(job)
                    if entry is None:
                        arrival = index(dict.get(arrivals, job, 0))
                        if not -_INT64_MAX - 1 <= arrival <= _INT64_MAX:
                            raise OverflowError(f"arrival number of job {job!r} out of range")
                        entry = entries[job] = [job, None, None, arrival]
                    arrival = entry[3]
                    if arrival == _INT64_MAX:
                        raise OverflowError(f"arrival number of job {entry[0]!r} out of range")
                    if grouped:
                        key = (entry[0], -other[0])
                        time = _payload_time(other[0], data, other[6], other[6] + len(other[4]),
                                             other[2], other[3])
                        columns = groups.get(key)
                        if time is not None:
                            if columns is None:
                                columns = groups[key] = [array("q"), array("Q"), array("q"), []]
                            columns[0].append(time[0])
                            columns[1].append(time[1])
                            columns[2].append(arrival)
                            columns[3].append(other[4])
                            entry[3] = arrival + 1
                            pos = stop
                            continue
                        if columns is not None:
                            # After grouped frames of its (job, type): the caller's general
                            # decoder takes it once the groups are delivered.
                            reason = "slow"
                            break
                    entry[3] = arrival + 1
                    others.append((other[0], entry[0], *other[2:6], arrival))
                else:
                    others.append((*other[:6], None))
                pos = stop
                continue
        entry = entries.get(job)
        if entry is None:
            arrival = index(dict.get(arrivals, job, 0))
            if not -_INT64_MAX - 1 <= arrival <= _INT64_MAX:
                raise OverflowError(f"arrival number of job {job!r} out of range")
            entry = entries[job] = [job, None, None, arrival]
        columns = entry[stream]
        if columns is None:
            columns = entry[stream] = [[], [], [], []]
            groups[(entry[0], stream)] = columns
        arrival = entry[3]
        if arrival == _INT64_MAX:
            raise OverflowError(f"arrival number of job {entry[0]!r} out of range")
        entry[3] = arrival + 1
        columns[0].append(timestamp)
        columns[1].append(sequence)
        columns[2].append(arrival)
        columns[3].append(content)
        pos = stop
    for entry in entries.values():
        arrivals[entry[0]] = entry[3]
    return pos, groups, reason


try:
    from joblet_persist._speedups import decode_log_frames as _decode_log_frames_c
except ImportError:  # no compiler at install time: the pure-Python twin does the same work
    _decode_log_frames_c = None

if _decode_log_frames_c is not None:
    decode_log_frames = _decode_log_frames_c
    IMPLEMENTATION = "C extension joblet_persist._speedups"
else:
    decode_log_frames = decode_log_frames_py
    IMPLEMENTATION = "pure Python (joblet_persist._speedups is not built)"
