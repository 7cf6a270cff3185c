"""SearchLogs, AggregateMetrics and their CLI commands against a real ``twistd`` process.

Data goes in through the IPC socket as joblet-core sends it; the searches run on the
service's query-pool threads over real segment files; the CLI talks to the gRPC Unix socket.
"""

from __future__ import annotations

import io
import json
import os
import signal

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from joblet_persist import cli
from joblet_persist._proto import persist_pb2 as pb
from tests.integration.support import (
    SpawnedTwistd,
    grpc_call,
    log_frame,
    metric_frame,
    metric_values,
    ping,
    query_logs,
    send_in_pieces,
    short_tempdir,
    wait_for,
    write_service_config,
)

JOBS = ["5e1d0c2a-search-a", "5e1d0c2a-search-b"]
T0 = 1_764_000_000 * 10**9
SEC = 10**9
WORDS = [b"request ok", b"ERROR disk full on /dev/sda1", b"warning: slow", b"Error code=42"]


def _run_cli(sock: str, *argv) -> tuple:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n", write_through=True)
    err = io.StringIO()
    code = cli.main(["--socket", sock, *argv], stdout=out, stderr=err)
    return code, out.buffer.getvalue(), err.getvalue()


class SearchTwistdTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.dir = short_tempdir(self)
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")

    async def start(self, sections: dict) -> SpawnedTwistd:
        config = write_service_config(self.dir, sections)
        proc = SpawnedTwistd(self, self.dir, ["--config", config])

        def healthy():
            d = threads.deferToThread(ping, self.grpc_sock, 1.0)
            return d.addCallback(lambda r: r is not None and r.healthy)

        try:
            await wait_for(healthy, timeout=30, what="Ping healthy")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        return proc

    async def fill(self) -> None:
        frames = []
        for j, job in enumerate(JOBS):
            for i in range(3000):
                content = b"%s line %d %s\n" % (job.encode(), i, WORDS[(i + j) % 4])
                frames.append(log_frame(job, 1 + (i % 5 == 0), T0 + i * SEC, i, content))
            for i in range(120):
                frames.append(metric_frame(job, T0 + i * 10 * SEC, i, metric_values(i)))
        await threads.deferToThread(send_in_pieces, self.ipc_sock, b"".join(frames))

        def stored():
            def count(stub, t):
                return [stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=j), timeout=t)
                        for j in JOBS]

            d = threads.deferToThread(grpc_call, self.grpc_sock, count)
            d.addCallback(lambda infos: all(i.log_count == 3000 and i.metric_count == 120
                                            for i in infos))
            d.addErrback(lambda _: False)
            return d

        await wait_for(stored, timeout=30, what="every frame stored")

    async def test_search_aggregate_and_sigterm(self):
        """grep over one job and over all jobs returns exactly the stored messages that
        match, in arrival order (QueryLogs filtered by RE2 is the reference), scanned on the
        query-pool over many members; a byte bound ends a search with RESOURCE_EXHAUSTED
        after its partial results; metrics --agg aggregates in steps; SIGTERM then stops the
        service cleanly."""
        proc = await self.start({
            # Small flushes: each job spans many members, so the scan has work to share.
            "writer": {"batchMaxMessages": 100, "flushInterval": "100ms"},
            "query": {"searchThreads": 2, "searchMaxBytes": "64KiB"},
        })
        await self.fill()
        sock = self.grpc_sock
        everything = {job: await threads.deferToThread(query_logs, sock, job) for job in JOBS}

        def want(job, pred):
            return b"".join(x.content for x in everything[job] if pred(x.content))

        # One job, case-insensitive substring, both streams merged.
        code, out, err = await threads.deferToThread(
            _run_cli, sock, "grep", "-i", "error", JOBS[0], "--max-scan", "0")
        # The service's 64 KiB bound is smaller than a job: RESOURCE_EXHAUSTED with the
        # matches of what was scanned first.
        self.assertEqual(code, 1)
        self.assertIn("RESOURCE_EXHAUSTED", err)
        self.assertIn("start_time=", err)
        full = want(JOBS[0], lambda c: b"error" in c.lower())
        self.assertTrue(out and full.startswith(out),
                        f"partial results are a prefix: {out[:200]!r} {len(out)} {err}")

        # A time range small enough for the bound: exactly the matching messages.
        since, until = f"{T0 + 100 * SEC}ns", f"{T0 + 400 * SEC}ns"
        code, out, err = await threads.deferToThread(
            _run_cli, sock, "grep", "-E", r"code=\d+$", JOBS[1], "--since", since,
            "--until", until)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, b"".join(
            x.content for x in everything[JOBS[1]]
            if T0 + 100 * SEC <= x.timestamp <= T0 + 400 * SEC and b"code=" in x.content))

        # All jobs, as JSON records naming each job.
        code, out, err = await threads.deferToThread(
            _run_cli, sock, "grep", "disk full", "--all-jobs", "--since", since, "--until",
            until, "--json")
        self.assertEqual((code, err), (0, ""))
        records = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual({r["job_uuid"] for r in records}, set(JOBS))
        for job in JOBS:
            self.assertEqual(
                [r["sequence"] for r in records if r["job_uuid"] == job],
                [x.sequence for x in everything[job]
                 if T0 + 100 * SEC <= x.timestamp <= T0 + 400 * SEC
                 and b"disk full" in x.content])

        # An invalid pattern is INVALID_ARGUMENT naming the problem.
        def bad(stub, t):
            return list(stub.SearchLogs(pb.SearchLogsRequest(
                job_uuid=JOBS[0], pattern="a(", regex=True), timeout=t))

        with self.assertRaises(grpc.RpcError) as caught:
            await threads.deferToThread(grpc_call, sock, bad)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("missing )", caught.exception.details())

        # Aggregation of the metrics in 1-minute steps.
        code, out, err = await threads.deferToThread(
            _run_cli, sock, "metrics", JOBS[0], "--step", "1m", "--agg", "count,max",
            "--fields", "cpu_usage", "--json")
        self.assertEqual((code, err), (0, ""))
        points = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(sum(p["values"]["cpu_usage"]["count"] for p in points), 120)
        self.assertTrue(all(p["timestamp_ns"] % (60 * SEC) == 0 for p in points))

        proc.signal("TERM")
        try:
            status = await proc.wait_exit(20)
        except defer.TimeoutError:
            self.fail(f"the service did not exit; output:\n{proc.output}")
        self.assertIn(status, (0, -signal.SIGTERM), proc.output)
