"""The S3 archive under faults, deletes and routing, against moto's real S3 server.

Every test runs a real ``twistd joblet-persist`` (or, for the listing and deletion
calls, the archive's own blocking S3 functions) against a ``moto_server`` child
process, through the tests' ``S3Gate`` (tests/integration/s3server.py), which drops
requests or answers midway, answers 503 SlowDown, or slows answers down.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from joblet_persist.archive import layout
from joblet_persist.archive import s3 as s3calls
from tests.integration.s3server import S3Server, use_aws_environment
from tests.integration.support import (
    grpc_call,
    log_frame,
    metric_frame,
    metric_values,
    wait_for,
)
from tests.integration.test_archive import (
    BUCKET,
    NODE,
    PREFIX,
    STDERR,
    STDOUT,
    _Base,
    _content,
    _log_count,
)


def _counts(sock: str, job: str) -> tuple:
    """Blocking: the job's stored (log, metric) counts; (-1, -1) while it is unknown."""
    import grpc

    try:
        info = grpc_call(sock, lambda stub, t: stub.GetJobInfo(
            persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t))
    except grpc.RpcError:
        return (-1, -1)
    return (info.log_count, info.metric_count)


def _sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class _Job:
    """Frames of one job, with what was sent per stream."""

    def __init__(self, name: str):
        self.name = name
        self.seq = 0
        self.sent = {STDOUT: bytearray(), STDERR: bytearray()}

    def frames(self, n: int, size: int = 200) -> bytes:
        out = bytearray()
        for _ in range(n):
            stream = STDOUT if self.seq % 3 else STDERR
            content = _content(self.name, stream, self.seq, size)
            self.sent[stream] += content
            out += log_frame(self.name, stream, 1_700_000_000_000_000_000 + self.seq, self.seq,
                             content)
            out += metric_frame(self.name, 1_700_000_000_000_000_000 + self.seq, self.seq,
                                metric_values(self.seq))
            self.seq += 1
        return bytes(out)


class _FaultBase(_Base):
    async def feed(self, job: _Job, n: int = 40) -> None:
        """Send ``n`` more frames of ``job`` and wait until they are all stored (logs and
        metrics: a frame still on its way after a DeleteJob would start the job afresh)."""
        await self.send(job.frames(n))
        await wait_for(
            lambda: threads.deferToThread(_counts, self.grpc_sock, job.name).addCallback(
                lambda c: c == (job.seq, job.seq)),
            timeout=15, what=f"{job.name} stored",
        )

    def check_job(self, remote: dict, job: _Job) -> None:
        self.check_stream(remote, job.name, "stdout", bytes(job.sent[STDOUT]))
        self.check_stream(remote, job.name, "stderr", bytes(job.sent[STDERR]))

    def metric(self, name: str) -> float:
        return self.scrape().get(f'{name}{{backend="s3"}}', 0.0)

    def delete_job(self, job: str):
        return grpc_call(
            self.grpc_sock,
            lambda stub, t: stub.DeleteJob(persist_pb2.DeleteJobRequest(job_uuid=job), timeout=t))

    def job_keys(self, job: str) -> list:
        return [k for k in self.keys() if k.startswith(layout.job_prefix(PREFIX, NODE, job))]


