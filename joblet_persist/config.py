"""Configuration: YAML parsed and validated once into frozen dataclasses.

``load_config(path)`` reads a file, ``config_from_string(text)`` is its twin for tests and
tools, ``default_config()`` is what an empty file gives.  The result is an immutable
``Config`` whose sections mirror the YAML sections (``server``, ``ipc``, ``storage`` with
``storage.retention``, ``writer``, ``query``, ``monitoring``, ``logging``, ``security``).
YAML keys are camelCase, attributes their snake_case twins (``grpcSocketMode`` ->
``grpc_socket_mode``).  Durations become float seconds, sizes int bytes, file modes ints.

Every problem is a ``ConfigError`` whose text names the file and the dotted key, e.g.
``config.yml: storage.retention.logMaxAge: expected a duration ...``.

A joblet-config.yml whose top level has a ``persist:`` section is accepted too: that
section is the configuration, and the root's ``ipc.socket``, ``server.nodeId`` and
``security.*`` are inherited unless the section sets them itself.  The rest of the root
belongs to joblet-core and is not validated here.

Threading: this module is a leaf (no reactor, no Deferreds).  ``load_config`` and
``read_pem`` do blocking file I/O; they run once at startup, before the reactor serves
anything (``makeService`` / ``startService``).  Everything else is pure and may run on any
thread; the returned objects are immutable and safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional

import yaml
from twisted.logger import LogLevel

from joblet_persist.rules import (
    NUMBER,
    InvalidValue,
    group_text,
    is_loopback_host,
    parse_duration,
    parse_group,
    parse_host_port,
    parse_mode,
    show_value,
    valid_host,
)
from joblet_persist.storage.compress import ADAPTIVE, COMPRESSOR_LEVELS, ISAL_DEFAULT_LEVEL
from joblet_persist.storage.durability import FSYNC_POLICIES
from joblet_persist.storage.files import POOL_FILES_PER_THREAD

#: Files the default storage.maxOpenFiles leaves to queries at least (more pool threads
#: than 2 x 2 raise the default above 256 by their share).
QUERY_FILES_DEFAULT = 252

__all__ = [
    "Config",
    "ConfigError",
    "IPCConfig",
    "LoggingConfig",
    "MonitoringConfig",
    "QueryConfig",
    "RetentionConfig",
    "SecurityConfig",
    "ServerConfig",
    "StorageConfig",
    "WriterConfig",
    "config_from_string",
    "default_config",
    "is_loopback_host",
    "load_config",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "read_pem",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_DATA_DIR = "/opt/joblet"
IPC_SOCKET_NAME = "persist-ipc.sock"
GRPC_SOCKET_NAME = "persist-grpc.sock"

#: Bytes a query response may add to the largest IPC frame's content: a LogLine or an
#: event re-encoded for the query API carries the job id (up to 128 bytes), timestamps
#: and field tags besides the content the frame held.
QUERY_MESSAGE_OVERHEAD = 64 * KiB

#: gRPC takes message limits as a C int.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1

#: Longest AF_UNIX socket path in bytes (Linux: 108 bytes of sun_path, one for the NUL).
MAX_SOCKET_PATH_BYTES = 107

#: Accepted compression levels per compressor (inclusive), and the level used for ``isal``
#: when ``storage.compressionLevel`` is omitted (the documented default 5 is out of
#: ISA-L's range 0-3): defined once, with the compressors.
COMPRESSION_LEVELS = COMPRESSOR_LEVELS


class ConfigError(Exception):
    """A configuration problem, fatal at startup.

    ``str()`` reads ``<source>[, line N]: <dotted.key>: <message>``; ``source`` is the file
    path (or ``<string>``), ``key`` the dotted YAML key as written in that file (``None``
    when the problem is the file itself), ``line`` the 1-based line of a YAML syntax error.
    """

    def __init__(
        self,
        source: str | None,
        key: str | None,
        message: str,
        line: int | None = None,
    ) -> None:
        super().__init__(source, key, message, line)
        self.source = source
        self.key = key
        self.message = message
        self.line = line

    def __str__(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source if self.line is None else f"{self.source}, line {self.line}")
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


# ---------------------------------------------------------------------------------------
# Value parsers.  Each takes the value as YAML produced it and returns the typed value or
# raises InvalidValue with a message that does not repeat the key.


_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_TEXT = re.compile(rf"({NUMBER})\s*([A-Za-z]*)")
_SIZE_HELP = 'a size: a number of bytes or a string like "64KiB", "16MiB", "1GiB", "10KB", "5MB"'


def parse_size(value: Any) -> int:
    """Return ``value`` as int bytes, or raise ValueError.

    Accepts a whole number of bytes (an int, or a float with no fraction) or a string of
    a number and an optional unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB,
    TiB (powers of 1024), case-insensitive.  ``"1.5KiB"`` is 1536; a result that is not a
    whole number of bytes and negative values are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidValue(f"expected {_SIZE_HELP}, got {show_value(value)}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise InvalidValue(f"must not be negative, got {show_value(value)}")
        match = _SIZE_TEXT.fullmatch(text)
        if match is None:
            raise InvalidValue(f"expected {_SIZE_HELP}, got {show_value(value)}")
        number, unit = match.groups()
        multiplier = _SIZE_UNITS.get(unit.lower() if unit else "b")
        if multiplier is None:
            raise InvalidValue(
                f"unknown size unit {unit!r} in {show_value(value)}; "
                "use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
        amount = Fraction(number) * multiplier
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"expected {_SIZE_HELP}, got {show_value(value)}")
        amount = Fraction(value)
    else:
        amount = Fraction(int(value))
    if amount < 0:
        raise InvalidValue(f"must not be negative, got {show_value(value)}")
    if amount.denominator != 1:
        raise InvalidValue(f"{show_value(value)} is not a whole number of bytes")
    return int(amount)


def _string(*, allow_empty: bool = True) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            hint = " (quote it to make it a string)" if isinstance(value, (int, float)) else ""
            raise InvalidValue(f"expected a string, got {show_value(value)}{hint}")
        if not allow_empty and not value.strip():
            raise InvalidValue("must not be empty")
        return value

    return parse


def _path(*, allow_empty: bool = False) -> Callable[[Any], str]:
    as_string = _string(allow_empty=allow_empty)

    def parse(value: Any) -> str:
        text = as_string(value)
        if "\0" in text:
            raise InvalidValue("a path must not contain a NUL character")
        return os.path.abspath(text) if text else text

    return parse


def _integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        # bool is a subclass of int: "true" must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue(f"expected an integer, got {show_value(value)}")
        number = int(value)
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            if maximum is None:
                raise InvalidValue(f"must be at least {minimum}, got {number}")
            raise InvalidValue(f"must be between {minimum} and {maximum}, got {number}")
        return number

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(f"expected true or false, got {show_value(value)}")
    return value


def _duration(*, positive: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise InvalidValue(f"must be greater than 0, got {show_value(value)}")
        return seconds

    return parse


def _size(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        size = parse_size(value)
        if size < minimum:
            raise InvalidValue(f"must be at least {minimum} bytes, got {show_value(value)}")
        if maximum is not None and size > maximum:
            raise InvalidValue(f"must be at most {maximum} bytes, got {show_value(value)}")
        return size

    return parse


def _data_mode(value: Any) -> int:
    """A mode for files or directories under the data directory: never world-writable."""
    mode = parse_mode(value)
    if mode & 0o002:
        raise InvalidValue(
            f"{mode:04o} lets every local user write the stored data; drop the world-write bit"
        )
    return mode


def _describe_group(gid: Optional[int]) -> str:
    return "<unset>" if gid is None else str(gid)


def _choice(choices: tuple[str, ...], aliases: dict[str, str] | None = None):
    aliases = aliases or {}

    def parse(value: Any) -> str:
        if isinstance(value, str):
            name = value.strip().lower()
            name = aliases.get(name, name)
            if name in choices:
                return name
        valid = ", ".join(choices + tuple(aliases))
        raise InvalidValue(f"expected one of {valid}; got {show_value(value)}")

    return parse


def _backend(value: Any) -> str:
    """A name in the storage backend registry (storage.backends.BACKENDS)."""
    from joblet_persist.storage.backends import BACKENDS, unknown_backend

    if isinstance(value, str) and value.strip().lower() in BACKENDS:
        return value.strip().lower()
    raise InvalidValue(unknown_backend(value if isinstance(value, str) else show_value(value)))


def _address(value: Any) -> str:
    """A gRPC TCP listen address "host:port"; "" disables the listener."""
    if value == "":
        return ""
    parse_host_port(value)
    return value


def _bind_host(value: Any) -> str:
    host = _string(allow_empty=False)(value)
    if not valid_host(host):
        raise InvalidValue(f"{show_value(value)} is not an IP address or a host name")
    return host


def _is_inline_pem(value: str) -> bool:
    return value.lstrip().startswith("-----BEGIN")


def _describe_mode(mode: int) -> str:
    return f"{mode:04o}"


def _describe_secret(value: str) -> str:
    return "<set>" if value else "<unset>"


def _describe_pem(value: str) -> str:
    if not value:
        return "<unset>"
    return "<pem>" if _is_inline_pem(value) else value


def _key(parse: Callable[[Any], Any], default: Any, describe: Callable[[Any], Any] | None = None):
    """A dataclass field that is a YAML key: how to parse it and how to show it."""
    return field(default=default, metadata={"parse": parse, "describe": describe})


def _section(cls: type):
    """A dataclass field that is a nested YAML section."""
    return field(default_factory=cls, metadata={"section": cls})


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


# ---------------------------------------------------------------------------------------
# The configuration objects.


@dataclass(frozen=True)
class ServerConfig:
    """``server``: the gRPC listeners (Unix socket and TCP)."""

    node_id: str = _key(_string(), "")
    grpc_socket: str = _key(
        _path(allow_empty=True), os.path.join(DEFAULT_DATA_DIR, "run", GRPC_SOCKET_NAME)
    )
    grpc_socket_mode: int = _key(parse_mode, 0o600, _describe_mode)
    # The read-only socket: every caller there is a viewer.  "" = off.
    grpc_viewer_socket: str = _key(_path(allow_empty=True), "")
    grpc_viewer_socket_mode: int = _key(parse_mode, 0o660, _describe_mode)
    grpc_viewer_socket_group: str = _key(group_text, "")
    # TCP is off by default; with an address it needs TLS or allowPlaintextTcp (loopback).
    grpc_address: str = _key(_address, "")
    allow_plaintext_tcp: bool = _key(_boolean, False)
    max_message_bytes: int = _key(_size(1, GRPC_MAX_MESSAGE_BYTES), 16 * MiB)
    max_concurrent_rpcs: int = _key(_integer(1), 64)
    grpc_workers: int = _key(_integer(1), 16)
    shutdown_grace: float = _key(_duration(), 5.0)

    @property
    def grpc_host(self) -> str | None:
        """Host part of ``grpc_address`` (IPv6 without brackets); None when TCP is off."""
        return parse_host_port(self.grpc_address)[0] if self.grpc_address else None


@dataclass(frozen=True)
class IPCConfig:
    """``ipc``: the Unix socket on which joblet-core sends frames."""

    socket: str = _key(_path(), os.path.join(DEFAULT_DATA_DIR, "run", IPC_SOCKET_NAME))
    socket_mode: int = _key(parse_mode, 0o600, _describe_mode)
    # The frame length prefix is an unsigned 32-bit integer.
    max_frame_bytes: int = _key(_size(1, 2**32 - 1), 128 * MiB)
    max_connections: int = _key(_integer(1), 1024)
    # On shutdown, how long connections are read for what their peers already wrote.
    drain_timeout: float = _key(_duration(positive=True), 5.0)
    # Bytes that frames still arriving may reserve, all connections together, and for one
    # connection (0: ipc.maxFrameBytes).
    max_partial_bytes: int = _key(_size(1), 256 * MiB)
    max_partial_bytes_per_connection: int = _key(_size(0, 2**32 - 1), 0)
    # A connection holding part of a frame with no progress for this long is closed.
    partial_frame_timeout: float = _key(_duration(positive=True), 30.0)

    @property
    def partial_bytes_per_connection(self) -> int:
        """``max_partial_bytes_per_connection`` with 0 resolved to ``max_frame_bytes``."""
        return self.max_partial_bytes_per_connection or self.max_frame_bytes


_LEVEL_NUMBER = _integer(0, max(high for _, high in COMPRESSOR_LEVELS.values()))


def _compression_level(value: Any) -> int | str:
    """``storage.compressionLevel``: ``adaptive`` or a fixed integer level."""
    if isinstance(value, str) and value.strip().lower() == ADAPTIVE:
        return ADAPTIVE
    try:
        return _LEVEL_NUMBER(value)
    except InvalidValue as e:
        raise InvalidValue(f"expected {ADAPTIVE!r} or an integer level: {e}") from None


@dataclass(frozen=True)
class RetentionConfig:
    """``storage.retention``: what is deleted, and how often retention runs. 0 disables."""

    log_max_age: float = _key(_duration(), 30 * 86400.0)
    metric_max_age: float = _key(_duration(), 30 * 86400.0)
    event_max_age: float = _key(_duration(), 30 * 86400.0)
    job_max_bytes: int = _key(_size(), 0)
    total_max_bytes: int = _key(_size(), 0)
    min_free_bytes: int = _key(_size(), 100 * MiB)
    active_window: float = _key(_duration(), 600.0)
    interval: float = _key(_duration(positive=True), 300.0)


@dataclass(frozen=True)
class StorageConfig:
    """``storage``: where and how data is written."""

    data_dir: str = _key(_path(), DEFAULT_DATA_DIR)
    backend: str = _key(_backend, "local")
    compressor: str = _key(_choice(tuple(COMPRESSION_LEVELS)), "deflate")
    compression_level: int | str = _key(_compression_level, ADAPTIVE)
    # Line tables (docs/storage-format.md): false writes only what releases before them read.
    line_tables: bool = _key(_boolean, True)
    segment_max_bytes: int = _key(_size(1), 256 * MiB)
    fsync: str = _key(_choice(FSYNC_POLICIES), "batch")
    max_open_files: int = _key(_integer(1), 256)
    unload_idle_after: float = _key(_duration(), 600.0)
    file_mode: int = _key(_data_mode, 0o640, _describe_mode)
    dir_mode: int = _key(_data_mode, 0o750, _describe_mode)
    group: Optional[int] = _key(parse_group, None, _describe_group)
    retention: RetentionConfig = _section(RetentionConfig)

    @property
    def index_path(self) -> str:
        """``<dataDir>/job_index.json``: the per-job summary."""
        return os.path.join(self.data_dir, "job_index.json")


@dataclass(frozen=True)
class WriterConfig:
    """``writer``: batching, flushing, backpressure and retry of appends."""

    flush_interval: float = _key(_duration(positive=True), 1.0)
    batch_max_messages: int = _key(_integer(1), 20000)
    batch_max_bytes: int = _key(_size(1), 2 * MiB)
    high_water_bytes: int = _key(_size(1), 128 * MiB)
    low_water_bytes: int = _key(_size(), 64 * MiB)
    threads: int = _key(_integer(0, 1024), 0)
    switch_interval: float = _key(_duration(positive=True), 0.001)
    retry_initial: float = _key(_duration(positive=True), 0.5)
    retry_max: float = _key(_duration(positive=True), 30.0)
    index_interval: float = _key(_duration(positive=True), 5.0)

    @property
    def thread_count(self) -> int:
        """Threads of the compression/append pool: ``threads``, or one per CPU when 0."""
        return self.threads or os.cpu_count() or 1


@dataclass(frozen=True)
class QueryConfig:
    """``query``: sizes of query responses and requests."""

    batch_max_items: int = _key(_integer(1), 4096)
    batch_max_bytes: int = _key(_size(1), 1 * MiB)
    max_limit: int = _key(_integer(1), 100_000_000)
    follow_buffer_bytes: int = _key(_size(1), 8 * MiB)
    search_max_bytes: int = _key(_size(), 8 * GiB)
    search_max_time: float = _key(_duration(), 60.0)
    search_threads: int = _key(_integer(0, 1024), 0)
    aggregate_max_points: int = _key(_integer(1, 1_000_000), 10_000)

    @property
    def search_thread_count(self) -> int:
        """Threads that scan members for SearchLogs: ``searchThreads``, or one per CPU."""
        return self.search_threads or os.cpu_count() or 1


@dataclass(frozen=True)
class MonitoringConfig:
    """``monitoring``: the Klein web servers for /metrics and /health."""

    enabled: bool = _key(_boolean, True)
    bind_address: str = _key(_bind_host, "127.0.0.1")
    metrics_port: int = _key(_integer(0, 65535), 9092)
    health_port: int = _key(_integer(0, 65535), 9093)


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``: level and format of the service's own log. ``warning`` reads as ``warn``."""

    level: str = _key(_choice(("debug", "info", "warn", "error"), {"warning": "warn"}), "info")
    format: str = _key(_choice(("text", "json")), "text")

    @property
    def log_level(self) -> LogLevel:
        """``level`` as a ``twisted.logger.LogLevel``."""
        return LogLevel.levelWithName(self.level)


@dataclass(frozen=True)
class SecurityConfig:
    """``security``: TLS of the TCP gRPC listener and roles from client certificates.

    ``server_cert``, ``server_key`` and ``ca_cert`` are kept as written: inline PEM text or
    a file path; ``read_pem`` turns either into bytes.
    """

    server_cert: str = _key(_string(), "", _describe_pem)
    server_key: str = _key(_string(), "", _describe_secret)
    ca_cert: str = _key(_string(), "", _describe_pem)
    require_client_cert: bool = _key(_boolean, True)
    admin_ou: str = _key(_string(allow_empty=False), "admin")
    viewer_ou: str = _key(_string(allow_empty=False), "viewer")

    @property
    def tls_enabled(self) -> bool:
        """True when both ``server_cert`` and ``server_key`` are set."""
        return bool(self.server_cert and self.server_key)


def _archive_kinds(value: Any) -> tuple[str, ...]:
    """``archive.s3.kinds``: a list of Part names (logs, metrics, ...); empty means all."""
    from joblet_persist.storage.api import Part

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidValue(f"expected a list of data kinds, got {show_value(value)}")
    known = tuple(part.value for part in Part)
    for item in value:
        if item not in known:
            raise InvalidValue(f"unknown data kind {item!r}; known kinds: {', '.join(known)}")
    return tuple(dict.fromkeys(value))


def _sse(value: Any) -> str:
    """``archive.s3.sse``: none, sse-s3 (AES256) or sse-kms (aws:kms)."""
    return _choice(("none", "sse-s3", "sse-kms"), {"aes256": "sse-s3", "aws:kms": "sse-kms"})(value)


#: When a remote backend copies a kind of data (``archive.<backend>.routes.<kind>``):
#: ``durable`` as soon as it is on disk (an open segment is copied again while it grows),
#: ``close`` when its segment closes (and the open segment of a job idle
#: ``uploadIdleAfter``), ``idle`` only once the job is idle ``uploadIdleAfter``, ``never``.
ROUTE_MODES = ("durable", "close", "idle", "never")


@dataclass(frozen=True)
class RoutesConfig:
    """``archive.<backend>.routes``: when each kind of data (a Part) goes to that backend.

    One key per Part (``logs``, ``metrics``, ``events``), each one of ROUTE_MODES;
    ``mode(part)`` reads it.  Shared by every remote backend's section.
    """

    logs: str = _key(_choice(ROUTE_MODES), "close")
    metrics: str = _key(_choice(ROUTE_MODES), "close")
    events: str = _key(_choice(ROUTE_MODES), "close")

    def mode(self, part: str) -> str:
        """The route of ``part`` (a Part or its name)."""
        return getattr(self, str(part))

    @classmethod
    def from_kinds(cls, kinds: tuple) -> RoutesConfig:
        """The routes of the older ``kinds`` list: listed kinds ``close``, the rest ``never``
        (an empty list: every kind ``close``)."""
        return cls(**{f.name: ("close" if not kinds or f.name in kinds else "never")
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class S3ArchiveConfig:
    """``archive.s3``: closed segments copied to an S3 bucket (docs/operations.md)."""

    enabled: bool = _key(_boolean, False)
    bucket: str = _key(_string(), "")
    # Keys are ``{prefix}{server.nodeId}/{job}/{kind}/{segment}``.
    prefix: str = _key(_string(), "")
    region: str = _key(_string(), "")
    # S3-compatible stores (MinIO, Ceph RGW): their URL, and path-style addressing.
    endpoint_url: str = _key(_string(), "")
    force_path_style: bool = _key(_boolean, False)
    storage_class: str = _key(_string(), "")
    sse: str = _key(_sse, "none")
    sse_kms_key_id: str = _key(_string(), "")
    # Segments at least this large are uploaded in parts of this size (S3's minimum: 5 MiB).
    multipart_threshold: int = _key(_size(5 * MiB, 5 * 1024 * MiB), 64 * MiB)
    # The open segment of a job idle this long is uploaded too (re-uploaded when it grows).
    upload_idle_after: float = _key(_duration(positive=True), 300.0)
    # How often the data directory is scanned for segments to upload.
    interval: float = _key(_duration(positive=True), 30.0)
    # Health turns unhealthy past this backlog (0: never), or this age of the oldest
    # unarchived segment (0: never).
    backlog_unhealthy_bytes: int = _key(_size(), 10 * 1024 * MiB)
    backlog_unhealthy_age: float = _key(_duration(), 3600.0)
    # Which data kinds are archived (Part names: logs, metrics, ...); [] = all.  The older
    # form of ``routes`` (read into it; not shown in describe() or the example file).
    kinds: tuple = field(default=(), metadata={"parse": _archive_kinds, "describe": None,
                                                 "legacy": True})
    # When each data kind is uploaded (durable, close, idle, never); replaces ``kinds``.
    routes: RoutesConfig = _section(RoutesConfig)
    # An archived job whose newest object is older than this, and that is no longer on
    # the local disk, is deleted from the bucket (0: kept forever); checked this often.
    max_age: float = _key(_duration(), 0.0)
    retention_interval: float = _key(_duration(positive=True), 3600.0)
    # Retries of a failed upload: first delay, doubling (with jitter) up to the maximum.
    retry_initial: float = _key(_duration(positive=True), 1.0)
    retry_max: float = _key(_duration(positive=True), 300.0)
    # Reads of archived data (queries of segments only the archive holds): connect and read
    # timeout of each S3 request; a query fails with UNAVAILABLE after two such attempts.
    read_timeout: float = _key(_duration(positive=True), 10.0)
    # One S3 request gets this long to connect, and this long for each read of its answer.
    request_timeout: float = _key(_duration(positive=True), 60.0)


@dataclass(frozen=True)
class CloudWatchRoutesConfig(RoutesConfig):
    """``archive.cloudwatch.routes``: as every backend's routes, each kind ``durable`` by
    default (CloudWatch takes data as soon as it is on disk)."""

    logs: str = _key(_choice(ROUTE_MODES), "durable")
    metrics: str = _key(_choice(ROUTE_MODES), "durable")
    events: str = _key(_choice(ROUTE_MODES), "durable")


#: The retention periods CloudWatch Logs accepts (days).
CLOUDWATCH_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
                             1096, 1827, 2192, 2557, 2922, 3288, 3653)


def _retention_days(value: Any) -> int:
    """``archive.cloudwatch.retentionDays``: 0 (never expire) or a value CloudWatch accepts."""
    days = _integer(0)(value)
    if days and days not in CLOUDWATCH_RETENTION_DAYS:
        raise InvalidValue(f"{days} is not a retention CloudWatch Logs accepts; one of 0 (never), "
                           + ", ".join(map(str, CLOUDWATCH_RETENTION_DAYS)))
    return days


#: CloudWatch allows at most 30 dimensions per metric; JobUUID and NodeID take two.
_CLOUDWATCH_EXTRA_DIMENSIONS = 28


def _metric_dimensions(value: Any) -> tuple:
    """``archive.cloudwatch.metricDimensions``: extra dimension name -> value (strings)."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a mapping of dimension name to value, got {show_value(value)}")
    if len(value) > _CLOUDWATCH_EXTRA_DIMENSIONS:
        raise InvalidValue(f"at most {_CLOUDWATCH_EXTRA_DIMENSIONS} dimensions (CloudWatch "
                           "allows 30 per metric; JobUUID and NodeID are two of them)")
    pairs = []
    for name, dim in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise InvalidValue(f"dimension name {show_value(name)}: expected 1-255 characters")
        if name in ("JobUUID", "NodeID"):
            raise InvalidValue(f"dimension {name} is always set by the service")
        if not isinstance(dim, str) or not 1 <= len(dim) <= 1024:
            raise InvalidValue(f"dimension {name}: expected a string of 1-1024 characters, "
                               f"got {show_value(dim)}")
        pairs.append((name, dim))
    return tuple(pairs)


@dataclass(frozen=True)
class CloudWatchArchiveConfig:
    """``archive.cloudwatch``: logs, metrics and events replayed to CloudWatch Logs and
    metrics through PutMetricData (docs/operations.md, "CloudWatch")."""

    enabled: bool = _key(_boolean, False)
    region: str = _key(_string(), "")
    # A CloudWatch-compatible endpoint (a VPC endpoint, a local test server).
    endpoint_url: str = _key(_string(), "")
    # Log group ``{logGroupPrefix}/{server.nodeId}/jobs``.
    log_group_prefix: str = _key(_string(allow_empty=False), "/joblet")
    # The group's retention in days (0: never expire); set when the service creates it.
    retention_days: int = _key(_retention_days, 0)
    # KMS key ARN the group is encrypted with when the service creates it ("" = none).
    kms_key_id: str = _key(_string(), "")
    metric_namespace: str = _key(_string(allow_empty=False), "Joblet/Jobs")
    metric_dimensions: tuple = _key(_metric_dimensions, (), lambda pairs: dict(pairs))
    # How often the stored jobs are checked for data to ship.
    interval: float = _key(_duration(positive=True), 5.0)
    # A job with no write for this long counts as idle (routes ``close`` and ``idle``).
    idle_after: float = _key(_duration(positive=True), 300.0)
    # Health turns unhealthy past this many unshipped messages (0: never), or when data
    # has waited this long (0: never).
    backlog_unhealthy_messages: int = _key(_integer(0), 1_000_000)
    backlog_unhealthy_age: float = _key(_duration(), 3600.0)
    # Retries of failing calls: first delay, doubling (with jitter) up to the maximum.
    retry_initial: float = _key(_duration(positive=True), 1.0)
    retry_max: float = _key(_duration(positive=True), 300.0)
    routes: CloudWatchRoutesConfig = _section(CloudWatchRoutesConfig)

    def route(self, part: str) -> str:
        """When data of ``part`` (logs, metrics, events) is shipped."""
        return self.routes.mode(part)


@dataclass(frozen=True)
class ArchiveConfig:
    """``archive``: remote copies of the stored data, fed from the local segments."""

    s3: S3ArchiveConfig = _section(S3ArchiveConfig)
    cloudwatch: CloudWatchArchiveConfig = _section(CloudWatchArchiveConfig)


@dataclass(frozen=True)
class Config:
    """The whole configuration.  ``source`` is the file read, or ``"<defaults>"``.

    ``source`` does not take part in equality: a file that spells out every default equals
    ``default_config()``.
    """

    server: ServerConfig = _section(ServerConfig)
    ipc: IPCConfig = _section(IPCConfig)
    storage: StorageConfig = _section(StorageConfig)
    writer: WriterConfig = _section(WriterConfig)
    query: QueryConfig = _section(QueryConfig)
    monitoring: MonitoringConfig = _section(MonitoringConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    security: SecurityConfig = _section(SecurityConfig)
    archive: ArchiveConfig = _section(ArchiveConfig)
    source: str = field(default="<defaults>", compare=False)

    @property
    def grpc_send_message_bytes(self) -> int:
        """The largest message a query may send: at least ``server.maxMessageBytes``, and
        enough for the largest line ``ipc.maxFrameBytes`` lets in, so that every stored
        line can be read back (``_validate`` keeps it within gRPC's limit)."""
        return max(self.server.max_message_bytes, self.ipc.max_frame_bytes + QUERY_MESSAGE_OVERHEAD)

    def describe(self) -> dict[str, Any]:
        """The effective configuration as a JSON-serializable dict for the startup log.

        Keys are the YAML keys.  Modes read ``"0600"``; ``serverKey`` reads ``"<set>"`` or
        ``"<unset>"``; ``serverCert`` and ``caCert`` read ``"<pem>"`` when inline, their
        path otherwise, ``"<unset>"`` when empty.
        """
        return {"source": self.source, **_describe(self)}


def _describe(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if "section" in item.metadata:
            out[_camel(item.name)] = _describe(value)
        elif "parse" in item.metadata and not item.metadata.get("legacy"):
            show = item.metadata["describe"]
            out[_camel(item.name)] = show(value) if show else value
    return out


# ---------------------------------------------------------------------------------------
# YAML loading.


class _LiteralInt(int):
    """An int from YAML that remembers how it was written (to tell 0600 from 600)."""

    literal: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and keeps integer literals."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != (
                    "tag:yaml.org,2002:merge"
                ):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping",
                            node.start_mark,
                            f"found duplicate key {key_node.value!r}",
                            key_node.start_mark,
                        )
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    value = _LiteralInt(yaml.SafeLoader.construct_yaml_int(loader, node))
    value.literal = node.value
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        # _Loader is a SafeLoader subclass: no arbitrary object construction.
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = e.problem or e.context or "syntax error"
        raise ConfigError(source, None, f"invalid YAML: {problem}", line=line) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, None, f"invalid YAML: {e}") from None


# ---------------------------------------------------------------------------------------
# Building a Config from parsed YAML.

#: Keys a persist section inherits from the root of a joblet-config.yml.
_INHERITED = {
    "ipc": ("socket",),
    "server": ("nodeId",),
    "security": tuple(_camel(f.name) for f in dataclasses.fields(SecurityConfig)),
}


class _Context:
    """Where values came from, to name them in errors as they are written in the file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.prefix = ""
        self.inherited: dict[str, Any] = {}
        self.from_root: set[str] = set()
        self.explicit: set[str] = set()

    def name(self, dotted: str) -> str:
        if dotted in self.from_root:
            return dotted
        return (self.prefix + dotted) if dotted else self.prefix.rstrip(".")

    def error(self, dotted: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.name(dotted) or None, message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_section(cls: type, mapping: Any, path: str, ctx: _Context) -> Any:
    keys = {_camel(f.name): f for f in dataclasses.fields(cls) if f.metadata}
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        what = "sections" if not path else "keys"
        raise ctx.error(path, f"expected a mapping of {what}, got {show_value(mapping)}")
    for key in mapping:
        if key not in keys:
            if path or ctx.prefix:
                where = f"section {ctx.name(path)!r}"
            else:
                where = "the top level"
            message = f"unknown key; valid keys of {where}: {', '.join(keys)}"
            if not path and not ctx.prefix:
                message += (
                    " (in a joblet-config.yml, joblet-persist's settings go under a"
                    " 'persist:' section)"
                )
            raise ctx.error(_join(path, str(key)), message)
    values = {}
    for key, item in keys.items():
        dotted = _join(path, key)
        if "section" in item.metadata:
            if key in mapping:
                ctx.explicit.add(dotted)
            values[item.name] = _parse_section(
                item.metadata["section"], mapping.get(key), dotted, ctx
            )
            continue
        if key in mapping:
            raw = mapping[key]
        elif dotted in ctx.inherited:
            raw = ctx.inherited[dotted]
            ctx.from_root.add(dotted)
        else:
            continue
        ctx.explicit.add(dotted)
        try:
            values[item.name] = item.metadata["parse"](raw)
        except InvalidValue as e:
            raise ctx.error(dotted, str(e)) from None
    return cls(**values)


def _root_inherited(root: dict, source: str) -> dict[str, Any]:
    """The values a persist section inherits from a joblet-config.yml root, by dotted key."""
    found = {}
    for section, keys in _INHERITED.items():
        mapping = root.get(section)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            raise ConfigError(source, section, f"expected a mapping of keys, got {show_value(mapping)}")
        for key in keys:
            if key in mapping:
                found[f"{section}.{key}"] = mapping[key]
    return found


def _with_data_dir(cfg: Config, data_dir: str, ctx: _Context) -> Config:
    if not isinstance(data_dir, str) or not data_dir or "\0" in data_dir:
        raise ConfigError(None, "--data-dir", f"expected a directory path, got {show_value(data_dir)}")
    root = os.path.abspath(data_dir)
    run = os.path.join(root, "run")
    ipc, server = cfg.ipc, cfg.server
    if "ipc.socket" not in ctx.explicit:
        ipc = dataclasses.replace(ipc, socket=os.path.join(run, IPC_SOCKET_NAME))
    if "server.grpcSocket" not in ctx.explicit:
        server = dataclasses.replace(server, grpc_socket=os.path.join(run, GRPC_SOCKET_NAME))
    storage = dataclasses.replace(cfg.storage, data_dir=root)
    return dataclasses.replace(cfg, ipc=ipc, server=server, storage=storage)


def _validate(cfg: Config, ctx: _Context) -> None:
    """Checks that span several keys; raise ConfigError naming the key to change."""
    storage = cfg.storage
    low, high = COMPRESSION_LEVELS[storage.compressor]
    if storage.compression_level != ADAPTIVE and not low <= storage.compression_level <= high:
        raise ctx.error(
            "storage.compressionLevel",
            f"{storage.compression_level} is out of range for compressor "
            f"{storage.compressor} ({low}-{high})",
        )

    s3 = cfg.archive.s3
    if s3.enabled:
        if not s3.bucket:
            raise ctx.error("archive.s3.bucket", "must be set when archive.s3.enabled is true")
        if not cfg.server.node_id:
            raise ctx.error(
                "server.nodeId",
                "must be set when archive.s3.enabled is true (it is part of every object key)",
            )
        if "/" in cfg.server.node_id:
            raise ctx.error("server.nodeId", "must not contain '/' (it is an S3 key component)")
        if s3.sse_kms_key_id and s3.sse != "sse-kms":
            raise ctx.error("archive.s3.sse", "must be sse-kms when archive.s3.sseKmsKeyId is set")
        if s3.retry_initial > s3.retry_max:
            raise ctx.error("archive.s3.retryMax", f"must be at least {ctx.name('archive.s3.retryInitial')}")

    cw = cfg.archive.cloudwatch
    if cfg.storage.backend == "cloudwatch" and not cw.enabled:
        raise ctx.error("storage.backend",
                        "cloudwatch needs archive.cloudwatch.enabled: true (CloudWatch is "
                        "where data whose local copy is gone is read from)")
    if cfg.storage.backend == "cloudwatch" and s3.enabled:
        raise ctx.error("storage.backend",
                        "cloudwatch reads from CloudWatch what is gone locally, and with "
                        f"{ctx.name('archive.s3.enabled')} the S3 archive does: choose one "
                        "(storage.backend: local reads archived data from S3 and can still "
                        "ship to CloudWatch)")
    if cw.enabled:
        if not cfg.server.node_id:
            raise ctx.error(
                "server.nodeId",
                "must be set when archive.cloudwatch.enabled is true (it is part of the log "
                "group name)",
            )
        if not re.fullmatch(r"[A-Za-z0-9_\-./#]+", cw.log_group_prefix + "/" + cfg.server.node_id):
            raise ctx.error(
                "archive.cloudwatch.logGroupPrefix",
                "with server.nodeId it must form a valid log group name "
                "(letters, digits, '_', '-', '.', '/', '#')",
            )
        if cw.retry_initial > cw.retry_max:
            raise ctx.error("archive.cloudwatch.retryMax",
                            f"must be at least {ctx.name('archive.cloudwatch.retryInitial')}")

    writer = cfg.writer
    if writer.low_water_bytes >= writer.high_water_bytes:
        raise ctx.error(
            "writer.lowWaterBytes",
            f"must be less than {ctx.name('writer.highWaterBytes')} "
            f"({writer.low_water_bytes} >= {writer.high_water_bytes} bytes)",
        )
    if writer.retry_initial > writer.retry_max:
        raise ctx.error(
            "writer.retryMax",
            f"must be at least {ctx.name('writer.retryInitial')} "
            f"({writer.retry_max}s < {writer.retry_initial}s)",
        )
    pool_files = POOL_FILES_PER_THREAD * writer.thread_count
    if storage.max_open_files <= pool_files:
        raise ctx.error(
            "storage.maxOpenFiles",
            f"{storage.max_open_files} leaves no file for queries: the write pool may hold "
            f"{pool_files} ({POOL_FILES_PER_THREAD} per thread, {ctx.name('writer.threads')} "
            f"resolving to {writer.thread_count}); set it to {pool_files + 1} or more",
        )

    largest = cfg.ipc.max_frame_bytes + QUERY_MESSAGE_OVERHEAD
    if largest > GRPC_MAX_MESSAGE_BYTES:
        raise ctx.error(
            "ipc.maxFrameBytes",
            f"{cfg.ipc.max_frame_bytes} bytes: a line that large could be stored but never "
            f"read back, since a query message (like {ctx.name('server.maxMessageBytes')}) "
            f"is limited to {GRPC_MAX_MESSAGE_BYTES} bytes; set it to at most "
            f"{GRPC_MAX_MESSAGE_BYTES - QUERY_MESSAGE_OVERHEAD}",
        )

    if cfg.query.batch_max_bytes >= cfg.server.max_message_bytes:
        raise ctx.error(
            "query.batchMaxBytes",
            f"must be less than {ctx.name('server.maxMessageBytes')} "
            f"({cfg.query.batch_max_bytes} >= {cfg.server.max_message_bytes} bytes) "
            "so that a batch fits in one gRPC message",
        )

    sockets = [
        ("ipc.socket", cfg.ipc.socket),
        ("server.grpcSocket", cfg.server.grpc_socket),
        ("server.grpcViewerSocket", cfg.server.grpc_viewer_socket),
    ]
    for key, path in sockets:
        if path and len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            where = "" if key in ctx.explicit else " (placed under the data directory)"
            raise ctx.error(
                key,
                f"socket path {path!r}{where} is {len(os.fsencode(path))} bytes long; Unix "
                f"socket paths are limited to {MAX_SOCKET_PATH_BYTES} bytes",
            )
    if cfg.ipc.socket == cfg.server.grpc_socket:
        raise ctx.error("server.grpcSocket", f"must differ from {ctx.name('ipc.socket')}")
    viewer = cfg.server.grpc_viewer_socket
    if viewer and viewer in (cfg.ipc.socket, cfg.server.grpc_socket):
        raise ctx.error(
            "server.grpcViewerSocket",
            f"must differ from {ctx.name('ipc.socket')} and {ctx.name('server.grpcSocket')}",
        )
    if viewer and cfg.server.grpc_viewer_socket_group:
        try:
            parse_group(cfg.server.grpc_viewer_socket_group)
        except InvalidValue:
            raise ctx.error(
                "server.grpcViewerSocketGroup",
                f"no group named {cfg.server.grpc_viewer_socket_group!r} on this system",
            ) from None
    if cfg.ipc.max_partial_bytes_per_connection > cfg.ipc.max_frame_bytes:
        raise ctx.error(
            "ipc.maxPartialBytesPerConnection",
            f"must be at most {ctx.name('ipc.maxFrameBytes')} "
            f"({cfg.ipc.max_partial_bytes_per_connection} > {cfg.ipc.max_frame_bytes} bytes)",
        )

    security = cfg.security
    if bool(security.server_cert) != bool(security.server_key):
        missing, present = (
            ("security.serverKey", "security.serverCert")
            if security.server_cert
            else ("security.serverCert", "security.serverKey")
        )
        raise ctx.error(missing, f"must be set together with {ctx.name(present)}: TLS needs both")
    if security.tls_enabled and security.require_client_cert and not security.ca_cert:
        raise ctx.error(
            "security.caCert",
            f"must be set when {ctx.name('security.requireClientCert')} is true: "
            "client certificates are verified against it",
        )
    if security.admin_ou == security.viewer_ou:
        raise ctx.error("security.viewerOu", f"must differ from {ctx.name('security.adminOu')}")

    address = cfg.server.grpc_address
    if address and not security.tls_enabled and not is_loopback_host(cfg.server.grpc_host):
        raise ctx.error(
            "server.grpcAddress",
            f"{show_value(address)}: plaintext TCP is only allowed on loopback "
            f"(127.0.0.0/8, ::1, localhost); set {ctx.name('security.serverCert')} and "
            f"{ctx.name('security.serverKey')} to serve TLS on this address, use a loopback "
            'address, or "" to disable TCP',
        )
    if address and not security.tls_enabled and not cfg.server.allow_plaintext_tcp:
        raise ctx.error(
            "server.grpcAddress",
            f"{show_value(address)}: the TCP listener needs TLS ({ctx.name('security.serverCert')}"
            f" and {ctx.name('security.serverKey')}); plaintext TCP makes every local user "
            f"admin and needs {ctx.name('server.allowPlaintextTcp')}: true; "
            'or set it to "" and use the Unix sockets',
        )


def _build(document: Any, source: str, data_dir: str | None) -> Config:
    ctx = _Context(source)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(
            source, None, f"expected a mapping of sections at the top level, got {show_value(document)}"
        )
    if "persist" in document:
        ctx.prefix = "persist."
        ctx.inherited = _root_inherited(document, source)
        document = document["persist"]
    sections = _parse_section(Config, document, "", ctx)
    cfg = dataclasses.replace(sections, source=source)
    if data_dir is not None:
        cfg = _with_data_dir(cfg, data_dir, ctx)
    if "storage.compressionLevel" not in ctx.explicit and cfg.storage.compressor == "isal":
        storage = dataclasses.replace(cfg.storage, compression_level=ISAL_DEFAULT_LEVEL)
        cfg = dataclasses.replace(cfg, storage=storage)
    pool_files = POOL_FILES_PER_THREAD * cfg.writer.thread_count
    if "storage.maxOpenFiles" not in ctx.explicit and pool_files + QUERY_FILES_DEFAULT > 256:
        # Many pool threads: the default leaves queries as many files as on a small node.
        storage = dataclasses.replace(cfg.storage, max_open_files=pool_files + QUERY_FILES_DEFAULT)
        cfg = dataclasses.replace(cfg, storage=storage)
    cfg = _archive_routes(cfg, ctx)
    _validate(cfg, ctx)
    return cfg


def _archive_routes(cfg: Config, ctx: _Context) -> Config:
    """``archive.s3.kinds`` (the older key) becomes the equivalent ``archive.s3.routes``;
    setting both is an error naming both."""
    if "archive.s3.kinds" not in ctx.explicit:
        return cfg
    if "archive.s3.routes" in ctx.explicit:
        raise ctx.error(
            "archive.s3.kinds",
            f"set either this or {ctx.name('archive.s3.routes')}, not both "
            f"({ctx.name('archive.s3.routes')} replaces it: a listed kind is 'close', "
            "one not listed 'never')",
        )
    s3 = dataclasses.replace(cfg.archive.s3, routes=RoutesConfig.from_kinds(cfg.archive.s3.kinds))
    return dataclasses.replace(cfg, archive=dataclasses.replace(cfg.archive, s3=s3))


def config_from_string(
    text: str, *, source: str = "<string>", data_dir: str | None = None
) -> Config:
    """Parse YAML ``text`` into a Config; ``source`` names it in errors and in the result.

    ``data_dir`` is the ``--data-dir`` option: it sets ``storage.data_dir`` (made absolute)
    and moves the socket paths the text does not set under ``<data_dir>/run/``.
    Raises ConfigError.  Pure; any thread.
    """
    return _build(_parse_yaml(text, source), source, data_dir)


def load_config(path: str | None = None, *, data_dir: str | None = None) -> Config:
    """Read and validate the YAML file at ``path``; ``None`` gives the defaults.

    ``data_dir`` as for ``config_from_string``.  Raises ConfigError naming the file.
    Blocking file I/O: run once at startup, before the reactor serves.
    """
    if path is None:
        return default_config(data_dir=data_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(path, None, f"cannot read configuration file: {reason}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start})") from None
    return config_from_string(text, source=path, data_dir=data_dir)


def default_config(*, data_dir: str | None = None) -> Config:
    """The configuration of an empty file; ``data_dir`` as for ``config_from_string``."""
    return _build({}, Config().source, data_dir)


def read_pem(value: str, key: str, *, source: str | None = None) -> bytes:
    """Return the PEM bytes of a ``security.*`` value: inline PEM text or a file path.

    Inline text is recognised by its leading ``-----BEGIN``; anything else is a path to
    read.  Raises ConfigError naming ``key`` (and ``source`` when given) when the value is
    empty, the file is unreadable, or it holds no PEM block.  Blocking file I/O: call at
    startup, before serving.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, "is not set")
    if _is_inline_pem(value):
        data = value.encode("utf-8")
        if b"-----END" not in data:
            raise ConfigError(source, key, "inline PEM text has no -----END line")
        return data
    try:
        with open(value, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(source, key, f"cannot read PEM file {value!r}: {reason}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(source, key, f"{value!r} does not contain PEM data")
    return data
