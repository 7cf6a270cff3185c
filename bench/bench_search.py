"""Search and aggregation benchmark: SearchLogs against ``gzip -dc | grep -c``; AggregateMetrics.

Builds one job of ``--lines`` (default 5,000,000) log lines of about 100 bytes with
bench_query.build_job (the storage appender the service runs: libdeflate level 6, members
of up to 1 MiB raw, one line in ten on stderr, 100 lines per second), and one job of
``--samples`` (default 1,000,000) metric samples (one every second, every field set),
then starts ``twistd -n joblet-persist`` on that directory and, from this process, over
the gRPC Unix socket, measures:

1. whole-job search, count only (``grep -c``'s answer), for a rare literal, the same
   literal case-insensitive, and a regular expression: SearchLogs (``count_only``) and, in
   the same loop, alternating with it, ``gzip -dc FILES | grep -c PATTERN`` (``grep -ci``,
   ``grep -cE``) on the same files; medians of ``--runs`` runs, raw MB/s (the job's
   uncompressed bytes / time) and the ratio; the counts must agree;
2. the literal returning its matching lines (not count only);
3. the literal over time ranges covering 10 % and 50 % of the job (time proportional to
   the range: the members outside are skipped by their index);
4. AggregateMetrics over all ``--samples`` samples: every field with avg,min,max (the
   default) and every field with every function, auto step (100 points); samples/s; and,
   for reference, streaming the same samples with QueryMetricsBatched;
5. in this process, alternating on the same files, the aggregation's sample-by-sample read
   (the code before the columnar read) against the columnar one, over the first
   ``--ab-samples`` samples (``aggregate_ab``).

Results go to stdout as JSON lines (and to ``--json FILE``).

    .venv/bin/python bench/bench_search.py                   # about 2.5 minutes here
    .venv/bin/python bench/bench_search.py --lines 500000 --samples 100000   # a quick look

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from bench.bench_query import (  # noqa: E402
    JOB,
    SEC,
    T0,
    build_job,
    job_files,
    start_service,
    wait_healthy,
)
from joblet_persist._proto import persist_pb2 as pb  # noqa: E402
from joblet_persist._proto import persist_pb2_grpc  # noqa: E402
from joblet_persist.storage import format as fmt  # noqa: E402
from joblet_persist.storage import segment  # noqa: E402
from joblet_persist.storage.compress import make_compressor  # noqa: E402

METRICS_JOB = "bench-metrics-job"


_METRIC_LINE = (
    '{"job_uuid":"%s","timestamp":%d,"sequence":%d,"data":{"cpu_usage":%r,'
    '"memory_usage":%d,"gpu_usage":%r,"disk_io":{"read_bytes":%d,"write_bytes":%d,'
    '"read_ops":%d,"write_ops":%d},"network_io":{"rx_bytes":%d,"tx_bytes":%d,'
    '"rx_packets":%d,"tx_packets":%d}}}\n'
)


def build_metrics(data_dir: str, n: int, batch: int = 20_000) -> dict:
    """``n`` samples, one per second, every field set: the stored JSON lines (as
    storage.format.metric_json_line writes them) encoded and appended with the storage
    encoder and appender."""
    comp = make_compressor("deflate", 6)
    directory = os.path.join(data_dir, "metrics", METRICS_JOB)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, segment.segment_name("metrics", 0))
    size = 0
    started = time.perf_counter()
    for lo in range(0, n, batch):
        idx = range(lo, min(n, lo + batch))
        lines = [(_METRIC_LINE % (
            METRICS_JOB, T0 + i * SEC, i, (i * 7919 % 10000) / 100,
            100_000_000 + i * 4096 % 50_000_000, (i % 100) / 2, i * 4096, i * 8192, i, 2 * i,
            i * 1500, i * 700, i, i)).encode() for i in idx]
        pieces = fmt.encode_metric_members([T0 + i * SEC for i in idx], list(idx), list(idx),
                                           lines, comp)
        size = segment.thd_append(path, b"".join(blob for blob, _info in pieces), size, False)
    return {"samples": n, "build_s": round(time.perf_counter() - started, 1)}


def pick_literal(paths: list[str]) -> str:
    """A 20-character piece of one stored line that occurs in few lines."""
    out = subprocess.run(f"gzip -dc {paths[0]} | head -n 12345 | tail -n 1", shell=True,
                         capture_output=True, check=True).stdout.decode()
    words = out.split()
    return " ".join(words[3:6])[:20]


def grep_count(paths: list[str], flags: str, pattern: str) -> int:
    cmd = f"gzip -dc {' '.join(paths)} | grep -c{flags} -- '{pattern}'"
    out = subprocess.run(cmd, shell=True, capture_output=True, check=False).stdout
    return int(out.strip() or 0)


def search(stub, **kw) -> tuple[int, int]:
    """(matches, lines received) of one SearchLogs call."""
    matches = lines = 0
    for response in stub.SearchLogs(pb.SearchLogsRequest(job_uuid=JOB, **kw), timeout=600):
        lines += len(response.lines)
        if response.HasField("summary"):
            matches = response.summary.matches
    return matches, lines


def median_of(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["search", "aggregate"],
                        help="run one half (each stays under about 3 minutes here)")
    parser.add_argument("--functions", choices=["default", "all", "both"], default="both",
                        help="which AggregateMetrics calls to time")
    parser.add_argument("--ab-samples", type=int, default=200_000,
                        help="in-process A/B of the aggregation's old and new read over the "
                             "first this many samples (0: skip)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    do_search = args.only in (None, "search")
    do_aggregate = args.only in (None, "aggregate")
    if not do_search:
        args.lines = 1_000
    if not do_aggregate:
        args.samples = 0

    results = []

    def report(**kw):
        print(json.dumps(kw), flush=True)
        results.append(kw)

    work = tempfile.mkdtemp(prefix="jpsearchbench", dir="/tmp")
    # A SIGTERM (timeout) still stops the service and removes the data (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data_dir = os.path.join(work, "data")
    proc = None
    try:
        built = build_job(data_dir, args.lines, 20_000, 100, "deflate", 6, 1 << 30)
        if args.samples:
            built.update(build_metrics(data_dir, args.samples))
        paths = job_files(data_dir)
        raw = built["raw_bytes"]
        report(step="build", lines=args.lines, files=len(paths), **built,
               cpus=os.cpu_count(), load=os.getloadavg()[0], python=platform.python_version())
        literal = pick_literal(paths)
        proc = start_service(work, data_dir)
        with grpc.insecure_channel(f"unix:{work}/grpc.sock",
                                   [("grpc.max_receive_message_length", -1)]) as ch:
            stub = persist_pb2_grpc.PersistServiceStub(ch)
            wait_healthy(stub, proc, work)
            if do_search:
                search_figures(stub, args, paths, literal, raw, report)
            if do_aggregate:
                aggregate_figures(stub, args, report)
        if do_aggregate and args.ab_samples:
            aggregate_ab(data_dir, args, report)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def search_figures(stub, args, paths, literal, raw, report) -> None:
    search(stub, pattern="warm up", count_only=True)
    cases = [
        ("literal", dict(pattern=literal), "", literal),
        ("literal -i", dict(pattern=literal.upper(), ignore_case=True), "i",
         literal.upper()),
        ("regex", dict(pattern=r"ERROR \[w1[0-5]\] \w+=9\d\d\d\b", regex=True), "E",
         r"ERROR \[w1[0-5]\] [a-z_]+=9[0-9][0-9][0-9]\b"),
    ]
    for name, kw, flags, grep_pattern in cases:
        ours, grep = [], []
        counts = set()
        for _ in range(args.runs):  # alternate A/B in the same loop
            t = time.perf_counter()
            counts.add(("search", search(stub, count_only=True, **kw)[0]))
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            counts.add(("grep", grep_count(paths, flags, grep_pattern)))
            grep.append(time.perf_counter() - t)
        a, b = statistics.median(ours), statistics.median(grep)
        report(step="search_count", case=name, pattern=kw["pattern"], counts=sorted(counts),
               search_s=round(a, 3), grep_s=round(b, 3),
               search_mb_s=round(raw / a / 1e6, 1), grep_mb_s=round(raw / b / 1e6, 1),
               ratio=round(b / a, 2), load=round(os.getloadavg()[0], 1))

    t, (matches, lines) = median_of(lambda: search(stub, pattern=literal), args.runs)
    report(step="search_lines", pattern=literal, matches=matches, lines=lines,
           seconds=round(t, 3), mb_s=round(raw / t / 1e6, 1))

    span = args.lines // 100 * SEC  # 100 lines per second
    full, _ = median_of(lambda: search(stub, pattern=literal, count_only=True),
                        args.runs)
    for share in (0.1, 0.5):
        start = T0 + int(span * 0.25)
        end = start + int(span * share)
        t, _ = median_of(lambda s=start, e=end: search(
            stub, pattern=literal, count_only=True, start_time=s, end_time=e), args.runs)
        report(step="search_range", share=share, seconds=round(t, 3),
               whole_job_s=round(full, 3), time_share=round(t / full, 3))


def aggregate_figures(stub, args, report) -> None:
    def agg(functions):
        r = stub.AggregateMetrics(pb.AggregateMetricsRequest(
            job_uuid=METRICS_JOB, functions=functions), timeout=600)
        return r.samples, len(r.points)

    def stream_all():  # the client-side alternative, over the first 100,000
        n = 0
        for batch in stub.QueryMetricsBatched(
                pb.QueryMetricsRequest(job_uuid=METRICS_JOB, limit=100_000),
                timeout=600):
            n += len(batch.metrics)
        return n

    calls = [("default (avg,min,max)", []),
             ("all functions", ["avg", "min", "max", "sum", "last", "count", "p50", "p95",
                                "p99", "rate"])]
    if args.functions != "both":
        calls = calls[args.functions == "all":][:1]
    for name, functions in calls:
        t, (samples, points) = median_of(lambda f=functions: agg(f), args.runs)
        report(step="aggregate", functions=name, fields=11, samples=samples,
               points=points, seconds=round(t, 3), samples_per_s=round(samples / t))
    t, n = median_of(stream_all, args.runs)
    report(step="stream_metrics", samples=n, seconds=round(t, 3),
           samples_per_s=round(n / t))


def aggregate_ab(data_dir: str, args, report) -> None:
    """In this process, on the same files, alternating: the sample-by-sample path that
    AggregateMetrics took before (reader.iter_metrics, a dict per sample, Aggregator.add)
    against the columnar one (metric_columns.iter_metric_columns, Aggregator.add_columns),
    both on this thread; avg,min,max of every field, auto step.  The results must agree."""
    from joblet_persist import aggregate
    from joblet_persist.storage import metric_columns, reader

    d = os.path.join(data_dir, "metrics", METRICS_JOB)
    views = tuple(
        reader.SegmentView(p, segment.thd_scan_segment(p, False).members)
        for p in sorted(os.path.join(d, name) for name in os.listdir(d))
    )
    n = args.ab_samples
    end = T0 + (n - 1) * SEC
    step = aggregate.auto_step(end - T0, 100)
    fields, functions = aggregate.FIELDS, aggregate.DEFAULT_FUNCTIONS

    def records():
        agg = aggregate.Aggregator(step, fields, functions)
        for rec in reader.iter_metrics(views, T0, end):
            agg.add(rec.timestamp, rec.data)
        return agg

    def columns():
        agg = aggregate.Aggregator(step, fields, functions)
        for times, cols in metric_columns.iter_metric_columns(views, fields, T0, end):
            agg.add_columns(times, cols)
        return agg

    def answer(agg):
        return repr([(k, c, [[fs.result(f) for f in functions] for fs in st])
                     for k, c, st in agg.points()])

    old, new, answers = [], [], set()
    for _ in range(args.runs):
        for fn, times in ((records, old), (columns, new)):
            t = time.perf_counter()
            answers.add(answer(fn()))
            times.append(time.perf_counter() - t)
    a, b = statistics.median(old), statistics.median(new)
    report(step="aggregate_in_process", samples=n, functions="default (avg,min,max)",
           record_path_s=round(a, 3), column_path_s=round(b, 3), ratio=round(a / b, 2),
           same_answer=len(answers) == 1, load=round(os.getloadavg()[0], 1))


if __name__ == "__main__":
    sys.exit(main())
