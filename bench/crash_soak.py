"""Crash soak: SIGKILL a real ``twistd joblet-persist`` at random points, restart, check the files.

Every cycle, on one data directory kept across cycles:

1. start the service (a "checker" configuration: no retention), load every job with one
   query each (loading a job is what cuts torn tails), then check:
   - ``gzip -t`` passes on every ``*.gz`` file under the data directory;
   - per job and kind (stdout, stderr, metrics, and the seven telemetry event kinds, IPC
     types 3..9) the segment files, decoded in name order, hold a contiguous run of what was
     sent (sequence numbers ``a, a+1, ..., b-1``, byte-exact log content, the right
     timestamps): a prefix of what was sent (``a == 0``) until a retention cycle has dropped
     old segments, and ``a`` never moves back;
   - nothing sent more than ``flushInterval + --margin`` before the kill is missing;
   - GetJobInfo's log and metric counts equal what the files hold (the job index agrees);
   - after the final SIGTERM: no temporary index file is left;
2. send LOG (both streams), METRIC and telemetry event frames (types 3..9) for every job over
   the Unix socket, resuming each (job, kind) where the stored data ends, and SIGKILL the
   service at a random moment.  The kill point varies by cycle:
   - ``ingest``: after 0.2 to 2 s of steady ingest (4 KiB segments: rotation every few
     appends; the job index replaced every 50 ms);
   - ``startup``: a fresh process receives traffic the moment it answers Ping and is killed
     within 0.4 s, while jobs are being loaded (their torn tails cut) and appended to;
   - ``retention``: a process whose retention caps every job at 24 KiB every 0.2 s, so
     old segments are being removed while it is killed during ingest.

``--burners`` CPU-burning processes run meanwhile (the load under which the crash test once
failed).  After the last cycle the service is started once more, checked, stopped with
SIGTERM and checked again.  Exit status 0 when every check passed.

    .venv/bin/python bench/crash_soak.py --cycles 40 --burners 2

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import yaml  # noqa: E402

from bench.bench_ingest import _event_payload  # noqa: E402
from joblet_persist import events  # noqa: E402
from joblet_persist._proto import ipc_pb2, persist_pb2, persist_pb2_grpc  # noqa: E402
from joblet_persist.storage.segment import thd_list_segments  # noqa: E402

BASE_TS = 1_770_000_000_000_000_000
FLUSH_INTERVAL = 0.05
LOG_KINDS = {"stdout": 1, "stderr": 2}
EVENT_KINDS = {kind.stem: kind.msg_type for kind in events.KINDS}
KINDS = (*LOG_KINDS, "metrics", *EVENT_KINDS)
TOP_OF = {"stdout": "logs", "stderr": "logs", "metrics": "metrics",
          **{stem: "events" for stem in EVENT_KINDS}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def content(job: str, kind: str, seq: int) -> bytes:
    """The LOG content of message ``seq``: one line, its sequence readable in it."""
    return f"{job} {kind} #{seq:08d} ".encode() + b"." * (seq % 53) + b"\n"


def ts(seq: int) -> int:
    return BASE_TS + seq * 1_000_003


def _frame(msg_type: int, job: str, data: bytes, timestamp: int, sequence: int) -> bytes:
    body = ipc_pb2.IPCMessage(version=1, type=msg_type, job_uuid=job, timestamp=timestamp,
                              sequence=sequence, data=data).SerializeToString()
    return struct.pack(">I", len(body)) + body


def frame_of(job: str, kind: str, seq: int, rng: random.Random) -> bytes:
    """The IPC frame of message ``seq`` of ``kind`` for ``job``."""
    t = ts(seq)
    if kind in LOG_KINDS:
        line = ipc_pb2.LogLine(job_uuid=job, stream=LOG_KINDS[kind], timestamp=t, sequence=seq,
                               content=content(job, kind, seq)).SerializeToString()
        return _frame(1, job, line, t, seq)
    if kind == "metrics":
        data = ipc_pb2.MetricData(cpu_usage=seq + 0.5, memory_usage=(1 << 40) + seq)
        payload = ipc_pb2.Metric(job_uuid=job, timestamp=t, sequence=seq,
                                 data=data).SerializeToString()
        return _frame(2, job, payload, t, seq)
    msg_type = EVENT_KINDS[kind]
    return _frame(msg_type, job, _event_payload(rng, msg_type, job, t, seq), t, seq)


# -- the service ---------------------------------------------------------------------------


class Service:
    """One ``twistd -n joblet-persist`` child on the soak's directory."""

    def __init__(self, workdir: str, config: dict, name: str):
        self.workdir = workdir
        self.grpc_sock = os.path.join(workdir, "grpc.sock")
        self.ipc_sock = os.path.join(workdir, "ipc.sock")
        path = os.path.join(workdir, f"{name}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        self.out = open(os.path.join(workdir, "service.log"), "ab")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile=-", "joblet-persist", "--config", path],
            stdout=self.out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode} at start")
            try:
                reply = self.call(lambda stub, t: stub.Ping(persist_pb2.PingRequest(), timeout=t),
                                  timeout=1.0)
                if reply.healthy:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)  # polling a child process, not a wait in a test
        raise RuntimeError("service did not answer Ping in time")

    def call(self, fn, timeout: float = 20.0):
        with grpc.insecure_channel(f"unix:{self.grpc_sock}") as channel:
            return fn(persist_pb2_grpc.PersistServiceStub(channel), timeout)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time of the kill once the process is gone."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.out.close()
        return at

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.out.close()
        return code


