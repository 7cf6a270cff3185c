"""Tests for joblet_persist.storage.segment: names, scanning, torn tails, appends."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage import segment
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.segment import (
    ScanResult,
    SegmentShorterThanExpected,
    parse_segment_name,
    segment_name,
    thd_append,
    thd_list_segments,
    thd_scan_segment,
)

COMP = make_compressor("zlib", 6)


def batch(first_ord, n, tag=b"m"):
    """Encoded members of n messages starting at ordinal first_ord."""
    contents = [tag + b"%d\n" % (first_ord + i) for i in range(n)]
    ts = [1_000 + first_ord + i for i in range(n)]
    ords = list(range(first_ord, first_ord + n))
    return fmt.encode_log_members(ts, ords, ords, contents, COMP), b"".join(contents)


def write_members(testcase, nbatches=4, per_batch=20):
    """A segment file of nbatches appended batches; returns (path, infos, contents)."""
    path = os.path.join(testcase.mktemp(), "stdout.log.gz")
    size = 0
    infos = []
    contents = b""
    for b in range(nbatches):
        pieces, text = batch(b * per_batch, per_batch)
        off = size
        for blob, info in pieces:
            infos.append(dataclasses.replace(info, offset=off))
            off += len(blob)
        size = thd_append(path, b"".join(p for p, _ in pieces), size, False)
        contents += text
    return path, infos, contents


def read(path):
    with open(path, "rb") as f:
        return f.read()


class NameTests(SynchronousTestCase):
    """segment_name / parse_segment_name / thd_list_segments."""

    def test_names(self):
        """Index 0 keeps the seed name; later indexes are zero-padded to six digits."""
        self.assertEqual(segment_name("stdout", 0), "stdout.log.gz")
        self.assertEqual(segment_name("stderr", 0), "stderr.log.gz")
        self.assertEqual(segment_name("metrics", 0), "metrics.jsonl.gz")
        self.assertEqual(segment_name("stdout", 1), "stdout_000001.log.gz")
        self.assertEqual(segment_name("metrics", 12), "metrics_000012.jsonl.gz")
        self.assertEqual(segment_name("stderr", 1234567), "stderr_1234567.log.gz")
        self.assertRaises(ValueError, segment_name, "events", 0)
        self.assertRaises(ValueError, segment_name, "stdout", -1)

    def test_parse_is_the_inverse(self):
        """parse_segment_name inverts segment_name and rejects foreign names."""
        for kind in ("stdout", "stderr", "metrics", "exec_events", "socket_data_events"):
            for index in (0, 1, 9, 10, 999999, 1000000):
                self.assertEqual(parse_segment_name(segment_name(kind, index)), (kind, index))
        for foreign in (
            "stdout.log", "stdout.jsonl.gz", "metrics.log.gz", "stdout_1.log.gz",
            "stdout_000000.log.gz", "stdout_0000001.log.gz", "exec_events.log.gz",
            "exec.jsonl.gz", "events.jsonl.gz",
            "stdout.log.gz.tmp", "xstdout.log.gz", "job_index.json",
        ):  # fmt: skip
            self.assertIsNone(parse_segment_name(foreign), foreign)

    def test_names_sort_in_time_order(self):
        """A byte-wise sort of the names (what ls and globs do) is index order."""
        names = [segment_name("stdout", i) for i in range(0, 1500, 7)]
        self.assertEqual(sorted(names), names)

    def test_list_segments(self):
        """thd_list_segments returns one kind's segments sorted by index, ignoring others."""
        d = self.mktemp()
        os.makedirs(d)
        for name in ("stdout_000002.log.gz", "stdout.log.gz", "stderr.log.gz",
                     "stdout_000010.log.gz", "notes.txt", "stdout_000001.log.gz"):  # fmt: skip
            open(os.path.join(d, name), "wb").close()
        self.assertEqual(
            thd_list_segments(d, "stdout"),
            [(i, os.path.join(d, segment_name("stdout", i))) for i in (0, 1, 2, 10)],
        )
        self.assertEqual(thd_list_segments(d, "metrics"), [])
        self.assertEqual(thd_list_segments(os.path.join(d, "missing"), "stdout"), [])


