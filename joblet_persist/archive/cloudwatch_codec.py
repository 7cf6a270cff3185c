"""How stored messages become CloudWatch Logs events and back; PutLogEvents batching.

Leaf module: pure functions, no reactor, no boto3; any thread.  docs/operations.md
section "CloudWatch" is the specification of the event format.

Event messages
--------------
- A log chunk that is valid UTF-8, fits in one event and does not start with
  the marker ``\\u241e`` (SYMBOL FOR RECORD SEPARATOR) is sent as it is: the
  console and Logs Insights show ordinary output unchanged.
- Anything else is sent as one or more *envelope* events whose message is
  ``\\u241e{mode}{i}/{n} {body}``: ``mode`` is ``t`` when the chunk is UTF-8
  text (the body is that text) or ``x`` when it is not (the body is the chunk
  decoded as UTF-8 with every backslash doubled and every byte that is not
  valid UTF-8 written as ``\\xNN``: readable where the chunk is text, and
  lossless); ``i/n`` numbers the parts of a chunk that was split to fit the
  event size cap (the bodies of parts 1..n, concatenated, are the body).  An
  empty chunk is ``\\u241et1/1 `` (CloudWatch refuses empty messages).
- Metric samples and telemetry events are sent as one JSON object each,
  ``{"timestamp": ns, "sequence": n, "data": {...}}`` (lossless), through the
  same envelope rules.

CloudWatch keeps an event's timestamp in milliseconds: a log chunk read back
has its nanosecond timestamp truncated to the millisecond, and no sequence
number (docs/operations.md says what reads return).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

#: PutLogEvents limits (AWS CloudWatch Logs API reference).
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 262_144 - EVENT_OVERHEAD  # UTF-8 bytes of one event's message
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000
#: Events older than this, or further in the future, are refused by CloudWatch.
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_FUTURE_MS = 2 * 3600 * 1000
#: Margin kept from both edges, so that an event accepted here is not refused by the
#: time the request arrives (clock skew, retries).
EDGE_MARGIN_MS = 5 * 60 * 1000

MARKER = "\u241e"
#: Room an envelope header takes at most ("\u241ex123456/123456 " is 17 bytes).
_HEADER_ROOM = 64
_PART_BYTES = MAX_EVENT_BYTES - _HEADER_ROOM
_HEADER_RE = re.compile("\u241e([tx])([0-9]{1,9})/([0-9]{1,9}) ")
_UNESCAPE_RE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def ns_to_ms(ns: int) -> int:
    """A nanosecond timestamp as CloudWatch's milliseconds (truncated)."""
    return ns // 1_000_000


def escape_bytes(content: bytes) -> str:
    """``content`` as text: backslashes doubled, bytes that are not UTF-8 as ``\\xNN``."""
    return content.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_text(text: str) -> bytes:
    """The inverse of escape_bytes."""

    def one(m: re.Match) -> bytes:
        token = m.group(1)
        return b"\\" if token == b"\\" else bytes([int(token[1:], 16)])

    return _UNESCAPE_RE.sub(one, text.encode("utf-8"))


