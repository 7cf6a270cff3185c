"""Reading a job back from CloudWatch Logs: the CloudWatch backend's read side.

Blocking; any thread (gRPC handler threads call it through a snapshot).  The
narrow interface a tiered storage plugs in: ``CloudWatchReader.iter_logs``,
``iter_metrics`` and ``iter_events`` for one job, with the storage contract's
semantics (``IJobSnapshot``: inclusive time range on each bound > 0, then
``offset`` matching messages skipped, then at most ``limit``, 0 = all), and
``CloudWatchJobSnapshot``, an ``IJobSnapshot`` over them.

What comes back (docs/operations.md, "CloudWatch"):

- One record per stored message: the parts of a split chunk are joined back,
  escaped (non-UTF-8) chunks are decoded to their exact bytes.
- Log chunks: the timestamp is CloudWatch's millisecond one (the stored
  nanoseconds truncated), the sequence is the message's 1-based position in
  its stream (CloudWatch keeps no sequence).  Both streams merged (stream 0)
  are ordered by timestamp, stdout first on ties: the arrival order across
  streams is not kept in CloudWatch.  Within a stream CloudWatch returns
  events in timestamp order.
- Metric samples and telemetry events come back exactly (timestamp in ns,
  sequence, data), in timestamp order.

Each stream is read with GetLogEvents from the head, page after page, until
the forward token repeats.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterator, Optional

from zope.interface import implementer

from joblet_persist.archive import cloudwatch_api as api
from joblet_persist.archive import cloudwatch_codec as codec
from joblet_persist.storage.api import (
    KIND_OF_EVENT,
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAM_UNSPECIFIED,
    IJobSnapshot,
    LogRecord,
    MetricRecord,
    SegmentKind,
    StorageUnavailable,
    StoredEvent,
)

#: Events per GetLogEvents page (the API's maximum).
PAGE_EVENTS = 10_000


def _never() -> bool:
    return False


class CloudWatchReader:
    """Reads jobs' streams from one log group.  ``logs_client`` is a boto3 "logs" client."""

    def __init__(self, logs_client, group: str, page_events: int = PAGE_EVENTS):
        self._client = logs_client
        self.group = group
        self._page = page_events

    # -- raw events ------------------------------------------------------------------

    def iter_events_raw(self, stream: str, cancelled: Callable[[], bool] = _never,
                        start_ms: Optional[int] = None,
                        end_ms: Optional[int] = None) -> Iterator[tuple[int, str]]:
        """``(timestamp_ms, message)`` of a stream from its head; nothing when it is missing.

        ``start_ms``/``end_ms`` (inclusive) narrow what CloudWatch returns.
        """
        args = {"logGroupName": self.group, "logStreamName": stream, "startFromHead": True,
                "limit": self._page}
        if start_ms is not None:
            args["startTime"] = max(0, start_ms)
        if end_ms is not None:
            args["endTime"] = end_ms + 1  # GetLogEvents' endTime is exclusive
        token = None
        while not cancelled():
            if token is not None:
                args["nextToken"] = token
            try:
                page = self._client.get_log_events(**args)
            except Exception as e:
                if api.error_code(e) == "ResourceNotFoundException":
                    return
                raise StorageUnavailable(f"reading {self.group}/{stream} from CloudWatch: {e}") \
                    from e
            for event in page.get("events", ()):
                yield event["timestamp"], event["message"]
            nxt = page.get("nextForwardToken")
            if nxt is None or nxt == token:
                return
            token = nxt

    def _joined(self, job_id: str, kind: SegmentKind, cancelled, start: int, end: int):
        start_ms = codec.ns_to_ms(start) if start > 0 else None
        end_ms = codec.ns_to_ms(end) if end > 0 else None
        raw = self.iter_events_raw(api.stream_name(job_id, kind), cancelled, start_ms, end_ms)
        return codec.join_events(raw)

    # -- the storage contract's reads ----------------------------------------------------

    def iter_logs(self, job_id: str, stream: int, start_time: int = 0, end_time: int = 0,
                  offset: int = 0, limit: int = 0,
                  cancelled: Callable[[], bool] = _never) -> Iterator[LogRecord]:
        """The job's LOG messages as LogRecords (see the module docstring)."""
        if stream not in (STREAM_UNSPECIFIED, STREAM_STDOUT, STREAM_STDERR):
            raise ValueError(f"invalid stream {stream!r}: expected 0, 1 or 2")
        wanted = (STREAM_STDOUT, STREAM_STDERR) if stream == STREAM_UNSPECIFIED else (stream,)
        kind_of = {STREAM_STDOUT: SegmentKind.STDOUT, STREAM_STDERR: SegmentKind.STDERR}

        def records(st: int):
            # Positions count every message of the stream: the time range is applied after.
            for position, j in enumerate(self._joined(job_id, kind_of[st], cancelled, 0, 0),
                                         start=1):
                yield j.timestamp_ms * 1_000_000, st, position, j.content

        merged = heapq.merge(*(records(st) for st in wanted), key=lambda r: (r[0], r[1]))
        return _window(
            (LogRecord(st, ts, seq, content) for ts, st, seq, content in merged),
            start_time, end_time, offset, limit,
        )

    def iter_metrics(self, job_id: str, start_time: int = 0, end_time: int = 0,
                     offset: int = 0, limit: int = 0,
                     cancelled: Callable[[], bool] = _never) -> Iterator[MetricRecord]:
        """The job's metric samples as MetricRecords, exactly as stored."""
        return self._records(job_id, SegmentKind.METRICS, MetricRecord, start_time, end_time,
                             offset, limit, cancelled)

    def iter_events(self, job_id: str, kind: str, start_time: int = 0, end_time: int = 0,
                    offset: int = 0, limit: int = 0,
                    cancelled: Callable[[], bool] = _never) -> Iterator[StoredEvent]:
        """The job's telemetry events of ``kind`` (an event kind name) as StoredEvents."""
        segment_kind = KIND_OF_EVENT.get(kind)
        if segment_kind is None:
            raise ValueError(f"unknown event kind {kind!r}")
        return self._records(job_id, segment_kind, StoredEvent, start_time, end_time, offset,
                             limit, cancelled)

    def _records(self, job_id, kind, make, start_time, end_time, offset, limit, cancelled):
        def records():
            for j in self._joined(job_id, kind, cancelled, start_time, end_time):
                ts, seq, data = codec.decode_record(j.content)
                yield make(ts, seq, data)

        return _window(records(), start_time, end_time, offset, limit)

    def has_job(self, job_id: str) -> bool:
        """Whether any stream of the job exists in the group."""
        try:
            page = self._client.describe_log_streams(
                logGroupName=self.group, logStreamNamePrefix=f"{job_id}-", limit=50)
        except Exception as e:
            if api.error_code(e) == "ResourceNotFoundException":
                return False
            raise StorageUnavailable(f"listing {self.group} in CloudWatch: {e}") from e
        names = {api.stream_name(job_id, kind) for kind in SegmentKind}
        return any(s["logStreamName"] in names for s in page.get("logStreams", ()))


