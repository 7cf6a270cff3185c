"""Unit tests of the S3 archive: keys, sidecar, manifest, retention's guard, the shipper's rounds.

The shipper runs on a task.Clock with a synchronous thread runner and an injected
module of S3 calls that records what it is asked (no network; the real S3 API is
exercised by tests/integration/test_archive.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.archive import layout
from joblet_persist.archive.shipper import S3Shipper
from joblet_persist.config import RoutesConfig, config_from_string
from joblet_persist.retention import IArchivedCheck, JobUsage, RetentionPolicy, plan_retention
from joblet_persist.storage.api import JobInfo, Part, SegmentKind, SegmentUsage
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.format import encode_log_members
from joblet_persist.storage.segment import segment_name


def _members(n: int, start: int = 0) -> bytes:
    """``n`` single-message log members (each a complete gzip member)."""
    out = b""
    compressor = make_compressor("zlib", 6)
    for i in range(start, start + n):
        encoded = encode_log_members([i], [i], [i], [b"line %d\n" % i], compressor)
        out += b"".join(data for data, _info in encoded)
    return out


def _tempdir(testcase) -> str:
    path = tempfile.mkdtemp(prefix="jparc")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class KeyTests(SynchronousTestCase):
    def test_keys(self):
        """Objects live at ``{prefix}{node}/{job}/{kind}/{segment}``; the sidecar adds
        ``.members.json``; a job's prefix ends in ``/`` so it never matches a longer id."""
        key = layout.object_key("arch/", "n1", "job-1", SegmentKind.STDOUT, "stdout_000002.log.gz")
        self.assertEqual(key, "arch/n1/job-1/stdout/stdout_000002.log.gz")
        self.assertEqual(layout.sidecar_key(key), key + ".members.json")
        self.assertEqual(layout.job_prefix("arch/", "n1", "job-1"), "arch/n1/job-1/")

    def test_kinds_follow_the_enums(self):
        """No kind list is hard-coded: [] means every SegmentKind, a Part name its kinds."""
        self.assertEqual(layout.archived_kinds(()), tuple(SegmentKind))
        self.assertEqual(layout.archived_kinds(["logs"]),
                         (SegmentKind.STDOUT, SegmentKind.STDERR))
        self.assertEqual(layout.archived_kinds(["metrics"]), (SegmentKind.METRICS,))


