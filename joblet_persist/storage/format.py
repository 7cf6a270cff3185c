"""The on-disk member format: gzip members that carry their own index.

Leaf module: pure, blocking functions, no reactor imports, no module-level
mutable state.  Encoding runs on the writer's CPU pool threads; decoding runs
on whichever thread reads (gRPC handler threads, pool threads scanning files).

A segment file is a concatenation of gzip members (RFC 1952).  Each member this
service writes carries, in its gzip header's FEXTRA field, a subfield with
SI1='J', SI2='P' holding the member's total size, message count, ordinal,
timestamp and sequence bounds, raw size and a per-message table (content
lengths and deltas; a line member, whose messages are all whole lines, has no
lengths: its newlines give them).  Every gzip reader skips that field, so ``zcat`` of a log
segment prints exactly the raw bytes received and ``zcat`` of a metrics segment
prints JSON lines.  docs/storage-format.md specifies every byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import methodcaller, sub
from typing import Optional, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from joblet_persist._proto import ipc_pb2
from joblet_persist.events import fill_missing_lines

__all__ = [
    "KIND_LEGACY",
    "KIND_LOG",
    "KIND_METRIC",
    "KIND_EVENTS",
    "FORMAT_VERSION",
    "DEFAULT_MEMBER_RAW",
    "MAX_TABLE_BYTES",
    "CorruptMember",
    "UnsupportedMember",
    "FLAG_LINES",
    "MemberInfo",
    "MemberTable",
    "encode_log_members",
    "encode_metric_members",
    "encode_event_members",
    "metric_json_line",
    "metric_json_lines",
    "metric_record_dict",
    "decode_member_table",
    "inflate_member",
    "message_bounds",
    "read_member",
    "read_member_header",
    "parse_member_header",
    "gzip_header_length",
]

KIND_LEGACY = 0
KIND_LOG = 1
KIND_METRIC = 2
# Telemetry event members: the kind is the event's IPC message type (joblet_persist/events.py).
KIND_EVENTS = range(3, 10)
_KINDS = (KIND_LOG, KIND_METRIC, *KIND_EVENTS)

#: Version byte of the JP subfield written by this module.
FORMAT_VERSION = 1

#: Default upper bound of a member's uncompressed data (a single larger
#: message still gets a member of its own).  Queries inflate whole members, so
#: this is the granularity of random access.
DEFAULT_MEMBER_RAW = 1 << 20

_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16

#: ID1 ID2 CM=8 FLG=FEXTRA MTIME=0 XFL=0 OS=255.
_GZIP_PREFIX = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
_SI = b"JP"

#: The fixed part of the JP subfield payload, little-endian.
#: version, kind, flags, reserved, meta_crc, member_size, count, raw_size,
#: table_raw_size, first_ordinal, last_ordinal, min_timestamp, max_timestamp,
#: first_sequence, last_sequence.
_FIXED = struct.Struct("<BBBBIIIIIqqqqQQ")
_FIXED_SIZE = _FIXED.size  # 72
_CRC_COVERS_FROM = 8  # meta_crc covers the payload from this offset to its end

#: Bit 0 of flags: the table is stored as a raw deflate stream.
FLAG_TABLE_DEFLATED = 1

#: Bit 1 of flags: a line member.  The table has no lengths column; message i is the i-th
#: line of the data (every message ends with exactly one newline, its only one).
FLAG_LINES = 2

#: The flag bits this release reads; a member with any other bit set was written by a later
#: release (UnsupportedMember).
_KNOWN_FLAGS = FLAG_TABLE_DEFLATED | FLAG_LINES

#: Largest stored table so that XLEN (4 + payload) stays <= 65535.
MAX_TABLE_BYTES = 0xFFFF - 4 - _FIXED_SIZE

_HEADER_OVERHEAD = len(_GZIP_PREFIX) + 2 + 4 + _FIXED_SIZE  # before the table
_TRAILER_SIZE = 8
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_TABLE_DEFLATE_MIN = 64  # smaller tables are never worth deflating


def _make_table_class():
    """Build the protobuf message class whose wire form is the member table.

    Built once at import into a private descriptor pool (never the default
    one); the class is immutable module configuration, not state.
    """
    fdp = descriptor_pb2.FileDescriptorProto(
        name="joblet_persist/storage/member_table.proto",
        package="joblet_persist.storage",
        syntax="proto3",
    )
    msg = fdp.message_type.add(name="MemberTable")
    f = descriptor_pb2.FieldDescriptorProto
    for number, name, ftype in (
        (1, "lengths", f.TYPE_UINT64),
        (2, "timestamp_deltas", f.TYPE_SINT64),
        (3, "sequence_deltas", f.TYPE_SINT64),
        (4, "ordinal_deltas", f.TYPE_UINT64),
    ):
        msg.field.add(name=name, number=number, type=ftype, label=f.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("joblet_persist.storage.MemberTable")
    )


_TableProto = _make_table_class()

try:
    # Plans a batch's members (boundaries, tables, data) in C, mostly without the GIL;
    # _plan_members_py below is the reference.
    from joblet_persist._speedups import plan_members as _plan_members_c
except ImportError:  # not built (no compiler): the pure-Python planner is used
    _plan_members_c = None

try:
    # Decodes canonically encoded tables in one C pass (about 5x faster); anything else, and
    # every table when the extension is not built, takes the protobuf path below.
    from joblet_persist._speedups import decode_table as _decode_table_c
except ImportError:
    _decode_table_c = None

try:
    # The message offsets of a line member's data in one C pass; _line_bounds_py otherwise.
    from joblet_persist._speedups import line_bounds as _line_bounds_c
except ImportError:
    _line_bounds_c = None


def _placed(what: str, reason: str, path: Optional[str], offset: Optional[int]) -> str:
    """The message of a member error: ``"<what> member at <path> offset <n>: <reason>"``
    with the place parts that are known, or ``reason`` alone when neither is."""
    where = []
    if path is not None:
        where.append(str(path))
    if offset is not None:
        where.append(f"offset {offset}")
    return f"{what} member at {' '.join(where)}: {reason}" if where else reason


class UnsupportedMember(ValueError):
    """A JP member of a format this release does not know: a later version, or flag bits
    it does not read.

    Not damage: a later release wrote it, and reads it.  So it is never treated as a torn
    tail or a damaged region (nothing is cut or skipped over on its account): the scan of a
    file stops at it and the file is reported by name.  A ValueError, since a header that
    cannot be parsed is one; callers that must keep the difference catch this first.
    """

    def __init__(self, reason: str, path: Optional[str] = None, offset: Optional[int] = None):
        super().__init__(_placed("unsupported", reason, path, offset))
        self.reason = reason
        self.path = path
        self.offset = offset


class CorruptMember(Exception):
    """A member whose bytes do not decode: bad header, CRC, size or table.

    ``path`` and ``offset`` name where the member lies when they are known;
    the message includes them.
    """

    def __init__(self, reason: str, path: Optional[str] = None, offset: Optional[int] = None):
        super().__init__(_placed("corrupt", reason, path, offset))
        self.reason = reason
        self.path = path
        self.offset = offset


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What a member's header says about it; immutable, any thread."""

    offset: int  # byte offset of the member in its file
    size: int  # total bytes of the member (header..trailer)
    kind: int  # KIND_LOG, KIND_METRIC, one of KIND_EVENTS, or KIND_LEGACY
    count: int  # messages in the member
    first_ordinal: int  # persistent arrival ordinal of the first message
    last_ordinal: int
    min_timestamp: int  # Unix ns
    max_timestamp: int
    first_sequence: int
    last_sequence: int
    raw_size: int  # uncompressed data bytes