class GateFaultTests(_FaultBase):
    timeout = 180

    async def test_dropped_requests_dropped_answers_and_slow_answers(self):
        """Through each fault in turn (every request cut halfway; every answer cut
        halfway after the server did the work; every answer held 1 s) ingest goes on,
        and for the two drops the upload errors are counted, the backlog metric grows
        past backlogUnhealthyBytes and health turns unhealthy naming the archive; once
        the fault ends, health recovers, the backlog drains to 0 and every segment is in
        the bucket byte for byte.  Slow answers only slow the uploads down: everything is
        archived while they last, health stays good."""
        config = self.config({"backlogUnhealthyBytes": "2KiB", "retryMax": "1s"})
        proc = await self.start_twistd(config)
        job = _Job("job-faults")
        await self.feed(job)
        await self.wait_archived()
        for fault in ("drop-request", "drop-response"):
            errors_before = await threads.deferToThread(
                self.metric, "persist_archive_upload_errors_total")
            faulted_before = self.gate.faulted
            self.gate.set_fault(fault)
            await self.feed(job, 60)

            def degraded(before=errors_before):
                status, doc = self.health()
                return (self.metric("persist_archive_upload_errors_total") > before
                        and self.metric("persist_archive_backlog_bytes") > 2048
                        and status == 503 and not doc["checks"]["archive"]["ok"]
                        and "backlog" in doc["checks"]["archive"]["detail"])

            await wait_for(lambda: threads.deferToThread(degraded), timeout=20,
                           what=f"errors counted and health degraded under {fault}")
            self.assertGreater(self.gate.faulted, faulted_before, fault)
            self.gate.set_fault(None)

            def recovered():
                status, _doc = self.health()
                return (status == 200 and self.metric("persist_archive_backlog_bytes") == 0
                        and self.archive_complete())

            await wait_for(lambda: threads.deferToThread(recovered), timeout=30,
                           what=f"recovery after {fault}")
        self.gate.slow_seconds = 1.0
        self.gate.set_fault("slow")
        await self.feed(job, 40)
        await self.wait_archived(timeout=60)
        self.assertGreater(self.gate.faulted, 0)
        await wait_for(lambda: threads.deferToThread(self.health).addCallback(
            lambda r: r[0] == 200), timeout=10, what="health good with slow answers")
        self.gate.set_fault(None)
        remote = await threads.deferToThread(self.objects)
        self.check_job(remote, job)
        await self.stop(proc)

    async def test_slowdown_backoff_is_honoured(self):
        """While S3 answers every request with 503 SlowDown the service backs off: with
        rounds every 100 ms, retryInitial 1s and retryMax 2s, a 6-second outage sees
        fewer than 30 requests (without backoff each round would try, about 120
        requests counting boto3's own retry), and once S3 accepts requests again every
        segment is archived."""
        config = self.config({"interval": "100ms", "retryInitial": "1s", "retryMax": "2s"})
        self.gate.slowdown = True
        proc = await self.start_twistd(config)
        job = _Job("job-backoff")
        await self.feed(job, 60)
        await wait_for(lambda: self.gate.slowdowns > 0, timeout=10, what="the first 503")
        start = time.monotonic()
        await _sleep(6.0)
        seen = [t for t, method, _path in self.gate.requests if method == "503"
                and start <= t <= start + 6.0]
        self.assertLess(len(seen), 30, f"{len(seen)} requests in 6 s of SlowDown")
        self.assertGreater(len(seen), 2, "the service stopped trying")
        self.gate.slowdown = False
        await self.wait_archived(timeout=30)
        self.check_job(await threads.deferToThread(self.objects), job)
        await self.stop(proc)


class KillDuringUploadTests(_FaultBase):
    timeout = 180

    def big_config(self, **archive):
        return self.config({"multipartThreshold": "5MiB", **archive},
                           storage={"segmentMaxBytes": "6MiB"})

    async def big_job(self, name: str, frames: int = 150):
        import random

        job = _Job(name)
        rng = random.Random(name)
        out = bytearray()
        for _ in range(frames):
            content = rng.randbytes(64 * 1024)
            job.sent[STDOUT] += content
            out += log_frame(name, STDOUT, 1_700_000_000_000_000_000 + job.seq, job.seq, content)
            job.seq += 1
        await self.send(bytes(out))
        await wait_for(
            lambda: threads.deferToThread(_log_count, self.grpc_sock, name).addCallback(
                lambda c: c == job.seq),
            timeout=30, what=f"{name} stored",
        )
        return job

    def part_in_flight(self) -> bool:
        return any(method == "PUT" and "partNumber=" in path
                   for _t, method, path in self.gate.requests)

    async def test_sigkill_while_a_part_is_in_flight_then_restart(self):
        """The service is killed with SIGKILL while the gate holds the answer to an
        UploadPart request (an upload mid-way); after a restart on the same data
        directory the archive is complete: every segment byte for byte, multipart
        objects included, and the job's stdout objects gunzip to what was sent."""
        self.gate.slow_seconds = 2.0
        self.gate.set_fault("slow")
        config = self.big_config()
        proc = await self.start_twistd(config)
        job = await self.big_job("job-kill")
        await wait_for(self.part_in_flight, timeout=30, what="an UploadPart in flight")
        proc.signal("KILL")
        self.assertEqual(await proc.wait_exit(10), -signal.SIGKILL)
        self.gate.set_fault(None)
        proc = await self.start_twistd(config)
        await self.wait_archived(timeout=60)
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job.name, "stdout", bytes(job.sent[STDOUT]))
        await self.stop(proc)

    async def test_s3_server_frozen_mid_upload_then_continued(self):
        """The S3 server process is stopped (SIGSTOP) while an UploadPart is in flight:
        the request times out (requestTimeout 1s), errors are counted and ingest goes
        on; after SIGCONT every segment is archived byte for byte."""
        config = self.big_config(requestTimeout="1s")
        self.gate.slow_seconds = 0.5
        self.gate.set_fault("slow")
        proc = await self.start_twistd(config)
        job = await self.big_job("job-frozen")
        await wait_for(self.part_in_flight, timeout=30, what="an UploadPart in flight")
        self.server.pause()
        self.addCleanup(self.server.resume)
        self.gate.set_fault(None)
        await wait_for(
            lambda: threads.deferToThread(self.metric, "persist_archive_upload_errors_total")
            .addCallback(lambda n: n >= 1),
            timeout=20, what="the frozen server's timeouts counted")
        more = _Job("job-during")
        await self.feed(more, 30)
        self.server.resume()
        await self.wait_archived(timeout=60)
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job.name, "stdout", bytes(job.sent[STDOUT]))
        self.check_job(remote, more)
        await self.stop(proc)

    async def test_s3_server_killed_mid_upload_and_restarted(self):
        """The S3 server process is killed (SIGKILL) while the first upload (an
        UploadPart) is in flight, and started again on the same port: the service
        retries and the archive ends complete, byte for byte."""
        config = self.big_config()
        self.gate.slow_seconds = 1.0
        self.gate.set_fault("slow")
        proc = await self.start_twistd(config)
        job = await self.big_job("job-server-kill")
        await wait_for(self.part_in_flight, timeout=30, what="an UploadPart in flight")
        await self.server.stop()
        self.gate.set_fault(None)
        await wait_for(
            lambda: threads.deferToThread(self.metric, "persist_archive_upload_errors_total")
            .addCallback(lambda n: n >= 1),
            timeout=20, what="errors while the server is down")
        await self.server.start()
        await threads.deferToThread(self.s3.create_bucket, Bucket=BUCKET)
        await self.wait_archived(timeout=60)
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job.name, "stdout", bytes(job.sent[STDOUT]))
        await self.stop(proc)


