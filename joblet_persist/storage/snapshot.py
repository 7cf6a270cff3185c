"""LocalJobSnapshot: one job's published, immutable data in a local directory.

Any thread: built on the reactor thread when an append, load or drop is
published, then only read (by gRPC handler threads through storage.reader).
Leaf module: no reactor imports, no Deferreds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from zope.interface import implementer

from joblet_persist import events
from joblet_persist.storage import metric_columns, reader, search, tail
from joblet_persist.storage.api import (
    EVENT_OF_KIND,
    LOG_STREAMS,
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAM_UNSPECIFIED,
    DataVanished,
    IBulkLogReads,
    IJobSnapshot,
    ILogSearch,
    ILogTail,
    IMetricColumns,
    JobInfo,
    ReadStats,
    SegmentKind,
    StorageUnavailable,
)
from joblet_persist.storage.files import FileBudget


def _never_cancelled() -> bool:
    return False


def _seam_errors(job_id: str, records):
    """``records``, with the OSErrors of reading them raised as the seam's errors.  Any thread.

    A file the snapshot names that is gone was deleted under the read
    (DeleteJob, retention): DataVanished.  Any other OSError: StorageUnavailable.
    """
    try:
        yield from records
    except FileNotFoundError as e:
        raise DataVanished(job_id, str(e)) from e
    except OSError as e:
        raise StorageUnavailable(f"reading job {job_id} failed: {e}") from e


# -- the published, immutable view -----------------------------------------


@implementer(IJobSnapshot, IBulkLogReads, ILogTail, ILogSearch, IMetricColumns)
@dataclass(frozen=True, eq=False)
class LocalJobSnapshot:
    """One job's published data.  Immutable; any thread.

    Holds the SegmentViews of each stream and of the metrics, each listing only
    members that were completely appended before the snapshot was published;
    the reader never reads past them.
    """

    job_id: str
    info: JobInfo
    # tuple[reader.SegmentView, ...] in segment order; left out of repr (large).
    stdout: tuple = field(repr=False)
    stderr: tuple = field(repr=False)
    metrics: tuple = field(repr=False)
    # Shared cap on the files queries hold open (storage.files), or None.
    budget: Optional[FileBudget] = field(default=None, repr=False)
    # Event kind name -> tuple[reader.SegmentView, ...]; kinds without segments are absent.
    events: dict = field(default_factory=dict, repr=False)

    def views(self, kind: SegmentKind) -> tuple:
        """The SegmentViews of one segment kind, in segment order."""
        if kind == SegmentKind.STDOUT:
            return self.stdout
        if kind == SegmentKind.STDERR:
            return self.stderr
        if kind == SegmentKind.METRICS:
            return self.metrics
        return self.events.get(EVENT_OF_KIND[kind], ())

    def iter_logs(
        self,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """Yield LogRecords (see IJobSnapshot.iter_logs).  Blocking; any thread."""
        return self._read_logs(
            reader.iter_logs, stream, start_time, end_time, offset, limit, stats, cancelled
        )

    def iter_log_chunks(
        self,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """The messages of iter_logs in chunks ``(streams, timestamps, sequences, contents)``.

        Blocking; any thread.  IBulkLogReads (see reader.iter_log_chunks): the
        log query RPCs use it.
        """
        return self._read_logs(
            reader.iter_log_chunks, stream, start_time, end_time, offset, limit, stats, cancelled
        )

    def count_logs(
        self,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ) -> int:
        """ILogTail: messages iter_logs would yield, counted from headers.  Blocking; any
        thread."""
        def count(*args):  # a generator, so that _seam_errors maps the read's OSErrors
            yield tail.count_logs(*args)

        return next(self._read_logs(count, stream, start_time, end_time, stats, cancelled))

    def iter_log_chunks_ordinals(
        self,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """ILogTail: iter_log_chunks with each message's ordinal.  Blocking; any thread."""
        return self._read_logs(
            tail.iter_log_chunks_ordinals,
            stream, start_time, end_time, offset, limit, stats, cancelled,
        )

    def search_log_chunks(
        self,
        matcher,
        stream: int,
        start_time: int = 0,
        end_time: int = 0,
        limits=None,
        submit=None,
        window: int = 4,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """Matching messages in chunks (ILogSearch; see search.search_views).  gRPC thread."""
        if stream != STREAM_UNSPECIFIED and stream not in LOG_STREAMS:
            raise ValueError(f"invalid stream {stream!r}: expected 0, 1 or 2")
        streams = {STREAM_STDOUT: self.stdout, STREAM_STDERR: self.stderr}
        extra = {} if submit is None else {"submit": submit}
        return _seam_errors(self.job_id, search.search_views(
            streams, stream, matcher, start_time, end_time, limits=limits, window=window,
            stats=stats, cancelled=cancelled, budget=self.budget, **extra,
        ))

    def _read_logs(self, read, stream: int, *args):
        """``read`` (a reader function) over both streams' segments, within the budget."""
        if stream != STREAM_UNSPECIFIED and stream not in LOG_STREAMS:
            raise ValueError(f"invalid stream {stream!r}: expected 0, 1 or 2")
        streams = {STREAM_STDOUT: self.stdout, STREAM_STDERR: self.stderr}
        return _seam_errors(self.job_id, read(streams, stream, *args, self.budget))

    def iter_metrics(
        self,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """Yield MetricRecords (see IJobSnapshot.iter_metrics).  Blocking; any thread."""
        return _seam_errors(
            self.job_id,
            reader.iter_metrics(
                self.metrics, start_time, end_time, offset, limit, stats, cancelled, self.budget
            ),
        )

    def iter_metric_columns(
        self,
        fields: tuple,
        start_time: int = 0,
        end_time: int = 0,
        submit=None,
        window: int = 4,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """Metric fields in columns (IMetricColumns; see metric_columns.iter_metric_columns).
        gRPC thread."""
        extra = {} if submit is None else {"submit": submit}
        return _seam_errors(self.job_id, metric_columns.iter_metric_columns(
            self.metrics, fields, start_time, end_time, window=window, stats=stats,
            cancelled=cancelled, budget=self.budget, **extra,
        ))

    def iter_events(
        self,
        kind: str,
        start_time: int = 0,
        end_time: int = 0,
        offset: int = 0,
        limit: int = 0,
        stats: Optional[ReadStats] = None,
        cancelled: Callable[[], bool] = _never_cancelled,
    ):
        """Yield StoredEvents of ``kind`` (see IJobSnapshot.iter_events).  Blocking; any thread."""
        event_kind = events.KINDS_BY_NAME.get(kind)
        if event_kind is None:
            raise ValueError(f"unknown event kind {kind!r}")
        return _seam_errors(
            self.job_id,
            reader.iter_events(
                self.events.get(kind, ()),
                event_kind.msg_type,
                start_time,
                end_time,
                offset,
                limit,
                stats,
                cancelled,
                self.budget,
            ),
        )
