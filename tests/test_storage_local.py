"""Tests for joblet_persist.storage.local: LocalStorage on a real temporary directory.

Blocking work runs through injected thread runners: a synchronous one (the
Deferreds fire at once) and a manual one that completes queued calls in any
order.  Time is a task.Clock.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import jobindex, segment
from joblet_persist.storage.api import (
    STREAM_STDERR,
    STREAM_STDOUT,
    DataVanished,
    InvalidJobId,
    ReadStats,
    StorageUnavailable,
)
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.local import LocalStorage
from tests.storage_contract import (
    INVALID_JOB_IDS,
    StorageBackendContractMixin,
    event_batch,
    event_payload,
    log_batch,
    metric_batch,
    metric_payload,
)

JOB = "5b1e8d2c-7f3a-4c19-8e6d-000000000042"
START = 1_700_000_000.0


def sync_runner(f, *args, **kwargs):
    """Run ``f`` now; a Deferred with its result or its exception."""
    try:
        return defer.succeed(f(*args, **kwargs))
    except BaseException:
        return defer.fail()


class RecordingRunner:
    """A synchronous runner that records the names of the functions it ran."""

    def __init__(self):
        self.names = []

    def __call__(self, f, *args, **kwargs):
        self.names.append(f.__name__)
        return sync_runner(f, *args, **kwargs)


class ManualRunner:
    """Queues calls; the test completes them one by one, in any order."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.calls.append((f, args, kwargs, d))
        return d

    def names(self):
        return [c[0].__name__ for c in self.calls]

    def run(self, name=None):
        """Complete the first queued call (of function ``name`` if given)."""
        matching = [
            i for i, call in enumerate(self.calls) if name is None or call[0].__name__ == name
        ]
        if not matching:
            raise AssertionError(f"no queued call of {name}: {self.names()}")
        f, args, kwargs, d = self.calls.pop(matching[0])
        try:
            result = f(*args, **kwargs)
        except BaseException:
            d.errback()
        else:
            d.callback(result)

    def run_all(self):
        while self.calls:
            self.run()


def rows(start_arrival, *contents, ts=1000, stream_seq=0):
    """Rows (timestamp, sequence, arrival, content) with consecutive arrivals."""
    return [
        (ts + i, stream_seq + i, start_arrival + i, c) for i, c in enumerate(contents)
    ]


class StorageTestCase(SynchronousTestCase):
    fsync = "batch"
    segment_max_bytes = 1 << 20

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(START)
        self.compressor = make_compressor("zlib", 6)

    def make(self, runner=sync_runner, start=True, **kwargs):
        """A LocalStorage on self.data_dir (started with a synchronous start)."""
        kwargs.setdefault("segment_max_bytes", self.segment_max_bytes)
        kwargs.setdefault("fsync", self.fsync)
        storage = LocalStorage(
            self.data_dir,
            runner,
            compressor=self.compressor,
            clock=self.clock,
            index_interval=5.0,
            **kwargs,
        )
        if start:
            if isinstance(runner, ManualRunner):
                d = storage.start()
                runner.run_all()
                self.successResultOf(d)
            else:
                self.successResultOf(storage.start())
        return storage

    def restart(self, storage, **kwargs):
        self.successResultOf(storage.stop())
        return self.make(**kwargs)

    def append(self, storage, stream, rows_, job=JOB):
        return self.successResultOf(storage.append_logs(log_batch(job, stream, rows_)))

    def logs(self, storage, stream=0, job=JOB, **kwargs):
        snap = self.successResultOf(storage.open_job(job))
        return [(r.stream, r.content) for r in snap.iter_logs(stream, **kwargs)]

    def segment_files(self, kind="stdout", job=JOB):
        top = "metrics" if kind == "metrics" else "logs"
        directory = os.path.join(self.data_dir, top, job)
        return [os.path.basename(p) for _, p in segment.thd_list_segments(directory, kind)]

    def read_index(self):
        with open(jobindex.index_path(self.data_dir), "rb") as f:
            return json.load(f)


class LocalStorageContractTests(StorageBackendContractMixin, StorageTestCase):
    """LocalStorage honours the StorageBackend contract."""

    def make_storage(self):
        return self.make()


class LocalStorageRotatingContractTests(StorageBackendContractMixin, StorageTestCase):
    """The contract holds when every append starts a new segment file."""

    segment_max_bytes = 1

    def make_storage(self):
        return self.make()


class LocalStorageIntervalContractTests(StorageBackendContractMixin, StorageTestCase):
    """The contract holds under the "interval" fsync policy."""

    fsync = "interval"

    def make_storage(self):
        return self.make()