def _split_text(text: str, limit: int, escaped: bool) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` UTF-8 bytes, on character
    boundaries and (when ``escaped``) never inside a ``\\\\`` or ``\\xNN``."""
    data = text.encode("utf-8")
    pieces = []
    start = 0
    while start < len(data):
        end = min(len(data), start + limit)
        if end < len(data):
            while end > start and (data[end] & 0xC0) == 0x80:
                end -= 1  # never cut a multi-byte character
            if escaped:
                end = _escape_boundary(data, start, end)
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


def _escape_boundary(data: bytes, start: int, end: int) -> int:
    r"""``end``, moved back to the start of the escape it would cut (``start`` is on a
    boundary).  In escaped text a run of backslashes parses left to right as ``\\``
    pairs, the last one of an odd run starting an ``\xNN``."""
    p = data.rfind(b"\\", max(start, end - 3), end)
    if p < 0:
        return end
    r = p
    while r > start and data[r - 1] == 0x5C:
        r -= 1
    if (p - r) % 2:
        return end  # p closes a pair that ends before the cut
    length = 2 if p + 1 < len(data) and data[p + 1] == 0x5C else 4
    return p if p + length > end else end


def encode_chunk(content: bytes) -> list[str]:
    """The event messages of one stored chunk (one or more; see the module docstring)."""
    try:
        text = content.decode("utf-8")
        mode = "t"
    except UnicodeDecodeError:
        text, mode = escape_bytes(content), "x"
    if (mode == "t" and text and not text.startswith(MARKER)
            and len(content) <= MAX_EVENT_BYTES):
        return [text]
    pieces = _split_text(text, _PART_BYTES, mode == "x") or [""]
    n = len(pieces)
    return [f"{MARKER}{mode}{i}/{n} {piece}" for i, piece in enumerate(pieces, start=1)]


def encode_record(timestamp: int, sequence: int, data) -> list[str]:
    """The event messages of one metric sample or telemetry event (a JSON object)."""
    doc = {"timestamp": timestamp, "sequence": sequence, "data": data}
    return encode_chunk(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass(frozen=True, slots=True)
class Joined:
    """One stored message read back: CloudWatch's timestamp (ms) and the chunk's bytes."""

    timestamp_ms: int
    content: bytes
    parts: int


def join_events(events: Iterable[tuple[int, str]]) -> Iterator[Joined]:
    """Stored messages from a stream's events ``(timestamp_ms, message)``, in order.

    Parts of a split chunk are joined back.  A part 1 arriving while an earlier
    chunk is incomplete means that chunk was sent again after a failure
    (at-least-once delivery): the incomplete copy is dropped.  An incomplete
    chunk at the end of the stream is returned as far as it goes.
    """
    pending: Optional[list] = None  # [timestamp, mode, n, [bodies]]
    for ts, message in events:
        m = _HEADER_RE.match(message)
        if m is None:
            if pending is not None:
                yield _finish(pending)
                pending = None
            yield Joined(ts, message.encode("utf-8"), 1)
            continue
        mode, i, n = m.group(1), int(m.group(2)), int(m.group(3))
        body = message[m.end():]
        if i == 1:
            pending = [ts, mode, n, [body]]
        elif pending is not None and pending[1] == mode and pending[2] == n \
                and len(pending[3]) == i - 1:
            pending[3].append(body)
        else:
            continue  # a stray later part (its first part was not kept): nothing to join to
        if len(pending[3]) == pending[2]:
            yield _finish(pending)
            pending = None
    if pending is not None:
        yield _finish(pending)


def _finish(pending: list) -> Joined:
    ts, mode, _n, bodies = pending
    text = "".join(bodies)
    content = text.encode("utf-8") if mode == "t" else unescape_text(text)
    return Joined(ts, content, len(bodies))


def decode_record(content: bytes) -> tuple[int, int, dict]:
    """``(timestamp ns, sequence, data)`` of a metric sample or event read back."""
    doc = json.loads(content)
    return int(doc["timestamp"]), int(doc["sequence"]), doc["data"]


# -- PutLogEvents batching ------------------------------------------------------------


def event_size(message: str) -> int:
    """What one event counts against MAX_BATCH_BYTES."""
    return len(message.encode("utf-8")) + EVENT_OVERHEAD


def in_range(ts_ms: int, now_ms: int) -> bool:
    """Whether CloudWatch accepts an event at ``ts_ms`` now (with EDGE_MARGIN_MS to spare)."""
    return (now_ms - MAX_AGE_MS + EDGE_MARGIN_MS <= ts_ms
            <= now_ms + MAX_FUTURE_MS - EDGE_MARGIN_MS)


@dataclass
class Batch:
    """One PutLogEvents request: ``events`` in order, and how many stored messages
    (counted from the start of the planned run) are complete once it is sent."""

    events: list  # [{"timestamp": ms, "message": str}, ...]
    done: int
    size: int = 0


def plan_batches(messages: Iterable[tuple[int, list[str]]], now_ms: int):
    """PutLogEvents batches for stored messages ``(timestamp_ms, [event messages])``.

    Returns ``(batches, out_of_range)``: the messages not sent because
    CloudWatch would refuse their timestamp are counted, not batched (each
    message counts in ``Batch.done`` all the same).  Every batch holds at most
    MAX_BATCH_EVENTS events and MAX_BATCH_BYTES bytes, its timestamps never go
    backwards and span at most MAX_BATCH_SPAN_MS; the events of one message
    stay in one batch whenever they fit in one.
    """
    batches: list[Batch] = []
    out_of_range = 0
    current: Optional[Batch] = None
    first_ts = last_ts = 0
    done = 0
    for ts, parts in messages:
        done += 1
        if not in_range(ts, now_ms):
            out_of_range += 1
            if current is not None:
                current.done = done
            continue
        sizes = [event_size(p) for p in parts]
        whole = sum(sizes)
        for k, (part, size) in enumerate(zip(parts, sizes, strict=True)):
            if current is not None:
                fits_message = k > 0 or (
                    len(current.events) + len(parts) <= MAX_BATCH_EVENTS
                    and current.size + whole <= MAX_BATCH_BYTES
                ) or not current.events
                fits_event = (len(current.events) < MAX_BATCH_EVENTS
                              and current.size + size <= MAX_BATCH_BYTES)
                ordered = ts >= last_ts and ts - first_ts <= MAX_BATCH_SPAN_MS
                if not (fits_message and fits_event and ordered):
                    current = None
            if current is None:
                current = Batch([], done - 1)
                batches.append(current)
                first_ts = ts
            current.events.append({"timestamp": ts, "message": part})
            current.size += size
            last_ts = ts
        current.done = done
    return batches, out_of_range
