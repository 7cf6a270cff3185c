"""The S3 archive against a real S3 API: a twistd service, moto's server, a gate between.

Every test runs ``twistd joblet-persist`` with ``archive.s3`` pointed at an
``S3Gate`` in front of a ``moto_server`` child process (tests/integration/s3server.py),
sends frames over the IPC socket and checks the bucket with a boto3 client of
its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import time
import urllib.request

from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from joblet_persist.archive import layout
from tests.integration.s3server import S3Gate, S3Server, use_aws_environment
from tests.integration.support import (
    SpawnedTwistd,
    free_port,
    grpc_call,
    in_thread,
    log_frame,
    metric_frame,
    metric_values,
    ping,
    send_in_pieces,
    short_tempdir,
    wait_for,
    write_service_config,
)

BUCKET = "jp-archive"
PREFIX = "jp/"
NODE = "node-a"
STDOUT, STDERR = 1, 2


def _content(job: str, stream: int, seq: int, size: int = 200) -> bytes:
    head = f"{job}:{stream}:{seq}:".encode()
    noise = random.Random(f"{job}{stream}{seq}").randbytes(size - len(head))
    return head + noise + b"\n"


def _log_count(sock: str, job: str) -> int:
    """Blocking: the job's stored log count from GetJobInfo; -1 while it is unknown."""
    import grpc

    try:
        info = grpc_call(
            sock,
            lambda stub, t: stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job),
                                            timeout=t),
        )
    except grpc.RpcError:
        return -1
    return info.log_count


def _local_segments(data_dir: str) -> dict:
    """``{key: bytes}`` of every segment file under the data directory, keyed like S3."""
    out = {}
    for top in ("logs", "metrics"):
        root = os.path.join(data_dir, top)
        if not os.path.isdir(root):
            continue
        for job in os.listdir(root):
            for name in os.listdir(os.path.join(root, job)):
                if name.endswith(".gz"):
                    kind = name.split("_")[0].split(".")[0]
                    with open(os.path.join(root, job, name), "rb") as f:
                        out[layout.object_key(PREFIX, NODE, job, kind, name)] = f.read()
    return out