class AppendAndReadTests(StorageTestCase):
    def test_files_are_plain_gzip(self):
        """zcat of a stream's segments yields exactly the bytes appended to that stream."""
        storage = self.make(segment_max_bytes=64)
        chunks = [b"line %d\n" % i for i in range(40)] + [b"", b"\x00\x01\xfe\xff"]
        for i in range(0, len(chunks), 7):
            self.append(storage, STREAM_STDOUT, rows(i, *chunks[i : i + 7]))
        self.append(storage, STREAM_STDERR, rows(100, b"oops\n"))
        directory = os.path.join(self.data_dir, "logs", JOB)
        data = b""
        for name in sorted(os.listdir(directory)):
            if name.startswith("stdout"):
                with open(os.path.join(directory, name), "rb") as f:
                    data += gzip.decompress(f.read())
        self.assertEqual(data, b"".join(chunks))
        with open(os.path.join(directory, "stderr.log.gz"), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"oops\n")

    def test_metrics_file_is_json_lines(self):
        """The metrics file is gzip'd JSON lines with the job id and exact integers."""
        storage = self.make()
        batch = metric_batch(JOB, [(7 * 10**18 + 1, 3, 0, metric_payload(JOB, 7 * 10**18 + 1, 3))])
        self.successResultOf(storage.append_metrics(batch))
        path = os.path.join(self.data_dir, "metrics", JOB, "metrics.jsonl.gz")
        with open(path, "rb") as f:
            lines = gzip.decompress(f.read()).splitlines()
        self.assertEqual(len(lines), 1)
        obj = json.loads(lines[0])
        self.assertEqual((obj["job_uuid"], obj["timestamp"]), (JOB, 7 * 10**18 + 1))
        self.assertEqual(obj["data"]["disk_io"]["read_bytes"], 2**62 + 3)

    def test_bytes_written_and_sizes(self):
        """Appends fire with the bytes written; JobInfo and totals add up to the file sizes."""
        storage = self.make()
        written = self.append(storage, STREAM_STDOUT, rows(0, b"a" * 1000))
        written += self.append(storage, STREAM_STDERR, rows(1, b"b"))
        written += self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(5, 1, 2, metric_payload(JOB, 5, 1))]))
        )
        on_disk = sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(self.data_dir)
            for name in names
            if name.endswith(".gz")
        )
        self.assertEqual(written, on_disk)
        self.assertEqual(storage.job_info(JOB).size_bytes, on_disk)
        self.assertEqual(storage.totals()[3], on_disk)

    def test_rotation(self):
        """Past segment_max_bytes a new segment starts; reads continue across segments."""
        storage = self.make(segment_max_bytes=100)
        for i in range(5):
            self.append(storage, STREAM_STDOUT, rows(i, b"x%d-" % i + b"y" * 150))
        self.assertEqual(
            self.segment_files(),
            ["stdout.log.gz"] + [f"stdout_00000{k}.log.gz" for k in range(1, 5)],
        )
        expected = [(1, b"x%d-" % i + b"y" * 150) for i in range(5)]
        self.assertEqual(self.logs(storage), expected)
        storage = self.restart(storage, segment_max_bytes=100)
        self.assertEqual(self.logs(storage), expected)
        self.assertEqual(self.logs(storage, offset=3), expected[3:])

    def test_rotation_threshold_is_inclusive(self):
        """A segment below the limit keeps growing; one at or past it is closed."""
        storage = self.make(segment_max_bytes=10**6)
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        size = os.path.getsize(os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz"))
        storage = self.restart(storage, segment_max_bytes=size + 1)
        self.append(storage, STREAM_STDOUT, rows(0, b"b"))
        self.assertEqual(self.segment_files(), ["stdout.log.gz"])
        self.append(storage, STREAM_STDOUT, rows(1, b"c"))
        self.assertEqual(self.segment_files(), ["stdout.log.gz", "stdout_000001.log.gz"])
        self.assertEqual(self.logs(storage), [(1, b"a"), (1, b"b"), (1, b"c")])

    def test_merge_order_survives_restart(self):
        """Arrival order of both streams holds across appends and restarts.

        After a restart the writer's arrivals start again at 0; the job's
        ordinal base keeps the new data after the old.
        """
        storage = self.make()
        self.append(storage, STREAM_STDOUT, [(50, 1, 0, b"o1"), (10, 2, 2, b"o2")])
        self.append(storage, STREAM_STDERR, [(40, 1, 1, b"e1"), (5, 2, 3, b"e2")])
        expected = [(1, b"o1"), (2, b"e1"), (1, b"o2"), (2, b"e2")]
        self.assertEqual(self.logs(storage), expected)
        storage = self.restart(storage)
        self.assertEqual(self.logs(storage), expected)
        self.append(storage, STREAM_STDERR, [(1, 3, 0, b"e3")])
        self.append(storage, STREAM_STDOUT, [(2, 3, 1, b"o3")])
        expected += [(2, b"e3"), (1, b"o3")]
        self.assertEqual(self.logs(storage), expected)
        storage = self.restart(storage)
        self.assertEqual(self.logs(storage), expected)
        self.assertEqual(self.logs(storage, offset=3, limit=2), expected[3:5])

    def test_undecodable_metric_payload_skipped(self):
        """An undecodable metric payload is left out and counted; the rest is stored."""
        storage = self.make()
        batch = metric_batch(
            JOB,
            [
                (1, 1, 0, metric_payload(JOB, 1, 1)),
                (2, 2, 1, b"\xff\xff\xff"),
                (3, 3, 2, metric_payload(JOB, 3, 3)),
            ],
        )
        self.assertGreater(self.successResultOf(storage.append_metrics(batch)), 0)
        snap = storage.snapshot(JOB)
        self.assertEqual([m.sequence for m in snap.iter_metrics()], [1, 3])
        self.assertEqual(snap.info.metric_count, 2)
        self.assertEqual(storage.skipped_metric_payloads, 1)

    def test_only_undecodable_metric_payloads(self):
        """A batch of only undecodable payloads writes nothing and does not fail."""
        storage = self.make()
        batch = metric_batch(JOB, [(1, 1, 0, b"\xff\xff\xff")])
        self.assertEqual(self.successResultOf(storage.append_metrics(batch)), 0)
        self.assertIsNone(storage.job_info(JOB))
        self.assertEqual(storage.skipped_metric_payloads, 1)

    def test_job_info_times(self):
        """created_at is when the first data arrived; last_updated follows appends."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.clock.advance(30)
        self.append(storage, STREAM_STDOUT, rows(1, b"b"))
        info = storage.job_info(JOB)
        self.assertEqual((info.created_at, info.last_updated), (int(START), int(START) + 30))
        storage = self.restart(storage)
        self.assertEqual(storage.job_info(JOB), info)
        self.assertEqual(self.successResultOf(storage.open_job(JOB)).info, info)

    def test_list_jobs_rebuilt_only_on_change(self):
        """list_jobs returns the same tuple until the index changes."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        first = storage.list_jobs()
        self.assertIs(storage.list_jobs(), first)
        self.append(storage, STREAM_STDOUT, rows(1, b"b"))
        second = storage.list_jobs()
        self.assertIsNot(second, first)
        self.assertEqual(second[0].log_count, 2)

    def test_invalid_batches(self):
        """Mismatched columns and unknown streams fail without touching the disk."""
        runner = RecordingRunner()
        storage = self.make(runner)
        runner.names.clear()
        bad = log_batch(JOB, STREAM_STDOUT, rows(0, b"a"))
        bad = type(bad)(JOB, STREAM_STDOUT, [1, 2], [1], [0], [b"a"])
        self.failureResultOf(storage.append_logs(bad), ValueError)
        self.failureResultOf(storage.append_logs(log_batch(JOB, 0, rows(0, b"a"))), ValueError)
        self.failureResultOf(storage.append_logs(log_batch(JOB, 3, rows(0, b"a"))), ValueError)
        self.assertEqual(runner.names, [])

    def test_invalid_stream_in_query(self):
        """A snapshot rejects a stream other than 0, 1 or 2."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.assertRaises(ValueError, storage.snapshot(JOB).iter_logs, 3)

    def test_open_job_reads_no_data(self):
        """Opening a job after a restart inflates nothing beyond the scan's checks."""
        storage = self.make()
        for i in range(20):
            self.append(storage, STREAM_STDOUT, rows(i, b"line %d\n" % i))
        storage = self.restart(storage)
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual(snap.info.log_count, 20)
        stats = ReadStats()
        self.assertEqual(
            [r.content for r in snap.iter_logs(1, offset=19, stats=stats)], [b"line 19\n"]
        )
        self.assertEqual(stats.members_inflated, 1)


class InvalidJobIdTests(StorageTestCase):
    def test_rejected_before_any_path(self):
        """Invalid ids never reach the pool nor the file system."""
        runner = RecordingRunner()
        storage = self.make(runner)
        runner.names.clear()
        before = sorted(os.listdir(self.data_dir))
        for bad in INVALID_JOB_IDS:
            self.failureResultOf(
                storage.append_logs(log_batch(bad, STREAM_STDOUT, rows(0, b"x"))), InvalidJobId
            )
            self.failureResultOf(storage.open_job(bad), InvalidJobId)
            self.failureResultOf(storage.delete_job(bad), InvalidJobId)
        self.assertEqual(runner.names, [])
        self.assertEqual(sorted(os.listdir(self.data_dir)), before)

    def test_exact_examples(self):
        """The brief's examples: '../x', 'a/b', '' and a 200-character id."""
        storage = self.make()
        for bad in ("../x", "a/b", "", "a" * 200):
            self.failureResultOf(
                storage.append_logs(log_batch(bad, STREAM_STDOUT, rows(0, b"x"))), InvalidJobId
            )
        self.assertEqual(os.listdir(os.path.join(self.data_dir)), ["job_index.json"])


class JobIndexTests(StorageTestCase):
    def test_index_write_is_debounced(self):
        """Appends schedule one index write index_interval later, not one per append."""
        runner = RecordingRunner()
        storage = self.make(runner)
        runner.names.clear()
        for i in range(3):
            self.append(storage, STREAM_STDOUT, rows(i, b"x"))
        self.clock.advance(4.9)
        self.assertNotIn("thd_write", runner.names)
        self.assertEqual(self.read_index()["jobs"], {})
        self.clock.advance(0.1)
        self.assertEqual(runner.names.count("thd_write"), 1)
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 3)
        self.clock.advance(60)
        self.assertEqual(runner.names.count("thd_write"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_change_during_write_rewrites(self):
        """A change made while the index is being written is written afterwards."""
        runner = ManualRunner()
        storage = self.make(runner)
        d = storage.append_logs(log_batch(JOB, 1, rows(0, b"x")))
        runner.run_all()
        self.successResultOf(d)
        self.clock.advance(5)
        self.assertEqual(runner.names(), ["thd_write"])
        d = storage.append_logs(log_batch(JOB, 1, rows(1, b"y")))
        runner.run("thd_append_logs")
        self.successResultOf(d)
        runner.run("thd_write")
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5)
        runner.run("thd_write")
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 2)

    def test_stop_writes_index(self):
        """stop() cancels the timer and writes the index at once."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.successResultOf(storage.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        entry = self.read_index()["jobs"][JOB]
        self.assertEqual(entry["log_count"], 1)
        self.assertEqual(entry["created_at"], int(START))
        self.failureResultOf(
            storage.append_logs(log_batch(JOB, 1, rows(1, b"y"))), RuntimeError
        )

    def test_stop_before_start_keeps_index(self):
        """stop() of a storage that never started leaves job_index.json alone."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.successResultOf(storage.stop())
        unstarted = self.make(start=False)
        self.successResultOf(unstarted.stop())
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)

    def test_write_failure_retried(self):
        """A failed index write is logged, counted and retried on the next tick."""
        storage = self.make()
        calls = []
        real = jobindex.thd_write

        def failing(path, jobs, parts, *rest):
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, jobs, parts, *rest)

        self.patch(jobindex, "thd_write", failing)
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(storage.index_write_errors, 1)
        self.assertEqual(self.read_index()["jobs"], {})
        self.clock.advance(5)
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)

    def test_missing_index_rebuilt(self):
        """Without job_index.json, start rebuilds it from the files."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a", b"b"))
        self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(9, 1, 2, metric_payload(JOB, 9, 1))]))
        )
        info = storage.job_info(JOB)
        self.successResultOf(storage.stop())
        os.remove(jobindex.index_path(self.data_dir))
        storage = self.make()
        rebuilt = storage.job_info(JOB)
        self.assertEqual(
            (rebuilt.log_count, rebuilt.metric_count, rebuilt.size_bytes),
            (2, 1, info.size_bytes),
        )
        self.assertEqual((rebuilt.first_timestamp, rebuilt.last_timestamp), (9, 1001))
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 2)

    def test_rebuild_reads_headers_only(self):
        """Rebuilding inflates one member per segment at most (the tail check), not the data."""
        storage = self.make()
        for i in range(30):
            self.append(storage, STREAM_STDOUT, rows(i, b"line %d\n" % i))
        self.append(storage, STREAM_STDERR, rows(30, b"err"))
        self.successResultOf(storage.stop())
        os.remove(jobindex.index_path(self.data_dir))
        inflated = []
        real = segment.inflate_member

        def counting(f, member):
            inflated.append(member.offset)
            return real(f, member)

        self.patch(segment, "inflate_member", counting)
        storage = self.make()
        self.assertEqual(storage.job_info(JOB).log_count, 31)
        self.assertLessEqual(len(inflated), 2)

    def test_corrupt_index_rebuilt(self):
        """A corrupt job_index.json (bad JSON, wrong shape) is rebuilt from the files."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.successResultOf(storage.stop())
        for garbage in (b"{not json", b"[]", b'{"version": 1, "jobs": []}', b"\xff\xfe"):
            with open(jobindex.index_path(self.data_dir), "wb") as f:
                f.write(garbage)
            storage = self.make()
            self.assertEqual([i.log_count for i in storage.list_jobs()], [1], garbage)
            self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)
            self.successResultOf(storage.stop())

    def test_stale_index_refreshed(self):
        """Data appended after the last index write (then a crash) is counted on start."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.successResultOf(storage.flush_index())
        index = jobindex.index_path(self.data_dir)
        os.utime(index, ns=(10**18, 10**18))  # the index predates what follows
        self.append(storage, STREAM_STDOUT, rows(1, b"b"))
        self.append(storage, STREAM_STDOUT, rows(0, b"c"), job="other-job")
        # No stop(): the process dies here with the index one append behind.
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)
        storage = self.make()
        self.assertEqual(storage.job_info(JOB).log_count, 2)
        self.assertEqual(storage.job_info(JOB).created_at, int(START))
        self.assertEqual(storage.job_info("other-job").log_count, 1)
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 2)

    def test_index_entry_without_files_dropped(self):
        """An index entry whose files were removed by hand disappears on start."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.successResultOf(storage.stop())
        shutil.rmtree(os.path.join(self.data_dir, "logs", JOB))
        storage = self.make()
        self.assertIsNone(storage.job_info(JOB))
        self.assertEqual(self.read_index()["jobs"], {})


