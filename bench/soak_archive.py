"""Archive soak: steady ingest into a real ``twistd joblet-persist`` while S3 flaps.

A ``moto_server`` child process is the S3 store; between it and the service sits a TCP
forwarder of this script's own.  For ``--duration`` seconds jobs send log lines (both
streams) and a metric sample per line at ``--rate`` frames/s over one Unix-socket
connection (``--jobs`` at once, each living ``--lifetime`` seconds), while S3 flaps:
up for a random ``--up-min``..``--up-max`` seconds, then down for ``--down-min``..
``--down-max`` seconds, by turns in one of two ways:

- ``cut``: the forwarder refuses new connections and cuts the open ones (S3 unreachable);
- ``freeze``: the moto process is stopped (SIGSTOP) and continued (SIGCONT) afterwards:
  requests hang until ``archive.s3.requestTimeout`` (2 s here).

(The moto process itself is never killed: it keeps its objects only in memory.)

At the end S3 stays up and the script waits until the backlog is 0, then checks:

- 0 lost: every job's GetJobInfo log and metric counts equal what was sent;
- the archive complete and byte-identical: every segment file on disk is in the bucket
  with exactly its bytes and a sidecar, and each job's archived stdout, stderr and metrics
  objects, gunzipped in name order, equal what was sent (logs byte for byte; metrics by
  count and sequence).

    .venv/bin/python bench/soak_archive.py --duration 60     # smoke run
    .venv/bin/python bench/soak_archive.py --duration 600    # the documented soak

Traffic goes only to a Unix socket and loopback TCP on this machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_archive import (  # noqa: E402
    BUCKET,
    NODE,
    Forwarder,
    Moto,
    Service,
    archive_metric,
    archive_section,
)

from joblet_persist._proto import persist_pb2  # noqa: E402
from joblet_persist.archive import layout  # noqa: E402
from tests.integration.support import log_frame, metric_frame, metric_values  # noqa: E402

PREFIX = "soak/"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Load:
    """Jobs sending LOG frames on both streams plus a METRIC sample per line."""

    def __init__(self, path: str, rate: int, jobs: int, lifetime: float, seed: int):
        self.path = path
        self.rate = rate
        self.jobs = jobs
        self.lifetime = lifetime
        self.rng = random.Random(seed)
        self.sent: dict = {}  # job -> {1: bytearray, 2: bytearray, "metrics": n, "seq": n}
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            active: list = []
            born: dict = {}
            serial = 0
            t0 = time.monotonic()
            tick = 0.05
            n = 0
            while not self._stop.is_set():
                now = time.monotonic()
                for job in [j for j in active if now - born[j] > self.lifetime]:
                    active.remove(job)
                while len(active) < self.jobs:
                    job = f"soak-{serial:05d}"
                    serial += 1
                    active.append(job)
                    born[job] = now + self.rng.random() * self.lifetime * 0.2
                    self.sent[job] = {1: bytearray(), 2: bytearray(), "metrics": 0, "seq": 0}
                due = int((now - t0) * self.rate) - n
                frames = bytearray()
                for _ in range(max(0, due)):
                    job = active[n % len(active)]
                    rec = self.sent[job]
                    seq = rec["seq"]
                    rec["seq"] += 1
                    stream = 1 if seq % 4 else 2
                    body = (f"{job} {stream} {seq} ".encode()
                            + self.rng.randbytes(self.rng.randrange(20, 160)).hex().encode()
                            + b"\n")
                    ts = 1_700_000_000_000_000_000 + seq * 1000
                    frames += log_frame(job, stream, ts, seq, body)
                    rec[stream] += body
                    if seq % 2 == 0:
                        frames += metric_frame(job, ts, seq, metric_values(seq))
                        rec["metrics"] += 1
                    n += 1
                if frames:
                    sock.sendall(bytes(frames))
                self.frames = n
                time.sleep(tick)
            sock.close()
        except Exception as e:  # reported at the end
            self.error = repr(e)


def list_objects(client) -> dict:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        for item in page.get("Contents", ()):
            out[item["Key"]] = item["Size"]
    return out


def local_segments(data_dir: str) -> dict:
    out = {}
    for top in ("logs", "metrics"):
        root = os.path.join(data_dir, top)
        if not os.path.isdir(root):
            continue
        for job in os.listdir(root):
            for name in os.listdir(os.path.join(root, job)):
                if name.endswith(".gz"):
                    kind = name.split("_")[0].split(".")[0]
                    out[layout.object_key(PREFIX, NODE, job, kind, name)] = os.path.join(
                        root, job, name)
    return out


def check(service: Service, client, load: Load) -> dict:
    """0 lost, archive complete and byte-identical."""
    lost = {}
    for job, rec in load.sent.items():
        info = service.stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job), timeout=10)
        expected_logs = rec["seq"]
        if info.log_count != expected_logs or info.metric_count != rec["metrics"]:
            lost[job] = {"logs": expected_logs - info.log_count,
                         "metrics": rec["metrics"] - info.metric_count}
    remote_sizes = list_objects(client)
    local = local_segments(os.path.join(service.work, "data"))
    mismatched = []
    for key, path in sorted(local.items()):
        with open(path, "rb") as f:
            data = f.read()
        if remote_sizes.get(key) != len(data) or layout.sidecar_key(key) not in remote_sizes:
            mismatched.append(key)
            continue
        if client.get_object(Bucket=BUCKET, Key=key)["Body"].read() != data:
            mismatched.append(key)
    content_diff = []
    for job, rec in load.sent.items():
        for kind, stream in (("stdout", 1), ("stderr", 2)):
            base = layout.object_key(PREFIX, NODE, job, kind, "")
            names = sorted(k for k in remote_sizes if k.startswith(base) and k.endswith(".gz"))
            got = b"".join(gzip.decompress(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())
                           for k in names)
            if got != bytes(rec[stream]):
                content_diff.append(f"{job}/{kind}: {len(got)} of {len(rec[stream])} bytes")
        base = layout.object_key(PREFIX, NODE, job, "metrics", "")
        names = sorted(k for k in remote_sizes if k.startswith(base) and k.endswith(".gz"))
        lines = b"".join(gzip.decompress(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())
                         for k in names).splitlines()
        seqs = [json.loads(x)["sequence"] for x in lines]
        if seqs != list(range(0, rec["seq"], 2)):
            content_diff.append(f"{job}/metrics: {len(seqs)} of {rec['metrics']} samples")
    return {"jobs": len(load.sent), "lost": lost, "segments_local": len(local),
            "objects": len(remote_sizes), "mismatched_segments": mismatched[:20],
            "mismatched_count": len(mismatched), "content_differs": content_diff[:20],
            "content_differs_count": len(content_diff)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--rate", type=int, default=2000, help="LOG frames per second")
    ap.add_argument("--jobs", type=int, default=8, help="jobs sending at once")
    ap.add_argument("--lifetime", type=float, default=60)
    ap.add_argument("--up-min", type=float, default=5)
    ap.add_argument("--up-max", type=float, default=20)
    ap.add_argument("--down-min", type=float, default=3)
    ap.add_argument("--down-max", type=float, default=15)
    ap.add_argument("--segment", default="256KiB", help="storage.segmentMaxBytes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the summary to this file")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="jpsa", dir="/tmp")
    moto = Moto()
    moto.start()
    fwd = Forwarder(moto.port)
    fwd.start()
    service = None
    flaps = {"cut": 0, "freeze": 0}
    down_seconds = 0.0
    try:
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        archive = archive_section(fwd.url, prefix=PREFIX, interval="1s", uploadIdleAfter="2s",
                                  requestTimeout="2s", retryInitial="500ms", retryMax="4s")
        service = Service(work, archive, args.segment)
        service.start()
        load = Load(f"{work}/ipc.sock", args.rate, args.jobs, args.lifetime, args.seed)
        load.start()
        t0 = time.monotonic()
        end = t0 + args.duration
        mode = "cut"
        max_backlog = 0.0
        while time.monotonic() < end:
            up_for = rng.uniform(args.up_min, args.up_max)
            deadline = min(end, time.monotonic() + up_for)
            while time.monotonic() < deadline:
                time.sleep(0.5)
                m = service.metrics()
                max_backlog = max(max_backlog, archive_metric(m, "persist_archive_backlog_bytes"))
            if time.monotonic() >= end:
                break
            down_for = min(rng.uniform(args.down_min, args.down_max), end - time.monotonic())
            flaps[mode] += 1
            log(f"S3 down ({mode}) for {down_for:.1f}s; {load.frames} frames sent")
            if mode == "cut":
                fwd.cut()
            else:
                moto.proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            while time.monotonic() < started + down_for:
                time.sleep(0.5)
                m = service.metrics()
                max_backlog = max(max_backlog, archive_metric(m, "persist_archive_backlog_bytes"))
            if mode == "cut":
                fwd.restore()
            else:
                moto.proc.send_signal(signal.SIGCONT)
            down_seconds += time.monotonic() - started
            mode = "freeze" if mode == "cut" else "cut"
        load.stop()
        sent_at_end = load.frames
        log(f"load stopped: {sent_at_end} frames; waiting for the backlog to drain")
        drained_at = None
        drain_start = time.monotonic()
        while time.monotonic() - drain_start < 300:
            m = service.metrics()
            if (archive_metric(m, "persist_archive_backlog_bytes") == 0
                    and time.monotonic() - drain_start > 4):  # idle segments due after 2 s
                drained_at = time.monotonic() - drain_start
                break
            time.sleep(0.5)
        result = check(service, client, load)
        m = service.metrics()
        code = service.stop()
        summary = {
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
            "duration_s": args.duration,
            "frames_sent": sent_at_end,
            "flaps": flaps,
            "s3_down_seconds": round(down_seconds, 1),
            "max_backlog_bytes": int(max_backlog),
            "upload_errors": int(archive_metric(m, "persist_archive_upload_errors_total")),
            "uploaded_bytes": int(archive_metric(m, "persist_archive_uploaded_bytes_total")),
            "uploaded_segments": int(archive_metric(m, "persist_archive_uploaded_segments_total")),
            "drained_after_s": None if drained_at is None else round(drained_at, 1),
            "load_error": load.error,
            "exit_code": code,
            **result,
        }
        ok = (not result["lost"] and result["mismatched_count"] == 0
              and result["content_differs_count"] == 0 and load.error is None
              and drained_at is not None)
        summary["ok"] = ok
        print(json.dumps(summary, indent=2), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        return 0 if ok else 1
    finally:
        fwd.close()
        if service is not None and service.proc.poll() is None:
            service.proc.kill()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
