"""``joblet-persist-ctl``: the operator's command line client of the query API.

A plain blocking gRPC client (no reactor).  ``main(argv, stdout=, stderr=)``
returns the exit status, so tests can run it in-process and capture output:

- 0 ok, 1 error (including an invalid argument the service refused),
- 2 usage (bad options, unreadable certificate files),
- 3 not found, 4 permission denied or unauthenticated,
- 5 the service is unreachable, shutting down or timed out.

``ping`` exits 0 only when the service reports itself healthy.  ``logs``
writes the raw output bytes to stdout, so it can be piped; a closed pipe
(``logs JOB | head``) ends it quietly with status 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime
import json
import os
import sys
import time
from typing import Optional

import grpc

from joblet_persist import aggregate, events, rules
from joblet_persist._proto import persist_pb2, persist_pb2_grpc

DEFAULT_SOCKET = "/opt/joblet/run/persist-grpc.sock"
SOCKET_ENV = "JOBLET_PERSIST_SOCKET"
DEFAULT_TIMEOUT = 10.0
#: Largest message accepted from the service: gRPC's own limit.  A LogLine may be as large
#: as the service's ipc.maxFrameBytes (128 MiB by default, up to 2 GiB).
MAX_RECEIVE_MESSAGE_BYTES = 2**31 - 1

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_DENIED = 4
EXIT_UNAVAILABLE = 5

_STREAMS = {"both": 0, "stdout": 1, "stderr": 2}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class UsageError(Exception):
    """A problem with the command line (exit status 2)."""


# -- parsing ----------------------------------------------------------------------------


def parse_duration(text: str) -> Optional[float]:
    """Seconds of a duration like ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m``; else None
    (rules.duration_with_units: the configuration's units, written with units only)."""
    return rules.duration_with_units(text)


def parse_time(text: str, now_ns: Optional[int] = None) -> int:
    """Unix nanoseconds of a ``--since``/``--until`` value.

    Accepts a duration before now (``2h``, ``30m``, ``1d``), ``now``, an ISO
    8601 time (``2024-05-01T12:00:00Z``; without an offset it is local time),
    or an integer, taken as Unix nanoseconds.
    """
    value = text.strip()
    if now_ns is None:
        now_ns = time.time_ns()
    if value.isdigit():
        return int(value)
    if value == "now":
        return now_ns
    seconds = parse_duration(value)
    if seconds is not None:
        return max(0, now_ns - round(seconds * 1e9))
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: expected a duration before now (2h, 30m, 1d), "
            "an ISO 8601 time or Unix nanoseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return ((moment - _EPOCH) // datetime.timedelta(microseconds=1)) * 1000


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds_arg(text: str) -> float:
    """A duration option: seconds (``10``, ``2.5``) or with units (``30s``, ``2m``)."""
    try:
        return rules.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: {e}") from None


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0..2147483647)")
    return value


def _step_arg(text: str) -> int:
    """--step: ``auto`` (0) or a duration (``10s``, ``1m``, seconds) in ns."""
    if text == "auto":
        return 0
    try:
        seconds = rules.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: {e}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: must be > 0 (or auto)")
    return round(seconds * 1e9)


def _list_arg(choices, what: str):
    def parse(text: str) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r}: expected one of {', '.join(choices)}"
                )
        return names

    return parse


def _connection_options(parser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--socket",
        metavar="PATH",
        default=default,
        help=(
            f"Unix socket of the service (default: ${SOCKET_ENV} or {DEFAULT_SOCKET}, the "
            "admin socket); the viewer socket (server.grpcViewerSocket) allows everything "
            "but delete"
        ),
    )
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=default,
        help=(
            "connect over TCP instead: TLS with --ca, --cert and --key (the certificate's OU "
            "gives the role); without them plaintext, which only a service with "
            "server.allowPlaintextTcp accepts"
        ),
    )
    group.add_argument("--ca", metavar="FILE", default=default, help="CA certificate (TLS)")
    group.add_argument("--cert", metavar="FILE", default=default, help="client certificate")
    group.add_argument("--key", metavar="FILE", default=default, help="client private key")
    group.add_argument(
        "--server-name",
        metavar="NAME",
        default=default,
        help="expected name in the server certificate (default: the address's host)",
    )
    group.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_seconds_arg,
        default=default,
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT:g}s; none for logs/metrics)",
    )