def _window(records, start_time: int, end_time: int, offset: int, limit: int):
    """The contract's semantics: time range (bounds > 0, inclusive), offset, limit."""
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must be >= 0")
    emitted = 0
    for rec in records:
        ts = rec.timestamp
        if (start_time > 0 and ts < start_time) or (end_time > 0 and ts > end_time):
            continue
        if offset:
            offset -= 1
            continue
        yield rec
        emitted += 1
        if limit and emitted >= limit:
            return


@implementer(IJobSnapshot)
class CloudWatchJobSnapshot:
    """A job as CloudWatch holds it: the IJobSnapshot a tiered storage hands to queries.

    ``info`` is the JobInfo the caller knows (the job index keeps it after the
    local copy is gone).  Any thread; ``stats`` is accepted and left untouched
    (nothing is inflated).
    """

    def __init__(self, reader: CloudWatchReader, job_id: str, info):
        self._reader = reader
        self.job_id = job_id
        self.info = info

    def iter_logs(self, stream, start_time=0, end_time=0, offset=0, limit=0, stats=None,
                  cancelled=None):
        return self._reader.iter_logs(self.job_id, stream, start_time, end_time, offset, limit,
                                      cancelled or _never)

    def iter_metrics(self, start_time=0, end_time=0, offset=0, limit=0, stats=None,
                     cancelled=None):
        return self._reader.iter_metrics(self.job_id, start_time, end_time, offset, limit,
                                         cancelled or _never)

    def iter_events(self, kind, start_time=0, end_time=0, offset=0, limit=0, stats=None,
                    cancelled=None):
        return self._reader.iter_events(self.job_id, kind, start_time, end_time, offset, limit,
                                        cancelled or _never)
