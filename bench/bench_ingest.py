"""Ingest benchmark: real Unix sockets into a real ``twistd joblet-persist`` process.

Pre-encodes IPC frames (~100-byte log lines over N jobs), starts the service
with a temporary configuration, pushes the frames over C connections from
separate sender processes, and times from the first byte sent until GetStats
reports every frame appended (durable under the default fsync policy).  Then
it reports frames/s, MB/s, the service's peak RSS, the bytes on disk, and the
size of ``gzip -6`` of the same raw content, computed in the same run.

    .venv/bin/python bench/bench_ingest.py --frames 2000000 --connections 1 4 \
        --compressors deflate:5 isal:1

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from joblet_persist._proto import ipc_pb2, persist_pb2, persist_pb2_grpc  # noqa: E402

WORDS = (
    "request handled user session cache miss worker started connection closed retry "
    "timeout backend upstream GET POST /api/v1/jobs status ok error warn debug info "
    "latency bytes rows query commit rollback shard replica leader follower"
).split()


def make_lines(n: int, seed: int, line_bytes: int) -> list[bytes]:
    """Log-like lines of about ``line_bytes`` bytes: timestamps, levels, words, numbers."""
    rng = random.Random(seed)
    out = []
    t0 = 1_764_000_000.0
    for i in range(n):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + i // 50))
        level = rng.choice(("INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"))
        parts = [f"{ts}.{i % 1000:03d}Z {level} [w{rng.randrange(16)}]"]
        while sum(len(p) + 1 for p in parts) < line_bytes - 12:
            if rng.random() < 0.3:
                parts.append(f"{rng.choice(WORDS)}={rng.randrange(100000)}")
            else:
                parts.append(rng.choice(WORDS))
        out.append((" ".join(parts) + "\n").encode())
    return out


def encode_frames(lines: list[bytes], jobs: int, conn: int, conns: int) -> tuple[bytes, dict]:
    """The frames one connection sends, and the raw content per (job, stream) it carries."""
    chunks = []
    raw: dict = {}
    base_ns = 1_764_000_000 * 10**9
    for i in range(conn, len(lines), conns):
        job = f"bench-job-{i % jobs:04d}"
        stream = 1 if (i // jobs) % 8 else 2
        content = lines[i]
        ll = ipc_pb2.LogLine(
            job_uuid=job, stream=stream, timestamp=base_ns + (i // 50) * 10**9, sequence=i,
            content=content,
        )
        env = ipc_pb2.IPCMessage(
            version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job, timestamp=ll.timestamp,
            sequence=i, data=ll.SerializeToString(),
        )
        body = env.SerializeToString()
        chunks.append(struct.pack(">I", len(body)))
        chunks.append(body)
        raw.setdefault((job, stream), []).append(content)
    return b"".join(chunks), raw


def _send(path: str, payload: bytes, ready, go) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    ready.set()
    go.wait()
    view = memoryview(payload)
    for off in range(0, len(view), 1 << 20):
        s.sendall(view[off : off + (1 << 20)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # returns when the service closes the connection (at shutdown)
    s.close()


def _stats(stub) -> persist_pb2.GetStatsResponse:
    return stub.GetStats(persist_pb2.GetStatsRequest(), timeout=5)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def run_one(args, payloads, raw_total: int, gzip6_bytes: int, compressor: str, level: str,
            conns: int) -> dict:
    work = tempfile.mkdtemp(prefix="jpb", dir="/tmp")
    try:
        cfg = os.path.join(work, "persist.yml")
        with open(cfg, "w") as f:
            f.write(
                f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n"
                f"ipc:\n  socket: {work}/ipc.sock\n"
                f"storage:\n  dataDir: {work}/data\n  compressor: {compressor}\n"
                f"  compressionLevel: {level}\n"
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
        channel = grpc.insecure_channel(f"unix:{work}/grpc.sock")
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                if stub.Ping(persist_pb2.PingRequest(), timeout=1).healthy:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"service did not start; see {work}/twistd.log")
            time.sleep(0.05)
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--rate", "250", "--nonblocking",
                 *(["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []),
                 "--threads", "--format", {".json": "speedscope", ".txt": "raw"}.get(
                    os.path.splitext(args.profile)[1], "flamegraph"),
                 "-o", args.profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        readies = []
        senders = []
        for c in range(conns):
            ready = ctx.Event()
            p = ctx.Process(target=_send, args=(f"{work}/ipc.sock", payloads[conns][c], ready, go))
            p.start()
            readies.append(ready)
            senders.append(p)
        for r in readies:
            r.wait()
        total = args.frames
        t0 = time.perf_counter()
        go.set()
        received_at = None
        while True:
            st = _stats(stub)
            if received_at is None and st.messages_received >= total:
                received_at = time.perf_counter() - t0
            if st.messages_written >= total:
                break
            if proc.poll() is not None:
                raise SystemExit(f"service exited; see {work}/twistd.log")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        rss = _peak_rss(proc.pid)
        st = _stats(stub)
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for p in senders:
            p.join(10)
        disk = _tree_bytes(os.path.join(work, "data", "logs"))
        return {
            "compressor": f"{compressor}:{level}",
            "connections": conns,
            "frames": total,
            "seconds": round(elapsed, 3),
            "frames_per_s": round(total / elapsed),
            # All frames decoded and buffered (the rest is the last flush and fsync).
            "received_s": round(received_at or elapsed, 3),
            "mb_per_s": round(raw_total / elapsed / 1e6, 1),
            "peak_rss_mb": round(rss / 2**20, 1),
            "disk_bytes": disk,
            "gzip6_bytes": gzip6_bytes,
            "vs_gzip6": round(disk / gzip6_bytes, 3),
            "stored": st.total_logs,
            "exit_code": proc.returncode,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2_000_000)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compressors", nargs="+", default=["deflate:5", "isal:1"],
                    help="name:level pairs (level an int or 'adaptive')")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the median is kept")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--profile", help="record the service with py-spy into this file "
                    "(.svg flamegraph, or .json speedscope)")
    args = ap.parse_args()

    lines = make_lines(args.frames, 1, args.line_bytes)
    payloads = {}
    raw_by_key: dict = {}
    for conns in args.connections:
        payloads[conns] = []
        for c in range(conns):
            data, raw = encode_frames(lines, args.jobs, c, conns)
            payloads[conns].append(data)
            if conns == args.connections[0]:
                for k, v in raw.items():
                    raw_by_key.setdefault(k, []).extend(v)
    raw_total = sum(len(x) for x in lines)
    # gzip -6 of the same raw content, one file per (job, stream) as stored.
    gzip6 = 0
    for key in sorted(raw_by_key):
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        gzip6 += len(c.compress(b"".join(raw_by_key[key])) + c.flush())
    results = []
    for spec in args.compressors:
        name, level = spec.split(":")
        for conns in args.connections:
            runs = [
                run_one(args, payloads, raw_total, gzip6, name, level, conns)
                for _ in range(args.repeat)
            ]
            runs.sort(key=lambda r: r["frames_per_s"])
            r = runs[len(runs) // 2]
            r["runs_frames_per_s"] = [x["frames_per_s"] for x in runs]
            results.append(r)
            print(json.dumps(r), flush=True)
    info = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "raw_bytes": raw_total,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
