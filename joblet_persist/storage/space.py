"""Writability and free-space probing of a local directory.  Pool threads (a leaf).

The one home of these probes: LocalStorage offers them through
``storage.api.IFreeSpace``, which health and retention use.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from joblet_persist.storage.api import SpaceProbe

PROBE_NAME = ".health-probe"


def thd_free_bytes(path: str) -> Optional[int]:
    """Free bytes (for unprivileged users) on the filesystem holding ``path``.  Pool thread.

    None when it cannot be told.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def thd_probe_disk(data_dir: str) -> SpaceProbe:
    """Check that ``data_dir`` is writable and how much space is free.  Pool thread.

    Creates the directory if needed, then writes, fsyncs and removes a small
    file; never raises.
    """
    writable, error = False, None
    try:
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, PROBE_NAME)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            # Left by a crash, or planted (a symlink): remove the entry itself, never
            # through a link, and create our own.
            os.unlink(path)
            fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
        writable = True
    except OSError as e:
        error = f"{data_dir}: {os.strerror(e.errno) if e.errno else e}"
        if e.errno == errno.ENOSPC:
            error = f"{data_dir}: no space left on device"
    return SpaceProbe(writable, error, thd_free_bytes(data_dir))