class DeleteTests(_FaultBase):
    timeout = 120

    async def test_delete_job_racing_an_upload_leaves_nothing(self):
        """DeleteJob arrives while an upload of the job is in flight (the gate holds S3's
        answer for 1 s): the job's objects are all deleted, the one of the racing upload
        too, and none comes back over the following rounds; the other job's objects
        stay, and the deletion's record leaves the manifest once a second listing
        (2 x requestTimeout + interval later) found nothing."""
        proc = await self.start_twistd(self.config({"requestTimeout": "2s"}))
        keep, doomed = _Job("job-keep"), _Job("job-doomed")
        await self.feed(keep)
        await self.wait_archived()
        self.gate.slow_seconds = 1.0
        self.gate.set_fault("slow")
        await self.feed(doomed, 60)
        prefix = "/" + BUCKET + "/" + layout.job_prefix(PREFIX, NODE, doomed.name)
        await wait_for(lambda: any(m == "PUT" and p.startswith(prefix)
                                   for _t, m, p in self.gate.requests),
                       timeout=20, what="an upload of the doomed job in flight")
        answer = await threads.deferToThread(self.delete_job, doomed.name)
        self.assertTrue(answer.success)
        self.gate.set_fault(None)
        await wait_for(lambda: threads.deferToThread(self.job_keys, doomed.name)
                       .addCallback(lambda keys: keys == []),
                       timeout=20, what="the doomed job's objects deleted")
        await _sleep(1.5)  # five more rounds
        self.assertEqual(await threads.deferToThread(self.job_keys, doomed.name), [],
                         proc.output[-6000:])
        self.check_job(await threads.deferToThread(self.objects), keep)

        def manifest():
            with open(layout.manifest_path(self.data_dir), "rb") as f:
                return layout.Manifest.from_bytes(f.read(), (BUCKET, PREFIX, NODE))

        await wait_for(lambda: manifest().deletes == {}, timeout=20,
                       what="the deletion's record gone after the checking pass")
        self.assertNotIn(doomed.name, manifest().segments)
        self.assertEqual(await threads.deferToThread(self.job_keys, doomed.name), [])
        await self.stop(proc)

    async def test_max_age_expires_archived_jobs_gone_locally(self):
        """archive.s3.maxAge 2s: a job that exists only in the bucket (its objects put
        there directly, older than 2 s) is deleted from it, counted in
        persist_archive_expired_jobs_total; a job still on the local disk keeps its
        objects, and another node's objects are never touched."""
        old_keys = [layout.object_key(PREFIX, NODE, "job-old", "stdout", f"s{i}") for i in range(3)]
        other = layout.object_key(PREFIX, "node-b", "job-old", "stdout", "s0")
        for key in old_keys + [other]:
            await threads.deferToThread(self.s3.put_object, Bucket=BUCKET, Key=key, Body=b"x")
        await _sleep(2.5)
        proc = await self.start_twistd(self.config({"maxAge": "2s", "retentionInterval": "500ms"}))
        local = _Job("job-local")
        await self.feed(local)
        await self.wait_archived()
        await wait_for(lambda: threads.deferToThread(self.job_keys, "job-old")
                       .addCallback(lambda keys: keys == []),
                       timeout=20, what="job-old expired")
        await wait_for(lambda: threads.deferToThread(self.metric,
                                                     "persist_archive_expired_jobs_total")
                       .addCallback(lambda n: n == 1), what="the expiry counted")
        await _sleep(3.0)  # job-local's objects are now older than maxAge, but it is local
        keys = await threads.deferToThread(self.keys)
        self.assertIn(other, keys)
        self.check_job(await threads.deferToThread(self.objects), local)
        await self.stop(proc)


