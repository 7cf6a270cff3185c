"""LocalStorage's blocking work: appends, removals and fsyncs of segment files.

Pool threads only: every function here is a ``thd_*`` function (or a helper of
one) that takes its inputs as arguments and returns a result; LocalStorage
runs them with its injected thread runner and applies the results on the
reactor thread.  Leaf module: no reactor imports, no Deferreds.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from dataclasses import dataclass
from typing import Sequence

from joblet_persist import events
from joblet_persist.storage import format as fmt
from joblet_persist.storage import safefs, segment
from joblet_persist.storage.api import Part
from joblet_persist.storage.files import SEGMENT_DEPTH


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What a pool-thread append hands back to the reactor."""

    new_size: int  # size of the segment file after the append
    members: tuple  # MemberInfo of the appended members, offsets = file positions
    written: int  # bytes appended
    skipped: int  # undecodable metric payloads left out of the batch
    dirty_dirs: tuple  # directories whose entries changed and were not fsync'd


def _thd_write_pieces(
    path, directory, expected_size, fsync, pieces, skipped, modes=safefs.DEFAULT_MODES
) -> AppendResult:
    blobs = [blob for blob, _ in pieces]
    created: list = []
    # logs/<job>/<segment>: three components walked without following symlinks.
    new_size = segment.thd_append_blobs(
        path, blobs, expected_size, fsync, depth=SEGMENT_DEPTH, modes=modes, created_dirs=created
    )
    members = []
    position = expected_size
    for blob, info in pieces:
        members.append(dataclasses.replace(info, offset=position))
        position += len(blob)
    if position != new_size:
        raise OSError(
            f"{path}: appended {position - expected_size} bytes at {expected_size}"
            f" but size is {new_size}"
        )
    dirty = []
    if not fsync:
        # The parents of created directories have new entries, and so may the job
        # directory when the segment file was just created.
        dirty = [os.path.dirname(d) for d in created]
        if expected_size == 0:
            dirty.append(directory)
    return AppendResult(new_size, tuple(members), new_size - expected_size, skipped, tuple(dirty))


def thd_append_logs(
    path: str,
    directory: str,
    expected_size: int,
    fsync: bool,
    compressor,
    base: int,
    timestamps: Sequence[int],
    sequences: Sequence[int],
    arrivals: Sequence[int],
    contents: Sequence[bytes],
    modes: safefs.FileModes = safefs.DEFAULT_MODES,
    line_tables: bool = True,
) -> AppendResult:
    """Encode a log batch as gzip members and append it at ``expected_size``.  Pool thread.

    Ordinals are ``base + arrival``.  On error nothing partial stays in the
    file (segment.thd_append truncates back) and the error propagates.
    ``line_tables`` (False: storage.lineTables off) is format.encode_log_members'
    ``lines``, here and in the other appends.
    """
    pieces = fmt.encode_log_members(
        timestamps, sequences, arrivals, contents, compressor, lines=line_tables,
        ordinal_base=base,
    )
    return _thd_write_pieces(path, directory, expected_size, fsync, pieces, 0, modes)


def _decoded(lines: list, timestamps, sequences, arrivals) -> tuple:
    """The columns of a batch's decodable messages (``lines[i]`` None: left out), and how
    many were left out."""
    if not events.has_none(lines):
        # The batch's own columns (nothing downstream changes them), as thd_append_logs.
        return timestamps, sequences, arrivals, lines, 0
    keep = [i for i, line in enumerate(lines) if line is not None]
    return (
        [timestamps[i] for i in keep],
        [sequences[i] for i in keep],
        [arrivals[i] for i in keep],
        [lines[i] for i in keep],
        len(lines) - len(keep),
    )


def thd_append_metrics(
    path: str,
    directory: str,
    expected_size: int,
    fsync: bool,
    compressor,
    base: int,
    job_id: str,
    timestamps: Sequence[int],
    sequences: Sequence[int],
    arrivals: Sequence[int],
    payloads: Sequence[bytes],
    modes: safefs.FileModes = safefs.DEFAULT_MODES,
    line_tables: bool = True,
) -> AppendResult:
    """Convert metric payloads to JSON lines, encode and append them.  Pool thread.

    An undecodable payload is left out and counted in ``skipped``; it never
    fails the batch.  A batch with nothing decodable appends nothing.
    """
    ts, seqs, ords, lines, skipped = _decoded(
        fmt.metric_json_lines(job_id, payloads), timestamps, sequences, arrivals
    )
    if not lines:
        return AppendResult(expected_size, (), 0, skipped, ())
    pieces = fmt.encode_metric_members(
        ts, seqs, ords, lines, compressor, lines=line_tables, ordinal_base=base
    )
    return _thd_write_pieces(path, directory, expected_size, fsync, pieces, skipped, modes)


