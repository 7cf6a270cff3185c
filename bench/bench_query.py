"""Query benchmark: seek-based queries on a job of millions of lines, streaming, Ping under load.

Builds one job of ``--lines`` (default 5,000,000) log lines of about 100 bytes in a
temporary data directory, directly with the storage encoder and appender (the same
``thd_append_logs`` the service runs on its pool; much faster than pushing frames over
IPC), 100 lines per second of timestamps, one line in ten on stderr, batches of
``--batch`` lines (the writer's default batchMaxMessages).  Then it starts
``twistd -n joblet-persist`` on that directory and, from this process (a separate
client process, over the gRPC Unix socket), measures:

1. median latency (``--runs`` runs) of a first page (limit 100), a late offset
   (offset lines-100,000, limit 100) and a narrow time range (a 1-second window in the
   middle: 100 lines), both streams merged, with QueryLogs and QueryLogsBatched; and,
   in the same run, the time to inflate the whole job the way ``zcat`` does (the
   ``zcat`` command and Python's zlib, the faster counts), giving ratios;
2. streaming rates: QueryLogs (one message per line) and QueryLogsBatched, lines/s
   received and parsed by this process;
3. Ping latency (median, p99) while another process pushes log frames into the IPC
   socket as fast as the service takes them (frames from bench_ingest.py's encoder),
   and, for reference, on the idle service.

Each measurement is repeated (``--repeat``) and the median reported; the results go to
stdout as JSON lines and, with ``--json FILE``, to a file.

    .venv/bin/python bench/bench_query.py                  # the full run, about 3 minutes
    .venv/bin/python bench/bench_query.py --lines 500000   # a quick look

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
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from bench.bench_ingest import encode_frames, make_lines  # noqa: E402
from joblet_persist._proto import persist_pb2 as pb  # noqa: E402
from joblet_persist._proto import persist_pb2_grpc  # noqa: E402
from joblet_persist.storage import segment  # noqa: E402
from joblet_persist.storage.compress import make_compressor  # noqa: E402
from joblet_persist.storage.local import thd_append_logs  # noqa: E402

JOB = "bench-query-job"
T0 = 1_764_000_000 * 10**9
SEC = 10**9
LINES_PER_SECOND = 100
TEMPLATES = 20_000


# -- the data -------------------------------------------------------------------------


def stream_of(i: int) -> int:
    """Line ``i`` goes to stderr one time in ten, else stdout."""
    return 2 if i % 10 == 9 else 1


def timestamp_of(i: int) -> int:
    """100 lines per second, whole seconds (as joblet-core rounds them)."""
    return T0 + (i // LINES_PER_SECOND) * SEC


def build_job(data_dir: str, n: int, batch: int, line_bytes: int, compressor: str,
              level: int, segment_max: int) -> dict:
    """Write the job's segment files with the storage appender; returns sizes and timings."""
    comp = make_compressor(compressor, level)
    templates = make_lines(TEMPLATES, 7, line_bytes)
    directory = os.path.join(data_dir, "logs", JOB)
    files = {1: [0, 0], 2: [0, 0]}  # stream -> [segment index, size]
    kinds = {1: "stdout", 2: "stderr"}
    raw = 0
    started = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        for stream in (1, 2):
            idx = [i for i in range(lo, hi) if stream_of(i) == stream]
            if not idx:
                continue
            contents = [templates[i % TEMPLATES] for i in idx]
            raw += sum(map(len, contents))
            seg = files[stream]
            if seg[1] >= segment_max:
                seg[0] += 1
                seg[1] = 0
            path = os.path.join(directory, segment.segment_name(kinds[stream], seg[0]))
            result = thd_append_logs(
                path, directory, seg[1], False, comp, 0,
                [timestamp_of(i) for i in idx], idx, idx, contents,
            )  # fmt: skip
            seg[1] = result.new_size
    os.sync()
    return {"raw_bytes": raw, "build_s": round(time.perf_counter() - started, 1)}


def job_files(data_dir: str) -> list[str]:
    directory = os.path.join(data_dir, "logs", JOB)
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))]


