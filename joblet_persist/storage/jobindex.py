"""The job index (``job_index.json``) and the header scans that rebuild it.

Blocking code for pool threads (``thd_*``): no reactor, no Deferreds, no
module-level mutable state.  ``LocalStorage`` calls these through its injected
thread runner and applies the results on the reactor thread.

The index is a cache of per-job summaries; the segment files are the truth.
It is written atomically (temporary file in the same directory, fsync,
rename, fsync of the directory), so a reader sees either the old or the new
file.  When it is missing or unreadable it is rebuilt from the files by
walking member headers (nothing is inflated except each segment's last member,
which the scan verifies, and legacy members, which carry no header metadata).
Because the index is only written every few seconds, entries of jobs whose
files changed after the index was written are refreshed on start.

File format::

    {"version": 1,
     "jobs": {"<job id>": {"created_at": int, "last_updated": int,
                           "log_count": int, "metric_count": int,
                           "size_bytes": int, "first_timestamp": int,
                           "last_timestamp": int}, ...}}

``created_at``/``last_updated`` are Unix seconds; timestamps are Unix ns.
Entries may also hold ``"log_bytes"`` and ``"metric_bytes"`` (the split of
``size_bytes`` between ``logs/<job>`` and ``metrics/<job>``, used by
retention); an entry without them is refreshed from the files on start.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Mapping, Optional

from joblet_persist.storage import safefs, segment
from joblet_persist.storage.api import (
    COUNT_FIELD_OF_KIND,
    EVENT_COUNT_FIELDS,
    PART_OF_KIND,
    JobInfo,
    Part,
    SegmentKind,
    is_valid_job_id,
)
from joblet_persist.storage.format import KIND_LEGACY

INDEX_FILENAME = "job_index.json"
INDEX_VERSION = 1

#: Top-level directories: a Part's value names its directory (``logs/<job>/``, ...).
LOGS_DIRNAME = Part.LOGS.value
METRICS_DIRNAME = Part.METRICS.value
EVENTS_DIRNAME = Part.EVENTS.value
#: Every top-level directory a job's data may be under.
_TOPS = tuple(part.value for part in Part)
#: The JSON key of each Part's byte count in an entry (``event_bytes`` may be absent:
#: an index written before events were stored).
_PART_KEYS = ("log_bytes", "metric_bytes", "event_bytes")

_INFO_FIELDS = (
    "created_at",
    "last_updated",
    "log_count",
    "metric_count",
    "size_bytes",
    "first_timestamp",
    "last_timestamp",
)

_logger = logging.getLogger("joblet_persist.storage")


class IndexCorrupt(Exception):
    """``job_index.json`` exists but cannot be used; it must be rebuilt."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def index_path(data_dir: str) -> str:
    """Path of the job index under ``data_dir``."""
    return os.path.join(data_dir, INDEX_FILENAME)


def job_dir(data_dir: str, kind: str, job_id: str) -> str:
    """Directory holding segments of ``kind`` for a job whose id was validated."""
    return os.path.join(data_dir, PART_OF_KIND[kind].value, job_id)


# -- reading and writing the file -----------------------------------------


def info_to_json(info: JobInfo) -> dict:
    """The JSON object stored for one job (without its id, which is the key).

    ``event_counts`` (event kind name -> stored events) is present only when
    the job has events.
    """
    obj = {name: getattr(info, name) for name in _INFO_FIELDS}
    counts = info.event_counts
    if counts:
        obj["event_counts"] = counts
    return obj


def info_from_json(job_id: str, obj, path: str = "<index>") -> JobInfo:
    """Build a JobInfo from its stored JSON object; IndexCorrupt when malformed."""
    if not isinstance(obj, dict):
        raise IndexCorrupt(path, f"entry of job {job_id!r} is not an object")
    values = {}
    for name in _INFO_FIELDS:
        value = obj.get(name)
        # bool is an int subclass; it is never a valid count or time here.
        if type(value) is not int or value < 0:
            raise IndexCorrupt(path, f"job {job_id!r}: {name} must be a non-negative integer")
        values[name] = value
    counts = obj.get("event_counts", {})
    if not isinstance(counts, dict):
        raise IndexCorrupt(path, f"job {job_id!r}: event_counts must be an object")
    for name, value in counts.items():
        field_name = EVENT_COUNT_FIELDS.get(name)
        if field_name is None:
            raise IndexCorrupt(path, f"job {job_id!r}: unknown event kind {name[:40]!r}")
        if type(value) is not int or value < 0:
            raise IndexCorrupt(
                path, f"job {job_id!r}: event_counts.{name} must be a non-negative integer"
            )
        values[field_name] = value
    return JobInfo(job_id=job_id, **values)