@dataclass(frozen=True, slots=True)
class MemberTable:
    """Per-message columns of one member, decoded from its header only.

    ``lengths[i]`` is the byte length of message i within the member's
    uncompressed data (for metrics, the JSON line including its newline).
    ``lengths`` is None for a line member (FLAG_LINES): message i is the i-th
    line of the data; ``message_bounds`` gives the offsets of both kinds.
    """

    lengths: Optional[list]
    timestamps: list
    sequences: list
    ordinals: list


# -- encoding ---------------------------------------------------------------


def _wrap_signed(values: list) -> list:
    """Reduce integers modulo 2**64 into the signed 64-bit range."""
    if values and (min(values) < _I64_MIN or max(values) > _I64_MAX):
        return [((v - _I64_MIN) & _U64) + _I64_MIN for v in values]
    return values


def _check_range(name: str, values: list, low: int, high: int) -> None:
    if min(values) < low or max(values) > high:
        raise ValueError(f"{name} out of range {low}..{high}")


_ends_with_newline = methodcaller("endswith", b"\n")


def _is_lines(items, i: int, j: int) -> bool:
    """Whether every message of [i, j) ends with a newline, its only one (a line member).

    The C planner checks the same, message by message; an empty message is no line.
    """
    window = items[i:j]
    return all(map(_ends_with_newline, window)) and b"".join(window).count(b"\n") == j - i


def _build_table(lengths, ts, d_ts, d_seq, d_ord, i: int, j: int, lines: bool = False):
    """Serialize the table of messages [i, j); returns (stored, flags, raw_len, min_ts, max_ts).

    With ``lines`` (the window is all lines, see _is_lines) the lengths column is left
    out and FLAG_LINES is set.  Raises ValueError when a timestamp of the window is
    outside int64.
    """
    window = ts[i:j]
    min_ts = min(window)
    max_ts = max(window)
    if min_ts < _I64_MIN or max_ts > _I64_MAX:
        raise ValueError(f"timestamp out of range {_I64_MIN}..{_I64_MAX}")
    ts_deltas = [ts[i] - min_ts] + d_ts[i : j - 1]
    seq_deltas = [0] + d_seq[i : j - 1]
    window = () if lines else lengths[i:j]
    try:
        msg = _TableProto(
            lengths=window,
            timestamp_deltas=ts_deltas,
            sequence_deltas=seq_deltas,
            ordinal_deltas=[0] + d_ord[i : j - 1],
        )
    except ValueError:
        # A delta outside int64 (values near both ends of the range): store it modulo
        # 2**64, which the reader undoes.  Rare, so the common path never scans for it.
        msg = _TableProto(
            lengths=window,
            timestamp_deltas=_wrap_signed(ts_deltas),
            sequence_deltas=_wrap_signed(seq_deltas),
            ordinal_deltas=[0] + d_ord[i : j - 1],
        )
    raw = msg.SerializeToString()
    stored, flags = _pack_table(raw)
    return stored, flags | (FLAG_LINES if lines else 0), len(raw), min_ts, max_ts


