"""Telemetry events (eBPF, IPC message types 3..9): the kinds table and the codec.

A leaf module: pure functions and immutable data, no reactor, no files; any thread may call
it.  Ingest decodes a payload with ``decode_event``, storage writes ``event_json_line`` of the
record, and the query side turns a stored line back into the wire message with
``event_message``.  ``check_event`` (validation only, cheap) and ``payload_json_line`` split
the decoding between the reactor and a pool thread.  docs/storage-format.md ("Telemetry
events") specifies the stored lines.

One ``EventKind`` per kind holds everything the rest of the service needs to know about it:
its name (``"exec"``), IPC ``MessageType`` number, the IPC, decoding-view and query message
classes, the file stem (``exec_events``), the query RPC and ``EventBatch`` field, and its fields
in wire order.  ConnectEvent and AcceptEvent share a layout; SocketDataEvent is stored in its
IPC layout (``addr``, ``port``) and answered in the query layout (``dst_addr``, ``dst_port``).

Strings.  eBPF captures (``comm``, file names, arguments) are raw kernel bytes and need not be
UTF-8, but the protobuf runtime rejects a whole message whose ``string`` field is not valid
UTF-8.  So payloads are parsed with views (proto/ipc_views.proto) that declare those fields
``bytes``: a string that is valid UTF-8 is kept as ``str``, anything else as ``bytes``.  The
stored line writes the latter as ``{"b64": "<standard base64>"}`` in place of the string; the
query message carries such a field decoded with U+FFFD replacements in the string field and
its original bytes in the ``non_utf8`` map (field 16), keyed by field name (``args.N`` for the
N-th argument).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Union

from google.protobuf.message import DecodeError

from joblet_persist._proto import ipc_pb2, ipc_views_pb2, persist_pb2
from joblet_persist.grouping import is_packed

__all__ = [
    "KINDS",
    "KINDS_BY_NAME",
    "KINDS_BY_TYPE",
    "MEMBER_RAW",
    "SEGMENT_SUFFIX",
    "EventDecodeError",
    "EventField",
    "EventKind",
    "EventRecord",
    "EventRecordError",
    "check_event",
    "decode_event",
    "event_json_line",
    "event_message",
    "event_record_from_json",
    "fill_missing_lines",
    "payload_json_line",
    "payload_json_lines",
    "record_message",
]

# Field types, as docs/wire.md names them.
U32 = "uint32"
U64 = "uint64"
I64 = "int64"
STR = "string"
STRS = "repeated string"

_RANGES = {
    U32: (0, (1 << 32) - 1),
    U64: (0, (1 << 64) - 1),
    I64: (-(1 << 63), (1 << 63) - 1),
}

SEGMENT_SUFFIX = ".jsonl.gz"

#: Raw bytes of JSON lines per stored gzip member (about 650 events of 200 bytes).  A query
#: parses the JSON of a member's lines from the first one it needs: smaller members than
#: the logs' 1 MiB keep a first page or a narrow time range to a few hundred lines parsed
#: (a first page of a 1M-event job: ~45 ms -> ~11 ms), for files ~4% larger (member
#: headers and tables, deflate restarting its window).
MEMBER_RAW = 128 * 1024


class EventDecodeError(ValueError):
    """A frame of an event type that cannot be stored.

    ``reason`` is the label for the ingest rejection counter: ``"unknown_type"`` (not one of
    the types 3..9) or ``"bad_payload"`` (the payload does not decode as its type).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EventRecordError(ValueError):
    """A stored line that is not an event record (not JSON, not an object)."""


@dataclass(frozen=True)
class EventField:
    """One payload field after the common three (job_uuid, timestamp, sequence).

    ``key`` is the IPC field name, which is also the stored JSON key; ``query_name`` is the
    field's name in the ``joblet.persist`` message (they differ only for socket data).
    """

    key: str
    number: int
    type: str
    query_name: str

    @property
    def camel(self) -> str | None:
        """The key in protobuf's JSON mapping (``src_addr`` -> ``srcAddr``), if it differs."""
        head, *rest = self.key.split("_")
        return head + "".join(w.title() for w in rest) if rest else None