def _range_options(parser) -> None:
    parser.add_argument(
        "--since",
        type=_time_arg,
        default=0,
        metavar="TIME",
        help="from this time: 2h, 30m, 1d (before now), ISO 8601, or Unix ns",
    )
    parser.add_argument(
        "--until", type=_time_arg, default=0, metavar="TIME", help="up to this time (inclusive)"
    )
    parser.add_argument("--limit", type=_count_arg, default=0, help="at most N (0 = all)")
    parser.add_argument("--offset", type=_count_arg, default=0, help="skip the first N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joblet-persist-ctl",
        description="Query and manage the data stored by joblet-persist.",
        epilog="Exit status: 0 ok, 1 error, 2 usage, 3 not found, "
        "4 permission denied, 5 service unavailable.",
    )
    _connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help):
        p = sub.add_parser(name, help=help, description=help)
        _connection_options(p, suppress=True)
        return p

    p = command("logs", "write a job's output (raw bytes) to stdout")
    p.add_argument("job")
    p.add_argument("--stream", choices=sorted(_STREAMS), default="both")
    _range_options(p)

    p = command("metrics", "print a job's metric samples, or aggregates of them in steps")
    p.add_argument("job")
    _range_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument(
        "--step",
        type=_step_arg,
        default=None,
        metavar="DURATION",
        help="aggregate in buckets of this width (10s, 1m, ...) or 'auto' (about --points "
        "buckets); with --agg alone: auto",
    )
    p.add_argument(
        "--agg",
        type=_list_arg(aggregate.FUNCTIONS, "function"),
        default=None,
        metavar="F,...",
        help="aggregate functions: " + ",".join(aggregate.FUNCTIONS) + " (default avg,min,max)",
    )
    p.add_argument(
        "--fields",
        type=_list_arg(aggregate.FIELDS, "field"),
        default=None,
        metavar="F,...",
        help="fields to aggregate (default all): " + ",".join(aggregate.FIELDS),
    )
    p.add_argument(
        "--points", type=_count_arg, default=0, metavar="N",
        help="target number of buckets for --step auto (default 100)",
    )

    p = command("grep", "print the stored messages that match a pattern (one job or all)")
    p.add_argument("pattern")
    p.add_argument("job", nargs="?", help="the job to search (or --all-jobs)")
    p.add_argument("--all-jobs", action="store_true",
                   help="search every job (newest created first); each line is prefixed "
                   "with its job id unless --no-job-id")
    p.add_argument("--jobs-since", type=_time_arg, default=0, metavar="TIME",
                   help="with --all-jobs: jobs created at or after this time")
    p.add_argument("--jobs-until", type=_time_arg, default=0, metavar="TIME",
                   help="with --all-jobs: jobs created at or before this time")
    p.add_argument("-i", "--ignore-case", action="store_true", help="ignore case")
    p.add_argument("-E", "--regex", action="store_true",
                   help="PATTERN is an RE2 regular expression (default: a plain substring)")
    p.add_argument("--stream", choices=sorted(_STREAMS), default="both")
    _range_options(p)
    p.add_argument("-c", "--count", action="store_true", help="print only the number of matches")
    p.add_argument("--no-job-id", action="store_true",
                   help="with --all-jobs: do not prefix lines with the job id")
    p.add_argument("--max-scan", type=_count_arg, default=0, metavar="BYTES",
                   help="scan at most this many raw bytes (the service's bound applies too)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per match: job_uuid, stream, timestamp, timestamp_ns, "
                   "sequence, content")

    p = command("events", "print a job's telemetry events (all kinds, or one)")
    p.add_argument("job")
    p.add_argument(
        "--kind",
        choices=[k.name for k in events.KINDS],
        help="only this kind (default: every kind, one after another)",
    )
    _range_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="the stored JSON lines (with a leading \"kind\" key when --kind is not given)",
    )

    p = command("jobs", "list stored jobs, newest first")
    _range_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command("info", "show one job's summary")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    p = command("stats", "show service totals")
    p.add_argument("--json", action="store_true")

    p = command("delete", "delete all data of a job")
    p.add_argument("job")

    command("ping", "check that the service is up and healthy")
    return parser


