"""Tiering: TieredStorage reads what local retention released from a real S3 server.

A moto server (tests/moto_sync.py) runs for each class; segments are uploaded by the
real shipper (archive/shipper.py, archive/s3.py) with synchronous runners, so every
Deferred here fires at once and no reactor runs.  The storage contract suite runs
against TieredStorage as it runs against LocalStorage and FakeStorage.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from joblet_persist.archive import layout
from joblet_persist.archive import s3 as s3mod
from joblet_persist.archive.shipper import S3Shipper
from joblet_persist.archive.tier import ArchiveSource
from joblet_persist.config import S3ArchiveConfig
from joblet_persist.metrics import PersistMetrics
from joblet_persist.retention import RetentionPolicy, RetentionRunner
from joblet_persist.storage.api import (
    STREAM_STDERR,
    STREAM_STDOUT,
    DataVanished,
    ILocalTier,
    IOrdinalBase,
    IRemoteNodes,
    Part,
    SegmentKind,
    StorageUnavailable,
)
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.local import LocalStorage
from joblet_persist.storage.tiered import TieredStorage
from tests import moto_sync
from tests.moto_sync import _free_port
from tests.storage_contract import (
    StorageBackendContractMixin,
    event_batch,
    event_payload,
    log_batch,
)
from tests.test_storage_local import START, sync_runner

JOB = "7a3c9e1d-2b4f-4c6a-8e0d-tiered000001"
PREFIX = "arch/"
T0 = 1_700_000_000_000_000_000


def _line(i: int) -> bytes:
    return b"line %d %s\n" % (i, hashlib.blake2b(b"%d" % i, digest_size=12).hexdigest().encode())


class TieredCase(SynchronousTestCase):
    """A moto server per test process, a fresh bucket per test, storages on synchronous runners."""

    segment_max_bytes = 1 << 20

    def setUp(self):
        self.moto = moto_sync.shared()
        self.clock = task.Clock()
        self.clock.advance(START)
        self.data_dir = os.path.abspath(self.mktemp())
        self.bucket = "tier-" + uuid.uuid4().hex[:16]
        self.client = self.moto.client()
        self.client.create_bucket(Bucket=self.bucket)
        self.registry = CollectorRegistry()
        self.metrics = PersistMetrics(self.registry, process=False)
        self.on_read = self.metrics.archive_reads()
        self.sources = []

    def s3cfg(self, **kw) -> S3ArchiveConfig:
        return S3ArchiveConfig(enabled=True, bucket=self.bucket, prefix=PREFIX, **kw)

    def make(self, node="n1", data_dir=None, list_page=1000, kinds=(), client=None):
        """A started TieredStorage over a LocalStorage in ``data_dir``."""
        data_dir = data_dir or self.data_dir
        local = LocalStorage(
            data_dir, sync_runner, compressor=make_compressor("zlib", 6),
            segment_max_bytes=self.segment_max_bytes, fsync="batch", clock=self.clock,
            index_interval=5.0,
        )

        def make_source():
            source = ArchiveSource(client or self.moto.client(), self.bucket, PREFIX,
                                   on_read=self.on_read)
            self.sources.append(source)
            return source

        storage = TieredStorage(
            local, node_id=node, data_dir=data_dir, kinds=layout.archived_kinds(kinds),
            make_source=make_source, clock=self.clock, target=(self.bucket, PREFIX, node),
            run_remote=sync_runner, list_page=list_page,
        )
        self.successResultOf(storage.start())
        return storage

    def ship(self, storage, node="n1", data_dir=None, kinds=()):
        """Upload every segment (closed and idle open) with the real shipper; it becomes
        the storage's archive check."""
        shipper = S3Shipper(
            self.s3cfg(kinds=kinds), node, data_dir or self.data_dir, storage, self.clock,
            sync_runner, s3=s3mod, make_client=lambda cfg: self.moto.client(),
            wall=lambda: time.time() + 3600,
        )
        self.successResultOf(shipper.start())
        self.successResultOf(shipper.stop())
        storage.set_archive_check(shipper)
        return shipper

    def write_job(self, storage, lines: int, per_batch: int = 1000, job=JOB):
        """``lines`` stdout lines in batches (one member each), 1 ms apart; a few stderr."""
        arrival = 0
        for start in range(0, lines, per_batch):
            rows = [(T0 + i * 1_000_000, i, arrival + (i - start), _line(i))
                    for i in range(start, min(lines, start + per_batch))]
            arrival += len(rows)
            self.successResultOf(storage.append_logs(log_batch(job, STREAM_STDOUT, rows)))
        self.successResultOf(storage.append_logs(log_batch(job, STREAM_STDERR, [
            (T0 + lines * 1_000_000, 0, arrival, b"done\n")])))

    def logs(self, storage, job=JOB, node=None, **kw):
        snap = (storage.node_snapshot(node, job) if node
                else self.successResultOf(storage.open_job(job)))
        return [(r.stream, r.timestamp, r.content) for r in snap.iter_logs(0, **kw)]

    def read_bytes(self) -> float:
        return self.registry.get_sample_value("persist_archive_read_bytes_total",
                                              {"backend": "s3"}) or 0.0

    def local_files(self, job=JOB):
        found = []
        for top in ("logs", "metrics", "events"):
            d = os.path.join(self.data_dir, top, job)
            if os.path.isdir(d):
                found += os.listdir(d)
        return found

    def object_bytes(self, job=JOB, node="n1") -> int:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}{node}/{job}/")
        return sum(o["Size"] for o in listed.get("Contents", ())
                   if not o["Key"].endswith(layout.SIDECAR_SUFFIX))