@dataclass(frozen=True, eq=False)
class EventKind:
    """Everything about one kind of telemetry event.  Immutable; compared by identity."""

    name: str
    msg_type: int
    ipc_class: type
    view_class: type
    persist_class: type
    stem: str
    rpc: str
    batch_field: str
    fields: tuple[EventField, ...]

    def segment_name(self, index: int) -> str:
        """File name of segment ``index``: ``exec_events.jsonl.gz``, ``exec_events_000001...``.

        The same rule as the log and metric segments (docs/storage-format.md section 1).
        """
        if index < 0:
            raise ValueError(f"negative segment index {index}")
        if index == 0:
            return self.stem + SEGMENT_SUFFIX
        return f"{self.stem}_{index:06d}{SEGMENT_SUFFIX}"

    def __repr__(self) -> str:
        return f"<EventKind {self.name} ({self.msg_type})>"


def _fields(*specs) -> tuple[EventField, ...]:
    out = []
    for number, spec in enumerate(specs, start=4):
        key, type_, *rest = spec
        out.append(EventField(key, number, type_, rest[0] if rest else key))
    return tuple(out)


_CONNECTION = (
    ("pid", U32),
    ("comm", STR),
    ("src_addr", STR),
    ("src_port", U32),
    ("dst_addr", STR),
    ("dst_port", U32),
    ("protocol", STR),
)


def _kind(name, msg_type, ipc_class, view_class, persist_class, rpc, fields) -> EventKind:
    return EventKind(
        name=name,
        msg_type=msg_type,
        ipc_class=ipc_class,
        view_class=view_class,
        persist_class=persist_class,
        stem=f"{name}_events",
        rpc=rpc,
        batch_field=f"{name}_events",
        fields=fields,
    )


V = ipc_views_pb2

KINDS: tuple[EventKind, ...] = (
    _kind(
        "exec", 3, ipc_pb2.ExecEvent, V.ExecEventView, persist_pb2.ExecEvent, "QueryExecEvents",
        _fields(
            ("pid", U32), ("ppid", U32), ("uid", U32), ("gid", U32),
            ("comm", STR), ("filename", STR), ("args", STRS),
        ),
    ),
    _kind(
        "connect", 4, ipc_pb2.ConnectEvent, V.ConnectEventView, persist_pb2.ConnectEvent,
        "QueryConnectEvents", _fields(*_CONNECTION),
    ),
    _kind(
        "accept", 5, ipc_pb2.AcceptEvent, V.ConnectEventView, persist_pb2.AcceptEvent,
        "QueryAcceptEvents", _fields(*_CONNECTION),
    ),
    _kind(
        "socket_data", 6, ipc_pb2.SocketDataEvent, V.SocketDataEventView,
        persist_pb2.SocketDataEvent, "QuerySocketDataEvents",
        _fields(
            ("pid", U32), ("comm", STR), ("direction", STR),
            ("addr", STR, "dst_addr"), ("port", U32, "dst_port"),
            ("protocol", STR), ("bytes", I64),
        ),
    ),
    _kind(
        "mmap", 7, ipc_pb2.MmapEvent, V.MmapEventView, persist_pb2.MmapEvent, "QueryMmapEvents",
        _fields(
            ("pid", U32), ("comm", STR), ("addr", U64), ("length", U64),
            ("prot", U32), ("flags", U32), ("filename", STR),
        ),
    ),
    _kind(
        "mprotect", 8, ipc_pb2.MprotectEvent, V.MprotectEventView, persist_pb2.MprotectEvent,
        "QueryMprotectEvents",
        _fields(("pid", U32), ("comm", STR), ("addr", U64), ("length", U64), ("prot", U32)),
    ),
    _kind(
        "file", 9, ipc_pb2.FileEvent, V.FileEventView, persist_pb2.FileEvent, "QueryFileEvents",
        _fields(("pid", U32), ("comm", STR), ("path", STR), ("operation", STR), ("bytes", I64)),
    ),
)
del V

