"""Stored-line benchmark: the pool's cost of turning metric and event payloads into JSON lines.

Builds ``--variants`` payloads per kind with bench_ingest's generators (resource samples and
the seven telemetry event kinds, like a current joblet-core's), repeats them into batches of
``--batch`` (the size of a batch the writer seals at a flush tick under load is thousands),
and times the batch builders the pool runs on every metric and event batch:
``storage.format.metric_json_lines`` and ``events.payload_json_lines`` (the C builders when
the extension is built).  Prints one JSON line per kind: nanoseconds per line (the best of
``--repeat`` timed batches, CPU time of this thread, so a busy machine slows it less) and the
bytes of a line.

    .venv/bin/python bench/bench_lines.py
    .venv/bin/python bench/bench_lines.py --batch 4096 --repeat 15

In-process only; nothing is written to disk or sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_ingest  # noqa: E402

from joblet_persist import events  # noqa: E402
from joblet_persist.storage import format as fmt  # noqa: E402

JOB = "bench-job-0001"
T0 = 1_764_000_000 * 10**9


def best_ns(build, n: int, repeat: int) -> float:
    """The least thread CPU time of ``repeat`` calls of ``build()``, per line, in ns."""
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time_ns()
        build()
        best = min(best, time.thread_time_ns() - start)
    return best / n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2048, help="payloads per timed batch")
    ap.add_argument("--variants", type=int, default=32, help="distinct payloads per kind")
    ap.add_argument("--repeat", type=int, default=9, help="timed batches per kind")
    args = ap.parse_args(argv)
    rng = random.Random(1)

    def batch_of(make) -> list:
        variants = [make(k) for k in range(args.variants)]
        return [variants[i % len(variants)] for i in range(args.batch)]

    metrics = batch_of(lambda k: bench_ingest._metric_payload(rng, JOB, T0, k))
    ns = best_ns(lambda: fmt.metric_json_lines(JOB, metrics), len(metrics), args.repeat)
    line = fmt.metric_json_lines(JOB, metrics)[0]
    print(json.dumps({"kind": "metric", "ns_per_line": round(ns), "line_bytes": len(line)}))
    stamps = [T0] * args.batch
    sequences = list(range(args.batch))
    for kind in sorted(events.KINDS_BY_TYPE.values(), key=lambda k: k.msg_type):
        payloads = batch_of(
            lambda k, t=kind.msg_type: bench_ingest._event_payload(rng, t, JOB, T0, k))
        ns = best_ns(
            lambda kind=kind, payloads=payloads: events.payload_json_lines(
                kind, payloads, JOB, stamps, sequences),
            len(payloads), args.repeat,
        )
        line = events.payload_json_lines(kind, payloads, JOB, stamps, sequences)[0]
        print(json.dumps({"kind": kind.name, "ns_per_line": round(ns), "line_bytes": len(line)}))


if __name__ == "__main__":
    main()