def base_config(workdir: str, retention: bool, segment_bytes: int) -> dict:
    config = {
        "server": {"grpcSocket": f"{workdir}/grpc.sock", "grpcAddress": ""},
        "ipc": {"socket": f"{workdir}/ipc.sock"},
        "storage": {
            "dataDir": f"{workdir}/data",
            "segmentMaxBytes": segment_bytes,
            "unloadIdleAfter": 0,
            "retention": {"minFreeBytes": 0},
        },
        "writer": {"flushInterval": FLUSH_INTERVAL, "indexInterval": 0.05},
        "monitoring": {"enabled": False},
    }
    if retention:
        config["storage"]["retention"].update(
            {"jobMaxBytes": "24KiB", "interval": 0.2, "activeWindow": 0.1}
        )
    return config


# -- traffic ---------------------------------------------------------------------------------


class Traffic:
    """One sender thread per job, resuming each (job, kind) at ``start[(job, kind)]``.

    ``sent[(job, kind)]`` lists ``(seq, t)``: ``t`` is when that frame's ``sendall`` returned.
    """

    def __init__(self, path: str, jobs: list, start: dict, seed: int):
        self.path = path
        self.jobs = jobs
        self.next = dict(start)
        self.sent = {key: [] for key in start}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(job, seed + n), daemon=True)
                         for n, job in enumerate(jobs)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _send(self, sock, job: str, kind: str, rng) -> None:
        key = (job, kind)
        seq = self.next[key]
        sock.sendall(frame_of(job, kind, seq, rng))
        self.sent[key].append((seq, time.monotonic()))
        self.next[key] = seq + 1

    def _run(self, job: str, seed: int) -> None:
        rng = random.Random(seed)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        tick = 0
        try:
            sock.connect(self.path)
            while not self._stop.is_set():
                for _ in range(3):
                    self._send(sock, job, "stdout", rng)
                self._send(sock, job, "stderr", rng)
                if tick % 3 == 0:
                    self._send(sock, job, "metrics", rng)
                self._send(sock, job, list(EVENT_KINDS)[tick % len(EVENT_KINDS)], rng)
                tick += 1
                self._stop.wait(0.002)  # pacing of the load generator
        except OSError:
            pass  # the service was killed
        finally:
            sock.close()


# -- checks ------------------------------------------------------------------------------------


def gzip_test_all(data_dir: str) -> list[str]:
    """``gzip -t`` of every .gz file (in batches); the error lines."""
    files = []
    for root, _dirs, names in os.walk(data_dir):
        files.extend(os.path.join(root, n) for n in names if n.endswith(".gz"))
    errors = []
    for i in range(0, len(files), 400):
        batch = sorted(files[i:i + 400])
        result = subprocess.run(["gzip", "-t", *batch], capture_output=True)
        if result.returncode != 0:
            sizes = {p: os.path.getsize(p) for p in batch if os.path.exists(p)}
            for line in result.stderr.decode(errors="replace").splitlines():
                if ": " not in line:
                    continue
                path = line.split(": ")[1]
                errors.append(f"{line} (size {sizes.get(path)})")
    return errors