KINDS_BY_TYPE: dict[int, EventKind] = {k.msg_type: k for k in KINDS}
KINDS_BY_NAME: dict[str, EventKind] = {k.name: k for k in KINDS}

Text = Union[str, bytes]  # bytes: a string field that was not valid UTF-8


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One decoded event.  ``values`` follow ``kind.fields``: ints, ``Text``, or a tuple of
    ``Text`` for ``args``.  ``job_id`` is the envelope's (the routing key)."""

    kind: EventKind
    job_id: str
    timestamp: int
    sequence: int
    values: tuple

    def as_dict(self) -> dict[str, Any]:
        """Field key -> value, the common three first (``job_uuid`` is ``job_id``)."""
        out: dict[str, Any] = {
            "job_uuid": self.job_id,
            "timestamp": self.timestamp,
            "sequence": self.sequence,
        }
        for field, value in zip(self.kind.fields, self.values, strict=True):
            out[field.key] = value
        return out


def _text(raw: bytes) -> Text:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


def _parse(msg_type: int, payload: bytes, job_id: str):
    kind = KINDS_BY_TYPE.get(msg_type)
    if kind is None:
        raise EventDecodeError("unknown_type", f"message type {msg_type} is not an event type")
    try:
        return kind, kind.view_class.FromString(payload)
    except DecodeError as e:
        raise EventDecodeError(
            "bad_payload",
            f"{kind.name} event payload ({len(payload)} bytes) for job {job_id} "
            f"is not a {kind.ipc_class.DESCRIPTOR.name}: {e}",
        ) from None


def check_event(
    msg_type: int, payload: bytes, job_id: str, timestamp: int = 0, sequence: int = 0
) -> tuple[EventKind, int, int]:
    """Validate an event payload cheaply: ``(kind, timestamp, sequence)`` of the record.

    Accepts and rejects exactly what ``decode_event`` does (the same parse, the same
    EventDecodeError) and yields the same kind, timestamp and sequence, at a fraction of its
    cost (about 0.5 us against 2-6 us here): the ingest path can validate on the reactor and
    leave building the stored line to ``payload_json_line`` on a pool thread.
    """
    kind, view = _parse(msg_type, payload, job_id)
    if not timestamp:
        timestamp, sequence = view.timestamp, view.sequence
    return kind, timestamp, sequence


def decode_event(
    msg_type: int, payload: bytes, job_id: str, timestamp: int = 0, sequence: int = 0
) -> EventRecord:
    """Decode the payload of an IPC frame of type ``msg_type`` (3..9) into a record.

    ``job_id``, ``timestamp`` and ``sequence`` are the IPC envelope's (fields 3, 4, 5); the
    job id is the routing key and the payload's copy is ignored.  The record's timestamp and
    sequence are the envelope's; when the envelope's timestamp is 0 (unset) both come from
    the payload instead (current cores copy the event's own values into the envelope).

    Strings that are not valid UTF-8 are kept as ``bytes``; unknown fields are ignored.
    Raises EventDecodeError (reason ``unknown_type`` or ``bad_payload``) and nothing else
    for any ``payload`` bytes.
    """
    kind, view = _parse(msg_type, payload, job_id)
    if not timestamp:
        timestamp, sequence = view.timestamp, view.sequence
    values = []
    for field in kind.fields:
        value = getattr(view, field.key)
        if field.type == STR:
            value = _text(value)
        elif field.type == STRS:
            value = tuple(_text(v) for v in value)
        values.append(value)
    return EventRecord(kind, job_id, timestamp, sequence, tuple(values))