class AppendTests(SynchronousTestCase):
    """thd_append writes whole or not at all."""

    def test_creates_directories_and_appends(self):
        """The first append creates missing directories; later ones append at the size."""
        path = os.path.join(self.mktemp(), "a", "b", "stdout.log.gz")
        self.assertEqual(thd_append(path, b"hello", 0, True), 5)
        self.assertEqual(thd_append(path, b" world", 5, True), 11)
        self.assertEqual(read(path), b"hello world")

    def test_longer_file_is_cut_back_first(self):
        """Bytes past expected_size (an earlier partial write) are replaced."""
        path = os.path.join(self.mktemp(), "f")
        thd_append(path, b"good-partial", 0, False)
        self.assertEqual(thd_append(path, b"NEW", 4, False), 7)
        self.assertEqual(read(path), b"goodNEW")

    def test_shorter_file_is_an_error(self):
        """A file shorter than expected_size raises and is not written."""
        path = os.path.join(self.mktemp(), "f")
        thd_append(path, b"abc", 0, False)
        e = self.assertRaises(SegmentShorterThanExpected, thd_append, path, b"x", 10, False)
        self.assertIsInstance(e, OSError)
        self.assertEqual(e.errno, errno.EIO)
        self.assertEqual(read(path), b"abc")

    def test_failed_write_is_truncated_back(self):
        """An OSError after a partial write leaves the file at expected_size and re-raises."""
        path = os.path.join(self.mktemp(), "f")
        thd_append(path, b"kept", 0, False)
        real_pwrite = os.pwrite
        calls = []

        def failing_pwrite(fd, data, offset):
            calls.append(offset)
            if len(calls) == 1:
                return real_pwrite(fd, bytes(data[:3]), offset)  # short write
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(segment.os, "pwrite", failing_pwrite)
        e = self.assertRaises(OSError, thd_append, path, b"0123456789", 4, False)
        self.assertEqual(e.errno, errno.ENOSPC)
        self.assertEqual(calls, [4, 7])
        self.assertEqual(read(path), b"kept")

    def test_failed_first_write_to_an_existing_empty_file_removes_it(self):
        """A failed append at offset 0 to a file that already exists (empty) does not leave
        it behind empty: nothing of it was published, and an empty file is not gzip."""
        path = os.path.join(self.mktemp(), "f")
        os.makedirs(os.path.dirname(path))
        open(path, "wb").close()

        def failing_pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(segment.os, "pwrite", failing_pwrite)
        e = self.assertRaises(OSError, thd_append, path, b"0123", 0, False)
        self.assertEqual(e.errno, errno.ENOSPC)
        self.assertFalse(os.path.lexists(path))

    def test_remove_if_empty(self):
        """thd_remove_if_empty removes an empty regular file only: not a file with data,
        not a symlink (nor its target), not a missing file."""
        base = self.mktemp()
        os.makedirs(base)
        empty, full, link = (os.path.join(base, n) for n in ("empty", "full", "link"))
        open(empty, "wb").close()
        with open(full, "wb") as f:
            f.write(b"x")
        target = os.path.join(base, "target")
        open(target, "wb").close()
        os.symlink(target, link)
        self.assertTrue(segment.thd_remove_if_empty(empty))
        self.assertFalse(os.path.lexists(empty))
        self.assertFalse(segment.thd_remove_if_empty(empty))
        self.assertFalse(segment.thd_remove_if_empty(full))
        self.assertFalse(segment.thd_remove_if_empty(link))
        self.assertEqual(read(full), b"x")
        self.assertTrue(os.path.islink(link) and os.path.exists(target))

    def test_failed_fsync_is_truncated_back(self):
        """A failing fsync also leaves nothing of the new data behind."""
        path = os.path.join(self.mktemp(), "f")
        thd_append(path, b"kept", 0, False)

        def failing_fsync(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(segment.os, "fsync", failing_fsync)
        self.assertRaises(OSError, thd_append, path, b"lost", 4, True)
        self.assertEqual(read(path), b"kept")

    def test_fsync_covers_file_and_new_directories(self):
        """With fsync=True the file and the parents of created entries are fsync'd."""
        base = self.mktemp()
        os.makedirs(base)
        path = os.path.join(base, "job", "stdout.log.gz")
        synced = []
        real_fsync = os.fsync

        def recording_fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        self.patch(segment.os, "fsync", recording_fsync)
        thd_append(path, b"x", 0, True)
        absbase = os.path.abspath(base)
        self.assertEqual(
            sorted(synced),
            sorted([os.path.abspath(path), absbase, os.path.join(absbase, "job")]),
        )
        del synced[:]
        thd_append(path, b"y", 1, True)
        self.assertEqual(synced, [os.path.abspath(path)])
        del synced[:]
        thd_append(path, b"z", 2, False)
        self.assertEqual(synced, [])


_FAULT_SCRIPT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from joblet_persist.storage import segment
append = segment._append_at_py if sys.argv[2] == "py" else segment._append_at
path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 3, resource.RLIM_INFINITY))
try:
    append(path, [b"01234", b"56789"], 4, True)