def stored_run(data_dir: str, job: str, kind: str) -> tuple[list, list]:
    """The sequence numbers stored for (job, kind), from its files in order; and problems."""
    directory = os.path.join(data_dir, TOP_OF[kind], job)
    seqs, problems = [], []
    for _index, path in thd_list_segments(directory, kind):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            problems.append(f"{path}: {e} (size {len(raw)})")
            continue
        if kind in LOG_KINDS:
            for line in data.splitlines(keepends=True):
                seq = int(line.split(b"#")[1][:8])
                if line != content(job, kind, seq):
                    problems.append(f"{path}: content of #{seq} differs")
                seqs.append(seq)
        else:
            for line in data.splitlines():
                obj = json.loads(line)
                seq = obj["sequence"]
                if obj["timestamp"] != ts(seq):
                    problems.append(f"{path}: timestamp of #{seq} differs")
                seqs.append(seq)
    return seqs, problems


class Checker:
    """What was sent and stored, per (job, kind), across cycles."""

    def __init__(self, data_dir: str, jobs: list, margin: float):
        self.data_dir = data_dir
        self.jobs = jobs
        self.margin = margin
        self.low = {(job, kind): 0 for job in jobs for kind in KINDS}  # first stored seq
        self.resume = {(job, kind): 0 for job in jobs for kind in KINDS}
        self.required = dict(self.resume)  # stored at least up to here (durability)
        self.retention_seen = False
        self.failures: list[str] = []

    def record_cycle(self, traffic: Traffic, killed_at: float, retention: bool) -> None:
        cutoff = killed_at - FLUSH_INTERVAL - self.margin
        for key, sent in traffic.sent.items():
            durable = [seq for seq, t in sent if t < cutoff]
            if durable:
                self.required[key] = max(self.required[key], durable[-1] + 1)
        self.retention_seen = self.retention_seen or retention

    def check(self, service: Service, label: str) -> int:
        """Load every job, then check the files and the index; returns failures found."""
        before = len(self.failures)
        for job in self.jobs:
            request = persist_pb2.QueryLogsRequest(job_uuid=job, limit=1)
            try:
                service.call(lambda stub, t, r=request: list(stub.QueryLogs(r, timeout=t)))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    self.failures.append(f"{label}: loading {job}: {e.code()} {e.details()}")
        for error in gzip_test_all(self.data_dir):
            self.failures.append(f"{label}: gzip -t: {error}")
        for job in self.jobs:
            counts = {"log": 0, "metric": 0}
            for kind in KINDS:
                key = (job, kind)
                seqs, problems = stored_run(self.data_dir, job, kind)
                self.failures.extend(f"{label}: {p}" for p in problems)
                if kind in LOG_KINDS:
                    counts["log"] += len(seqs)
                elif kind == "metrics":
                    counts["metric"] += len(seqs)
                if not seqs:
                    if self.required[key] > 0:
                        self.failures.append(f"{label}: {job}/{kind}: nothing stored, "
                                             f"{self.required[key]} required")
                    continue
                a = seqs[0]
                if seqs != list(range(a, a + len(seqs))):
                    self.failures.append(f"{label}: {job}/{kind}: not contiguous: "
                                         f"{_first_gap(seqs)}")
                if a < self.low[key] or (a > 0 and not self.retention_seen):
                    self.failures.append(f"{label}: {job}/{kind}: starts at {a}, "
                                         f"expected {self.low[key]}")
                end = a + len(seqs)
                if end < self.required[key]:
                    self.failures.append(f"{label}: {job}/{kind}: stored up to {end}, lost "
                                         f"{self.required[key] - end} sent before the window")
                self.low[key] = a
                self.resume[key] = end
                self.required[key] = min(self.required[key], end)
            try:
                info = service.call(lambda stub, t, j=job: stub.GetJobInfo(
                    persist_pb2.GetJobInfoRequest(job_uuid=j), timeout=t))
            except grpc.RpcError as e:
                if counts["log"] or counts["metric"]:
                    self.failures.append(f"{label}: GetJobInfo {job}: {e.code()}")
                continue
            if (info.log_count, info.metric_count) != (counts["log"], counts["metric"]):
                self.failures.append(
                    f"{label}: {job}: index says {info.log_count} logs {info.metric_count} "
                    f"metrics, files hold {counts['log']} and {counts['metric']}")
        return len(self.failures) - before


