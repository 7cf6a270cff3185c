"""A loaded job's segments and counts, as LocalStorage keeps them in memory.

Reactor thread: ``JobState`` is mutable and only the reactor thread touches
it; ``Segment`` is immutable.  Leaf module: no reactor imports, no Deferreds.

The segment bookkeeping lives here: building a job's segments from a scan,
choosing where the next append goes, applying a completed append to the
segments and the counts, closing a segment found shorter than written,
dropping one, and recounting.  LocalStorage decides when; this module knows how.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from joblet_persist.storage import jobindex, reader, segment
from joblet_persist.storage.api import (
    COUNT_FIELD_OF_KIND,
    KINDS_OF_PART,
    JobInfo,
    Part,
    SegmentKind,
    SegmentUsage,
)
from joblet_persist.threads import reactor_only


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment file of a job as published: where it is and how much of it is valid."""

    index: int
    path: str
    size: int  # bytes of published members: where the next append goes
    view: reader.SegmentView
    # Set when the file turned out shorter than ``size`` (cut outside the service):
    # appends go to a new segment, what is left of this one stays readable.
    closed: bool = False


class JobState:
    """Mutable per-job state.  Reactor thread only."""

    __slots__ = ("job_id", "segments", "base", "info", "last_used")

    def __init__(self, job_id: str, segments: dict, base: int, info: JobInfo, now: float):
        self.job_id = job_id
        self.segments = segments  # kind -> tuple[Segment, ...]
        self.base = base  # ordinal base: persistent ordinal = base + arrival
        self.info = info
        self.last_used = now  # clock seconds of the last load, append or open_job

    @classmethod
    def from_scan(cls, job_id: str, scan, info: JobInfo, now: float, floor=None) -> JobState:
        """The state of a job scanned from its files (a jobindex.JobScan).

        ``floor`` is what another tier holds of the job, as for ``empty``: a kind whose
        local segments all lie below its floor index (its newer segments were released
        to the archive) gets the closed placeholder there, so its appends take the next
        index, and the ordinal base is at least the floor's, so new ordinals stay above
        the archived ones even when what is left locally (another part) has lower ones.
        """
        segments = {}
        for kind in SegmentKind:
            segments[kind] = tuple(
                Segment(
                    s.index,
                    s.path,
                    s.result.valid_size,
                    reader.SegmentView(s.path, s.result.members),
                )
                if s.result.unsupported is None
                # A member of a later format: an append would cut it (appends go at the
                # valid size), so the segment is closed whole and appends go on in the next.
                else Segment(
                    s.index,
                    s.path,
                    s.result.file_size,
                    reader.SegmentView(s.path, s.result.members),
                    True,
                )
                for s in scan.kind_segments(kind)
            )
        for path in scan.refused:
            # A placeholder, closed and empty, keeps appends off the refused name.
            parsed = segment.parse_segment_name(os.path.basename(path))
            if parsed is None:
                continue
            kind, index = parsed
            kept = [s for s in segments[kind] if s.index != index]
            kept.append(Segment(index, path, 0, reader.SegmentView(path, ()), True))
            segments[kind] = tuple(sorted(kept, key=lambda s: s.index))
        base = scan.ordinal_base()
        if floor is not None:
            placeholders, floor_base = floor
            for kind, (index, path) in placeholders.items():
                here = segments[kind]
                if not here or here[-1].index < index:
                    placeholder = Segment(index, path, 0, reader.SegmentView(path, ()), True)
                    segments[kind] = here + (placeholder,)
            base = max(base, floor_base)
        return cls(job_id, segments, base, info, now)

    @classmethod
    def empty(cls, job_id: str, info: JobInfo, now: float, floor=None) -> JobState:
        """The state of a job that has no files yet.

        ``floor`` (``({kind: (index, path)}, ordinal base)``, or None) is what another
        tier still holds of the job (an archive that took its released segments): a
        closed, empty placeholder at each ``index`` (``path``: where that segment's file
        was) sends the kind's appends to the next index, and ordinals start at the base,
        so new segments never reuse a name (an archive key) and the job's ordinals keep
        rising across the tiers.
        """
        segments = {kind: () for kind in SegmentKind}
        base = 0
        if floor is not None:
            placeholders, base = floor
            for kind, (index, path) in placeholders.items():
                segments[kind] = (Segment(index, path, 0, reader.SegmentView(path, ()), True),)
        return cls(job_id, segments, base, info, now)

    def views(self, kind: str) -> tuple:
        """The SegmentViews of ``kind``, in segment order (for a snapshot)."""
        return tuple(s.view for s in self.segments[kind])

    def log_bytes(self) -> int:
        """Bytes of both log streams' segments."""
        return sum(seg.size for kind in KINDS_OF_PART[Part.LOGS] for seg in self.segments[kind])

    def part_sizes(self) -> tuple:
        """Bytes of each Part's segments, in Part order."""
        return tuple(
            sum(seg.size for kind in KINDS_OF_PART[part] for seg in self.segments[kind])
            for part in Part
        )

    @reactor_only
    def next_append(
        self, kind: SegmentKind, directory: str, max_bytes: int
    ) -> tuple[int, str, int]:
        """``(segment index, path, expected size)`` where the next append of ``kind`` goes.

        The last segment while it is under ``max_bytes`` and not closed, else a
        new segment in ``directory``.
        """
        segments = self.segments[kind]
        if segments and segments[-1].size < max_bytes and not segments[-1].closed:
            current = segments[-1]
            return current.index, current.path, current.size
        index = segments[-1].index + 1 if segments else 0
        return index, os.path.join(directory, segment.segment_name(kind, index)), 0

    @reactor_only
    def apply_append(self, kind: SegmentKind, index: int, path: str, result, now: float) -> None:
        """Take in a completed append (a diskwork.AppendResult with members) at ``now``."""
        segments = list(self.segments[kind])
        if segments and segments[-1].index == index:
            members = segments[-1].view.members + result.members
        else:
            segments.append(None)
            members = result.members
        segments[-1] = Segment(index, path, result.new_size, reader.SegmentView(path, members))
        self.segments[kind] = tuple(segments)

        count = 0
        first = self.info.first_timestamp
        last = self.info.last_timestamp
        for m in result.members:
            count += m.count
            if m.count:
                if m.min_timestamp > 0 and (first == 0 or m.min_timestamp < first):
                    first = m.min_timestamp
                if m.max_timestamp > last:
                    last = m.max_timestamp
        info = self.info
        field = COUNT_FIELD_OF_KIND[kind]
        counts = {field: getattr(info, field) + count}
        self.last_used = now
        self.info = dataclasses.replace(
            info,
            last_updated=max(info.last_updated, int(now)),
            size_bytes=info.size_bytes + result.written,
            first_timestamp=first,
            last_timestamp=last,
            **counts,
        )

    @reactor_only
    def close_shrunk(self, kind: SegmentKind, index: int, actual_size: int) -> Optional[Segment]:
        """Close the last segment of ``kind``, found ``actual_size`` bytes long.

        Keeps the members that still lie within the file and recounts the job.
        Returns the segment as it was, or None when ``index`` is not the open
        last segment (nothing changes then).
        """
        segments = self.segments[kind]
        if not segments or segments[-1].index != index or segments[-1].closed:
            return None
        old = segments[-1]
        actual = min(actual_size, old.size)
        kept = tuple(m for m in old.view.members if m.offset + m.size <= actual)
        size = kept[-1].offset + kept[-1].size if kept else 0
        shrunk = Segment(old.index, old.path, size, reader.SegmentView(old.path, kept), True)
        self.segments[kind] = segments[:-1] + (shrunk,)
        self.info = _recount(self)
        return old

    @reactor_only
    def drop(self, kind: SegmentKind, index: int) -> Optional[Segment]:
        """Remove segment ``index`` of ``kind`` and recount; the segment, or None if unknown.

        Raises ValueError for the last segment of its kind (appends go there).
        """
        segments = self.segments[kind]
        positions = [i for i, seg in enumerate(segments) if seg.index == index]
        if not positions:
            return None
        if positions[0] == len(segments) - 1:
            raise ValueError(f"segment {kind} {index} of job {self.job_id} is being written")
        dropped = segments[positions[0]]
        self.segments[kind] = segments[: positions[0]] + segments[positions[0] + 1 :]
        self.info = _recount(self)
        return dropped

    @reactor_only
    def usage(self) -> tuple:
        """SegmentUsage of each segment; ``last_segment`` marks where appends go."""
        usage = []
        for kind in SegmentKind:
            segments = self.segments[kind]
            for i, seg in enumerate(segments):
                usage.append(SegmentUsage(kind, seg.index, seg.size, i == len(segments) - 1))
        return tuple(usage)


def _recount(state: JobState) -> JobInfo:
    """A job's JobInfo recomputed from its published segments (after dropping one)."""
    counts, size, first, last = jobindex.tally_members(
        (kind, seg.size, seg.view.members) for kind in SegmentKind for seg in state.segments[kind]
    )
    return dataclasses.replace(
        state.info,
        **counts,
        size_bytes=size,
        first_timestamp=first,
        last_timestamp=last,
    )