class _Base(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        use_aws_environment(self)
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.server = S3Server(self)
        yield self.server.start()
        self.s3 = self.server.client()
        yield threads.deferToThread(self.s3.create_bucket, Bucket=BUCKET)
        self.gate = S3Gate(self, self.server.port)
        self.gate.open()

    def config(self, archive: dict | None = None, **sections) -> str:
        s3 = {
            "enabled": True,
            "bucket": BUCKET,
            "prefix": PREFIX,
            "region": "us-east-1",
            "endpointUrl": self.gate.url,
            "forcePathStyle": True,
            "interval": "300ms",
            "uploadIdleAfter": "1s",
            "retryInitial": "200ms",
            "retryMax": "1s",
        }
        s3.update(archive or {})
        base = {
            "server": {"nodeId": NODE},
            "archive": {"s3": s3},
            "writer": {"flushInterval": "50ms"},
            "storage": {"segmentMaxBytes": "4KiB"},
            "monitoring": {
                "enabled": True,
                "bindAddress": "127.0.0.1",
                "metricsPort": self.metrics_port,
                "healthPort": self.health_port,
            },
        }
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        return write_service_config(self.dir, base)

    async def start_twistd(self, config: str) -> SpawnedTwistd:
        proc = SpawnedTwistd(self, self.dir, ["--config", config])

        def up():
            d = threads.deferToThread(ping, self.grpc_sock, 1.0)
            return d.addCallback(lambda r: r is not None)

        try:
            await wait_for(up, timeout=30, what="the service answering Ping")
        except AssertionError:
            self.fail(f"service did not start; output:\n{proc.output}")
        return proc

    async def send(self, frames: bytes) -> None:
        await in_thread(send_in_pieces, self.ipc_sock, frames, (65536,))

    def keys(self) -> list:
        """Blocking: every key in the bucket (paginated listing)."""
        return [item["Key"]
                for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for item in page.get("Contents", ())]

    def objects(self) -> dict:
        """Blocking: ``{key: bytes}`` of every object in the bucket (one deleted between the
        listing and its GET is left out)."""
        out = {}
        for key in self.keys():
            try:
                out[key] = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                continue
        return out

    def archive_complete(self) -> bool:
        """Blocking: every local segment is in the bucket byte for byte, with its sidecar."""
        local = _local_segments(self.data_dir)
        remote = self.objects()
        return bool(local) and all(
            remote.get(key) == data and layout.sidecar_key(key) in remote
            for key, data in local.items()
        )

    async def wait_archived(self, timeout: float = 30) -> None:
        await wait_for(lambda: threads.deferToThread(self.archive_complete), timeout=timeout,
                       interval=0.3, what="every local segment archived")

    def scrape(self) -> dict:
        """Blocking: the service's /metrics as ``{sample name with labels: value}``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def health(self) -> tuple[int, dict]:
        """Blocking: the /health status code and document."""
        url = f"http://127.0.0.1:{self.health_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def check_stream(self, remote: dict, job: str, kind: str, expected: bytes) -> None:
        """The archived segments of ``kind``, in name order, gunzip to ``expected``."""
        base = layout.object_key(PREFIX, NODE, job, kind, "")
        names = sorted(k for k in remote if k.startswith(base) and k.endswith(".gz"))
        self.assertTrue(names, f"no archived {kind} of {job}")
        got = b"".join(gzip.decompress(remote[k]) for k in names)
        # Digests, not the bytes: a failure message must stay small enough to report.
        self.assertEqual((len(got), hashlib.sha256(got).hexdigest()),
                         (len(expected), hashlib.sha256(expected).hexdigest()),
                         f"archived {kind} of {job} differs from what was sent")

    async def stop(self, proc) -> None:
        proc.signal("TERM")
        code = await proc.wait_exit(30)
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)


class ArchiveTests(_Base):
    async def test_segments_archived_byte_identical_then_deleted_with_the_job(self):
        """Two jobs' logs and metrics rotate through 4 KiB segments.  Every segment file
        (the closed ones, then the open ones once idle) appears at
        ``{prefix}{nodeId}/{job}/{kind}/{segment}`` with the file's exact bytes and a
        sidecar whose members tile the object; each kind's objects, in name order, gunzip
        to exactly what was sent.  DeleteJob then removes that job's objects (and only
        those)."""
        proc = await self.start_twistd(self.config())
        jobs = ("job-a", "job-b")
        sent = {(job, s): bytearray() for job in jobs for s in (STDOUT, STDERR)}
        for chunk in range(4):  # several appends, so that segments rotate
            frames = bytearray()
            for seq in range(chunk * 30, chunk * 30 + 30):
                for job in jobs:
                    stream = STDOUT if seq % 3 else STDERR
                    content = _content(job, stream, seq)
                    sent[(job, stream)] += content
                    frames += log_frame(job, stream, 1_700_000_000_000_000_000 + seq, seq,
                                        content)
                    frames += metric_frame(job, 1_700_000_000_000_000_000 + seq, seq,
                                           metric_values(seq))
            await self.send(bytes(frames))
            await wait_for(
                lambda n=chunk * 30 + 30: threads.deferToThread(
                    _log_count, self.grpc_sock, "job-b").addCallback(lambda c: c == n),
                what="frames stored",
            )
        await self.wait_archived()
        remote = await threads.deferToThread(self.objects)
        for job in jobs:
            self.check_stream(remote, job, "stdout", bytes(sent[(job, STDOUT)]))
            self.check_stream(remote, job, "stderr", bytes(sent[(job, STDERR)]))
            base = layout.object_key(PREFIX, NODE, job, "metrics", "")
            lines = b"".join(gzip.decompress(remote[k]) for k in sorted(remote)
                             if k.startswith(base) and k.endswith(".gz")).splitlines()
            self.assertEqual([json.loads(x)["timestamp"] for x in lines][:3],
                             [1_700_000_000_000_000_000 + i for i in range(3)])
            self.assertEqual(len(lines), 120)
        rotated = [k for k in remote if "/stdout_000001.log.gz" in k and k.endswith(".gz")]
        self.assertEqual(len(rotated), 2, "segments did not rotate")
        for key, data in remote.items():
            if key.endswith(layout.SIDECAR_SUFFIX):
                doc = layout.parse_sidecar(data)
                obj = remote[key[: -len(layout.SIDECAR_SUFFIX)]]
                self.assertEqual(doc["size"], len(obj))
                ends = [m["offset"] + m["size"] for m in doc["members"]]
                self.assertEqual([m["offset"] for m in doc["members"]], [0] + ends[:-1])
                self.assertEqual(ends[-1], len(obj))
                self.assertEqual(sum(m["count"] for m in doc["members"]) > 0, True)
        scraped = await threads.deferToThread(self.scrape)
        self.assertGreater(scraped['persist_archive_uploaded_bytes_total{backend="s3"}'], 0)
        self.assertEqual(scraped['persist_archive_backlog_bytes{backend="s3"}'], 0)

        answer = await threads.deferToThread(
            grpc_call, self.grpc_sock,
            lambda stub, t: stub.DeleteJob(persist_pb2.DeleteJobRequest(job_uuid="job-a"),
                                           timeout=t))
        self.assertTrue(answer.success)

        def only_b():
            keys = self.keys()
            return keys and all(k.startswith(f"{PREFIX}{NODE}/job-b/") for k in keys)

        await wait_for(lambda: threads.deferToThread(only_b), what="job-a's objects deleted")
        await self.stop(proc)


class OutageTests(_Base):
    async def test_s3_unreachable_ingest_goes_on_retention_waits_everything_archived_after(self):
        """S3 becomes unreachable (the gate drops and refuses connections) while frames keep
        arriving: they are all stored within the flush interval as before, the backlog
        metric grows, health turns unhealthy past backlogUnhealthyBytes and names the
        archive, and retention (a per-job cap and an age limit that would delete almost
        everything) deletes nothing that is not archived.  When S3 is reachable again
        every segment is archived, health recovers, and after retention then dropped the
        archived segments locally the archive still holds every byte that was sent."""
        config = self.config(
            {"backlogUnhealthyBytes": "1KiB"},
            storage={
                "segmentMaxBytes": "4KiB",
                "retention": {"minFreeBytes": 0, "jobMaxBytes": "6KiB", "logMaxAge": "2s",
                              "metricMaxAge": "2s", "activeWindow": "1s", "interval": "300ms"},
            },
        )
        proc = await self.start_twistd(config)
        job = "job-outage"
        sent = {STDOUT: bytearray(), STDERR: bytearray()}
        seq = 0

        async def burst(n):
            nonlocal seq
            frames = bytearray()
            for _ in range(n):
                stream = STDOUT if seq % 4 else STDERR
                content = _content(job, stream, seq)
                sent[stream] += content
                frames += log_frame(job, stream, 1_700_000_000_000_000_000 + seq, seq, content)
                seq += 1
            started = time.monotonic()
            await self.send(bytes(frames))
            await wait_for(
                lambda: threads.deferToThread(_log_count, self.grpc_sock, job).addCallback(
                lambda n: n == seq),
                timeout=10, what="a burst stored",
            )
            return time.monotonic() - started

        await burst(40)
        await self.gate.close()  # S3 unreachable from here on
        outage_times = [await burst(40) for _ in range(3)]
        # Ingest does not wait for S3: each burst is stored as fast as without an archive
        # (the flush interval is 50 ms; a wait on S3 would take at least its retries).
        self.assertLess(max(outage_times), 3.0, outage_times)

        def backlog_and_health():
            scraped = self.scrape()
            status, doc = self.health()
            return (scraped['persist_archive_backlog_bytes{backend="s3"}'] > 1024
                    and scraped['persist_archive_upload_errors_total{backend="s3"}'] > 0
                    and status != 200 and not doc["checks"]["archive"]["ok"])

        await wait_for(lambda: threads.deferToThread(backlog_and_health), timeout=20,
                       what="backlog exported and health degraded")
        # Retention ran many times meanwhile (every 300 ms, age 2 s, cap 6 KiB): every
        # segment written is still on disk, since none is archived.
        await defer.Deferred.fromCoroutine(self._sleep(2.5))
        local = await threads.deferToThread(_local_segments, self.data_dir)
        for kind, stream in (("stdout", STDOUT), ("stderr", STDERR)):
            base = layout.object_key(PREFIX, NODE, job, kind, "")
            data = b"".join(gzip.decompress(local[k]) for k in sorted(local) if k.startswith(base))
            # What the archive took before the outage plus what is local covers everything.
            self.assertTrue(bytes(sent[stream]).endswith(data[-4096:]))
        archived_before = await threads.deferToThread(self.objects)
        for kind, stream in (("stdout", STDOUT), ("stderr", STDERR)):
            base = layout.object_key(PREFIX, NODE, job, kind, "")
            names = sorted(set(k for k in local if k.startswith(base))
                           | set(k for k in archived_before
                                 if k.startswith(base) and k.endswith(".gz")))
            data = b"".join(gzip.decompress(local.get(k) or archived_before[k]) for k in names)
            self.assertTrue(data == bytes(sent[stream]),
                            f"{kind}: data lost during the outage ({len(data)} bytes of "
                            f"{len(sent[stream])})")

        self.gate.open()  # S3 is back

        def all_archived_and_gone():
            # Retention may drop archived segments now (age 2 s): the archive keeps them.
            remote = self.objects()
            status, _doc = self.health()
            if status != 200:
                return False
            for kind, stream in (("stdout", STDOUT), ("stderr", STDERR)):
                base = layout.object_key(PREFIX, NODE, job, kind, "")
                names = sorted(k for k in remote if k.startswith(base) and k.endswith(".gz"))
                if b"".join(gzip.decompress(remote[k]) for k in names) != bytes(sent[stream]):
                    return False
            return True

        await wait_for(lambda: threads.deferToThread(all_archived_and_gone), timeout=40,
                       interval=0.3, what="everything archived after the outage")
        await self.stop(proc)

    async def _sleep(self, seconds):
        from twisted.internet import reactor, task

        await task.deferLater(reactor, seconds, lambda: None)


class CrashTests(_Base):
    async def test_sigkill_during_uploads_then_restart_completes_the_archive(self):
        """Segments of 6 MiB (over the 5 MiB multipart threshold) of incompressible data are
        being uploaded when the service is killed with SIGKILL.  After a restart on the same
        data directory every segment is archived byte for byte (multipart objects included),
        and the stdout objects gunzip to everything that was sent."""
        config = self.config(
            {"multipartThreshold": "5MiB"},
            storage={"segmentMaxBytes": "6MiB"},
        )
        proc = await self.start_twistd(config)
        job = "job-big"
        sent = bytearray()
        rng = random.Random(7)
        frames = bytearray()
        for seq in range(200):
            content = rng.randbytes(64 * 1024)
            sent += content
            frames += log_frame(job, STDOUT, 1_700_000_000_000_000_000 + seq, seq, content)
        await self.send(bytes(frames))
        await wait_for(
            lambda: threads.deferToThread(_log_count, self.grpc_sock, job).addCallback(
                lambda n: n == 200),
            timeout=30, what="frames stored",
        )

        def uploading():
            return self.scrape().get('persist_archive_uploaded_segments_total{backend="s3"}', 0) >= 1

        await wait_for(lambda: threads.deferToThread(uploading), timeout=30,
                       what="the first upload")
        proc.signal("KILL")
        self.assertEqual(await proc.wait_exit(10), -signal.SIGKILL)

        proc = await self.start_twistd(config)
        await self.wait_archived(timeout=60)
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job, "stdout", bytes(sent))
        heads = await threads.deferToThread(
            lambda: [self.s3.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in remote
                     if k.endswith(".log.gz")])
        self.assertTrue(any("-" in etag for etag in heads), f"no multipart upload: {heads}")
        await self.stop(proc)


class SlowDownTests(_Base):
    async def test_503_slowdown_is_retried_until_everything_is_archived(self):
        """While every S3 request is answered with 503 SlowDown, ingest goes on, the upload
        errors are counted, the health detail says uploads are failing (without turning
        unhealthy below the backlog threshold); once S3 accepts requests again every segment
        is archived byte for byte."""
        self.gate.slowdown = True
        proc = await self.start_twistd(self.config())
        job = "job-slow"
        sent = bytearray()
        for chunk in range(3):
            frames = bytearray()
            for seq in range(chunk * 30, chunk * 30 + 30):
                content = _content(job, STDOUT, seq)
                sent += content
                frames += log_frame(job, STDOUT, 1_700_000_000_000_000_000 + seq, seq, content)
            await self.send(bytes(frames))
            await wait_for(
                lambda n=chunk * 30 + 30: threads.deferToThread(
                    _log_count, self.grpc_sock, job).addCallback(lambda c: c == n),
                what="frames stored",
            )

        def failing_but_healthy():
            scraped = self.scrape()
            status, doc = self.health()
            check = doc["checks"]["archive"]
            return (scraped['persist_archive_upload_errors_total{backend="s3"}'] >= 2
                    and status == 200 and check["ok"] and "SlowDown" in check["detail"])

        await wait_for(lambda: threads.deferToThread(failing_but_healthy), timeout=20,
                       what="503s counted and reported")
        self.assertGreater(self.gate.slowdowns, 0)
        self.assertEqual(await threads.deferToThread(self.keys), [])
        self.gate.slowdown = False
        await self.wait_archived()
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job, "stdout", bytes(sent))
        await self.stop(proc)


class ServerRestartTests(_Base):
    async def test_s3_server_process_killed_and_restarted_on_the_same_port(self):
        """The S3 server process itself dies (SIGKILL) while segments are waiting to be
        uploaded and is started again on the same port (empty, like a store that lost
        nothing we had sent yet): the errors are counted meanwhile, and once the bucket is
        back every segment is archived byte for byte."""
        proc = await self.start_twistd(self.config())
        await self.server.stop()
        job = "job-restart"
        sent = bytearray()
        for chunk in range(3):
            frames = bytearray()
            for seq in range(chunk * 30, chunk * 30 + 30):
                content = _content(job, STDERR, seq)
                sent += content
                frames += log_frame(job, STDERR, 1_700_000_000_000_000_000 + seq, seq, content)
            await self.send(bytes(frames))
            await wait_for(
                lambda n=chunk * 30 + 30: threads.deferToThread(
                    _log_count, self.grpc_sock, job).addCallback(lambda c: c == n),
                what="frames stored",
            )
        await wait_for(
            lambda: threads.deferToThread(self.scrape).addCallback(
                lambda m: m['persist_archive_upload_errors_total{backend="s3"}'] >= 1),
            what="upload errors while the server is down",
        )
        await self.server.start()
        await threads.deferToThread(self.s3.create_bucket, Bucket=BUCKET)
        await self.wait_archived()
        remote = await threads.deferToThread(self.objects)
        self.check_stream(remote, job, "stderr", bytes(sent))
        await self.stop(proc)