class TornTailTests(StorageTestCase):
    def _torn_job(self):
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"first\n"))
        self.append(storage, STREAM_STDOUT, rows(1, b"second\n" * 50))
        self.successResultOf(storage.stop())
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        return path

    def test_torn_tail_cut_on_open(self):
        """A partially written last member is cut on open_job; earlier data survives."""
        path = self._torn_job()
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 5)
        storage = self.make()
        self.assertEqual(self.logs(storage), [(1, b"first\n")])
        first_size = os.path.getsize(path)
        self.assertLess(first_size, size - 5)
        self.assertEqual(storage.repaired_segments, 1)
        self.assertEqual(storage.job_info(JOB).log_count, 1)
        self.assertEqual(storage.job_info(JOB).size_bytes, first_size)
        self.append(storage, STREAM_STDOUT, rows(0, b"third\n"))
        self.assertEqual(self.logs(storage), [(1, b"first\n"), (1, b"third\n")])
        with open(path, "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"first\nthird\n")

    def test_garbage_tail_cut_on_open(self):
        """Zeros after the last member (a crash after a size change) are cut."""
        path = self._torn_job()
        with open(path, "ab") as f:
            f.write(b"\x00" * 4096)
        storage = self.make()
        self.assertEqual(
            [c for _, c in self.logs(storage)], [b"first\n", b"second\n" * 50]
        )
        self.append(storage, STREAM_STDOUT, rows(0, b"more"))
        with open(path, "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"first\n" + b"second\n" * 50 + b"more")

    def test_segment_left_empty_by_a_crash_is_removed_on_load(self):
        """A SIGKILL during the first append to a new segment (after a rotation) leaves
        that file empty (created, data not yet written) or holding part of its first
        member, which the torn-tail repair cuts to nothing.  An empty file is not gzip
        (``gzip -t`` and ``zcat`` fail on it), so loading the job removes such segments
        (counted as repaired); the data before them is intact, every file left passes
        ``gzip -t``, and the next appends create the segments again."""
        storage = self.make(segment_max_bytes=1)  # every append starts a new segment
        self.append(storage, STREAM_STDOUT, rows(0, b"one\n"))
        self.append(storage, STREAM_STDOUT, rows(1, b"two\n"))
        self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(5, 0, 2, metric_payload(JOB, 5, 0))]))
        )
        self.successResultOf(storage.stop())
        logs_dir = os.path.join(self.data_dir, "logs", JOB)
        metrics_dir = os.path.join(self.data_dir, "metrics", JOB)
        # Killed between creating the next stdout segment and writing to it ...
        open(os.path.join(logs_dir, "stdout_000002.log.gz"), "wb").close()
        # ... and part way through the first member of the next metrics segment.
        with open(os.path.join(metrics_dir, "metrics.jsonl.gz"), "rb") as f:
            member = f.read()
        with open(os.path.join(metrics_dir, "metrics_000001.jsonl.gz"), "wb") as f:
            f.write(member[: len(member) // 2])

        storage = self.make(segment_max_bytes=1)
        self.assertEqual(self.logs(storage), [(1, b"one\n"), (1, b"two\n")])
        self.assertEqual(storage.repaired_segments, 2)
        self.assertEqual(self.segment_files(), ["stdout.log.gz", "stdout_000001.log.gz"])
        self.assertEqual(self.segment_files("metrics"), ["metrics.jsonl.gz"])
        self.assertEqual(storage.job_info(JOB).log_count, 2)
        self.assertEqual(storage.job_info(JOB).metric_count, 1)
        self.assert_every_file_is_gzip()

        self.append(storage, STREAM_STDOUT, rows(3, b"three\n"))
        self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(6, 1, 4, metric_payload(JOB, 6, 1))]))
        )
        self.assertEqual(
            self.segment_files(),
            ["stdout.log.gz", "stdout_000001.log.gz", "stdout_000002.log.gz"],
        )
        self.assertEqual(self.segment_files("metrics"), ["metrics.jsonl.gz", "metrics_000001.jsonl.gz"])
        self.assertEqual(
            [c for _, c in self.logs(storage)], [b"one\n", b"two\n", b"three\n"]
        )
        self.assert_every_file_is_gzip()

    def assert_every_file_is_gzip(self):
        """Every segment file under the data directory passes ``gzip -t``."""
        for top in ("logs", "metrics", "events"):
            for root, _dirs, names in os.walk(os.path.join(self.data_dir, top)):
                for name in names:
                    path = os.path.join(root, name)
                    test = subprocess.run(["gzip", "-t", path], capture_output=True)
                    self.assertEqual(test.returncode, 0, f"gzip -t {path}: {test.stderr!r}")

    def test_rebuild_does_not_repair(self):
        """Rebuilding the index reads headers only and leaves a torn file untouched."""
        path = self._torn_job()
        with open(path, "ab") as f:
            f.write(b"\x1f\x8b\x08")
        size = os.path.getsize(path)
        os.remove(jobindex.index_path(self.data_dir))
        storage = self.make()
        self.assertEqual(storage.job_info(JOB).log_count, 2)
        self.assertEqual(os.path.getsize(path), size)
        self.successResultOf(storage.open_job(JOB))
        self.assertEqual(os.path.getsize(path), size - 3)


