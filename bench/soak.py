"""Soak: hours-long mixed load on a real ``twistd joblet-persist``, with faults, checked for loss.

What runs at once, against one service process:

- ingest: jobs start and finish all the time (``--active`` jobs at once, each sending for
  ``--lifetime`` seconds at an even share of ``--rate`` frames/s, LOG on both streams plus a
  METRIC sample per second), spread over ``--connections`` Unix-socket connections driven by a
  few sender threads;
- queries: QueryLogs with offsets and limits, the batched RPC, QueryMetrics, GetJobInfo,
  ListJobs, GetStats and Ping in a loop (Ping latency recorded);
- retention: the service's own timer deletes finished jobs after ``--max-age`` seconds;
- deletes: DeleteJob of a share (``--delete-share``) of the finished jobs;
- faults: ``--kills`` SIGKILLs and ``--restarts`` SIGTERMs at random moments, each followed by
  an immediate restart on the same data directory (senders reconnect by themselves).

Checks ("data lost", the target is zero):

- every finished job is read back (both streams, metrics) before retention may delete it:
  every frame the sender fully wrote must be stored, in order, byte-exact, except frames
  written within ``flushInterval + --margin`` before a SIGKILL (the documented durability
  window) and frames of a connection cut by a SIGKILL; a SIGTERM loses nothing;
- after every restart, GetJobInfo counts of the jobs seen before never go backwards;
- at the end (service stopped): every .gz file decodes completely, and the job index equals
  a rebuild from the files.

Sampled every ``--sample`` seconds: the service's RSS, open descriptors (all, and those on
files in the data directory).  Prints a summary (and ``--json FILE``).

    .venv/bin/python bench/soak.py --duration 60                       # smoke run
    .venv/bin/python bench/soak.py --duration 1800 --kills 5 --restarts 5
    .venv/bin/python bench/soak.py --duration 300 --kills 20            # crash loop

Traffic goes only to Unix sockets in a temporary directory on this machine.
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
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from joblet_persist._proto import ipc_pb2, persist_pb2, persist_pb2_grpc  # noqa: E402

BASE_TS = 1_760_000_000_000_000_000
FRAME_HEAD = struct.Struct(">I")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the service process ------------------------------------------------------------------


class Service:
    """``twistd -n joblet-persist`` as a child process, restartable on the same directory."""

    def __init__(self, workdir: str, config: str, flush_interval: float):
        self.workdir = workdir
        self.config = config
        self.flush_interval = flush_interval
        self.grpc_sock = os.path.join(workdir, "grpc.sock")
        self.ipc_sock = os.path.join(workdir, "ipc.sock")
        self.data_dir = os.path.join(workdir, "data")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.logfile = os.path.join(workdir, "service.log")

    def start(self) -> float:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        out = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile=-", "joblet-persist", "--config", self.config],
            cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; see "
                                   f"{self.logfile}")
            if self.healthy():
                return time.monotonic()
            time.sleep(0.05)
        raise RuntimeError("service did not become healthy in 60 s")

    def healthy(self) -> bool:
        try:
            with grpc.insecure_channel(f"unix:{self.grpc_sock}") as channel:
                stub = persist_pb2_grpc.PersistServiceStub(channel)
                return stub.Ping(persist_pb2.PingRequest(), timeout=1).healthy
        except grpc.RpcError:
            return False

    def signal(self, sig: int, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> tuple[int, int]:
        base = f"/proc/{self.pid}/fd"
        total = data = 0
        prefix = self.data_dir + os.sep
        for name in os.listdir(base):
            try:
                target = os.readlink(os.path.join(base, name))
            except OSError:
                continue
            total += 1
            data += target.startswith(prefix)
        return total, data


def write_config(workdir: str, args, metrics_port: int) -> str:
    path = os.path.join(workdir, "persist.yml")
    text = f"""\
server:
  grpcSocket: {workdir}/grpc.sock
  grpcAddress: ""
ipc:
  socket: {workdir}/ipc.sock
