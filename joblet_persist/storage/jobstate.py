"""A loaded job's segments and counts, as LocalStorage keeps them in memory.

Reactor thread: ``_JobState`` is mutable and only the reactor thread touches
it; ``_Segment`` is immutable.  Leaf module: no reactor imports, no Deferreds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from joblet_persist.storage import reader
from joblet_persist.storage.api import JobInfo
from joblet_persist.storage.jobindex import ALL_KINDS, METRICS_KIND


@dataclass(frozen=True, slots=True)
class _Segment:
    index: int
    path: str
    size: int  # bytes of published members: where the next append goes
    view: reader.SegmentView
    # Set when the file turned out shorter than ``size`` (cut outside the service):
    # appends go to a new segment, what is left of this one stays readable.
    closed: bool = False


class _JobState:
    """Mutable per-job state.  Reactor thread only."""

    __slots__ = ("job_id", "segments", "base", "info", "last_used")

    def __init__(self, job_id: str, segments: dict, base: int, info: JobInfo, now: float):
        self.job_id = job_id
        self.segments = segments  # kind -> tuple[_Segment, ...]
        self.base = base  # ordinal base: persistent ordinal = base + arrival
        self.info = info
        self.last_used = now  # clock seconds of the last load, append or open_job


def _recount(state: _JobState) -> JobInfo:
    """A job's JobInfo recomputed from its published segments (after dropping one)."""
    log_count = metric_count = size = 0
    first = last = 0
    for kind in ALL_KINDS:
        for seg in state.segments[kind]:
            size += seg.size
            for m in seg.view.members:
                if not m.count:
                    continue
                if kind == METRICS_KIND:
                    metric_count += m.count
                else:
                    log_count += m.count
                if m.min_timestamp > 0 and (first == 0 or m.min_timestamp < first):
                    first = m.min_timestamp
                if m.max_timestamp > last:
                    last = m.max_timestamp
    return dataclasses.replace(
        state.info,
        log_count=log_count,
        metric_count=metric_count,
        size_bytes=size,
        first_timestamp=first,
        last_timestamp=last,
    )
