"""Tiering through a real twistd: retention releases archived jobs, queries read S3.

The service runs with ``archive.s3`` pointed at an S3Gate in front of moto's server
(tests/integration/s3server.py).  Age retention releases an idle, archived job's local
copy; QueryLogs, GetJobInfo, ListJobs and GetStats then answer from the archive; with
S3 unreachable a query fails with UNAVAILABLE naming the job instead of hanging; a
restart on an empty data directory (a lost disk) rebuilds the catalog from the bucket;
and a node with another nodeId reads the job with the request's node_id.
"""

from __future__ import annotations

import os
import shutil
import time

import grpc
from twisted.internet import threads

from joblet_persist._proto import persist_pb2
from tests.integration.support import grpc_call, log_frame, wait_for
from tests.integration.test_archive import NODE, STDERR, STDOUT, _Base, _content

JOB = "job-tiered"
T0 = 1_700_000_000_000_000_000


def _query(sock: str, job: str, node_id: str = "", **kw) -> list:
    """Blocking: (stream, timestamp, content) of every LogLine QueryLogs returns."""
    request = persist_pb2.QueryLogsRequest(job_uuid=job, node_id=node_id, **kw)
    lines = grpc_call(sock, lambda stub, t: list(stub.QueryLogs(request, timeout=t)), 30)
    return [(m.stream, m.timestamp, m.content) for m in lines]


def _unary(sock: str, method: str, request):
    return grpc_call(sock, lambda stub, t: getattr(stub, method)(request, timeout=t))


class TieringTests(_Base):
    timeout = 180

    def tier_config(self, node: str = NODE) -> str:
        return self.config(
            {"readTimeout": "1s"},
            server={"nodeId": node},
            storage={
                "segmentMaxBytes": "4KiB",
                "retention": {"minFreeBytes": 0, "logMaxAge": "2s", "metricMaxAge": "2s",
                              "eventMaxAge": "2s", "activeWindow": "1s", "interval": "300ms"},
            },
        )

    async def test_released_job_answers_from_s3_rebuilt_after_disk_loss_and_across_nodes(self):
        """An idle job is archived, then age retention releases its local files; every
        query answers from S3 exactly as before (and persist_archive_read_bytes_total
        counts the fetches); S3 unreachable makes QueryLogs UNAVAILABLE naming the job
        within seconds; after the data directory is lost, a restart lists the bucket and
        answers again; another node reads the job with node_id."""
        proc = await self.start_twistd(self.tier_config())
        frames = bytearray()
        expected = []
        for seq in range(300):
            stream = STDOUT if seq % 5 else STDERR
            content = _content(JOB, stream, seq)
            frames += log_frame(JOB, stream, T0 + seq * 1_000_000, seq, content)
            expected.append((stream, T0 + seq * 1_000_000, content))
        await self.send(bytes(frames))
        job_dir = os.path.join(self.data_dir, "logs", JOB)

        def released():
            return not os.path.exists(job_dir) and self.scrape().get(
                'persist_archive_uploaded_segments_total{backend="s3"}', 0) > 0

        await wait_for(lambda: threads.deferToThread(released), timeout=40, interval=0.3,
                       what="the job archived and its local copy released")
        got = await threads.deferToThread(_query, self.grpc_sock, JOB)
        self.assertTrue(got == expected, f"{len(got)} lines read back, {len(expected)} sent")
        page = await threads.deferToThread(_query, self.grpc_sock, JOB, offset=250, limit=10)
        self.assertEqual(page, expected[250:260])
        info = await threads.deferToThread(
            _unary, self.grpc_sock, "GetJobInfo", persist_pb2.GetJobInfoRequest(job_uuid=JOB))
        self.assertEqual(info.log_count, 300)
        listed = await threads.deferToThread(
            _unary, self.grpc_sock, "ListJobs", persist_pb2.ListJobsRequest())
        self.assertEqual([j.job_uuid for j in listed.jobs], [JOB])
        stats = await threads.deferToThread(
            _unary, self.grpc_sock, "GetStats", persist_pb2.GetStatsRequest())
        self.assertEqual((stats.total_jobs, stats.total_logs), (1, 300))
        scraped = await threads.deferToThread(self.scrape)
        self.assertGreater(scraped['persist_archive_read_bytes_total{backend="s3"}'], 0)
        # The storage metric counts what is on disk: nothing of the released job.
        self.assertEqual(scraped["persist_storage_bytes"], 0)

        await self.gate.close()
        started = time.monotonic()
        with self.assertRaises(grpc.RpcError) as caught:
            await threads.deferToThread(_query, self.grpc_sock, JOB)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn(JOB, caught.exception.details())
        self.assertLess(time.monotonic() - started, 15)
        self.gate.open()
        await self.stop(proc)

        # The disk is lost: the restarted node rebuilds its catalog from the bucket.
        shutil.rmtree(self.data_dir)
        proc = await self.start_twistd(self.tier_config())

        def listed_again():
            answer = _unary(self.grpc_sock, "ListJobs", persist_pb2.ListJobsRequest())
            return [j.job_uuid for j in answer.jobs] == [JOB]

        await wait_for(lambda: threads.deferToThread(listed_again), timeout=30, interval=0.3,
                       what="the archived job listed after the restart")
        got = await threads.deferToThread(_query, self.grpc_sock, JOB)
        self.assertTrue(got == expected, f"{len(got)} lines read back after the rebuild")
        await self.stop(proc)

        # Another node reads node-a's job from the shared bucket by node_id.
        shutil.rmtree(self.data_dir)
        proc = await self.start_twistd(self.tier_config(node="node-b"))
        with self.assertRaises(grpc.RpcError) as caught:
            await threads.deferToThread(_query, self.grpc_sock, JOB)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)
        got = await threads.deferToThread(_query, self.grpc_sock, JOB, node_id=NODE)
        self.assertTrue(got == expected, f"{len(got)} lines read from node {NODE}'s archive")
        await self.stop(proc)