class SidecarTests(SynchronousTestCase):
    def test_walk_stops_before_a_member_being_written(self):
        """The members of a segment are found by their headers; a torn last member (an
        append in progress) is left out, so the uploaded extent ends at a member boundary;
        the sidecar lists exactly those members and parses back."""
        whole = _members(3)
        extra = _members(1, 3)
        path = os.path.join(_tempdir(self), "stdout.log.gz")
        with open(path, "wb") as f:
            f.write(whole + extra[: len(extra) // 2])
        with open(path, "rb") as f:
            members, end = layout.walk_members(f, os.path.getsize(path))
        self.assertEqual(end, len(whole))
        self.assertEqual([m.count for m in members], [1, 1, 1])
        doc = layout.parse_sidecar(layout.sidecar_bytes("j", "n", "stdout", "stdout.log.gz",
                                                        end, members))
        self.assertEqual(doc["size"], len(whole))
        self.assertEqual([m["offset"] for m in doc["members"]],
                         [m.offset for m in members])
        self.assertEqual(doc["members"][2]["first_ordinal"], 2)
        self.assertEqual(doc["members"][0]["min_timestamp"], 0)

    def test_parse_sidecar_rejects_other_documents(self):
        """A JSON document that is not a sidecar of a known version is refused."""
        with self.assertRaises(ValueError):
            layout.parse_sidecar(b'{"format": "x", "version": 1}')


TARGET = ("bucket", "p/", "n1")


def _file(job="j", kind=SegmentKind.STDOUT, index=0, size=10, ino=1, mtime_ns=5, last=False):
    name = segment_name(kind, index)
    return layout.SegmentFile(job, kind, index, name, f"/x/{name}", size, ino, mtime_ns, last)


class ManifestTests(SynchronousTestCase):
    def test_match_needs_size_inode_and_mtime(self):
        """A recorded segment matches only the same size, inode and mtime: a file that
        grew, or was replaced, is due again."""
        m = layout.Manifest.empty(TARGET)
        f = _file()
        m.record(f.job_id, f.kind, f.name, f.stamp)
        self.assertTrue(m.matches(f))
        for changed in (_file(size=11), _file(ino=2), _file(mtime_ns=6)):
            self.assertFalse(m.matches(changed))

    def test_round_trip_and_other_target(self):
        """The manifest parses back to the same entries; one written for another bucket,
        prefix or node is ignored (everything is uploaded to the new target)."""
        m = layout.Manifest.empty(TARGET)
        m.record("j", "stdout", "stdout.log.gz", (1, 2, 3))
        m.deletes["gone"] = 7
        again = layout.Manifest.from_bytes(m.to_bytes(), TARGET)
        self.assertEqual((again.segments, again.deletes), (m.segments, m.deletes))
        other = layout.Manifest.from_bytes(m.to_bytes(), ("bucket", "p/", "n2"))
        self.assertEqual((other.segments, other.deletes), ({}, {}))
        with self.assertRaises(ValueError):
            layout.Manifest.from_bytes(b'{"version": 99}', TARGET)

    def test_prune_drops_files_no_longer_on_disk(self):
        """Entries of a scanned job's files that are gone are dropped; other jobs kept."""
        m = layout.Manifest.empty(TARGET)
        m.record("j", "stdout", "stdout.log.gz", (1, 1, 1))
        m.record("j", "stdout", "stdout_000001.log.gz", (1, 1, 1))
        m.record("k", "stdout", "stdout.log.gz", (1, 1, 1))
        self.assertTrue(m.prune({"j": [_file(index=1)]}))
        self.assertEqual(m.segments, {"j": {"stdout/stdout_000001.log.gz": [1, 1, 1]},
                                      "k": {"stdout/stdout.log.gz": [1, 1, 1]}})

    def test_write_is_atomic_and_replaces_a_symlink_not_its_target(self):
        """thd_write_manifest leaves no temporary file, and a symlink planted at the
        manifest's name is replaced, its target untouched."""
        d = _tempdir(self)
        target = os.path.join(d, "victim")
        with open(target, "w") as f:
            f.write("keep")
        os.symlink(target, layout.manifest_path(d))
        layout.thd_write_manifest(d, b'{"a": 1}\n')
        self.assertFalse(os.path.islink(layout.manifest_path(d)))
        self.assertEqual(layout.thd_read_manifest(d), b'{"a": 1}\n')
        with open(target) as f:
            self.assertEqual(f.read(), "keep")
        self.assertEqual(sorted(os.listdir(d)), sorted(["victim", layout.MANIFEST_FILENAME]))


class _Guard:
    """An IArchivedCheck answering from sets."""

    def __init__(self, parts=(), segments=()):
        self.parts = set(parts)
        self.segments = set(segments)

    def part_archived(self, job_id, part):
        return (job_id, part) in self.parts

    def segment_archived(self, job_id, kind, index):
        return (job_id, kind, index) in self.segments


class RetentionGuardTests(SynchronousTestCase):
    NOW = 1_800_000_000.0

    def job(self, job_id, idle, logs=100, metrics=10, segments=None):
        return JobUsage(job_id, self.NOW - idle, logs, metrics, segments)

    def test_guard_is_an_interface(self):
        """The guard is a zope Interface the shipper declares."""
        self.assertTrue(IArchivedCheck.implementedBy(S3Shipper))

    def test_age_spares_unarchived_jobs_and_parts(self):
        """Age deletes a job whole only when all its parts are archived, and a part only
        when that part is."""
        policy = RetentionPolicy(log_max_age=10, metric_max_age=10, active_window=1)
        guard = _Guard(parts={("all", Part.LOGS), ("all", Part.METRICS), ("logs", Part.LOGS)})
        jobs = [self.job("all", 100), self.job("logs", 100), self.job("none", 100)]
        plan = plan_retention(jobs, policy, self.NOW, archive=guard)
        self.assertEqual([(a.what, a.job_id) for a in plan.actions],
                         [("job", "all"), ("logs", "logs")])
        # Without an archive every one of them goes.
        self.assertEqual(plan_retention(jobs, policy, self.NOW).deleted_job_ids,
                         ["all", "logs", "none"])

    def test_cap_drops_only_archived_segments(self):
        """The per-job cap skips closed segments the archive has not taken."""
        segs = tuple(SegmentUsage(SegmentKind.STDOUT, i, 40, i == 3) for i in range(4))
        policy = RetentionPolicy(job_max_bytes=50)
        guard = _Guard(segments={("j", SegmentKind.STDOUT, 1)})
        plan = plan_retention([self.job("j", 0, logs=160, metrics=0, segments=segs)], policy,
                              self.NOW, archive=guard)
        self.assertEqual([a.segment.index for a in plan.actions], [1])

    def test_quota_and_free_floor_skip_unarchived_jobs(self):
        """Quota and the free-space floor delete only archived jobs; the rest is reported
        as shortfall."""
        policy = RetentionPolicy(total_max_bytes=100, min_free_bytes=1000, active_window=1)
        guard = _Guard(parts={("b", Part.LOGS), ("b", Part.METRICS)})
        jobs = [self.job("a", 100), self.job("b", 50)]
        plan = plan_retention(jobs, policy, self.NOW, free_bytes=0, archive=guard)
        self.assertEqual(plan.deleted_job_ids, ["b"])
        self.assertGreater(plan.shortfall_bytes, 0)


# -- the shipper, on a clock with injected S3 calls ---------------------------------


class _S3Calls:
    """The module interface the shipper uses (archive/s3.py), recording calls."""

    LocalUnreadable = type("LocalUnreadable", (Exception,), {})
    NoCompleteMember = type("NoCompleteMember", (Exception,), {})
    UploadCancelled = type("UploadCancelled", (Exception,), {})

    def __init__(self):
        self.objects: dict = {}
        self.fail: Exception | None = None
        self.uploads = []
        self.deleted_prefixes = []
        self.modified: dict = {}  # key -> wall time of its last write
        self.now = lambda: 0.0

    def thd_upload_segment(self, client, cfg, node_id, f, stopping):
        if self.fail is not None:
            raise self.fail
        with open(f.path, "rb") as fh:
            data = fh.read()
        if data.startswith(b"torn"):
            raise self.NoCompleteMember(f.path)
        key = layout.object_key(cfg.prefix, node_id, f.job_id, f.kind, f.name)
        self.objects[key] = data
        self.modified[key] = self.now()
        self.uploads.append(key)
        st = os.stat(f.path)
        return type("Up", (), {"size": len(data),
                               "stamp": (st.st_size, st.st_ino, st.st_mtime_ns)})()

    def thd_job_ages(self, client, bucket, node_prefix):
        if self.fail is not None:
            raise self.fail
        ages = {}
        for key in self.objects:
            job = layout.job_of_key(node_prefix, key)
            if job is not None:
                ages[job] = max(ages.get(job, 0.0), self.modified.get(key, 0.0))
        return ages

    def thd_delete_prefix(self, client, bucket, prefix):
        if self.fail is not None:
            raise self.fail
        keys = [k for k in self.objects if k.startswith(prefix)]
        for k in keys:
            del self.objects[k]
        self.deleted_prefixes.append(prefix)
        return len(keys)


class _Storage:
    def __init__(self):
        self.infos = {}

    def list_jobs(self):
        return tuple(self.infos[j] for j in sorted(self.infos))

    def job_info(self, job_id):
        return self.infos.get(job_id)


def _sync_run(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class ShipperTests(SynchronousTestCase):
    def setUp(self):
        self.dir = _tempdir(self)
        self.clock = task.Clock()
        self.wall = [1_800_000_000.0]
        self.s3 = _S3Calls()
        self.s3.now = lambda: self.wall[0]
        self.storage = _Storage()
        self.shipper = self.make_shipper()

    def make_shipper(self, extra: str = "") -> S3Shipper:
        """A shipper for ``archive.s3`` with the test's settings plus ``extra`` keys."""
        cfg = config_from_string(
            "server: {nodeId: n1}\n"
            "archive: {s3: {enabled: true, bucket: b, prefix: 'p/', interval: 10s,"
            " uploadIdleAfter: 60s, retryInitial: 1s, retryMax: 8s,"
            " backlogUnhealthyBytes: 100" + extra + "}}\n"
        ).archive.s3
        return S3Shipper(cfg, "n1", self.dir, self.storage, self.clock, _sync_run,
                         s3=self.s3, make_client=lambda cfg: object(),
                         wall=lambda: self.wall[0], jitter=lambda: 0.5)

    def write(self, job, name, data, age, top="logs"):
        """A segment file of ``job`` last written ``age`` seconds ago (wall clock)."""
        d = os.path.join(self.dir, top, job)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name)
        with open(path, "ab") as f:
            f.write(data)
        t = self.wall[0] - age
        os.utime(path, (t, t))
        self.storage.infos[job] = JobInfo(job, 0, int(t), 1, 0, 0, 0, 0)
        return path

    def test_closed_now_open_when_idle_regrown_again(self):
        """A round uploads closed segments at once and the open one only once the job is
        idle for uploadIdleAfter; an open segment that grows after its upload is uploaded
        again; the manifest on disk records what was taken."""
        self.write("j", "stdout.log.gz", b"a" * 10, age=5)
        self.write("j", "stdout_000001.log.gz", b"b" * 10, age=5)
        self.shipper.start()
        self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"])
        self.assertEqual(self.shipper.backlog_bytes, 0)
        self.wall[0] += 60
        self.clock.advance(10)
        self.assertEqual(self.s3.uploads[-1], "p/n1/j/stdout/stdout_000001.log.gz")
        on_disk = json.loads(layout.thd_read_manifest(self.dir))
        self.assertEqual(sorted(on_disk["segments"]["j"]),
                         ["stdout/stdout.log.gz", "stdout/stdout_000001.log.gz"])
        self.write("j", "stdout_000001.log.gz", b"c" * 5, age=0)  # active again
        self.clock.advance(10)
        self.assertEqual(len(self.s3.uploads), 2)
        self.assertEqual(self.shipper.backlog_bytes, 0, "an active open segment is not due")
        self.wall[0] += 61
        self.clock.advance(10)
        self.assertEqual(len(self.s3.uploads), 3)
        self.assertEqual(self.s3.objects["p/n1/j/stdout/stdout_000001.log.gz"], b"b" * 10 + b"c" * 5)

    def test_failures_back_off_with_jitter_and_degrade_health(self):
        """While S3 fails, retries wait retryInitial doubling to retryMax (x jitter, here
        x1.0); the backlog stays measured every round and health turns unhealthy past
        backlogUnhealthyBytes; once S3 answers again everything is uploaded."""
        self.write("j", "stdout.log.gz", b"a" * 200, age=5)
        self.write("j", "stdout_000001.log.gz", b"b", age=5)
        self.s3.fail = ConnectionError("refused")
        self.shipper.start()
        self.assertEqual(self.shipper.upload_errors, 1)
        self.assertEqual(self.shipper._retry_at, 1.0)
        ok, detail, extra = self.shipper.health_check()
        self.assertFalse(ok)
        self.assertIn("backlogUnhealthyBytes", detail)
        self.assertEqual(extra["backlog_bytes"], 200)
        delays = []
        for _ in range(5):
            before = self.shipper.upload_errors
            while self.shipper.upload_errors == before:
                self.clock.advance(1)
            delays.append(self.shipper._retry_at - self.clock.seconds())
        self.assertEqual(delays, [2.0, 4.0, 8.0, 8.0, 8.0])
        self.s3.fail = None
        self.clock.advance(10)
        self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"])
        self.assertTrue(self.shipper.health_check()[0])

    def test_guard_answers_from_scan_and_manifest(self):
        """segment_archived and part_archived are True only for what is uploaded as it is
        on disk; a job written since the scan is not known to be archived."""
        self.write("j", "stdout.log.gz", b"a", age=100)
        self.write("j", "stdout_000001.log.gz", b"b", age=100)
        self.shipper.start()
        self.assertTrue(self.shipper.segment_archived("j", SegmentKind.STDOUT, 0))
        self.assertTrue(self.shipper.segment_archived("j", SegmentKind.STDOUT, 1))
        self.assertFalse(self.shipper.segment_archived("j", SegmentKind.STDOUT, 2))
        self.assertTrue(self.shipper.part_archived("j", Part.LOGS))
        self.assertTrue(self.shipper.part_archived("j", Part.METRICS))  # nothing to take
        self.assertFalse(self.shipper.part_archived("unknown", Part.LOGS))
        self.write("j", "stdout_000001.log.gz", b"c", age=0)
        self.assertFalse(self.shipper.part_archived("j", Part.LOGS))

    def test_delete_is_durable_first_then_carried_out_and_retried(self):
        """DeleteJob's deletion is in the manifest on disk before it is acknowledged, the
        job is not uploaded again meanwhile, and the deletion is retried until S3 takes it."""
        self.write("j", "stdout.log.gz", b"a", age=5)
        self.write("j", "stdout_000001.log.gz", b"b", age=5)
        self.shipper.start()
        self.s3.fail = ConnectionError("refused")
        # DeleteJob removes the job locally first (tap.build_queries), then here.
        shutil.rmtree(os.path.join(self.dir, "logs", "j"))
        del self.storage.infos["j"]
        done = self.shipper.delete_job("j")
        self.assertTrue(done.called)
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        self.clock.advance(10)
        self.assertEqual(self.s3.deleted_prefixes, [])
        self.s3.fail = None
        self.clock.advance(10)
        self.assertEqual(self.s3.deleted_prefixes, ["p/n1/j/"])
        self.assertEqual(self.s3.objects, {})
        # The tombstone stays until a second listing, 2 x requestTimeout + interval later,
        # finds nothing.
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        self.clock.advance(130)
        self.assertEqual(self.s3.deleted_prefixes, ["p/n1/j/", "p/n1/j/"])
        self.assertEqual(json.loads(layout.thd_read_manifest(self.dir))["deletes"], {})

    def test_an_object_landing_after_the_deletion_is_deleted_by_the_second_pass(self):
        """An upload request that failed on our side may still be carried out by the store
        after the deletion's listing: the tombstone keeps the job's uploads off and a second
        listing, 2 x requestTimeout + interval later, deletes what landed; only a listing
        that finds nothing ends the tombstone."""
        self.write("j", "stdout.log.gz", b"a", age=5)
        self.write("j", "stdout_000001.log.gz", b"b", age=5)
        self.shipper.start()
        shutil.rmtree(os.path.join(self.dir, "logs", "j"))
        del self.storage.infos["j"]
        self.shipper.delete_job("j")
        self.clock.advance(10)
        self.assertEqual(self.s3.objects, {})
        self.s3.objects["p/n1/j/stdout/stdout_000001.log.gz"] = b"late"  # a late request
        self.clock.advance(100)
        self.assertIn("p/n1/j/stdout/stdout_000001.log.gz", self.s3.objects)
        self.clock.advance(30)
        self.assertEqual(self.s3.objects, {})
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        self.clock.advance(130)
        self.assertEqual(json.loads(layout.thd_read_manifest(self.dir))["deletes"], {})
        self.assertEqual(self.s3.deleted_prefixes, ["p/n1/j/"] * 3)

    def test_delete_racing_an_upload_resurrects_nothing(self):
        """DeleteJob arrives while one of the job's segments is being uploaded and its
        local files are still being deleted: the upload in flight ends but is not
        recorded, no other segment of the job is uploaded, the objects are not deleted
        while DeleteJob holds the deletion, and once it releases them the listing (made
        after the upload ended) removes every object, the one of the racing upload too;
        nothing of the job is uploaded afterwards."""
        for i in range(3):
            self.write("j", segment_name(SegmentKind.STDOUT, i), b"x%d" % i, age=100 - i)
        self.write("k", "stdout.log.gz", b"k", age=100)
        pending = []
        real_upload = self.s3.thd_upload_segment

        def run(f, *args, **kwargs):
            if f == self.s3.thd_upload_segment and args[3].job_id == "j" and not pending:
                d = defer.Deferred()
                pending.append((d, args))
                return d
            return defer.maybeDeferred(f, *args, **kwargs)

        self.shipper._run = run
        self.shipper.start()
        self.assertEqual(len(pending), 1)  # j's first segment is on its way
        durable = self.shipper.delete_job("j", hold=True)
        self.assertTrue(durable.called)
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        d, args = pending[0]
        d.callback(real_upload(*args))  # the racing upload lands in the bucket
        self.assertIn("p/n1/j/stdout/stdout.log.gz", self.s3.objects)
        self.assertEqual([u for u in self.s3.uploads if "/j/" in u],
                         ["p/n1/j/stdout/stdout.log.gz"])
        self.assertNotIn("j", json.loads(layout.thd_read_manifest(self.dir))["segments"])
        self.clock.advance(10)  # local deletion still running: objects stay for now
        self.assertEqual(self.s3.deleted_prefixes, [])
        shutil.rmtree(os.path.join(self.dir, "logs", "j"))
        del self.storage.infos["j"]
        self.shipper.release_delete("j")
        self.clock.advance(10)
        self.assertEqual(self.s3.deleted_prefixes, ["p/n1/j/"])
        self.assertEqual(sorted(self.s3.objects), ["p/n1/k/stdout/stdout.log.gz"])
        self.clock.advance(130)
        self.assertEqual(sorted(self.s3.objects), ["p/n1/k/stdout/stdout.log.gz"])
        self.assertEqual(json.loads(layout.thd_read_manifest(self.dir))["deletes"], {})

    def test_a_second_delete_during_the_deletion_keeps_the_tombstone(self):
        """A DeleteJob that comes (and holds) while the job's objects are being deleted
        keeps the tombstone: it is not dropped by the deletion that started before."""
        self.write("j", "stdout.log.gz", b"a", age=100)
        self.write("j", "stdout_000001.log.gz", b"b", age=100)
        self.shipper.start()
        self.shipper.delete_job("j")
        real = self.s3.thd_delete_prefix

        def delete_prefix(client, bucket, prefix):
            self.shipper.delete_job("j", hold=True)  # arrives while S3 deletes
            return real(client, bucket, prefix)

        self.s3.thd_delete_prefix = delete_prefix
        self.clock.advance(10)
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        self.s3.thd_delete_prefix = real
        self.shipper.release_delete("j")
        self.clock.advance(10)
        self.assertIn("j", json.loads(layout.thd_read_manifest(self.dir))["deletes"])
        self.clock.advance(130)
        self.assertEqual(json.loads(layout.thd_read_manifest(self.dir))["deletes"], {})

    def test_max_age_deletes_old_archived_jobs_no_longer_on_disk(self):
        """archive.s3.maxAge: a job whose newest object is older and that has no local
        files is deleted from the archive (counted); a job still on disk, a job written
        within maxAge, and every job when maxAge is 0 are kept; the bucket is listed at
        most once per retentionInterval."""
        self.shipper = self.make_shipper(", maxAge: 1h, retentionInterval: 100s")
        self.s3.objects.update({"p/n1/gone/stdout/stdout.log.gz": b"a",
                                "p/n1/gone/stdout/stdout.log.gz.members.json": b"{}",
                                "p/n1/young/stdout/stdout.log.gz": b"y",
                                "p/n2/gone/stdout/stdout.log.gz": b"other node"})
        old = self.wall[0] - 7200
        self.s3.modified.update({k: old for k in self.s3.objects})
        self.s3.modified["p/n1/young/stdout/stdout.log.gz"] = self.wall[0] - 60
        self.write("local", "stdout.log.gz", b"l", age=7200)
        self.write("local", "stdout_000001.log.gz", b"l", age=7200)
        listed = []
        real = self.s3.thd_job_ages

        def ages(*args):
            listed.append(self.clock.seconds())
            return real(*args)

        self.s3.thd_job_ages = ages
        self.shipper.start()
        for key in self.s3.objects:
            if "/local/" in key:
                self.s3.modified[key] = old  # as if archived long ago
        self.assertEqual(sorted(self.s3.objects), [
            "p/n1/local/stdout/stdout.log.gz", "p/n1/local/stdout/stdout_000001.log.gz",
            "p/n1/young/stdout/stdout.log.gz", "p/n2/gone/stdout/stdout.log.gz"])
        self.assertEqual(self.shipper.expired_jobs, 1)
        self.clock.advance(10)
        self.clock.advance(90)
        self.assertEqual(listed, [0, 100])
        self.assertIn("p/n1/local/stdout/stdout.log.gz", self.s3.objects)
        self.wall[0] += 3600
        self.clock.advance(100)
        self.assertNotIn("p/n1/young/stdout/stdout.log.gz", self.s3.objects)
        self.assertIn("p/n1/local/stdout/stdout.log.gz", self.s3.objects)
        self.assertEqual(self.shipper.expired_jobs, 2)

        forever = self.make_shipper()
        forever.start()
        forever.stop()
        self.assertEqual(listed, [0, 100, 200])  # maxAge 0: never listed

    def route_shipper(self, routes: str) -> S3Shipper:
        return self.make_shipper(", routes: {" + routes + "}")

    def test_route_durable_uploads_the_open_segment_as_it_grows(self):
        """routes.logs: durable uploads a job's open segment in the first round and
        again every round in which it grew, while metrics (close) wait for idle."""
        self.shipper = self.route_shipper("logs: durable")
        self.write("j", "stdout.log.gz", b"a", age=0)
        self.write("j", "metrics.jsonl.gz", b"m", age=0, top="metrics")
        self.shipper.start()
        self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"])
        self.clock.advance(10)
        self.assertEqual(len(self.s3.uploads), 1, "unchanged: not uploaded again")
        self.write("j", "stdout.log.gz", b"b", age=0)
        self.clock.advance(10)
        self.assertEqual(self.s3.objects["p/n1/j/stdout/stdout.log.gz"], b"ab")
        self.assertNotIn("p/n1/j/metrics/metrics.jsonl.gz", self.s3.objects)

    def test_a_segment_without_a_complete_member_is_never_an_object(self):
        """A crash can leave a segment empty, or holding only a torn first member, until the
        job is loaded: neither becomes an (empty) object, neither is recorded, and the
        segment is uploaded once it holds a member."""
        self.shipper = self.route_shipper("logs: durable")
        self.write("j", "stdout.log.gz", b"", age=100)
        self.write("j", "stderr.log.gz", b"torn", age=100)
        self.shipper.start()
        self.assertEqual(self.s3.objects, {})
        self.assertEqual(self.shipper.backlog_segments, 0)
        self.assertFalse(self.shipper.segment_archived("j", SegmentKind.STDOUT, 0))
        self.write("j", "stdout.log.gz", b"a", age=0)
        self.clock.advance(10)
        self.assertEqual(list(self.s3.objects), ["p/n1/j/stdout/stdout.log.gz"])

    def test_upload_of_a_segment_with_only_a_torn_member_sends_nothing(self):
        """thd_upload_segment refuses a file whose first member is torn before it makes any
        S3 call (the client here would fail on any call)."""
        from joblet_persist.archive import s3

        path = os.path.join(_tempdir(self), "stdout.log.gz")
        whole = _members(1)
        with open(path, "wb") as fh:
            fh.write(whole[: len(whole) // 2])
        f = layout.SegmentFile("j", SegmentKind.STDOUT, 0, "stdout.log.gz", path,
                               os.path.getsize(path), 1, 1, True)
        cfg = config_from_string("server: {nodeId: n1}\narchive: {s3: {enabled: true, bucket: b}}\n").archive.s3
        with self.assertRaises(s3.NoCompleteMember):
            s3.thd_upload_segment(None, cfg, "n1", f, threading.Event())

    def test_route_idle_waits_for_the_whole_job_to_be_idle(self):
        """routes.logs: idle uploads even closed segments only once the job had no write
        for uploadIdleAfter (a write to another kind of the job counts too); close (the
        default) uploads closed segments at once."""
        self.shipper = self.route_shipper("logs: idle")
        self.write("j", "stdout.log.gz", b"a", age=100)
        self.write("j", "stdout_000001.log.gz", b"b", age=100)
        self.write("j", "metrics.jsonl.gz", b"m", age=100, top="metrics")
        self.write("j", "metrics_000001.jsonl.gz", b"m", age=0, top="metrics")
        self.shipper.start()
        self.assertEqual(self.s3.uploads, ["p/n1/j/metrics/metrics.jsonl.gz"])
        self.assertFalse(self.shipper.segment_archived("j", SegmentKind.STDOUT, 0))
        self.wall[0] += 61
        self.clock.advance(10)
        self.assertEqual(sorted(self.s3.uploads), [
            "p/n1/j/metrics/metrics.jsonl.gz", "p/n1/j/metrics/metrics_000001.jsonl.gz",
            "p/n1/j/stdout/stdout.log.gz", "p/n1/j/stdout/stdout_000001.log.gz"])

    def test_route_never_skips_the_kind_and_retention_does_not_wait(self):
        """routes.metrics: never: metrics are neither scanned nor uploaded, and retention
        is free to delete them (the archive does not wait for what it never takes)."""
        self.shipper = self.route_shipper("metrics: never")
        self.write("j", "metrics.jsonl.gz", b"m", age=100, top="metrics")
        self.write("j", "metrics_000001.jsonl.gz", b"m", age=100, top="metrics")
        self.write("j", "stdout.log.gz", b"a", age=100)
        self.shipper.start()
        self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"])
        self.assertTrue(self.shipper.segment_archived("j", SegmentKind.METRICS, 0))
        self.assertTrue(self.shipper.part_archived("j", Part.METRICS))

    def test_archived_jobs_are_not_listed_again_until_written(self):
        """A job found fully archived (and not written since) is not rescanned each round;
        a write (a new last_updated) makes the next round list it again."""
        scanned = []
        real = layout.thd_scan_jobs

        def run(f, *args, **kwargs):
            if f is real:
                scanned.append(sorted(args[1]))
            return defer.maybeDeferred(f, *args, **kwargs)

        self.shipper._run = run
        self.write("j", "stdout.log.gz", b"a", age=500)
        self.write("k", "stdout.log.gz", b"a", age=0)
        self.shipper.start()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(scanned, [["j", "k"], ["k"], ["k"]])
        self.write("j", "stdout_000001.log.gz", b"b", age=0)
        self.clock.advance(10)
        self.assertEqual(scanned[-1], ["j", "k"])
        # j's first segment, now closed, did not change: it is not uploaded twice.
        self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"])

    def test_manifest_written_when_uploads_end_by_failure(self):
        """The manifest is rewritten at most once per manifest_interval during uploads, and
        always when they end, also by an S3 failure: what was taken is on disk."""
        for i in range(4):
            self.write("j", segment_name(SegmentKind.STDOUT, i), b"x", age=100 - i)
        self.shipper.manifest_interval = 1000
        calls = []
        real = self.s3.thd_upload_segment

        def upload(client, cfg, node_id, f, stopping):
            calls.append(f.name)
            if len(calls) == 3:
                raise ConnectionError("reset")
            return real(client, cfg, node_id, f, stopping)

        self.s3.thd_upload_segment = upload
        self.shipper.start()
        on_disk = json.loads(layout.thd_read_manifest(self.dir))["segments"]["j"]
        self.assertEqual(sorted(on_disk), ["stdout/stdout.log.gz", "stdout/stdout_000001.log.gz"])

    def test_damaged_or_planted_manifest_means_uploading_again(self):
        """A manifest that is not JSON, or a symlink planted at its name, is logged and
        replaced: the shipper starts and uploads every segment again."""
        self.write("j", "stdout.log.gz", b"a", age=5)
        self.write("j", "stdout_000001.log.gz", b"b", age=5)
        for plant in ("garbage", "symlink"):
            path = layout.manifest_path(self.dir)
            if os.path.lexists(path):
                os.unlink(path)
            if plant == "garbage":
                with open(path, "wb") as f:
                    f.write(b"\xff not json")
            else:
                os.symlink(os.path.join(self.dir, "elsewhere"), path)
            self.s3.uploads.clear()
            shipper = S3Shipper(self.shipper._cfg, "n1", self.dir, self.storage, self.clock,
                                _sync_run, s3=self.s3, make_client=lambda cfg: object(),
                                wall=lambda: self.wall[0], jitter=lambda: 0.5)
            shipper.start()
            shipper.stop()
            self.assertEqual(self.s3.uploads, ["p/n1/j/stdout/stdout.log.gz"], plant)
            self.assertFalse(os.path.islink(path))
            self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stop_waits_for_the_round_and_sets_the_cancel_flag(self):
        """stop() stops the rounds, sets the flag multipart uploads check between parts,
        and waits for an upload in flight."""
        self.write("j", "stdout.log.gz", b"a", age=5)
        self.write("j", "stdout_000001.log.gz", b"b", age=5)
        pending = defer.Deferred()
        seen = []

        def run(f, *args, **kwargs):
            if f == self.s3.thd_upload_segment:
                seen.append(args[-1])
                return pending
            return defer.maybeDeferred(f, *args, **kwargs)

        self.shipper._run = run
        self.shipper.start()
        stopped = self.shipper.stop()
        self.assertIsInstance(seen[0], threading.Event)
        self.assertTrue(seen[0].is_set())
        self.assertFalse(stopped.called)
        pending.errback(self.s3.UploadCancelled())
        self.assertTrue(stopped.called)


# -- configuration and wiring ----------------------------------------------------------

from tests.test_config import ConfigErrorMixin  # noqa: E402

_ON = "server: {nodeId: n1}\narchive:\n  s3:\n    enabled: true\n    bucket: b\n"


class ArchiveConfigTests(SynchronousTestCase, ConfigErrorMixin):
    def test_defaults_off(self):
        """Archiving is off by default, every data kind when on, 5-minute idle upload."""
        s3 = config_from_string("").archive.s3
        self.assertFalse(s3.enabled)
        self.assertEqual((s3.kinds, s3.upload_idle_after, s3.sse), ((), 300.0, "none"))

    def test_errors_name_the_key(self):
        """Each invalid archive setting is an error naming its key (and the file)."""
        self.assertConfigError("archive: {s3: {enabled: true}}", "archive.s3.bucket",
                               "must be set")
        self.assertConfigError("archive: {s3: {enabled: true, bucket: b}}", "server.nodeId",
                               "object key")
        self.assertConfigError("server: {nodeId: a/b}\narchive: {s3: {enabled: true, bucket: b}}",
                               "server.nodeId", "'/'")
        self.assertConfigError("archive: {s3: {kinds: [logs, traces]}}", "archive.s3.kinds",
                               "traces", "logs, metrics")
        self.assertConfigError("archive: {s3: {kinds: logs}}", "archive.s3.kinds", "list")
        self.assertConfigError("archive: {s3: {multipartThreshold: 1MiB}}",
                               "archive.s3.multipartThreshold", "at least")
        self.assertConfigError("archive: {s3: {sse: rot13}}", "archive.s3.sse", "sse-kms")
        self.assertConfigError(_ON + "    sseKmsKeyId: k\n", "archive.s3.sse", "sse-kms")
        self.assertConfigError("archive: {s3: {bucket: 5}}", "archive.s3.bucket", "string")
        self.assertConfigError("archive: {s3: {region2: x}}", "archive.s3.region2", "unknown key")

    def test_routes_default_and_from_kinds(self):
        """Every kind is routed 'close' by default; the older kinds list becomes the
        same routes (listed: close, not listed: never); routes are read as written."""
        self.assertEqual(config_from_string("").archive.s3.routes,
                         RoutesConfig("close", "close", "close"))
        self.assertEqual(
            [f.name for f in dataclasses.fields(RoutesConfig)], [p.value for p in Part])
        kinds = config_from_string("archive: {s3: {kinds: [logs]}}").archive.s3.routes
        self.assertEqual(kinds, RoutesConfig("close", "never", "never"))
        routes = config_from_string(
            "archive: {s3: {routes: {logs: durable, metrics: idle, events: never}}}"
        ).archive.s3.routes
        self.assertEqual((routes.mode(Part.LOGS), routes.mode("metrics"), routes.events),
                         ("durable", "idle", "never"))
        wrapped = config_from_string(
            "persist:\n  archive: {s3: {routes: {events: never}}}\n").archive.s3.routes
        self.assertEqual(wrapped.events, "never")

    def test_route_errors_name_the_key(self):
        """A bad route, an unknown kind, and kinds together with routes are errors naming
        the key (both keys for the last), in the file and under persist: too."""
        self.assertConfigError("archive: {s3: {routes: {logs: sometimes}}}",
                               "archive.s3.routes.logs", "durable, close, idle, never")
        self.assertConfigError("archive: {s3: {routes: {traces: close}}}",
                               "archive.s3.routes.traces", "unknown key", "logs, metrics, events")
        self.assertConfigError("archive: {s3: {routes: [logs]}}", "archive.s3.routes", "mapping")
        self.assertConfigError("archive: {s3: {kinds: [logs], routes: {logs: close}}}",
                               "archive.s3.kinds", "archive.s3.routes", "not both")
        self.assertConfigError("archive: {s3: {kinds: [], routes: {}}}",
                               "archive.s3.kinds", "archive.s3.routes")
        self.assertConfigError(
            "persist:\n  archive: {s3: {kinds: [logs], routes: {logs: idle}}}\n",
            "persist.archive.s3.kinds", "persist.archive.s3.routes")
        self.assertConfigError("archive: {s3: {maxAge: soon}}", "archive.s3.maxAge", "duration")
        self.assertConfigError("archive: {s3: {retentionInterval: 0}}",
                               "archive.s3.retentionInterval", "greater than 0")

    def test_aliases(self):
        """sse accepts the S3 header values too."""
        cfg = config_from_string(_ON + "    sse: aws:kms\n    sseKmsKeyId: k\n").archive.s3
        self.assertEqual(cfg.sse, "sse-kms")


class ArchiveMetricsDocumentedTests(SynchronousTestCase):
    def test_every_archive_metric_documented(self):
        """docs/operations.md lists every metric an archive exports."""
        from prometheus_client import CollectorRegistry

        from joblet_persist.metrics import PersistMetrics

        m = PersistMetrics(CollectorRegistry(), process=False)
        source = type("S", (), {"backlog_bytes": 0, "backlog_segments": 0,
                                "oldest_unarchived_seconds": lambda self: 0.0})()
        m.archive("s3", source)
        names = {f.name + ("_total" if f.type == "counter" else "")
                 for f in m.registry.collect() if f.name.startswith("persist_archive")}
        self.assertEqual(len(names), 8)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "docs", "operations.md")) as f:
            doc = f.read()
        self.assertEqual(sorted(n for n in names if f"`{n}`" not in doc), [])


class WiringTests(SynchronousTestCase):
    def setUp(self):
        self.dir = _tempdir(self)

    def build(self, extra: str):
        from prometheus_client import CollectorRegistry
        from twisted.internet.testing import MemoryReactorClock

        from joblet_persist import tap

        text = (f"server: {{grpcSocket: {self.dir}/g.sock, nodeId: n1}}\n"
                f"ipc: {{socket: {self.dir}/i.sock}}\n"
                f"storage: {{dataDir: {self.dir}/data}}\n"
                "monitoring: {enabled: false}\n" + extra)
        return tap.build_service(config_from_string(text), MemoryReactorClock(),
                                 registry=CollectorRegistry())

    def test_archive_services_start_after_retention_and_stop_before_the_pool(self):
        """With archive.s3 on, its pool and shipper start after retention (storage and the
        writer run) and stop before them; health has an 'archive' check; retention is
        guarded by the shipper."""
        root = self.build("archive: {s3: {enabled: true, bucket: b}}\n")
        names = [child.name for child in root]
        self.assertEqual(names[names.index("retention") + 1:names.index("grpc")],
                         ["archive-pool", "archive"])
        shipper = root.components["archive"]
        self.assertIsInstance(shipper, S3Shipper)
        self.assertIs(root.components["retention"]._archive, shipper)
        self.assertIn("archive", root.components["health"]._checks)

    def test_delete_job_records_the_tombstone_before_deleting_locally(self):
        """DeleteJob with an archive: the archive's deletion is in the manifest on disk
        before the writer discards and storage deletes anything (a crash in between
        cannot leave the job archived-only), and the objects are held back until the
        local deletion has ended, then released."""
        root = self.build("archive: {s3: {enabled: true, bucket: b}}\n")
        shipper = root.components["archive"]
        shipper._run = _sync_run
        os.makedirs(f"{self.dir}/data")
        seen = []
        local = defer.Deferred()

        def deletes_on_disk():
            data = layout.thd_read_manifest(f"{self.dir}/data")
            return sorted(json.loads(data)["deletes"]) if data else []

        def discard(job_id):
            seen.append(("discard", deletes_on_disk()))
            return defer.succeed(None)

        def delete(job_id):
            seen.append(("delete", deletes_on_disk(), dict(shipper._held)))
            return local

        root.components["writer"].discard_job = discard
        root.components["storage"].delete_job = delete
        done = root.components["servicer"]._delete_job("j")
        self.assertEqual(seen, [("discard", ["j"]), ("delete", ["j"], {"j": 1})])
        self.assertNoResult(done)
        local.callback(123)
        self.assertEqual(self.successResultOf(done), 123)
        self.assertEqual(shipper._held, {})

    def test_off_builds_nothing_and_imports_no_boto3(self):
        """With archiving off (the default) no archive service exists and building the whole
        service does not import boto3 (checked in a fresh interpreter)."""
        root = self.build("")
        self.assertNotIn("archive", [child.name for child in root])
        self.assertIsNone(root.components["archive"])
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from prometheus_client import CollectorRegistry\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from joblet_persist import tap\n"
            "from joblet_persist.config import config_from_string\n"
            f"c = config_from_string('storage: {{dataDir: {self.dir}/d2}}\\n"
            f"ipc: {{socket: {self.dir}/i2.sock}}\\nserver: {{grpcSocket: {self.dir}/g2.sock}}')\n"
            "tap.build_service(c, MemoryReactorClock(), registry=CollectorRegistry())\n"
            "print('boto3' in sys.modules, 'botocore' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(out.stdout.strip(), "False False", out.stderr)