class DeleteCallTests(unittest.TestCase):
    """The archive's blocking listing and deletion calls against moto, on a thread."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        use_aws_environment(self)
        self.server = S3Server(self)
        yield self.server.start()
        self.s3 = self.server.client()
        yield threads.deferToThread(self.s3.create_bucket, Bucket=BUCKET)

    def put_many(self, keys) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: self.s3.put_object(Bucket=BUCKET, Key=k, Body=b"."), keys))

    @defer.inlineCallbacks
    def test_delete_prefix_pages_and_batches(self):
        """thd_delete_prefix deletes 2,300 objects of a job: the listing is paginated
        (three pages), each DeleteObjects call carries at most 1,000 keys, every object
        under the job's prefix is gone and nothing else is touched; thd_job_ages
        lists the node's jobs with their newest object's time."""
        prefix = layout.job_prefix(PREFIX, NODE, "job-many")
        keys = [f"{prefix}stdout/seg{i:05d}" for i in range(2300)]
        bystander = layout.object_key(PREFIX, NODE, "job-many2", "stdout", "s")
        yield threads.deferToThread(self.put_many, keys + [bystander])
        client = self.s3
        batches, pages = [], []
        client.meta.events.register(
            "provide-client-params.s3.DeleteObjects",
            lambda params, **kw: batches.append(len(params["Delete"]["Objects"])))
        client.meta.events.register(
            "provide-client-params.s3.ListObjectsV2", lambda params, **kw: pages.append(1))
        ages = yield threads.deferToThread(s3calls.thd_job_ages, client, BUCKET,
                                           layout.node_prefix(PREFIX, NODE))
        self.assertEqual(sorted(ages), ["job-many", "job-many2"])
        self.assertLess(abs(ages["job-many"] - time.time()), 120)
        pages.clear()
        n = yield threads.deferToThread(s3calls.thd_delete_prefix, client, BUCKET, prefix)
        self.assertEqual(n, 2300)
        self.assertEqual(len(pages), 3)
        self.assertEqual(sum(batches), 2300)
        self.assertLessEqual(max(batches), 1000)
        left = yield threads.deferToThread(
            lambda: [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET) for o in page.get("Contents", ())])
        self.assertEqual(left, [bystander])


class NoArchiveTests(_Base):
    timeout = 60

    async def test_without_s3_nothing_of_the_archive_exists(self):
        """With archive.s3 not enabled (routes set but enabled false) the service runs as
        without an archive: frames are stored and queryable, DeleteJob works, /metrics has
        no persist_archive_* metric, /health has no archive check, and no manifest is
        written; nothing reaches the S3 server."""
        config = self.config({"enabled": False, "routes": {"logs": "durable"}})
        proc = await self.start_twistd(config)
        job = _Job("job-plain")
        await self.send(job.frames(30))
        await wait_for(
            lambda: threads.deferToThread(_log_count, self.grpc_sock, job.name).addCallback(
                lambda c: c == 30), what="stored")
        await _sleep(1.0)  # several archive intervals, had there been an archive
        scraped = await threads.deferToThread(self.scrape)
        self.assertEqual([k for k in scraped if "archive" in k], [])
        _status, doc = await threads.deferToThread(self.health)
        self.assertNotIn("archive", doc["checks"])
        self.assertFalse(os.path.exists(layout.manifest_path(self.data_dir)))
        answer = await threads.deferToThread(
            grpc_call, self.grpc_sock,
            lambda stub, t: stub.DeleteJob(persist_pb2.DeleteJobRequest(job_uuid=job.name),
                                           timeout=t))
        self.assertTrue(answer.success)
        self.assertEqual(self.gate.requests, [])
        self.assertEqual(await threads.deferToThread(self.keys), [])
        await self.stop(proc)