class TieredContractTests(StorageBackendContractMixin, TieredCase):
    """TieredStorage (local tier + archive on a real S3 server) honours the contract."""

    def make_storage(self):
        return self.make()


class TieredRotatingContractTests(StorageBackendContractMixin, TieredCase):
    """The contract holds for TieredStorage when every append starts a new segment."""

    segment_max_bytes = 1

    def make_storage(self):
        return self.make()


class TieringTests(TieredCase):
    segment_max_bytes = 64 * 1024

    def test_provides_the_tier_interfaces(self):
        """TieredStorage declares the local-tier and other-nodes capabilities."""
        storage = self.make()
        verifyObject(ILocalTier, storage)
        verifyObject(IRemoteNodes, storage)

    def test_released_job_reads_from_the_archive_by_ranged_gets(self):
        """A job whose local copy is released reads back exactly from S3; the first page,
        a late offset and a one-second window each fetch a small fraction of the archived
        bytes (ranged GETs of a few members), counted in persist_archive_read_bytes_total."""
        n = 150_000
        storage = self.make()
        self.write_job(storage, n)
        before = self.logs(storage)
        info = storage.job_info(JOB)
        self.ship(storage)
        freed = self.successResultOf(storage.release_job(JOB))
        self.assertGreater(freed, 0)
        self.assertEqual(self.local_files(), [])
        total = self.object_bytes()
        self.assertGreater(total, 2_000_000)
        self.assertEqual(storage.job_info(JOB), info)
        self.assertEqual([j.job_id for j in storage.list_jobs()], [JOB])

        def costs(**kw):
            mark = self.read_bytes()
            got = self.logs(storage, **kw)
            return got, self.read_bytes() - mark

        first, cost = costs(limit=100)
        self.assertEqual(first, before[:100])
        self.assertLess(cost, total * 0.01)
        late, cost = costs(offset=n - 2_000, limit=100)
        self.assertEqual(late, before[n - 2_000:n - 1_900])
        self.assertLess(cost, total * 0.01)
        window = (T0 + 40_000 * 1_000_000, T0 + 41_000 * 1_000_000 - 1)
        second, cost = costs(start_time=window[0], end_time=window[1])
        self.assertEqual(second, [r for r in before if window[0] <= r[1] <= window[1]])
        self.assertEqual(len(second), 1000)
        self.assertLess(cost, total * 0.01)
        self.assertEqual(self.read_bytes(), sum(s.read_bytes for s in self.sources))
        # The whole job still reads back exactly, stream by stream too.
        self.assertEqual(self.logs(storage), before)
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual(len(list(snap.iter_logs(STREAM_STDERR))), 1)

    def test_every_query_reads_the_same_from_either_tier(self):
        """Logs (each stream and merged), metrics and events, with time ranges, offsets and
        limits, read the same from the local files and, after the release, from S3."""
        storage = self.make()
        self.write_job(storage, 6000, per_batch=700)
        self.successResultOf(storage.append_metrics(_metric_batch(JOB, 500, 7000)))
        events = [(T0 + i * 1000, i, 8000 + i, event_payload("exec", T0 + i * 1000, i, pid=i))
                  for i in range(300)]
        self.successResultOf(storage.append_events(event_batch(JOB, "exec", events)))
        mid = T0 + 3000 * 1_000_000
        windows = [(0, 0), (mid, 0), (0, mid), (mid, mid + 500 * 1_000_000), (T0, T0 + 150_000)]
        pages = [(0, 0), (0, 7), (2999, 50), (5990, 100), (10_000, 5)]

        def read_all():
            snap = self.successResultOf(storage.open_job(JOB))
            out = []
            for start, end in windows:
                for offset, limit in pages:
                    for stream in (0, 1, 2):
                        out.append([(r.stream, r.timestamp, r.sequence, r.content)
                                    for r in snap.iter_logs(stream, start, end, offset, limit)])
                    out.append([(r.timestamp, r.data) for r in
                                snap.iter_metrics(start, end, offset, limit)])
                    out.append([(r.timestamp, r.data) for r in
                                snap.iter_events("exec", start, end, offset, limit)])
            return out, snap.info

        local, local_info = read_all()
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        self.assertEqual(self.local_files(), [])
        remote, remote_info = read_all()
        self.assertEqual(remote_info, local_info)
        self.assertEqual(len(remote), len(local))
        for i, (a, b) in enumerate(zip(local, remote, strict=True)):
            self.assertTrue(a == b, f"query {i} differs: {len(a)} local, {len(b)} archived")
        self.assertTrue(any(local))

    def test_dropped_segments_merge_with_local_ones(self):
        """Retention's per-job cap drops the oldest (archived) segments; the job then reads
        local and archived segments merged in order, and its JobInfo still counts all."""
        storage = self.make()
        self.write_job(storage, 20_000)
        before, info = self.logs(storage), storage.job_info(JOB)
        shipper = self.ship(storage)
        local_before = sum(storage.part_sizes(JOB))
        runner = RetentionRunner(
            storage, RetentionPolicy(job_max_bytes=local_before // 3), self.clock,
            busy_jobs=set, discard_job=lambda j: defer.succeed(None),
            archive=shipper,
        )
        result = self.successResultOf(runner.run())
        self.assertGreater(result.bytes_freed, 0)
        self.assertLessEqual(sum(storage.part_sizes(JOB)), local_before // 3)
        self.assertTrue(self.local_files())
        self.assertEqual(self.logs(storage), before)
        self.assertEqual(self.logs(storage, offset=5000, limit=10), before[5000:5010])
        self.assertEqual(storage.job_info(JOB).log_count, info.log_count)

    def test_age_retention_releases_instead_of_deleting(self):
        """With an archive, age retention releases an idle job's local copy: the job stays
        listed, counted in the totals, and readable."""
        storage = self.make()
        self.write_job(storage, 3000)
        events = [(T0 + i, i, 5000 + i, event_payload("exec", T0 + i, i, pid=i)) for i in range(5)]
        self.successResultOf(storage.append_events(event_batch(JOB, "exec", events)))
        before, info = self.logs(storage), storage.job_info(JOB)
        shipper = self.ship(storage)
        self.clock.advance(10 * 86400)
        runner = RetentionRunner(
            storage, RetentionPolicy(log_max_age=86400, metric_max_age=86400,
                                     event_max_age=86400),
            self.clock, busy_jobs=set, discard_job=lambda j: defer.succeed(None),
            archive=shipper,
        )
        result = self.successResultOf(runner.run())
        self.assertEqual(result.deleted_job_ids, [JOB])
        self.assertEqual(self.local_files(), [])
        self.assertEqual(storage.local.job_info(JOB), None)
        self.assertEqual(storage.job_info(JOB), info)
        self.assertEqual(storage.totals()[:3], (1, info.log_count, 0))
        self.assertEqual(storage.event_totals(), {"exec": 5})
        self.assertEqual(storage.list_jobs_page(0, 0, 0, 10), (1, (info,)))
        self.assertEqual(self.logs(storage), before)
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual([e.sequence for e in snap.iter_events("exec")], list(range(5)))
        # A second run finds nothing of the released job to delete.
        again = self.successResultOf(runner.run())
        self.assertEqual(again.actions, ())

    def test_released_job_written_again_never_reuses_an_archived_name(self):
        """A released job that gets data again continues after its archived segments (no
        segment name, so no S3 key, is reused) with ordinals above the archived ones: the
        archived objects stay byte-identical after the new segment is uploaded, and the
        job reads back old then new lines, counted together."""
        storage = self.make()
        self.write_job(storage, 5000)
        before = self.logs(storage)
        self.ship(storage)
        keys = [o["Key"] for o in self.client.list_objects_v2(Bucket=self.bucket)["Contents"]]
        archived = {k: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
                    for k in keys}
        last_stdout = max(k for k in keys if "/stdout/" in k and k.endswith(".gz"))
        self.successResultOf(storage.release_job(JOB))
        again = [(T0 + (9000 + i) * 1_000_000, 9000 + i, i, b"again %d\n" % i) for i in range(100)]
        self.successResultOf(storage.append_logs(log_batch(JOB, STREAM_STDOUT, again)))
        [name] = self.local_files()
        self.assertGreater(name, last_stdout.rsplit("/", 1)[1])
        self.ship(storage)
        for key, data in archived.items():
            got = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            self.assertTrue(got == data, f"{key} was overwritten")
        self.assertEqual(self.logs(storage), before + [(STREAM_STDOUT, r[0], r[3]) for r in again])
        self.assertEqual(storage.job_info(JOB).log_count, 5101)

    def test_partly_released_job_written_again_continues_after_the_archive(self):
        """A job whose logs were released (metrics, with lower ordinals, stay local) gets
        new lines after a restart (the writer numbers arrivals from 0 again).  Its ordinal
        base (IOrdinalBase, which TieredStorage forwards) is above every archived ordinal,
        the new stdout segment takes no archived name (the archived objects stay
        byte-identical after the new one is uploaded), and the job reads old then new
        lines: the stored order FollowLogs' hand-off relies on."""
        storage = self.make()
        self.successResultOf(storage.append_metrics(_metric_batch(JOB, 3, 0)))
        rows = [(T0 + i * 1_000_000, i, 3 + i, _line(i)) for i in range(2000)]
        self.successResultOf(storage.append_logs(log_batch(JOB, STREAM_STDOUT, rows)))
        before = self.logs(storage)
        self.ship(storage)
        archived = {o["Key"]: self.client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                    for o in self.client.list_objects_v2(Bucket=self.bucket)["Contents"]}
        self.successResultOf(storage.release_part(JOB, Part.LOGS))
        self.assertEqual(self.local_files(), ["metrics.jsonl.gz"])
        self.successResultOf(storage.stop())

        storage = self.make()  # a restart: arrivals start at 0 again
        self.assertTrue(IOrdinalBase.providedBy(storage))
        self.successResultOf(storage.open_job(JOB))
        self.assertEqual(storage.ordinal_base(JOB), 2003)  # above the archived lines
        again = [(T0 + (5000 + i) * 1_000_000, 5000 + i, i, b"again %d\n" % i) for i in range(50)]
        self.successResultOf(storage.append_logs(log_batch(JOB, STREAM_STDOUT, again)))
        new = [n for n in self.local_files() if n.startswith("stdout")]
        self.assertEqual(new, ["stdout_000001.log.gz"])
        self.ship(storage)
        for key, data in archived.items():
            got = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            self.assertTrue(got == data, f"{key} was overwritten")
        self.assertEqual(self.logs(storage), before + [(STREAM_STDOUT, r[0], r[3]) for r in again])
        self.assertEqual(storage.job_info(JOB).log_count, 2050)

    def test_unarchived_data_is_never_released(self):
        """release_job of a job whose segments are not archived fails and keeps every file."""
        storage = self.make()
        self.write_job(storage, 2000)
        f = self.failureResultOf(storage.release_job(JOB))
        f.trap(StorageUnavailable)
        self.assertIn(JOB, str(f.value))
        self.assertTrue(self.local_files())
        self.assertEqual(len(self.logs(storage)), 2001)

    def test_kinds_not_archived_are_not_kept(self):
        """With only logs archived, releasing a job keeps its logs readable from S3; its
        metrics part (not archived) is only local and goes with the local copy."""
        storage = self.make(kinds=("logs",))
        self.write_job(storage, 2000)
        self.ship(storage, kinds=("logs",))
        self.successResultOf(storage.release_job(JOB))
        self.assertEqual(len(self.logs(storage)), 2001)
        self.assertGreater(self.object_bytes(), 0)

    def test_delete_job_removes_archived_only_jobs(self):
        """DeleteJob of a released job makes it unknown at once."""
        storage = self.make()
        self.write_job(storage, 1000)
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        self.successResultOf(storage.delete_job(JOB))
        self.assertIsNone(storage.job_info(JOB))
        self.assertIsNone(self.successResultOf(storage.open_job(JOB)))
        self.assertEqual(storage.list_jobs(), ())

    def test_archive_max_age_forgets_expired_archived_only_jobs(self):
        """archive.s3.maxAge deleting a released job's objects also drops the job from the
        catalog: it is unknown at once instead of listed with objects that are gone."""
        storage = self.make()
        self.write_job(storage, 1000)
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        self.assertIsNotNone(storage.job_info(JOB))
        later = time.time() + 30 * 86400
        shipper = S3Shipper(
            self.s3cfg(max_age=86400.0), "n1", self.data_dir, storage, self.clock,
            sync_runner, s3=s3mod, make_client=lambda cfg: self.moto.client(),
            wall=lambda: later,
        )
        self.successResultOf(shipper.start())
        self.successResultOf(shipper.stop())
        self.assertEqual(shipper.expired_jobs, 1)
        self.assertIsNone(storage.job_info(JOB))
        self.assertEqual(storage.list_jobs(), ())
        self.assertEqual(self.object_bytes(), 0)

    def test_delete_part_forgets_its_archived_segments(self):
        """delete_part of the logs removes the archive-only log segments from the job."""
        storage = self.make()
        self.write_job(storage, 1000)
        self.successResultOf(storage.append_metrics(_metric_batch(JOB, 3, 2000)))
        self.ship(storage)
        self.successResultOf(storage.release_part(JOB, Part.LOGS))
        self.assertEqual(len(self.logs(storage)), 1001)
        self.successResultOf(storage.delete_part(JOB, Part.LOGS))
        self.assertEqual(self.logs(storage), [])
        self.assertEqual(storage.job_info(JOB).metric_count, 3)

    def test_rebuilt_from_a_paginated_listing_after_disk_loss(self):
        """A node whose data directory is gone lists its prefix (several pages) at start and
        answers ListJobs, GetJobInfo and queries for its archived jobs."""
        jobs = [f"job-{i}" for i in range(3)]
        storage = self.make()
        expected = {}
        for job in jobs:
            self.write_job(storage, 5000, job=job)
            expected[job] = (self.logs(storage, job=job), storage.job_info(job))
        self.ship(storage)
        self.successResultOf(storage.stop())
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=PREFIX)["KeyCount"]
        self.assertGreater(listed, 12)
        fresh_dir = os.path.abspath(self.mktemp())
        reborn = self.make(data_dir=fresh_dir, list_page=5)
        self.assertEqual(self.successResultOf(reborn.rebuilt), 3)
        self.assertEqual([i.job_id for i in reborn.list_jobs()], jobs)
        for job in jobs:
            logs, info = expected[job]
            self.assertEqual(self.logs(reborn, job=job), logs)
            got = reborn.job_info(job)
            self.assertEqual((got.log_count, got.first_timestamp, got.last_timestamp),
                             (info.log_count, info.first_timestamp, info.last_timestamp))
        self.assertEqual(reborn.totals()[:2], (3, 3 * 5001))

    def test_listed_names_stay_reserved_without_their_sidecars(self):
        """After a restart on an empty disk, a job whose sidecars cannot be read is not in
        the catalog, but its listed segment names are still reserved: new data for it
        goes to a later segment and the archived object is not overwritten."""
        storage = self.make()
        self.write_job(storage, 500)
        self.ship(storage)
        self.successResultOf(storage.stop())
        listed = self.client.list_objects_v2(Bucket=self.bucket)["Contents"]
        for o in listed:
            if o["Key"].endswith(layout.SIDECAR_SUFFIX):
                self.client.delete_object(Bucket=self.bucket, Key=o["Key"])
        key = next(o["Key"] for o in listed if o["Key"].endswith("/stdout/stdout.log.gz"))
        old = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        fresh_dir = os.path.abspath(self.mktemp())
        reborn = self.make(data_dir=fresh_dir)
        self.assertEqual(self.successResultOf(reborn.rebuilt), 0)
        self.successResultOf(reborn.append_logs(log_batch(JOB, STREAM_STDOUT, [
            (T0, 0, 0, b"after the restart\n")])))
        self.assertEqual(os.listdir(os.path.join(fresh_dir, "logs", JOB)),
                         ["stdout_000001.log.gz"])
        self.ship(reborn, data_dir=fresh_dir)
        self.assertEqual(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), old)

    def test_floors_hold_across_a_restart_while_s3_is_unreachable(self):
        """A released job's floors are written to <dataDir>/archive_tier.json: restarted
        with S3 unreachable (no listing yet), the job written again still continues after
        its archived segments, and the archived objects are not overwritten."""
        storage = self.make()
        self.write_job(storage, 500)
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        self.successResultOf(storage.stop())
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "archive_tier.json")))
        key = f"{PREFIX}n1/{JOB}/stdout/stdout.log.gz"
        old = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        dead = self.moto.client(f"http://127.0.0.1:{_free_port()}", timeout=1.0)
        again = self.make(client=dead)
        self.assertNoResult(again.rebuilt)
        self.successResultOf(again.append_logs(log_batch(JOB, STREAM_STDOUT, [
            (T0, 0, 0, b"after the restart\n")])))
        self.assertEqual(self.local_files(), ["stdout_000001.log.gz"])
        self.ship(again)
        self.assertEqual(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), old)
        self.successResultOf(again.stop())

    def test_rebuild_skips_segments_still_on_disk(self):
        """At start, archived segments that are still on local disk are read locally: the
        rebuild adds nothing for a job whose files are all here."""
        storage = self.make()
        self.write_job(storage, 3000)
        self.ship(storage)
        self.successResultOf(storage.stop())
        again = self.make()
        self.assertEqual(self.successResultOf(again.rebuilt), 0)
        self.assertEqual(again.job_info(JOB), storage.local.job_info(JOB))

    def test_other_nodes_archive(self):
        """A node reads a job another node archived in the same bucket (node_id)."""
        a_dir = os.path.abspath(self.mktemp())
        node_a = self.make(node="node-a", data_dir=a_dir)
        self.write_job(node_a, 4000)
        before = self.logs(node_a)
        self.ship(node_a, node="node-a", data_dir=a_dir)
        node_b = self.make(node="node-b")
        self.assertIsNone(node_b.job_info(JOB))
        self.assertEqual(self.logs(node_b, node="node-a"), before)
        self.assertEqual(self.logs(node_b, node="node-a", offset=3000, limit=5), before[3000:3005])
        self.assertEqual(node_b.node_snapshot("node-a", JOB).info.log_count, 4001)
        self.assertIsNone(node_b.node_snapshot("node-c", JOB))

    def test_unreachable_archive_fails_the_read_naming_the_job(self):
        """With S3 unreachable, reading an archived part raises StorageUnavailable naming
        the job, within the client's timeouts (no hang)."""
        storage = self.make()
        self.write_job(storage, 2000)
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        snap = self.successResultOf(storage.open_job(JOB))
        dead = f"http://127.0.0.1:{_free_port()}"
        for source in self.sources:
            source.client = self.moto.client(dead, timeout=1.0)
        started = time.monotonic()
        with self.assertRaises(StorageUnavailable) as caught:
            list(snap.iter_logs(0, limit=10))
        self.assertIn(JOB, str(caught.exception))
        self.assertLess(time.monotonic() - started, 20)

    def test_object_deleted_under_a_read(self):
        """An archived object deleted (DeleteJob) while a snapshot names it: DataVanished."""
        storage = self.make()
        self.write_job(storage, 2000)
        self.ship(storage)
        self.successResultOf(storage.release_job(JOB))
        snap = self.successResultOf(storage.open_job(JOB))
        s3mod.thd_delete_prefix(self.client, self.bucket, f"{PREFIX}n1/{JOB}/")
        with self.assertRaises(DataVanished):
            list(snap.iter_logs(0))


