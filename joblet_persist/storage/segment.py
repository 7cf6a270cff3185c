"""Segment files: naming, scanning (with torn-tail repair) and whole appends.

Leaf module: every ``thd_*`` function is blocking file I/O meant for a pool
thread; nothing here imports the reactor or keeps mutable module state.  The
reactor-side storage decides *what* to do and calls these with plain values.

A segment is a concatenation of gzip members (see format.py and
docs/storage-format.md).  Appends write one or more complete members at a
known offset; a crash can therefore only leave a torn tail, which
``thd_scan_segment`` detects and (with ``repair=True``) cuts off.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from joblet_persist.storage import safefs
from joblet_persist.storage.api import EVENT_OF_KIND, SegmentKind
from joblet_persist.storage.format import (
    KIND_LEGACY,
    CorruptMember,
    MemberInfo,
    UnsupportedMember,
    inflate_member,
    parse_member_header,
    read_member_header,
)
from joblet_persist.storage.legacy import LEGACY_ORDINAL_BASE, legacy_member_summary
from joblet_persist.storage.safefs import DEFAULT_MODES, FileModes, thd_fsync_path

__all__ = [
    "SEGMENT_KINDS",
    "ScanResult",
    "SegmentShorterThanExpected",
    "parse_segment_name",
    "segment_name",
    "thd_append",
    "thd_append_blobs",
    "thd_fsync_path",
    "thd_list_segments",
    "thd_remove_if_empty",
    "thd_scan_segment",
]

#: Segment kinds and their file name suffixes: a file is ``<kind>[_<index>]<suffix>``.
SEGMENT_KINDS = {
    SegmentKind.STDOUT: ".log.gz",
    SegmentKind.STDERR: ".log.gz",
    SegmentKind.METRICS: ".jsonl.gz",
    # Telemetry events: ``events/<job>/exec_events.jsonl.gz`` (events.EventKind.segment_name).
    **{kind: ".jsonl.gz" for kind in EVENT_OF_KIND},
}

_NAME_RE = re.compile(
    "({})(?:_([0-9]{{6,}}))?({})\\Z".format(
        "|".join(re.escape(kind.value) for kind in SEGMENT_KINDS),
        "|".join(re.escape(suffix) for suffix in sorted(set(SEGMENT_KINDS.values()))),
    )
)
_READ_CHUNK = 1 << 18
_GZIP_START = b"\x1f\x8b\x08"


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan found in one segment file; immutable."""

    members: tuple[MemberInfo, ...]
    valid_size: int  # bytes of complete members (the offset appends continue at)
    file_size: int  # size found on disk
    truncated: bool  # whether a torn tail was cut (only when repair=True)
    #: Damaged byte ranges ``(start, end)`` in the middle of the file that the
    #: walk stepped over to reach complete members after them; never cut.
    holes: tuple[tuple[int, int], ...] = ()
    #: ``(offset, reason)`` of a member of a later format (format.UnsupportedMember) where
    #: the walk stopped; None when there is none.  The file is then never cut: ``members``
    #: are those before it, ``valid_size`` its offset, and nothing may be appended to it.
    unsupported: Optional[tuple[int, str]] = None


class SegmentShorterThanExpected(OSError):
    """The segment on disk is shorter than the caller's known valid size.

    Appending would leave a gap, so nothing is written.  Raised by thd_append;
    an OSError with errno EIO so generic I/O error handling applies.
    ``actual_size`` is the size found (0 when the file was missing).
    """

    actual_size = 0


def segment_name(kind: str, index: int) -> str:
    """File name of segment ``index`` of ``kind`` ("stdout", "stderr", "metrics").

    Index 0 is the seed layout's name (``stdout.log.gz``); later ones carry a
    zero-padded index (``stdout_000001.log.gz``) so that a plain sort (``.``
    sorts before ``_``) lists them in time order.
    """
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"unknown segment kind {kind!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"segment index must be a non-negative int, got {index!r}")
    suffix = SEGMENT_KINDS[kind]
    if index == 0:
        return kind + suffix
    return f"{kind}_{index:06d}{suffix}"


def parse_segment_name(name: str) -> Optional[tuple[SegmentKind, int]]:
    """``(kind, index)`` for a name segment_name produces; None for anything else."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    stem, digits, suffix = m.groups()
    kind = SegmentKind(stem)
    index = int(digits) if digits is not None else 0
    if SEGMENT_KINDS[kind] != suffix or (digits is not None and index == 0):
        return None
    if segment_name(kind, index) != name:
        return None  # non-canonical padding
    return kind, index


def segment_index(path: str, default: int) -> int:
    """The index in the segment file name at the end of ``path``; ``default`` when it is
    not a segment's name."""
    parsed = parse_segment_name(os.path.basename(path))
    return parsed[1] if parsed is not None else default