storage:
  dataDir: {workdir}/data
  retention:
    logMaxAge: {args.max_age}s
    metricMaxAge: {args.max_age}s
    activeWindow: {max(1, args.max_age // 2)}s
    interval: {args.retention_interval}s
    minFreeBytes: 0
  unloadIdleAfter: {args.unload_after}s
writer:
  flushInterval: {args.flush_interval}s
monitoring:
  metricsPort: {metrics_port}
  healthPort: 0
"""
    with open(path, "w") as f:
        f.write(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- load: jobs and senders --------------------------------------------------------------------


def content(job: int, stream: int, seq: int) -> bytes:
    return f"soak job {job} stream {stream} line {seq:08d} ".encode() + b"." * (seq % 64) + b"\n"


def log_frame(job_id: str, stream: int, seq: int, body: bytes) -> bytes:
    line = ipc_pb2.LogLine(job_uuid=job_id, stream=stream, timestamp=BASE_TS + seq, sequence=seq,
                           content=body).SerializeToString()
    env = ipc_pb2.IPCMessage(version=1, type=1, job_uuid=job_id, timestamp=BASE_TS + seq,
                             sequence=seq, data=line).SerializeToString()
    return FRAME_HEAD.pack(len(env)) + env


def metric_frame(job_id: str, seq: int) -> bytes:
    payload = ipc_pb2.Metric(
        job_uuid=job_id, timestamp=BASE_TS + seq, sequence=seq,
        data=ipc_pb2.MetricData(cpu_usage=seq % 100 + 0.5, memory_usage=seq << 20),
    ).SerializeToString()
    env = ipc_pb2.IPCMessage(version=1, type=2, job_uuid=job_id, timestamp=BASE_TS + seq,
                             sequence=seq, data=payload).SerializeToString()
    return FRAME_HEAD.pack(len(env)) + env


class Job:
    """One job of the soak: what was sent, when, and what became of it.  Sender-thread owned
    while active; read by the checker once finished."""

    __slots__ = ("n", "job_id", "conn", "started", "ends", "sent", "next", "finished_at",
                 "state")

    def __init__(self, n: int, conn: int, started: float, lifetime: float):
        self.n = n
        self.job_id = f"50a60000-0000-4000-8000-{n:012d}"
        self.conn = conn
        self.started = started
        self.ends = started + lifetime
        # kind (1, 2, "metrics") -> list of (seq, monotonic time the frame was fully written)
        self.sent = {1: [], 2: [], "metrics": []}
        self.next = {1: 0, 2: 0, "metrics": 0}  # next sequence number to send
        self.finished_at = 0.0
        self.state = "active"  # active -> finished -> checked -> kept | deleted (or expired)


class Load:
    """Creates jobs and sends their frames over a fixed set of connections."""

    def __init__(self, args, service: Service, faults: Faults):
        self.args = args
        self.service = service
        self.faults = faults
        self.rng = random.Random(args.seed)
        self.jobs: dict[int, Job] = {}
        self.active: dict[int, list[Job]] = {c: [] for c in range(args.connections)}
        self.finished: list[Job] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.next_job = 0
        self.frames = 0
        self.bytes = 0
        self.reconnects = 0
        self.cut_frames = 0

    def new_job(self, now: float) -> None:
        conn = self.next_job % self.args.connections
        job = Job(self.next_job, conn, now, self.args.lifetime * (0.5 + self.rng.random()))
        self.next_job += 1
        with self.lock:
            self.jobs[job.n] = job
            self.active[conn].append(job)

    def run_creator(self, until: float) -> None:
        """Keeps ``--active`` jobs running: a new one whenever one ends."""
        while not self.stop.is_set() and time.monotonic() < until:
            now = time.monotonic()
            with self.lock:
                count = sum(len(v) for v in self.active.values())
            for _ in range(self.args.active - count):
                self.new_job(now)
            self.stop.wait(0.05)

    def run_sender(self, conns: list[int]) -> None:
        """One thread: paced chunks on its connections; reconnects after faults."""
        per_job_tick = self.args.rate / self.args.active * self.args.tick
        socks: dict[int, socket.socket] = {}
        carry = 0.0
        next_tick = time.monotonic()
        metric_every = max(1, round(1.0 / self.args.tick))
        tick = 0
        while not self.stop.is_set():
            now = time.monotonic()
            carry += per_job_tick
            n = int(carry)
            carry -= n
            for conn in conns:
                with self.lock:
                    jobs = list(self.active[conn])
                if not jobs:
                    continue
                data = bytearray()
                ends = []  # (end offset, job, kind, seq)
                for job in jobs:
                    if now >= job.ends:
                        with self.lock:
                            self.active[conn].remove(job)
                        job.finished_at = now
                        job.state = "finished"
                        with self.lock:
                            self.finished.append(job)
                        continue
                    nxt = job.next
                    for _ in range(n):
                        kind = 2 if (nxt[1] + nxt[2]) % 5 == 4 else 1
                        seq = nxt[kind]
                        nxt[kind] = seq + 1
                        data += log_frame(job.job_id, kind, seq, content(job.n, kind, seq))
                        ends.append((len(data), job, kind, seq))
                    if tick % metric_every == 0:
                        seq = nxt["metrics"]
                        nxt["metrics"] = seq + 1
                        data += metric_frame(job.job_id, seq)
                        ends.append((len(data), job, "metrics", seq))
                if data:
                    self._send(socks, conn, bytes(data), ends)
            tick += 1
            next_tick += self.args.tick
            self.stop.wait(max(0.0, next_tick - time.monotonic()))
        for sock in socks.values():
            sock.close()

    def _send(self, socks, conn, data: bytes, ends) -> None:
        sock = socks.get(conn)
        if sock is None:
            sock = socks[conn] = self._connect()
            if sock is None:
                socks.pop(conn)
                return  # service down: these frames are not sent (and not expected)
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(data):
                pos += sock.send(view[pos:])
        except OSError:
            sock.close()
            socks.pop(conn)
            self.reconnects += 1
        done = time.monotonic()
        start = 0
        for end, job, kind, seq in ends:
            if end <= pos:
                job.sent[kind].append((seq, done))
            else:
                if start < pos:
                    self.cut_frames += 1  # partly written: never counted as sent
                break
            start = end
        self.frames += sum(1 for e in ends if e[0] <= pos)
        self.bytes += pos

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.service.ipc_sock)
        except OSError:
            sock.close()
            return None
        return sock


# -- faults ------------------------------------------------------------------------------------


class Faults:
    """SIGKILL / SIGTERM at planned moments, each followed by a restart.  Main thread."""

    def __init__(self, service: Service, plan: list[tuple[float, str]]):
        self.service = service
        self.plan = sorted(plan)
        # (start, end, kill time): frames fully written in [start, end] may be lost.
        self.kill_windows: list[tuple[float, float, float]] = []
        self.done: list[dict] = []
        self.down = threading.Event()

    def due(self, now: float):
        if self.plan and now >= self.plan[0][0]:
            return self.plan.pop(0)[1]
        return None

    def inject(self, what: str, margin: float) -> None:
        sig = signal.SIGKILL if what == "kill" else signal.SIGTERM
        self.down.set()
        at = time.monotonic()
        code = self.service.signal(sig)
        stopped = time.monotonic()
        up = self.service.start()
        self.down.clear()
        if what == "kill":
            self.kill_windows.append((at - self.service.flush_interval - margin, up, at))
        self.done.append({"fault": what, "exit_code": code, "stop_seconds": round(stopped - at, 2),
                          "restart_seconds": round(up - stopped, 2)})
        log(f"{what}: exit {code}, stopped in {stopped - at:.2f}s, healthy again in "
            f"{up - stopped:.2f}s")


# -- queries and checks ----------------------------------------------------------------------------


class Checker:
    """Queries in a loop, reads finished jobs back, deletes a share of them."""

    def __init__(self, args, service: Service, load: Load, faults: Faults):
        self.args = args
        self.service = service
        self.load = load
        self.faults = faults
        self.rng = random.Random(args.seed + 1)
        self.codes: dict[str, int] = {}
        self.ping_ms: list[float] = []
        self.checked = 0
        self.lost = 0
        self.lost_in_window = 0
        self.errors: list[str] = []
        self.deleted = 0
        self.expired = 0
        self.lost_age = 0.0
        self.lost_outside_age = 0.0  # the oldest frame lost outside a window: age at the kill
        self.lost_by_kill: dict = {}  # kill time (monotonic) -> frames lost outside its window
        self.lost_without_kill = 0
        self.seen_counts: dict[str, tuple[int, int]] = {}
        self.backwards = 0
        self.stop = threading.Event()

    def _stub(self):
        channel = grpc.insecure_channel(f"unix:{self.service.grpc_sock}")
        return channel, persist_pb2_grpc.PersistServiceStub(channel)

    def count(self, code) -> None:
        name = code.name if hasattr(code, "name") else str(code)
        self.codes[name] = self.codes.get(name, 0) + 1

    def run_queries(self) -> None:
        channel, stub = self._stub()
        try:
            while not self.stop.is_set():
                try:
                    self._random_query(stub)
                    self.count(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    self.count(e.code())
                    # ABORTED: the job lost a file to a deletion during the read (the
                    # soak's DeleteJob or retention); documented, the client retries.
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                        self.errors.append(f"query: {e.code().name}: {e.details()}")
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        channel.close()
                        self.stop.wait(0.2)
                        channel, stub = self._stub()
                self.stop.wait(self.args.query_pause)
        finally:
            channel.close()

    def _random_query(self, stub) -> None:
        rng = self.rng
        with self.load.lock:
            jobs = list(self.load.jobs.values())
        if not jobs:
            return
        job = rng.choice(jobs[-500:])
        what = rng.randrange(8)
        if what == 0:
            started = time.monotonic()
            stub.Ping(persist_pb2.PingRequest(), timeout=2)
            self.ping_ms.append((time.monotonic() - started) * 1000)
        elif what == 1:
            req = persist_pb2.QueryLogsRequest(job_uuid=job.job_id, stream=rng.choice((0, 1, 2)),
                                               offset=rng.randrange(200), limit=100)
            seqs = [ln.sequence for ln in stub.QueryLogs(req, timeout=10)]
            if req.stream and seqs != sorted(seqs):
                self.errors.append(f"{job.job_id}: out of order")
        elif what == 2:
            req = persist_pb2.QueryLogsRequest(job_uuid=job.job_id)
            for _ in stub.QueryLogsBatched(req, timeout=10):
                pass
        elif what == 3:
            list(stub.QueryMetrics(persist_pb2.QueryMetricsRequest(job_uuid=job.job_id, limit=20),
                                   timeout=10))
        elif what == 4:
            info = stub.GetJobInfo(persist_pb2.GetJobInfoRequest(job_uuid=job.job_id), timeout=5)
            self._note_counts(info)
        elif what == 5:
            stub.ListJobs(persist_pb2.ListJobsRequest(limit=50), timeout=5)
        else:
            stub.GetStats(persist_pb2.GetStatsRequest(), timeout=5)

    def _note_counts(self, info) -> None:
        new = (info.log_count, info.metric_count)
        old = self.seen_counts.get(info.job_uuid)
        if old is not None and (new[0] < old[0] or new[1] < old[1]):
            self.backwards += 1
            self.errors.append(f"{info.job_uuid}: counts went back from {old} to {new}")
        self.seen_counts[info.job_uuid] = new

    def check_after_restart(self) -> None:
        """GetJobInfo of up to 100 jobs seen before: their counts must not have gone back."""
        channel, stub = self._stub()
        try:
            sample = list(self.seen_counts)
            self.rng.shuffle(sample)
            for job_id in sample[:100]:
                try:
                    self._note_counts(stub.GetJobInfo(
                        persist_pb2.GetJobInfoRequest(job_uuid=job_id), timeout=5))
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:  # deleted meanwhile
                        self.errors.append(f"after restart: {e.code().name}")
        finally:
            channel.close()

    def run_checks(self) -> None:
        """Reads back each finished job once it is past the durability window."""
        channel, stub = self._stub()
        try:
            while not self.stop.is_set() or self._pending():
                job = self._next_ready()
                if job is None:
                    time.sleep(0.2)
                    continue
                if self.faults.down.is_set():
                    self.stop.wait(0.2)
                    with self.load.lock:
                        self.load.finished.insert(0, job)
                    continue
                try:
                    self._check(stub, job)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        with self.load.lock:
                            self.load.finished.insert(0, job)
                        channel.close()
                        self.stop.wait(0.5)
                        channel, stub = self._stub()
                        continue
                    self.errors.append(f"check {job.job_id}: {e.code().name}: {e.details()}")
        finally:
            channel.close()

    def _pending(self) -> bool:
        with self.load.lock:
            return bool(self.load.finished)

    def _next_ready(self):
        wait = self.service.flush_interval + self.args.margin
        with self.load.lock:
            if self.load.finished and time.monotonic() - self.load.finished[0].finished_at > wait:
                return self.load.finished.pop(0)
        return None

    def _read(self, stub, job_id: str, stream: int) -> list:
        req = persist_pb2.QueryLogsRequest(job_uuid=job_id, stream=stream)
        return [ln for b in stub.QueryLogsBatched(req, timeout=30) for ln in b.lines]

    def _check(self, stub, job: Job) -> None:
        if job.state == "checked":
            # Verified already; the DeleteJob after it was cut off by a fault: only retry
            # that (reading again would find the job deleted and count it lost).
            self._delete(stub, job)
            return
        try:
            got = {1: self._read(stub, job.job_id, 1), 2: self._read(stub, job.job_id, 2),
                   "metrics": list(stub.QueryMetrics(
                       persist_pb2.QueryMetricsRequest(job_uuid=job.job_id), timeout=30))}
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            got = {1: [], 2: [], "metrics": []}
        if time.monotonic() - job.finished_at > self.args.max_age - 5:
            # Retention may have deleted (part of) it already: the check came too late.
            self.expired += 1
            job.state = "expired"
            return
        windows = self.faults.kill_windows
        for kind, items in got.items():
            stored = [item.sequence for item in items]
            sent = job.sent[kind]
            if stored != sorted(set(stored)):
                self.errors.append(f"{job.job_id}/{kind}: duplicates or out of order")
            sent_seqs = {s for s, _ in sent}
            extra = [s for s in stored if s not in sent_seqs]
            if extra:
                self.errors.append(f"{job.job_id}/{kind}: {len(extra)} stored but never sent")
            have = set(stored)
            for seq, t in sent:
                if seq in have:
                    continue
                for lo, hi, killed in windows:
                    if lo <= t <= hi:
                        self.lost_in_window += 1
                        # How long before the kill the oldest lost frame was written.
                        self.lost_age = max(self.lost_age, killed - t)
                        break
                else:
                    self.lost += 1
                    later = [killed for _lo, _hi, killed in windows if killed > t]
                    if later:
                        # Lost to the next kill although written before its window.
                        age = min(later) - t
                        self.lost_outside_age = max(self.lost_outside_age, age)
                        key = round(min(later), 1)
                        self.lost_by_kill[key] = self.lost_by_kill.get(key, 0) + 1
                    else:
                        self.lost_without_kill += 1
            if kind != "metrics":
                for item in items:
                    if item.content != content(job.n, kind, item.sequence):
                        self.errors.append(f"{job.job_id}/{kind}: content differs")
                        break
        self.checked += 1
        job.state = "checked"
        if self.rng.random() < self.args.delete_share:
            self._delete(stub, job)
        else:
            job.state = "kept"

    def _delete(self, stub, job: Job) -> None:
        """DeleteJob (idempotent: a retry after a fault succeeds too)."""
        r = stub.DeleteJob(persist_pb2.DeleteJobRequest(job_uuid=job.job_id), timeout=30)
        if not r.success:
            self.errors.append(f"DeleteJob {job.job_id}: {r.message}")
        self.deleted += 1
        job.state = "deleted"
        self.seen_counts.pop(job.job_id, None)


def final_checks(data_dir: str) -> dict:
    """Service stopped: every .gz file decodes; the index equals a rebuild from the files."""
    from joblet_persist.storage import jobindex

    files = bad = 0
    raw = 0
    for root, _dirs, names in os.walk(data_dir):
        for name in names:
            if name.endswith(".gz"):
                files += 1
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        raw += len(gzip.decompress(f.read()))
                except (OSError, EOFError) as e:
                    bad += 1
                    log(f"does not decode: {root}/{name}: {e}")
    rebuilt = jobindex.thd_rebuild(data_dir)
    with open(jobindex.index_path(data_dir)) as f:
        index = json.load(f)["jobs"]
    mismatched = [
        job for job in set(index) | set(rebuilt)
        if job not in index or job not in rebuilt
        or (index[job]["log_count"], index[job]["metric_count"], index[job]["size_bytes"])
        != (rebuilt[job].log_count, rebuilt[job].metric_count, rebuilt[job].size_bytes)
    ]
    return {"files": files, "files_not_decoding": bad, "raw_bytes": raw,
            "jobs_on_disk": len(rebuilt), "index_mismatches": len(mismatched)}


def scrape(port: int) -> dict:
    wanted = ("persist_retention_deleted_jobs_total", "persist_ipc_frames_rejected_total",
              "persist_write_errors_total", "persist_backpressure_seconds_total",
              "persist_durability_lag_seconds", "persist_jobs_loaded", "persist_jobs ",
              "persist_jobs_unloaded_total")
    found: dict = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return found
    for line in text.decode().splitlines():
        for name in wanted:
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                found[key] = float(value)
    return found


def durability_lag(found: dict) -> dict:
    """From the persist_durability_lag_seconds histogram of the last service process: how
    many batches were appended, their mean lag, the share appended within 0.5/1/1.5/2 s of
    their oldest message, and the upper bound of the bucket holding the slowest one."""
    prefix = "persist_durability_lag_seconds"
    count = found.get(prefix + "_count", 0.0)
    if not count:
        return {}
    buckets = sorted(
        (float("inf") if le == "+Inf" else float(le), n)
        for key, n in found.items()
        if key.startswith(prefix + "_bucket") and (le := key.split('le="')[1].split('"')[0])
    )
    within = {f"within_{b:g}s": round(n / count, 5) for b, n in buckets if b in (0.5, 1, 1.5, 2)}
    slowest = next(b for b, n in buckets if n >= count)
    return {"batches": int(count), "mean_s": round(found[prefix + "_sum"] / count, 3),
            **within, "slowest_at_most_s": slowest}


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--senders", type=int, default=4, help="sender threads")
    p.add_argument("--active", type=int, default=200, help="jobs sending at once")
    p.add_argument("--lifetime", type=float, default=20.0, help="mean seconds a job sends")
    p.add_argument("--rate", type=float, default=20000.0, help="LOG frames/s in total")
    p.add_argument("--tick", type=float, default=0.1)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--max-age", type=int, default=60, help="retention age in seconds")
    p.add_argument("--retention-interval", type=int, default=15)
    p.add_argument("--delete-share", type=float, default=0.1)
    p.add_argument("--unload-after", type=int, default=600,
                   help="storage.unloadIdleAfter in seconds (0 keeps every job loaded)")
    p.add_argument("--query-pause", type=float, default=0.01)
    p.add_argument("--kills", type=int, default=0)
    p.add_argument("--restarts", type=int, default=0)
    p.add_argument("--margin", type=float, default=2.0,
                   help="slack beyond flushInterval for the durability window of a kill")
    p.add_argument("--sample", type=float, default=10.0, help="RSS/fd sampling period (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", help="write the summary as JSON to this file")
    args = p.parse_args(argv)

    workdir = args.dir or tempfile.mkdtemp(prefix="soak", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    metrics_port = free_port()
    config = write_config(workdir, args, metrics_port)
    service = Service(workdir, config, args.flush_interval)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    plan = [(t0 + args.duration * (0.05 + 0.9 * rng.random()), "kill")
            for _ in range(args.kills)]
    plan += [(t0 + args.duration * (0.05 + 0.9 * rng.random()), "term")
             for _ in range(args.restarts)]
    faults = Faults(service, plan)

    log(f"work directory {workdir}; starting the service")
    service.start()
    load = Load(args, service, faults)
    checker = Checker(args, service, load, faults)
    until = time.monotonic() + args.duration
    threads = [threading.Thread(target=load.run_creator, args=(until,), daemon=True)]
    for s in range(args.senders):
        conns = list(range(s, args.connections, args.senders))
        threads.append(threading.Thread(target=load.run_sender, args=(conns,), daemon=True))
    threads.append(threading.Thread(target=checker.run_queries, daemon=True))
    checks = threading.Thread(target=checker.run_checks, daemon=True)
    for th in threads + [checks]:
        th.start()

    samples = []
    next_sample = time.monotonic()
    started = time.monotonic()
    while time.monotonic() < until:
        now = time.monotonic()
        fault = faults.due(now)
        if fault is not None:
            faults.inject(fault, args.margin)
            checker.check_after_restart()
        if now >= next_sample:
            try:
                total_fds, data_fds = service.fds()
                m = scrape(metrics_port)
                samples.append({"t": round(now - started, 1), "rss_mib": round(service.rss() / 2**20, 1),
                                "fds": total_fds, "data_fds": data_fds, "frames": load.frames,
                                "jobs": load.next_job,
                                "jobs_on_disk": int(m.get("persist_jobs", -1)),
                                "jobs_loaded": int(m.get("persist_jobs_loaded", -1))})
                s = samples[-1]
                log(f"t={s['t']:.0f}s rss={s['rss_mib']} MiB fds={s['fds']} "
                    f"data_fds={s['data_fds']} frames={s['frames']} jobs={s['jobs']} "
                    f"on_disk={s['jobs_on_disk']} loaded={s['jobs_loaded']} "
                    f"checked={checker.checked} lost={checker.lost}")
            except OSError:
                pass
            next_sample += args.sample
        time.sleep(0.05)

    load_seconds = time.monotonic() - started
    log("load done; finishing the jobs still running")
    load.stop.set()
    for th in threads:
        th.join(30)
    with load.lock:
        for conn_jobs in load.active.values():
            for job in conn_jobs:
                job.finished_at = time.monotonic()
                job.state = "finished"
                load.finished.append(job)
            conn_jobs.clear()
    checker.stop.set()
    checks.join(600)
    elapsed = time.monotonic() - started
    metrics = scrape(metrics_port)
    stopped_at = time.monotonic()
    code = service.signal(signal.SIGTERM)
    stop_seconds = time.monotonic() - stopped_at
    final = final_checks(service.data_dir)

    rss = [s["rss_mib"] for s in samples]
    warm = rss[len(rss) // 4:] or rss
    summary = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv or sys.argv[1:])),
        "machine": machine(),
        "load_seconds": round(load_seconds, 1),
        "seconds_with_final_checks": round(elapsed, 1),
        "frames_sent": load.frames,
        "frames_per_second": round(load.frames / load_seconds),
        "target_log_frames_per_second": args.rate,
        "bytes_sent": load.bytes,
        "jobs": load.next_job,
        "jobs_checked": checker.checked,
        "jobs_deleted_by_rpc": checker.deleted,
        "jobs_expired_before_check": checker.expired,
        "frames_lost": checker.lost,
        "frames_lost_within_kill_windows": checker.lost_in_window,
        "oldest_lost_frame_seconds_before_kill": round(checker.lost_age, 3),
        "frames_lost_without_a_kill": checker.lost_without_kill,
        "oldest_frame_lost_outside_a_window_seconds_before_kill":
            round(checker.lost_outside_age, 3),
        "frames_lost_outside_windows_by_kill": {
            f"{k - started:.1f}s": v for k, v in sorted(checker.lost_by_kill.items())},
        "frames_cut_by_faults": load.cut_frames,
        "counts_went_backwards": checker.backwards,
        "errors": checker.errors[:20],
        "error_count": len(checker.errors),
        "queries": checker.codes,
        "ping_ms_p50": round(percentile(checker.ping_ms, 50), 2),
        "ping_ms_p99": round(percentile(checker.ping_ms, 99), 2),
        "faults": faults.done,
        "final_stop": {"exit_code": code, "seconds": round(stop_seconds, 2)},
        "rss_mib": {"first": rss[0] if rss else None, "min_after_warmup": min(warm, default=None),
                    "max_after_warmup": max(warm, default=None), "last": rss[-1] if rss else None,
                    "max": max(rss, default=None)},
        "fds_max": max((s["fds"] for s in samples), default=None),
        "data_fds_max": max((s["data_fds"] for s in samples), default=None),
        "samples": samples,
        "service_metrics": {k: v for k, v in metrics.items()
                            if not k.startswith("persist_durability_lag")},
        "durability_lag_last_process": durability_lag(metrics),
        "final_checks": final,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if not args.keep and not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = (checker.lost == 0 and not checker.errors and final["files_not_decoding"] == 0
          and final["index_mismatches"] == 0)
    return 0 if ok else 1


def percentile(values: list, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


if __name__ == "__main__":
    sys.exit(main())