except OSError as e:
    print(e.errno, e.filename == path)
"""


class _AppendAtTests:
    """The append to an existing segment in one stretch: ``append`` is ``_speedups.append_at``
    or its reference ``segment._append_at_py``; both must behave the same."""

    append = None
    route = ""

    def path(self, content=b"kept"):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "stdout.log.gz")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_appends_every_blob_in_order_and_fsyncs(self):
        """Blobs of any bytes-like kind (empty ones too) land in order at expected_size; the
        new size is returned."""
        path = self.path()
        blobs = [b"ab", memoryview(b"cd"), b"", bytearray(b"e" * 70000)]
        self.assertEqual(self.append(path, blobs, 4, True), 4 + 4 + 70000)
        self.assertEqual(read(path), b"keptabcd" + b"e" * 70000)
        self.assertEqual(self.append(path, [], 70008, False), 70008)

    def test_longer_file_is_cut_back_first(self):
        """What lies past expected_size (an unpublished, failed append) is replaced."""
        path = self.path(b"keptTORN-TAIL")
        self.assertEqual(self.append(path, [b"new"], 4, False), 7)
        self.assertEqual(read(path), b"keptnew")

    def test_declines_what_the_walk_must_decide(self):
        """Missing, shorter, a symlink at the name or a symlinked directory on the way, a
        FIFO, a directory: None, nothing written anywhere (the component walk then raises or
        creates as it does for every append)."""
        path = self.path()
        base = os.path.dirname(path)
        self.assertIsNone(self.append(os.path.join(base, "missing"), [b"x"], 1, False))
        self.assertFalse(os.path.lexists(os.path.join(base, "missing")))
        self.assertIsNone(self.append(path, [b"x"], 5, False))
        link = os.path.join(base, "link.log.gz")
        os.symlink(path, link)
        self.assertIsNone(self.append(link, [b"x"], 4, False))
        dirlink = base + "-link"
        os.symlink(base, dirlink)
        self.assertIsNone(self.append(os.path.join(dirlink, "stdout.log.gz"), [b"x"], 4, False))
        fifo = os.path.join(base, "fifo")
        os.mkfifo(fifo)
        self.assertIsNone(self.append(fifo, [b"x"], 0, False))
        self.assertIsNone(self.append(base, [b"x"], 0, False))
        self.assertEqual(read(path), b"kept")

    def test_failed_write_is_cut_back_and_raised(self):
        """A write that fails part-way (here the file-size limit, EFBIG, in a child process)
        leaves the file at expected_size and raises OSError naming the file."""
        import subprocess
        import sys

        path = self.path()
        out = subprocess.run(
            [sys.executable, "-c", _FAULT_SCRIPT, path, self.route],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(out.stdout.split(), [str(errno.EFBIG), "True"], out.stderr)
        self.assertEqual(read(path), b"kept")


class AppendAtReferenceTests(_AppendAtTests, SynchronousTestCase):
    append = staticmethod(segment._append_at_py)
    route = "py"


class AppendAtTestsC(_AppendAtTests, SynchronousTestCase):
    route = "c"
    try:
        from joblet_persist._speedups import append_at as _c
    except ImportError:
        skip = "joblet_persist._speedups is not built"
    else:
        append = staticmethod(_c)


class AppendBlobsTests(SynchronousTestCase):
    """thd_append_blobs: the one-stretch route where it applies, the walk otherwise."""

    def test_new_relative_and_existing_files(self):
        """A new file is created by the walk, a relative path is walked, an existing file
        is appended to; the content is the blobs' concatenation every time."""
        rel = os.path.join(self.mktemp(), "f")
        self.assertEqual(segment.thd_append_blobs(rel, [b"a", b"b"], 0, True), 2)
        self.assertEqual(segment.thd_append_blobs(rel, [b"c"], 2, True), 3)
        path = os.path.abspath(rel)
        self.assertEqual(segment.thd_append_blobs(path, [b"d", b"e"], 3, True), 5)
        self.assertEqual(read(path), b"abcde")

    def test_symlink_still_refused(self):
        """An existing segment swapped for a symlink: the walk refuses it (UnsafeEntry),
        and the link's target is untouched."""
        from joblet_persist.storage import safefs

        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "logs", "job"))
        target = os.path.join(base, "precious")
        with open(target, "wb") as f:
            f.write(b"secret")
        path = os.path.join(base, "logs", "job", "stdout.log.gz")
        os.symlink(target, path)
        self.assertRaises(
            safefs.UnsafeEntry, segment.thd_append_blobs, path, [b"x"], 6, False, depth=3
        )
        self.assertEqual(read(target), b"secret")

    def test_shorter_file_raises_for_the_writer(self):
        """A segment cut behind the service's back: SegmentShorterThanExpected, as before."""
        path = os.path.abspath(os.path.join(self.mktemp(), "f"))
        segment.thd_append_blobs(path, [b"abc"], 0, False)
        os.truncate(path, 1)
        e = self.assertRaises(
            SegmentShorterThanExpected, segment.thd_append_blobs, path, [b"x"], 3, False
        )
        self.assertEqual(e.actual_size, 1)