def _pack_table(raw: bytes):
    """Deflate a serialized table when that makes it smaller; returns (stored, flags)."""
    if len(raw) >= _TABLE_DEFLATE_MIN:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        packed = c.compress(raw) + c.flush()
        if len(packed) < len(raw):
            return packed, FLAG_TABLE_DEFLATED
    return raw, 0


def _check_newlines(items, what: Optional[str]) -> None:
    """With ``what`` ("metric", "event"): ValueError unless every item ends with a newline."""
    if what is not None and not all(map(_ends_with_newline, items)):
        raise ValueError(f"{what} JSON lines must end with a newline")


def _plan_members_py(items: list, ts: list, seq: list, ords: list, max_member_raw: int,
                     lines: bool) -> list:
    """Split a batch into members: ``[(end, data, crc, stored_table, flags, table_raw_size,
    min_ts, max_ts), ...]`` in order, member k holding messages [end of k-1, end), ``crc``
    the CRC-32 of its data.

    A member holds as many messages as fit ``max_member_raw`` data bytes (at least one), fewer
    when its table would not fit a header (MAX_TABLE_BYTES: shrunk proportionally).  Validates
    the columns (ValueError).  The reference of the C planner ``_speedups.plan_members``,
    which gives the same tuples (tests/test_member_table.py) and runs mostly without the GIL.
    """
    n = len(items)
    lengths = list(map(len, items))
    _check_range("sequence", seq, 0, _U64)
    d_ord = list(map(sub, ords[1:], ords))
    if d_ord and min(d_ord) <= 0:
        raise ValueError("ordinals must be strictly increasing")
    # Strictly increasing: the ends bound every ordinal.
    _check_range("ordinal", [ords[0], ords[-1]], _I64_MIN, _I64_MAX)
    d_ts = list(map(sub, ts[1:], ts))
    d_seq = list(map(sub, seq[1:], seq))
    cum = list(accumulate(lengths, initial=0))
    plan = []
    i = 0
    while i < n:
        j = max(i + 1, bisect_right(cum, cum[i] + max_member_raw, i + 1) - 1)
        while True:
            is_lines = lines and _is_lines(items, i, j)
            stored, flags, raw_len, min_ts, max_ts = _build_table(
                lengths, ts, d_ts, d_seq, d_ord, i, j, is_lines
            )
            if len(stored) <= MAX_TABLE_BYTES:
                break
            # Too many messages for one header: shrink proportionally.
            fit = int((j - i) * MAX_TABLE_BYTES / len(stored) * 0.95)
            j = i + max(1, min(fit, j - i - 1))
        raw_size = cum[j] - cum[i]
        if raw_size > _U32:
            raise ValueError(f"message of {raw_size} bytes is too large for one member")
        data = b"".join(items[i:j])
        plan.append((j, data, zlib.crc32(data), stored, flags, raw_len, min_ts, max_ts))
        i = j
    return plan


#: The types of int column the planners take as they are.
_INT_COLUMNS = (list, array)


