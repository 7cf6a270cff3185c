"""The CloudWatch backend against a real CloudWatch API: twistd, moto's server, a fault gate.

Every test runs ``twistd joblet-persist`` with ``archive.cloudwatch`` pointed at a
``FaultGate`` (tests/integration/cwgate.py) in front of a ``moto_server`` child
process (the logs and cloudwatch services; tests/integration/s3server.py starts
it), sends frames over the IPC socket and reads CloudWatch back with a boto3
client of its own and the service's own reader (archive/cloudwatch_read.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
import urllib.error
import urllib.request

from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2
from joblet_persist.archive import cloudwatch_api as api
from joblet_persist.archive.cloudwatch_read import CloudWatchReader
from tests.integration.cwgate import FaultGate
from tests.integration.s3server import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    S3Server,
    use_aws_environment,
)
from tests.integration.support import (
    SpawnedTwistd,
    envelope,
    frame,
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
from tests.test_events import SAMPLES, encode_event

NODE = "node-cw"
GROUP = f"/joblet/{NODE}/jobs"
STDOUT, STDERR = 1, 2
DAY_NS = 24 * 3600 * 10**9
HOUR_NS = 3600 * 10**9


def _log_count(sock: str, job: str) -> int:
    """Blocking: the job's stored log count from GetJobInfo; -1 while it is unknown."""
    import grpc

    try:
        info = grpc_call(sock, lambda stub, t: stub.GetJobInfo(
            persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t))
    except grpc.RpcError:
        return -1
    return info.log_count


class _Base(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        use_aws_environment(self)
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.server = S3Server(self)  # moto's server: every service, logs and cloudwatch too
        yield self.server.start()
        self.gate = FaultGate(self, self.server.port)
        self.gate.open()
        self.logs = self._client("logs")
        self.reader = CloudWatchReader(self.logs, GROUP, page_events=50)

    def _client(self, service: str):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION,
        ).client(service, endpoint_url=self.server.url)

    def config(self, cloudwatch: dict | None = None, **sections) -> str:
        cw = {
            "enabled": True,
            "region": REGION,
            "endpointUrl": self.gate.url,
            "interval": "200ms",
            "retryInitial": "100ms",
            "retryMax": "1s",
            "retentionDays": 7,
        }
        cw.update(cloudwatch or {})
        base = {
            "server": {"nodeId": NODE},
            "archive": {"cloudwatch": cw},
            "writer": {"flushInterval": "50ms"},
            "monitoring": {"enabled": True, "bindAddress": "127.0.0.1",
                           "metricsPort": self.metrics_port, "healthPort": self.health_port},
        }
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        return write_service_config(self.dir, base)

    async def start_twistd(self, config: str) -> SpawnedTwistd:
        proc = SpawnedTwistd(self, self.dir, ["--config", config])

        def up():
            return threads.deferToThread(ping, self.grpc_sock, 1.0).addCallback(
                lambda r: r is not None)

        try:
            await wait_for(up, timeout=30, what="the service answering Ping")
        except AssertionError:
            self.fail(f"service did not start; output:\n{proc.output}")
        return proc

    async def stop(self, proc) -> None:
        proc.signal("TERM")
        code = await proc.wait_exit(30)
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)

    async def send(self, frames: bytes) -> None:
        await in_thread(send_in_pieces, self.ipc_sock, frames, (65536,))

    async def stored(self, job: str, n: int) -> None:
        await wait_for(lambda: threads.deferToThread(_log_count, self.grpc_sock, job)
                       .addCallback(lambda c: c == n), timeout=20, what=f"{n} logs of {job} stored")

    def scrape(self) -> dict:
        """Blocking: the service's /metrics as ``{sample name with labels: value}``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def health(self) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.health_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def contents(self, job: str, stream: int) -> list:
        """Blocking: the job's stream as CloudWatch holds it, one entry per message."""
        return [r.content for r in self.reader.iter_logs(job, stream)]

    async def wait_shipped(self, job: str, stream: int, expected: list, timeout=60) -> None:
        def check():
            return self.contents(job, stream) == expected

        await wait_for(lambda: threads.deferToThread(check), timeout=timeout, interval=0.3,
                       what=f"{job} stream {stream} in CloudWatch")


def _line(job: str, stream: int, seq: int) -> bytes:
    return f"{job} {'out' if stream == STDOUT else 'err'} {seq}\n".encode()