def _first_gap(seqs: list) -> str:
    for prev, cur in zip(seqs, seqs[1:], strict=False):
        if cur != prev + 1:
            return f"{prev} then {cur}"
    return "?"


# -- the soak ------------------------------------------------------------------------------------


def start_burners(count: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run(args) -> int:
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="jpcs")  # short: AF_UNIX paths
    data_dir = os.path.join(workdir, "data")
    jobs = [f"cs{n:02d}-4000-8000-0000000000{n:02d}" for n in range(args.jobs)]
    checker = Checker(data_dir, jobs, args.margin)
    burners = start_burners(args.burners)
    kinds_done = {"ingest": 0, "startup": 0, "retention": 0}
    started = time.monotonic()
    passed = 0
    previous = "nothing"
    try:
        for cycle in range(1, args.cycles + 1):
            point = rng.choice(("ingest", "ingest", "startup", "retention"))
            service = Service(workdir, base_config(workdir, False, args.segment_bytes), "checker")
            service.wait_ready()
            failed = checker.check(service, f"cycle {cycle} (after a kill during {previous})")
            previous = point
            if point != "ingest":
                service.kill()  # idle: the next process starts from the same files
                service = Service(workdir, base_config(workdir, point == "retention", args.segment_bytes), point)
                # For "startup", traffic starts the moment Ping answers: loads under way.
                service.wait_ready()
            traffic = Traffic(service.ipc_sock, jobs, checker.resume, rng.randrange(1 << 30))
            traffic.start()
            delay = rng.uniform(0.0, 0.4) if point == "startup" else rng.uniform(0.2, 2.0)
            time.sleep(delay)  # the random kill point
            killed_at = service.kill()
            traffic.stop()
            checker.record_cycle(traffic, killed_at, point == "retention")
            kinds_done[point] += 1
            sent = sum(len(v) for v in traffic.sent.values())
            log(f"cycle {cycle}: {failed} failures found at its start; then {point}, killed "
                f"after {delay:.2f}s, {sent} frames sent")
            if failed:
                for line in checker.failures[-failed:][:20]:
                    log("  " + line)
            else:
                passed += 1
        service = Service(workdir, base_config(workdir, False, args.segment_bytes), "checker")
        service.wait_ready()
        final = checker.check(service, f"final (after a kill during {previous})")
        code = service.terminate()
        if code not in (0, -signal.SIGTERM):
            checker.failures.append(f"final: SIGTERM exit status {code}")
        for error in gzip_test_all(data_dir):
            checker.failures.append(f"after SIGTERM: gzip -t: {error}")
        # The service removes an interrupted index write's temporary file at start; after a
        # clean stop none is left (while it runs, one may exist during each index write).
        leftovers = [n for n in os.listdir(data_dir) if n.endswith(".tmp")]
        if leftovers:
            checker.failures.append(f"after SIGTERM: temporary files left: {leftovers}")
        if final == 0:
            passed += 1
    finally:
        for b in burners:
            b.kill()
            b.wait()
    elapsed = time.monotonic() - started
    files = sum(len(names) for _r, _d, names in os.walk(data_dir))
    summary = {
        "cycles": args.cycles, "kill_points": kinds_done, "restarts_checked_clean": passed,
        "checks": args.cycles + 1, "failures": len(checker.failures), "files": files,
        "seconds": round(elapsed, 1), "burners": args.burners, "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "kinds_trimmed_by_retention": sum(1 for a in checker.low.values() if a > 0),
        "messages_stored": sum(checker.resume[k] - checker.low[k] for k in checker.low),
    }
    log(json.dumps(summary))
    for line in checker.failures[:50]:
        log("FAIL " + line)
    if args.keep or checker.failures:
        log(f"data kept in {workdir}")
    else:
        shutil.rmtree(workdir)
    return 1 if checker.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning processes")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--segment-bytes", type=int, default=4096,
                        help="storage.segmentMaxBytes: smaller rotates (creates files) more often")
    parser.add_argument("--margin", type=float, default=3.0,
                        help="seconds beyond flushInterval for the durability check")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