def _encode_members(
    kind: int,
    timestamps: Sequence[int],
    sequences: Sequence[int],
    ordinals: Sequence[int],
    items: Sequence[bytes],
    compressor,
    max_member_raw: int,
    lines: bool,
    newlines: Optional[str] = None,
    ordinal_base: int = 0,
) -> list:
    """Encode a batch as members (the encode_*_members functions).  With ``newlines`` (what
    the items are: "metric", "event"), every item must end with a newline: ValueError
    "<newlines> JSON lines must end with a newline" otherwise, before any other check.
    Message k's ordinal is ``ordinal_base + ordinals[k]``: tables store ordinal deltas, so
    the base only moves each member's first and last ordinal (and must keep them int64)."""
    n = len(items)
    if not (len(timestamps) == len(sequences) == len(ordinals) == n):
        _check_newlines(items, newlines)
        raise ValueError(
            f"column lengths differ: {len(timestamps)} timestamps, {len(sequences)} "
            f"sequences, {len(ordinals)} ordinals, {n} items"
        )
    if n == 0:
        return []
    if max_member_raw < 1:
        _check_newlines(items, newlines)
        raise ValueError(f"max_member_raw must be >= 1, got {max_member_raw}")
    # This runs on a pool thread, and the reactor needs the GIL for every received frame:
    # the per-message work (boundaries, tables, joining and checksumming the data) is the C
    # planner's, which releases the GIL for it; what stays here is per member.  The C planner returns None
    # for input it does not take (a value out of range, ...): the Python planner decides.
    # Int columns are lists or packed (array.array, what metric and event batches hold):
    # the C planner copies a packed column whole.
    ts = timestamps if type(timestamps) in _INT_COLUMNS else list(timestamps)
    seq = sequences if type(sequences) in _INT_COLUMNS else list(sequences)
    ords = ordinals if type(ordinals) in _INT_COLUMNS else list(ordinals)
    items = items if type(items) is list else list(items)
    plan = None
    if _plan_members_c is not None:
        # With ``newlines`` the C planner checks the newlines too (None when one is missing).
        plan = _plan_members_c(
            items, ts, seq, ords, max_member_raw, lines, MAX_TABLE_BYTES, newlines is not None
        )
    if plan is None:
        _check_newlines(items, newlines)
        plan = _plan_members_py(items, ts, seq, ords, max_member_raw, lines)
    if ordinal_base:
        # Strictly increasing (the planners checked): the ends bound every ordinal.
        _check_range("ordinal", [ordinal_base + ords[0], ordinal_base + ords[-1]],
                     _I64_MIN, _I64_MAX)

    out = []
    i = 0
    for j, data, crc, stored, flags, raw_len, min_ts, max_ts in plan:
        raw_size = len(data)
        first, last = ordinal_base + ords[i], ordinal_base + ords[j - 1]
        # Releases the GIL (libdeflate, ISA-L, zlib) for a member's data.
        body = compressor.compress_raw(data)
        size = _HEADER_OVERHEAD + len(stored) + len(body) + _TRAILER_SIZE
        if size > _U32:
            raise ValueError(f"member of {size} bytes is too large")
        tail = _FIXED.pack(
            FORMAT_VERSION, kind, flags, 0, 0,
            size, j - i, raw_size, raw_len,
            first, last, min_ts, max_ts, seq[i], seq[j - 1],
        )[_CRC_COVERS_FROM:] + stored
        meta_crc = zlib.crc32(tail)
        payload = bytes((FORMAT_VERSION, kind, flags, 0)) + struct.pack("<I", meta_crc) + tail
        header = b"".join(
            (
                _GZIP_PREFIX,
                struct.pack("<H", 4 + len(payload)),
                _SI,
                struct.pack("<H", len(payload)),
                payload,
            )
        )
        member = b"".join((header, body, struct.pack("<II", crc, raw_size & _U32)))
        assert len(member) == size
        info = MemberInfo(
            offset=0, size=size, kind=kind, count=j - i,
            first_ordinal=first, last_ordinal=last,
            min_timestamp=min_ts, max_timestamp=max_ts,
            first_sequence=seq[i], last_sequence=seq[j - 1],
            raw_size=raw_size,
        )  # fmt: skip
        out.append((member, info))
        i = j
    return out


def encode_log_members(
    timestamps: Sequence[int],
    sequences: Sequence[int],
    ordinals: Sequence[int],
    contents: Sequence[bytes],
    compressor,
    max_member_raw: int = DEFAULT_MEMBER_RAW,
    lines: bool = True,
    ordinal_base: int = 0,
) -> list:
    """Encode a batch of LOG messages of one stream as gzip members.

    Pure and blocking; runs on a CPU pool thread.  Returns
    ``[(member_bytes, MemberInfo), ...]`` in order; each MemberInfo has offset
    0 (relative): the caller concatenates the bytes and shifts the offsets.
    An empty batch gives ``[]``.  The batch is split into several members when
    its data exceeds ``max_member_raw`` bytes or its table does not fit one
    header.  ``ordinals`` must be strictly increasing; timestamps and ordinals
    must fit int64, sequences uint64.  Raises ValueError otherwise.  With
    ``lines`` (the default) a member whose messages all end with their only
    newline gets a line table (FLAG_LINES, no lengths column); ``lines=False``
    writes the lengths column always (files older releases read).  Message k's ordinal is
    ``ordinal_base + ordinals[k]`` (a job's ordinal base plus its arrival numbers, without
    a list of the sums).
    """
    return _encode_members(
        KIND_LOG, timestamps, sequences, ordinals, contents, compressor, max_member_raw, lines,
        ordinal_base=ordinal_base,
    )


def encode_metric_members(
    timestamps: Sequence[int],
    sequences: Sequence[int],
    ordinals: Sequence[int],
    json_lines: Sequence[bytes],
    compressor,
    max_member_raw: int = DEFAULT_MEMBER_RAW,
    lines: bool = True,
    ordinal_base: int = 0,
) -> list:
    """Encode a batch of metric JSON lines (from metric_json_line) as gzip members.

    Same contract as encode_log_members; each line must end in ``b"\\n"``.
    """
    return _encode_members(
        KIND_METRIC, timestamps, sequences, ordinals, json_lines, compressor, max_member_raw,
        lines, "metric", ordinal_base,
    )


