"""Telemetry events through a real ``twistd -n joblet-persist``: mixed ingest read back
exactly through gRPC and through the files, and SIGKILL during an events-heavy ingest.

Frames are hand-encoded from the protocol's field numbers (tests.test_events' encoder).
Real reactor, real processes (posix_spawn, see support.SpawnedTwistd), real sockets and
files; blocking clients run in threads.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import threading
import time

import grpc
from twisted.internet import defer, threads

from joblet_persist import events
from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from joblet_persist.cli import stored_event_dict
from tests.integration.support import (
    check_gzip_files,
    envelope,
    frame,
    in_thread,
    log_frame,
    metric_frame,
    metric_values,
    send_in_pieces,
    wait_for,
    write_service_config,
)
from tests.integration.test_crash import _Base
from tests.test_events import SAMPLES, encode_event
from tests.test_ingest_events import expected_data

BASE_TS = 1_720_000_000_000_000_000
U64_MAX = (1 << 64) - 1
CONNECTIONS = 4
JOBS = [f"ev-{i:03d}-4000-8000-{i:012d}" for i in range(100)]


def _values(rng: random.Random, t: int, job_index: int, n: int) -> dict:
    """Event field values of type ``t``: the sample, varied, with the edge cases spread
    over the jobs (max uint64, empty strings, 1,000 args, invalid UTF-8)."""
    values = dict(SAMPLES[t])
    values["pid"] = rng.randrange(1 << 32)
    if "comm" in values:
        values["comm"] = [b"\xff\xfeproc", "", "sh", f"p{n}"][(job_index + n) % 4]
    if t == 3 and job_index % 25 == 0 and n == 0:
        values["args"] = [f"arg{i}" for i in range(1000)]
    if t in (7, 8) and n % 2 == 0:
        values["addr"], values["length"] = U64_MAX, U64_MAX
    if t == 9:
        values["bytes"] = rng.choice([-(1 << 63), 0, (1 << 63) - 1, 174])
    return values


class _Mixed:
    """The frames of each connection and what each job must read back."""

    def __init__(self):
        self.data = [bytearray() for _ in range(CONNECTIONS)]
        self.events: dict = {}  # (job, kind name) -> [expected stored dict]
        self.logs: dict = {}  # job -> [content]
        self.metrics: dict = {}  # job -> count
        rng = random.Random(12)
        for j, job in enumerate(JOBS):
            out = self.data[j % CONNECTIONS]
            seq = 0
            for n in range(6):
                ts = BASE_TS + j * 10_000_000 + n * 1000
                for t in range(3, 10):
                    if (j + n + t) % 3 == 0:
                        continue
                    values = _values(rng, t, j, n)
                    payload = encode_event(t, values, job="payload-copy", ts=ts + t, seq=seq)
                    out += frame(envelope(t, job, payload, ts + t, seq))
                    self.events.setdefault((job, events.KINDS_BY_TYPE[t].name), []).append(
                        expected_data(t, values, job, ts + t, seq)
                    )
                    seq += 1
                content = f"{job} line {n}\n".encode()
                out += log_frame(job, 1 + n % 2, ts, seq, content)
                self.logs.setdefault(job, []).append(content)
                seq += 1
                if n % 3 == 0:
                    out += metric_frame(job, ts + 1, seq, metric_values(seq))
                    self.metrics[job] = self.metrics.get(job, 0) + 1
                    seq += 1


def _read_back(sock: str, mixed: _Mixed) -> dict:
    """Blocking: every job's events of every kind over one gRPC channel: per-kind RPCs for
    even jobs, QueryEventsBatched for odd ones; plus GetJobInfo and the logs."""
    got = {}
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        for j, job in enumerate(JOBS):
            for kind in events.KINDS:
                if j % 2 == 0:
                    rpc = getattr(stub, kind.rpc)
                    messages = list(rpc(persist_pb2.QueryTelemetryRequest(job_uuid=job),
                                        timeout=30))
                else:
                    request = persist_pb2.QueryEventsBatchedRequest(job_uuid=job,
                                                                    kind=kind.msg_type)
                    messages = [m for b in stub.QueryEventsBatched(request, timeout=30)
                                for m in getattr(b, kind.batch_field)]
                got[(job, kind.name)] = [stored_event_dict(kind, m) for m in messages]
            info = stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=30)
            logs = stub.QueryLogs(persist_pb2.QueryLogsRequest(job_uuid=job), timeout=30)
            got[job] = (info, [line.content for line in logs])
        got["stats"] = stub.GetStats(persist_pb2.GetStatsRequest(), timeout=30)
    return got


def _zcat_events(data_dir: str) -> dict:
    """Blocking: (job, kind name) -> the JSON objects of its event files, in name order."""
    out = {}
    top = os.path.join(data_dir, "events")
    for job in sorted(os.listdir(top)):
        for name in sorted(os.listdir(os.path.join(top, job))):
            kind = name.split(".")[0].rsplit("_events", 1)[0]
            with gzip.open(os.path.join(top, job, name)) as f:
                out.setdefault((job, kind), []).extend(
                    json.loads(line) for line in f.read().splitlines()
                )
    return out


class MixedIngestTests(_Base):
    timeout = 120

    async def test_mixed_stream_read_back_exactly(self):
        """Logs, metrics and all seven event kinds for 100 jobs over 4 connections (sent in
        odd pieces) read back exactly: every event through gRPC (per-kind and batched RPCs)
        and through zcat of the per-kind files under events/<job>/, in arrival order; job
        info and stats count them; the logs and metrics beside them are intact."""
        config = write_service_config(self.dir, {"writer": {"flushInterval": 0.2}})
        proc = await self.start_twistd(config)
        mixed = _Mixed()
        total_events = sum(len(v) for v in mixed.events.values())
        await defer.gatherResults(
            [in_thread(send_in_pieces, self.ipc_sock, bytes(d)) for d in mixed.data],
            consumeErrors=True,
        )

        def all_stored():
            def count():
                with grpc.insecure_channel(f"unix:{self.grpc_sock}") as channel:
                    stub = persist_pb2_grpc.PersistServiceStub(channel)
                    return stub.GetStats(persist_pb2.GetStatsRequest(), timeout=5).total_events
            return threads.deferToThread(count).addCallback(lambda n: n == total_events)

        await wait_for(all_stored, timeout=60, interval=0.2, what="every event stored")
        got = await threads.deferToThread(_read_back, self.grpc_sock, mixed)
        for key, expected in mixed.events.items():
            self.assertEqual(got[key], expected, key)
        for kind in events.KINDS:
            for job in JOBS:
                if (job, kind.name) not in mixed.events:
                    self.assertEqual(got[(job, kind.name)], [], (job, kind.name))
        for job in JOBS:
            info, logs = got[job]
            self.assertEqual(logs, mixed.logs[job])
            self.assertEqual(info.metric_count, mixed.metrics.get(job, 0))
            counts = {}
            for (j, kind), rows in mixed.events.items():
                if j == job:
                    counts[kind] = len(rows)
            self.assertEqual(dict(info.event_counts), counts)
            self.assertEqual(info.event_count, sum(counts.values()))
        self.assertEqual(got["stats"].total_events, total_events)

        proc.signal("TERM")
        self.assertIn(await self.wait_exit(proc, 30), (0, -signal.SIGTERM), proc.output)
        await threads.deferToThread(check_gzip_files, self, self.data_dir)
        on_disk = await threads.deferToThread(_zcat_events, self.data_dir)
        self.assertEqual(on_disk, mixed.events)


class EventHealthTests(_Base):
    timeout = 60

    async def test_health_reports_event_rejections(self):
        """A real service's /health has an ipc_events entry: accepted events by kind,
        rejected ones by reason and kind, the last rejection named in the detail, and the
        verdict still healthy (200)."""
        import treq

        from tests.integration.support import free_port

        port = free_port()
        config = write_service_config(self.dir, {
            "writer": {"flushInterval": 0.2},
            "monitoring": {"enabled": True, "metricsPort": free_port(), "healthPort": port},
        })
        proc = await self.start_twistd(config)
        job = JOBS[0]
        data = b"".join([
            frame(envelope(3, job, encode_event(3, SAMPLES[3]), 1, 1)),
            frame(envelope(7, job, b"\xff\xff\xff", 2, 2)),
            frame(envelope(9, job, encode_event(9, SAMPLES[9]), 3, 3)),
        ])
        await in_thread(send_in_pieces, self.ipc_sock, data)

        async def reported():
            response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
            body = json.loads(await response.content())
            entry = body["checks"].get("ipc_events", {})
            if entry.get("accepted_total") == 2 and entry.get("rejected_total") == 1:
                return response.code, body
            return None

        code, body = await wait_for(reported, timeout=30, interval=0.1, what="/health events")
        self.assertEqual((code, body["status"]), (200, "healthy"))
        entry = body["checks"]["ipc_events"]
        self.assertTrue(entry["ok"])
        self.assertEqual(entry["accepted_by_kind"], {"exec": 1, "file": 1})
        self.assertEqual(entry["rejected_by_kind"], {"mmap": {"bad_payload": 1}})
        self.assertEqual(entry["last_rejected"], {"kind": "mmap", "reason": "bad_payload"})
        self.assertIn("rejecting telemetry events (last: mmap bad_payload", entry["detail"])
        proc.signal("TERM")
        self.assertIn(await self.wait_exit(proc, 30), (0, -signal.SIGTERM), proc.output)


class EventSender:
    """Sends event frames of every kind for each job at a steady pace, one connection and
    one thread per job.  ``sent[(job, kind)]`` lists ``(seq, monotonic time of sendall)``;
    sequences count 0, 1, 2, ... per (job, kind)."""

    def __init__(self, path: str, jobs, tick: float = 0.01, per_tick: int = 14):
        self.path = path
        self.jobs = list(jobs)
        self.tick = tick
        self.per_tick = per_tick
        self.sent = {(job, k.name): [] for job in self.jobs for k in events.KINDS}
        self.started_at = None
        self._stop = threading.Event()

    def start(self) -> defer.Deferred:
        self.started_at = time.monotonic()
        return defer.gatherResults([in_thread(self._run, job) for job in self.jobs])

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def values(t: int, seq: int) -> dict:
        values = dict(SAMPLES[t])
        values["pid"] = seq
        return values

    def _run(self, job: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        counters = dict.fromkeys(range(3, 10), 0)
        i = 0
        try:
            sock.connect(self.path)
            next_tick = time.monotonic()
            while not self._stop.is_set():
                for _ in range(self.per_tick):
                    t = 3 + i % 7
                    i += 1
                    seq = counters[t]
                    counters[t] = seq + 1
                    ts = BASE_TS + seq * 1_000_003
                    payload = encode_event(t, self.values(t, seq), ts=ts, seq=seq)
                    sock.sendall(frame(envelope(t, job, payload, ts, seq)))
                    self.sent[(job, events.KINDS_BY_TYPE[t].name)].append((seq, time.monotonic()))
                # Pacing of the load generator (not a wait for the service).
                next_tick += self.tick
                self._stop.wait(max(0.0, next_tick - time.monotonic()))
        except OSError:
            pass
        finally:
            sock.close()


class EventSigkillTests(_Base):
    timeout = 90

    async def test_sigkill_during_event_ingest_then_restart(self):
        """A service receiving a steady stream of events of every kind is killed with
        SIGKILL and restarted on the same data directory: every .gz file decodes; per job
        and kind the stored events are a prefix of what was sent (sequences 0..k-1, exact
        fields, in order); everything sent more than flushInterval + 3 s before the kill is
        stored; the job index counts what is stored; the event files rotated."""
        flush = 0.2
        config = write_service_config(
            self.dir, {"writer": {"flushInterval": flush}, "storage": {"segmentMaxBytes": "4KiB"}}
        )
        proc = await self.start_twistd(config)
        jobs = ["kill-ev-1", "kill-ev-2"]
        sender = EventSender(self.ipc_sock, jobs)
        sending = sender.start()
        run_for = flush + 3.0 + 1.0
        await wait_for(lambda: time.monotonic() - sender.started_at >= run_for,
                       timeout=run_for + 10, what="the sender to run")
        killed_at = time.monotonic()
        proc.signal("KILL")
        self.assertEqual(await self.wait_exit(proc, 10), -signal.SIGKILL)
        sender.stop()
        await sending

        proc = await self.start_twistd(config)
        cutoff = killed_at - flush - 3.0

        def read_all():
            out = {}
            with grpc.insecure_channel(f"unix:{self.grpc_sock}") as channel:
                stub = persist_pb2_grpc.PersistServiceStub(channel)
                for job in jobs:
                    for kind in events.KINDS:
                        request = persist_pb2.QueryTelemetryRequest(job_uuid=job)
                        out[(job, kind.name)] = list(getattr(stub, kind.rpc)(request, timeout=30))
                    out[job] = stub.GetJobInfo(
                        persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=30
                    )
            return out

        got = await threads.deferToThread(read_all)
        for job in jobs:
            counts = {}
            for kind in events.KINDS:
                messages = got[(job, kind.name)]
                seqs = [m.sequence for m in messages]
                self.assertEqual(seqs, list(range(len(seqs))), f"{job}/{kind.name}: not a prefix")
                sent = sender.sent[(job, kind.name)]
                self.assertLessEqual(len(seqs), len(sent))
                required = sum(1 for _, t in sent if t < cutoff)
                self.assertGreater(required, 0)
                self.assertGreaterEqual(len(seqs), required, f"{job}/{kind.name}: lost data")
                for m in messages:
                    self.assertEqual(
                        stored_event_dict(kind, m),
                        expected_data(kind.msg_type, EventSender.values(kind.msg_type, m.sequence),
                                      job, BASE_TS + m.sequence * 1_000_003, m.sequence),
                    )
                counts[kind.name] = len(messages)
            self.assertEqual(dict(got[job].event_counts), counts)
            names = os.listdir(os.path.join(self.data_dir, "events", job))
            self.assertTrue(any(n.startswith("exec_events_0") for n in names), names)
        await threads.deferToThread(check_gzip_files, self, self.data_dir)
        proc.signal("TERM")
        self.assertIn(await self.wait_exit(proc, 30), (0, -signal.SIGTERM), proc.output)