def _parts_from_json(info: JobInfo, obj: dict) -> Optional[tuple]:
    """The per-Part byte split of an entry, None when absent or inconsistent.

    An entry without ``event_bytes`` (written before events were stored) has none.
    """
    split = tuple(obj.get(key, 0 if key == "event_bytes" else None) for key in _PART_KEYS)
    if any(type(v) is not int or v < 0 for v in split) or sum(split) != info.size_bytes:
        return None
    return split


def thd_load(path: str) -> dict[str, JobInfo]:
    """Read the job index.  Pool thread.

    Returns job id -> JobInfo.  Raises FileNotFoundError when the file does
    not exist, IndexCorrupt when it is not a version-1 index of valid entries
    (bad JSON, wrong shape, invalid job id, negative or non-integer value), and
    other OSErrors as they come.
    """
    return thd_load_parts(path)[0]


def thd_load_parts(path: str) -> tuple[dict[str, JobInfo], dict[str, tuple[int, int]]]:
    """Like thd_load, also returning job id -> (log_bytes, metric_bytes) where recorded."""
    try:
        f = safefs.open_read(path, 1)
    except safefs.UnsafeEntry as e:
        raise IndexCorrupt(path, e.strerror) from None
    with f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise IndexCorrupt(path, f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise IndexCorrupt(path, "top level is not an object")
    if doc.get("version") != INDEX_VERSION:
        raise IndexCorrupt(path, f"unsupported version {doc.get('version')!r}")
    entries = doc.get("jobs")
    if not isinstance(entries, dict):
        raise IndexCorrupt(path, '"jobs" is not an object')
    jobs = {}
    parts = {}
    for job_id, obj in entries.items():
        if not is_valid_job_id(job_id):
            raise IndexCorrupt(path, f"invalid job id {job_id[:160]!r}")
        info = jobs[job_id] = info_from_json(job_id, obj, path)
        split = _parts_from_json(info, obj)
        if split is not None:
            parts[job_id] = split
    return jobs, parts


def thd_write(
    path: str,
    jobs: Mapping[str, JobInfo],
    parts: Optional[Mapping[str, tuple[int, int]]] = None,
    modes: safefs.FileModes = safefs.DEFAULT_MODES,
) -> None:
    """Atomically replace the job index with ``jobs``.  Pool thread.

    ``parts`` optionally gives job id -> (log_bytes, metric_bytes).  Writes a
    temporary file in the same directory (created exclusively, so never
    through a symlink, with ``modes``), fsyncs it, renames it over ``path``
    (which replaces a symlink there, never its target) and fsyncs the directory.  On error the temporary file is removed and the
    previous index stays in place.
    """
    parts = parts or {}
    entries = {}
    for job_id in sorted(jobs):
        entry = entries[job_id] = info_to_json(jobs[job_id])
        split = parts.get(job_id)
        if split is not None:
            # A split without events (callers predating them) has two values.
            for key, value in zip(_PART_KEYS, split, strict=False):
                if value or key != "event_bytes":
                    entry[key] = value
    doc = {"version": INDEX_VERSION, "jobs": entries}
    # Compact JSON, one job per line: json's C encoder does it about 3x faster than with
    # ``indent`` (which falls back to pure Python: 133 ms against 39 ms for 16,000 jobs,
    # holding the GIL), and the file stays readable line by line.  Inside a JSON string a
    # '"' is always escaped, so '},"' occurs only between entries, never in a value.
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    data = text.replace('},"', '},\n"').replace('"jobs":{"', '"jobs":{\n"', 1).encode() + b"\n"
    safefs.thd_replace_file(path, data, modes)


def _disk_part_sizes(data_dir: str, job_id: str) -> Optional[tuple[int, int]]:
    """(bytes of logs/<job> segments, bytes of metrics/<job> segments) by lstat, or None.

    None when the job has neither directory.  Only regular files with a
    segment's name count, as in a scan; nothing is followed through a symlink.
    """
    sizes = [0] * len(_TOPS)
    found = False
    for slot, top in enumerate(_TOPS):
        try:
            dfd = safefs.open_dir(os.path.join(data_dir, top, job_id), 2)
        except (FileNotFoundError, NotADirectoryError, safefs.UnsafeEntry):
            continue
        found = True
        try:
            with os.scandir(dfd) as it:
                for entry in it:
                    if segment.parse_segment_name(entry.name) is None:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        sizes[slot] += st.st_size
        finally:
            os.close(dfd)
    return tuple(sizes) if found else None


def thd_reconcile(
    data_dir: str, jobs: dict[str, JobInfo], parts: dict[str, tuple[int, int]]
) -> list[str]:
    """Bring entries whose files changed underneath back in line with the files.  Pool thread.

    Mutates ``jobs`` and ``parts`` (private copies) and returns the ids it
    changed.  Each job's segment sizes are compared with its recorded split
    by lstat (no file is opened); a job whose directories are gone is
    dropped, one whose sizes differ (a segment cut, removed or added outside
    the service) is rescanned from its headers, nothing repaired.  The
    service writes the index with this at stop, so that the index it leaves
    agrees with the files even after outside damage.
    """
    changed = []
    for job_id in sorted(jobs):
        on_disk = _disk_part_sizes(data_dir, job_id)
        if on_disk is not None and parts.get(job_id) == on_disk:
            continue
        scan = _scan_or_skip(data_dir, job_id) if on_disk is not None else None
        if scan is None:
            del jobs[job_id]
            parts.pop(job_id, None)
        else:
            jobs[job_id] = scan.summary(jobs[job_id])
            parts[job_id] = scan.part_sizes()
        changed.append(job_id)
    return changed


def thd_write_reconciled(
    path: str,
    data_dir: str,
    jobs: dict[str, JobInfo],
    parts: dict[str, tuple[int, int]],
    modes: safefs.FileModes = safefs.DEFAULT_MODES,
) -> list[str]:
    """thd_reconcile, then thd_write; returns the ids reconciled.  Pool thread."""
    changed = thd_reconcile(data_dir, jobs, parts)
    thd_write(path, jobs, parts, modes)
    return changed


# -- scanning the files ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """One segment file as found by a scan."""

    kind: SegmentKind
    index: int
    path: str
    result: segment.ScanResult

    @property
    def size(self) -> int:
        """Bytes this segment occupies after the scan (valid size once repaired)."""
        r = self.result
        return r.valid_size if r.truncated else r.file_size


def tally_members(segments) -> tuple[dict, int, int, int]:
    """Counts per JobInfo count field, bytes, first and last timestamp.  Any thread.

    ``segments`` yields ``(kind, size_bytes, members)``; members with no
    messages count only their bytes.  The one place a job's summary is summed
    from its members (a scan of the files, or a recount after dropping a segment).
    """
    counts = dict.fromkeys(COUNT_FIELD_OF_KIND.values(), 0)
    size = 0
    first = last = 0
    for kind, seg_size, members in segments:
        field = COUNT_FIELD_OF_KIND[kind]
        size += seg_size
        for m in members:
            if not m.count:
                continue
            counts[field] += m.count
            if m.min_timestamp > 0 and (first == 0 or m.min_timestamp < first):
                first = m.min_timestamp
            if m.max_timestamp > last:
                last = m.max_timestamp
    return counts, size, first, last


@dataclass(frozen=True, slots=True)
class JobScan:
    """Everything a header scan found about one job's files."""

    job_id: str
    segments: dict = field(default_factory=dict)  # kind -> tuple[SegmentScan, ...]
    min_mtime: float = 0.0  # seconds; 0 when the job has no segment file
    max_mtime: float = 0.0
    truncated: tuple = ()  # paths whose torn tail was cut
    #: Paths with a segment's name that are symlinks or not regular files: not read.
    refused: tuple = ()
    #: Segment files removed because they held no complete member (repair only).
    removed: tuple = ()

    def kind_segments(self, kind: str) -> tuple:
        return self.segments.get(kind, ())

    def part_sizes(self) -> tuple:
        """Bytes under each Part's directory (logs/<job>, metrics/<job>, events/<job>)."""
        sizes = dict.fromkeys(Part, 0)
        for kind, segs in self.segments.items():
            sizes[PART_OF_KIND[kind]] += sum(seg.size for seg in segs)
        return tuple(sizes[part] for part in Part)

    def ordinal_base(self) -> int:
        """Max stored persistent ordinal + 1 across the job's files (0 if none).

        Legacy members carry negative ordinals and never raise the base.
        """
        top = -1
        for segs in self.segments.values():
            for seg in segs:
                for m in seg.result.members:
                    if m.count and m.kind != KIND_LEGACY and m.last_ordinal > top:
                        top = m.last_ordinal
        return top + 1

    def summary(self, previous: Optional[JobInfo] = None) -> JobInfo:
        """The job's JobInfo as the files show it.

        Counts, sizes and timestamps come from the scan.  With ``previous``
        (the index entry) created_at is kept, and so is last_updated unless the
        counts or size differ (then the latest file mtime, if later).  Without
        it, created_at is the earlier of the first message timestamp and the
        earliest file mtime, last_updated the latest mtime.
        """
        counts, size, first, last = tally_members(
            (kind, seg.size, seg.result.members)
            for kind, segs in self.segments.items()
            for seg in segs
        )
        log_count, metric_count = counts["log_count"], counts["metric_count"]
        if previous is not None:
            created = previous.created_at
            same = (
                previous.log_count == log_count
                and previous.metric_count == metric_count
                and previous.size_bytes == size
                and all(getattr(previous, f) == counts[f] for f in EVENT_COUNT_FIELDS.values())
            )
            # Unchanged data keeps its recorded time; changed data was written
            # after the entry, when the files were last modified.
            updated = previous.last_updated
            if not same:
                updated = max(updated, int(self.max_mtime))
        else:
            candidates = [int(self.min_mtime)] if self.min_mtime > 0 else []
            if first // 1_000_000_000 > 0:
                candidates.append(first // 1_000_000_000)
            created = min(candidates) if candidates else 0
            updated = max(int(self.max_mtime), created)
        return JobInfo(
            job_id=self.job_id,
            created_at=created,
            last_updated=updated,
            log_count=log_count,
            metric_count=metric_count,
            size_bytes=size,
            first_timestamp=first,
            last_timestamp=last,
            **{f: counts[f] for f in EVENT_COUNT_FIELDS.values()},
        )


def thd_scan_job(data_dir: str, job_id: str, repair: bool) -> Optional[JobScan]:
    """Scan the headers of every segment of a job.  Pool thread.

    ``job_id`` must already be validated.  With ``repair`` a torn tail of a
    segment is cut (see segment.thd_scan_segment), and a segment left with no
    complete member (empty: a crash hit its first append) is removed and
    listed in ``JobScan.removed``.  Returns None when the job has neither a
    logs nor a metrics directory.  Nothing is followed through
    a symlink: a symlink at ``logs``, ``metrics`` or ``<top>/<job>`` raises
    safefs.UnsafeEntry; one with a segment's name is left out of the scan
    and listed in ``JobScan.refused``.
    """
    found_dir = False
    segments = {}
    mtimes = []
    truncated = []
    removed: list = []
    refused: list = []
    for kind in SegmentKind:
        directory = job_dir(data_dir, kind, job_id)
        try:
            dfd = safefs.open_dir(directory, 2)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            found_dir = True
            listed = segment.thd_list_segments_at(dfd, directory, kind, refused)
        finally:
            # Not held while the segments are scanned: at most two descriptors per pool
            # thread (each segment is reopened by its own walk).
            os.close(dfd)
        scans = []
        for index, path in listed:
            result = segment.thd_scan_segment(path, repair, depth=3)
            if repair and not result.members and segment.thd_remove_if_empty(path, depth=3):
                # No complete member (a crash during its first append): an empty
                # file is not gzip, so it goes; the next append creates it again.
                removed.append(path)
                continue
            if result.truncated:
                truncated.append(path)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            mtimes.append(st.st_mtime)
            scans.append(SegmentScan(kind, index, path, result))
        if scans:
            segments[kind] = tuple(scans)
    if not found_dir:
        return None
    return JobScan(
        job_id=job_id,
        segments=segments,
        min_mtime=min(mtimes) if mtimes else 0.0,
        max_mtime=max(mtimes) if mtimes else 0.0,
        truncated=tuple(truncated),
        refused=tuple(p for _i, p in refused),
        removed=tuple(removed),
    )


def thd_list_job_ids(data_dir: str) -> set[str]:
    """Ids of the jobs that have a logs or metrics directory.  Pool thread.

    Entries that are not valid job ids (foreign files, temporary names) or
    not directories are ignored, and so is a ``logs``/``metrics`` that is not
    a directory.
    """
    ids = set()
    for top in _TOPS:
        try:
            fd = safefs.open_dir(os.path.join(data_dir, top), 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except safefs.UnsafeEntry as e:
            _logger.error("%s: %s; no job under it is listed", e.filename, e.strerror)
            continue
        try:
            with os.scandir(fd) as it:
                entries = list(it)
        finally:
            os.close(fd)
        for entry in entries:
            if is_valid_job_id(entry.name) and entry.is_dir(follow_symlinks=False):
                ids.add(entry.name)
    return ids


def thd_rebuild(data_dir: str) -> dict[str, JobInfo]:
    """Rebuild the index from the files (headers only, nothing repaired).  Pool thread."""
    return _rebuild(data_dir)[0]


def _scan_or_skip(data_dir: str, job_id: str) -> Optional[JobScan]:
    """thd_scan_job without repair; a job whose files cannot be read is logged and skipped.

    One unreadable job directory (permissions, I/O error) must not keep the
    index, and so the service, from loading; the job stays out of the index
    until it can be read (loading it later fails with the same error).
    """
    try:
        return thd_scan_job(data_dir, job_id, repair=False)
    except safefs.UnsafeEntry as e:
        _logger.error("job %s: %s: %s; left out of the job index", job_id, e.filename, e.strerror)
        return None
    except OSError as e:
        _logger.warning("job %s: cannot read its files (%s); left out of the job index", job_id, e)
        return None


def _rebuild(data_dir: str) -> tuple[dict, dict]:
    jobs = {}
    parts = {}
    for job_id in sorted(thd_list_job_ids(data_dir)):
        scan = _scan_or_skip(data_dir, job_id)
        if scan is not None:
            jobs[job_id] = scan.summary()
            parts[job_id] = scan.part_sizes()
    return jobs, parts


def _newest_mtime_ns(data_dir: str, job_id: str) -> int:
    """Latest mtime of a job's directories and the files in them (0 if none)."""
    newest = 0
    for top in _TOPS:
        directory = os.path.join(data_dir, top, job_id)
        try:
            st = os.lstat(directory)
            newest = max(newest, st.st_mtime_ns)
            if not stat.S_ISDIR(st.st_mode):
                continue  # a symlink is not followed
            entries = list(os.scandir(directory))
        except OSError:
            # Missing, not a directory, or unreadable: its own mtime is all there is.
            continue
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
            except FileNotFoundError:
                continue
    return newest


def thd_refresh(
    data_dir: str,
    jobs: dict[str, JobInfo],
    index_mtime_ns: int,
    parts: Optional[dict[str, tuple[int, int]]] = None,
) -> list[str]:
    """Bring a loaded index up to date with the files.  Pool thread.

    Mutates ``jobs`` and ``parts`` (dicts private to the calling pool thread)
    and returns the ids whose entries changed: jobs found on disk but missing
    from the index, jobs whose directories or files were modified at or after
    the index (the index is written every few seconds, so a crash leaves it
    behind the files), and index entries whose directories are gone (dropped).
    When ``parts`` is given, entries without a recorded split are rescanned.
    """
    changed = []
    on_disk = thd_list_job_ids(data_dir)
    for job_id in sorted(set(jobs) - on_disk):
        del jobs[job_id]
        if parts is not None:
            parts.pop(job_id, None)
        changed.append(job_id)
    for job_id in sorted(on_disk):
        previous = jobs.get(job_id)
        if (
            previous is not None
            and (parts is None or job_id in parts)
            and _newest_mtime_ns(data_dir, job_id) < index_mtime_ns
        ):
            continue
        scan = _scan_or_skip(data_dir, job_id)
        if scan is None:
            if previous is not None:
                # Unreadable now: drop the entry rather than keep counts nobody can verify.
                del jobs[job_id]
                if parts is not None:
                    parts.pop(job_id, None)
                changed.append(job_id)
            continue
        info = scan.summary(previous)
        split = scan.part_sizes()
        if info != previous or (parts is not None and parts.get(job_id) != split):
            jobs[job_id] = info
            if parts is not None:
                parts[job_id] = split
            changed.append(job_id)
    return changed


@dataclass(frozen=True, slots=True)
class IndexLoad:
    """Result of thd_open_index."""

    jobs: dict  # job id -> JobInfo; handed over to the reactor thread
    rebuilt: bool  # the index was missing or corrupt and was rebuilt from the files
    changed: tuple  # ids refreshed from the files (all of them when rebuilt)
    reason: str  # why it was rebuilt ("" when loaded)
    parts: dict  # job id -> (log_bytes, metric_bytes) for every job in ``jobs``

    @property
    def needs_write(self) -> bool:
        return self.rebuilt or bool(self.changed)


#: The state files replaced atomically in the data directory (safefs.thd_replace_file:
#: a temporary ``.<name>.<random>.tmp`` beside it, then a rename): this index, the S3
#: archive's manifest (archive/layout.py), the tier's floors (archive/tier.py) and the
#: CloudWatch cursor (archive/cloudwatch.py).  A crash during a write leaves the
#: temporary behind; the old file stays whole.
STATE_FILENAMES = (
    INDEX_FILENAME, "archive_s3.json", "archive_tier.json", "archive_cloudwatch.json",
)


def _remove_stale_temporaries(data_dir: str) -> None:
    """Remove the temporary files of state-file writes (STATE_FILENAMES) a crash
    interrupted.  Runs when storage starts, before anything writes those files."""
    prefixes = tuple("." + name + "." for name in STATE_FILENAMES)
    for name in os.listdir(data_dir):
        if name.startswith(prefixes) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(data_dir, name))
            except FileNotFoundError:
                pass


def thd_make_data_dir(data_dir: str, modes: safefs.FileModes = safefs.DEFAULT_MODES) -> None:
    """Create ``data_dir`` (and missing parents) with ``modes.dir_mode``.  Pool thread.

    An existing directory is left as it is; only one this call creates gets
    the mode and group.
    """
    if os.path.isdir(data_dir):
        return
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(data_dir, modes.dir_mode)
    except FileExistsError:
        return
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, modes.dir_mode)
        if modes.gid is not None:
            os.fchown(fd, -1, modes.gid)
    finally:
        os.close(fd)


def thd_open_index(data_dir: str, modes: safefs.FileModes = safefs.DEFAULT_MODES) -> IndexLoad:
    """Load the job index, rebuilding or refreshing it from the files.  Pool thread.

    Creates ``data_dir`` if needed and removes temporary files of interrupted
    state-file writes (the index, the archive manifest, floors and cursor).  A
    missing or corrupt index is rebuilt from the files; a valid one gets stale
    entries refreshed (thd_refresh).
    Does not write anything besides creating the directory: the caller writes
    the result when ``needs_write``.
    """
    thd_make_data_dir(data_dir, modes)
    path = index_path(data_dir)
    _remove_stale_temporaries(data_dir)
    try:
        mtime_ns = os.stat(path).st_mtime_ns
        jobs, parts = thd_load_parts(path)
    except FileNotFoundError:
        reason = "missing"
    except IndexCorrupt as e:
        reason = f"corrupt ({e.reason})"
        _logger.warning("job index %s is corrupt (%s); rebuilding from the files", path, e.reason)
    else:
        changed = thd_refresh(data_dir, jobs, mtime_ns, parts)
        return IndexLoad(jobs, False, tuple(changed), "", parts)
    jobs, parts = _rebuild(data_dir)
    return IndexLoad(jobs, True, tuple(sorted(jobs)), reason, parts)
