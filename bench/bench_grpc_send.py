"""What one streamed message costs a gRPC server in CPU, synchronous server against asyncio.

FollowLogs sends each delivery to every follower as one message; the service's gRPC server
is grpcio's synchronous server (a handler thread per call), and this bench measures what
such a send costs, whatever the message carries, against grpc.aio's server:

- sync: ``grpc.server`` with a thread pool; each of ``--followers`` server-streaming calls
  is a handler thread waiting on a condition variable, as FollowLogs' followers do; the
  sender appends the same bytes to every follower's list and notifies it.
- aio: ``grpc.aio.server``; each call is a coroutine awaiting an asyncio.Queue and
  ``context.write``.
- one-thread: the synchronous server with grpcio's undocumented
  ``experimental_non_blocking`` handler attribute: the handler returns at once with a send
  callback, and the sender thread itself sends to every follower in turn (each send
  blocks until grpc completes it).  Also reports how long a round of sends takes.

Every ``1 / --rate`` seconds one message of ``--size`` bytes goes to every follower, for
``--seconds``; the server process's CPU time (``time.process_time``: every thread) divided by
the messages sent is the cost per message.  The followers' client is a separate process (one
asyncio loop, grpc.aio), as in bench_follow.py.  Runs go sync, one-thread, aio, then the other way
round, for ``--repeat`` rounds; medians and their ratios come from the same invocation.

    .venv/bin/python bench/bench_grpc_send.py                      # 100 followers, 10/s
    .venv/bin/python bench/bench_grpc_send.py --followers 1 --rate 1000

Traffic goes only to Unix sockets in a temporary directory on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

METHOD = "/bench.Send/Follow"


def _client(sock: str, n: int, ready) -> None:
    """``n`` calls of METHOD on one asyncio loop, reading until the server ends them."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            follow = channel.unary_stream(METHOD)

            async def one():
                try:
                    async for _ in follow(b""):
                        pass
                except grpc.aio.AioRpcError:
                    pass

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            ready.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())


def _start_client(sock: str, n: int):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_client, args=(sock, n, ready))
    p.start()
    ready.wait(60)
    return p


def _serve_sync(sock: str, handler, workers: int, registered, calls: list, n: int):
    """A started sync server of ``handler`` on ``sock`` and its ``n`` followers' client,
    once every call has registered in ``calls``."""
    server = grpc.server(futures.ThreadPoolExecutor(workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Send", {"Follow": grpc.unary_stream_rpc_method_handler(handler)}),))
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    client = _start_client(sock, n)
    with registered:
        registered.wait_for(lambda: len(calls) == n, 60)
    return server, client


def run_sync(sock: str, followers: int, rate: float, size: int, seconds: float) -> dict:
    calls: list = []
    registered = threading.Condition()
    done = threading.Event()

    def handler(_request, context):
        cond, box = threading.Condition(), []
        with registered:
            calls.append((cond, box))
            registered.notify_all()
        while not done.is_set() and context.is_active():
            with cond:
                if not box:
                    cond.wait(0.5)
                items, box[:] = list(box), []
            yield from items

    server, client = _serve_sync(sock, handler, followers + 4, registered, calls, followers)
    message = b"x" * size
    sent = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        for cond, box in calls:
            with cond:
                box.append(message)
                cond.notify_all()
        sent += followers
        time.sleep(1 / rate)
    time.sleep(0.2)  # the last sends complete
    cpu = time.process_time() - cpu0
    done.set()
    server.stop(0).wait(10)
    client.join(30)
    return {"messages": sent, "cpu_s": round(cpu, 3), "us_per_message": round(cpu / sent * 1e6, 1)}


def run_one_thread(sock: str, followers: int, rate: float, size: int, seconds: float) -> dict:
    senders: list = []
    registered = threading.Condition()

    def handler(_request, _context, send):
        with registered:
            senders.append(send)
            registered.notify_all()

    handler.experimental_non_blocking = True
    server, client = _serve_sync(sock, handler, 4, registered, senders, followers)
    message = b"x" * size
    sent = 0
    rounds: list = []
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        r0 = time.monotonic()
        for send in senders:
            send(message)
        rounds.append(time.monotonic() - r0)
        sent += followers
        time.sleep(1 / rate)
    cpu = time.process_time() - cpu0
    for send in senders:
        send(None)
    server.stop(1).wait(10)
    client.join(30)
    return {"messages": sent, "cpu_s": round(cpu, 3), "us_per_message": round(cpu / sent * 1e6, 1),
            "round_ms_p50": round(statistics.median(rounds) * 1e3, 1)}


def run_aio(sock: str, followers: int, rate: float, size: int, seconds: float) -> dict:
    async def main() -> dict:
        queues: list = []

        async def handler(_request, context):
            queue: asyncio.Queue = asyncio.Queue()
            queues.append(queue)
            while True:
                message = await queue.get()
                if message is None:
                    return
                await context.write(message)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Send", {"Follow": grpc.unary_stream_rpc_method_handler(handler)}),))
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, _start_client, sock, followers)
        while len(queues) < followers:
            await asyncio.sleep(0.01)
        message = b"x" * size
        sent = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            for queue in queues:
                queue.put_nowait(message)
            sent += followers
            await asyncio.sleep(1 / rate)
        await asyncio.sleep(0.2)
        cpu = time.process_time() - cpu0
        for queue in queues:
            queue.put_nowait(None)
        await server.stop(1)
        await loop.run_in_executor(None, client.join, 30)
        return {"messages": sent, "cpu_s": round(cpu, 3),
                "us_per_message": round(cpu / sent * 1e6, 1)}

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--followers", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="deliveries a second")
    ap.add_argument("--size", type=int, default=5000, help="bytes per message")
    ap.add_argument("--seconds", type=float, default=5.0, help="per run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of runs (one of each kind)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="jpg", dir="/tmp")
    kinds = {"sync": run_sync, "one-thread": run_one_thread, "aio": run_aio}
    runs: dict = {kind: [] for kind in kinds}
    try:
        for r in range(args.repeat):
            for kind in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
                sock = os.path.join(work, f"{kind}{r}.sock")
                one = kinds[kind](sock, args.followers, args.rate, args.size, args.seconds)
                runs[kind].append(one)
                print(json.dumps({"server": kind, **one}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {kind: statistics.median(r["us_per_message"] for r in runs[kind]) for kind in kinds}
    print(json.dumps({
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "nproc": os.cpu_count(), "grpcio": grpc.__version__, "followers": args.followers,
        "rate": args.rate, "size": args.size,
        "median_us_per_message": med,
        "vs_sync": {kind: round(v / med["sync"], 2) for kind, v in med.items()},
        "loadavg": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
