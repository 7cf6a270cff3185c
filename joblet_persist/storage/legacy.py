"""Reading files written by the older Go implementation (docs/storage-format.md).

Leaf module: pure functions, no reactor imports, no module-level mutable
state; they run on whichever thread scans or reads a segment.

The Go service wrote multi-member gzip files of JSON lines, one gzip member per
flushed batch, no FEXTRA subfield.  Log lines look like::

    {"job_uuid":"j1","stream":1,"timestamp":1700000000000000000,"sequence":7,"content":"aGkK"}

(``job_id`` instead of ``job_uuid`` in some versions; fields equal to zero are
omitted; ``content`` is standard base64).  Metric lines are the Metric message
as JSON, with ``data`` holding ``cpu_usage``, ``memory_usage``, ``gpu_usage``,
``disk_io`` and ``network_io``.  Parsing is liberal: any spelling of a key that
differs only in case or underscores is accepted (``cpuUsage``, ``diskIO``),
metric fields may sit at the top level instead of under ``data``, numbers may
be JSON strings, timestamps may be RFC 3339 strings or ``{"seconds", "nanos"}``
objects, and streams may be names (``"STDERR"``).  Lines that are not JSON
objects are ignored.

Legacy messages get persistent ordinals ``LEGACY_ORDINAL_BASE + index`` (index
counts messages from the start of the file) so that they sort before all data
written by this service.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from typing import Iterator

__all__ = [
    "LEGACY_ORDINAL_BASE",
    "legacy_member_summary",
    "parse_legacy_log_member",
    "parse_legacy_event_member",
    "parse_legacy_metric_member",
]

#: First ordinal of a file's legacy messages; far below any ordinal we assign.
LEGACY_ORDINAL_BASE = -(10**15)

_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:?\d{2})?\Z"
)


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _normalized(obj: dict) -> dict:
    """The object's keys folded to lowercase without underscores."""
    out = {}
    for key, value in obj.items():
        if isinstance(key, str):
            out.setdefault(_norm(key), value)
    return out


def _iter_objects(data: bytes) -> Iterator[dict]:
    """Yield each JSON-object line of ``data``; other lines are skipped."""
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield _normalized(obj)


def _int(value, default: int = 0) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else default
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                return default
            return int(f) if math.isfinite(f) else default
    return default


def _float(value, default: float = 0.0) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return default
    return default


def _timestamp(value) -> int:
    """Unix ns from an integer, a numeric string, RFC 3339 text or {seconds, nanos}."""
    if isinstance(value, dict):
        norm = _normalized(value)
        return _int(norm.get("seconds")) * 1_000_000_000 + _int(norm.get("nanos"))
    if isinstance(value, str):
        m = _RFC3339.match(value.strip())
        if m:
            date, clock, frac, tz = m.groups()
            tz = tz or "Z"
            if tz in ("Z", "z"):
                tz = "+00:00"
            elif ":" not in tz:
                tz = tz[:3] + ":" + tz[3:]
            try:
                dt = datetime.fromisoformat(f"{date}T{clock}{tz}")
            except ValueError:
                return 0
            delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
            seconds = delta.days * 86400 + delta.seconds
            return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))
    return _int(value)


_STREAM_NAMES = {
    "stdout": 1,
    "streamtypestdout": 1,
    "stderr": 2,
    "streamtypestderr": 2,
}


def _stream(value) -> int:
    if isinstance(value, str):
        named = _STREAM_NAMES.get(_norm(value))
        if named is not None:
            return named
    return _int(value)


def _content(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value.encode("utf-8", "surrogatepass")
    if isinstance(value, list) and all(isinstance(v, int) and 0 <= v < 256 for v in value):
        return bytes(value)
    return json.dumps(value).encode()


def legacy_member_summary(data: bytes) -> tuple[int, int, int, int, int]:
    """``(count, min_timestamp, max_timestamp, first_sequence, last_sequence)``.

    Works for log and metric members alike (it reads only the top-level
    timestamp and sequence of each record).  Zeros when the member is empty.
    """
    count = 0
    min_ts = max_ts = first_seq = last_seq = 0
    for norm in _iter_objects(data):
        ts = _timestamp(norm.get("timestamp"))
        seq = _int(norm.get("sequence"))
        if count == 0:
            min_ts = max_ts = ts
            first_seq = seq
        else:
            min_ts = min(min_ts, ts)
            max_ts = max(max_ts, ts)
        last_seq = seq
        count += 1
    return count, min_ts, max_ts, first_seq, last_seq


def parse_legacy_log_member(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Decode one inflated legacy log member into ``(stream, timestamp, sequence, content)``.

    Pure; any thread.  Records of both streams may be present; the caller
    filters by stream.  Lines that are not JSON objects are skipped.
    """
    return [
        (
            _stream(norm.get("stream")),
            _timestamp(norm.get("timestamp")),
            _int(norm.get("sequence")),
            _content(norm.get("content")),
        )
        for norm in _iter_objects(data)
    ]


def parse_legacy_event_member(data: bytes) -> list[tuple[int, int, dict]]:
    """Decode one inflated legacy telemetry event member: ``(timestamp, sequence, object)``.

    Pure; any thread.  The same lines count as in legacy_member_summary; the
    object is the line as written (events.event_record_from_json reads Go's
    keys), timestamp and sequence read as for logs.
    """
    out = []
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            norm = _normalized(obj)
            out.append((_timestamp(norm.get("timestamp")), _int(norm.get("sequence")), obj))
    return out


_DISK_KEYS = ("read_bytes", "write_bytes", "read_ops", "write_ops")
_NET_KEYS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


def _sub(norm: dict, key: str) -> dict:
    value = norm.get(_norm(key))
    return _normalized(value) if isinstance(value, dict) else {}


def _cpu(value):
    f = _float(value)
    return f if math.isfinite(f) else None


def parse_legacy_metric_member(data: bytes) -> list[dict]:
    """Decode one inflated legacy metrics member into our stored record dicts.

    Pure; any thread.  Each dict has the shape metric_json_line writes:
    ``{"job_uuid", "timestamp", "sequence", "data": {"cpu_usage", "memory_usage",
    "gpu_usage", "disk_io": {...}, "network_io": {...}}}`` with every field
    present (0 when absent).
    """
    out = []
    for norm in _iter_objects(data):
        inner = norm.get("data")
        source = _normalized(inner) if isinstance(inner, dict) else norm
        disk = _sub(source, "disk_io")
        net = _sub(source, "network_io")
        job = norm.get("jobuuid", norm.get("jobid", ""))
        out.append(
            {
                "job_uuid": job if isinstance(job, str) else str(job),
                "timestamp": _timestamp(norm.get("timestamp")),
                "sequence": _int(norm.get("sequence")),
                "data": {
                    "cpu_usage": _cpu(source.get("cpuusage")),
                    "memory_usage": _int(source.get("memoryusage")),
                    "gpu_usage": _cpu(source.get("gpuusage")),
                    "disk_io": {k: _int(disk.get(_norm(k))) for k in _DISK_KEYS},
                    "network_io": {k: _int(net.get(_norm(k))) for k in _NET_KEYS},
                },
            }
        )
    return out
