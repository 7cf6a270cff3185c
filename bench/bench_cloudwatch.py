"""CloudWatch benchmark: ingest with ``archive.cloudwatch`` on vs off, and events shipped/s.

Starts moto's server (``python -m moto.server``, the logs and cloudwatch APIs)
on a free loopback port, then alternates runs of a real ``twistd joblet-persist``
with the CloudWatch shipper off and on (pointed at moto).  Each run pushes the
same pre-encoded frames (~100-byte log lines, 10 jobs, timestamps of the last
hour) over one Unix socket and times:

- ingest: from the first byte sent until GetStats reports every frame appended
  (fsync'd under the default policy);
- shipping (on runs): from the first byte sent until the service's
  ``persist_cloudwatch_events_shipped_total`` reaches the frame count, and the
  events/s that gives.

    .venv/bin/python bench/bench_cloudwatch.py --frames 200000 --repeat 3

Traffic stays on this machine (Unix sockets, loopback HTTP to moto).  moto is a
Python server on the same two cores: the shipping figure is a floor set by it,
not by CloudWatch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import grpc  # noqa: E402
from bench_ingest import _send, _stats, make_lines  # noqa: E402

from joblet_persist._proto import ipc_pb2, persist_pb2, persist_pb2_grpc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(lines, jobs: int) -> bytes:
    """Frames with timestamps in the last hour (CloudWatch takes up to 14 days back)."""
    import struct

    base = time.time_ns() - 3600 * 10**9
    out = []
    for i, content in enumerate(lines):
        job = f"cwb-job-{i % jobs:04d}"
        stream = 1 if (i // jobs) % 8 else 2
        ll = ipc_pb2.LogLine(job_uuid=job, stream=stream, timestamp=base + i * 1000,
                             sequence=i, content=content)
        env = ipc_pb2.IPCMessage(version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job,
                                 timestamp=ll.timestamp, sequence=i, data=ll.SerializeToString())
        body = env.SerializeToString()
        out.append(struct.pack(">I", len(body)))
        out.append(body)
    return b"".join(out)


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_moto(port: int):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def run_one(payload: bytes, frames: int, cloudwatch_url) -> dict:
    work = tempfile.mkdtemp(prefix="jpcwb", dir="/tmp")
    mport = _free_port()
    try:
        cfg = os.path.join(work, "persist.yml")
        cw = ""
        if cloudwatch_url:
            cw = (f"archive:\n  cloudwatch:\n    enabled: true\n    region: us-east-1\n"
                  f"    endpointUrl: {cloudwatch_url}\n    interval: 200ms\n")
        with open(cfg, "w") as f:
            f.write(
                f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n  nodeId: bench\n"
                f"ipc:\n  socket: {work}/ipc.sock\n"
                f"storage:\n  dataDir: {work}/data\n"
                f"monitoring:\n  enabled: true\n  bindAddress: 127.0.0.1\n"
                f"  metricsPort: {mport}\n  healthPort: {mport}\n"
                f"logging:\n  level: warn\n" + cw
            )
        env = dict(os.environ, PYTHONPATH=ROOT, AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile", os.path.join(work, "twistd.log"), "joblet-persist",
             "--config", cfg], env=env, cwd=work)
        channel = grpc.insecure_channel(f"unix:{work}/grpc.sock")
        stub = persist_pb2_grpc.PersistServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                stub.Ping(persist_pb2.PingRequest(), timeout=1)
                break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"service did not start; see {work}/twistd.log")
            time.sleep(0.05)
        ctx = multiprocessing.get_context("fork")
        go, ready = ctx.Event(), ctx.Event()
        sender = ctx.Process(target=_send, args=(f"{work}/ipc.sock", payload, ready, go))
        sender.start()
        ready.wait()
        t0 = time.perf_counter()
        go.set()
        while _stats(stub).messages_written < frames:
            time.sleep(0.02)
        ingest_s = time.perf_counter() - t0
        shipped_s = None
        if cloudwatch_url:
            key = "persist_cloudwatch_events_shipped_total"
            limit = time.monotonic() + 170
            while _scrape(mport).get(key, 0) < frames:
                if time.monotonic() > limit:
                    break
                time.sleep(0.1)
            else:
                shipped_s = time.perf_counter() - t0
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        sender.join(10)
        return {
            "cloudwatch": bool(cloudwatch_url),
            "ingest_frames_per_s": round(frames / ingest_s),
            "shipped_s": round(shipped_s, 2) if shipped_s else None,
            "events_shipped_per_s": round(frames / shipped_s) if shipped_s else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    payload = encode(make_lines(args.frames, 1, 100), args.jobs)
    port = _free_port()
    results = []
    for _ in range(args.repeat):
        for on in (False, True):
            moto = start_moto(port) if on else None
            try:
                r = run_one(payload, args.frames, f"http://127.0.0.1:{port}" if on else None)
            finally:
                if moto is not None:
                    moto.kill()
                    moto.wait()
            print(json.dumps(r), flush=True)
            results.append(r)
    off = [r["ingest_frames_per_s"] for r in results if not r["cloudwatch"]]
    on = [r["ingest_frames_per_s"] for r in results if r["cloudwatch"]]
    shipped = [r["events_shipped_per_s"] for r in results if r["events_shipped_per_s"]]
    summary = {
        "frames": args.frames,
        "ingest_off_median": statistics.median(off),
        "ingest_on_median": statistics.median(on),
        "on_vs_off": round(statistics.median(on) / statistics.median(off), 3),
        "events_shipped_per_s_median": statistics.median(shipped) if shipped else None,
        "runs": results,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
