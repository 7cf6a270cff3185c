"""The pool threads' work per message, by kind, in-process: CPU and GIL held.

Each sealed batch becomes stored members on a pool thread: a log batch is encoded and
compressed (``format.encode_log_members``); a metric or event batch first has its JSON lines
built from the IPC payloads (``format.metric_json_lines``, ``events.payload_json_lines``),
then is encoded the same way.  This measures those steps on batches shaped like
bench_ingest.py's mixed traffic (its generators), one kind at a time:

- ``cpu us/msg``: CPU time per message on the calling thread (best of ``--repeat``);
- ``gil us/msg``: how long the step keeps the GIL per message.  The step runs on a worker
  thread while a witness thread counts turns of a Python loop; what the witness loses
  against running alone is the time the worker held the GIL (the reactor thread's loss in
  the service).  Noisy on a shared machine: compare rows of one run.

    .venv/bin/python bench/bench_pool.py [--batches 40] [--repeat 5]

Nothing touches the disk or the network.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ingest  # noqa: E402

from joblet_persist import events  # noqa: E402
from joblet_persist.storage import compress  # noqa: E402
from joblet_persist.storage import format as fmt  # noqa: E402

JOB = "bench-job-0001"
BASE_NS = 1_764_000_000 * 10**9


def steps(log_lines: int, per_kind: int) -> list:
    """(name, messages, step) for each kind: ``step()`` does one batch's pool work."""
    rng = random.Random(1)
    c1 = compress.make_compressor("deflate", 1)
    c5 = compress.make_compressor("deflate", 5)
    lines = bench_ingest.make_lines(log_lines, 1, 100)
    cols = list(range(BASE_NS, BASE_NS + max(log_lines, per_kind)))
    out = [(
        "log (deflate 5)", log_lines,
        lambda: fmt.encode_log_members(cols[:log_lines], cols[:log_lines], cols[:log_lines],
                                       lines, c5),
    )]
    metrics = [bench_ingest._metric_payload(rng, JOB, BASE_NS, s) for s in range(per_kind)]
    n = per_kind
    out.append(("metric lines", n, lambda: fmt.metric_json_lines(JOB, metrics)))
    metric_lines = fmt.metric_json_lines(JOB, metrics)
    out.append(("metric encode (deflate 1)", n,
                lambda: fmt.encode_metric_members(cols[:n], cols[:n], cols[:n], metric_lines, c1)))
    for kind in events.KINDS:
        payloads = [bench_ingest._event_payload(rng, kind.msg_type, JOB, BASE_NS, s)
                    for s in range(n)]
        json_lines = events.payload_json_lines(kind, payloads, JOB, cols[:n], cols[:n])

        def build(kind=kind, payloads=payloads):
            return events.payload_json_lines(kind, payloads, JOB, cols[:n], cols[:n])

        def encode(kind=kind, json_lines=json_lines):
            return fmt.encode_event_members(kind.msg_type, cols[:n], cols[:n], cols[:n],
                                            json_lines, c1, events.MEMBER_RAW)

        out.append((f"{kind.name} lines", n, build))
        out.append((f"{kind.name} encode (deflate 1)", n, encode))
    return out


def cpu_per_batch(step, batches: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        for _ in range(batches):
            step()
        best = min(best, (time.thread_time() - started) / batches)
    return best


def witness_rate(seconds: float, stop: threading.Event | None = None) -> float:
    """Turns per second of a Python loop, for ``seconds`` or until ``stop`` is set."""
    turns = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            turns += 1
        now = time.perf_counter()
        if now >= deadline or (stop is not None and stop.is_set()):
            return turns / (now - started)


def gil_per_batch(step, batches: int, repeat: int) -> float:
    """Seconds the step holds the GIL per batch, from what a witness thread loses.  The
    interpreter's switch interval is cut to 0.1 ms meanwhile, so that the hand-overs' waits
    (up to the interval each time the worker wants the GIL back) stay small next to what
    the worker really holds."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        return _gil_per_batch(step, batches, repeat)
    finally:
        sys.setswitchinterval(interval)


def _gil_per_batch(step, batches: int, repeat: int) -> float:
    results = []
    for _ in range(repeat):
        alone = witness_rate(0.3)
        stop = threading.Event()

        def work(stop=stop):
            for _ in range(batches):
                step()
            stop.set()

        worker = threading.Thread(target=work)
        started = time.perf_counter()
        worker.start()
        during = witness_rate(60.0, stop)
        worker.join()
        elapsed = time.perf_counter() - started
        held = max(0.0, 1.0 - during / alone) * elapsed
        results.append(held / batches)
    results.sort()
    return results[len(results) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40, help="batches per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per row")
    ap.add_argument("--log-lines", type=int, default=7700, help="messages per log batch")
    ap.add_argument("--per-kind", type=int, default=1100,
                    help="messages per metric or event batch")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, extension: {fmt._plan_members_c is not None}, "
          f"{args.batches} batches per measurement, cpu best / gil median of {args.repeat}")
    print(f"{'step':<32} {'msgs':>6} {'cpu us/msg':>11} {'gil us/msg':>11}")
    for name, messages, step in steps(args.log_lines, args.per_kind):
        step()
        cpu = cpu_per_batch(step, args.batches, args.repeat)
        gil = gil_per_batch(step, args.batches, args.repeat)
        print(f"{name:<32} {messages:>6} {cpu / messages * 1e6:>11.3f} "
              f"{gil / messages * 1e6:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
