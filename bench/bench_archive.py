"""S3 archive benchmark: ingest with archiving on vs off, and upload throughput.

Everything runs on this machine: a ``moto_server`` child process (PyPI ``moto[server]``)
on a loopback port is the S3 store; the service is a real ``twistd joblet-persist``.

1. Ingest, A/B in the same run: the same pre-encoded frames (~100-byte log lines over
   ``--jobs`` jobs, ``--frames`` per run) are pushed over one Unix-socket connection into a
   fresh service with ``archive.s3`` off, then on (uploads every second of segments that
   close every ``--segment`` bytes, i.e. uploads run during the ingest), alternating
   ``--repeat`` times.  Each run is timed from the first byte sent until GetStats reports
   every frame appended.  Printed: frames/s per run, medians, and on/off.
2. Upload throughput: the service ingests ``--drain-frames`` frames while its archive
   endpoint (a TCP forwarder of this script's own in front of moto) refuses connections,
   so that everything stays in the backlog; once every segment is due, the forwarder
   accepts again, and the drain is timed from then until the backlog is 0 (read from
   /metrics every 0.05 s; the first retry comes within 0.3 s), over the bytes uploaded.

    .venv/bin/python bench/bench_archive.py --frames 1000000 --repeat 3

Traffic goes only to Unix sockets and loopback TCP on this machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import grpc  # noqa: E402
from bench_ingest import _send, _stats, encode_frames, make_lines  # noqa: E402

from joblet_persist._proto import persist_pb2, persist_pb2_grpc  # noqa: E402

BUCKET = "bench-archive"
NODE = "bench-node"
ACCESS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
          "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """``python -m moto.server`` on a loopback port; ``client()`` is a boto3 client to it."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **ACCESS))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1",
        ).client("s3", endpoint_url=self.url, config=Config(s3={"addressing_style": "path"}))