def encode_event_members(
    kind: int,
    timestamps: Sequence[int],
    sequences: Sequence[int],
    ordinals: Sequence[int],
    json_lines: Sequence[bytes],
    compressor,
    max_member_raw: int = DEFAULT_MEMBER_RAW,
    lines: bool = True,
    ordinal_base: int = 0,
) -> list:
    """Encode a batch of telemetry event JSON lines (from events.event_json_line) of one
    kind as gzip members whose JP ``kind`` is the event's IPC message type (3..9).

    Same contract as encode_metric_members.
    """
    if kind not in KIND_EVENTS:
        raise ValueError(f"event member kind must be an event message type 3..9, not {kind}")
    return _encode_members(
        kind, timestamps, sequences, ordinals, json_lines, compressor, max_member_raw, lines,
        "event", ordinal_base,
    )


def _finite(value: float):
    return value if math.isfinite(value) else None


def metric_record_dict(job_id: str, metric) -> dict:
    """The stored JSON object of a decoded ``joblet.ipc.Metric`` message."""
    d = metric.data
    disk = d.disk_io
    net = d.network_io
    return {
        "job_uuid": job_id,
        "timestamp": metric.timestamp,
        "sequence": metric.sequence,
        "data": {
            "cpu_usage": _finite(d.cpu_usage),
            "memory_usage": d.memory_usage,
            "gpu_usage": _finite(d.gpu_usage),
            "disk_io": {
                "read_bytes": disk.read_bytes,
                "write_bytes": disk.write_bytes,
                "read_ops": disk.read_ops,
                "write_ops": disk.write_ops,
            },
            "network_io": {
                "rx_bytes": net.rx_bytes,
                "tx_bytes": net.tx_bytes,
                "rx_packets": net.rx_packets,
                "tx_packets": net.tx_packets,
            },
        },
    }


def metric_json_line(job_id: str, payload: bytes) -> bytes:
    """One compact JSON line (ending in ``\\n``) for a serialized ``joblet.ipc.Metric``.

    Pure; any thread.  Keys are docs/wire.md's snake_case names; ``job_uuid`` is
    ``job_id``; timestamp and sequence come from the payload; every numeric
    field is present (0 when unset); integers are exact; a non-finite
    cpu/gpu usage is written as ``null`` so the line stays valid JSON.
    Raises ValueError when ``payload`` does not decode.
    """
    if _metric_line_c is not None:
        # The C twin: canonical payloads (what encoders write) in one call; None otherwise.
        line = _metric_line_c(_json_string(job_id), payload)
        if line is not None:
            return line
    return _metric_json_line_py(job_id, payload)


def metric_json_lines(job_id: str, payloads: list) -> list:
    """``metric_json_line`` over a batch of one job, in order: the line of each payload, or
    None where it does not decode (``metric_json_line`` raises ValueError).  Pure; any
    thread.  With the C extension built, canonical payloads take one call for the batch."""
    if _metric_lines_c is not None:
        lines = _metric_lines_c(
            _json_string(job_id), payloads if type(payloads) is list else list(payloads)
        )
    else:
        lines = [None] * len(payloads)
    return fill_missing_lines(lines, lambda i: _metric_json_line_py(job_id, payloads[i]))


def _metric_json_line_py(job_id: str, payload: bytes) -> bytes:
    """``metric_json_line`` through the protobuf classes (the reference of the C twin)."""
    metric = _new_metric()
    try:
        metric.ParseFromString(bytes(payload))
    except DecodeError as e:
        raise ValueError(f"undecodable Metric payload: {e}") from None
    # The bytes json.dumps(metric_record_dict(...), separators=(",", ":")) gives (tests hold
    # it to that), written with one f-string: about a third of the time.  json writes floats
    # with float.__repr__ and ints with int.__repr__; NaN and the infinities become null.
    d = metric.data
    disk = d.disk_io
    net = d.network_io
    cpu = d.cpu_usage
    gpu = d.gpu_usage
    return (
        f'{{"job_uuid":{_json_string(job_id)},"timestamp":{metric.timestamp!r},'
        f'"sequence":{metric.sequence!r},"data":{{'
        f'"cpu_usage":{_float_repr(cpu) if _isfinite(cpu) else "null"},'
        f'"memory_usage":{d.memory_usage!r},'
        f'"gpu_usage":{_float_repr(gpu) if _isfinite(gpu) else "null"},'
        f'"disk_io":{{"read_bytes":{disk.read_bytes!r},"write_bytes":{disk.write_bytes!r},'
        f'"read_ops":{disk.read_ops!r},"write_ops":{disk.write_ops!r}}},'
        f'"network_io":{{"rx_bytes":{net.rx_bytes!r},"tx_bytes":{net.tx_bytes!r},'
        f'"rx_packets":{net.rx_packets!r},"tx_packets":{net.tx_packets!r}}}}}}}\n'
    ).encode()


_new_metric = ipc_pb2.Metric
_json_string = json.encoder.encode_basestring_ascii  # json.dumps' own (C) string encoder
_float_repr = float.__repr__
_isfinite = math.isfinite

try:
    from joblet_persist._speedups import metric_json_line as _metric_line_c
    from joblet_persist._speedups import metric_json_lines as _metric_lines_c
except ImportError:  # not built: the protobuf route does it all
    _metric_line_c = None
    _metric_lines_c = None


# -- decoding ---------------------------------------------------------------