class FailureTests(StorageTestCase):
    def test_failed_append_publishes_nothing_and_retry_succeeds(self):
        """ENOSPC mid-append: nothing is published, and a retry stores the batch once."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"before\n"))
        real_append = segment.thd_append_blobs

        def torn_append(path, blobs, expected_size, fsync, **kwargs):
            # Worst case: half the data reached the file and nothing cleaned up.
            data = b"".join(blobs)
            with open(path, "r+b") as f:
                f.seek(expected_size)
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(segment, "thd_append_blobs", torn_append)
        batch = log_batch(JOB, STREAM_STDOUT, rows(1, b"after\n", b"again\n"))
        before = storage.snapshot(JOB)
        f = self.failureResultOf(storage.append_logs(batch), OSError)
        self.assertEqual(f.value.errno, errno.ENOSPC)
        self.assertIs(storage.snapshot(JOB), before)
        self.assertEqual(storage.job_info(JOB).log_count, 1)
        self.assertEqual(self.logs(storage), [(1, b"before\n")])

        self.patch(segment, "thd_append_blobs", real_append)
        self.assertGreater(self.successResultOf(storage.append_logs(batch)), 0)
        self.assertEqual(
            self.logs(storage), [(1, b"before\n"), (1, b"after\n"), (1, b"again\n")]
        )
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        with open(path, "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"before\nafter\nagain\n")
        self.assertEqual(storage.job_info(JOB).size_bytes, os.path.getsize(path))

    def test_segment_cut_outside_moves_appends_to_a_new_segment(self):
        """A segment truncated behind the service's back: the next append goes to a new
        segment at once (no error to retry), is stored whole, and is logged and counted;
        what is left of the old segment stays readable, the lost part is skipped."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"kept\n"))
        self.append(storage, STREAM_STDOUT, rows(1, b"cut away\n"))
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        first_member_end = storage.snapshot(JOB).stdout[0].members[1].offset
        os.truncate(path, first_member_end + 5)  # into the second member

        self.append(storage, STREAM_STDOUT, rows(2, b"after\n"))
        self.assertEqual(storage.shrunk_segments, 1)
        self.assertEqual(self.segment_files(), ["stdout.log.gz", "stdout_000001.log.gz"])
        self.assertEqual(self.logs(storage), [(1, b"kept\n"), (1, b"after\n")])
        info = storage.job_info(JOB)
        self.assertEqual(info.log_count, 2)  # recounted from what is left
        sizes = [os.path.getsize(os.path.join(self.data_dir, "logs", JOB, name))
                 for name in self.segment_files()]
        self.assertEqual(info.size_bytes, first_member_end + sizes[1])
        self.append(storage, STREAM_STDOUT, rows(3, b"more\n"))  # the new segment goes on
        self.assertEqual(self.segment_files(), ["stdout.log.gz", "stdout_000001.log.gz"])
        # After a restart, the scan cuts the torn tail and the counts are right again.
        storage = self.restart(storage)
        self.assertEqual(
            self.logs(storage), [(1, b"kept\n"), (1, b"after\n"), (1, b"more\n")]
        )
        self.assertEqual(storage.job_info(JOB).log_count, 3)

    def test_segment_removed_outside_moves_appends_to_a_new_segment(self):
        storage = self.make()
        self.append(storage, STREAM_STDERR, rows(0, b"gone\n"))
        os.unlink(os.path.join(self.data_dir, "logs", JOB, "stderr.log.gz"))
        self.append(storage, STREAM_STDERR, rows(1, b"next\n"))
        self.assertEqual(storage.shrunk_segments, 1)
        self.assertEqual(self.segment_files("stderr"), ["stderr_000001.log.gz"])
        self.assertEqual(self.logs(storage, STREAM_STDERR), [(2, b"next\n")])
        self.assertEqual(storage.job_info(JOB).log_count, 1)

    def test_failed_first_append_leaves_job_unknown(self):
        """A new job whose first append fails is not listed; the retry creates it."""
        storage = self.make()

        def failing(path, data, expected_size, fsync, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        real = segment.thd_append
        self.patch(segment, "thd_append", failing)
        batch = log_batch(JOB, STREAM_STDERR, rows(0, b"x"))
        self.failureResultOf(storage.append_logs(batch), OSError)
        self.assertIsNone(storage.job_info(JOB))
        self.assertIsNone(self.successResultOf(storage.open_job(JOB)))
        self.assertEqual(storage.list_jobs(), ())
        self.patch(segment, "thd_append", real)
        self.successResultOf(storage.append_logs(batch))
        self.assertEqual(self.logs(storage), [(2, b"x")])

    def test_failed_load_fails_append(self):
        """An error while scanning a job fails the append; a retry loads again."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        storage = self.restart(storage)
        real = jobindex.thd_scan_job

        def failing(*args):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(jobindex, "thd_scan_job", failing)
        self.failureResultOf(
            storage.append_logs(log_batch(JOB, 1, rows(0, b"b"))), OSError
        )
        self.failureResultOf(storage.open_job(JOB), OSError)
        self.patch(jobindex, "thd_scan_job", real)
        self.append(storage, STREAM_STDOUT, rows(0, b"b"))
        self.assertEqual(self.logs(storage), [(1, b"a"), (1, b"b")])

    def test_second_append_in_flight_refused(self):
        """Two appends in flight for the same (job, stream) are a caller bug: refused."""
        runner = ManualRunner()
        storage = self.make(runner)
        d1 = storage.append_logs(log_batch(JOB, 1, rows(0, b"a")))
        d2 = storage.append_logs(log_batch(JOB, 1, rows(1, b"b")))
        self.failureResultOf(d2, RuntimeError)
        d3 = storage.append_logs(log_batch(JOB, 2, rows(2, b"c")))
        runner.run_all()
        self.successResultOf(d1)
        self.successResultOf(d3)

    def test_probe_space(self):
        """The IFreeSpace probe is writable, with the free space, on a writable directory
        and leaves nothing behind; on a path that is not a directory it reports the error
        (it never fails), and free_bytes still answers."""
        storage = self.make()
        probe = self.successResultOf(storage.probe_space())
        self.assertEqual((probe.writable, probe.error), (True, None))
        self.assertGreater(probe.free_bytes, 0)
        self.assertGreater(self.successResultOf(storage.free_bytes()), 0)
        self.assertEqual(sorted(os.listdir(self.data_dir)), ["job_index.json"])
        other = self.mktemp()
        with open(other, "w") as f:
            f.write("not a directory")
        broken = LocalStorage(
            other,
            sync_runner,
            compressor=self.compressor,
            segment_max_bytes=1 << 20,
            fsync="batch",
            clock=self.clock,
        )
        probe = self.successResultOf(broken.probe_space())
        self.assertFalse(probe.writable)
        self.assertIn(other, probe.error)

    def test_failed_deletion_is_storage_unavailable(self):
        """A deletion that fails with an OSError (EACCES, EROFS) leaves LocalStorage as
        StorageUnavailable naming the job and the cause, for delete_job, delete_part and
        drop_segment alike."""

        def failing(f, *args, **kwargs):
            if f.__name__ in ("thd_remove_job", "thd_remove_file"):
                return defer.fail(OSError(errno.EROFS, "Read-only file system"))
            return sync_runner(f, *args, **kwargs)

        storage = self.make(failing, segment_max_bytes=1)
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.append(storage, STREAM_STDOUT, rows(1, b"b"))
        for d in (
            storage.delete_job(JOB),
            storage.delete_part(JOB, "logs"),
            storage.drop_segment(JOB, "stdout", 0),
        ):
            f = self.failureResultOf(d, StorageUnavailable)
            self.assertIn(JOB, f.value.cause)
            self.assertIn("Read-only file system", f.value.cause)

    def test_read_errors_are_seam_errors(self):
        """A segment removed under a read is DataVanished; any other OSError of a read is
        StorageUnavailable: no OSError leaves a snapshot."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        snap = self.successResultOf(storage.open_job(JOB))
        path = os.path.join(self.data_dir, "logs", JOB, self.segment_files()[0])
        os.rename(path, path + ".moved")
        self.assertRaises(DataVanished, list, snap.iter_logs(0))
        self.assertRaises(DataVanished, list, snap.iter_log_chunks(0))
        os.mkdir(path)  # opening a directory as the segment: IsADirectoryError
        with self.assertRaises(StorageUnavailable) as caught:
            list(snap.iter_logs(0))
        self.assertIn(JOB, caught.exception.cause)


class DisposableBatchTests(StorageTestCase):
    """A disposable metric or event batch (the writer's) is emptied on the pool thread once
    it is stored, and only then: a failed append keeps it whole for the retry."""

    def event_rows(self, first, count):
        return [
            (1000 + i, i, i, event_payload("file", 1000 + i, i, pid=i, path=f"/tmp/{i}"))
            for i in range(first, first + count)
        ]

    def stored_events(self, storage):
        snap = self.successResultOf(storage.open_job(JOB))
        return [(e.timestamp, e.sequence, e.data["path"]) for e in snap.iter_events("file")]

    def test_stored_disposable_batches_are_emptied(self):
        storage = self.make()
        metrics = dataclasses.replace(
            metric_batch(JOB, [(5, 1, 0, metric_payload(JOB, 5, 1))]), disposable=True
        )
        events_ = dataclasses.replace(
            event_batch(JOB, "file", self.event_rows(1, 3)), disposable=True
        )
        kept = event_batch(JOB, "file", self.event_rows(4, 2))  # not disposable
        self.successResultOf(storage.append_metrics(metrics))
        self.successResultOf(storage.append_events(events_))
        self.successResultOf(storage.append_events(kept))
        for batch in (metrics, events_):
            self.assertEqual(
                [batch.timestamps, batch.sequences, batch.arrivals, batch.payloads],
                [[], [], [], []],
            )
        self.assertEqual(len(kept.payloads), 2)
        self.assertEqual([t for t, _, _ in self.stored_events(storage)], [1001, 1002, 1003,
                                                                           1004, 1005])
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual([m.timestamp for m in snap.iter_metrics()], [5])

    def test_failed_disposable_append_keeps_the_batch_for_the_retry(self):
        """ENOSPC: the batch is left whole, and the retry stores all of it (then empties it)."""
        storage = self.make()
        real_append = segment.thd_append_blobs

        def full(path, blobs, expected_size, fsync, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        batch = dataclasses.replace(
            event_batch(JOB, "file", self.event_rows(0, 4)), disposable=True
        )
        self.patch(segment, "thd_append_blobs", full)
        self.failureResultOf(storage.append_events(batch), OSError)
        self.assertEqual(len(batch.payloads), 4)
        self.assertEqual(batch.arrivals, [0, 1, 2, 3])
        self.patch(segment, "thd_append_blobs", real_append)
        self.successResultOf(storage.append_events(batch))
        self.assertEqual(self.stored_events(storage),
                         [(1000 + i, i, f"/tmp/{i}") for i in range(4)])
        self.assertEqual(batch.payloads, [])

    def test_disposable_batch_moved_to_a_new_segment_is_stored_whole(self):
        """A segment cut behind the service's back: storage itself writes the batch again,
        to a new segment, from the same columns, which the failed attempt left whole."""
        storage = self.make()
        self.successResultOf(storage.append_events(event_batch(JOB, "file", self.event_rows(0, 2))))
        path = os.path.join(self.data_dir, "events", JOB, "file_events.jsonl.gz")
        os.truncate(path, 10)
        batch = dataclasses.replace(
            event_batch(JOB, "file", self.event_rows(2, 3)), disposable=True
        )
        self.successResultOf(storage.append_events(batch))
        self.assertEqual(storage.shrunk_segments, 1)
        self.assertEqual(self.stored_events(storage),
                         [(1000 + i, i, f"/tmp/{i}") for i in range(2, 5)])
        self.assertEqual(batch.payloads, [])


class ConcurrencyTests(StorageTestCase):
    def test_concurrent_open_job_shares_one_scan(self):
        """Concurrent open_job calls for one job share a single scan."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.successResultOf(storage.stop())
        runner = ManualRunner()
        storage = self.make(runner)
        d1 = storage.open_job(JOB)
        d2 = storage.open_job(JOB)
        self.assertEqual(runner.names(), ["thd_scan_job"])
        self.assertNoResult(d1)
        runner.run()
        snap = self.successResultOf(d1)
        self.assertIs(self.successResultOf(d2), snap)
        self.assertIs(self.successResultOf(storage.open_job(JOB)), snap)
        self.assertEqual(runner.names(), [])

    def test_out_of_order_completion(self):
        """stdout and stderr appends completing in reverse order both publish correctly."""
        runner = ManualRunner()
        storage = self.make(runner)
        d_out = storage.append_logs(log_batch(JOB, 1, rows(0, b"o1", b"o2")))
        d_err = storage.append_logs(log_batch(JOB, 2, rows(2, b"e1")))
        self.assertEqual(runner.names(), ["thd_scan_job"])
        runner.run()
        self.assertEqual(runner.names(), ["thd_append_logs", "thd_append_logs"])
        runner.calls.reverse()
        runner.run()
        self.assertNoResult(d_out)
        self.assertGreater(self.successResultOf(d_err), 0)
        self.assertEqual(
            [r.content for r in storage.snapshot(JOB).iter_logs(0)], [b"e1"]
        )
        self.assertEqual(storage.job_info(JOB).log_count, 1)
        runner.run()
        self.assertGreater(self.successResultOf(d_out), 0)
        snap = storage.snapshot(JOB)
        self.assertEqual([r.content for r in snap.iter_logs(0)], [b"o1", b"o2", b"e1"])
        self.assertEqual(snap.info.log_count, 3)
        d_out = storage.append_logs(log_batch(JOB, 1, rows(4, b"o3")))
        d_err = storage.append_logs(log_batch(JOB, 2, rows(3, b"e2")))
        runner.calls.reverse()
        runner.run_all()
        self.successResultOf(d_out)
        self.successResultOf(d_err)
        self.assertEqual(
            [r.content for r in storage.snapshot(JOB).iter_logs(0)],
            [b"o1", b"o2", b"e1", b"e2", b"o3"],
        )

    def test_delete_waits_for_append_in_flight(self):
        """delete_job removes the files only after the job's in-flight append ends."""
        runner = ManualRunner()
        storage = self.make(runner)
        d_append = storage.append_logs(log_batch(JOB, 1, rows(0, b"a")))
        runner.run("thd_scan_job")
        d_delete = storage.delete_job(JOB)
        self.assertEqual(runner.names(), ["thd_append_logs"])
        d_late = storage.append_logs(log_batch(JOB, 2, rows(1, b"late")))
        runner.run("thd_append_logs")
        self.successResultOf(d_append)
        self.assertEqual(runner.names(), ["thd_remove_job"])
        runner.run("thd_remove_job")
        runner.run("thd_write")
        self.assertGreater(self.successResultOf(d_delete), 0)
        # The append made during the deletion starts a fresh job afterwards.
        runner.run_all()
        self.successResultOf(d_late)
        snap = storage.snapshot(JOB)
        self.assertEqual([(r.stream, r.content) for r in snap.iter_logs(0)], [(2, b"late")])
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")))

    def test_stop_waits_for_appends(self):
        """stop() fires only after appends in flight ended, then writes the index."""
        runner = ManualRunner()
        storage = self.make(runner)
        d = storage.append_logs(log_batch(JOB, 1, rows(0, b"a")))
        stopped = storage.stop()
        runner.run("thd_scan_job")
        self.assertNoResult(stopped)
        runner.run("thd_append_logs")
        self.successResultOf(d)
        runner.run("thd_write_reconciled")
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)


class DeleteTests(StorageTestCase):
    def test_delete_frees_files_and_restarts_clean(self):
        """Deletion removes the files and index entry; new data gets new created_at, ordinals."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, *[b"x" * 10] * 5))
        self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(1, 1, 5, metric_payload(JOB, 1, 1))]))
        )
        size = storage.job_info(JOB).size_bytes
        self.assertEqual(self.successResultOf(storage.delete_job(JOB)), size)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "logs", JOB)))
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "metrics", JOB)))
        self.assertNotIn(JOB, self.read_index()["jobs"])
        self.assertEqual(storage.totals()[3], 0)
        self.clock.advance(100)
        self.append(storage, STREAM_STDERR, rows(0, b"new-e"))
        self.append(storage, STREAM_STDOUT, rows(1, b"new-o"))
        info = storage.job_info(JOB)
        self.assertEqual((info.created_at, info.log_count, info.metric_count), (int(START) + 100, 2, 0))
        self.assertEqual(self.logs(storage), [(2, b"new-e"), (1, b"new-o")])
        storage = self.restart(storage)
        self.assertEqual(self.logs(storage), [(2, b"new-e"), (1, b"new-o")])

    def test_delete_unloaded_job(self):
        """A job known only from the index (not loaded) is deleted with its bytes counted."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"abc"))
        size = storage.job_info(JOB).size_bytes
        storage = self.restart(storage)
        self.assertIsNone(storage.snapshot(JOB))
        self.assertEqual(self.successResultOf(storage.delete_job(JOB)), size)
        self.assertIsNone(self.successResultOf(storage.open_job(JOB)))


class FsyncPolicyTests(StorageTestCase):
    def _record_fsyncs(self):
        synced = []
        real = segment.thd_fsync_path

        inside = []

        def record(path):
            synced.append(path)
            inside.append(1)
            try:
                real(path)
            finally:
                inside.pop()

        self.patch(segment, "thd_fsync_path", record)
        real_fsync = os.fsync

        def record_fsync(fd):
            # Directories created on the way are fsync'd through the walk's descriptors.
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not inside and os.path.isdir(path):
                synced.append(path)
            real_fsync(fd)

        self.patch(os, "fsync", record_fsync)
        appends = []
        real_append = segment.thd_append_blobs

        def record_append(path, blobs, expected_size, fsync, **kwargs):
            appends.append(fsync)
            return real_append(path, blobs, expected_size, fsync, **kwargs)

        self.patch(segment, "thd_append_blobs", record_append)
        return synced, appends

    def test_batch_fsyncs_each_append(self):
        """Under "batch" every append is fsync'd, and nothing is left dirty."""
        synced, appends = self._record_fsyncs()
        storage = self.make(fsync="batch")
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.assertEqual(appends, [True])
        self.assertIn(os.path.join(self.data_dir, "logs"), synced)
        self.assertEqual(self.successResultOf(storage.sync_dirty()), 0)

    def test_interval_defers_fsync(self):
        """Under "interval" appends do not fsync; sync_dirty fsyncs the file and new dirs."""
        synced, appends = self._record_fsyncs()
        storage = self.make(fsync="interval")
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.append(storage, STREAM_STDOUT, rows(1, b"b"))
        self.assertEqual(appends, [False, False])
        del synced[:]
        self.assertEqual(self.successResultOf(storage.sync_dirty()), 4)
        job_dir = os.path.join(self.data_dir, "logs", JOB)
        self.assertEqual(
            sorted(synced),
            sorted(
                [
                    os.path.join(job_dir, "stdout.log.gz"),
                    job_dir,
                    os.path.join(self.data_dir, "logs"),
                    self.data_dir,
                ]
            ),
        )
        self.assertEqual(self.successResultOf(storage.sync_dirty()), 0)
        self.append(storage, STREAM_STDOUT, rows(2, b"c"))
        self.successResultOf(storage.stop())
        self.assertIn(os.path.join(job_dir, "stdout.log.gz"), synced[4:])

    def test_interval_sync_timer(self):
        """Under "interval" dirty files are fsync'd sync_interval after an append."""
        synced, _ = self._record_fsyncs()
        storage = self.make(fsync="interval")
        del synced[:]
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.clock.advance(0.9)
        self.assertEqual(synced, [])
        self.clock.advance(0.1)
        self.assertIn(os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz"), synced)
        del synced[:]
        self.clock.advance(1)
        self.assertEqual(synced, [])

    def test_interval_sync_failure_keeps_paths_dirty(self):
        """A failed sync_dirty keeps the paths for the next attempt."""
        storage = self.make(fsync="interval")
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        real = segment.thd_fsync_path

        def failing(path):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(segment, "thd_fsync_path", failing)
        self.failureResultOf(storage.sync_dirty(), OSError)
        self.patch(segment, "thd_fsync_path", real)
        self.assertEqual(self.successResultOf(storage.sync_dirty()), 4)

    def test_never_fsyncs_nothing(self):
        """Under "never" appends are not fsync'd and nothing is tracked."""
        synced, appends = self._record_fsyncs()
        storage = self.make(fsync="never")
        del synced[:]
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.assertEqual(appends, [False])
        self.assertEqual(synced, [])
        self.assertEqual(self.successResultOf(storage.sync_dirty()), 0)

    def test_invalid_policy(self):
        """An unknown fsync policy or a non-positive segment size is refused."""
        self.assertRaises(ValueError, self.make, start=False, fsync="sometimes")
        self.assertRaises(ValueError, self.make, start=False, segment_max_bytes=0)


class RetentionSupportTests(StorageTestCase):
    """The calls retention makes: part sizes, segment usage, dropping segments and parts."""

    def _job_with_segments(self, storage):
        for i in range(3):
            self.append(storage, STREAM_STDOUT, [(1000 + i, i, i, b"out-%d " % i + b"z" * 200)])
        self.append(storage, STREAM_STDERR, [(2000, 9, 3, b"err")])
        self.successResultOf(
            storage.append_metrics(metric_batch(JOB, [(500, 1, 4, metric_payload(JOB, 500, 1))]))
        )

    def test_part_sizes_and_segment_usage(self):
        """part_sizes splits the job's bytes; segment_usage lists each file, last ones marked."""
        storage = self.make(segment_max_bytes=100)
        self._job_with_segments(storage)
        usage = storage.segment_usage(JOB)
        self.assertEqual(
            [(u.kind, u.index, u.last_segment) for u in usage],
            [
                ("stdout", 0, False),
                ("stdout", 1, False),
                ("stdout", 2, True),
                ("stderr", 0, True),
                ("metrics", 0, True),
            ],
        )
        for u in usage:
            name = segment.segment_name(u.kind, u.index)
            top = "metrics" if u.kind == "metrics" else "logs"
            self.assertEqual(u.size_bytes, os.path.getsize(os.path.join(self.data_dir, top, JOB, name)))
        log_bytes, metric_bytes, _events = storage.part_sizes(JOB)
        self.assertEqual(log_bytes, sum(u.size_bytes for u in usage if u.kind != "metrics"))
        self.assertEqual(log_bytes + metric_bytes, storage.job_info(JOB).size_bytes)
        storage = self.restart(storage, segment_max_bytes=100)
        self.assertEqual(storage.part_sizes(JOB), (log_bytes, metric_bytes, 0))
        self.assertEqual(storage.segment_usage(JOB), ())
        self.assertEqual(storage.part_sizes("unknown"), (0, 0, 0))

    def test_drop_segment(self):
        """Dropping the oldest closed segment removes its file, messages and bytes."""
        storage = self.make(segment_max_bytes=100)
        self._job_with_segments(storage)
        before = storage.job_info(JOB)
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        size = os.path.getsize(path)
        self.assertEqual(self.successResultOf(storage.drop_segment(JOB, "stdout", 0)), size)
        self.assertFalse(os.path.exists(path))
        info = storage.job_info(JOB)
        self.assertEqual((info.log_count, info.size_bytes), (3, before.size_bytes - size))
        self.assertEqual(info.first_timestamp, 500)
        self.assertEqual(storage.totals()[3], info.size_bytes)
        self.assertEqual(storage.part_sizes(JOB)[0] + storage.part_sizes(JOB)[1], info.size_bytes)
        self.assertEqual(
            [c[:5] for _, c in self.logs(storage)], [b"out-1", b"out-2", b"err"]
        )
        self.failureResultOf(storage.drop_segment(JOB, "stdout", 2), ValueError)
        self.failureResultOf(storage.drop_segment(JOB, "metrics", 0), ValueError)
        self.assertEqual(self.successResultOf(storage.drop_segment(JOB, "stdout", 7)), 0)
        # Appends go on in the last segment; a restart sees the same data.
        self.append(storage, STREAM_STDOUT, [(3000, 5, 5, b"out-5")])
        expected = self.logs(storage)
        storage = self.restart(storage, segment_max_bytes=100)
        self.assertEqual(self.logs(storage), expected)
        self.assertEqual(storage.job_info(JOB).log_count, 4)

    def test_drop_segment_loads_job(self):
        """drop_segment on a job that is not loaded loads it first."""
        storage = self.make(segment_max_bytes=100)
        self._job_with_segments(storage)
        storage = self.restart(storage, segment_max_bytes=100)
        self.assertGreater(self.successResultOf(storage.drop_segment(JOB, "stdout", 1)), 0)
        self.assertEqual(storage.job_info(JOB).log_count, 3)
        self.assertEqual(self.successResultOf(storage.drop_segment("unknown", "stdout", 0)), 0)

    def test_delete_part(self):
        """Deleting a job's logs keeps its metrics and created_at; deleting both ends the job."""
        storage = self.make()
        self._job_with_segments(storage)
        created = storage.job_info(JOB).created_at
        log_bytes, metric_bytes, _events = storage.part_sizes(JOB)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(storage.delete_part(JOB, "logs")), log_bytes)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "logs", JOB)))
        info = storage.job_info(JOB)
        self.assertEqual(
            (info.created_at, info.log_count, info.metric_count, info.size_bytes),
            (created, 0, 1, metric_bytes),
        )
        self.assertEqual(storage.part_sizes(JOB), (0, metric_bytes, 0))
        self.assertEqual(self.logs(storage), [])
        self.assertEqual(len(list(storage.snapshot(JOB).iter_metrics())), 1)
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 0)
        self.assertEqual(self.successResultOf(storage.delete_part(JOB, "metrics")), metric_bytes)
        self.assertIsNone(storage.job_info(JOB))
        self.assertIsNone(self.successResultOf(storage.open_job(JOB)))
        self.failureResultOf(storage.delete_part(JOB, "everything"), ValueError)