class ScanTests(SynchronousTestCase):
    """thd_scan_segment: header walk, last-member verification, torn-tail repair."""

    def test_missing_file(self):
        """A missing file scans as empty."""
        self.assertEqual(
            thd_scan_segment(os.path.join(self.mktemp(), "x"), True), ScanResult((), 0, 0, False)
        )

    def test_empty_file(self):
        """An empty file has no members and nothing to cut."""
        path = self.mktemp()
        open(path, "wb").close()
        self.assertEqual(thd_scan_segment(path, True), ScanResult((), 0, 0, False))

    def test_valid_file(self):
        """A clean file lists every member with its offset; nothing is cut."""
        path, infos, _ = write_members(self)
        size = os.path.getsize(path)
        self.assertEqual(thd_scan_segment(path, True), ScanResult(tuple(infos), size, size, False))

    def test_walk_inflates_only_the_last_member(self):
        """The scan verifies the last member only; the others are read by header."""
        path, infos, _ = write_members(self, nbatches=6)
        inflated = []
        real = segment.inflate_member

        def counting(f, m):
            inflated.append(m.offset)
            return real(f, m)

        self.patch(segment, "inflate_member", counting)
        result = thd_scan_segment(path, False)
        self.assertEqual(len(result.members), len(infos))
        self.assertEqual(inflated, [infos[-1].offset])

    def test_torn_tail_at_every_offset(self):
        """Cut inside the last member at every offset: repair keeps the rest and appends work."""
        path, infos, contents = write_members(self, nbatches=3)
        original = read(path)
        last = infos[-1]
        last_text = b"".join(b"m%d\n" % o for o in range(last.first_ordinal, last.last_ordinal + 1))
        kept_text = contents[: len(contents) - len(last_text)]
        for cut in range(last.offset + 1, last.offset + last.size):
            with open(path, "wb") as f:
                f.write(original[:cut])
            result = thd_scan_segment(path, True)
            self.assertEqual(result.members, tuple(infos[:-1]), cut)
            self.assertEqual((result.valid_size, result.file_size), (last.offset, cut))
            self.assertTrue(result.truncated)
            self.assertEqual(os.path.getsize(path), last.offset)
        pieces, text = batch(1000, 5)
        thd_append(path, b"".join(p for p, _ in pieces), result.valid_size, False)
        self.assertEqual(gzip.decompress(read(path)), kept_text + text)
        self.assertEqual(len(thd_scan_segment(path, False).members), len(infos))

    def test_garbage_tails_are_cut(self):
        """Zero fill, random bytes and a stray gzip magic after the members are cut."""
        path, infos, contents = write_members(self)
        original = read(path)
        rnd = random.Random(3)
        tails = [
            b"\x00" * 4096,
            bytes(rnd.getrandbits(8) for _ in range(1000)),
            b"\x1f\x8b\x08\x04" + b"\x00" * 30,
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x01\x02",
            b"\x1f",
        ]
        for tail in tails:
            with open(path, "wb") as f:
                f.write(original + tail)
            unrepaired = thd_scan_segment(path, False)
            self.assertEqual(
                unrepaired, ScanResult(tuple(infos), len(original), len(original) + len(tail), False)
            )
            self.assertEqual(read(path), original + tail)  # repair=False modifies nothing
            repaired = thd_scan_segment(path, True)
            self.assertTrue(repaired.truncated)
            self.assertEqual(read(path), original)
            self.assertEqual(gzip.decompress(read(path)), contents)

    def test_bad_crc_of_last_member_is_cut(self):
        """A complete-looking last member whose data fails its CRC is the torn tail."""
        path, infos, _ = write_members(self)
        data = bytearray(read(path))
        data[-9] ^= 0x55  # last byte of the deflate data of the last member
        with open(path, "wb") as f:
            f.write(data)
        result = thd_scan_segment(path, True)
        self.assertEqual(result.members, tuple(infos[:-1]))
        self.assertEqual(os.path.getsize(path), infos[-1].offset)

    def test_zero_filled_tail_spanning_members(self):
        """Zeros over the last two members' data: both are dropped (verification walks back)."""
        path, infos, _ = write_members(self)
        data = bytearray(read(path))
        a, b = infos[-2], infos[-1]
        data[b.offset - 12 : b.offset] = b"\x00" * 12  # end of a's data and its trailer
        data[b.offset + b.size - 8 :] = b"\x00" * 8  # b's trailer
        with open(path, "wb") as f:
            f.write(data)
        result = thd_scan_segment(path, False)
        self.assertEqual(result.members, tuple(infos[:-2]))
        self.assertEqual(result.valid_size, a.offset)

    def test_hole_in_the_middle_is_stepped_over(self):
        """A damaged header in the middle is skipped, reported, and never cut."""
        path, infos, _ = write_members(self, nbatches=5)
        data = bytearray(read(path))
        victim = infos[2]
        data[victim.offset + 20] ^= 0xFF  # inside the checksummed JP payload
        with open(path, "wb") as f:
            f.write(data)
        result = thd_scan_segment(path, True)
        self.assertEqual(result.members, tuple(infos[:2] + infos[3:]))
        self.assertEqual(result.holes, ((victim.offset, victim.offset + victim.size),))
        self.assertEqual(result.valid_size, len(data))
        self.assertFalse(result.truncated)
        self.assertEqual(read(path), bytes(data))

    @given(st.data())
    def test_random_truncation(self, data):
        """Any truncation keeps exactly the members that end at or before the cut."""
        if not hasattr(self, "_file"):
            self._file = write_members(self, nbatches=4, per_batch=7)
            self._original = read(self._file[0])
        path, infos, _ = self._file
        cut = data.draw(st.integers(0, len(self._original)))
        with open(path, "wb") as f:
            f.write(self._original[:cut])
        result = thd_scan_segment(path, True)
        kept = tuple(m for m in infos if m.offset + m.size <= cut)
        self.assertEqual(result.members, kept)
        end = kept[-1].offset + kept[-1].size if kept else 0
        self.assertEqual(result.valid_size, end)
        self.assertEqual(os.path.getsize(path), end)
        self.assertEqual(result.truncated, end < cut)