def payload_json_line(
    kind: EventKind, payload: bytes, job_id: str, timestamp: int, sequence: int
) -> bytes:
    """The stored line of a payload that ``check_event`` accepted: the bytes
    ``event_json_line(decode_event(...))`` gives, built straight from the parsed view.
    Pure; meant for a pool thread (about 2 us an event here, a quarter of the
    record-then-``json.dumps`` route, which held the GIL long enough to slow ingest down).
    Pass the timestamp and sequence ``check_event`` returned.  Raises EventDecodeError if
    the payload does not decode."""
    kind, view = _parse(kind.msg_type, payload, job_id)
    return _LINE_BUILDERS[kind.msg_type](view, _encode_str(job_id), timestamp, sequence)


def payload_json_lines(
    kind: EventKind, payloads: list, job_id: str, timestamps: list, sequences: list
) -> list:
    """``payload_json_line`` over a batch of one kind and job, in order: the line of each
    payload, or None where it does not decode (``payload_json_line`` raises).  Pure; meant
    for a pool thread.  With the C extension built, canonical payloads (what encoders write)
    get their lines in one call (``_speedups.event_json_lines``, the same bytes: the tests
    hold it to ``payload_json_line``); the rest take ``payload_json_line``."""
    if _event_lines_c is not None:
        payloads = payloads if type(payloads) is list else list(payloads)
        # Lists, or the packed columns of the writer's event buffers (array('q'), array('Q')).
        if not (type(timestamps) is list or is_packed(timestamps, "q")):
            timestamps = list(timestamps)
        if not (type(sequences) is list or is_packed(sequences, "Q")):
            sequences = list(sequences)
        lines = _event_lines_c(
            _C_LAYOUTS[kind.msg_type], _encode_str(job_id), payloads, timestamps, sequences
        )
    else:
        lines = [None] * len(payloads)
    return fill_missing_lines(
        lines,
        lambda i: payload_json_line(kind, payloads[i], job_id, timestamps[i], sequences[i]),
    )


def fill_missing_lines(lines: list, line_of) -> list:
    """``lines`` (a batch builder's, None where the C route left a payload) with each None
    replaced by ``line_of(i)``, or kept None where that raises ValueError (the payload does
    not decode).  Without a Python loop over the batch when nothing is missing."""
    if not has_none(lines):  # the common case
        return lines
    for i, line in enumerate(lines):
        if line is None:
            try:
                lines[i] = line_of(i)
            except ValueError:
                pass
    return lines


#: json's own string encoder (C when available): what ``json.dumps(..., ensure_ascii=False)``
#: writes for a ``str``, quotes included.
_encode_str = json.encoder.encode_basestring


