"""Ingest benchmark: real Unix sockets into a real ``twistd joblet-persist`` process.

Pre-encodes IPC frames (~100-byte log lines over N jobs), starts the service
with a temporary configuration, pushes the frames over C connections from
separate sender processes, and times from the first byte sent until GetStats
reports every frame appended (durable under the default fsync policy).  Then
it reports frames/s, MB/s, the service's peak RSS, the bytes on disk, and the
size of ``gzip -6`` of the same raw content, computed in the same run.

Two traffic modes (``--modes``; both by default, alternated run by run so that both see
the same machine load): ``logs``, every frame a LOG line; ``mixed``, the same number of
frames of which 70% are LOG lines, 10% METRIC samples and 20% telemetry events spread evenly
over the seven kinds (exec, connect, accept, socket data, mmap, mprotect, file) with payloads
like a current joblet-core's; every job sends all three kinds interleaved (``mixed_slot``), in
those proportions.  Every setting prints the mixed/logs ratio of the medians, of the whole
runs and of their sustained rates: frames/s from 10% to 90% of the frames written, which
leaves out the start and the end (the last frames of buffers that no batch filled wait for
the flush tick, up to ``storage.flushInterval``: a fixed second that a short run counts as
a large share of its time).  It also prints the median of the pair ratios: each mixed run
over the logs run next to it, which follows a machine whose speed drifts within
minutes better than the ratio of medians taken over the whole series.

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
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import yaml  # noqa: E402

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


def _metric_payload(rng: random.Random, job: str, ts: int, seq: int) -> bytes:
    """A resource sample as joblet-core sends one (about 70 bytes)."""
    return ipc_pb2.Metric(
        job_uuid=job, timestamp=ts, sequence=seq,
        data=ipc_pb2.MetricData(
            cpu_usage=rng.uniform(0, 400), memory_usage=rng.randrange(1 << 20, 8 << 30),
            gpu_usage=0.0,
            disk_io=ipc_pb2.DiskIO(read_bytes=rng.randrange(1 << 32),
                                   write_bytes=rng.randrange(1 << 32),
                                   read_ops=rng.randrange(1 << 20),
                                   write_ops=rng.randrange(1 << 20)),
            network_io=ipc_pb2.NetworkIO(rx_bytes=rng.randrange(1 << 32),
                                         tx_bytes=rng.randrange(1 << 32),
                                         rx_packets=rng.randrange(1 << 24),
                                         tx_packets=rng.randrange(1 << 24)),
        ),
    ).SerializeToString()


_COMMS = ("python3", "java", "node", "postgres", "nginx", "curl", "sh", "worker")
_FILES = (
    "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/opt/app/data/input-0007.parquet", "/tmp/cache/7f3a9c.bin", "/etc/resolv.conf",
    "/proc/self/status", "/var/lib/app/db/000123.sst", "",
)


def _event_payload(rng: random.Random, kind: int, job: str, ts: int, seq: int) -> bytes:
    """An event payload of IPC type ``kind`` (3..9) like a current joblet-core's."""
    pid = rng.randrange(2, 1 << 22)
    comm = rng.choice(_COMMS)
    ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    common = dict(job_uuid=job, timestamp=ts, sequence=seq, pid=pid)
    if kind == 3:
        args = [comm, "-m", "app.worker", "--shard", str(rng.randrange(64)),
                "--input", rng.choice(_FILES[2:4])][: rng.randrange(1, 8)]
        msg = ipc_pb2.ExecEvent(ppid=rng.randrange(1, pid), comm=comm,
                                filename=f"/usr/bin/{comm}", args=args, **common)
    elif kind in (4, 5):
        cls = ipc_pb2.ConnectEvent if kind == 4 else ipc_pb2.AcceptEvent
        msg = cls(comm=comm, src_addr=ip, src_port=rng.randrange(32768, 61000),
                  dst_addr="" if kind == 5 else rng.choice(("10.0.0.10", "172.17.0.2", ip)),
                  dst_port=rng.choice((443, 5432, 6379, 8080)),
                  protocol=rng.choice(("tcp", "tcp", "udp")), **common)
    elif kind == 6:
        msg = ipc_pb2.SocketDataEvent(comm=comm, direction=rng.choice(("send", "recv")),
                                      addr=ip, port=rng.choice((443, 5432, 8080)),
                                      protocol="tcp", bytes=rng.randrange(1, 1 << 17), **common)
    elif kind == 7:
        msg = ipc_pb2.MmapEvent(comm=comm, addr=rng.randrange(1 << 47) & ~0xFFF,
                                length=rng.randrange(1, 1 << 12) << 12, prot=rng.choice((1, 3, 5)),
                                flags=rng.choice((0x02, 0x22, 0x812)),
                                filename=rng.choice(_FILES), **common)
    elif kind == 8:
        msg = ipc_pb2.MprotectEvent(comm=comm, addr=rng.randrange(1 << 47) & ~0xFFF,
                                    length=rng.randrange(1, 1 << 8) << 12,
                                    prot=rng.choice((1, 3, 5)), **common)
    else:
        msg = ipc_pb2.FileEvent(comm=comm, path=rng.choice(_FILES[:-1]),
                                operation=rng.choice(("open", "read", "write", "close")),
                                bytes=rng.randrange(0, 1 << 20), **common)
    return msg.SerializeToString()