class Forwarder:
    """A TCP forwarder on a loopback port to ``target``: ``cut()`` refuses and drops,
    ``restore()`` accepts again on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener = None
        self._conns: set = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> None:
        self.restore()
        self._thread.start()

    def restore(self) -> None:
        self._up.set()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            listener.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._running = False
        self.cut()

    def _accept_loop(self) -> None:
        while self._running:
            if not self._up.wait(0.2):
                continue
            with self._lock:
                if self._listener is None and self._up.is_set():
                    listener = socket.socket()
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(("127.0.0.1", self.port))
                    listener.listen(64)
                    listener.settimeout(0.2)
                    self._listener = listener
                listener = self._listener
            if listener is None:
                continue
            try:
                client, _addr = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not self._up.is_set():
                    client.close()
                    server.close()
                    continue
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def archive_metric(scraped: dict, name: str) -> float:
    return scraped.get(f'{name}{{backend="s3"}}', 0.0)


class Service:
    """A ``twistd -n joblet-persist`` on ``work``; ``archive`` is the archive.s3 section."""

    def __init__(self, work: str, archive: dict | None, segment: str, extra: str = ""):
        self.work = work
        self.metrics_port = free_port()
        self.health_port = free_port()
        cfg = os.path.join(work, "persist.yml")
        lines = [
            f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n  nodeId: {NODE}\n",
            f"ipc:\n  socket: {work}/ipc.sock\n",
            f"storage:\n  dataDir: {work}/data\n  segmentMaxBytes: {segment}\n",
            f"monitoring:\n  enabled: true\n  bindAddress: 127.0.0.1\n"
            f"  metricsPort: {self.metrics_port}\n  healthPort: {self.health_port}\n",
            "logging:\n  level: warn\n",
            extra,
        ]
        if archive is not None:
            lines.append("archive:\n  s3:\n" + "".join(
                f"    {k}: {json.dumps(v)}\n" for k, v in archive.items()))
        with open(cfg, "w") as f:
            f.write("".join(lines))
        self.cfg = cfg
        self.proc = None
        self.channel = None
        self.stub = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, **ACCESS)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile", os.path.join(self.work, "twistd.log"),
             "joblet-persist", "--config", self.cfg],
            env=env, cwd=self.work,
        )
        self.channel = grpc.insecure_channel(f"unix:{self.work}/grpc.sock")
        self.stub = persist_pb2_grpc.PersistServiceStub(self.channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.stub.Ping(persist_pb2.PingRequest(), timeout=1).healthy:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"service did not start; see {self.work}/twistd.log")
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.channel is not None:
            self.channel.close()
        self.proc.send_signal(sig)
        return self.proc.wait(120)

    def metrics(self) -> dict:
        return scrape(self.metrics_port)


def ingest(service: Service, payload: bytes, total: int) -> float:
    """Send ``payload`` over one connection; seconds until every frame is appended."""
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    sender = ctx.Process(target=_send, args=(f"{service.work}/ipc.sock", payload, ready, go))
    sender.start()
    ready.wait()
    t0 = time.perf_counter()
    go.set()
    while _stats(service.stub).messages_written < total:
        if service.proc.poll() is not None:
            raise SystemExit(f"service exited; see {service.work}/twistd.log")
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    service._sender = sender
    return elapsed


def archive_section(endpoint: str, **over) -> dict:
    section = {"enabled": True, "bucket": BUCKET, "prefix": "bench/", "region": "us-east-1",
               "endpointUrl": endpoint, "forcePathStyle": True, "interval": "1s",
               "uploadIdleAfter": "1s", "retryInitial": "500ms", "retryMax": "2s"}
    section.update(over)
    return section


def run_ingest(args, moto: Moto, payload: bytes, archive_on: bool) -> dict:
    work = tempfile.mkdtemp(prefix="jpa", dir="/tmp")
    try:
        archive = archive_section(moto.url, prefix=f"bench-{os.path.basename(work)}/") \
            if archive_on else None
        service = Service(work, archive, args.segment)
        service.start()
        seconds = ingest(service, payload, args.frames)
        scraped = service.metrics()
        service.stop()
        service._sender.join(10)
        return {"archive": archive_on, "seconds": round(seconds, 3),
                "frames_per_s": round(args.frames / seconds),
                "uploaded_during_ingest_bytes": int(archive_metric(
                    scraped, "persist_archive_uploaded_bytes_total"))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_drain(args, moto: Moto) -> dict:
    """Backlog built while S3 is unreachable, then drained: the upload throughput."""
    work = tempfile.mkdtemp(prefix="jpd", dir="/tmp")
    fwd = Forwarder(moto.port)
    fwd.start()
    fwd.cut()
    try:
        lines = make_lines(args.drain_frames, 2, args.line_bytes)
        payload, _raw = encode_frames(lines, args.jobs, 0, 1)
        service = Service(work, archive_section(fwd.url, prefix="drain/", interval="200ms",
                                                retryInitial="200ms", retryMax="300ms"),
                          args.segment)
        service.start()
        ingest(service, payload, args.drain_frames)
        service._sender.join(10)
        time.sleep(2.5)  # every open segment idle (uploadIdleAfter 1s): all of it is due
        backlog = archive_metric(service.metrics(), "persist_archive_backlog_bytes")
        fwd.restore()
        t0 = time.perf_counter()
        while True:
            m = service.metrics()
            uploaded = archive_metric(m, "persist_archive_uploaded_bytes_total")
            if uploaded > 0 and archive_metric(m, "persist_archive_backlog_bytes") == 0:
                break
            if time.perf_counter() - t0 > 170:
                raise SystemExit("drain did not finish within 170 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        segments = archive_metric(m, "persist_archive_uploaded_segments_total")
        service.stop()
        return {"backlog_bytes": int(backlog), "uploaded_bytes": int(uploaded),
                "segments": int(segments), "seconds": round(elapsed, 3),
                "mb_per_s": round(uploaded / elapsed / 1e6, 2),
                "segments_per_s": round(segments / elapsed, 1)}
    finally:
        fwd.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--segment", default="256KiB", help="storage.segmentMaxBytes")
    ap.add_argument("--repeat", type=int, default=3, help="off/on pairs, alternating")
    ap.add_argument("--drain-frames", type=int, default=1_000_000)
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()

    moto = Moto()
    moto.start()
    try:
        moto.client().create_bucket(Bucket=BUCKET)
        lines = make_lines(args.frames, 1, args.line_bytes)
        payload, _raw = encode_frames(lines, args.jobs, 0, 1)
        runs = []
        for _ in range(args.repeat):
            for on in (False, True):
                r = run_ingest(args, moto, payload, on)
                runs.append(r)
                print(json.dumps(r), flush=True)
        off = statistics.median(r["frames_per_s"] for r in runs if not r["archive"])
        on = statistics.median(r["frames_per_s"] for r in runs if r["archive"])
        drain = run_drain(args, moto) if args.drain_frames else None
        if drain:
            print(json.dumps({"drain": drain}), flush=True)
    finally:
        moto.stop()
    summary = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "ingest_off_median_frames_per_s": off,
        "ingest_on_median_frames_per_s": on,
        "on_over_off": round(on / off, 3),
        "runs": runs,
        "drain": drain,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