def _json_raw_text(raw: bytes) -> str:
    """The stored JSON of a string field's raw bytes: a JSON string, or ``{"b64": ...}``."""
    try:
        return _encode_str(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return '{"b64":"' + base64.b64encode(raw).decode("ascii") + '"}'


def _json_raw_texts(values) -> str:
    return "[" + ",".join(map(_json_raw_text, values)) + "]"


def _line_builder(kind: EventKind):
    """A function ``(view, job JSON, timestamp, sequence) -> line`` for ``kind``: one
    f-string with the kind's keys in place, generated once (as ``dataclasses`` and
    ``namedtuple`` generate theirs), so a line costs one parse and one format."""
    parts = ['{{"job_uuid":{job},"timestamp":{ts},"sequence":{seq}']
    for field in kind.fields:
        if field.type == STR:
            value = f"text(view.{field.key})"
        elif field.type == STRS:
            value = f"texts(view.{field.key})"
        else:
            value = f"view.{field.key}"
        parts.append(f',"{field.key}":{{{value}}}')
    parts.append("}}\\n")
    source = (
        "def line(view, job, ts, seq):\n"
        f"    return f'{''.join(parts)}'.encode('utf-8')\n"
    )
    namespace = {"text": _json_raw_text, "texts": _json_raw_texts}
    exec(source, namespace)  # noqa: S102 - source built above from the kinds table only
    return namespace["line"]


_LINE_BUILDERS = {kind.msg_type: _line_builder(kind) for kind in KINDS}

# The C line builder's field codes (joblet_persist/_speedups.c, event_json_lines).
_C_CODES = {U32: 0, U64: 1, I64: 2, STR: 3, STRS: 4}
#: Per event type: the kind's layout for ``_speedups.event_json_lines``, one
#: (``,"key":`` prefix, field code) per field in field-number order (numbers 4, 5, ...).
_C_LAYOUTS = {
    kind.msg_type: tuple((f',"{f.key}":'.encode("ascii"), _C_CODES[f.type]) for f in kind.fields)
    for kind in KINDS
}
for _kind_ in KINDS:
    # The C builder reads field i at number 4 + i: the layout must be contiguous from 4.
    assert [f.number for f in _kind_.fields] == list(range(4, 4 + len(_kind_.fields)))
del _kind_

try:
    from joblet_persist._speedups import event_json_lines as _event_lines_c
except ImportError:  # not built: payload_json_line does it all
    _event_lines_c = None


def has_none_py(lines: list) -> bool:
    """Whether the list ``lines`` holds None, by identity (``_speedups.has_none`` gives
    the same answer without a Python step per line)."""
    if type(lines) is not list:
        raise TypeError("has_none() needs a list")
    return any(line is None for line in lines)


try:
    from joblet_persist._speedups import has_none
except ImportError:
    has_none = has_none_py


def _json_text(value: Text):
    if isinstance(value, str):
        return value
    return {"b64": base64.b64encode(value).decode("ascii")}


def event_json_line(record: EventRecord) -> bytes:
    """The stored form of ``record``: one compact JSON object and ``\\n``.

    Keys: ``job_uuid``, ``timestamp``, ``sequence``, then the kind's fields in field-number
    order under their IPC names (snake_case).  Integers are exact JSON integers; ``args`` is
    an array; a string that was not valid UTF-8 is ``{"b64": "..."}`` (standard base64 of
    its bytes).  Valid UTF-8 is written as UTF-8, not escaped.
    """
    obj: dict[str, Any] = {
        "job_uuid": record.job_id,
        "timestamp": record.timestamp,
        "sequence": record.sequence,
    }
    for field, value in zip(record.kind.fields, record.values, strict=True):
        if field.type == STR:
            value = _json_text(value)
        elif field.type == STRS:
            value = [_json_text(v) for v in value]
        obj[field.key] = value
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _int_of(value, type_: str) -> int:
    """A stored integer (or one in a decimal string, as protobuf's JSON mapping writes 64-bit
    integers); anything else, or a value out of the field's range, reads as 0."""
    if type(value) is str and value.lstrip("-").isdigit() and value.isascii():
        value = int(value)
    if type(value) is not int:
        return 0
    low, high = _RANGES[type_]
    return value if low <= value <= high else 0


def _text_of(value) -> Text:
    """A stored string: ``str``, or ``bytes`` from a ``{"b64": ...}`` object; else ``""``.

    JSON text may hold lone surrogates (``"\\ud800"``), which no UTF-8 string can carry:
    such a value reads as the bytes Python's ``surrogatepass`` gives, i.e. not valid UTF-8.
    """
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
        return value
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            return ""
        return _text(raw)
    return ""


def _load(line) -> dict:
    if isinstance(line, dict):
        return line
    try:
        obj = json.loads(line)
    except (ValueError, TypeError) as e:
        raise EventRecordError(f"stored event line is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EventRecordError(f"stored event line is a JSON {type(obj).__name__}, not an object")
    return obj


def event_record_from_json(kind: EventKind, line, job_id: str) -> EventRecord:
    """Read a stored line (bytes, str or an already parsed dict) back into a record.

    Tolerant like the metric reader: a missing key, a value of the wrong type or an integer
    out of its field's range reads as 0 / ``""``; unknown keys are ignored.  Lines of other
    writers read too: the older Go service's (Go ``encoding/json`` of the IPC message: the
    same keys, zero values omitted) and protobuf's JSON mapping (camelCase keys, 64-bit
    integers as decimal strings).  ``job_id`` is
    the job asked for (the stored ``job_uuid`` is not trusted).  Raises EventRecordError
    when the line is not a JSON object.
    """
    obj = _load(line)
    values = []
    for field in kind.fields:
        value = obj.get(field.key)
        if value is None and field.camel is not None:
            value = obj.get(field.camel)
        if field.type == STR:
            value = _text_of(value)
        elif field.type == STRS:
            value = tuple(_text_of(v) for v in value) if isinstance(value, list) else ()
        else:
            value = _int_of(value, field.type)
        values.append(value)
    return EventRecord(
        kind,
        job_id,
        _int_of(obj.get("timestamp"), I64),
        _int_of(obj.get("sequence"), U64),
        tuple(values),
    )


def _wire_text(value: Text, name: str, non_utf8) -> str:
    if isinstance(value, str):
        return value
    non_utf8[name] = value
    return value.decode("utf-8", "replace")


def record_message(record: EventRecord):
    """The ``joblet.persist`` message (``record.kind.persist_class``) of a record.

    Socket data is in the query layout (``addr`` -> ``dst_addr``, ``port`` -> ``dst_port``).
    A string that is not valid UTF-8 is sent decoded with U+FFFD replacements, and its
    original bytes in ``non_utf8[name]`` (``args.N`` for an argument).
    """
    msg = record.kind.persist_class(
        job_uuid=record.job_id, timestamp=record.timestamp, sequence=record.sequence
    )
    non_utf8 = msg.non_utf8
    for field, value in zip(record.kind.fields, record.values, strict=True):
        name = field.query_name
        if field.type == STR:
            setattr(msg, name, _wire_text(value, name, non_utf8))
        elif field.type == STRS:
            getattr(msg, name).extend(
                _wire_text(v, f"{name}.{i}", non_utf8) for i, v in enumerate(value)
            )
        else:
            setattr(msg, name, value)
    return msg


def event_message(kind: EventKind, line, job_id: str):
    """A stored line -> the message the kind's Query*Events RPC returns.

    The message ``record_message(event_record_from_json(kind, line, job_id))`` gives.  Lines
    as this service writes them (every value of its field's type and range, strings valid
    UTF-8, snake_case keys) take a shortcut: one constructor call with the values as they
    are (a few microseconds against 10-40); any other line takes the tolerant route.
    Raises EventRecordError when the line is not a JSON object.
    """
    obj = _load(line)
    msg = _MESSAGE_BUILDERS[kind.msg_type](obj, job_id)
    if msg is None:
        msg = record_message(event_record_from_json(kind, obj, job_id))
    return msg


def _plain_text(value) -> bool:
    """A stored string the shortcut may pass on: a ``str`` that UTF-8 can encode."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _message_builder(kind: EventKind):
    """``(obj, job_id) -> message, or None`` when ``obj`` needs the tolerant reader."""
    make = kind.persist_class
    i64_low, i64_high = _RANGES[I64]
    u64_high = _RANGES[U64][1]
    plan = tuple(
        (field.key, field.query_name, field.type, _RANGES.get(field.type, (0, 0)))
        for field in kind.fields
    )

    def build(obj: dict, job_id: str):
        # A missing key (camelCase or Go-style lines, which leave zero values out) fails
        # its type check below: such lines take the tolerant route.
        ts = obj.get("timestamp")
        seq = obj.get("sequence")
        if (
            type(ts) is not int
            or type(seq) is not int
            or not (i64_low <= ts <= i64_high and 0 <= seq <= u64_high)
        ):
            return None
        kwargs = {"job_uuid": job_id, "timestamp": ts, "sequence": seq}
        for key, name, type_, (low, high) in plan:
            value = obj.get(key)
            if type_ == STR:
                if not _plain_text(value):
                    return None
            elif type_ == STRS:
                if type(value) is not list or not all(map(_plain_text, value)):
                    return None
            elif type(value) is not int or not low <= value <= high:
                return None
            kwargs[name] = value
        return make(**kwargs)

    return build


_MESSAGE_BUILDERS = {kind.msg_type: _message_builder(kind) for kind in KINDS}