def thd_append_events(
    path: str,
    directory: str,
    expected_size: int,
    fsync: bool,
    compressor,
    base: int,
    job_id: str,
    kind,
    timestamps: Sequence[int],
    sequences: Sequence[int],
    arrivals: Sequence[int],
    payloads: Sequence[bytes],
    modes: safefs.FileModes = safefs.DEFAULT_MODES,
    line_tables: bool = True,
) -> AppendResult:
    """Build the JSON lines of event payloads (``kind`` an events.EventKind), encode and
    append them.  Pool thread.

    Like thd_append_metrics: a payload that does not decode as ``kind`` is left
    out and counted in ``skipped``; it never fails the batch.
    """
    ts, seqs, ords, lines, skipped = _decoded(
        events.payload_json_lines(kind, payloads, job_id, timestamps, sequences),
        timestamps, sequences, arrivals,
    )
    if not lines:
        return AppendResult(expected_size, (), 0, skipped, ())
    pieces = fmt.encode_event_members(
        kind.msg_type, ts, seqs, ords, lines, compressor, events.MEMBER_RAW, lines=line_tables,
        ordinal_base=base,
    )
    return _thd_write_pieces(path, directory, expected_size, fsync, pieces, skipped, modes)


def thd_then_dispose(thd, columns: tuple, *args, **kwargs):
    """``thd(*args, **kwargs)``, then, once it has returned, empty the list columns among
    ``columns`` (a ``disposable`` batch's): their messages are freed here, on the pool
    thread that has just read them, where they are still in this core's cache, instead of
    on the thread that drops the batch.  When ``thd`` raises they are left whole for the
    retry.  Other sequences are left alone."""
    result = thd(*args, **kwargs)
    for column in columns:
        if type(column) is list:
            column.clear()
    return result


#: The top-level directories of each Part (its value), and of a whole job.
PART_TOPS = {part: (part.value,) for part in Part}
ALL_TOPS = tuple(part.value for part in Part)


def thd_remove_job(data_dir: str, job_id: str, tops: Sequence[str] = ALL_TOPS) -> int:
    """Remove a job's directories (logs, metrics and events by default); return the bytes freed.

    Pool thread.  Whatever else stands where a job directory should be (a
    file, a symlink) is removed too (the link, not its target), so that
    deleting a damaged job always clears its place.  Nothing is followed
    through a symlink: the walk and the removal go from held directory
    descriptors (shutil.rmtree with ``dir_fd``), and a symlink at ``logs`` or
    ``metrics`` itself raises safefs.UnsafeEntry.
    """
    freed = 0
    for top in tops:
        try:
            tfd = safefs.open_dir(os.path.join(data_dir, top), 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            freed += _remove_entry(tfd, job_id)
        finally:
            os.close(tfd)
    return freed


def _remove_entry(tfd: int, name: str) -> int:
    """Remove ``name`` (a job directory, or whatever stands there) in directory ``tfd``."""
    try:
        st = os.stat(name, dir_fd=tfd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=tfd)
        except FileNotFoundError:
            return 0
        return st.st_size
    freed = 0
    for _root, _dirs, files, rootfd in os.fwalk(name, dir_fd=tfd, follow_symlinks=False):
        for f in files:
            try:
                freed += os.stat(f, dir_fd=rootfd, follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    shutil.rmtree(name, dir_fd=tfd)
    return freed


def thd_remove_file(path: str, depth: int = SEGMENT_DEPTH) -> int:
    """Remove one file and return its size (0 if it was already gone).  Pool thread.

    ``path`` is ``depth`` components below the data directory; its directories
    are walked without following symlinks, and a symlink at ``path`` itself
    is removed, not its target.
    """
    directory, name = os.path.split(path)
    try:
        dfd = safefs.open_dir(directory, depth - 1)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        try:
            size = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return 0
    finally:
        os.close(dfd)
    return size


def thd_fsync_paths(paths: Sequence[str]) -> None:
    """fsync each file or directory; ones removed meanwhile are skipped.  Pool thread."""
    for path in paths:
        try:
            segment.thd_fsync_path(path)
        except FileNotFoundError:
            pass
