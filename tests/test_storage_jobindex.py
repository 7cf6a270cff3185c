"""Tests for joblet_persist.storage.jobindex: job_index.json and rebuilding it from files."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import events
from joblet_persist.storage import jobindex
from joblet_persist.storage.api import JobInfo
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.diskwork import thd_append_events
from joblet_persist.storage.jobindex import IndexCorrupt
from joblet_persist.storage.local import thd_append_logs, thd_append_metrics
from tests.storage_contract import event_payload, metric_payload

JOB = "0d6c2b7e-1a4f-4d55-b1e0-00000000abcd"
NS = 1_000_000_000


def info(job_id=JOB, **kw):
    values = dict(
        created_at=100,
        last_updated=200,
        log_count=3,
        metric_count=4,
        size_bytes=5000,
        first_timestamp=7 * 10**18,
        last_timestamp=7 * 10**18 + 1,
    )
    values.update(kw)
    return JobInfo(job_id=job_id, **values)


class IndexFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = jobindex.index_path(self.dir)

    def write_raw(self, data: bytes):
        with open(self.path, "wb") as f:
            f.write(data)

    def test_round_trip(self):
        """thd_write then thd_load returns the same JobInfos, integers exact."""
        jobs = {JOB: info(), "other": info("other", log_count=0, first_timestamp=0)}
        jobindex.thd_write(self.path, jobs)
        self.assertEqual(jobindex.thd_load(self.path), jobs)
        with open(self.path, "rb") as f:
            doc = json.load(f)
        self.assertEqual(doc["version"], 1)
        self.assertEqual(doc["jobs"][JOB]["first_timestamp"], 7 * 10**18)
        self.assertEqual(list(doc["jobs"]), sorted([JOB, "other"]))

    def test_parts_round_trip(self):
        """The logs/metrics byte split is stored; an inconsistent one is ignored."""
        jobs = {JOB: info(), "other": info("other")}
        jobindex.thd_write(self.path, jobs, {JOB: (4000, 1000), "other": (1, 1)})
        self.assertEqual(jobindex.thd_load_parts(self.path), (jobs, {JOB: (4000, 1000, 0)}))
        self.assertEqual(jobindex.thd_load(self.path), jobs)

    def test_empty_index(self):
        """An index with no jobs round-trips."""
        jobindex.thd_write(self.path, {})
        self.assertEqual(jobindex.thd_load(self.path), {})

    def test_missing(self):
        """A missing index raises FileNotFoundError (the caller rebuilds)."""
        self.assertRaises(FileNotFoundError, jobindex.thd_load, self.path)

    def test_corrupt_variants(self):
        """Every malformed index raises IndexCorrupt naming the file."""
        good = {"created_at": 1, "last_updated": 1, "log_count": 0, "metric_count": 0,
                "size_bytes": 0, "first_timestamp": 0, "last_timestamp": 0}
        variants = [
            b"",
            b"{truncated",
            b"\xff\xfe\x00",
            b"[]",
            b'{"jobs": {}}',
            b'{"version": 2, "jobs": {}}',
            b'{"version": 1, "jobs": []}',
            json.dumps({"version": 1, "jobs": {"../etc": good}}).encode(),
            json.dumps({"version": 1, "jobs": {JOB: []}}).encode(),
            json.dumps({"version": 1, "jobs": {JOB: dict(good, log_count=-1)}}).encode(),
            json.dumps({"version": 1, "jobs": {JOB: dict(good, log_count=True)}}).encode(),
            json.dumps({"version": 1, "jobs": {JOB: dict(good, size_bytes=1.5)}}).encode(),
            json.dumps({"version": 1, "jobs": {JOB: {"created_at": 1}}}).encode(),
        ]
        for data in variants:
            self.write_raw(data)
            e = self.assertRaises(IndexCorrupt, jobindex.thd_load, self.path)
            self.assertEqual(e.path, self.path)
            self.assertIn(self.path, str(e))

    def test_write_is_atomic(self):
        """When the rename fails the old index stays whole and no temporary file remains."""
        jobindex.thd_write(self.path, {JOB: info()})

        def failing_replace(src, dst):
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", failing_replace)
        self.assertRaises(OSError, jobindex.thd_write, self.path, {JOB: info(log_count=9)})
        self.assertEqual(os.listdir(self.dir), ["job_index.json"])
        self.assertEqual(jobindex.thd_load(self.path)[JOB].log_count, 3)

    def test_write_failure_removes_temporary(self):
        """A failed write (ENOSPC while writing) leaves the old index and no temporary file."""
        jobindex.thd_write(self.path, {JOB: info()})

        def failing_write(fd, data):
            raise OSError(28, "No space left on device")

        self.patch(os, "write", failing_write)
        self.assertRaises(OSError, jobindex.thd_write, self.path, {})
        self.assertEqual(os.listdir(self.dir), ["job_index.json"])
        self.assertEqual(list(jobindex.thd_load(self.path)), [JOB])


class EventCountsInIndexTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = jobindex.index_path(self.dir)

    def test_event_counts_round_trip(self):
        """Per-kind event counts and the events byte split are stored and read back; a job
        without events stores neither key."""
        jobs = {JOB: info(exec_events=5, mmap_events=2**40), "other": info("other")}
        jobindex.thd_write(self.path, jobs, {JOB: (4000, 0, 1000), "other": (3000, 2000, 0)})
        self.assertEqual(
            jobindex.thd_load_parts(self.path),
            (jobs, {JOB: (4000, 0, 1000), "other": (3000, 2000, 0)}),
        )
        with open(self.path, "rb") as f:
            doc = json.load(f)["jobs"]
        self.assertEqual(doc[JOB]["event_counts"], {"exec": 5, "mmap": 2**40})
        self.assertEqual(doc[JOB]["event_bytes"], 1000)
        self.assertNotIn("event_counts", doc["other"])
        self.assertNotIn("event_bytes", doc["other"])

    def test_old_index_without_events_loads(self):
        """An index written before events were stored (no event_counts, no event_bytes)
        loads with zero events and its byte split intact."""
        entry = {
            "created_at": 1, "last_updated": 2, "log_count": 3, "metric_count": 4,
            "size_bytes": 10, "first_timestamp": 5, "last_timestamp": 6,
            "log_bytes": 7, "metric_bytes": 3,
        }
        with open(self.path, "w") as f:
            json.dump({"version": 1, "jobs": {JOB: entry}}, f)
        jobs, parts = jobindex.thd_load_parts(self.path)
        self.assertEqual(jobs[JOB].event_count, 0)
        self.assertEqual(parts, {JOB: (7, 3, 0)})

    def test_bad_event_counts_are_corrupt(self):
        """event_counts that is not an object, names an unknown kind or holds a bad value
        makes the index corrupt, naming the job."""
        for bad in ([], {"nonsense": 1}, {"exec": -1}, {"exec": True}, {"exec": "3"}):
            entry = info_to_json_with(event_counts=bad)
            with open(self.path, "w") as f:
                json.dump({"version": 1, "jobs": {JOB: entry}}, f)
            with self.assertRaises(IndexCorrupt) as caught:
                jobindex.thd_load(self.path)
            self.assertIn(JOB, str(caught.exception))


def info_to_json_with(**extra):
    obj = jobindex.info_to_json(info())
    obj.update(extra)
    return obj


class FilesTestCase(SynchronousTestCase):
    """Builds segment files under a temporary data directory."""

    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.compressor = make_compressor("zlib", 6)

    def add_logs(self, job_id, kind, rows, name=None, base=0):
        directory = os.path.join(self.data_dir, "logs", job_id)
        path = os.path.join(directory, name or f"{kind}.log.gz")
        size = os.path.getsize(path) if os.path.exists(path) else 0
        thd_append_logs(
            path, directory, size, False, self.compressor, base,
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            [r[3] for r in rows],
        )
        return path

    def add_metrics(self, job_id, rows):
        directory = os.path.join(self.data_dir, "metrics", job_id)
        path = os.path.join(directory, "metrics.jsonl.gz")
        size = os.path.getsize(path) if os.path.exists(path) else 0
        thd_append_metrics(
            path, directory, size, False, self.compressor, 0, job_id,
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            [metric_payload(job_id, r[0], r[1]) for r in rows],
        )
        return path

    def add_events(self, job_id, kind, rows):
        event_kind = events.KINDS_BY_NAME[kind]
        directory = os.path.join(self.data_dir, "events", job_id)
        path = os.path.join(directory, event_kind.segment_name(0))
        size = os.path.getsize(path) if os.path.exists(path) else 0
        thd_append_events(
            path, directory, size, False, self.compressor, 0, job_id, event_kind,
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
            [event_payload(kind, r[0], r[1], pid=7) for r in rows],
        )
        return path

    def file_sizes(self, job_id):
        total = 0
        for top in ("logs", "metrics", "events"):
            directory = os.path.join(self.data_dir, top, job_id)
            if os.path.isdir(directory):
                total += sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
        return total


class RebuildTests(FilesTestCase):
    def test_rebuild_sums_headers(self):
        """Rebuild counts messages of all segments and kinds, sizes and timestamp span."""
        self.add_logs(JOB, "stdout", [(5 * NS, 1, 0, b"a"), (6 * NS, 2, 1, b"b")])
        self.add_logs(JOB, "stdout", [(9 * NS, 3, 4, b"c")], name="stdout_000001.log.gz")
        self.add_logs(JOB, "stderr", [(7 * NS, 1, 2, b"")])
        self.add_metrics(JOB, [(4 * NS, 1, 3)])
        jobs = jobindex.thd_rebuild(self.data_dir)
        got = jobs[JOB]
        self.assertEqual((got.log_count, got.metric_count), (4, 1))
        self.assertEqual((got.first_timestamp, got.last_timestamp), (4 * NS, 9 * NS))
        self.assertEqual(got.size_bytes, self.file_sizes(JOB))
        # created_at: the earlier of the first timestamp and the earliest mtime.
        self.assertEqual(got.created_at, 4)
        self.assertGreaterEqual(got.last_updated, int(os.path.getmtime(
            os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz"))))

    def test_rebuild_counts_events(self):
        """Rebuild finds an events-only job under events/ and counts its events per kind,
        in the sizes, the timestamp span and the events byte split."""
        self.add_events("ev-job", "exec", [(3 * NS, 1, 0), (5 * NS, 2, 1)])
        self.add_events("ev-job", "file", [(4 * NS, 1, 2)])
        load = jobindex.thd_open_index(self.data_dir)
        got = load.jobs["ev-job"]
        self.assertEqual((got.log_count, got.metric_count, got.event_count), (0, 0, 3))
        self.assertEqual(got.event_counts, {"exec": 2, "file": 1})
        self.assertEqual((got.first_timestamp, got.last_timestamp), (3 * NS, 5 * NS))
        self.assertEqual(got.size_bytes, self.file_sizes("ev-job"))
        self.assertEqual(load.parts["ev-job"], (0, 0, got.size_bytes))

    def test_rebuild_ignores_foreign_entries(self):
        """Directories that are not valid job ids and foreign files are ignored."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        os.makedirs(os.path.join(self.data_dir, "logs", ".trash"))
        with open(os.path.join(self.data_dir, "logs", "README"), "w") as f:
            f.write("x")
        with open(os.path.join(self.data_dir, "logs", JOB, "notes.txt"), "w") as f:
            f.write("x")
        self.assertEqual(list(jobindex.thd_rebuild(self.data_dir)), [JOB])
        self.assertEqual(jobindex.thd_rebuild(self.data_dir)[JOB].log_count, 1)

    def test_metrics_only_job(self):
        """A job with only metrics is found through metrics/."""
        self.add_metrics("metrics-only", [(3 * NS, 1, 0), (4 * NS, 2, 1)])
        got = jobindex.thd_rebuild(self.data_dir)["metrics-only"]
        self.assertEqual((got.log_count, got.metric_count), (0, 2))

    def test_legacy_file_counted(self):
        """A Go-era file (gzip JSON lines, no JP subfield) is counted by parsing it."""
        directory = os.path.join(self.data_dir, "logs", "legacy-job")
        os.makedirs(directory)
        lines = [
            {"job_id": "legacy-job", "stream": 1, "timestamp": 2 * NS, "sequence": 1,
             "content": base64.b64encode(b"old\n").decode()},
            {"job_uuid": "legacy-job", "stream": 2, "timestamp": 3 * NS, "sequence": 2,
             "content": base64.b64encode(b"older\n").decode()},
        ]
        data = b"".join(json.dumps(obj).encode() + b"\n" for obj in lines)
        with open(os.path.join(directory, "stdout.log.gz"), "wb") as f:
            f.write(gzip.compress(data))
        scan = jobindex.thd_scan_job(self.data_dir, "legacy-job", repair=False)
        got = scan.summary()
        self.assertEqual(got.log_count, 2)
        self.assertEqual((got.first_timestamp, got.last_timestamp), (2 * NS, 3 * NS))
        self.assertEqual(scan.ordinal_base(), 0)

    def test_ordinal_base(self):
        """The ordinal base is the largest stored ordinal + 1 across all kinds."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a"), (NS, 2, 5, b"b")], base=10)
        self.add_metrics(JOB, [(NS, 1, 3)])
        scan = jobindex.thd_scan_job(self.data_dir, JOB, repair=False)
        self.assertEqual(scan.ordinal_base(), 16)
        self.assertIsNone(jobindex.thd_scan_job(self.data_dir, "absent", repair=False))

    def test_scan_without_repair_leaves_torn_tail(self):
        """repair=False counts only complete members and modifies nothing."""
        path = self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        with open(path, "ab") as f:
            f.write(b"\x1f\x8b\x08\x04\x00")
        size = os.path.getsize(path)
        scan = jobindex.thd_scan_job(self.data_dir, JOB, repair=False)
        self.assertEqual(scan.summary().log_count, 1)
        self.assertEqual(scan.truncated, ())
        self.assertEqual(os.path.getsize(path), size)
        scan = jobindex.thd_scan_job(self.data_dir, JOB, repair=True)
        self.assertEqual(scan.truncated, (path,))
        self.assertEqual(os.path.getsize(path), size - 5)
        self.assertEqual(scan.summary().size_bytes, size - 5)


class OpenIndexTests(FilesTestCase):
    def test_missing_index_rebuilt(self):
        """No index: rebuilt from the files, flagged for writing."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        load = jobindex.thd_open_index(self.data_dir)
        self.assertTrue(load.rebuilt)
        self.assertTrue(load.needs_write)
        self.assertEqual(load.reason, "missing")
        self.assertEqual(load.jobs[JOB].log_count, 1)

    def test_corrupt_index_rebuilt(self):
        """A corrupt index is rebuilt and the reason says why."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        with open(jobindex.index_path(self.data_dir), "wb") as f:
            f.write(b'{"version": 1')
        load = jobindex.thd_open_index(self.data_dir)
        self.assertTrue(load.rebuilt)
        self.assertIn("corrupt", load.reason)
        self.assertEqual(list(load.jobs), [JOB])

    def test_stale_temporaries_removed(self):
        """Temporary files of an interrupted index write are removed on open."""
        stale = os.path.join(self.data_dir, ".job_index.json.abc123.tmp")
        with open(stale, "w") as f:
            f.write("{")
        jobindex.thd_open_index(self.data_dir)
        self.assertFalse(os.path.exists(stale))

    def test_stale_temporaries_of_every_state_file_removed(self):
        """A SIGKILL while the S3 manifest, the tier floors or the CloudWatch cursor is
        being replaced leaves its temporary file (the old file stays whole); opening the
        index at start removes those too, and nothing else: not the state files, not a
        foreign file, not another file's temporary."""
        from joblet_persist.archive import cloudwatch, layout, tier

        self.assertEqual(
            set(jobindex.STATE_FILENAMES),
            {jobindex.INDEX_FILENAME, layout.MANIFEST_FILENAME, tier.FLOORS_FILENAME,
             cloudwatch.CURSOR_FILENAME},
        )
        os.makedirs(self.data_dir, exist_ok=True)
        stale = [f".{name}.k3j_x9a2.tmp" for name in jobindex.STATE_FILENAMES]
        kept = ["archive_s3.json", "archive_tier.json", ".notes.tmp", ".other.json.k3j_x9a2.tmp"]
        for name in stale + kept:
            with open(os.path.join(self.data_dir, name), "w") as f:
                f.write("{")
        jobindex.thd_open_index(self.data_dir)
        left = set(os.listdir(self.data_dir))
        self.assertEqual(left & set(stale), set())
        self.assertEqual(left & set(kept), set(kept))

    def test_creates_data_dir(self):
        """A data directory that does not exist yet is created, with an empty index."""
        path = os.path.join(self.data_dir, "new", "dir")
        load = jobindex.thd_open_index(path)
        self.assertTrue(os.path.isdir(path))
        self.assertEqual(load.jobs, {})

    def test_fresh_index_not_rescanned(self):
        """Jobs not modified since the index was written are taken from the index as is."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        stored = info(log_count=1)
        jobindex.thd_write(
            jobindex.index_path(self.data_dir), {JOB: stored}, {JOB: (stored.size_bytes, 0)}
        )
        future = 4 * 10**18
        os.utime(jobindex.index_path(self.data_dir), ns=(future, future))
        scanned = []
        real = jobindex.thd_scan_job

        def record(data_dir, job_id, repair):
            scanned.append(job_id)
            return real(data_dir, job_id, repair)

        self.patch(jobindex, "thd_scan_job", record)
        load = jobindex.thd_open_index(self.data_dir)
        self.assertEqual((load.rebuilt, load.changed, scanned), (False, (), []))
        self.assertEqual(load.jobs[JOB], stored)

    def test_entry_without_parts_rescanned(self):
        """An entry without the logs/metrics byte split is rescanned to get it."""
        path = self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        size = os.path.getsize(path)
        jobindex.thd_write(
            jobindex.index_path(self.data_dir), {JOB: info(log_count=1, size_bytes=size)}
        )
        future = 4 * 10**18
        os.utime(jobindex.index_path(self.data_dir), ns=(future, future))
        load = jobindex.thd_open_index(self.data_dir)
        self.assertEqual(load.changed, (JOB,))
        self.assertEqual(load.parts, {JOB: (size, 0, 0)})
        self.assertEqual(load.jobs[JOB].created_at, 100)

    def test_stale_entries_refreshed(self):
        """New, modified and vanished jobs are brought up to date; created_at is kept."""
        self.add_logs(JOB, "stdout", [(NS, 1, 0, b"a")])
        self.add_logs("gone", "stdout", [(NS, 1, 0, b"a")])
        jobindex.thd_write(
            jobindex.index_path(self.data_dir),
            {
                JOB: info(created_at=42, last_updated=43, log_count=1),
                "gone": info("gone"),
                "vanished": info("vanished"),
            },
        )
        past = 10**18
        os.utime(jobindex.index_path(self.data_dir), ns=(past, past))
        shutil.rmtree(os.path.join(self.data_dir, "logs", "gone"))
        self.add_logs(JOB, "stdout", [(2 * NS, 2, 1, b"b")])
        self.add_metrics("new-job", [(NS, 1, 0)])
        load = jobindex.thd_open_index(self.data_dir)
        self.assertFalse(load.rebuilt)
        self.assertEqual(sorted(load.changed), sorted([JOB, "gone", "vanished", "new-job"]))
        self.assertEqual(sorted(load.jobs), sorted([JOB, "new-job"]))
        self.assertEqual(load.jobs[JOB].log_count, 2)
        self.assertEqual(load.jobs[JOB].created_at, 42)
        self.assertEqual(load.jobs["new-job"].metric_count, 1)


class IndexFileLayoutTests(SynchronousTestCase):
    def test_one_job_per_line_and_round_trip(self):
        """The index is compact JSON with one job per line, and reads back exactly; a job
        id that looks like the separator cannot break it (quotes are escaped in JSON)."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "job_index.json")
        ids = [f"5b1e8d2c-7f3a-4c19-8e6d-{n:012d}" for n in range(5)]
        jobs = {j: JobInfo(j, 1, 2, n, 4, 5, 6, 7) for n, j in enumerate(ids)}
        jobindex.thd_write(path, jobs, {j: (3, 2) for j in ids})
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual([ln[1:37] for ln in lines[1:6]], ids)
        self.assertEqual(jobindex.thd_load_parts(path), (jobs, {j: (3, 2, 0) for j in ids}))
        tricky = {'a},"b': JobInfo('a},"b', 1, 2, 3, 4, 5, 6, 7)}
        jobindex.thd_write(path, tricky)
        with open(path) as f:
            self.assertEqual(list(json.load(f)["jobs"]), ['a},"b'])
