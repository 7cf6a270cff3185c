"""Micro-benchmark of the IPC receive path: frames/s of protocol.dataReceived, no network.

Runs on the calling thread with a task.Clock; nothing touches the network or the disk.

(a) Many small LOG frames (about 150 bytes each) delivered in 64 KiB reads, decode included,
    per-frame cost in microseconds:
      stock            Int32StringReceiver + a straightforward stringReceived (IPCMessage parse,
                       LogLine parse, checks, writer call)
      stock-framing    Int32StringReceiver's dataReceived + IngestProtocol's per-frame handling
                       (isolates the framing loop)
      fused-upb        the previous receive loop: one upb parse per LOG frame of a fused
                       envelope+LogLine message type, one add_log call per frame
      decode-c         framing.decode_log_frames (C extension) alone, over every read
      decode-py        framing.decode_log_frames_py (pure-Python twin) alone
      ingest-py        IngestProtocol (the service's receiver) with the pure-Python decoder and
                       a bulk writer that does nothing
      ingest           IngestProtocol with the C decoder and a bulk writer that does nothing
      ingest+writer-py IngestProtocol (pure-Python decoder) feeding a real BatchingWriter whose
                       storage completes every append at once
      ingest+writer    the same with the C decoder (the whole reactor-side cost per frame)
    Rows needing the C extension are skipped when it is not built.
(b) A stream of large LOG frames (default 8 MiB) delivered in 64 KiB reads, stock vs ingest, at
    several frame sizes: the stock receiver re-concatenates its whole buffer on every read, so
    its cost per MiB grows with the frame size; the ingest receiver's stays flat.

(c) bench_ingest.py's logs-only and mixed traffic through IngestProtocol and a real
    BatchingWriter, at several read sizes (64 KiB is Twisted's default, 256 KiB the service's
    ``ingest.READ_BYTES``): reactor cost per frame of each mode, and their ratio.

Usage: .venv/bin/python bench/bench_receive.py [--frames 1000000] [--repeat 3] [--big-mib 8]
       .venv/bin/python bench/bench_receive.py --only-traffic [--read-kib 64 128 256]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.protocols.basic import Int32StringReceiver  # noqa: E402
from zope.interface import implementer  # noqa: E402

from joblet_persist import framing, ingest  # noqa: E402
from joblet_persist._proto import ipc_pb2  # noqa: E402
from joblet_persist.ingest import IngestProtocol, RejectionLog  # noqa: E402
from joblet_persist.storage.api import is_valid_job_id  # noqa: E402
from joblet_persist.writer import BatchingWriter, IBulkLogWriter  # noqa: E402

READ_SIZE = 64 * 1024
JOB_IDS = [f"0b7c6a1e-3f7e-4d2a-9c1b-{i:012d}" for i in range(8)]


class NullWriter:
    """Accepts messages one at a time and does nothing with them."""

    def add_log(self, job_id, stream, timestamp, sequence, content):
        return None

    def add_metric(self, job_id, timestamp, sequence, payload):
        return None

    def add_event(self, job_id, kind, timestamp, sequence, payload):
        return None


@implementer(IBulkLogWriter)
class NullBulkWriter(NullWriter):
    """Also accepts groups (``add_logs``) and owns the arrival counters, as BatchingWriter."""

    def __init__(self):
        self.arrivals = {}

    def add_logs(self, job_id, stream, timestamps, sequences, arrivals, contents):
        return None


class InstantStorage:
    """append_* complete at once (an already-fired Deferred)."""

    def append_logs(self, batch):
        return defer.succeed(len(batch.contents))

    def append_metrics(self, batch):
        return defer.succeed(len(batch.payloads))

    def append_events(self, batch):
        return defer.succeed(len(batch.payloads))


class StockReceiver(Int32StringReceiver):
    """The straightforward implementation: stock framing, two plain parses per frame."""

    MAX_LENGTH = 128 * 1024 * 1024

    def __init__(self, writer):
        self.writer = writer
        self.valid = set()

    def stringReceived(self, frame):
        env = ipc_pb2.IPCMessage.FromString(frame)
        if env.type != 1:
            return
        job_id = env.job_uuid
        if job_id not in self.valid:
            if not is_valid_job_id(job_id):
                return
            self.valid.add(job_id)
        line = ipc_pb2.LogLine.FromString(env.data)
        if line.stream not in (1, 2):
            return
        self.writer.add_log(job_id, line.stream, line.timestamp, line.sequence, line.content)


class StockFramingIngest(IngestProtocol):
    """IngestProtocol's per-frame handling behind the stock framing loop."""

    dataReceived = Int32StringReceiver.dataReceived