class SidecarKindTests(SynchronousTestCase):
    def test_member_kind_travels_in_the_sidecar(self):
        """A sidecar lists each member's kind, so that members of the older service
        (legacy JSON lines) read back as legacy; sidecars without the column get the
        segment kind's member kind."""
        from joblet_persist.archive.tier import members_of_sidecar
        from joblet_persist.storage.format import KIND_LEGACY, KIND_LOG, MemberInfo

        members = [MemberInfo(0, 10, KIND_LEGACY, 2, -2, -1, 5, 6, 1, 2, 0),
                   MemberInfo(10, 20, KIND_LOG, 3, 0, 2, 7, 9, 3, 5, 40)]
        doc = layout.parse_sidecar(layout.sidecar_bytes("j", "n", "stdout", "stdout.log.gz",
                                                        30, members))
        self.assertEqual(members_of_sidecar(doc, SegmentKind.STDOUT), tuple(members))
        for m in doc["members"]:
            del m["kind"]
        self.assertEqual([m.kind for m in members_of_sidecar(doc, SegmentKind.STDOUT)],
                         [KIND_LOG, KIND_LOG])


class FactoryTests(SynchronousTestCase):
    def test_archiving_on_builds_a_tiered_backend(self):
        """storage/backends.py wraps the local backend in a TieredStorage when archiving
        is on, and builds the plain local backend when it is off."""
        from joblet_persist.config import config_from_string
        from joblet_persist.storage.backends import make_storage
        from joblet_persist.storage.local import LocalStorage as Local

        d = os.path.abspath(self.mktemp())
        base = f"storage: {{dataDir: {d}}}\nserver: {{nodeId: n1}}\n"
        on = config_from_string(base + "archive: {s3: {enabled: true, bucket: b}}\n")
        built = make_storage(on, run=sync_runner, clock=task.Clock())
        self.assertIsInstance(built, TieredStorage)
        self.assertIsInstance(built.local, Local)
        self.assertEqual(built.node_id, "n1")
        off = make_storage(config_from_string(base), run=sync_runner, clock=task.Clock())
        self.assertIsInstance(off, Local)

    def test_kinds_routed_never_are_not_kept_for_the_archive(self):
        """The tiered backend treats as archived exactly the kinds archive.s3.routes sends
        (or the older archive.s3.kinds lists): a kind routed never is deleted by
        retention as without an archive, not kept waiting for an upload that never comes."""
        from joblet_persist.config import config_from_string
        from joblet_persist.storage.api import PART_OF_KIND
        from joblet_persist.storage.backends import make_storage

        d = os.path.abspath(self.mktemp())
        base = f"storage: {{dataDir: {d}}}\nserver: {{nodeId: n1}}\n"
        for s3 in ("routes: {events: never, metrics: idle}", "kinds: [logs, metrics]"):
            cfg = config_from_string(base + f"archive: {{s3: {{enabled: true, bucket: b, {s3}}}}}\n")
            built = make_storage(cfg, run=sync_runner, clock=task.Clock())
            self.assertEqual({PART_OF_KIND[k].value for k in built._kinds}, {"logs", "metrics"}, s3)