class RoundTripTests(_Base):
    async def test_mixed_job_round_trip_exact(self):
        """A mixed job (text, binary chunks, 300 KB text and binary chunks, an empty
        chunk, a 15-day-old and a 3-hour-future chunk, stderr arriving out of timestamp
        order with stdout, metric samples and exec events) ships to
        /joblet/{node}/jobs with upstream's stream names.  Read back from CloudWatch
        alone (local copy deleted): each stream holds exactly the in-range chunks, byte
        for byte, one record per stored message, in timestamp order with millisecond
        timestamps; out-of-range chunks are counted and not sent; samples and events come
        back exactly; PutMetricData received the nine metrics; the group has the
        configured retention."""
        proc = await self.start_twistd(self.config())
        job = "mix-0001"
        now = time.time_ns()
        base = now - HOUR_NS
        rng = random.Random(7)
        chunks = [
            (STDOUT, base + 1_000_000, b"hello\n"),
            (STDERR, base + 500_000, b"err before in time, after in arrival\n"),
            (STDOUT, base + 2_000_000, b"\x00\xff\xfebinary\x80\n"),
            (STDOUT, base + 3_000_000, b"t" * 300_000),
            (STDERR, base + 2_500_000, rng.randbytes(300_000)),
            (STDOUT, base + 4_000_000, b""),
            (STDOUT, now - 15 * DAY_NS, b"fifteen days old\n"),
            (STDERR, now + 3 * HOUR_NS, b"three hours ahead\n"),
            (STDOUT, base + 5_123_456, "ünïcode ✓\n".encode()),
            (STDERR, base + 6_000_000, b"\\x41 is not an escape\n"),
        ]
        frames = bytearray()
        for seq, (stream, ts, content) in enumerate(chunks):
            frames += log_frame(job, stream, ts, seq, content)
        samples = [(base + i * 10**9, 100 + i) for i in range(3)] + [(now - 15 * DAY_NS, 200)]
        for ts, seq in samples:
            frames += metric_frame(job, ts, seq, metric_values(seq))
        for i in range(2):
            payload = encode_event(3, dict(SAMPLES[3]), job=job, ts=base + i, seq=300 + i)
            frames += frame(envelope(3, job, payload, base + i, 300 + i))
        await self.send(bytes(frames))
        await self.stored(job, len(chunks))

        def expected(stream):
            kept = [(ts, c) for s, ts, c in chunks if s == stream
                    and now - 14 * DAY_NS < ts < now + 2 * HOUR_NS]
            return sorted(kept, key=lambda tc: tc[0])  # stable: equal timestamps keep order

        await self.wait_shipped(job, STDOUT, [c for _t, c in expected(STDOUT)])
        await self.wait_shipped(job, STDERR, [c for _t, c in expected(STDERR)])
        # Two log chunks and one sample (the metrics stream may ship after the logs).
        await wait_for(lambda: threads.deferToThread(self.scrape).addCallback(
            lambda m: m["persist_cloudwatch_out_of_range_messages_total"] == 3.0),
            timeout=20, what="three out-of-range messages counted")
        await wait_for(lambda: threads.deferToThread(
            lambda: len(list(self.reader.iter_events(job, "exec"))) == 2),
            timeout=20, what="the exec events in CloudWatch")
        await self.stop(proc)
        shutil.rmtree(self.data_dir)  # CloudWatch is the only copy now

        def read_all():
            return (list(self.reader.iter_logs(job, STDOUT)), list(self.reader.iter_logs(job, 0)),
                    list(self.reader.iter_metrics(job)), list(self.reader.iter_events(job, "exec")),
                    list(self.reader.iter_logs(job, 0, offset=2, limit=3)))

        out, both, metrics, events, window = await threads.deferToThread(read_all)
        self.assertEqual([(r.timestamp, r.sequence, r.content) for r in out],
                         [(ts // 10**6 * 10**6, i, c)
                          for i, (ts, c) in enumerate(expected(STDOUT), start=1)])
        merged = sorted([(ts // 10**6, s, c) for s in (STDOUT, STDERR) for ts, c in expected(s)],
                        key=lambda x: (x[0], x[1]))
        self.assertEqual([(r.timestamp // 10**6, r.stream, r.content) for r in both], merged)
        self.assertEqual(window, both[2:5])
        self.assertEqual([(m.timestamp, m.sequence) for m in metrics], samples[:3])
        self.assertEqual([m.data["memory_usage"] for m in metrics],
                         [metric_values(seq)["memory_usage"] for _ts, seq in samples[:3]])
        self.assertEqual([(e.timestamp, e.sequence) for e in events],
                         [(base, 300), (base + 1, 301)])

        def cloud():
            cw = self._client("cloudwatch")
            names = {m["MetricName"] for m in cw.list_metrics(
                Namespace="Joblet/Jobs",
                Dimensions=[{"Name": "JobUUID", "Value": job}])["Metrics"]}
            groups = self.logs.describe_log_groups(logGroupNamePrefix=GROUP)["logGroups"]
            streams = {s["logStreamName"] for s in self.logs.describe_log_streams(
                logGroupName=GROUP)["logStreams"]}
            return names, groups, streams

        names, groups, streams = await threads.deferToThread(cloud)
        self.assertEqual(names, {name for name, _path, _unit in api.METRICS})
        self.assertEqual([(g["logGroupName"], g.get("retentionInDays")) for g in groups],
                         [(GROUP, 7)])
        self.assertEqual(streams, {f"{job}-stdout", f"{job}-stderr", f"{job}-metrics",
                                   f"{job}-exec-events"})


class OutageTests(_Base):
    async def test_unreachable_then_back_nothing_lost_ingest_unaffected(self):
        """With CloudWatch unreachable ingest goes on (every burst stored), the backlog is
        exported, errors are counted and health turns unhealthy past the threshold; once
        CloudWatch is reachable again every message is shipped, in order, exactly once."""
        proc = await self.start_twistd(self.config({"backlogUnhealthyMessages": 50}))
        job = "out-0001"
        await self.gate.close()
        sent = []
        base = time.time_ns() - HOUR_NS
        for burst in range(3):
            frames = bytearray()
            for seq in range(burst * 40, burst * 40 + 40):
                content = _line(job, STDOUT, seq)
                sent.append(content)
                frames += log_frame(job, STDOUT, base + seq * 10**6, seq, content)
            await self.send(bytes(frames))
            await self.stored(job, len(sent))

        def degraded():
            scraped = self.scrape()
            status, doc = self.health()
            check = doc["checks"]["cloudwatch"]
            return (scraped["persist_cloudwatch_backlog_messages"] == 120
                    and scraped['persist_cloudwatch_errors_total{kind="retryable"}'] >= 1
                    and status != 200 and not check["ok"]
                    and "backlogUnhealthyMessages" in check["detail"])

        await wait_for(lambda: threads.deferToThread(degraded), timeout=20,
                       what="backlog exported and health degraded")
        self.gate.open()
        await self.wait_shipped(job, STDOUT, sent)

        def recovered():
            status, doc = self.health()
            return status == 200 and doc["checks"]["cloudwatch"]["ok"]

        await wait_for(lambda: threads.deferToThread(recovered), timeout=20, what="healthy")
        scraped = await threads.deferToThread(self.scrape)
        self.assertEqual(scraped["persist_cloudwatch_backlog_messages"], 0)
        await self.stop(proc)

    async def test_server_killed_and_restarted(self):
        """The CloudWatch server process dies and comes back empty on the same port: the
        service recreates the group and streams and ships everything it has."""
        proc = await self.start_twistd(self.config())
        await self.server.stop()
        job = "kill-0001"
        base = time.time_ns() - HOUR_NS
        sent = [_line(job, STDERR, i) for i in range(30)]
        await self.send(b"".join(log_frame(job, STDERR, base + i, i, c)
                                 for i, c in enumerate(sent)))
        await self.stored(job, 30)
        await wait_for(lambda: threads.deferToThread(self.scrape).addCallback(
            lambda m: m['persist_cloudwatch_errors_total{kind="retryable"}'] >= 1),
            what="errors while the server is down")
        await self.server.start()
        await self.wait_shipped(job, STDERR, sent)
        await self.stop(proc)


class FaultTests(_Base):
    async def test_throttling_5xx_and_slow_responses(self):
        """Through the fault gate: ThrottlingException, then 503 ServiceUnavailable, then
        responses delayed by a second.  Each fault is counted as retryable and retried
        with backoff; ingest is unaffected; once the faults stop every message is in
        CloudWatch exactly once, in order."""
        proc = await self.start_twistd(self.config())
        job = "flt-0001"
        base = time.time_ns() - HOUR_NS
        sent = []
        seq = 0
        for mode in ("throttle", "unavailable", "slow"):
            self.gate.set_mode(mode)
            frames = bytearray()
            for _ in range(20):
                content = _line(job, STDOUT, seq)
                sent.append(content)
                frames += log_frame(job, STDOUT, base + seq * 10**6, seq, content)
                seq += 1
            await self.send(bytes(frames))
            await self.stored(job, len(sent))
            if mode != "slow":
                before = self.gate.faults
                await wait_for(lambda b=before: self.gate.faults >= b + 2, timeout=20,
                               what=f"{mode} answered twice")
        await self.wait_shipped(job, STDOUT, sent)
        self.gate.set_mode(None)
        scraped = await threads.deferToThread(self.scrape)
        self.assertGreaterEqual(scraped['persist_cloudwatch_errors_total{kind="retryable"}'], 4)
        await self.stop(proc)


class DeleteAndCrashTests(_Base):
    async def test_delete_job_removes_its_streams(self):
        """DeleteJob removes the job's log streams (not another job's) and says that
        PutMetricData data cannot be deleted."""
        proc = await self.start_twistd(self.config())
        base = time.time_ns() - HOUR_NS
        for job in ("del-1", "del-1-keep"):
            await self.send(log_frame(job, STDOUT, base, 0, _line(job, STDOUT, 0))
                            + metric_frame(job, base, 1, metric_values(1)))
            await self.stored(job, 1)
            await self.wait_shipped(job, STDOUT, [_line(job, STDOUT, 0)])
        reply = await threads.deferToThread(grpc_call, self.grpc_sock, lambda stub, t:
                                            stub.DeleteJob(persist_pb2.DeleteJobRequest(
                                                job_uuid="del-1"), timeout=t))
        self.assertTrue(reply.success)
        self.assertIn("PutMetricData cannot be deleted", reply.message)

        def streams():
            return sorted(s["logStreamName"] for s in self.logs.describe_log_streams(
                logGroupName=GROUP)["logStreams"])

        await wait_for(lambda: threads.deferToThread(streams).addCallback(
            lambda names: names == ["del-1-keep-metrics", "del-1-keep-stdout"]),
            timeout=20, what="the deleted job's streams gone")
        await self.stop(proc)

    async def test_sigkill_while_shipping_then_restart_resumes(self):
        """SIGKILL while a large backlog is being shipped: after a restart the shipper
        resumes from its durable cursor; CloudWatch then holds every stored message, in
        order (a batch accepted just before the kill may be there twice), and nothing
        stored is missing."""
        config = self.config()
        self.gate.set_mode("slow", delay=0.3)
        proc = await self.start_twistd(config)
        job = "crash-001"
        base = time.time_ns() - HOUR_NS
        sent = [_line(job, STDOUT, i) + b"x" * 2000 for i in range(3000)]
        await self.send(b"".join(log_frame(job, STDOUT, base + i * 10**6, i, c)
                                 for i, c in enumerate(sent)))
        await self.stored(job, len(sent))
        await wait_for(lambda: threads.deferToThread(self.scrape).addCallback(
            lambda m: m.get("persist_cloudwatch_events_shipped_total", 0) > 0),
            timeout=30, what="some events shipped")
        proc.signal("KILL")
        await proc.wait_exit(30)
        self.gate.set_mode(None)
        proc = await self.start_twistd(config)

        def complete():
            got = self.contents(job, STDOUT)
            deduped = [c for i, c in enumerate(got) if i == 0 or c != got[i - 1]]
            return deduped == sent

        await wait_for(lambda: threads.deferToThread(complete), timeout=90, interval=0.5,
                       what="every stored message in CloudWatch after the restart")
        await self.stop(proc)


class LongTermStoreTests(_Base):
    """``storage.backend: cloudwatch``: queries answered from CloudWatch once local
    retention removed the local copy."""

    def tier_config(self, retention: dict) -> str:
        return self.config(
            storage={"backend": "cloudwatch",
                     "retention": {"activeWindow": "1s", "interval": "500ms", **retention}})

    async def send_job(self, job: str, base: int) -> list:
        sent = [_line(job, STDOUT if i % 3 else STDERR, i) for i in range(12)]
        sent[4] = b"\xff\xfe not utf-8 \x00"
        sent[7] = b"b" * 300_000
        frames = bytearray()
        for i, content in enumerate(sent):
            frames += log_frame(job, STDOUT if i % 3 else STDERR, base + i * 10**6, i, content)
        for i in range(3):
            frames += metric_frame(job, base + i * 10**9, 100 + i, metric_values(i))
        payload = encode_event(3, dict(SAMPLES[3]), job=job, ts=base, seq=200)
        frames += frame(envelope(3, job, payload, base, 200))
        await self.send(bytes(frames))
        await self.stored(job, len(sent))
        await self.wait_shipped(job, 0, sent)
        return sent

    async def gone_locally(self, top: str, job: str) -> None:
        path = os.path.join(self.data_dir, top, job)
        await wait_for(lambda: not os.path.exists(path), timeout=30,
                       what=f"{top} of {job} removed by local retention")

    def query(self, job: str):
        """Blocking: QueryLogs, QueryLogsBatched (offset 2, limit 5), QueryMetrics,
        QueryExecEvents and GetJobInfo of ``job``."""
        def call(stub, t):
            logs = list(stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=job), timeout=t))
            batched = [line for b in stub.QueryLogsBatched(persist_pb2.QueryLogsRequest(
                job_uuid=job, offset=2, limit=5), timeout=t) for line in b.lines]
            metrics = list(stub.QueryMetrics(persist_pb2.QueryMetricsRequest(job_uuid=job),
                                             timeout=t))
            events = list(stub.QueryExecEvents(persist_pb2.QueryTelemetryRequest(job_uuid=job),
                                               timeout=t))
            info = stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=t)
            return logs, batched, metrics, events, info

        return grpc_call(self.grpc_sock, call)

    async def test_whole_job_read_from_cloudwatch_after_local_retention(self):
        """Every part of a job ages out locally once CloudWatch has it; QueryLogs,
        QueryLogsBatched (exact offset/limit), QueryMetrics, QueryExecEvents and GetJobInfo
        then answer from CloudWatch: every chunk byte for byte (the 300 KB one joined
        back, the binary one decoded), samples and events exactly."""
        proc = await self.start_twistd(self.tier_config(
            {"logMaxAge": "1s", "metricMaxAge": "1s", "eventMaxAge": "1s"}))
        job = "lts-0001"
        base = time.time_ns() - HOUR_NS
        sent = await self.send_job(job, base)
        await self.gone_locally("logs", job)
        await self.gone_locally("metrics", job)
        logs, batched, metrics, events, info = await threads.deferToThread(self.query, job)
        self.assertEqual([line.content for line in logs], sent)
        self.assertEqual([(line.timestamp, line.stream) for line in logs],
                         [((base + i * 10**6) // 10**6 * 10**6, STDOUT if i % 3 else STDERR)
                          for i in range(12)])
        self.assertEqual([line.content for line in batched], sent[2:7])
        self.assertEqual([(m.timestamp, m.sequence) for m in metrics],
                         [(base + i * 10**9, 100 + i) for i in range(3)])
        self.assertEqual([m.data.cpu_usage for m in metrics],
                         [metric_values(i)["cpu_usage"] for i in range(3)])
        self.assertEqual([(e.timestamp, e.sequence) for e in events], [(base, 200)])
        self.assertEqual((info.log_count, info.metric_count), (12, 3))
        await self.stop(proc)

    async def test_logs_from_cloudwatch_metrics_still_local(self):
        """Only the logs age out locally: QueryLogs reads them from CloudWatch while
        QueryMetrics still reads the local copy; GetJobInfo counts both."""
        proc = await self.start_twistd(self.tier_config({"logMaxAge": "1s"}))
        job = "lts-0002"
        base = time.time_ns() - HOUR_NS
        sent = await self.send_job(job, base)
        await self.gone_locally("logs", job)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "metrics", job)))
        logs, _batched, metrics, _events, info = await threads.deferToThread(self.query, job)
        self.assertEqual([line.content for line in logs], sent)
        self.assertEqual(len(metrics), 3)
        self.assertEqual((info.log_count, info.metric_count), (12, 3))
        await self.stop(proc)