class RandomHistoryTests(StorageTestCase):
    @settings(max_examples=25)
    @given(
        st.lists(
            st.one_of(
                st.tuples(
                    st.sampled_from([STREAM_STDOUT, STREAM_STDERR]),
                    st.lists(st.binary(max_size=40), min_size=1, max_size=6),
                ),
                st.just("restart"),
            ),
            max_size=12,
        ),
        st.sampled_from([1, 150, 1 << 20]),
    )
    def test_random_history_matches_reference(self, history, segment_max_bytes):
        """Any history of appends and restarts reads back in arrival order, as a reference says."""
        self.data_dir = os.path.abspath(self.mktemp())
        storage = self.make(segment_max_bytes=segment_max_bytes)
        expected = []
        arrival = 0
        ts = 1
        for step in history:
            if step == "restart":
                storage = self.restart(storage, segment_max_bytes=segment_max_bytes)
                arrival = 0  # a new process: the writer's arrivals start again
                continue
            stream, contents = step
            batch = [(ts + i, i, arrival + i, c) for i, c in enumerate(contents)]
            self.append(storage, stream, batch)
            expected.extend((stream, c) for c in contents)
            arrival += len(contents)
            ts += len(contents)
        if not expected:
            self.assertIsNone(self.successResultOf(storage.open_job(JOB)))
            return
        self.assertEqual(self.logs(storage), expected)
        for stream in (STREAM_STDOUT, STREAM_STDERR):
            self.assertEqual(self.logs(storage, stream), [e for e in expected if e[0] == stream])
        self.assertEqual(storage.job_info(JOB).log_count, len(expected))
        storage = self.restart(storage, segment_max_bytes=segment_max_bytes)
        self.assertEqual(self.logs(storage, offset=len(expected) // 2), expected[len(expected) // 2 :])


class UnloadIdleTests(StorageTestCase):
    """unload_idle drops idle jobs' in-memory state; their next use loads them again."""

    OTHER = "5b1e8d2c-7f3a-4c19-8e6d-000000000043"

    def test_idle_job_unloaded_and_reloaded(self):
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"o0\n", b"o1\n"))
        self.append(storage, STREAM_STDERR, rows(2, b"e2\n"))
        self.append(storage, STREAM_STDOUT, rows(0, b"x\n"), job=self.OTHER)
        info = storage.job_info(JOB)
        self.clock.advance(100)
        self.append(storage, STREAM_STDOUT, rows(1, b"y\n"), job=self.OTHER)  # OTHER in use
        self.assertEqual(storage.unload_idle(50), 1)
        self.assertEqual((storage.loaded_jobs, storage.unloaded_jobs), (1, 1))
        self.assertIsNone(storage.snapshot(JOB))
        self.assertFalse(storage.resident(JOB))
        self.assertTrue(storage.resident(self.OTHER))
        self.assertEqual(storage.job_info(JOB), info)  # the index entry stays
        self.assertEqual([j.job_id for j in storage.list_jobs()].count(JOB), 1)
        # A query loads it again from its files.
        self.assertEqual(self.logs(storage), [(1, b"o0\n"), (1, b"o1\n"), (2, b"e2\n")])
        self.assertEqual(storage.loaded_jobs, 2)
        self.assertEqual(storage.job_info(JOB).log_count, 3)

    def test_appends_after_reload_keep_arrival_order(self):
        """Whether the writer's arrival counter went on (3) or restarted (0) while the job
        was unloaded, later messages sort after earlier ones in the merged stream."""
        for next_arrival in (3, 0):
            storage = self.make()
            self.append(storage, STREAM_STDOUT, rows(0, b"o0\n", b"o1\n"))
            self.append(storage, STREAM_STDERR, rows(2, b"e2\n"))
            self.clock.advance(10)
            self.assertEqual(storage.unload_idle(5), 1)
            self.append(storage, STREAM_STDERR, rows(next_arrival, b"e-after\n"))
            self.append(storage, STREAM_STDOUT, rows(next_arrival + 1, b"o-after\n"))
            self.assertEqual(
                self.logs(storage),
                [(1, b"o0\n"), (1, b"o1\n"), (2, b"e2\n"), (2, b"e-after\n"), (1, b"o-after\n")],
            )
            self.assertEqual(storage.job_info(JOB).log_count, 5)
            self.successResultOf(storage.delete_job(JOB))
            self.successResultOf(storage.stop())

    def test_jobs_in_use_are_kept(self):
        """An append or load in flight, or a recent open_job, keeps a job loaded."""
        runner = ManualRunner()
        storage = self.make(runner)
        d = storage.append_logs(log_batch(JOB, 1, rows(0, b"a\n")))
        runner.run()  # the scan: the job is loading, then appending
        self.clock.advance(100)
        self.assertEqual(storage.unload_idle(0), 0)  # append in flight
        runner.run()
        self.successResultOf(d)
        self.clock.advance(100)
        self.successResultOf(storage.open_job(JOB))  # a query uses it now
        self.assertEqual(storage.unload_idle(50), 0)
        self.clock.advance(100)
        self.assertEqual(storage.unload_idle(50), 1)
        self.assertNotIn("thd_scan_job", runner.names())  # unloading reads nothing
        runner.run_all()


