"""Deterministic generators of job output, one per kind of content.

Each generator yields the contents of log frames (``bytes``, one frame each) until at least
``nbytes`` bytes were produced; the same ``(kind, seed, nbytes)`` always gives the same
frames.  Any size can be asked for (the benchmarks use 100 MB per kind).  Used by
``bench/bench_compress.py`` to measure stored size against ``gzip -6`` per kind.

Kinds (``KINDS``):

``words``      highly repetitive lines: words drawn from a vocabulary of 25 plus a counter,
               as many application logs are
``json``       structured JSON log records (timestamp, level, logger, message, fields)
``numeric``    numeric-heavy lines: timestamps, ids, floats (metrics dumps, CSV rows)
``traceback``  Python tracebacks and compiler output (gcc/clang diagnostics, make lines)
``progress``   progress bars redrawn with ``\\r`` (download/training progress)
``binary``     binary-ish output: base64 blobs in 76-column lines and raw random bytes
"""

from __future__ import annotations

import base64
import json
import random
from typing import Callable, Iterator

__all__ = ["KINDS", "generate", "take"]

_T0 = 1_764_000_000.0

_VOCAB = (
    "request handled user session cache miss worker started connection closed retry "
    "timeout backend upstream status ok error job queue task done sent received file write"
).split()
assert len(_VOCAB) == 25


def _iso(t: float) -> str:
    whole = int(t)
    s = whole % 86400
    return f"2025-11-24T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}.{int((t - whole) * 1e6):06d}Z"


def _words(rng: random.Random) -> Iterator[bytes]:
    vocab = _VOCAB
    choice = rng.choice
    randrange = rng.randrange
    i = 0
    while True:
        n = 5 + randrange(10)
        yield (" ".join([choice(vocab) for _ in range(n)]) + f" {i}\n").encode()
        i += 1


_LOGGERS = ("api.http", "api.auth", "db.pool", "worker.runner", "cache.redis", "scheduler")
_MESSAGES = (
    "request completed", "request started", "cache lookup", "query executed",
    "token refreshed", "task scheduled", "task finished", "connection acquired",
    "retrying after error", "slow query detected",
)
_PATHS = ("/api/v1/jobs", "/api/v1/jobs/{id}", "/api/v1/nodes", "/healthz", "/api/v1/logs")


