"""Tail and follow benchmark: TailLogs on a job of millions of lines, follow latency under
full-speed ingest, and ingest speed with 100 followers against none, in one run.

1. Builds one job of ``--lines`` (default 5,000,000) lines of about 100 bytes with the
   storage appender (as bench_query.py does: one line in ten on stderr, batches of 20,000),
   starts ``twistd -n joblet-persist`` on it and measures TailLogs latency for N = 100
   (both streams, stdout, stderr; ``--runs`` runs, median and p95), measured by this
   client over the gRPC Unix socket; and, once, inflating the whole job with zlib (what
   ``zcat FILES | tail -n 100`` must do) for comparison.
2. Follow latency: a sender process pushes ``--frames`` log frames as fast as the service
   takes them (10 jobs, as bench_ingest.py), while a probe process sends one line every
   5 ms to the followed job carrying its send time (CLOCK_REALTIME ns); a follower in this
   process follows that job (FOLLOW_FROM_NOW) and records, for each probe line, receive
   time minus send time.  Percentiles over every probe line.
3. Ingest rate with 100 followers against none: the same frames sent at full speed, the
   time until GetStats shows them all written; phases alternate (0, 100, 0, 100, ...,
   ``--repeat`` pairs) in the same run.  The 100 followers run in a separate process on
   one asyncio loop (grpc.aio), following one of the 10 jobs and counting the bytes of
   the messages without parsing them.  Reports the ratio of the medians and how many followers
   were cut off (RESOURCE_EXHAUSTED).  Then the same with the 100 followers on a job of
   its own fed at a steady pace (``--busy-interval``: one line per millisecond, about, by
   default) while the 10 other jobs ingest at full speed.

    .venv/bin/python bench/bench_follow.py                  # the full run, about 2-3 minutes
    .venv/bin/python bench/bench_follow.py --lines 500000   # a quick look

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from bench.bench_ingest import encode_frames, make_lines  # noqa: E402
from bench.bench_query import JOB, _cpu_model, build_job, inflate_all_zlib, job_files  # noqa: E402
from joblet_persist._proto import persist_pb2 as pb  # noqa: E402
from joblet_persist._proto import persist_pb2_grpc  # noqa: E402

FOLLOWED = "bench-job-0000"  # one of the 10 jobs of encode_frames
FOLLOW_METHOD = "/joblet.persist.PersistService/FollowLogs"


def start_service(work: str, data_dir: str) -> subprocess.Popen:
    cfg = os.path.join(work, "persist.yml")
    with open(cfg, "w") as f:
        f.write(
            f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n"
            f"  maxConcurrentRpcs: 256\n"
            f"ipc:\n  socket: {work}/ipc.sock\n"
            f"storage:\n  dataDir: {data_dir}\n"
            f"monitoring:\n  enabled: false\n"
            f"logging:\n  level: warn\n"
        )
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "--logfile", os.path.join(work, "twistd.log"), "joblet-persist",
         "--config", cfg],
        env=env, cwd=work,
    )


def connect(work: str, proc) -> tuple:
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{work}/grpc.sock"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"service did not start; see {work}/twistd.log")
        time.sleep(0.01)
    channel = grpc.insecure_channel(f"unix:{work}/grpc.sock")
    stub = persist_pb2_grpc.PersistServiceStub(channel)
    while True:
        try:
            if stub.Ping(pb.PingRequest(), timeout=1).healthy:
                return channel, stub
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"service did not start; see {work}/twistd.log")
        time.sleep(0.05)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def pct(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


# -- 1. tail ---------------------------------------------------------------------------


def tail_latencies(stub, runs: int) -> dict:
    out = {}
    for name, stream in (("both", 0), ("stdout", 1), ("stderr", 2)):
        request = pb.TailLogsRequest(job_uuid=JOB, stream=stream, lines=100)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            got = sum(len(b.lines) for b in stub.TailLogs(request, timeout=30))
            times.append(time.perf_counter() - t)
            if got != 100:
                raise SystemExit(f"TailLogs returned {got} lines")
        out[name] = {"median_ms": ms(statistics.median(times)), "p95_ms": ms(pct(times, 0.95))}
    return out


# -- 2. follow latency ---------------------------------------------------------------------


def _sender(path: str, frames: int, ready, go, done) -> None:
    """A separate process pushing pre-encoded log frames (10 jobs) into the IPC socket."""
    import socket

    lines = make_lines(20_000, 3, 100)
    payload, _ = encode_frames([lines[i % 20_000] for i in range(frames)], 10, 0, 1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    ready.set()
    go.wait()
    view = memoryview(payload)
    for off in range(0, len(view), 1 << 20):
        s.sendall(view[off: off + (1 << 20)])
    done.set()
    s.close()


def _prober(path: str, interval: float, stop, job: str = FOLLOWED) -> None:
    """A separate process sending one line to ``job`` every ``interval`` seconds (about),
    whose content is its send time (CLOCK_REALTIME ns)."""
    import socket
    import struct

    from joblet_persist._proto import ipc_pb2

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    seq = 0
    while not stop.is_set():
        seq += 1
        now = time.time_ns()
        line = ipc_pb2.LogLine(job_uuid=job, stream=1, timestamp=now, sequence=seq,
                               content=b"probe %d\n" % now)
        env = ipc_pb2.IPCMessage(version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job,
                                 timestamp=now, sequence=seq, data=line.SerializeToString())
        body = env.SerializeToString()
        s.sendall(struct.pack(">I", len(body)) + body)
        time.sleep(interval)
    s.close()


def _written(stub) -> int:
    return stub.GetStats(pb.GetStatsRequest(), timeout=10).messages_written


def push(stub, work: str, frames: int) -> float:
    """Send ``frames`` at full speed from a separate process; seconds until all written."""
    before = _written(stub)
    ctx = multiprocessing.get_context("spawn")
    ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
    p = ctx.Process(target=_sender, args=(f"{work}/ipc.sock", frames, ready, go, done))
    p.start()
    ready.wait(120)
    t0 = time.perf_counter()
    go.set()
    while _written(stub) - before < frames:
        if time.perf_counter() - t0 > 150:
            raise SystemExit("ingest did not finish within 150 s")
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    p.join(30)
    return elapsed


def follow_latency(stub, work: str, frames: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    latencies: list = []
    lines = [0]
    request = pb.FollowLogsRequest(job_uuid=FOLLOWED, start_from=pb.FOLLOW_FROM_NOW)
    call = stub.FollowLogs(request)
    status: dict = {}

    def follow():
        try:
            for batch in call:
                now = time.time_ns()
                lines[0] += len(batch.lines)
                for m in batch.lines:
                    if m.content.startswith(b"probe "):
                        latencies.append((now - int(m.content[6:])) / 1e9)
        except grpc.RpcError as e:
            status["code"] = e.code().name

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    prober = ctx.Process(target=_prober, args=(f"{work}/ipc.sock", 0.005, stop))
    prober.start()
    deadline = time.monotonic() + 30
    while len(latencies) < 50 and time.monotonic() < deadline:  # probes on the idle service
        time.sleep(0.01)
    idle = len(latencies)
    elapsed = push(stub, work, frames)
    stop.set()
    prober.join(10)
    time.sleep(0.3)
    call.cancel()
    reader.join(10)
    busy = latencies[idle:]
    return {
        "ingest_frames_per_s": round(frames / elapsed),
        "probes": len(busy),
        "p50_ms": ms(pct(busy, 0.5)),
        "p90_ms": ms(pct(busy, 0.9)),
        "p99_ms": ms(pct(busy, 0.99)),
        "max_ms": ms(max(busy)),
        "idle_p50_ms": ms(pct(latencies[:idle], 0.5)) if idle else None,
        "follower_lines": lines[0],
        "follower_status": status.get("code"),  # CANCELLED: by the benchmark, at the end
    }


# -- 3. ingest with 100 followers -------------------------------------------------------


def _followers(sock: str, n: int, jobs: list, ready, stop, result) -> None:
    """A separate process: ``n`` FollowLogs calls on one asyncio loop (grpc.aio), counting
    message bytes without parsing them.  One Python thread, so that the followers' client
    side takes no more of the machine's two cores than it must."""
    import asyncio

    async def run() -> dict:
        counts = [0] * n
        codes: dict = {}
        started = [0]
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            follow = channel.unary_stream(
                FOLLOW_METHOD, request_serializer=pb.FollowLogsRequest.SerializeToString,
                response_deserializer=None)

            async def one(i):
                call = follow(pb.FollowLogsRequest(job_uuid=jobs[i % len(jobs)],
                                                   start_from=pb.FOLLOW_FROM_TAIL,
                                                   tail_lines=1))
                first = True
                try:
                    async for raw in call:
                        counts[i] += len(raw)
                        if first:
                            started[0] += 1
                            first = False
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
                    if first:
                        started[0] += 1

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            while started[0] < n:
                await asyncio.sleep(0.01)
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        codes.pop("CANCELLED", None)
        return {"bytes": sum(counts), "ended": codes}

    result.put(asyncio.run(run()))


