"""Stored size against ``gzip -6`` per kind of job output, at a paced rate and at full speed.

For each kind of content from ``bench/contentgen.py`` (deterministic, seeded), generates
``--mb`` MB of frame contents, spreads them over ``--jobs`` jobs (one frame in eight on
stderr, as bench_ingest.py does), starts a real ``twistd -n joblet-persist`` process per
run, and sends the frames over one Unix socket either paced at ``--rate`` frames/s (steady:
a batch of frames every 10 ms on an absolute schedule) or as fast as the service takes them
(``full``).  It reports per kind and rate: frames/s (first byte sent until GetStats reports
every frame appended), the bytes on disk, ``gzip -6`` of the same raw content per
(job, stream) computed in the same run, their ratio, and the batches per compression level
(scraped from /metrics on a loopback port).  With ``--offline-levels`` it encodes
in-process instead, at fixed levels, batched as the service batches at each rate, and
reports size against ``gzip -6`` and encoding MB/s per core (CPU time) per level.

    .venv/bin/python bench/bench_compress.py --kinds words json --mb 100 \\
        --rates 50000 full --compressors deflate:adaptive deflate:5
    .venv/bin/python bench/bench_compress.py --mb 100 --offline-levels 5 6 7 8 9 10 11 12
    .venv/bin/python bench/bench_compress.py --mb 10 --offline-levels 5 12 --line-tables on off

Traffic goes only to Unix sockets in a temporary directory and to 127.0.0.1.
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
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import contentgen  # noqa: E402
import grpc  # noqa: E402

from joblet_persist._proto import ipc_pb2, persist_pb2, persist_pb2_grpc  # noqa: E402

#: Frames per paced send: at 50,000 frames/s, one send every 10 ms.
PACE_FRAMES = 500


def encode(items: list[bytes], jobs: int) -> tuple[bytes, list[int], dict]:
    """The frames of ``items`` over ``jobs`` jobs, the byte offset of every PACE_FRAMES-th
    frame (and the end), and the raw content per (job, stream)."""
    chunks = []
    offsets = [0]
    pos = 0
    raw: dict = {}
    base_ns = 1_764_000_000 * 10**9
    for i, content in enumerate(items):
        job = f"bench-job-{i % jobs:04d}"
        stream = 1 if (i // jobs) % 8 else 2
        ts = base_ns + i * 20_000
        ll = ipc_pb2.LogLine(job_uuid=job, stream=stream, timestamp=ts, sequence=i,
                             content=content)
        env = ipc_pb2.IPCMessage(version=1, type=ipc_pb2.MESSAGE_TYPE_LOG, job_uuid=job,
                                 timestamp=ts, sequence=i, data=ll.SerializeToString())
        body = env.SerializeToString()
        chunks.append(struct.pack(">I", len(body)))
        chunks.append(body)
        pos += 4 + len(body)
        if (i + 1) % PACE_FRAMES == 0:
            offsets.append(pos)
        raw.setdefault((job, stream), []).append(content)
    if offsets[-1] != pos:
        offsets.append(pos)
    return b"".join(chunks), offsets, raw


def _send(path: str, payload: bytes, offsets: list[int], rate, ready, go) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    ready.set()
    go.wait()
    view = memoryview(payload)
    if rate is None:
        for off in range(0, len(view), 1 << 20):
            s.sendall(view[off : off + (1 << 20)])
    else:
        t0 = time.perf_counter()
        for k in range(1, len(offsets)):
            # Frame k * PACE_FRAMES is due at t0 + k * PACE_FRAMES / rate: no drift.
            delay = t0 + (k - 1) * PACE_FRAMES / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            s.sendall(view[offsets[k - 1] : offsets[k]])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _levels(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("persist_compression_batches_total{"):
            label, value = line.rsplit(" ", 1)
            level = label.split('level="', 1)[1].split('"', 1)[0]
            out[int(level)] = int(float(value))
    return dict(sorted(out.items()))


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def run_one(payload, offsets, frames: int, raw_total: int, gzip6: int, compressor: str,
            level: str, rate, line_tables: bool = True) -> dict:
    work = tempfile.mkdtemp(prefix="jpc", dir="/tmp")
    port, hport = _free_port(), _free_port()
    try:
        cfg = os.path.join(work, "persist.yml")
        with open(cfg, "w") as f:
            f.write(
                f"server:\n  grpcSocket: {work}/grpc.sock\n  grpcAddress: ''\n"
                f"ipc:\n  socket: {work}/ipc.sock\n"
                f"storage:\n  dataDir: {work}/data\n  compressor: {compressor}\n"
                f"  compressionLevel: {level}\n"
                f"  lineTables: {'true' if line_tables else 'false'}\n"
                f"monitoring:\n  enabled: true\n  bindAddress: 127.0.0.1\n"
                f"  metricsPort: {port}\n  healthPort: {hport}\n"
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
        ctx = multiprocessing.get_context("fork")
        go, ready = ctx.Event(), ctx.Event()
        sender = ctx.Process(target=_send,
                             args=(f"{work}/ipc.sock", payload, offsets, rate, ready, go))
        sender.start()
        ready.wait()
        t0 = time.perf_counter()
        go.set()
        while True:
            st = stub.GetStats(persist_pb2.GetStatsRequest(), timeout=5)
            if st.messages_written >= frames:
                break
            if proc.poll() is not None:
                raise SystemExit(f"service exited; see {work}/twistd.log")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        levels = _levels(port)
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        sender.join(10)
        disk = _tree_bytes(os.path.join(work, "data", "logs"))
        return {
            "compressor": f"{compressor}:{level}",
            "line_tables": line_tables,
            "rate": "full" if rate is None else rate,
            "frames": frames,
            "seconds": round(elapsed, 3),
            "frames_per_s": round(frames / elapsed),
            "mb_per_s": round(raw_total / elapsed / 1e6, 1),
            "disk_bytes": disk,
            "gzip6_bytes": gzip6,
            "vs_gzip6": round(disk / gzip6, 4),
            "batches_per_level": levels,
            "exit_code": proc.returncode,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def offline(items: list[bytes], jobs: int, rate, levels: list[int], compressor: str,
            line_tables: bool = True) -> list:
    """Member bytes per fixed level, encoded in-process the way the service batches them.

    Paced at ``rate`` frames/s, each (job, stream) gets one batch per flush interval
    (1 s); at full speed (``rate`` None) batches of up to 20,000 messages or 2 MiB.
    Returns ``[(level, member_bytes, cpu_seconds, overhead_bytes), ...]``: deterministic
    sizes, CPU time (not wall time) so that other load on the machine does not skew the
    speed, and the bytes of the members that are not compressed data (headers, tables,
    trailers; the same at every level).
    """
    from joblet_persist.storage import format as fmt
    from joblet_persist.storage.compress import make_compressor

    per: dict = {}
    for i, content in enumerate(items):
        key = (i % jobs, 1 if (i // jobs) % 8 else 2)
        per.setdefault(key, []).append((i, content))
    batches = []
    for key in sorted(per):
        rows = per[key]
        if rate is None:
            start = 0
            while start < len(rows):
                end, size = start, 0
                while end < len(rows) and end - start < 20000 and size < 2 << 20:
                    size += len(rows[end][1]) + 32
                    end += 1
                batches.append(rows[start:end])
                start = end
        else:
            # Frame i arrives at i / rate seconds; a batch holds one flush interval.
            by_tick: dict = {}
            for row in rows:
                by_tick.setdefault(int(row[0] / rate), []).append(row)
            batches.extend(by_tick[t] for t in sorted(by_tick))
    out = []
    base_ns = 1_764_000_000 * 10**9
    for level in levels:
        comp = make_compressor(compressor, level)
        total = 0
        t0 = time.process_time()
        encoded = []
        for batch in batches:
            idx = [i for i, _ in batch]
            ts = [base_ns + i * 20_000 for i in idx]
            contents = [c for _, c in batch]
            members = fmt.encode_log_members(ts, idx, idx, contents, comp, lines=line_tables)
            total += sum(len(m) for m, _ in members)
            encoded.append((contents, members))
        cpu = time.process_time() - t0
        # Headers, tables and trailers: each member less its raw deflate body.
        overhead = 0
        for contents, members in encoded:
            data = b"".join(contents)
            start = 0
            for member, info in members:
                body = comp.compress_raw(data[start : start + info.raw_size])
                overhead += len(member) - len(body)
                start += info.raw_size
        out.append((level, total, cpu, overhead))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(contentgen.KINDS),
                    choices=contentgen.KINDS)
    ap.add_argument("--mb", type=float, default=100.0, help="MB of content per kind")
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--rates", nargs="+", default=["50000", "full"],
                    help="frames/s, or 'full' for as fast as the service takes them")
    ap.add_argument("--compressors", nargs="+", default=["deflate:adaptive"],
                    help="name:level pairs (level an int or 'adaptive')")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--offline-levels", type=int, nargs="+", metavar="LEVEL",
                    help="instead of running the service, encode in-process at these fixed "
                    "levels of the first --compressors entry, batched as the service "
                    "batches at each rate; reports size against gzip -6 and MB/s per core")
    ap.add_argument("--line-tables", nargs="+", choices=("on", "off"), default=["on"],
                    help="storage.lineTables of each run: 'on off' measures both, "
                    "alternating, in the same invocation")
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()

    results = []
    for kind in args.kinds:
        items = contentgen.take(kind, int(args.mb * 1e6), args.seed)
        payload, offsets, raw = encode(items, args.jobs)
        raw_total = sum(map(len, items))
        # gzip -6 of the same raw content, one file per (job, stream) as stored.
        gzip6 = 0
        for key in sorted(raw):
            c = zlib.compressobj(6, zlib.DEFLATED, 31)
            gzip6 += len(c.compress(b"".join(raw[key])) + c.flush())
        del raw
        if args.offline_levels:
            name = args.compressors[0].split(":")[0]
            for rate in args.rates:
                r_ = None if rate == "full" else float(rate)
                # Each level with line tables on and off in turn: the A/B of one run.
                runs = [
                    (setting, *row)
                    for wanted in args.offline_levels
                    for setting in args.line_tables
                    for row in offline(items, args.jobs, r_, [wanted], name, setting == "on")
                ]
                for lt, level, size, cpu, overhead in runs:
                    r = {"kind": kind, "rate": rate, "compressor": f"{name}:{level}",
                         "line_tables": lt == "on",
                         "offline": True, "disk_bytes": size, "gzip6_bytes": gzip6,
                         "vs_gzip6": round(size / gzip6, 4),
                         "overhead_vs_gzip6": round(overhead / gzip6, 4),
                         "mb_per_s_per_core": round(raw_total / cpu / 1e6, 1)}
                    results.append(r)
                    print(json.dumps(r), flush=True)
            continue
        for rate in args.rates:
            for spec in args.compressors:
                for lt in args.line_tables:
                    name, level = spec.split(":")
                    r = run_one(payload, offsets, len(items), raw_total, gzip6, name, level,
                                None if rate == "full" else float(rate), lt == "on")
                    r.update(kind=kind, raw_bytes=raw_total)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    info = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
