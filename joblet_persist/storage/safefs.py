"""Opening paths under the data directory without following symlinks.  Any thread.

Leaf module: blocking calls, no reactor, no module-level mutable state.

Everything below the data directory is reached by a walk from a held
directory descriptor, one component at a time, each opened with
``O_NOFOLLOW`` (directories with ``O_DIRECTORY`` too), and files must be
regular files: a symlink, a FIFO or a device planted at ``logs/<job>`` or at
a segment's name is refused with ``UnsafeEntry`` (an OSError, errno ELOOP)
and never written, created, truncated or deleted through.  The data
directory itself is the operator's choice and may be a symlink.

Callers give a path and its ``depth`` below the data directory (``logs/<job>/
stdout.log.gz`` is 3 deep, ``logs/<job>`` 2, ``job_index.json`` 1): the
components above that are the root, opened normally.

New files and directories get the configured ``FileModes`` explicitly
(``fchmod`` after creation, so the umask does not matter) and, when a group is
configured, that group; existing ones are left as they are.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "DEFAULT_MODES",
    "FileModes",
    "UnsafeEntry",
    "create_file_at",
    "open_dir",
    "open_file",
    "open_read",
    "reached_directly",
    "split_under",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC


@dataclass(frozen=True, slots=True)
class FileModes:
    """Permissions of new files and directories under the data directory; immutable.

    ``gid`` None keeps the creating process's group.
    """

    file_mode: int = 0o640
    dir_mode: int = 0o750
    gid: Optional[int] = None


DEFAULT_MODES = FileModes()


class UnsafeEntry(OSError):
    """A symlink or a non-regular file stands where a file or directory of ours should be.

    errno ELOOP; ``filename`` is the refused path.  Nothing was done through it.
    """

    def __init__(self, path: str, what: str = "a symlink") -> None:
        super().__init__(
            errno.ELOOP,
            f"refused: {what} stands where the data directory expects its own entry "
            "(not followed, not written, not removed through)",
            path,
        )
        self.what = what


def split_under(path: str, depth: int) -> tuple[str, list]:
    """``(root, [components])``: the last ``depth`` components of ``path`` and what is above.

    A path with fewer components than ``depth`` has them all walked from "." or "/".
    """
    parts = []
    head = path
    for _ in range(depth):
        rest, tail = os.path.split(head)
        if not tail:
            break  # fewer components than ``depth``: walk the ones there are
        head = rest
        parts.append(tail)
    parts.reverse()
    return head or ".", parts


def _describe(dir_fd: int, name: str) -> Optional[str]:
    """What stands at ``name`` if it is not ours to follow (a symlink, ...), else None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    return None