def _metric_batch(job, n, first_arrival):
    from joblet_persist._proto import ipc_pb2
    from joblet_persist.storage.api import MetricBatch

    payloads = [ipc_pb2.Metric(job_uuid=job, timestamp=T0 + i).SerializeToString()
                for i in range(n)]
    return MetricBatch(job_id=job, timestamps=[T0 + i for i in range(n)],
                       sequences=list(range(n)),
                       arrivals=[first_arrival + i for i in range(n)], payloads=payloads)



class RebuildRetryTests(TieredCase):
    def test_listing_retried_with_backoff_while_s3_is_unreachable(self):
        """At start with S3 unreachable the catalog listing fails, is retried after
        retryInitial, doubling, and local data is served meanwhile; stopping ends the
        waiting rebuild."""
        local_only = self.make()
        self.write_job(local_only, 100)
        self.successResultOf(local_only.stop())
        dead = self.moto.client(f"http://127.0.0.1:{_free_port()}", timeout=1.0)
        storage = self.make(client=dead)
        self.assertNoResult(storage.rebuilt)
        self.assertEqual(storage.rebuild_errors, 1)
        self.assertEqual(len(self.logs(storage)), 101)
        self.clock.advance(1.0)
        self.assertEqual(storage.rebuild_errors, 2)
        self.clock.advance(1.0)
        self.assertEqual(storage.rebuild_errors, 2)  # the next try waits 2 s
        self.successResultOf(storage.stop())
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(storage.rebuilt), 0)
        self.assertEqual(storage.rebuild_errors, 2)