def thd_list_segments(job_dir: str, kind: str, refused: Optional[list] = None) -> list[tuple[int, str]]:
    """Sorted ``(index, path)`` of ``kind``'s segments in ``job_dir``.  Pool thread.

    A missing directory (or a file where it should be) has no segments.
    Foreign files are ignored, and so is anything with a segment's name that
    is not a regular file (a directory, a symlink, dangling or not): it is
    never followed, and must not keep the job's other segments from loading.
    ``(index, path)`` of the symlinks and other non-regular entries with a
    segment's name are appended to ``refused``.  ``job_dir`` itself is opened
    as it is given; callers walk to it safely (see jobindex.thd_scan_job).
    """
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"unknown segment kind {kind!r}")
    try:
        entries = list(os.scandir(job_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return _segments_of(entries, job_dir, kind, refused)


def _segments_of(entries, job_dir: str, kind: str, refused: Optional[list]) -> list:
    found = []
    for entry in entries:
        parsed = parse_segment_name(entry.name)
        if parsed is not None and parsed[0] == kind:
            path = os.path.join(job_dir, entry.name)
            if entry.is_file(follow_symlinks=False):
                found.append((parsed[1], path))
            elif refused is not None and not entry.is_dir(follow_symlinks=False):
                refused.append((parsed[1], path))
    found.sort()
    return found


def thd_list_segments_at(dir_fd: int, job_dir: str, kind: str, refused: Optional[list] = None):
    """thd_list_segments of the directory open at ``dir_fd`` (its path ``job_dir``)."""
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"unknown segment kind {kind!r}")
    with os.scandir(dir_fd) as it:
        return _segments_of(list(it), job_dir, kind, refused)


# -- scanning ----------------------------------------------------------------


def _probe_legacy(f, pos: int, hlen: int, file_size: int, ordinal: int) -> Optional[MemberInfo]:
    """Inflate a plain gzip member to find its end; None if it is not complete and valid."""
    f.seek(pos + hlen)
    d = zlib.decompressobj(-15)
    parts = []
    fed = 0
    try:
        while not d.eof:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                return None
            fed += len(chunk)
            parts.append(d.decompress(chunk))
    except zlib.error:
        return None
    tail = d.unused_data
    end = pos + hlen + fed - len(tail)
    if end + 8 > file_size:
        return None
    if len(tail) < 8:
        f.seek(end)
        tail = f.read(8)
    data = b"".join(parts)
    crc = int.from_bytes(tail[0:4], "little")
    isize = int.from_bytes(tail[4:8], "little")
    if zlib.crc32(data) != crc or len(data) & 0xFFFFFFFF != isize:
        return None
    count, min_ts, max_ts, first_seq, last_seq = legacy_member_summary(data)
    return MemberInfo(
        offset=pos, size=end + 8 - pos, kind=KIND_LEGACY, count=count,
        first_ordinal=ordinal, last_ordinal=ordinal + count - 1,
        min_timestamp=min_ts, max_timestamp=max_ts,
        first_sequence=first_seq, last_sequence=last_seq,
        raw_size=len(data),
    )  # fmt: skip


def _probe(f, pos: int, file_size: int, ordinal: int, legacy_ok: bool) -> Optional[MemberInfo]:
    """The member starting at ``pos`` if its header (and extent) is valid, else None.

    Members we wrote are checked by header only (their checksummed header
    records their size); plain gzip members are inflated to find their end.
    Raises UnsupportedMember (with its offset) for a member of a later format.
    """
    try:
        header = read_member_header(f, pos, file_size)
        info, hlen = parse_member_header(header, pos)
    except UnsupportedMember as e:
        raise UnsupportedMember(e.reason, None, pos) from None
    except ValueError:
        return None
    if info is None:
        if not legacy_ok:
            return None
        return _probe_legacy(f, pos, hlen, file_size, ordinal)
    if pos + info.size > file_size:
        return None
    return info


def _resync(f, start: int, file_size: int, ordinal: int, legacy_ok: bool):
    """Find the next valid member at or after ``start``: ``(info)`` or None."""
    if start >= file_size:
        return None
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = start
        while True:
            q = mm.find(_GZIP_START, pos)
            if q < 0:
                return None
            info = _probe(f, q, file_size, ordinal, legacy_ok)
            if info is not None:
                return info
            pos = q + 1


def _verified(f, member: MemberInfo) -> bool:
    if member.kind == KIND_LEGACY:
        return True  # inflated and CRC-checked while probing
    try:
        inflate_member(f, member)
    except CorruptMember:
        return False
    return True


def thd_scan_segment(path: str, repair: bool, depth: int = 1) -> ScanResult:
    """Walk a segment's member headers and find where its valid data ends.  Pool thread.

    Our members are walked by their recorded sizes without inflating data;
    plain gzip (legacy) members are inflated to find their end and to count
    their records.  The last member is verified fully (inflate, CRC32,
    ISIZE), and the one before it too if it fails, since a crash can only
    tear the tail.  A torn or garbage tail (partial header, short member, bad
    last member, zero fill) ends the valid data; with ``repair=True`` the file
    is truncated to ``valid_size`` and fsync'd, with ``repair=False`` nothing
    is modified.  The file is opened, and cut, only as a regular file reached
    without following a symlink in the last ``depth`` components of ``path``
    (safefs.UnsafeEntry otherwise); a file replaced between the scan and the
    cut is not cut.  A damaged region followed by complete members is stepped
    over and reported in ``holes`` (never cut).  A member of a later format
    (a JP version or flag bits this release does not read) stops the walk:
    it and everything after it are left as they are, whatever ``repair`` says,
    and reported in ``unsupported``.  A missing file gives
    ``ScanResult((), 0, 0, False)``.
    """
    try:
        f = os.fdopen(safefs.open_file(path, depth, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return ScanResult((), 0, 0, False)
    with f:
        scanned = os.fstat(f.fileno())
        file_size = scanned.st_size
        members: list[MemberInfo] = []
        holes: list[tuple[int, int]] = []
        pos = 0
        legacy_seen = 0
        ours_seen = False
        unsupported = None
        while pos < file_size:
            ordinal = LEGACY_ORDINAL_BASE + legacy_seen
            try:
                info = _probe(f, pos, file_size, ordinal, not ours_seen)
                if info is None:
                    info = _resync(f, pos + 1, file_size, ordinal, not ours_seen)
                    if info is None:
                        break
                    holes.append((pos, info.offset))
            except UnsupportedMember as e:
                # Written by a later release: not damage, and not ours to cut or to step
                # over.  The walk ends here; the file stays as it is.
                unsupported = (e.offset, e.reason)
                break
            members.append(info)
            if info.kind == KIND_LEGACY:
                legacy_seen += info.count
            else:
                ours_seen = True
            pos = info.offset + info.size
        valid_size = pos
        while unsupported is None and members and not _verified(f, members[-1]):
            valid_size = members.pop().offset
            while holes and holes[-1][1] >= valid_size:
                valid_size = holes.pop()[0]
    truncated = False
    if repair and valid_size < file_size and unsupported is None:
        fd = safefs.open_file(path, depth, os.O_WRONLY)
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (scanned.st_dev, scanned.st_ino):
                os.ftruncate(fd, valid_size)
                os.fsync(fd)
                truncated = True
        finally:
            os.close(fd)
    return ScanResult(
        tuple(members), valid_size, file_size, truncated, tuple(holes), unsupported
    )


def thd_remove_if_empty(path: str, depth: int = 1) -> bool:
    """Remove segment ``path`` if it is an empty regular file; whether it did.  Pool thread.

    A segment with no complete member is what a crash leaves when it hits the
    first append to a new segment: the file was created and its data never
    (or only partly) written, and the scan's repair cut it to nothing.  An empty
    file is not a gzip file (``gzip -t`` and ``zcat`` reject it), so the loader
    removes it; the next append to that kind creates it again.  The directory is
    walked without following symlinks (``depth`` as for thd_scan_segment) and is
    fsync'd after the removal; anything else at the name is left alone.
    """
    directory, name = os.path.split(path)
    try:
        dfd = safefs.open_dir(directory or ".", depth - 1)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            return False
        os.unlink(name, dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


# -- appending ---------------------------------------------------------------


def _missing_dirs(directory: str) -> list[str]:
    """Directories on the way to ``directory`` that do not exist yet, outermost first."""
    missing = []
    d = os.path.abspath(directory)
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    missing.reverse()
    return missing


def thd_append(
    path: str,
    data: bytes,
    expected_size: int,
    fsync: bool,
    *,
    depth: int = 1,
    modes: FileModes = DEFAULT_MODES,
    created_dirs: Optional[list] = None,
) -> int:
    """Append ``data`` whole at ``expected_size`` and return the new size.  Pool thread.

    Creates missing directories and the file.  The last ``depth`` components
    of ``path`` (the file and ``depth - 1`` directories: 3 for
    ``logs/<job>/stdout.log.gz`` under the data directory) are walked without
    following symlinks (see safefs): a symlink or a non-regular file there
    raises safefs.UnsafeEntry and nothing is written, created or truncated
    through it.  New files and directories get ``modes``; the directories
    this call created are appended to ``created_dirs``.
    When the file is longer than ``expected_size`` (a previous failed partial
    write), it is first cut back.
    On any error (ENOSPC, EIO, ...) the file is truncated back to
    ``expected_size`` (best effort), or removed when this call created it or
    ``expected_size`` is 0 (an empty file is not valid gzip), and the error
    re-raised: nothing partial
    stays.  With ``fsync=True`` the file is fsync'd, and so are the parent
    directories of everything this call created.  Raises
    SegmentShorterThanExpected, writing nothing, when the file is shorter
    than ``expected_size``.
    """
    directory, name = os.path.split(path)
    directory = directory or "."
    root, _parts = safefs.split_under(directory, depth - 1)
    made_dirs = _missing_dirs(root)
    if made_dirs:
        os.makedirs(root, exist_ok=True)
    if fsync and made_dirs:
        # Made above the walk (the root's own parents): their entries are synced here.
        for d in sorted({os.path.dirname(os.path.abspath(d)) for d in made_dirs}):
            thd_fsync_path(d)
    walked: list = []
    dfd = safefs.open_dir(
        directory, depth - 1, create=True, modes=modes, created=walked, fsync_created=fsync
    )
    try:
        if created_dirs is not None:
            created_dirs.extend(made_dirs + walked)
        return _append_in(dfd, name, path, data, expected_size, fsync, modes)
    finally:
        os.close(dfd)


def _append_in(dfd, name, path, data, expected_size, fsync, modes) -> int:
    fd, created = safefs.create_file_at(dfd, name, path, os.O_WRONLY, modes)
    try:
        size = os.fstat(fd).st_size
        if size < expected_size:
            error = SegmentShorterThanExpected(
                errno.EIO,
                f"segment is {size} bytes, shorter than its known valid size {expected_size}",
                path,
            )
            error.actual_size = size
            raise error
        # The parents of the directories the walk created were fsync'd by it; the job
        # directory gains the file's entry.  Two descriptors at most.
        _write_at(fd, path, data, expected_size, size, fsync, dfd if created else None)
    except BaseException:
        if created or expected_size == 0:
            # Nothing of the file was published: it is removed rather than left
            # empty (an empty file is not valid gzip).
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                pass
        raise
    finally:
        os.close(fd)
    return expected_size + len(data)


def _write_at(fd, path, data, expected_size, size, fsync, dfd=None) -> None:
    """Write ``data`` at ``expected_size`` of open file ``fd`` (now ``size`` bytes long,
    cut back first when longer), then with ``fsync`` fsync it and ``dfd``.  On any error
    the file is cut back to ``expected_size`` (best effort) and the error re-raised,
    naming ``path``."""
    try:
        if size > expected_size:
            os.ftruncate(fd, expected_size)
        view = memoryview(data)
        written = 0
        while written < len(view):
            n = os.pwrite(fd, view[written:], expected_size + written)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress", path)
            written += n
        if fsync:
            os.fsync(fd)
            if dfd is not None:
                os.fsync(dfd)
    except BaseException as e:
        try:
            os.ftruncate(fd, expected_size)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e  # name the file
        raise


def _append_at_py(path: str, blobs: Sequence, expected_size: int, fsync: bool) -> Optional[int]:
    """The reference of ``_speedups.append_at``: append ``blobs`` to existing regular file
    ``path`` when it is reached without a symlink (safefs.open_read's check), else None with
    nothing written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            if not safefs.reached_directly(fd, path):
                return None
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < expected_size:
            return None
        data = b"".join(blobs)
        _write_at(fd, path, data, expected_size, st.st_size, fsync)
    finally:
        os.close(fd)
    return expected_size + len(data)


try:
    from joblet_persist._speedups import append_at as _append_at
except ImportError:  # built without the extension
    _append_at = _append_at_py


def thd_append_blobs(path: str, blobs: Sequence, expected_size: int, fsync: bool, **walk) -> int:
    """thd_append of the concatenation of ``blobs``; ``walk``: thd_append's keywords
    (``depth``, ``modes``, ``created_dirs``).  Pool thread.

    An append to a file that exists (``expected_size`` > 0) is first tried in one stretch
    without the GIL (``_speedups.append_at``: open, check, write, fsync, close), which needs
    ``path`` absolute and reached without any symlink; anything else (a new file, a file
    missing, shorter than expected or not regular, a symlink anywhere on the path, a data
    directory reached through a link) takes thd_append's component walk, which decides.
    """
    if expected_size > 0 and os.path.isabs(path):
        new_size = _append_at(path, blobs, expected_size, fsync)
        if new_size is not None:
            return new_size
    return thd_append(path, b"".join(blobs), expected_size, fsync, **walk)
