"""Archived-data seek benchmark: ranged reads of a released job against whole downloads.

Builds one job of ``--lines`` log lines (about 100 bytes each, hex noise so that they compress like real output, 1 ms of timestamps apart,
batches of ``--batch`` lines: one gzip member per batch, one line in ten on stderr) with a
LocalStorage in a temporary data directory, starts moto's S3 server on a free loopback
port (tests/moto_sync.py: a child process, stopped at the end), uploads every segment with
the service's own shipper, and releases the job's local copy through TieredStorage, as
retention does.  Then, ``--runs`` times, alternating in the same run:

A. the three seek queries through TieredStorage (what QueryLogs runs): the first page
   (limit 100), a late offset (lines - 1,000, limit 100) and a one-second window in the
   middle (1,000 lines), both streams merged; each a fresh query (no cache kept between
   queries), timed, with the bytes it fetched from S3;
B. what a reader without tiering does for any of them: GET every object of the job whole
   and gunzip it (``aws s3 cp`` then ``zcat``), timed, with its bytes.

Medians go to stdout as one JSON object; traffic goes only to 127.0.0.1.

    .venv/bin/python bench/bench_archive_seek.py                  # 1,000,000 lines
    .venv/bin/python bench/bench_archive_seek.py --lines 5000000  # the issue's size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from joblet_persist.archive import layout  # noqa: E402
from joblet_persist.archive import s3 as s3mod  # noqa: E402
from joblet_persist.archive.shipper import S3Shipper  # noqa: E402
from joblet_persist.archive.tier import ArchiveSource  # noqa: E402
from joblet_persist.config import S3ArchiveConfig  # noqa: E402
from joblet_persist.storage.api import LogBatch  # noqa: E402
from joblet_persist.storage.compress import make_compressor  # noqa: E402
from joblet_persist.storage.local import LocalStorage  # noqa: E402
from joblet_persist.storage.tiered import TieredStorage  # noqa: E402
from tests.moto_sync import MotoServer  # noqa: E402

JOB = "bench-archived-job"
PREFIX = "bench/"
NODE = "n1"
T0 = 1_700_000_000_000_000_000


def run_now(f, *args, **kwargs):
    try:
        return defer.succeed(f(*args, **kwargs))
    except BaseException:
        return defer.fail()


def result(d):
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("a Deferred did not fire synchronously")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def build(storage, lines: int, batch: int) -> None:
    arrival = 0
    for start in range(0, lines, batch):
        rows = {1: [], 2: []}
        for i in range(start, min(lines, start + batch)):
            stream = 2 if i % 10 == 9 else 1
            noise = hashlib.blake2b(b"%d" % i, digest_size=32).hexdigest().encode()
            rows[stream].append((T0 + i * 1_000_000, i, arrival,
                                 b"%09d level=info msg=%s done\n" % (i, noise)))
            arrival += 1
        for stream, r in rows.items():
            if r:
                result(storage.append_logs(LogBatch(
                    JOB, stream, [x[0] for x in r], [x[1] for x in r], [x[2] for x in r],
                    [x[3] for x in r])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--segment-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    moto = MotoServer()
    moto.start()
    tmp = tempfile.mkdtemp(prefix="jp-bench-archive-")
    try:
        client = moto.client()
        bucket = "bench-" + uuid.uuid4().hex[:12]
        client.create_bucket(Bucket=bucket)
        clock = task.Clock()
        clock.advance(time.time())
        local = LocalStorage(tmp, run_now, compressor=make_compressor("zlib", 6),
                             segment_max_bytes=args.segment_mib << 20, fsync="batch",
                             clock=clock, index_interval=5.0)
        sources = []

        def make_source():
            sources.append(ArchiveSource(moto.client(timeout=60), bucket, PREFIX))
            return sources[-1]

        storage = TieredStorage(local, node_id=NODE, data_dir=tmp,
                                kinds=layout.archived_kinds(()), make_source=make_source,
                                clock=clock, target=(bucket, PREFIX, NODE), run_remote=run_now)
        result(storage.start())
        started = time.monotonic()
        build(storage, args.lines, args.batch)
        built = time.monotonic() - started
        cfg = S3ArchiveConfig(enabled=True, bucket=bucket, prefix=PREFIX)
        shipper = S3Shipper(cfg, NODE, tmp, storage, clock, run_now, s3=s3mod,
                            make_client=lambda c: moto.client(timeout=60),
                            wall=lambda: time.time() + 3600)
        started = time.monotonic()
        result(shipper.start())
        result(shipper.stop())
        uploaded = time.monotonic() - started
        storage.set_archive_check(shipper)
        result(storage.release_job(JOB))
        source = sources[0]
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{PREFIX}{NODE}/{JOB}/") for o in page.get("Contents", ())
            if not o["Key"].endswith(layout.SIDECAR_SUFFIX)]
        object_bytes = sum(client.head_object(Bucket=bucket, Key=k)["ContentLength"]
                           for k in keys)
        mid = args.lines // 2
        queries = {
            "first_page": dict(limit=100),
            "late_offset": dict(offset=args.lines - 1000, limit=100),
            "one_second": dict(start_time=T0 + mid * 1_000_000,
                               end_time=T0 + (mid + 1000) * 1_000_000 - 1),
        }
        times = {name: [] for name in queries}
        fetched = {name: [] for name in queries}
        whole_times, whole_bytes = [], []
        for _ in range(args.runs):
            for name, kw in queries.items():
                snap = storage.snapshot(JOB)
                mark = source.read_bytes
                t = time.perf_counter()
                n = sum(len(c[0]) for c in snap.iter_log_chunks(0, **kw))
                times[name].append(time.perf_counter() - t)
                fetched[name].append(source.read_bytes - mark)
                assert n in (100, 1000), (name, n)
            t = time.perf_counter()
            got = 0
            for key in keys:
                data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                got += len(data)
                rest = data
                while rest:  # every member, as zcat does
                    d = zlib.decompressobj(31)
                    d.decompress(rest)
                    rest = d.unused_data
            whole_times.append(time.perf_counter() - t)
            whole_bytes.append(got)
        whole = statistics.median(whole_times)
        out = {
            "lines": args.lines,
            "segments": len(keys),
            "object_bytes": object_bytes,
            "build_seconds": round(built, 1),
            "upload_seconds": round(uploaded, 1),
            "whole_download_and_gunzip_ms": round(whole * 1000, 1),
            "whole_bytes": statistics.median(whole_bytes),
            "runs": args.runs,
            "machine": f"{os.cpu_count()} cores, {platform.platform()}, shared",
        }
        for name in queries:
            t = statistics.median(times[name])
            out[name] = {"median_ms": round(t * 1000, 2),
                         "fetched_bytes": statistics.median(fetched[name]),
                         "speedup_vs_whole": round(whole / t, 1)}
        print(json.dumps(out, indent=1))
        result(storage.stop())
    finally:
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