# -- connection ---------------------------------------------------------------------------


def _read(path: Optional[str], what: str) -> Optional[bytes]:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _connect(args) -> tuple[grpc.Channel, str]:
    options = [("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)]
    if args.address:
        target = args.address
        if args.ca or args.cert or args.key:
            if bool(args.cert) != bool(args.key):
                raise UsageError("--cert and --key must be given together")
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(args.ca, "CA certificate"),
                private_key=_read(args.key, "client key"),
                certificate_chain=_read(args.cert, "client certificate"),
            )
            if args.server_name:
                options.append(("grpc.ssl_target_name_override", args.server_name))
            return grpc.secure_channel(target, creds, options), target
        return grpc.insecure_channel(target, options), target
    path = args.socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    target = f"unix:{path}"
    return grpc.insecure_channel(target, options), target


# -- output helpers --------------------------------------------------------------------


def _iso(ns: int) -> str:
    if ns <= 0:
        return "-"
    moment = _EPOCH + datetime.timedelta(microseconds=ns // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def json_time(ns: int, key: str = "timestamp") -> dict:
    """A time in JSON output: ``{key: RFC 3339 UTC with nanoseconds, key_ns: integer ns}``.

    The one place that formats times of the JSON records of grep and metrics --agg,
    e.g. ``{"timestamp": "2026-12-06T02:10:00.123456789Z", "timestamp_ns": 1796...}``.
    """
    seconds, nanos = divmod(ns, 10**9)
    moment = _EPOCH + datetime.timedelta(seconds=seconds)
    return {key: moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z", key + "_ns": ns}


def _iso_seconds(seconds: int) -> str:
    return _iso(seconds * 10**9)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _metric_dict(m: persist_pb2.Metric) -> dict:
    d = m.data
    return {
        "job_uuid": m.job_uuid,
        "timestamp": m.timestamp,
        "sequence": m.sequence,
        "data": {
            "cpu_usage": d.cpu_usage,
            "memory_usage": d.memory_usage,
            "gpu_usage": d.gpu_usage,
            "disk_io": {
                "read_bytes": d.disk_io.read_bytes,
                "write_bytes": d.disk_io.write_bytes,
                "read_ops": d.disk_io.read_ops,
                "write_ops": d.disk_io.write_ops,
            },
            "network_io": {
                "rx_bytes": d.network_io.rx_bytes,
                "tx_bytes": d.network_io.tx_bytes,
                "rx_packets": d.network_io.rx_packets,
                "tx_packets": d.network_io.tx_packets,
            },
        },
    }


_CSV_HEADER = [
    "timestamp",
    "sequence",
    "cpu_usage",
    "memory_usage",
    "gpu_usage",
    "disk_read_bytes",
    "disk_write_bytes",
    "disk_read_ops",
    "disk_write_ops",
    "net_rx_bytes",
    "net_tx_bytes",
    "net_rx_packets",
    "net_tx_packets",
]
_TABLE = "{:<20}  {:>8}  {:>7}  {:>10}  {:>6}  {:>10}  {:>10}  {:>10}  {:>10}"


def _job_dict(info) -> dict:
    return {
        "job_uuid": info.job_uuid,
        "created_at": info.created_at,
        "last_updated": info.last_updated,
        "log_count": info.log_count,
        "metric_count": info.metric_count,
        "size_bytes": info.size_bytes,
        "event_count": info.event_count,
        "event_counts": dict(sorted(info.event_counts.items())),
    }


# -- commands ------------------------------------------------------------------------------


def _stream_timeout(args) -> Optional[float]:
    return args.timeout


def _unary_timeout(args) -> float:
    return args.timeout if args.timeout else DEFAULT_TIMEOUT


def cmd_logs(stub, args, out) -> int:
    request = persist_pb2.QueryLogsRequest(
        job_uuid=args.job,
        stream=_STREAMS[args.stream],
        start_time=args.since,
        end_time=args.until,
        limit=args.limit,
        offset=args.offset,
    )
    binary = getattr(out, "buffer", out)
    out.flush()
    call = stub.QueryLogsBatched(request, timeout=_stream_timeout(args))
    wrote = False
    try:
        try:
            for batch in call:
                binary.write(b"".join(line.content for line in batch.lines))
                binary.flush()
                wrote = True
        except grpc.RpcError as e:
            # A service without the batched extension: fall back to QueryLogs.
            if wrote or e.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            call = stub.QueryLogs(request, timeout=_stream_timeout(args))
            for line in call:
                binary.write(line.content)
            binary.flush()
    except BrokenPipeError:
        call.cancel()
        raise
    return EXIT_OK


_STREAM_NAMES = {1: "stdout", 2: "stderr"}


def _content_json(content: bytes):
    """Message content in JSON: the text when it is UTF-8, else ``{"b64": ...}``."""
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(content).decode("ascii")}


def _prefixed(job: str, content: bytes) -> bytes:
    """``content`` with ``JOB:`` before each of its lines, as grep names files."""
    prefix = job.encode() + b":"
    return b"".join(prefix + line for line in content.splitlines(keepends=True))


def cmd_grep(stub, args, out) -> int:
    if bool(args.job) == bool(args.all_jobs):
        raise UsageError("grep needs a JOB or --all-jobs (not both)")
    if (args.jobs_since or args.jobs_until) and not args.all_jobs:
        raise UsageError("--jobs-since/--jobs-until apply only with --all-jobs")
    request = persist_pb2.SearchLogsRequest(
        job_uuid=args.job or "",
        all_jobs=args.all_jobs,
        jobs_since=args.jobs_since // 10**9,
        jobs_until=args.jobs_until // 10**9,
        pattern=args.pattern,
        regex=args.regex,
        ignore_case=args.ignore_case,
        stream=_STREAMS[args.stream],
        start_time=args.since,
        end_time=args.until,
        limit=args.limit,
        offset=args.offset,
        count_only=args.count,
        max_scan_bytes=args.max_scan,
    )
    binary = getattr(out, "buffer", out)
    out.flush()
    prefix = args.all_jobs and not args.no_job_id
    call = stub.SearchLogs(request, timeout=_stream_timeout(args))
    found = 0
    try:
        for response in call:
            found += len(response.lines)
            if args.json:
                for line in response.lines:
                    record = {
                        "job_uuid": line.job_uuid,
                        "stream": _STREAM_NAMES.get(line.stream, str(line.stream)),
                        **json_time(line.timestamp),
                        "sequence": line.sequence,
                        "content": _content_json(line.content),
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            elif response.lines:
                if prefix:
                    data = b"".join(_prefixed(x.job_uuid, x.content) for x in response.lines)
                else:
                    data = b"".join(x.content for x in response.lines)
                binary.write(data)
                binary.flush()
            if response.HasField("summary") and args.count:
                found = response.summary.matches
                out.write(f"{found}\n")
                out.flush()
    except BrokenPipeError:
        call.cancel()
        raise
    # grep's convention: 0 when something matched, 1 when nothing did.
    return EXIT_OK if found else EXIT_ERROR


_AGG_TABLE_TIME = "{:<30}  {:<20}  {:>7}"


def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.6g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _point_values(response, point) -> dict:
    """field -> {function: value} of one AggregatePoint (rate None when it has none)."""
    values = {}
    for v in point.values:
        row = {}
        for function in response.functions:
            if function == "rate":
                row["rate"] = v.rate if v.has_rate else None
            elif function == "count":
                row["count"] = v.count
            else:
                row[function] = getattr(v, function)
        values[v.field] = row
    return values


def cmd_aggregate(stub, args, out) -> int:
    if args.limit or args.offset:
        raise UsageError("--limit/--offset do not apply with --step/--agg")
    request = persist_pb2.AggregateMetricsRequest(
        job_uuid=args.job,
        start_time=args.since,
        end_time=args.until,
        step_ns=args.step or 0,
        max_points=args.points,
        fields=args.fields or [],
        functions=args.agg or [],
    )
    response = stub.AggregateMetrics(request, timeout=_unary_timeout(args))
    functions = list(response.functions)
    writer = None
    if args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["timestamp_ns", "timestamp", "count"]
                        + [f"{f}.{fn}" for f in response.fields for fn in functions])
    elif not args.json:
        out.write((_AGG_TABLE_TIME.format("TIME", "FIELD", "SAMPLES") + "".join(
            f"  {fn.upper():>12}" for fn in functions)).rstrip() + "\n")
    for point in response.points:
        values = _point_values(response, point)
        if args.json:
            record = {**json_time(point.timestamp), "step_ns": response.step_ns,
                      "count": point.count, "values": values}
            out.write(json.dumps(record) + "\n")
        elif writer is not None:
            row = [point.timestamp, json_time(point.timestamp)["timestamp"], point.count]
            for field in response.fields:
                row += ["" if values[field][fn] is None else values[field][fn]
                        for fn in functions]
            writer.writerow(row)
        else:
            when = json_time(point.timestamp)["timestamp"]
            for field in response.fields:
                out.write((_AGG_TABLE_TIME.format(when, field, point.count) + "".join(
                    f"  {_format_value(values[field][fn]):>12}" for fn in functions)).rstrip()
                    + "\n")
    out.flush()
    return EXIT_OK


def cmd_metrics(stub, args, out) -> int:
    if args.step is not None or args.agg is not None or args.fields is not None:
        return cmd_aggregate(stub, args, out)
    request = persist_pb2.QueryMetricsRequest(
        job_uuid=args.job,
        start_time=args.since,
        end_time=args.until,
        limit=args.limit,
        offset=args.offset,
    )
    call = stub.QueryMetricsBatched(request, timeout=_stream_timeout(args))
    writer = None
    if args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_HEADER)
    elif not args.json:
        out.write(
            _TABLE.format(
                "TIME",
                "SEQ",
                "CPU%",
                "MEMORY",
                "GPU%",
                "DISK_READ",
                "DISK_WRITE",
                "NET_RX",
                "NET_TX",
            ).rstrip()
            + "\n"
        )
    try:
        for batch in call:
            for m in batch.metrics:
                d = m.data
                if args.json:
                    out.write(json.dumps(_metric_dict(m), separators=(",", ":")) + "\n")
                elif writer is not None:
                    writer.writerow(
                        [
                            m.timestamp,
                            m.sequence,
                            repr(d.cpu_usage),
                            d.memory_usage,
                            repr(d.gpu_usage),
                            d.disk_io.read_bytes,
                            d.disk_io.write_bytes,
                            d.disk_io.read_ops,
                            d.disk_io.write_ops,
                            d.network_io.rx_bytes,
                            d.network_io.tx_bytes,
                            d.network_io.rx_packets,
                            d.network_io.tx_packets,
                        ]
                    )
                else:
                    out.write(
                        _TABLE.format(
                            _iso(m.timestamp),
                            m.sequence,
                            f"{d.cpu_usage:.1f}",
                            _human(d.memory_usage),
                            f"{d.gpu_usage:.1f}",
                            _human(d.disk_io.read_bytes),
                            _human(d.disk_io.write_bytes),
                            _human(d.network_io.rx_bytes),
                            _human(d.network_io.tx_bytes),
                        )
                        + "\n"
                    )
            out.flush()
    except BrokenPipeError:
        call.cancel()
        raise
    return EXIT_OK


def stored_event_dict(kind: events.EventKind, msg) -> dict:
    """The stored JSON object (docs/storage-format.md) of a Query*Events message.

    Keys in stored order under their IPC names (socket data's ``dst_addr``/``dst_port``
    back to ``addr``/``port``); a string whose original bytes are in ``non_utf8`` is
    ``{"b64": ...}`` as on disk.
    """
    non_utf8 = msg.non_utf8
    out = {"job_uuid": msg.job_uuid, "timestamp": msg.timestamp, "sequence": msg.sequence}

    def text(value, name):
        raw = non_utf8.get(name)
        if raw is None:
            return value
        return {"b64": base64.b64encode(raw).decode("ascii")}

    for field in kind.fields:
        value = getattr(msg, field.query_name)
        if field.type == events.STR:
            value = text(value, field.query_name)
        elif field.type == events.STRS:
            value = [text(v, f"{field.query_name}.{i}") for i, v in enumerate(value)]
        out[field.key] = value
    return out


_EVENT_TABLE = "{:<32} {:>10} {:<11} {:>8} {:<16} {}"


def _event_detail(kind: events.EventKind, stored: dict) -> str:
    parts = []
    for field in kind.fields:
        if field.key in ("pid", "comm"):
            continue
        value = stored[field.key]
        if isinstance(value, dict):
            value = "b64:" + value["b64"]
        elif isinstance(value, list):
            value = json.dumps(value, ensure_ascii=False)
        elif field.key in ("addr", "length") and field.type == events.U64:
            value = hex(value) if field.key == "addr" else value
        parts.append(f"{field.key}={value}")
    return " ".join(parts)


def cmd_events(stub, args, out) -> int:
    kinds = [events.KINDS_BY_NAME[args.kind]] if args.kind else list(events.KINDS)
    if not args.json:
        out.write(_EVENT_TABLE.format("TIME", "SEQ", "KIND", "PID", "COMM", "DETAIL").rstrip()
                  + "\n")
    for kind in kinds:
        request = persist_pb2.QueryEventsBatchedRequest(
            job_uuid=args.job,
            kind=kind.msg_type,
            start_time=args.since,
            end_time=args.until,
            limit=args.limit,
            offset=args.offset,
        )
        call = stub.QueryEventsBatched(request, timeout=_stream_timeout(args))
        try:
            for batch in call:
                for msg in getattr(batch, kind.batch_field):
                    stored = stored_event_dict(kind, msg)
                    if args.json:
                        if not args.kind:
                            stored = {"kind": kind.name, **stored}
                        line = json.dumps(stored, separators=(",", ":"), ensure_ascii=False)
                        out.write(line + "\n")
                    else:
                        comm = stored.get("comm", "")
                        if isinstance(comm, dict):
                            comm = "b64:" + comm["b64"]
                        out.write(
                            _EVENT_TABLE.format(
                                _iso(msg.timestamp), msg.sequence, kind.name, msg.pid, comm,
                                _event_detail(kind, stored),
                            ).rstrip()
                            + "\n"
                        )
                out.flush()
        except BrokenPipeError:
            call.cancel()
            raise
    return EXIT_OK


def cmd_jobs(stub, args, out, err) -> int:
    request = persist_pb2.ListJobsRequest(
        since=args.since // 10**9,
        until=args.until // 10**9,
        limit=args.limit,
        offset=args.offset,
    )
    response = stub.ListJobs(request, timeout=_unary_timeout(args))
    if args.json:
        for job in response.jobs:
            out.write(json.dumps(_job_dict(job)) + "\n")
    else:
        row = "{:<40}  {:<20}  {:<20}  {:>10}  {:>10}  {:>10}"
        out.write(row.format("JOB", "CREATED", "UPDATED", "LOGS", "METRICS", "SIZE") + "\n")
        for job in response.jobs:
            out.write(
                row.format(
                    job.job_uuid,
                    _iso_seconds(job.created_at),
                    _iso_seconds(job.last_updated),
                    job.log_count,
                    job.metric_count,
                    _human(job.size_bytes),
                )
                + "\n"
            )
    if len(response.jobs) < response.total_count:
        err.write(f"showing {len(response.jobs)} of {response.total_count} jobs\n")
    return EXIT_OK


def cmd_info(stub, args, out) -> int:
    info = stub.GetJobInfo(
        persist_pb2.GetJobInfoRequest(job_uuid=args.job), timeout=_unary_timeout(args)
    )
    if args.json:
        out.write(json.dumps(_job_dict(info)) + "\n")
        return EXIT_OK
    rows = [
        ("job", info.job_uuid),
        ("created", f"{_iso_seconds(info.created_at)} ({info.created_at})"),
        ("last updated", f"{_iso_seconds(info.last_updated)} ({info.last_updated})"),
        ("log messages", info.log_count),
        ("metric samples", info.metric_count),
        ("events", info.event_count),
        ("size", f"{info.size_bytes} bytes ({_human(info.size_bytes)})"),
    ]
    for name, count in sorted(info.event_counts.items()):
        rows.insert(-1, (f"  {name}", count))
    for name, value in rows:
        out.write(f"{name + ':':<16}{value}\n")
    return EXIT_OK


def cmd_stats(stub, args, out) -> int:
    s = stub.GetStats(persist_pb2.GetStatsRequest(), timeout=_unary_timeout(args))
    fields = [
        "total_jobs",
        "total_logs",
        "total_metrics",
        "total_size_bytes",
        "messages_received",
        "messages_written",
        "write_errors",
    ]
    if args.json:
        out.write(json.dumps({f: getattr(s, f) for f in fields}) + "\n")
        return EXIT_OK
    for f in fields:
        out.write(f"{f + ':':<19}{getattr(s, f)}\n")
    return EXIT_OK


def cmd_delete(stub, args, out) -> int:
    response = stub.DeleteJob(
        persist_pb2.DeleteJobRequest(job_uuid=args.job), timeout=_unary_timeout(args)
    )
    out.write((response.message or ("deleted" if response.success else "not deleted")) + "\n")
    return EXIT_OK if response.success else EXIT_ERROR


def cmd_ping(stub, args, out) -> int:
    response = stub.Ping(persist_pb2.PingRequest(), timeout=_unary_timeout(args))
    state = "healthy" if response.healthy else "unhealthy"
    out.write(f"{state} (server time {_iso(response.timestamp)})\n")
    return EXIT_OK if response.healthy else EXIT_ERROR


# -- main -----------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join((text or "").split())


def _rpc_failure(e: grpc.RpcError, target: str, err) -> int:
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = _one_line(e.details() if callable(getattr(e, "details", None)) else str(e))
    if code is grpc.StatusCode.NOT_FOUND:
        message, status = f"not found: {details}", EXIT_NOT_FOUND
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        message, status = f"permission denied: {details}", EXIT_DENIED
    elif code is grpc.StatusCode.UNAVAILABLE:
        message, status = f"joblet-persist unavailable at {target}: {details}", EXIT_UNAVAILABLE
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message, status = f"joblet-persist at {target} did not answer in time", EXIT_UNAVAILABLE
    elif code is grpc.StatusCode.INVALID_ARGUMENT:
        message, status = f"invalid argument: {details}", EXIT_ERROR
    else:
        name = code.name if code is not None else "error"
        message, status = f"{name}: {details}", EXIT_ERROR
    err.write(f"joblet-persist-ctl: {message}\n")
    return status


def _silence_closed_stdout(stdout) -> None:
    """After EPIPE, point fd 1 at /dev/null so the interpreter's final flush stays quiet."""
    if stdout is sys.stdout:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def main(argv=None, stdout=None, stderr=None) -> int:
    """Run the command line; returns the exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    target = "?"
    try:
        channel, target = _connect(args)
        with channel:
            stub = persist_pb2_grpc.PersistServiceStub(channel)
            if args.command == "logs":
                return cmd_logs(stub, args, stdout)
            if args.command == "metrics":
                return cmd_metrics(stub, args, stdout)
            if args.command == "grep":
                return cmd_grep(stub, args, stdout)
            if args.command == "events":
                return cmd_events(stub, args, stdout)
            if args.command == "jobs":
                return cmd_jobs(stub, args, stdout, stderr)
            if args.command == "info":
                return cmd_info(stub, args, stdout)
            if args.command == "stats":
                return cmd_stats(stub, args, stdout)
            if args.command == "delete":
                return cmd_delete(stub, args, stdout)
            return cmd_ping(stub, args, stdout)
    except UsageError as e:
        stderr.write(f"joblet-persist-ctl: {e}\n")
        return EXIT_USAGE
    except grpc.RpcError as e:
        return _rpc_failure(e, target, stderr)
    except BrokenPipeError:
        _silence_closed_stdout(stdout)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