def gzip_header_length(buf) -> Optional[int]:
    """Length of the gzip member header at the start of ``buf``.

    Returns None when ``buf`` is too short to tell; raises ValueError when the
    bytes are not a gzip deflate header.
    """
    if len(buf) < 10:
        return None
    if buf[0] != 0x1F or buf[1] != 0x8B:
        raise ValueError("no gzip magic")
    if buf[2] != 8:
        raise ValueError(f"unsupported compression method {buf[2]}")
    flg = buf[3]
    if flg & 0xE0:
        raise ValueError(f"reserved gzip flag bits set ({flg:#x})")
    pos = 10
    if flg & _FEXTRA:
        if len(buf) < pos + 2:
            return None
        pos += 2 + (buf[pos] | (buf[pos + 1] << 8))
    for bit in (_FNAME, _FCOMMENT):
        if flg & bit:
            end = bytes(buf[pos : pos + 65536 * 16]).find(b"\x00") if pos < len(buf) else -1
            if end < 0:
                return None
            pos += end + 1
    if flg & _FHCRC:
        pos += 2
    if len(buf) < pos:
        return None
    return pos


def _jp_payload(extra) -> Optional[bytes]:
    """The JP subfield payload inside a gzip extra field, or None."""
    pos = 0
    n = len(extra)
    while pos + 4 <= n:
        length = extra[pos + 2] | (extra[pos + 3] << 8)
        if pos + 4 + length > n:
            raise ValueError("gzip extra subfield overruns the extra field")
        if extra[pos] == 0x4A and extra[pos + 1] == 0x50:  # 'J' 'P'
            return bytes(extra[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return None


def _parse_payload(payload: bytes, offset: int):
    """Validate a JP payload; returns (MemberInfo, flags, table_raw_size, stored_table)."""
    if len(payload) < _FIXED_SIZE:
        raise ValueError("JP subfield shorter than its fixed part")
    (
        version, kind, flags, _reserved, meta_crc, size, count, raw_size, table_raw_size,
        first_ord, last_ord, min_ts, max_ts, first_seq, last_seq,
    ) = _FIXED.unpack_from(payload)  # fmt: skip
    if version != FORMAT_VERSION:
        # A later format: its layout past the version byte is not ours to judge.
        raise UnsupportedMember(f"JP version {version} (this release reads {FORMAT_VERSION})")
    if zlib.crc32(memoryview(payload)[_CRC_COVERS_FROM:]) != meta_crc:
        raise ValueError("JP header checksum mismatch")
    if flags & ~_KNOWN_FLAGS:
        raise UnsupportedMember(
            f"JP flag bits {flags & ~_KNOWN_FLAGS:#x} (this release reads {_KNOWN_FLAGS:#x})"
        )
    if kind not in _KINDS:
        raise ValueError(f"unknown member kind {kind}")
    if count < 1 or last_ord < first_ord or max_ts < min_ts:
        raise ValueError("inconsistent member bounds")
    info = MemberInfo(
        offset=offset, size=size, kind=kind, count=count,
        first_ordinal=first_ord, last_ordinal=last_ord,
        min_timestamp=min_ts, max_timestamp=max_ts,
        first_sequence=first_seq, last_sequence=last_seq,
        raw_size=raw_size,
    )  # fmt: skip
    return info, flags, table_raw_size, payload[_FIXED_SIZE:]


def parse_member_header(header, offset: int = 0):
    """Parse the gzip header at the start of ``header`` (bytes-like).

    Returns ``(MemberInfo, header_length)`` for a member with a JP subfield
    (``offset`` becomes MemberInfo.offset), or ``(None, header_length)`` for a
    plain gzip member (legacy or foreign).  Raises ValueError when the bytes
    are not a complete, valid gzip header or the JP subfield is invalid, and
    its subclass UnsupportedMember when the JP subfield is of a later format
    (a version or flag bits this release does not know).
    """
    hlen = gzip_header_length(header)
    if hlen is None or len(header) < hlen:
        raise ValueError("truncated gzip header")
    if not header[3] & _FEXTRA:
        return None, hlen
    xlen = header[10] | (header[11] << 8)
    payload = _jp_payload(memoryview(header)[12 : 12 + xlen])
    if payload is None:
        return None, hlen
    info = _parse_payload(payload, offset)[0]
    if info.size < hlen + 2 + _TRAILER_SIZE:
        raise ValueError(f"member size {info.size} smaller than its header")
    return info, hlen


def read_member_header(f, offset: int, limit: Optional[int] = None) -> bytes:
    """Read the complete gzip header of the member at ``offset`` of file ``f``.

    Blocking; reads only the header bytes (normally two small reads).
    ``limit`` is the file offset the header may not extend past (the file or
    member end).  Raises ValueError when the header is truncated or invalid.
    """
    f.seek(offset)
    buf = b""
    want = 12
    while True:
        if limit is not None:
            want = min(want, limit - offset)
        if want > len(buf):
            buf += f.read(want - len(buf))
        hlen = gzip_header_length(buf)
        if hlen is not None:
            return buf[:hlen]
        if len(buf) < want or (limit is not None and want >= limit - offset):
            raise ValueError("truncated gzip header")
        nxt = len(buf) + 256
        if len(buf) >= 12 and buf[3] & _FEXTRA:
            nxt = max(nxt, 12 + (buf[10] | (buf[11] << 8)))
        want = nxt


def _table_from_header(header, member: MemberInfo, where) -> MemberTable:
    if not header[3] & _FEXTRA:
        raise CorruptMember("member has no JP subfield", *where)
    xlen = header[10] | (header[11] << 8)
    try:
        payload = _jp_payload(memoryview(header)[12 : 12 + xlen])
        if payload is None:
            raise ValueError("member has no JP subfield")
        info, flags, table_raw_size, stored = _parse_payload(payload, member.offset)
    except UnsupportedMember as e:
        raise UnsupportedMember(e.reason, *where) from None
    except ValueError as e:
        raise CorruptMember(str(e), *where) from None
    return _decode_table(stored, flags, table_raw_size, info, where)


def _accumulate_wrapped(base: int, deltas, unsigned: bool) -> list:
    values = list(accumulate(deltas, initial=base))[1:]
    if unsigned:
        if values and (min(values) < 0 or max(values) > _U64):
            values = [v & _U64 for v in values]
        return values
    return _wrap_signed(values)


def _decode_table(stored: bytes, flags: int, table_raw_size: int, info: MemberInfo, where):
    if flags & FLAG_TABLE_DEFLATED:
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(stored, table_raw_size + 1)
        except zlib.error as e:
            raise CorruptMember(f"table does not inflate: {e}", *where) from None
        if not d.eof or len(raw) != table_raw_size:
            raise CorruptMember("table inflates to the wrong size", *where)
    else:
        raw = stored
    lines = bool(flags & FLAG_LINES)
    columns = None
    if _decode_table_c is not None:
        columns = _decode_table_c(
            raw, info.count, info.min_timestamp, info.first_sequence, info.first_ordinal, lines
        )
    if columns is None:  # not the canonical encoding, or the extension is not built
        columns = _decode_table_proto(raw, info, where, lines)
    lengths, timestamps, sequences, ordinals, total, low, high = columns
    # A line member's lengths are checked against its data once inflated (message_bounds);
    # here only that its count of lines, at least a byte each, fits its raw size.
    if (
        (info.raw_size < info.count if lines else total != info.raw_size)
        or ordinals[-1] != info.last_ordinal
        or sequences[-1] != info.last_sequence
        or low != info.min_timestamp
        or high != info.max_timestamp
    ):
        raise CorruptMember("table disagrees with the member bounds", *where)
    return MemberTable(lengths, timestamps, sequences, ordinals)


def _decode_table_proto(raw: bytes, info: MemberInfo, where, lines: bool = False) -> tuple:
    """The reference decoder: the columns of ``_speedups.decode_table``, from protobuf.

    With ``lines`` (FLAG_LINES) the lengths column must be absent, and lengths is None.
    """
    try:
        msg = _TableProto.FromString(raw)
    except DecodeError as e:
        raise CorruptMember(f"table does not decode: {e}", *where) from None
    lengths = list(msg.lengths)
    ts_deltas = list(msg.timestamp_deltas)
    seq_deltas = list(msg.sequence_deltas)
    ord_deltas = list(msg.ordinal_deltas)
    n = info.count
    if lines:
        if lengths:
            raise CorruptMember("line member's table has a lengths column", *where)
        lengths = None
    elif len(lengths) != n:
        raise CorruptMember("table column lengths do not match the count", *where)
    if not (len(ts_deltas) == len(seq_deltas) == len(ord_deltas) == n):
        raise CorruptMember("table column lengths do not match the count", *where)
    timestamps = _accumulate_wrapped(info.min_timestamp, ts_deltas, unsigned=False)
    sequences = _accumulate_wrapped(info.first_sequence, seq_deltas, unsigned=True)
    ordinals = _accumulate_wrapped(info.first_ordinal, ord_deltas, unsigned=False)
    low = min(timestamps) if timestamps else None
    high = max(timestamps) if timestamps else None
    return lengths, timestamps, sequences, ordinals, sum(lengths or ()), low, high


def _line_bounds_py(data, count: int) -> Optional[list]:
    """The reference of ``_speedups.line_bounds``: the ``count + 1`` offsets of the lines
    of ``data``, or None when it does not hold exactly ``count`` newlines, the last at its
    end."""
    if count < 0 or data.count(b"\n") != count or (data and not data.endswith(b"\n")):
        return None
    if not data:
        return [0] if count == 0 else None
    parts = data.split(b"\n")
    parts.pop()  # after the last newline: empty
    return list(accumulate(map(len, parts), lambda total, n: total + n + 1, initial=0))


def message_bounds(table: MemberTable, data, path: Optional[str] = None,
                   offset: Optional[int] = None) -> list:
    """Where the member's messages lie in its inflated ``data``: ``count + 1`` offsets,
    message i being ``data[bounds[i]:bounds[i + 1]]``.

    From the lengths column, or, for a line member (``table.lengths`` None), from the
    newlines of the data.  Any thread.  Raises CorruptMember (naming ``path`` and
    ``offset``) when the lengths do not add up to the data, or a line member's data does
    not hold exactly one newline per message with the last at its end.
    """
    if table.lengths is not None:
        bounds = list(accumulate(table.lengths, initial=0))
        if bounds[-1] != len(data):
            raise CorruptMember("message lengths do not add up to the data", path, offset)
        return bounds
    count = len(table.ordinals)
    found = _line_bounds_c(data, count) if _line_bounds_c is not None else None
    if found is None:
        found = _line_bounds_py(data, count)
    if found is None:
        raise CorruptMember(
            f"line member's data does not hold exactly {count} newline-terminated lines",
            path,
            offset,
        )
    return found


def _file_name(f) -> Optional[str]:
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None


def decode_member_table(source, member: MemberInfo) -> MemberTable:
    """Decode a member's per-message table from its header, inflating no data.

    Blocking; any thread.  ``source`` is one of: the member's bytes (bytes,
    bytearray or memoryview beginning at the member's first header byte; the
    header alone suffices), a path (str or os.PathLike) of the file holding the
    member at ``member.offset``, or a binary file object holding it there.
    Raises CorruptMember when the header is damaged or is not a JP member.
    """
    if member.kind == KIND_LEGACY:
        raise CorruptMember("legacy members have no table", None, member.offset)
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = (None, member.offset)
        try:
            hlen = gzip_header_length(source)
        except ValueError as e:
            raise CorruptMember(str(e), *where) from None
        if hlen is None or len(source) < hlen:
            raise CorruptMember("truncated gzip header", *where)
        return _table_from_header(bytes(source[:hlen]), member, where)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return decode_member_table(f, member)
    where = (_file_name(source), member.offset)
    try:
        header = read_member_header(source, member.offset, member.offset + member.size)
    except ValueError as e:
        raise CorruptMember(str(e), *where) from None
    return _table_from_header(header, member, where)


def _read_exact(f, member: MemberInfo) -> bytes:
    f.seek(member.offset)
    buf = f.read(member.size)
    if len(buf) != member.size:
        raise CorruptMember(
            f"short read: {len(buf)} of {member.size} bytes", _file_name(f), member.offset
        )
    return buf


def _inflate_bytes(buf, hlen: int, member: MemberInfo, where) -> bytes:
    d = zlib.decompressobj(-15)
    body = memoryview(buf)[hlen:]
    try:
        if member.kind == KIND_LEGACY:
            data = d.decompress(body)
        else:
            data = d.decompress(body, member.raw_size + 1)
    except zlib.error as e:
        raise CorruptMember(f"data does not inflate: {e}", *where) from None
    if not d.eof or d.unconsumed_tail:
        raise CorruptMember("deflate stream does not end where the member does", *where)
    trailer = d.unused_data
    if len(trailer) != _TRAILER_SIZE:
        raise CorruptMember(f"trailer of {len(trailer)} bytes instead of 8", *where)
    crc, isize = struct.unpack("<II", trailer)
    if zlib.crc32(data) != crc:
        raise CorruptMember("CRC32 mismatch", *where)
    if len(data) & _U32 != isize:
        raise CorruptMember("ISIZE mismatch", *where)
    if member.kind != KIND_LEGACY and len(data) != member.raw_size:
        raise CorruptMember("raw size differs from the header", *where)
    return data


def read_member(f, member: MemberInfo):
    """Read one member from binary file ``f``: ``(MemberTable or None, data)``.

    Blocking; any thread.  Reads the member's bytes once, decodes its table
    (None for a legacy member), inflates its data and verifies CRC32, ISIZE
    and that the table's lengths add up to the data (for a line member: that
    the data is exactly ``count`` lines).  Raises CorruptMember.
    """
    where = (_file_name(f), member.offset)
    buf = _read_exact(f, member)
    try:
        hlen = gzip_header_length(buf)
    except ValueError as e:
        raise CorruptMember(str(e), *where) from None
    if hlen is None or hlen + _TRAILER_SIZE > len(buf):
        raise CorruptMember("truncated gzip header", *where)
    table = None
    if member.kind != KIND_LEGACY:
        table = _table_from_header(buf[:hlen], member, where)
    data = _inflate_bytes(buf, hlen, member, where)
    if table is not None and table.lengths is None:
        message_bounds(table, data, *where)  # a line member: one newline per message
    return table, data


def inflate_member(f, member: MemberInfo) -> bytes:
    """Read the member's bytes from binary file ``f`` and inflate its data.

    Blocking; any thread.  Verifies CRC32 and ISIZE (and, for our members, the
    raw size); raises CorruptMember naming the file and offset otherwise.
    """
    where = (_file_name(f), member.offset)
    buf = _read_exact(f, member)
    try:
        hlen = gzip_header_length(buf)
    except ValueError as e:
        raise CorruptMember(str(e), *where) from None
    if hlen is None or hlen + _TRAILER_SIZE > len(buf):
        raise CorruptMember("truncated gzip header", *where)
    return _inflate_bytes(buf, hlen, member, where)
