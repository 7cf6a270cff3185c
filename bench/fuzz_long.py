"""Long fuzzing run: the properties of tests/test_fuzz.py with many more examples.

Each property (IPC frame streams one message at a time and into the batching writer, with
the C frame decoder and its pure-Python twin; every gRPC request field of the query RPCs and
the unary RPCs) runs under hypothesis with ``--examples`` examples and a random seed (printed,
so that a failure can be replayed with ``--seed``).  Reports, per property, the inputs tried,
the frames or requests they held, the time taken, and the first failure with hypothesis's
minimal example.

    .venv/bin/python bench/fuzz_long.py                    # HYPOTHESIS_PROFILE=long: 5000 each
    .venv/bin/python bench/fuzz_long.py --examples 50000 --only ingest
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HYPOTHESIS_PROFILE", "long")

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tests  # noqa: E402,F401  (loads the hypothesis profile, warnings as errors)
from joblet_persist import framing, ingest  # noqa: E402
from tests import test_fuzz as f  # noqa: E402


class _Count:
    def __init__(self):
        self.examples = 0
        self.items = 0


def _ingest_property(check, twin: bool):
    def prop(count: _Count):
        @given(f.ipc_streams())
        def run(stream):
            count.examples += 1
            count.items += len(stream[0])
            if twin:
                original = ingest.decode_log_frames
                ingest.decode_log_frames = framing.decode_log_frames_py
                try:
                    check(*stream)
                finally:
                    ingest.decode_log_frames = original
            else:
                check(*stream)

        return run

    return prop


def _logs_property(count: _Count):
    @given(f.rpc_job_ids, st.one_of(st.integers(0, 3), f.INT32), f.times, f.times, f.page,
           f.page, st.booleans())
    def run(job, stream, start, end, limit, offset, batched):
        count.examples += 1
        count.items += 1
        f.check_query_logs(job, stream, start, end, limit, offset, batched)

    return run


def _metrics_property(count: _Count):
    @given(f.rpc_job_ids, f.times, f.times, f.page, f.page, st.booleans())
    def run(job, start, end, limit, offset, batched):
        count.examples += 1
        count.items += 1
        f.check_query_metrics(job, start, end, limit, offset, batched)

    return run


def _unary_property(count: _Count):
    @given(f.rpc_job_ids, st.one_of(st.just(0), f.INT64), st.one_of(st.just(0), f.INT64),
           f.page, f.page)
    def run(job, since, until, limit, offset):
        count.examples += 1
        count.items += 7  # seven RPCs per example
        f.check_unary(job, since, until, limit, offset)

    return run


PROPERTIES = {
    "ingest-in-order": ("ingest", _ingest_property(f.check_ingest_in_order, False)),
    "ingest-into-writer": ("ingest", _ingest_property(f.check_ingest_into_writer, False)),
    "ingest-in-order-py-decoder": ("ingest", _ingest_property(f.check_ingest_in_order, True)),
    "ingest-into-writer-py-decoder": ("ingest",
                                      _ingest_property(f.check_ingest_into_writer, True)),
    "grpc-query-logs": ("grpc", _logs_property),
    "grpc-query-metrics": ("grpc", _metrics_property),
    "grpc-unary": ("grpc", _unary_property),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=None,
                   help="examples per property (default: the profile's, 5000 for 'long')")
    p.add_argument("--seed", type=int, default=None, help="replay a run with this seed")
    p.add_argument("--only", choices=("ingest", "grpc"), help="run one group only")
    p.add_argument("--json", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    examples = args.examples or settings.default.max_examples
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {run_seed}; {examples} examples per property; frame decoder: "
          f"{framing.IMPLEMENTATION}", flush=True)

    results = {}
    failed = False
    for name, (group, build) in PROPERTIES.items():
        if args.only and group != args.only:
            continue
        count = _Count()
        test = build(count)
        test = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))(test)
        test = seed(run_seed)(test)
        started = time.monotonic()
        error = None
        try:
            test()
        except Exception:
            error = traceback.format_exc(limit=6)
            failed = True
        seconds = time.monotonic() - started
        unit = "frames" if group == "ingest" else "requests"
        results[name] = {"examples": count.examples, unit: count.items,
                         "seconds": round(seconds, 1), "failure": error}
        status = "FAILED" if error else "ok"
        print(f"{name:32s} {count.examples:7d} examples {count.items:8d} {unit:8s} "
              f"{seconds:7.1f}s  {status}", flush=True)
        if error:
            print(error, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": run_seed, "examples_per_property": examples,
                       "decoder": framing.IMPLEMENTATION, "results": results}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
