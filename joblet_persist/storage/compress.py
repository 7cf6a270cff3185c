"""Raw-deflate compressors for segment members.

Leaf module: pure, blocking functions with no reactor imports.  Compressors are
immutable and thread-safe; the writer's CPU pool threads call them.  Every
backend releases the GIL while it compresses a large buffer, so batches of
different files compress in parallel.

Every compressor produces a complete raw deflate stream (RFC 1951, no zlib or
gzip wrapper); ``joblet_persist.storage.format`` wraps it into a gzip member.
Reading never depends on the producer: any raw deflate stream inflates with
the standard library's ``zlib``.
"""

from __future__ import annotations

import zlib
from typing import Callable

__all__ = ["COMPRESSOR_LEVELS", "ISAL_DEFAULT_LEVEL", "Compressor", "make_compressor"]

#: Accepted levels per compressor name (inclusive ranges).
COMPRESSOR_LEVELS: dict[str, tuple[int, int]] = {
    "zlib": (0, 9),
    "deflate": (0, 12),  # libdeflate: 0 stores, 12 is slowest/smallest
    "isal": (0, 3),  # ISA-L igzip
}

#: The level used for ``isal`` when configuration names none: ISA-L's own default
#: (the service's default level, 5, is outside isal's range).
ISAL_DEFAULT_LEVEL = 2


class Compressor:
    """A named raw-deflate compressor at a fixed level.  Any thread.

    ``compress_raw(data)`` returns a complete raw deflate stream of ``data``;
    ``crc32(data, value=0)`` is the gzip CRC-32 (same result as
    ``zlib.crc32``), from the same library for speed.
    """

    __slots__ = ("name", "level", "_compress", "_crc32")

    def __init__(
        self,
        name: str,
        level: int,
        compress: Callable[[bytes], bytes],
        crc32: Callable[..., int],
    ) -> None:
        self.name = name
        self.level = level
        self._compress = compress
        self._crc32 = crc32

    def compress_raw(self, data) -> bytes:
        """Compress ``data`` (any bytes-like object) into one raw deflate stream."""
        return self._compress(data)

    def crc32(self, data, value: int = 0) -> int:
        """CRC-32 of ``data`` continuing from ``value``."""
        return self._crc32(data, value)

    def __repr__(self) -> str:
        return f"Compressor({self.name!r}, {self.level})"


def _zlib_compressor(level: int) -> Compressor:
    def compress(data) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    return Compressor("zlib", level, compress, zlib.crc32)


def _deflate_compressor(level: int) -> Compressor:
    import deflate

    def compress(data) -> bytes:
        return deflate.deflate_compress(data, level)

    return Compressor("deflate", level, compress, deflate.crc32)


def _isal_compressor(level: int) -> Compressor:
    from isal import isal_zlib

    def compress(data) -> bytes:
        return isal_zlib.compress(data, level, -15)

    return Compressor("isal", level, compress, isal_zlib.crc32)


_FACTORIES = {
    "zlib": _zlib_compressor,
    "deflate": _deflate_compressor,
    "isal": _isal_compressor,
}


def make_compressor(name: str, level: int) -> Compressor:
    """Return the compressor ``name`` ("zlib", "deflate" or "isal") at ``level``.

    Raises ValueError naming the compressor and the level when either is not
    supported (see COMPRESSOR_LEVELS).
    """
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown compressor {name!r}: expected one of {', '.join(sorted(_FACTORIES))}"
        )
    low, high = COMPRESSOR_LEVELS[name]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ValueError(
            f"compressor {name!r} does not support level {level!r}: expected {low}..{high}"
        )
    return _FACTORIES[name](level)
