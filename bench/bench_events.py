"""Telemetry events query benchmark: a first page and a 1-second window of a 1M-event job.

Builds one job of ``--events`` (default 1,000,000) telemetry events of one kind (default
``socket_data``, the most frequent kind a current joblet-core sends) in a temporary data
directory, directly with the storage appender the service runs on its pool
(``thd_append_events``: JSON lines built from the IPC payloads, seekable gzip members, batches
of ``--batch`` events, the writer's default batchMaxMessages), 100 events per second of
timestamps.  Then it starts ``twistd -n joblet-persist`` on that directory and, from this
process (a separate client process, over the gRPC Unix socket), measures the median latency
(``--runs`` runs, repeated ``--repeat`` times, the median of the medians reported) of:

- ``first_page``: the kind's Query*Events RPC with ``limit`` 100 (the page size the QueryLogs
  benchmark uses);
- ``time_window_1s``: the same RPC with an inclusive 1-second time range in the middle of
  the job (100 events);
- the same two through ``QueryEventsBatched``.

Every answer is checked (count, first sequence) before it is timed.  Results go to stdout as
JSON lines and, with ``--json FILE``, to a file.

    .venv/bin/python bench/bench_events.py                      # about 1-2 minutes
    .venv/bin/python bench/bench_events.py --events 200000      # a quick look

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from bench.bench_ingest import _event_payload  # noqa: E402
from bench.bench_query import _cpu_model, ms, start_service, timed, wait_healthy  # noqa: E402
from joblet_persist import events  # noqa: E402
from joblet_persist._proto import persist_pb2 as pb  # noqa: E402
from joblet_persist._proto import persist_pb2_grpc  # noqa: E402
from joblet_persist.storage.compress import make_compressor  # noqa: E402
from joblet_persist.storage.diskwork import thd_append_events  # noqa: E402

JOB = "bench-events-job"
T0 = 1_764_000_000 * 10**9
SEC = 10**9
EVENTS_PER_SECOND = 100
VARIANTS = 4096
PAGE = 100


def timestamp_of(i: int) -> int:
    """100 events per second, spread over the second."""
    return T0 + (i // EVENTS_PER_SECOND) * SEC + (i % EVENTS_PER_SECOND) * (SEC // 100)


def build_job(data_dir: str, kind: events.EventKind, n: int, batch: int, compressor: str,
              level: int, segment_max: int) -> dict:
    """Write the job's event segment files with the storage appender."""
    comp = make_compressor(compressor, level)
    rng = random.Random(5)
    payloads = [_event_payload(rng, kind.msg_type, JOB, T0, v) for v in range(VARIANTS)]
    directory = os.path.join(data_dir, "events", JOB)
    index, size = 0, 0
    started = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if size >= segment_max:
            index, size = index + 1, 0
        path = os.path.join(directory, kind.segment_name(index))
        seqs = list(range(lo, hi))
        result = thd_append_events(
            path, directory, size, False, comp, 0, JOB, kind,
            [timestamp_of(i) for i in seqs], seqs, seqs,
            [payloads[i % VARIANTS] for i in seqs],
        )  # fmt: skip
        size = result.new_size
    os.sync()
    files = sorted(os.listdir(directory))
    return {
        "build_s": round(time.perf_counter() - started, 1),
        "files": {name: os.path.getsize(os.path.join(directory, name)) for name in files},
    }


def latencies(stub, kind: events.EventKind, n: int, runs: int) -> dict:
    """Median (and min/max) ms of the first page and a 1-second window, per-message RPC and
    QueryEventsBatched."""
    middle = (n // 2) // EVENTS_PER_SECOND
    queries = {
        "first_page": (dict(limit=PAGE), 0, PAGE),
        "time_window_1s": (
            dict(start_time=T0 + middle * SEC, end_time=T0 + middle * SEC + SEC - 1),
            middle * EVENTS_PER_SECOND,
            EVENTS_PER_SECOND,
        ),
    }
    rpc = getattr(stub, kind.rpc)
    out = {}
    for name, (kw, first, count) in queries.items():
        request = pb.QueryTelemetryRequest(job_uuid=JOB, **kw)
        batched_request = pb.QueryEventsBatchedRequest(job_uuid=JOB, kind=kind.msg_type, **kw)

        def per_message(request=request):
            return list(rpc(request, timeout=30))

        def batched(request=batched_request):
            return [
                x for b in stub.QueryEventsBatched(request, timeout=30)
                for x in getattr(b, kind.batch_field)
            ]

        for label, fn in ((kind.rpc, per_message), ("QueryEventsBatched", batched)):
            got = fn()  # warm: also checks the answer
            if len(got) != count or got[0].sequence != first:
                raise SystemExit(f"{name}/{label}: unexpected answer ({len(got)} events, "
                                 f"first {got[0].sequence if got else None})")
            times = timed(fn, runs)
            out[f"{name}/{label}"] = {
                "median_ms": ms(statistics.median(times)),
                "min_ms": ms(min(times)),
                "max_ms": ms(max(times)),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--kind", default="socket_data", choices=sorted(events.KINDS_BY_NAME))
    ap.add_argument("--batch", type=int, default=20_000, help="events per appended batch")
    ap.add_argument("--compressor", default="deflate:5", help="name:level")
    ap.add_argument("--runs", type=int, default=21, help="runs per latency measurement")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the measurement")
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()
    kind = events.KINDS_BY_NAME[args.kind]
    name, level = args.compressor.split(":")
    results: dict = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "events": args.events,
        "kind": kind.name,
    }
    work = tempfile.mkdtemp(prefix="jpe", dir="/tmp")
    proc = None
    try:
        data_dir = os.path.join(work, "data")
        built = build_job(data_dir, kind, args.events, args.batch, name, int(level), 256 << 20)
        results["build"] = built
        print(json.dumps({"build": built}), flush=True)

        t = time.perf_counter()
        proc = start_service(work, data_dir)
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{work}/grpc.sock"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"service did not start; see {work}/twistd.log")
            time.sleep(0.01)
        channel = grpc.insecure_channel(f"unix:{work}/grpc.sock")
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        wait_healthy(stub, proc, work)
        info = stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB), timeout=30)
        results["service_start_and_open_s"] = round(time.perf_counter() - t, 2)
        if info.event_counts.get(kind.name) != args.events:
            raise SystemExit(f"job has {dict(info.event_counts)} events, expected "
                             f"{args.events} {kind.name}")

        runs = [latencies(stub, kind, args.events, args.runs) for _ in range(args.repeat)]
        latency = {
            key: {
                "median_ms": round(statistics.median(r[key]["median_ms"] for r in runs), 2),
                "runs_median_ms": [r[key]["median_ms"] for r in runs],
            }
            for key in runs[0]
        }
        results["latency"] = latency
        print(json.dumps({"latency": latency}), flush=True)
        channel.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