BUSY_JOB = "bench-busy-job"


def ingest_with_followers(stub, work: str, frames: int, followers: int, repeat: int,
                          busy_interval: float = 0.0) -> dict:
    """Ingest rates with 0 and ``followers`` followers.  With ``busy_interval`` 0 the
    followers follow one of the 10 full-speed jobs (a tenth of the frames); otherwise a
    separate job fed one line per ``busy_interval`` seconds by a paced sender, which runs
    in both kinds of phase."""
    ctx = multiprocessing.get_context("spawn")
    phases = {0: [], followers: []}
    extra = []
    target = FOLLOWED
    paced = None
    if busy_interval:
        target = BUSY_JOB
        paced_stop = ctx.Event()
        paced = ctx.Process(target=_prober,
                            args=(f"{work}/ipc.sock", busy_interval, paced_stop, BUSY_JOB))
        paced.start()
        deadline = time.monotonic() + 60
        while True:  # until the job exists
            try:
                stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=BUSY_JOB), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise SystemExit("the paced job did not appear") from None
                time.sleep(0.1)
    for r in range(repeat):
        order = (0, followers) if r % 2 == 0 else (followers, 0)
        for n in order:
            if n == 0:
                phases[0].append(frames / push(stub, work, frames))
                continue
            ready, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
            p = ctx.Process(target=_followers,
                            args=(f"{work}/grpc.sock", n, [target], ready, stop, result))
            p.start()
            if not ready.wait(60):
                raise SystemExit("followers did not start")
            phases[n].append(frames / push(stub, work, frames))
            stop.set()
            extra.append(result.get(timeout=60))
            p.join(30)
    if paced is not None:
        paced_stop.set()
        paced.join(10)
    base = statistics.median(phases[0])
    loaded = statistics.median(phases[followers])
    return {
        "followed_job": target,
        "busy_interval_s": busy_interval,
        "frames_per_phase": frames,
        "rates_0_followers": [round(x) for x in phases[0]],
        f"rates_{followers}_followers": [round(x) for x in phases[followers]],
        "median_0": round(base),
        f"median_{followers}": round(loaded),
        "ratio": round(loaded / base, 3),
        "followers_runs": extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--runs", type=int, default=51, help="runs per tail latency")
    ap.add_argument("--frames", type=int, default=400_000, help="frames per ingest phase")
    ap.add_argument("--followers", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of ingest phases (0 / N)")
    ap.add_argument("--busy-interval", type=float, default=0.001,
                    help="also measure followers of a job fed one line per this many "
                         "seconds while the other jobs ingest at full speed (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()
    results: dict = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "lines": args.lines,
    }
    work = tempfile.mkdtemp(prefix="jpf", dir="/tmp")
    proc = None
    try:
        data_dir = os.path.join(work, "data")
        results["build"] = build_job(data_dir, args.lines, 20_000, 100, "deflate", 6, 256 << 20)
        print(json.dumps({"build": results["build"]}), flush=True)
        proc = start_service(work, data_dir)
        _channel, stub = connect(work, proc)
        info = stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB), timeout=60)
        if info.log_count != args.lines:
            raise SystemExit(f"job has {info.log_count} lines, expected {args.lines}")

        results["tail_n100"] = tail_latencies(stub, args.runs)
        t = time.perf_counter()
        inflate_all_zlib(job_files(data_dir))
        results["tail_n100"]["inflate_whole_job_ms"] = ms(time.perf_counter() - t)
        print(json.dumps({"tail_n100": results["tail_n100"]}), flush=True)

        push(stub, work, 20_000)  # the 10 jobs exist from here on
        results["follow_latency"] = follow_latency(stub, work, args.frames)
        print(json.dumps({"follow_latency": results["follow_latency"]}), flush=True)

        results["ingest_followers"] = ingest_with_followers(
            stub, work, args.frames, args.followers, args.repeat
        )
        print(json.dumps({"ingest_followers": results["ingest_followers"]}), flush=True)
        if args.busy_interval:
            results["ingest_followers_paced_job"] = ingest_with_followers(
                stub, work, args.frames, args.followers, args.repeat, args.busy_interval
            )
            print(json.dumps({"ingest_followers_paced_job":
                              results["ingest_followers_paced_job"]}), flush=True)
        results["loadavg_at_end"] = os.getloadavg()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
