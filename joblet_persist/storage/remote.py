"""Segments that live in a remote object store, read by byte range.  Any thread.

Leaf module: no reactor imports, no network client.  The reader
(storage.reader) reads segments through ``SegmentView.path`` and the files a
query opens (storage.files.OpenFiles).  A segment held only by a remote tier
(an S3 archive) gets a ``RemotePath`` as its view's path: a ``str`` (so
caches, messages and sorting treat it like a local path) that opens, instead
of a file, a ``RangedFile`` whose reads are ranged GETs of the object.  The
reader seeks to the members a query needs and reads only their bytes, so a
query fetches what it reads, not the object.

``fetch(start, end)`` (bytes ``start`` .. ``end - 1`` of the object) is given
by the remote tier; it blocks on the network and raises the seam's errors
(DataVanished when the object is gone, StorageUnavailable when the store
cannot be reached).
"""

from __future__ import annotations

import os
from typing import Callable

#: A small read (a member header is read 12 bytes, then 256 at a time) fetches at least
#: this much, so that one GET holds a member's whole header and often the member itself.
READ_AHEAD = 16 * 1024
#: Fetched spans a RangedFile keeps (least recently fetched dropped first).
CACHED_SPANS = 4


class RemotePath(str):
    """The name of a remote segment (``s3://bucket/key``) that opens a RangedFile.

    ``fetch(start, end) -> bytes`` reads the object's bytes ``[start, end)``;
    ``size`` is the object's length (reads never go past it).
    """

    def __new__(cls, name: str, fetch: Callable[[int, int], bytes], size: int):
        self = super().__new__(cls, name)
        self.fetch = fetch
        self.size = size
        return self

    def open(self) -> RangedFile:
        return RangedFile(str(self), self.fetch, self.size)


class RangedFile:
    """A read-only binary file over an object, read by ranged fetches.  One thread.

    ``seek``/``tell``/``read`` as on a file.  A read that lies in a span
    fetched before is served from it; one that starts in such a span fetches
    only what follows it; otherwise the span from the position, at least
    READ_AHEAD long (never past the object), is fetched.
    ``fetched_bytes`` and ``fetches`` count what this file fetched.
    """

    def __init__(self, name: str, fetch: Callable[[int, int], bytes], size: int):
        self.name = name
        self._fetch = fetch
        self._size = size
        self._pos = 0
        self._spans: list = []  # [(start, bytes)], oldest first
        self.fetched_bytes = 0
        self.fetches = 0
        self.closed = False

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = pos
        elif whence == os.SEEK_CUR:
            self._pos += pos
        elif whence == os.SEEK_END:
            self._pos = self._size + pos
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if self._pos < 0:
            raise ValueError("negative seek position")
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed RangedFile")
        start = self._pos
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        if end <= start:
            return b""
        head = b""
        for i, (span_start, data) in enumerate(self._spans):
            span_end = span_start + len(data)
            if span_start <= start and end <= span_end:
                self._pos = end
                return data[start - span_start : end - span_start]
            if span_start <= start < span_end:
                # The start was fetched (a member's header): fetch only the rest.
                head = data[start - span_start :]
                del self._spans[i]
                break
        begin = start + len(head)
        want = end if head else min(self._size, max(end, begin + READ_AHEAD))
        data = head + self._fetch(begin, want)
        self.fetches += 1
        self.fetched_bytes += len(data) - len(head)
        self._spans.append((start, data))
        if len(self._spans) > CACHED_SPANS:
            del self._spans[0]
        got = data[: end - start]
        self._pos = start + len(got)
        return got

    def close(self) -> None:
        self.closed = True
        self._spans = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