def _fused_log_envelope():
    """The previous receive loop's message type: IPCMessage with field 6 as a LogLine."""
    src = descriptor_pb2.FileDescriptorProto()
    ipc_pb2.DESCRIPTOR.CopyToProto(src)
    package = "bench.fused"
    fused = descriptor_pb2.FileDescriptorProto(
        name="bench/fused.proto", package=package, syntax=src.syntax
    )
    fused.enum_type.extend(src.enum_type)
    for msg in src.message_type:
        if msg.name not in ("IPCMessage", "LogLine"):
            continue
        copy = fused.message_type.add()
        copy.CopyFrom(msg)
        for field in copy.field:
            if field.type_name:
                field.type_name = field.type_name.replace(f".{src.package}.", f".{package}.")
            if msg.name == "IPCMessage" and field.number == 6:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                field.type_name = f".{package}.LogLine"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fused)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.IPCMessage"))


class FusedUpbIngest(IngestProtocol):
    """The previous receive loop (complete frames only, as this benchmark sends them): one
    fused upb parse and one add_log call per LOG frame; everything else to the slow path."""

    _parse = staticmethod(_fused_log_envelope().FromString)

    def dataReceived(self, data):
        if self._head:
            data = self._head + data
            self._head = b""
        off, end = 0, len(data)
        unpack_from = ingest._HEADER.unpack_from
        parse = self._parse
        valid_ids = self._valid_ids
        add_log = self._add_log
        nlog = nlog_bytes = 0
        while end - off >= 4:
            (length,) = unpack_from(data, off)
            start = off + 4
            stop = start + length
            if stop > end:
                break
            frame = data[start:stop]
            off = stop
            try:
                env = parse(frame)
            except DecodeError:
                self._decode_slowly(frame)
                continue
            if env.type != 1:
                self._decode_slowly(frame)
                continue
            nlog += 1
            nlog_bytes += length
            job_id = env.job_uuid
            if job_id not in valid_ids and not self._admit(job_id):
                continue
            line = env.data
            stream = line.stream
            if stream != 1 and stream != 2:
                continue
            add_log(job_id, stream, line.timestamp, line.sequence, line.content)
        if nlog:
            self._frames_received({1: nlog}, nlog_bytes)
        self._head = data[off:]


def log_frame(i: int, content_len: int) -> bytes:
    job = JOB_IDS[i % len(JOB_IDS)]
    ts = 1_700_000_000_000_000_000 + i * 1_000_000
    line = ipc_pb2.LogLine(
        job_uuid=job,
        stream=1 + (i & 1),
        timestamp=ts,
        sequence=i,
        content=(b"%08d " % i) + b"x" * (content_len - 9),
    )
    env = ipc_pb2.IPCMessage(
        version=1, type=1, job_uuid=job, timestamp=ts, sequence=i, data=line.SerializeToString()
    )
    body = env.SerializeToString()
    return len(body).to_bytes(4, "big") + body


def chunked(stream: bytes, size: int = READ_SIZE) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


class DecodeOnly:
    """Calls a decode_log_frames implementation over each read, as IngestProtocol does
    (without handing anything over); the incomplete tail is carried to the next read."""

    def __init__(self, decode):
        self.decode = decode
        self.arrivals = {}
        self.tail = b""

    def dataReceived(self, data):
        if self.tail:
            data = self.tail + data
        off, _, _ = self.decode(data, 0, 1 << 30, self.arrivals)
        self.tail = data[off:]


def make_protocol(kind: str, clock):
    if kind == "stock":
        return StockReceiver(NullWriter()), None
    if kind == "decode-c":
        return DecodeOnly(framing._decode_log_frames_c), None
    if kind == "decode-py":
        return DecodeOnly(framing.decode_log_frames_py), None
    rejections = RejectionLog(clock)
    if kind == "stock-framing":
        return StockFramingIngest(NullWriter(), rejections), None
    if kind == "fused-upb":
        return FusedUpbIngest(NullWriter(), rejections), None
    writer = None
    if kind.startswith("ingest+writer"):
        writer = BatchingWriter(InstantStorage(), clock)
    decode = framing.decode_log_frames_py if kind.endswith("-py") else framing.decode_log_frames
    saved = ingest.decode_log_frames
    ingest.decode_log_frames = decode  # read by IngestProtocol.__init__
    try:
        return IngestProtocol(writer or NullBulkWriter(), rejections), writer
    finally:
        ingest.decode_log_frames = saved


KINDS = (
    "stock", "stock-framing", "fused-upb", "decode-c", "decode-py",
    "ingest-py", "ingest", "ingest+writer-py", "ingest+writer",
)
NEEDS_C = {"decode-c", "ingest", "ingest+writer"}


def run(kind: str, chunks: list[bytes]) -> float:
    clock = task.Clock()
    proto, writer = make_protocol(kind, clock)
    gc.collect()
    start = time.perf_counter()
    receive = proto.dataReceived
    for chunk in chunks:
        receive(chunk)
    if writer is not None:
        writer.flush_all()
    elapsed = time.perf_counter() - start
    if writer is not None and writer.messages_written != writer.messages_received:
        raise AssertionError("writer lost messages")
    return elapsed