def _reference_page(storage, since, until, offset, limit):
    jobs = [j for j in storage.list_jobs()
            if (since <= 0 or j.created_at >= since) and (until <= 0 or j.created_at <= until)]
    jobs.sort(key=lambda j: (-j.created_at, j.job_id))
    return len(jobs), (jobs[offset : offset + limit] if limit else jobs[offset:])


class IndexViewsTests(StorageTestCase):
    """totals() and list_jobs_page() are kept up to date, equal to computing them anew."""

    @settings(max_examples=40, deadline=None)
    @given(
        st.lists(st.tuples(st.sampled_from("adu"), st.integers(0, 7), st.integers(0, 30)),
                 min_size=1, max_size=25),
        st.lists(st.tuples(st.integers(-5, 40), st.integers(-5, 40), st.integers(0, 9),
                           st.integers(0, 9)), min_size=1, max_size=6),
    )
    def test_same_as_recomputing(self, operations, pages):
        """Random appends (jobs created at various times), deletions and unloads; then every
        page and the totals equal what sorting and summing the whole index gives."""
        self.data_dir = os.path.abspath(self.mktemp())
        storage = self.make()
        jobs = [f"5b1e8d2c-7f3a-4c19-8e6d-{n:012d}" for n in range(8)]
        arrival = 0
        for op, n, advance in operations:
            self.clock.advance(advance)
            if op == "a":
                self.append(storage, 1 + n % 2, rows(arrival, b"x" * (n + 1)), job=jobs[n])
                arrival += 1
            elif op == "d":
                self.successResultOf(storage.delete_job(jobs[n]))
            else:
                storage.unload_idle(5)
        infos = storage.list_jobs()
        self.assertEqual(storage.totals(), (
            len(infos), sum(j.log_count for j in infos), sum(j.metric_count for j in infos),
            sum(j.size_bytes for j in infos)))
        base = int(START)
        for since, until, offset, limit in pages:
            since = base + since if since > 0 else since
            until = base + until if until > 0 else until
            self.assertEqual(storage.list_jobs_page(since, until, offset, limit),
                             _reference_page(storage, since, until, offset, limit))
        self.successResultOf(storage.stop())
        # After a restart (index loaded from the file) the views are rebuilt the same.
        storage = self.make()
        self.assertEqual(storage.list_jobs_page(0, 0, 0, 0), _reference_page(storage, 0, 0, 0, 0))
        self.assertEqual(storage.totals()[0], len(storage.list_jobs()))
        self.successResultOf(storage.stop())