def _json(rng: random.Random) -> Iterator[bytes]:
    t = _T0
    i = 0
    while True:
        t += rng.expovariate(2000.0)
        rec = {
            "ts": _iso(t),
            "level": rng.choice(("info", "info", "info", "debug", "warn", "error")),
            "logger": rng.choice(_LOGGERS),
            "msg": rng.choice(_MESSAGES),
            "request_id": f"{rng.getrandbits(64):016x}",
            "seq": i,
        }
        r = rng.random()
        if r < 0.5:
            rec["method"] = rng.choice(("GET", "GET", "POST", "PUT", "DELETE"))
            rec["path"] = rng.choice(_PATHS).replace("{id}", str(rng.randrange(100000)))
            rec["status"] = rng.choice((200, 200, 200, 201, 204, 404, 500))
            rec["duration_ms"] = round(rng.lognormvariate(2.0, 1.0), 3)
        elif r < 0.8:
            rec["rows"] = rng.randrange(10000)
            rec["table"] = rng.choice(("jobs", "nodes", "events", "users"))
        else:
            rec["attempt"] = rng.randrange(1, 6)
            rec["error"] = rng.choice(("timeout", "connection reset", "EOF", "deadline exceeded"))
        yield (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        i += 1


def _numeric(rng: random.Random) -> Iterator[bytes]:
    t = _T0
    i = 0
    ids = [rng.getrandbits(48) for _ in range(64)]
    while True:
        t += rng.expovariate(500.0)
        if rng.random() < 0.5:
            # A CSV-like metrics row.
            line = (
                f"{t:.6f},{i},{rng.choice(ids)},{rng.gauss(50.0, 15.0):.4f},{rng.random():.4f},"
                f"{rng.uniform(0, 1e6):.2f},{rng.randrange(1 << 31)}\n"
            )
        else:
            line = (
                f"{_iso(t)} id={rng.choice(ids):012x} step={i} loss={2.5 * rng.random() + 0.1:.6f} "
                f"lr={1e-4 * rng.random():.3e} grad_norm={rng.expovariate(1.0):.5f} "
                f"tok/s={rng.uniform(1e4, 5e4):.1f}\n"
            )
        yield line.encode()
        i += 1


_MODULES = ("app/handlers.py", "app/models.py", "lib/db/session.py", "lib/http/client.py",
            "/usr/lib/python3.11/json/decoder.py", "/usr/lib/python3.11/asyncio/tasks.py")
_FUNCS = ("handle", "process_batch", "execute", "decode", "_send_request", "run_until_complete",
          "load", "__call__", "wrapper", "fetch_rows")
_CODE = ("result = self.session.execute(query, params)", "return json.loads(body)",
         "raise ValueError(f\"bad record {record_id}\")", "obj, end = self.raw_decode(s, idx)",
         "data = await response.read()", "for row in cursor.fetchall():",
         "return self._callable(*args, **kwargs)")
_ERRORS = ("ValueError: bad record {n}", "KeyError: 'user_{n}'",
           "json.decoder.JSONDecodeError: Expecting value: line 1 column {n} (char {m})",
           "TimeoutError: operation timed out after {n} ms",
           "ConnectionResetError: [Errno 104] Connection reset by peer")
_CFILES = ("src/core/buffer.c", "src/net/socket.cc", "include/util/list.h", "src/main.cpp",
           "src/io/reader.c")
_DIAGS = ("warning: unused variable 'tmp{n}' [-Wunused-variable]",
          "warning: comparison of integer expressions of different signedness: 'int' and "
          "'size_t' [-Wsign-compare]",
          "error: 'struct buffer' has no member named 'len{n}'",
          "note: in expansion of macro 'CHECK'",
          "warning: implicit conversion loses integer precision: 'long' to 'int' "
          "[-Wshorten-64-to-32]")


def _traceback(rng: random.Random) -> Iterator[bytes]:
    n = 0
    while True:
        n += 1
        if rng.random() < 0.5:
            yield b"Traceback (most recent call last):\n"
            for _ in range(2 + rng.randrange(7)):
                yield (f'  File "{rng.choice(_MODULES)}", line {rng.randrange(1, 900)}, '
                       f"in {rng.choice(_FUNCS)}\n").encode()
                yield (f"    {rng.choice(_CODE)}\n").encode()
            yield (rng.choice(_ERRORS).format(n=rng.randrange(10000), m=rng.randrange(99999))
                   + "\n").encode()
        else:
            for _ in range(1 + rng.randrange(6)):
                f = rng.choice(_CFILES)
                if rng.random() < 0.3:
                    yield (f"[{rng.randrange(101):3d}%] Building C object "
                           f"CMakeFiles/app.dir/{f}.o\n").encode()
                yield (f"{f}:{rng.randrange(1, 3000)}:{rng.randrange(1, 80)}: "
                       f"{rng.choice(_DIAGS).format(n=rng.randrange(100))}\n").encode()
                yield f"  {rng.randrange(1, 3000):4d} |     {rng.choice(_CODE)}\n".encode()
                yield f"       |     {' ' * rng.randrange(30)}^~~~\n".encode()


def _progress(rng: random.Random) -> Iterator[bytes]:
    names = ("model-00001-of-00004.safetensors", "dataset.tar.zst", "layer_weights.bin",
             "checkpoint-12000.pt", "images.zip")
    width = 40
    while True:
        name = rng.choice(names)
        total = rng.randrange(10_000_000, 5_000_000_000)
        steps = 50 + rng.randrange(400)
        speed = rng.uniform(5.0, 120.0)
        for s in range(steps + 1):
            frac = s / steps
            done = int(total * frac)
            filled = int(width * frac)
            eta = int((total - done) / (speed * 1e6))
            bar = "\u2588" * filled + " " * (width - filled)
            rate = speed * rng.uniform(0.9, 1.1)
            yield (f"\r{name}: {int(frac * 100):3d}%|{bar}| {done / 1e9:.2f}/{total / 1e9:.2f}GB "
                   f"[{rate:.1f}MB/s eta {eta // 60:02d}:{eta % 60:02d}]").encode()
        yield b"\n"


def _binary(rng: random.Random) -> Iterator[bytes]:
    while True:
        if rng.random() < 0.5:
            # A base64 blob (PEM-like or an embedded attachment), 76 columns per line.
            blob = base64.encodebytes(rng.randbytes(57 * (4 + rng.randrange(40))))
            yield b"-----BEGIN BLOB-----\n"
            for k in range(0, len(blob), 77):
                yield blob[k : k + 77]
            yield b"-----END BLOB-----\n"
        else:
            # Raw bytes written to stdout by a program dumping binary data.
            for _ in range(1 + rng.randrange(16)):
                yield rng.randbytes(32 + rng.randrange(224))


_GENERATORS: dict[str, Callable[[random.Random], Iterator[bytes]]] = {
    "words": _words,
    "json": _json,
    "numeric": _numeric,
    "traceback": _traceback,
    "progress": _progress,
    "binary": _binary,
}

#: The kinds of content, in the order the benchmark reports them.
KINDS: tuple[str, ...] = tuple(_GENERATORS)


def generate(kind: str, seed: int = 1) -> Iterator[bytes]:
    """An endless, deterministic iterator of the frame contents of ``kind``."""
    try:
        make = _GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}") from None
    return make(random.Random(f"{kind}:{seed}"))


def take(kind: str, nbytes: int, seed: int = 1) -> list[bytes]:
    """The first frames of ``generate(kind, seed)`` holding at least ``nbytes`` bytes."""
    out = []
    total = 0
    for item in generate(kind, seed):
        out.append(item)
        total += len(item)
        if total >= nbytes:
            break
    return out