def _open_dir_at(dir_fd: int, name: str, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            what = _describe(dir_fd, name)
            if what is not None:
                raise UnsafeEntry(path, what) from None
        raise


def _set_owner(fd: int, mode: int, modes: FileModes) -> None:
    os.fchmod(fd, mode)
    if modes.gid is not None:
        os.fchown(fd, -1, modes.gid)


def open_dir(
    path: str,
    depth: int,
    create: bool = False,
    modes: FileModes = DEFAULT_MODES,
    created: Optional[list] = None,
    fsync_created: bool = False,
) -> int:
    """A descriptor of directory ``path``, walked without following symlinks.

    The last ``depth`` components are opened one by one with O_NOFOLLOW from
    the root's descriptor; with ``create``, missing ones are made with
    ``modes.dir_mode`` (and appended to ``created``); with ``fsync_created``
    the directory holding each new one is fsync'd through the descriptor the
    walk holds anyway (at most two are open at any time).  Raises UnsafeEntry for
    a symlink on the way, FileNotFoundError/NotADirectoryError otherwise.
    The caller closes the descriptor.
    """
    root, parts = split_under(path, depth)
    if create and not os.path.isdir(root):
        os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        walked = root
        for name in parts:
            walked = os.path.join(walked, name)
            try:
                nfd = _open_dir_at(fd, name, walked)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, modes.dir_mode, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False
                nfd = _open_dir_at(fd, name, walked)
                if made:
                    try:
                        _set_owner(nfd, modes.dir_mode, modes)
                        if fsync_created:
                            os.fsync(fd)
                    except BaseException:
                        os.close(nfd)
                        raise
                    if created is not None:
                        created.append(walked)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(path, "not a regular file")


def open_file(path: str, depth: int, flags: int = os.O_RDONLY) -> int:
    """Open existing regular file ``path`` (``depth`` below the root) without following links.

    ``flags`` are O_RDONLY, O_WRONLY or O_RDWR (plus others that do not
    create).  Raises UnsafeEntry for a symlink anywhere in the last ``depth``
    components or a file that is not regular (a FIFO is not waited on).
    """
    directory, name = os.path.split(path)
    dfd = open_dir(directory, depth - 1)
    try:
        return _open_in(dfd, name, path, flags)
    finally:
        os.close(dfd)


def _open_in(dfd: int, name: str, path: str, flags: int) -> int:
    try:
        fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeEntry(path) from None
        if e.errno == errno.ENXIO:  # a FIFO or socket without a reader, opened to write
            raise UnsafeEntry(path, "not a regular file") from None
        raise
    try:
        # O_NONBLOCK only kept a FIFO from blocking the open; it has no effect on a
        # regular file, so it is left set (clearing it would cost two more calls).
        _check_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file_at(
    dfd: int, name: str, path: str, flags: int, modes: FileModes = DEFAULT_MODES
) -> tuple[int, bool]:
    """Open ``name`` in directory ``dfd`` for writing, creating it if missing.

    Returns ``(fd, created)``.  A new file gets ``modes.file_mode`` (and group);
    an existing one must be a regular file, not a symlink.
    """
    try:
        fd = os.open(
            name, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, modes.file_mode,
            dir_fd=dfd,
        )  # fmt: skip
    except FileExistsError:
        return _open_in(dfd, name, path, flags), False
    try:
        _set_owner(fd, modes.file_mode, modes)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass
        raise
    return fd, True


_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


def reached_directly(fd: int, path: str) -> bool:
    """Whether open descriptor ``fd`` is the file at absolute ``path`` reached without a
    symlink: the kernel's name for it (/proc/self/fd) is ``path`` itself, which a symlink
    anywhere on the way would have changed.  OSError when /proc cannot tell."""
    return os.readlink(f"/proc/self/fd/{fd}") == path


def open_read(path: str, depth: int = 3):
    """``path`` opened for reading as a binary file object; never through a symlink.

    Queries reopen segments often, so this first tries one open of the whole
    path (O_NOFOLLOW on the last component) and asks the kernel which file it
    reached (/proc/self/fd): when that is ``path`` itself, no component was a
    symlink (a link would resolve elsewhere).  Otherwise (a symlink on the
    way, a data directory reached through a link, no /proc) it falls back to
    the component walk of open_file, which decides.
    """
    if os.path.isabs(path):
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
        else:
            try:
                if reached_directly(fd, path):
                    _check_regular(fd, path)
                    return os.fdopen(fd, "rb")
            except OSError:
                pass  # the walk below decides
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    return os.fdopen(open_file(path, depth, os.O_RDONLY), "rb")


def thd_fsync_path(path: str) -> None:
    """fsync a file or directory by path.  Pool thread.

    Opened read-only and without waiting (O_NONBLOCK: a FIFO does not block);
    fsync changes nothing, so a link is followed here (the data directory may
    be one).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def thd_replace_file(path: str, data: bytes, modes: FileModes = DEFAULT_MODES) -> None:
    """Replace the small state file ``path`` with ``data`` atomically.  Pool thread.

    A temporary file beside it (created exclusively, so never through a
    symlink) gets the data, the file mode and group of ``modes`` and an fsync;
    it is renamed over ``path`` (replacing a symlink at the name, never its
    target) and the directory is fsync'd.  On any error the temporary file is
    removed and the old file stays whole.
    """
    directory, name = os.path.split(path)
    directory = directory or "."
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, modes.file_mode)
            if modes.gid is not None:
                os.fchown(fd, -1, modes.gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    thd_fsync_path(directory)


def thd_read_state_file(path: str) -> Optional[bytes]:
    """The bytes of the state file ``path`` (directly in the data directory; never read
    through a symlink), or None when there is none.  Pool thread."""
    try:
        with open_read(path, 1) as f:
            return f.read()
    except FileNotFoundError:
        return None
