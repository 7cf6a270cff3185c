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

Times in and out go through ``timefmt``: JSON carries each time as an RFC 3339
string plus integer nanoseconds (``created_at`` / ``created_at_ns``).  A failing
call prints nothing on stdout: streamed commands fetch their first batch before
writing a table header.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import itertools
import json
import os
import sys
from typing import Optional

import grpc

from joblet_persist import __version__, aggregate, events, locate, rules, timefmt
from joblet_persist._proto import persist_pb2, persist_pb2_grpc

DEFAULT_SOCKET = "/opt/joblet/run/persist-grpc.sock"
SOCKET_ENV = locate.SOCKET_ENV
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


class UsageError(Exception):
    """A problem with the command line (exit status 2)."""


# -- parsing ----------------------------------------------------------------------------


def parse_duration(text: str) -> Optional[float]:
    """Seconds of a duration like ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m``; else None
    (rules.duration_with_units: the configuration's units, written with units only)."""
    return rules.duration_with_units(text)


def parse_time(text: str, now_ns: Optional[int] = None) -> int:
    """Unix nanoseconds of a ``--since``/``--until`` value (timefmt.parse_time)."""
    return timefmt.parse_time(text, now_ns)


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
            f"Unix socket of the service (default: ${SOCKET_ENV}, else found from --config "
            "or --data-dir, else the first socket of ./data/run/persist-grpc.sock, "
            f"{locate.SYSTEM_CONFIG}'s server.grpcSocket, {DEFAULT_SOCKET}); the viewer "
            "socket (server.grpcViewerSocket) allows everything but delete"
        ),
    )
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help=f"the service's configuration: dial its server.grpcSocket (or ${locate.CONFIG_ENV})",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help=(
            "the service's --data-dir: dial DIR/run/persist-grpc.sock "
            f"(or ${locate.DATA_DIR_ENV})"
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
        help="from this time: 2h, 30m, 1d (before now), RFC 3339, or a Unix time with "
        "its unit (1700000000s, ...ms, ...ns)",
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
    parser.add_argument(
        "--version", action="version", version=f"joblet-persist-ctl {__version__}"
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
    p.add_argument(
        "-f", "--follow", action="store_true",
        help="keep writing new output as it arrives, until interrupted",
    )
    p.add_argument(
        "--tail", type=_count_arg, default=None, metavar="N",
        help="only the last N lines (with -f: then new ones; 0: only new ones)",
    )
    p.add_argument(
        "--idle-timeout", type=_seconds_arg, default=0.0, metavar="DURATION",
        help="with -f: stop after this long without new output (default: never)",
    )
    lfmt = p.add_mutually_exclusive_group()
    lfmt.add_argument(
        "-t", "--timestamps", action="store_true",
        help="start each message with its time (RFC 3339, UTC, nanoseconds)",
    )
    lfmt.add_argument(
        "--json", action="store_true",
        help="one JSON object per message: stream, timestamp, timestamp_ns, sequence, content",
    )

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
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        action="store_true",
        help="the stored JSON lines (with a leading \"kind\" key when --kind is not given), "
        "the time as timestamp (RFC 3339) and timestamp_ns",
    )
    fmt.add_argument("--csv", action="store_true", help="the table as CSV with a header row")

    p = command("jobs", "list stored jobs, newest first")
    _range_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")

    p = command("info", "show one job's summary")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    p = command("stats", "show service totals")
    p.add_argument("--json", action="store_true")

    p = command("delete", "delete all data of a job (asks first on a terminal)")
    p.add_argument("job")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be deleted; delete nothing")

    p = command("cleanup", "apply the retention rules now (CleanupOldData)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what retention would delete; delete nothing")
    p.add_argument("--json", action="store_true", help="the result as one JSON object")

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
    try:
        found = locate.locate(socket=args.socket, config=args.config, data_dir=args.data_dir)
    except locate.LocateError as e:
        raise UsageError(str(e)) from None
    target = f"unix:{found.path}"
    return grpc.insecure_channel(target, options), f"{target} (from {found.source})"


# -- output helpers --------------------------------------------------------------------


def _iso(ns: int) -> str:
    return timefmt.rfc3339_seconds(ns)


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
        **timefmt.time_fields("timestamp", m.timestamp),
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
    "timestamp_ns",
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
    # The service keeps these two in whole seconds.
    return {
        "job_uuid": info.job_uuid,
        **timefmt.time_fields("created_at", info.created_at * 10**9),
        **timefmt.time_fields("last_updated", info.last_updated * 10**9),
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


def _first_then_rest(call):
    """The stream's items, its first one already received: an error (unknown job, denied)
    surfaces here, before the caller writes a header."""
    items = iter(call)
    try:
        first = next(items)
    except StopIteration:
        return iter(())
    return itertools.chain([first], items)


_STREAM_NAMES = {1: "stdout", 2: "stderr"}


def _log_writer(args, binary):
    """``write(lines)`` for the logs output format chosen by ``args``.

    Raw (default): the content bytes as stored, nothing added.  ``--timestamps``:
    each message prefixed by its time and a space, ending in a newline (added
    only when the content does not end in one).  ``--json``: one object per
    message and line; content that is not UTF-8 is given as ``content_b64``
    (standard base64) instead of ``content``.
    """
    if args.json:
        def write(lines):
            parts = []
            for m in lines:
                record = {
                    "stream": _STREAM_NAMES.get(m.stream, str(m.stream)),
                    **timefmt.time_fields("timestamp", m.timestamp),
                    "sequence": m.sequence,
                }
                try:
                    record["content"] = m.content.decode("utf-8")
                except UnicodeDecodeError:
                    record["content_b64"] = base64.b64encode(m.content).decode("ascii")
                parts.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            binary.write(b"".join(parts))
    elif args.timestamps:
        def write(lines):
            parts = []
            for m in lines:
                parts.append(timefmt.rfc3339_fixed(m.timestamp).encode("ascii") + b" " + m.content)
                if not m.content.endswith(b"\n"):
                    parts.append(b"\n")
            binary.write(b"".join(parts))
    else:
        def write(lines):
            binary.write(b"".join(m.content for m in lines))
    return write


def _tail_or_follow(stub, args, write, binary) -> int:
    """``logs`` with ``--tail`` and/or ``-f``: TailLogs or FollowLogs."""
    if args.limit or args.offset:
        raise UsageError("logs: --limit and --offset do not combine with --tail or -f")
    if args.follow:
        if args.until:
            raise UsageError("logs: --until does not combine with -f")
        if args.tail is None:
            start_from, tail = persist_pb2.FOLLOW_FROM_START, 0
        else:
            start_from, tail = persist_pb2.FOLLOW_FROM_TAIL, args.tail
        request = persist_pb2.FollowLogsRequest(
            job_uuid=args.job,
            stream=_STREAMS[args.stream],
            start_time=args.since,
            start_from=start_from,
            tail_lines=tail,
            idle_timeout_ms=int(args.idle_timeout * 1000),
        )
        call = stub.FollowLogs(request, timeout=_stream_timeout(args))
        rpc = "FollowLogs (-f)"
    else:
        request = persist_pb2.TailLogsRequest(
            job_uuid=args.job,
            stream=_STREAMS[args.stream],
            start_time=args.since,
            end_time=args.until,
            lines=args.tail,
        )
        call = stub.TailLogs(request, timeout=_stream_timeout(args))
        rpc = "TailLogs (--tail)"
    try:
        for batch in call:
            write(batch.lines)
            binary.flush()
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise UnsupportedByService(
                f"this joblet-persist does not support {rpc}; upgrade it, or leave the "
                "option out"
            ) from None
        raise
    except (BrokenPipeError, KeyboardInterrupt):
        call.cancel()
        raise
    return EXIT_OK


class UnsupportedByService(Exception):
    """The service lacks an extension RPC the command needs (exit status 1)."""


def cmd_logs(stub, args, out) -> int:
    if args.idle_timeout and not args.follow:
        raise UsageError("logs: --idle-timeout needs -f")
    binary = getattr(out, "buffer", out)
    out.flush()
    write = _log_writer(args, binary)
    if args.follow or args.tail is not None:
        return _tail_or_follow(stub, args, write, binary)
    request = persist_pb2.QueryLogsRequest(
        job_uuid=args.job,
        stream=_STREAMS[args.stream],
        start_time=args.since,
        end_time=args.until,
        limit=args.limit,
        offset=args.offset,
    )
    call = stub.QueryLogsBatched(request, timeout=_stream_timeout(args))
    wrote = False
    try:
        try:
            for batch in call:
                write(batch.lines)
                binary.flush()
                wrote = True
        except grpc.RpcError as e:
            # A service without the batched extension: fall back to QueryLogs.
            if wrote or e.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            call = stub.QueryLogs(request, timeout=_stream_timeout(args))
            for line in call:
                write((line,))
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
                        **timefmt.time_fields("timestamp", line.timestamp),
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
            record = {**timefmt.time_fields("timestamp", point.timestamp), "step_ns": response.step_ns,
                      "count": point.count, "values": values}
            out.write(json.dumps(record) + "\n")
        elif writer is not None:
            row = [point.timestamp, timefmt.rfc3339(point.timestamp), point.count]
            for field in response.fields:
                row += ["" if values[field][fn] is None else values[field][fn]
                        for fn in functions]
            writer.writerow(row)
        else:
            when = timefmt.rfc3339_fixed(point.timestamp)
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
    batches = _first_then_rest(call)
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
        for batch in batches:
            for m in batch.metrics:
                d = m.data
                if args.json:
                    out.write(json.dumps(_metric_dict(m), separators=(",", ":")) + "\n")
                elif writer is not None:
                    writer.writerow(
                        [
                            timefmt.rfc3339(m.timestamp),
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


def _event_json(kind: events.EventKind, msg, with_kind: bool) -> dict:
    """The stored JSON object with its time as the CLI's pair (timestamp, timestamp_ns)."""
    stored = stored_event_dict(kind, msg)
    out = {"kind": kind.name} if with_kind else {}
    for key, value in stored.items():
        if key == "timestamp":
            out.update(timefmt.time_fields("timestamp", value))
        else:
            out[key] = value
    return out


_EVENT_CSV_HEADER = ["timestamp", "timestamp_ns", "sequence", "kind", "pid", "comm", "detail"]


def cmd_events(stub, args, out) -> int:
    kinds = [events.KINDS_BY_NAME[args.kind]] if args.kind else list(events.KINDS)
    writer = csv.writer(out, lineterminator="\n") if args.csv else None
    header_written = args.json
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
            batches = _first_then_rest(call)
            if not header_written:
                # After the first kind's first answer: an unknown job prints no header.
                if writer is not None:
                    writer.writerow(_EVENT_CSV_HEADER)
                else:
                    out.write(_EVENT_TABLE.format("TIME", "SEQ", "KIND", "PID", "COMM",
                                                  "DETAIL").rstrip() + "\n")
                header_written = True
            for batch in batches:
                for msg in getattr(batch, kind.batch_field):
                    if args.json:
                        line = json.dumps(_event_json(kind, msg, not args.kind),
                                          separators=(",", ":"), ensure_ascii=False)
                        out.write(line + "\n")
                        continue
                    stored = stored_event_dict(kind, msg)
                    comm = stored.get("comm", "")
                    if isinstance(comm, dict):
                        comm = "b64:" + comm["b64"]
                    detail = _event_detail(kind, stored)
                    if writer is not None:
                        writer.writerow([timefmt.rfc3339(msg.timestamp), msg.timestamp,
                                         msg.sequence, kind.name, msg.pid, comm, detail])
                    else:
                        out.write(
                            _EVENT_TABLE.format(
                                _iso(msg.timestamp), msg.sequence, kind.name, msg.pid, comm,
                                detail,
                            ).rstrip()
                            + "\n"
                        )
                out.flush()
        except BrokenPipeError:
            call.cancel()
            raise
    return EXIT_OK


_JOB_CSV_HEADER = [
    "job_uuid", "created_at", "created_at_ns", "last_updated", "last_updated_ns",
    "log_count", "metric_count", "event_count", "size_bytes",
]


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
    elif args.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_JOB_CSV_HEADER)
        for job in response.jobs:
            d = _job_dict(job)
            writer.writerow([d[k] for k in _JOB_CSV_HEADER])
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


def _describe_job(info) -> str:
    return (f"job {info.job_uuid}: {info.log_count} log messages, {info.metric_count} metric "
            f"samples, {info.event_count} events, {_human(info.size_bytes)}, last updated "
            f"{_iso_seconds(info.last_updated)}")


def cmd_delete(stub, args, out, err, stdin) -> int:
    # Ask only when someone can see the question and answer it: stdin and stderr both a
    # terminal (a script, a pipe or a test running the CLI in-process is never asked).
    if args.dry_run or not args.yes and _is_terminal(stdin) and _is_terminal(err):
        # Ask the service what is there first (an unknown job fails here: NOT_FOUND).
        info = stub.GetJobInfo(
            persist_pb2.GetJobInfoRequest(job_uuid=args.job), timeout=_unary_timeout(args)
        )
        if args.dry_run:
            out.write(f"would delete {_describe_job(info)}\n")
            return EXIT_OK
        err.write(f"delete {_describe_job(info)}? [y/N] ")
        err.flush()
        answer = stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            err.write("not deleted\n")
            return EXIT_ERROR
    response = stub.DeleteJob(
        persist_pb2.DeleteJobRequest(job_uuid=args.job), timeout=_unary_timeout(args)
    )
    out.write((response.message or ("deleted" if response.success else "not deleted")) + "\n")
    return EXIT_OK if response.success else EXIT_ERROR


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


def cmd_cleanup(stub, args, out) -> int:
    response = stub.CleanupOldData(
        persist_pb2.CleanupRequest(dry_run=args.dry_run), timeout=_unary_timeout(args)
    )
    if args.json:
        out.write(json.dumps({
            "dry_run": args.dry_run,
            "jobs_deleted": response.jobs_deleted,
            "bytes_freed": response.bytes_freed,
            "deleted_job_ids": list(response.deleted_job_ids),
        }) + "\n")
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    out.write(f"{verb} {response.jobs_deleted} jobs, {response.bytes_freed} bytes "
              f"({_human(response.bytes_freed)})\n")
    for job in response.deleted_job_ids:
        out.write(f"  {job}\n")
    return EXIT_OK


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


def main(argv=None, stdout=None, stderr=None, stdin=None) -> int:
    """Run the command line; returns the exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    stdin = stdin if stdin is not None else sys.stdin
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
                return cmd_delete(stub, args, stdout, stderr, stdin)
            if args.command == "cleanup":
                return cmd_cleanup(stub, args, stdout)
            return cmd_ping(stub, args, stdout)
    except UsageError as e:
        stderr.write(f"joblet-persist-ctl: {e}\n")
        return EXIT_USAGE
    except locate.NotFound as e:
        stderr.write(f"joblet-persist-ctl: {e}\n")
        return EXIT_UNAVAILABLE
    except UnsupportedByService as e:
        stderr.write(f"joblet-persist-ctl: {e}\n")
        return EXIT_ERROR
    except grpc.RpcError as e:
        return _rpc_failure(e, target, stderr)
    except BrokenPipeError:
        _silence_closed_stdout(stdout)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
