"""Appends to existing segment files from pool threads while another thread holds the GIL.

The service's pool threads append each sealed batch to its segment file (write, fsync) while
the reactor thread decodes frames in Python and C with the GIL.  This measures that step
alone, in-process: ``--threads`` threads append ``--bytes``-byte batches round-robin to
``--files`` existing files (fsync'd, as under the default ``storage.fsync: batch``) while a
busy thread runs Python code, through the two routes of ``storage/segment.py``:

- ``walk``: ``thd_append``, the component walk (open every directory with O_NOFOLLOW,
  create-or-open the file, check, write, fsync, close), each call releasing the GIL;
- ``direct``: ``thd_append_blobs``, which appends to an existing file in one stretch
  without the GIL (``_speedups.append_at``, or its Python reference without the extension).

Prints appends per second for each route (alternated, ``--repeat`` times, median) and how
far the busy thread got meanwhile (its Python loop iterations per second: what the appends
left of the GIL to the rest of the process).

    .venv/bin/python bench/bench_append.py --files 80 --appends 4000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from joblet_persist.storage import segment  # noqa: E402


def run(route: str, paths: list, sizes: list, appends: int, threads: int, blob: bytes,
        fsync: bool) -> tuple[float, float]:
    """(appends per second, busy-thread iterations per second) of one run."""
    lock = threading.Lock()
    # One append in flight per file, as in the service (one per buffer).
    file_locks = [threading.Lock() for _ in paths]
    next_index = [0]
    stop = threading.Event()
    spins = [0]

    def busy():
        n = 0
        while not stop.is_set():
            n += 1
        spins[0] = n

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= appends:
                    return
                next_index[0] = i + 1
            k = i % len(paths)
            with file_locks[k]:
                if route == "walk":
                    sizes[k] = segment.thd_append(paths[k], blob, sizes[k], fsync, depth=3)
                else:
                    sizes[k] = segment.thd_append_blobs(
                        paths[k], [blob], sizes[k], fsync, depth=3)

    spinner = threading.Thread(target=busy)
    spinner.start()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    stop.set()
    spinner.join()
    return appends / elapsed, spins[0] / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=80)
    ap.add_argument("--appends", type=int, default=4000, help="appends per run")
    ap.add_argument("--bytes", type=int, default=4096, help="bytes per append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    blob = os.urandom(args.bytes)
    with tempfile.TemporaryDirectory(prefix="jpappend", dir="/tmp") as work:
        paths = []
        for i in range(args.files):
            path = os.path.join(work, "logs", f"job-{i:03d}", "stdout.log.gz")
            segment.thd_append(path, b"x", 0, True, depth=3)
            paths.append(path)
        sizes = [1] * args.files
        results: dict = {"walk": [], "direct": []}
        for _ in range(args.repeat):
            for route in results:
                results[route].append(
                    run(route, paths, sizes, args.appends, args.threads, blob,
                        not args.no_fsync))
        for route, runs in results.items():
            rate = statistics.median(r[0] for r in runs)
            spin = statistics.median(r[1] for r in runs)
            print(f"{route:6s} appends/s {rate:10,.0f}  busy thread loops/s {spin:12,.0f}  "
                  f"runs {[round(r[0]) for r in runs]}")
        walk = statistics.median(r[0] for r in results["walk"])
        direct = statistics.median(r[0] for r in results["direct"])
        print(f"direct / walk appends/s: {direct / walk:.2f}")


if __name__ == "__main__":
    main()