#: Payload variants per (kind, job) in mixed mode; built once, reused in frame order.
VARIANTS = 32


def mixed_slot(i: int, jobs: int) -> int:
    """The slot (0..9) of frame ``i`` in mixed mode: 0..6 a LOG line, 7 a METRIC sample,
    8 and 9 telemetry events.

    Frame ``i`` belongs to job ``i % jobs``; the slot moves on by one with each round over
    the jobs (``i // jobs``), so every job sends all three kinds, 7:1:2 over any 10 of its
    frames, and any 10 consecutive frames (with the default 10 jobs) hold every slot once,
    as real jobs interleave their logs, samples and events.
    """
    return (i + i // jobs) % 10


def encode_mixed_frames(lines: list[bytes], jobs: int, conn: int, conns: int) -> bytes:
    """The frames one connection sends in mixed mode: of every 10 frames of each job,
    7 LOG lines, 1 METRIC sample, 2 telemetry events (``mixed_slot``); event kinds rotate
    over 3..9 within each job.

    Every frame has its own envelope (job, timestamp, sequence); payloads of metrics and
    events come from a pool built once per (kind, job), as joblet-core's payloads repeat
    their shapes.  Frame count and job spread equal ``encode_frames``'s.
    """
    rng = random.Random(2)
    base_ns = 1_764_000_000 * 10**9
    pool: dict = {}

    def payload(kind: int, job: str, v: int) -> bytes:
        key = (kind, job)
        variants = pool.get(key)
        if variants is None:
            ts = base_ns
            variants = pool[key] = [
                _metric_payload(rng, job, ts, k) if kind == 2
                else _event_payload(rng, kind, job, ts, k)
                for k in range(VARIANTS)
            ]
        return variants[v % VARIANTS]

    chunks = []
    sent_metrics: dict = {}
    sent_events: dict = {}
    for i in range(conn, len(lines), conns):
        job = f"bench-job-{i % jobs:04d}"
        ts = base_ns + (i // 50) * 10**9
        slot = mixed_slot(i, jobs)
        if slot < 7:
            stream = 1 if (i // jobs) % 8 else 2
            data = ipc_pb2.LogLine(job_uuid=job, stream=stream, timestamp=ts, sequence=i,
                                   content=lines[i]).SerializeToString()
            msg_type = ipc_pb2.MESSAGE_TYPE_LOG
        elif slot == 7:
            msg_type = ipc_pb2.MESSAGE_TYPE_METRIC
            n = sent_metrics.get(job, 0)
            sent_metrics[job] = n + 1
            data = payload(2, job, n)
        else:
            # The job's n-th event is of kind 3 + n % 7: each job sends every kind.
            n = sent_events.get(job, 0)
            sent_events[job] = n + 1
            msg_type = 3 + n % 7
            data = payload(msg_type, job, n // 7)
        body = ipc_pb2.IPCMessage(version=1, type=msg_type, job_uuid=job, timestamp=ts,
                                  sequence=i, data=data).SerializeToString()
        chunks.append(struct.pack(">I", len(body)))
        chunks.append(body)
    return b"".join(chunks)


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


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of process ``pid``, or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the service's monitoring servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _monitoring(port: int) -> tuple[dict, float]:
    """Batches compressed per level so far (``persist_compression_batches_total{level="N"}``)
    and the seconds ingest was paused by backpressure (``persist_backpressure_seconds_total``),
    from the service's /metrics."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    paused = re.search(r"^persist_backpressure_seconds_total (\S+)$", text, re.M)
    return {int(m.group(1)): int(float(m.group(2))) for m in re.finditer(
        r'^persist_compression_batches_total\{level="(\d+)"\} (\S+)$', text, re.M)}, (
        round(float(paused.group(1)), 2) if paused else None)


def _sustained(samples: list, total: int, column: int):
    """Frames per second between the first samples at which ``column`` (1: written, 2:
    received) reached 10% and 90% of ``total``; None when the run was too short to tell."""
    t10 = next((s[0] for s in samples if s[column] >= 0.1 * total), None)
    at90 = next((s for s in samples if s[column] >= 0.9 * total), None)
    at10 = next((s for s in samples if s[column] >= 0.1 * total), None)
    if t10 is None or at90 is None or at90[0] <= at10[0]:
        return None
    return round((at90[column] - at10[column]) / (at90[0] - at10[0]))


def run_one(args, payloads: list[bytes], raw_total: int, gzip6_bytes: int, compressor: str,
            level: str, conns: int, mode: str = "logs") -> dict:
    """One service run: start, push ``payloads`` (one per connection), wait, stop."""
    work = tempfile.mkdtemp(prefix="jpb", dir="/tmp")
    metrics_port = _free_port() if args.levels else 0
    try:
        cfg = os.path.join(work, "persist.yml")
        config = {
            "server": {"grpcSocket": f"{work}/grpc.sock", "grpcAddress": ""},
            "ipc": {"socket": f"{work}/ipc.sock"},
            "storage": {"dataDir": f"{work}/data", "compressor": compressor,
                        "compressionLevel": level if level == "adaptive" else int(level)},
            "monitoring": ({"enabled": True, "metricsPort": metrics_port,
                            "healthPort": _free_port()} if metrics_port else {"enabled": False}),
            "logging": {"level": "warn"},
        }
        for setting in args.set:
            dotted, value = setting.split("=", 1)
            section, key = dotted.split(".", 1)
            config.setdefault(section, {})[key] = yaml.safe_load(value)
        with open(cfg, "w") as f:
            yaml.safe_dump(config, f)
        env = dict(os.environ, PYTHONPATH=ROOT)
        cprofile = []
        if args.cprofile:
            # twistd's own profiler: cProfile of the reactor thread (ingest, the writer).
            base, ext = os.path.splitext(args.cprofile)
            cprofile = ["--profile", f"{base}-{mode}-{conns}{ext}", "--profiler", "cprofile",
                        "--savestats"]
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             *cprofile, "--pidfile=", "--logfile", os.path.join(work, "twistd.log"),
             "joblet-persist", "--config", cfg],
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
            base, ext = os.path.splitext(args.profile)
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--rate", "250", "--nonblocking",
                 *(["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []),
                 *(["--idle"] if os.environ.get("BENCH_PROFILE_IDLE") else []),
                 "--threads", "--format", {".json": "speedscope", ".txt": "raw"}.get(
                    os.path.splitext(args.profile)[1], "flamegraph"),
                 "-o", f"{base}-{mode}-{conns}{ext}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        readies = []
        senders = []
        for c in range(conns):
            ready = ctx.Event()
            p = ctx.Process(target=_send, args=(f"{work}/ipc.sock", payloads[c], ready, go))
            p.start()
            readies.append(ready)
            senders.append(p)
        for r in readies:
            r.wait()
        total = args.frames
        cpu0 = _cpu_seconds(proc.pid), _cpu_seconds(proc.pid, proc.pid)
        t0 = time.perf_counter()
        go.set()
        received_at = None
        samples = []  # (seconds, written, received): the sustained rates
        while True:
            st = _stats(stub)
            samples.append((time.perf_counter() - t0, st.messages_written, st.messages_received))
            if received_at is None and st.messages_received >= total:
                received_at = time.perf_counter() - t0
            if st.messages_written >= total:
                break
            if proc.poll() is not None:
                raise SystemExit(f"service exited; see {work}/twistd.log")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu = _cpu_seconds(proc.pid) - cpu0[0], _cpu_seconds(proc.pid, proc.pid) - cpu0[1]
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        rss = _peak_rss(proc.pid)
        levels, paused = _monitoring(metrics_port) if metrics_port else (None, None)
        st = _stats(stub)
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for p in senders:
            p.join(10)
        if mode == "logs":
            disk = _tree_bytes(os.path.join(work, "data", "logs"))
        else:
            disk = sum(_tree_bytes(os.path.join(work, "data", top))
                       for top in ("logs", "metrics", "events"))
        return {
            "mode": mode,
            "compressor": f"{compressor}:{level}",
            "connections": conns,
            "frames": total,
            "seconds": round(elapsed, 3),
            "frames_per_s": round(total / elapsed),
            # All frames decoded and buffered (the rest is the last flush and fsync).
            "received_s": round(received_at or elapsed, 3),
            # Frames/s while the run was in full flow: from 10% to 90% of the frames
            # written (received), leaving out the start and the end, which waits for the
            # flush tick of the buffers that no batch filled (up to storage.flushInterval).
            "sustained_frames_per_s": _sustained(samples, total, 1),
            "sustained_received_per_s": _sustained(samples, total, 2),
            # Log content per second (logs mode only), and frame bytes per second.
            "mb_per_s": round(raw_total / elapsed / 1e6, 1) if mode == "logs" else None,
            "wire_mb_per_s": round(sum(map(len, payloads)) / elapsed / 1e6, 1),
            "peak_rss_mb": round(rss / 2**20, 1),
            # The service's CPU time from the first byte sent until every frame was
            # written: the whole process, and its main (reactor) thread.
            "cpu_s": round(cpu[0], 2),
            "reactor_cpu_s": round(cpu[1], 2),
            "disk_bytes": disk,
            "gzip6_bytes": gzip6_bytes if mode == "logs" else None,
            "vs_gzip6": round(disk / gzip6_bytes, 3) if mode == "logs" else None,
            "stored": st.total_logs,
            "stored_metrics": st.total_metrics,
            "stored_events": st.total_events,
            "exit_code": proc.returncode,
            **({"level_batches": levels, "backpressure_s": paused} if levels is not None else {}),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2_000_000)
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--levels", action="store_true",
                    help="enable the service's /metrics and print the batches compressed "
                         "per level (level_batches) and the seconds ingest was paused by "
                         "backpressure (backpressure_s) for each run")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a configuration setting of the service for every run, e.g. "
                         "writer.flushInterval=0.5s or storage.fsync=never (repeatable)")
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compressors", nargs="+", default=["deflate:5", "isal:1"],
                    help="name:level pairs (level an int or 'adaptive')")
    ap.add_argument("--modes", nargs="+", choices=("logs", "mixed"), default=["logs", "mixed"],
                    help="traffic: LOG frames only, and/or 70%% logs, 10%% metrics, "
                    "20%% events; modes alternate run by run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the median is kept")
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--profile", help="record the service with py-spy into this file "
                    "(.svg flamegraph, or .json speedscope); -MODE-CONNECTIONS is added to "
                    "the name")
    ap.add_argument("--cprofile", help="profile the service's reactor thread with cProfile "
                    "(twistd --profiler cprofile) into this pstats file; -MODE-CONNECTIONS is "
                    "added to the name")
    args = ap.parse_args()

    lines = make_lines(args.frames, 1, args.line_bytes)
    payloads: dict = {}  # (mode, connections) -> one payload per connection
    raw_by_key: dict = {}
    for conns in args.connections:
        for c in range(conns):
            if "logs" in args.modes:
                data, raw = encode_frames(lines, args.jobs, c, conns)
                payloads.setdefault(("logs", conns), []).append(data)
                if conns == args.connections[0]:
                    for k, v in raw.items():
                        raw_by_key.setdefault(k, []).extend(v)
            if "mixed" in args.modes:
                data = encode_mixed_frames(lines, args.jobs, c, conns)
                payloads.setdefault(("mixed", conns), []).append(data)
    raw_total = sum(len(x) for x in lines)
    # gzip -6 of the same raw content, one file per (job, stream) as stored.
    gzip6 = 1
    if raw_by_key:
        gzip6 = 0
        for key in sorted(raw_by_key):
            c = zlib.compressobj(6, zlib.DEFLATED, 31)
            gzip6 += len(c.compress(b"".join(raw_by_key[key])) + c.flush())
    results = []
    ratios = []
    for spec in args.compressors:
        name, level = spec.split(":")
        for conns in args.connections:
            runs: dict = {mode: [] for mode in args.modes}
            for _ in range(args.repeat):
                # Alternate the modes, so that both see the same share of the machine's load.
                for mode in args.modes:
                    runs[mode].append(run_one(args, payloads[mode, conns], raw_total, gzip6,
                                              name, level, conns, mode))
            order = {mode: list(mode_runs) for mode, mode_runs in runs.items()}
            medians = {}
            sustained = {}
            for mode, mode_runs in runs.items():
                rates = sorted(x["sustained_frames_per_s"] or 0 for x in mode_runs)
                sustained[mode] = rates[len(rates) // 2]
                mode_runs.sort(key=lambda r: r["frames_per_s"])
                r = mode_runs[len(mode_runs) // 2]
                r["runs_frames_per_s"] = [x["frames_per_s"] for x in mode_runs]
                r["runs_sustained_frames_per_s"] = [x["sustained_frames_per_s"]
                                                    for x in mode_runs]
                medians[mode] = r["frames_per_s"]
                results.append(r)
                print(json.dumps(r), flush=True)
            if len(medians) == 2:
                # The modes alternate run by run: pair i is the i-th run of each.
                pairs = [(x["frames_per_s"] / y["frames_per_s"],
                          (x["sustained_frames_per_s"] or 0) / (y["sustained_frames_per_s"] or 1))
                         for x, y in zip(order["mixed"], order["logs"], strict=True)]
                ratio = {
                    "compressor": f"{name}:{level}",
                    "connections": conns,
                    "logs_frames_per_s": medians["logs"],
                    "mixed_frames_per_s": medians["mixed"],
                    "mixed_vs_logs": round(medians["mixed"] / medians["logs"], 3),
                    "sustained_logs_frames_per_s": sustained["logs"],
                    "sustained_mixed_frames_per_s": sustained["mixed"],
                    "sustained_mixed_vs_logs": (round(sustained["mixed"] / sustained["logs"], 3)
                                                if sustained["logs"] else None),
                    "pair_ratios": [round(w, 3) for w, _ in pairs],
                    "sustained_pair_ratios": [round(r, 3) for _, r in pairs],
                    "median_pair_ratio": round(statistics.median(w for w, _ in pairs), 3),
                    "median_sustained_pair_ratio": round(
                        statistics.median(r for _, r in pairs), 3),
                }
                ratios.append(ratio)
                print(json.dumps(ratio), flush=True)
    info = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "raw_bytes": raw_total,
        "results": results,
        "mixed_vs_logs": ratios,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
