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
3. Fan-out: ingest rate with 100 followers against none, for each of ``--rates``.  In
   every phase ``--frames`` frames are pushed at full speed to 10 jobs (the time until
   GetStats shows them all written) while a feeder process writes the followed job: at
   R lines/s to a job of its own (each line carries its send time), or, for ``full``,
   the followed job is one of the 10 pushed jobs (a tenth of the frames, plus a probe
   line every 5 ms).  After one discarded warm-up phase, phases alternate (0, 100, 100,
   0, ..., ``--repeat`` pairs) in the same run.  The 100 followers run in a separate process on one asyncio loop
   (grpc.aio), reading the messages as bytes: each counts the lines it receives and
   records the delivery latency (receive time minus the send time of the oldest probe
   line in a message; the first follower also records every line's latency); a phase ends with a marker line, after which every follower that
   received exactly the lines sent (was not cut off) counts as complete.  Reports, per
   rate, the ingest ratio of the medians, the complete followers per phase and the
   latency percentiles.

    .venv/bin/python bench/bench_follow.py                  # the full run, several minutes
    .venv/bin/python bench/bench_follow.py --no-tail --frames 200000 --repeat 3
                                                            # the fan-out phases only
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
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from bench.bench_ingest import encode_frames, make_lines  # noqa: E402
from bench.bench_query import JOB, _cpu_model, build_job, inflate_all_zlib, job_files  # noqa: E402
from joblet_persist._proto import persist_pb2 as pb  # noqa: E402
from joblet_persist._proto import persist_pb2_grpc  # noqa: E402

FOLLOWED = "bench-job-0000"  # one of the 10 jobs of encode_frames
FOLLOW_METHOD = "/joblet.persist.PersistService/FollowLogs"


def start_service(work: str, data_dir: str, level: str = "adaptive") -> subprocess.Popen:
    cfg = os.path.join(work, "persist.yml")
    with open(cfg, "w") as f:
        f.write(
            f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n"
            f"  maxConcurrentRpcs: 256\n"
            f"ipc:\n  socket: {work}/ipc.sock\n"
            f"storage:\n  dataDir: {data_dir}\n  compressionLevel: {level}\n"
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


def _counts(stub) -> tuple:
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    return stats.messages_received, stats.messages_written


def push(stub, work: str, frames: int, fed=None, rates: Optional[list] = None) -> float:
    """Send ``frames`` at full speed from a separate process; seconds until all written.
    ``fed`` (a shared counter of lines another process sends meanwhile, or None): those
    lines count in GetStats too, so the push is received once the received count has
    grown by ``frames`` plus the lines fed since the push began, and written once the
    written count reaches what had been received then (a fixed mark: the feeder's own
    lines always wait up to a flush interval in the writer's buffer, so a written count
    compared with the feeder's running count could trail it for ever).  With ``rates`` (a
    list), appends the sustained rate: frames written a second from 10% to 90% of the
    push's frames, leaving out its start and its end, which waits up to a flush interval
    for the buffers that no batch filled (the paced job's, in every phase)."""
    received_before, _ = _counts(stub)
    fed_before = fed.value if fed is not None else 0
    ctx = multiprocessing.get_context("spawn")
    ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
    p = ctx.Process(target=_sender, args=(f"{work}/ipc.sock", frames, ready, go, done))
    p.start()
    ready.wait(120)
    t0 = time.perf_counter()
    go.set()
    mark = None
    _, written_before = _counts(stub)
    samples = []
    while True:
        received, written = _counts(stub)
        samples.append((time.perf_counter() - t0, written - written_before))
        if mark is None:
            extra = fed.value - fed_before if fed is not None else 0
            if received - received_before >= frames + extra:
                mark = received
        if mark is not None and written >= mark:
            break
        if time.perf_counter() - t0 > 150:
            raise SystemExit("ingest did not finish within 150 s")
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    p.join(30)
    if rates is not None:
        at10 = next((s for s in samples if s[1] >= 0.1 * frames), None)
        at90 = next((s for s in samples if s[1] >= 0.9 * frames), None)
        ok = at10 is not None and at90 is not None and at90[0] > at10[0]
        rates.append(round((at90[1] - at10[1]) / (at90[0] - at10[0])) if ok else None)
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


# -- 3. ingest with 100 followers, at several rates of the followed job ------------------

BUSY_JOB = "bench-busy-job"
END_LINE = b"bench-phase-end\n"
FULL = 0  # a rate of 0: the followed job is one of the 10 jobs of the full-speed push


def _paced(path: str, job: str, rate: float, go, stop, result, counter=None) -> None:
    """A separate process feeding ``job`` ``rate`` lines a second (about 100 bytes each,
    carrying their send time: ``probe <CLOCK_REALTIME ns> ...``) from ``go`` until
    ``stop``; then one END_LINE.  Puts ``(lines sent, seconds)``.  Lines are sent every
    millisecond or so, as many as the schedule is behind by (a full socket slows it)."""
    import socket
    import struct

    from joblet_persist._proto import ipc_pb2

    def frame(content: bytes, now: int, seq: int) -> bytes:
        line = ipc_pb2.LogLine(job_uuid=job, stream=1, timestamp=now, sequence=seq,
                               content=content)
        env = ipc_pb2.IPCMessage(version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job,
                                 timestamp=now, sequence=seq, data=line.SerializeToString())
        body = env.SerializeToString()
        return struct.pack(">I", len(body)) + body

    pad = b"x" * 70
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    go.wait()
    sent = 0
    t0 = time.monotonic()
    while not stop.is_set():
        due = min(5000, int(rate * (time.monotonic() - t0)) - sent)
        if due > 0:
            now = time.time_ns()
            one = frame(b"probe %d %s\n" % (now, pad), now, sent)
            s.sendall(one * due)  # the lines of one tick carry the same send time
            sent += due
            if counter is not None:
                counter.value = sent
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    s.sendall(frame(END_LINE, time.time_ns(), sent))
    s.close()
    result.put((sent, elapsed))


def _followers(sock: str, n: int, job: str, ready, stop, result) -> None:
    """A separate process: ``n`` FollowLogs calls of ``job`` (from its last stored line) on
    one asyncio loop (grpc.aio), reading the messages as bytes without parsing them:
    lines are counted by the job id field that starts every LogLine, and the delivery
    latency is receive time minus the send time in the first ``probe`` line of a
    message (the oldest line in it).  The first follower also records the latency of
    every line it receives (``line_latencies_ns``: what "a line's latency" means, where
    a message's oldest line is its worst).  Each call ends at END_LINE, or is cancelled at
    ``stop``.  One Python thread, so that the followers' client side takes no more of
    the machine than it must."""
    import asyncio

    marker = b"\x0a" + bytes([len(job)]) + job.encode()

    async def run() -> dict:
        lines = [0] * n
        codes: list = [None] * n
        done = [False] * n
        latencies: list = []
        line_latencies: list = []
        started = [0]
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            follow = channel.unary_stream(
                FOLLOW_METHOD, request_serializer=pb.FollowLogsRequest.SerializeToString,
                response_deserializer=None)

            async def one(i):
                call = follow(pb.FollowLogsRequest(job_uuid=job, start_from=pb.FOLLOW_FROM_TAIL,
                                                   tail_lines=1))
                first = True
                try:
                    async for raw in call:
                        now = time.time_ns()
                        if first:  # the stored line: the follower is registered
                            started[0] += 1
                            first = False
                            continue
                        lines[i] += raw.count(marker)
                        k = raw.find(b"probe ")
                        if k >= 0:
                            latencies.append(now - int(raw[k + 6:k + 25]))
                        while i == 0 and k >= 0:
                            line_latencies.append(now - int(raw[k + 6:k + 25]))
                            k = raw.find(b"probe ", k + 25)
                        if raw.find(END_LINE) >= 0:
                            done[i] = True
                            call.cancel()
                            break
                except grpc.aio.AioRpcError as e:
                    codes[i] = e.code().name
                    if first:
                        started[0] += 1

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            while started[0] < n:
                await asyncio.sleep(0.01)
            ready.set()
            cpu0 = time.process_time()
            finished = asyncio.gather(*tasks, return_exceptions=True)
            waiter = asyncio.get_running_loop().run_in_executor(None, stop.wait)
            await asyncio.wait([finished, waiter], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.set()
            await waiter
        latencies.sort()
        line_latencies.sort()
        return {"lines": lines, "codes": codes, "done": done, "latencies_ns": latencies,
                "line_latencies_ns": line_latencies,
                "cpu_s": time.process_time() - cpu0}

    result.put(asyncio.run(run()))


def _pct_ms(values: list, q: float):
    return round(values[min(len(values) - 1, int(len(values) * q))] / 1e6, 1) if values else None


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The service's process id (for its CPU time per phase), set by main().
SERVICE_PID = [0]


def fanout_phase(stub, work: str, frames: int, followers: int, rate: float) -> dict:
    """One phase: ``frames`` pushed at full speed to the 10 jobs while the followed job is
    fed (``rate`` lines/s to BUSY_JOB, or FULL: bench-job-0000, one of the 10, plus a
    probe line every 5 ms), with ``followers`` following it (0: none)."""
    ctx = multiprocessing.get_context("spawn")
    job = BUSY_JOB if rate else FOLLOWED
    go, stop_feed, fed, counter = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("q", 0)
    feeder = ctx.Process(target=_paced, args=(f"{work}/ipc.sock", job, rate or 200.0, go,
                                              stop_feed, fed, counter))
    feeder.start()
    proc = None
    if followers:
        ready, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_followers,
                           args=(f"{work}/grpc.sock", followers, job, ready, stop, result))
        proc.start()
        if not ready.wait(60):
            raise SystemExit("followers did not start")
    go.set()
    cpu0 = process_cpu(SERVICE_PID[0])
    sustained: list = []
    elapsed = push(stub, work, frames, counter, sustained)
    service_cpu = process_cpu(SERVICE_PID[0]) - cpu0
    stop_feed.set()
    sent, seconds = fed.get(timeout=60)
    feeder.join(30)
    out = {"ingest_frames_per_s": round(frames / elapsed),
           "sustained_frames_per_s": sustained[0],
           "followed_lines_per_s": round(rate and sent / seconds),
           "service_cpu_s": round(service_cpu, 2), "push_s": round(elapsed, 2),
           "loadavg": round(os.getloadavg()[0], 1)}
    if proc is None:
        return out
    try:
        got = result.get(timeout=60)
    except Exception:
        stop.set()
        got = result.get(timeout=30)
    proc.join(30)
    expected = sent + 1 + (0 if rate else (frames + 9) // 10)  # + END_LINE (+ the push's)
    complete = sum(1 for lines, done in zip(got["lines"], got["done"], strict=True)
                   if done and lines == expected)
    codes: dict = {}
    for code in got["codes"]:
        if code:
            codes[code] = codes.get(code, 0) + 1
    lat = got["latencies_ns"]
    per_line = got["line_latencies_ns"]
    out.update({
        "followers_complete": complete,
        "followers_ended": codes,  # RESOURCE_EXHAUSTED: cut off by the bounded buffer
        "expected_lines": expected,
        "followers_process_cpu_s": round(got["cpu_s"], 2),
        "latency_ms": {"p50": _pct_ms(lat, 0.5), "p90": _pct_ms(lat, 0.9),
                       "p99": _pct_ms(lat, 0.99), "max": _pct_ms(lat, 1.0),
                       "samples": len(lat)},
        "line_latency_ms": {"p50": _pct_ms(per_line, 0.5), "p90": _pct_ms(per_line, 0.9),
                            "p99": _pct_ms(per_line, 0.99), "max": _pct_ms(per_line, 1.0),
                            "samples": len(per_line)},
    })
    return out


def ingest_with_followers(stub, work: str, frames: int, followers: int, repeat: int,
                          rate: float) -> dict:
    """Ingest rates with 0 and ``followers`` followers of a job fed at ``rate`` lines/s
    (FULL: one of the full-speed jobs); phases alternate 0, N, N, 0, ... in one run."""
    if rate:
        # The followed job exists (and has a line to start from) before the first phase.
        ctx = multiprocessing.get_context("spawn")
        go, stop, fed = ctx.Event(), ctx.Event(), ctx.Queue()
        go.set()
        stop.set()
        p = ctx.Process(target=_paced, args=(f"{work}/ipc.sock", BUSY_JOB, 1.0, go, stop, fed))
        p.start()
        fed.get(timeout=60)
        p.join(30)
        deadline = time.monotonic() + 60
        while True:
            try:
                stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=BUSY_JOB), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise SystemExit("the paced job did not appear") from None
                time.sleep(0.1)
    # One discarded phase first: the service's first full-speed push of a run is slow
    # (the adaptive compression level starts high and falls once the reactor saturates),
    # and would count against whichever kind of phase came first.
    warm = fanout_phase(stub, work, frames, followers=0, rate=rate)
    print(json.dumps({"rate": rate or "full", "warm_up": warm}), flush=True)
    phases: dict = {0: [], followers: []}
    for r in range(repeat):
        for n in ((0, followers) if r % 2 == 0 else (followers, 0)):
            phases[n].append(fanout_phase(stub, work, frames, followers=n, rate=rate))
            print(json.dumps({"rate": rate or "full", "followers": n, **{
                k: v for k, v in phases[n][-1].items()}}), flush=True)
    steady = {n: statistics.median(p["sustained_frames_per_s"] or 0 for p in phases[n])
              for n in phases}
    base = statistics.median(p["ingest_frames_per_s"] for p in phases[0])
    loaded = statistics.median(p["ingest_frames_per_s"] for p in phases[followers])
    lat = [p["latency_ms"]["p50"] for p in phases[followers] if p["latency_ms"]["p50"]]
    per_line = [p["line_latency_ms"]["p50"] for p in phases[followers]
                if p["line_latency_ms"]["p50"]]
    cpu = {n: statistics.median(p["service_cpu_s"] for p in phases[n]) for n in phases}
    return {
        "followed_job_rate": rate or "full speed (one of the 10 jobs)",
        "frames_per_phase": frames,
        "warm_up": warm,
        "phases_0": phases[0],
        f"phases_{followers}": phases[followers],
        "median_0": round(base),
        f"median_{followers}": round(loaded),
        "ratio": round(loaded / base, 3),
        "median_sustained_0": steady[0],
        f"median_sustained_{followers}": steady[followers],
        "sustained_ratio": round(steady[followers] / steady[0], 3) if steady[0] else None,
        "followers_complete": [p["followers_complete"] for p in phases[followers]],
        "median_latency_p50_ms": statistics.median(lat) if lat else None,
        "median_line_latency_p50_ms": statistics.median(per_line) if per_line else None,
        "median_service_cpu_s": {str(n): round(v, 2) for n, v in cpu.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--runs", type=int, default=51, help="runs per tail latency")
    ap.add_argument("--frames", type=int, default=400_000, help="frames per ingest phase")
    ap.add_argument("--followers", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of ingest phases (0 / N)")
    ap.add_argument("--rates", default="1000,10000,50000,full",
                    help="rates (lines/s) of the followed job for the ingest phases; 'full': "
                         "one of the 10 jobs pushed at full speed")
    ap.add_argument("--no-tail", action="store_true",
                    help="skip building the big job, TailLogs and the follow latency")
    ap.add_argument("--level", default="adaptive",
                    help="the service's storage.compressionLevel (default: adaptive, the "
                         "service's default; a fixed level such as 5 steadies the ingest "
                         "rate from phase to phase)")
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
        "compression_level": args.level,
    }
    work = tempfile.mkdtemp(prefix="jpf", dir="/tmp")
    proc = None
    rates = [FULL if r.strip() == "full" else float(r) for r in args.rates.split(",") if r.strip()]
    try:
        data_dir = os.path.join(work, "data")
        if not args.no_tail:
            results["build"] = build_job(data_dir, args.lines, 20_000, 100, "deflate", 6,
                                         256 << 20)
            print(json.dumps({"build": results["build"]}), flush=True)
        proc = start_service(work, data_dir, args.level)
        SERVICE_PID[0] = proc.pid
        _channel, stub = connect(work, proc)
        if not args.no_tail:
            info = stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB), timeout=60)
            if info.log_count != args.lines:
                raise SystemExit(f"job has {info.log_count} lines, expected {args.lines}")
            results["tail_n100"] = tail_latencies(stub, args.runs)
            t = time.perf_counter()
            inflate_all_zlib(job_files(data_dir))
            results["tail_n100"]["inflate_whole_job_ms"] = ms(time.perf_counter() - t)
            print(json.dumps({"tail_n100": results["tail_n100"]}), flush=True)

        push(stub, work, 20_000)  # the 10 jobs exist from here on
        if not args.no_tail:
            results["follow_latency"] = follow_latency(stub, work, args.frames)
            print(json.dumps({"follow_latency": results["follow_latency"]}), flush=True)

        results["ingest_followers"] = []
        for rate in rates:
            one = ingest_with_followers(stub, work, args.frames, args.followers, args.repeat,
                                        rate)
            results["ingest_followers"].append(one)
            print(json.dumps({"ingest_followers": {
                k: v for k, v in one.items() if not k.startswith("phases_")}}), flush=True)
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