def inflate_all_zlib(paths: list[str]) -> int:
    """Inflate every member of every file, streaming as zcat does; returns the raw bytes."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            d = zlib.decompressobj(31)
            while chunk := f.read(1 << 20):
                while chunk:
                    total += len(d.decompress(chunk))
                    if not d.eof:
                        break
                    # The next gzip member starts in what this one left over.
                    chunk = d.unused_data
                    d = zlib.decompressobj(31)
    return total


def inflate_all_zcat(paths: list[str]) -> None:
    """``zcat FILES > /dev/null``."""
    subprocess.run(["zcat", *paths], stdout=subprocess.DEVNULL, check=True)


# -- the service ----------------------------------------------------------------------


def start_service(work: str, data_dir: str) -> subprocess.Popen:
    cfg = os.path.join(work, "persist.yml")
    with open(cfg, "w") as f:
        f.write(
            f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n"
            f"ipc:\n  socket: {work}/ipc.sock\n"
            f"storage:\n  dataDir: {data_dir}\n"
            f"monitoring:\n  enabled: false\n"
            f"logging:\n  level: warn\n"
        )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "--logfile", os.path.join(work, "twistd.log"), "joblet-persist",
         "--config", cfg],
        env=env, cwd=work,
    )
    return proc


def wait_healthy(stub, proc, work: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if stub.Ping(pb.PingRequest(), timeout=1).healthy:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"service did not start; see {work}/twistd.log")
        time.sleep(0.05)


# -- measurements ---------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def query_latencies(stub, n: int, runs: int) -> dict:
    """Median (and min/max) ms of the three seek queries, per-message and batched."""
    late = max(0, n - 100_000)
    middle = (n // 2) // LINES_PER_SECOND
    window = (T0 + middle * SEC, T0 + middle * SEC + SEC - 1)
    queries = {
        "first_page": dict(limit=100),
        "late_offset": dict(offset=late, limit=100),
        "time_window_1s": dict(start_time=window[0], end_time=window[1]),
    }
    expect_first = {
        "first_page": 0,
        "late_offset": late,
        "time_window_1s": middle * LINES_PER_SECOND,
    }
    out = {}
    for name, kw in queries.items():
        request = pb.QueryLogsRequest(job_uuid=JOB, **kw)

        def per_message(request=request):
            return list(stub.QueryLogs(request, timeout=30))

        def batched(request=request):
            return [x for b in stub.QueryLogsBatched(request, timeout=30) for x in b.lines]

        for label, fn in (("QueryLogs", per_message), ("QueryLogsBatched", batched)):
            lines = fn()  # warm: also checks the answer
            if len(lines) != 100 or lines[0].sequence != expect_first[name]:
                raise SystemExit(f"{name}: unexpected answer ({len(lines)} lines, "
                                 f"first {lines[0].sequence if lines else None})")
            times = timed(fn, runs)
            out[f"{name}/{label}"] = {
                "median_ms": ms(statistics.median(times)),
                "min_ms": ms(min(times)),
                "max_ms": ms(max(times)),
            }
    return out


def stream_rate(stub, batched: bool, limit: int) -> dict:
    request = pb.QueryLogsRequest(job_uuid=JOB, limit=limit)
    t = time.perf_counter()
    count = 0
    nbytes = 0
    if batched:
        for b in stub.QueryLogsBatched(request, timeout=600):
            count += len(b.lines)
            nbytes += b.ByteSize()
    else:
        for line in stub.QueryLogs(request, timeout=600):
            count += 1
            nbytes += line.ByteSize()
    elapsed = time.perf_counter() - t
    return {
        "lines": count,
        "seconds": round(elapsed, 3),
        "lines_per_s": round(count / elapsed),
        "wire_mb_per_s": round(nbytes / elapsed / 1e6, 1),
    }


def _sender(path: str, seed: int, frames: int, ready, go, done) -> None:
    """A separate process pushing pre-encoded log frames into the IPC socket."""
    import socket as socket_module

    templates = make_lines(TEMPLATES, seed, 100)
    lines = [templates[i % TEMPLATES] for i in range(frames)]
    payload, _ = encode_frames(lines, 10, 0, 1)
    s = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    s.connect(path)
    ready.set()
    go.wait()
    view = memoryview(payload)
    for off in range(0, len(view), 1 << 20):
        s.sendall(view[off : off + (1 << 20)])
    done.set()
    s.close()


def ping_latencies(stub, seconds: float, interval: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        if not stub.Ping(pb.PingRequest(), timeout=2).healthy:
            raise SystemExit("Ping says unhealthy")
        out.append(time.perf_counter() - t)
        time.sleep(interval)
    return out


def ping_under_ingest(stub, work: str, frames: int, interval: float) -> dict:
    before = stub.GetStats(pb.GetStatsRequest(), timeout=5).messages_written
    ctx = multiprocessing.get_context("spawn")
    ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
    p = ctx.Process(target=_sender, args=(f"{work}/ipc.sock", 3, frames, ready, go, done))
    p.start()
    ready.wait(120)
    latencies = []
    t0 = time.perf_counter()
    go.set()
    # Ping until every frame is stored: receiving, batching, compressing and appending.
    while True:
        latencies += ping_latencies(stub, 0.25, interval)
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
        if stats.messages_written - before >= frames:
            break
        if time.perf_counter() - t0 > 120:
            raise SystemExit("ingest did not finish within 120 s")
    elapsed = time.perf_counter() - t0
    p.join(10)
    latencies.sort()
    return {
        "pings": len(latencies),
        "median_ms": ms(statistics.median(latencies)),
        "p99_ms": ms(latencies[int(len(latencies) * 0.99)]),
        "max_ms": ms(latencies[-1]),
        "ingest_frames_per_s": round(frames / elapsed),
    }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20_000, help="lines per appended batch")
    ap.add_argument("--compressor", default="deflate:6", help="name:level")
    ap.add_argument("--runs", type=int, default=21, help="runs per latency measurement")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of every other measurement")
    ap.add_argument("--stream-lines", type=int, default=100_000,
                    help="lines streamed with per-message QueryLogs")
    ap.add_argument("--batched-lines", type=int, default=0,
                    help="lines streamed with QueryLogsBatched (0 = the whole job)")
    ap.add_argument("--ingest-frames", type=int, default=600_000)
    ap.add_argument("--ping-interval", type=float, default=0.002)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()
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
        "lines": args.lines,
    }
    work = tempfile.mkdtemp(prefix="jpq", dir="/tmp")
    proc = None
    try:
        data_dir = os.path.join(work, "data")
        built = build_job(data_dir, args.lines, args.batch, args.line_bytes, name, int(level),
                          256 << 20)
        files = job_files(data_dir)
        built["files"] = {os.path.basename(p): os.path.getsize(p) for p in files}
        results["build"] = built
        print(json.dumps({"build": built}), flush=True)

        t = time.perf_counter()
        proc = start_service(work, data_dir)
        # Dial only once the socket exists: a channel that failed to connect backs off for
        # seconds before it tries again, which would be counted as start time.
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{work}/grpc.sock"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"service did not start; see {work}/twistd.log")
            time.sleep(0.01)
        channel = grpc.insecure_channel(
            f"unix:{work}/grpc.sock",
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        wait_healthy(stub, proc, work)
        info = stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=JOB), timeout=30)
        first = stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB, limit=1), timeout=30)
        list(first)
        results["service_start_and_open_s"] = round(time.perf_counter() - t, 2)
        if info.log_count != args.lines:
            raise SystemExit(f"job has {info.log_count} lines, expected {args.lines}")

        # 1. seek queries vs. inflating everything, in the same run.
        full = {"zlib_s": [], "zcat_s": []}
        lat_runs = []
        for _ in range(args.repeat):
            full["zlib_s"].append(min(timed(lambda: inflate_all_zlib(files), 1)))
            if shutil.which("zcat"):
                full["zcat_s"].append(min(timed(lambda: inflate_all_zcat(files), 1)))
            lat_runs.append(query_latencies(stub, args.lines, args.runs))
        inflate = {k: round(statistics.median(v), 3) for k, v in full.items() if v}
        fastest = min(inflate.values())
        latency = {}
        for key in lat_runs[0]:
            median = statistics.median(r[key]["median_ms"] for r in lat_runs)
            latency[key] = {
                "median_ms": round(median, 2),
                "runs_median_ms": [r[key]["median_ms"] for r in lat_runs],
                "x_faster_than_full_inflate": round(fastest * 1000 / median),
            }
        results["full_inflate_s"] = inflate
        results["latency"] = latency
        print(json.dumps({"full_inflate_s": inflate, "latency": latency}), flush=True)

        # 2. streaming.
        batched_lines = args.batched_lines or args.lines
        streams = {
            "QueryLogs": [stream_rate(stub, False, args.stream_lines) for _ in range(args.repeat)],
            "QueryLogsBatched": [
                stream_rate(stub, True, batched_lines) for _ in range(args.repeat)
            ],
        }
        results["streaming"] = {
            k: {
                "lines": v[0]["lines"],
                "median_lines_per_s": round(median_of(v, "lines_per_s")),
                "median_wire_mb_per_s": median_of(v, "wire_mb_per_s"),
                "runs_lines_per_s": [r["lines_per_s"] for r in v],
            }
            for k, v in streams.items()
        }
        print(json.dumps({"streaming": results["streaming"]}), flush=True)

        # 3. Ping, idle and under full-speed ingest.
        idle = sorted(ping_latencies(stub, 2.0, args.ping_interval))
        results["ping_idle"] = {
            "pings": len(idle),
            "median_ms": ms(statistics.median(idle)),
            "p99_ms": ms(idle[int(len(idle) * 0.99)]),
        }
        loaded = [
            ping_under_ingest(stub, work, args.ingest_frames, args.ping_interval)
            for _ in range(args.repeat)
        ]
        results["ping_under_ingest"] = {
            "median_ms": median_of(loaded, "median_ms"),
            "p99_ms": median_of(loaded, "p99_ms"),
            "runs": loaded,
        }
        print(json.dumps({"ping_idle": results["ping_idle"],
                          "ping_under_ingest": results["ping_under_ingest"]}), flush=True)
        channel.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