def bench_small(frames: int, repeat: int, content_len: int) -> None:
    parts = [log_frame(i, content_len) for i in range(frames)]
    avg = sum(map(len, parts)) / frames
    chunks = chunked(b"".join(parts))
    del parts
    print(
        f"(a) {frames} LOG frames, {avg:.0f} bytes each on average (prefix included), "
        f"in {len(chunks)} reads of {READ_SIZE // 1024} KiB; best of {repeat}"
    )
    print(f"    {'receiver':<16} {'us/frame':>9} {'frames/s':>12}")
    for kind in KINDS:
        if kind in NEEDS_C and framing._decode_log_frames_c is None:
            print(f"    {kind:<16} (skipped: joblet_persist._speedups is not built)")
            continue
        best = min(run(kind, chunks) for _ in range(repeat))
        print(f"    {kind:<16} {best / frames * 1e6:9.3f} {frames / best:12,.0f}")


def bench_big(mib_sizes: list[int], total_mib: int) -> None:
    print(
        f"(b) large LOG frames in {READ_SIZE // 1024} KiB reads, {total_mib} MiB per run; "
        "time per frame and per MiB"
    )
    print(f"    {'frame':>7} {'receiver':<8} {'frames':>6} {'ms/frame':>9} {'ms/MiB':>8}")
    for mib in mib_sizes:
        count = max(1, total_mib // mib)
        frame = log_frame(0, mib * 1024 * 1024)
        chunks = chunked(frame * count)
        for kind in ("stock", "ingest"):
            elapsed = run(kind, chunks)
            print(
                f"    {mib:>4}MiB {kind:<8} {count:>6} {elapsed / count * 1e3:9.2f} "
                f"{elapsed / (count * mib) * 1e3:8.2f}"
            )


def bench_traffic(frames: int, repeat: int, read_sizes: list[int]) -> None:
    """(c) bench_ingest.py's two traffic modes (logs only; 70% logs, 10% metrics, 20% events
    with every job sending all three) through IngestProtocol and a real BatchingWriter
    (``ingest+writer``), at several read sizes: the reactor's cost per frame of each."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_ingest

    lines = bench_ingest.make_lines(frames, 1, 100)
    streams = {
        "logs": bench_ingest.encode_frames(lines, 10, 0, 1)[0],
        "mixed": bench_ingest.encode_mixed_frames(lines, 10, 0, 1),
    }
    del lines
    print(f"(c) bench_ingest traffic, {frames} frames over 10 jobs, ingest+writer; CPU time, "
          f"best of {repeat}, modes alternated")
    print(f"    {'read':>7} {'logs us/frame':>14} {'mixed us/frame':>15} {'logs/mixed':>11}")
    for size in read_sizes:
        best: dict = {}
        chunks = {mode: chunked(stream, size) for mode, stream in streams.items()}
        for _ in range(repeat):
            for mode in streams:
                # CPU time of this (single) thread: on a shared machine wall time mostly
                # measures the other processes.
                started = time.process_time()
                run("ingest+writer", chunks[mode])
                elapsed = time.process_time() - started
                best[mode] = min(best.get(mode, elapsed), elapsed)
        print(f"    {size // 1024:>4}KiB {best['logs'] / frames * 1e6:14.3f} "
              f"{best['mixed'] / frames * 1e6:15.3f} {best['logs'] / best['mixed']:11.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="small frames in (a)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per receiver in (a), best kept")
    ap.add_argument("--content", type=int, default=32, help="content bytes per small frame")
    ap.add_argument("--big-mib", type=int, default=8, help="largest frame size in (b), MiB")
    ap.add_argument("--big-total", type=int, default=64, help="MiB streamed per run in (b)")
    ap.add_argument("--traffic-frames", type=int, default=300_000,
                    help="frames per mode in (c); 0 skips (c)")
    ap.add_argument("--read-kib", type=int, nargs="+", default=[64, 256],
                    help="read sizes of (c), KiB")
    ap.add_argument("--only-traffic", action="store_true", help="run (c) only")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, protobuf backend: {_pb_backend()}, "
          f"frame decoder: {framing.IMPLEMENTATION}")
    if not args.only_traffic:
        bench_small(args.frames, args.repeat, args.content)
        sizes = [s for s in (1, 2, 4, 8, 16, 32) if s <= args.big_mib]
        bench_big(sizes, args.big_total)
    if args.traffic_frames and framing._decode_log_frames_c is not None:
        bench_traffic(args.traffic_frames, args.repeat,
                      [k * 1024 for k in args.read_kib])


def _pb_backend() -> str:
    from google.protobuf.internal import api_implementation

    return api_implementation.Type()


if __name__ == "__main__":
    main()
