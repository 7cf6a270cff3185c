from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_TYPE_UNSPECIFIED: _ClassVar[StreamType]
    STREAM_TYPE_STDOUT: _ClassVar[StreamType]
    STREAM_TYPE_STDERR: _ClassVar[StreamType]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_EXEC: _ClassVar[EventKind]
    EVENT_KIND_CONNECT: _ClassVar[EventKind]
    EVENT_KIND_ACCEPT: _ClassVar[EventKind]
    EVENT_KIND_SOCKET_DATA: _ClassVar[EventKind]
    EVENT_KIND_MMAP: _ClassVar[EventKind]
    EVENT_KIND_MPROTECT: _ClassVar[EventKind]
    EVENT_KIND_FILE: _ClassVar[EventKind]

class FollowFrom(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FOLLOW_FROM_START: _ClassVar[FollowFrom]
    FOLLOW_FROM_TAIL: _ClassVar[FollowFrom]
    FOLLOW_FROM_NOW: _ClassVar[FollowFrom]
STREAM_TYPE_UNSPECIFIED: StreamType
STREAM_TYPE_STDOUT: StreamType
STREAM_TYPE_STDERR: StreamType
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_EXEC: EventKind
EVENT_KIND_CONNECT: EventKind
EVENT_KIND_ACCEPT: EventKind
EVENT_KIND_SOCKET_DATA: EventKind
EVENT_KIND_MMAP: EventKind
EVENT_KIND_MPROTECT: EventKind
EVENT_KIND_FILE: EventKind
FOLLOW_FROM_START: FollowFrom
FOLLOW_FROM_TAIL: FollowFrom
FOLLOW_FROM_NOW: FollowFrom

class LogLine(_message.Message):
    __slots__ = ("job_uuid", "stream", "timestamp", "sequence", "content")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    stream: StreamType
    timestamp: int
    sequence: int
    content: bytes
    def __init__(self, job_uuid: _Optional[str] = ..., stream: _Optional[_Union[StreamType, str]] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., content: _Optional[bytes] = ...) -> None: ...

class DiskIO(_message.Message):
    __slots__ = ("read_bytes", "write_bytes", "read_ops", "write_ops")
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_OPS_FIELD_NUMBER: _ClassVar[int]
    WRITE_OPS_FIELD_NUMBER: _ClassVar[int]
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    def __init__(self, read_bytes: _Optional[int] = ..., write_bytes: _Optional[int] = ..., read_ops: _Optional[int] = ..., write_ops: _Optional[int] = ...) -> None: ...

class NetworkIO(_message.Message):
    __slots__ = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    def __init__(self, rx_bytes: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., rx_packets: _Optional[int] = ..., tx_packets: _Optional[int] = ...) -> None: ...

class MetricData(_message.Message):
    __slots__ = ("cpu_usage", "memory_usage", "gpu_usage", "disk_io", "network_io")
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    DISK_IO_FIELD_NUMBER: _ClassVar[int]
    NETWORK_IO_FIELD_NUMBER: _ClassVar[int]
    cpu_usage: float
    memory_usage: int
    gpu_usage: float
    disk_io: DiskIO
    network_io: NetworkIO
    def __init__(self, cpu_usage: _Optional[float] = ..., memory_usage: _Optional[int] = ..., gpu_usage: _Optional[float] = ..., disk_io: _Optional[_Union[DiskIO, _Mapping]] = ..., network_io: _Optional[_Union[NetworkIO, _Mapping]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "data")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    data: MetricData
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., data: _Optional[_Union[MetricData, _Mapping]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("healthy", "timestamp")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    timestamp: int
    def __init__(self, healthy: _Optional[bool] = ..., timestamp: _Optional[int] = ...) -> None: ...

class QueryLogsRequest(_message.Message):
    __slots__ = ("job_uuid", "stream", "start_time", "end_time", "limit", "offset", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    stream: StreamType
    start_time: int
    end_time: int
    limit: int
    offset: int
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., stream: _Optional[_Union[StreamType, str]] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class QueryMetricsRequest(_message.Message):
    __slots__ = ("job_uuid", "start_time", "end_time", "limit", "offset", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    start_time: int
    end_time: int
    limit: int
    offset: int
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class GetJobInfoRequest(_message.Message):
    __slots__ = ("job_uuid",)
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    def __init__(self, job_uuid: _Optional[str] = ...) -> None: ...

class GetJobInfoResponse(_message.Message):
    __slots__ = ("job_uuid", "created_at", "last_updated", "log_count", "metric_count", "size_bytes", "event_count", "event_counts")
    class EventCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    LOG_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRIC_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    created_at: int
    last_updated: int
    log_count: int
    metric_count: int
    size_bytes: int
    event_count: int
    event_counts: _containers.ScalarMap[str, int]
    def __init__(self, job_uuid: _Optional[str] = ..., created_at: _Optional[int] = ..., last_updated: _Optional[int] = ..., log_count: _Optional[int] = ..., metric_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., event_count: _Optional[int] = ..., event_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_uuid", "created_at", "last_updated", "log_count", "metric_count", "size_bytes", "event_count", "event_counts")
    class EventCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    LOG_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRIC_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    created_at: int
    last_updated: int
    log_count: int
    metric_count: int
    size_bytes: int
    event_count: int
    event_counts: _containers.ScalarMap[str, int]
    def __init__(self, job_uuid: _Optional[str] = ..., created_at: _Optional[int] = ..., last_updated: _Optional[int] = ..., log_count: _Optional[int] = ..., metric_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., event_count: _Optional[int] = ..., event_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("since", "until", "limit", "offset")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    since: int
    until: int
    limit: int
    offset: int
    def __init__(self, since: _Optional[int] = ..., until: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "total_count")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    total_count: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., total_count: _Optional[int] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_uuid", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("total_jobs", "total_logs", "total_metrics", "total_size_bytes", "messages_received", "messages_written", "write_errors", "total_events", "total_events_by_kind")
    class TotalEventsByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_JOBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    WRITE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EVENTS_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    total_jobs: int
    total_logs: int
    total_metrics: int
    total_size_bytes: int
    messages_received: int
    messages_written: int
    write_errors: int
    total_events: int
    total_events_by_kind: _containers.ScalarMap[str, int]
    def __init__(self, total_jobs: _Optional[int] = ..., total_logs: _Optional[int] = ..., total_metrics: _Optional[int] = ..., total_size_bytes: _Optional[int] = ..., messages_received: _Optional[int] = ..., messages_written: _Optional[int] = ..., write_errors: _Optional[int] = ..., total_events: _Optional[int] = ..., total_events_by_kind: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CleanupRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CleanupResponse(_message.Message):
    __slots__ = ("jobs_deleted", "bytes_freed", "deleted_job_ids")
    JOBS_DELETED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DELETED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    jobs_deleted: int
    bytes_freed: int
    deleted_job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs_deleted: _Optional[int] = ..., bytes_freed: _Optional[int] = ..., deleted_job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LogLineBatch(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class MetricBatch(_message.Message):
    __slots__ = ("metrics",)
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    def __init__(self, metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ...) -> None: ...

class ExecEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "ppid", "uid", "gid", "comm", "filename", "args", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    ppid: int
    uid: int
    gid: int
    comm: str
    filename: str
    args: _containers.RepeatedScalarFieldContainer[str]
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., comm: _Optional[str] = ..., filename: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ConnectEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "src_addr", "src_port", "dst_addr", "dst_port", "protocol", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    SRC_ADDR_FIELD_NUMBER: _ClassVar[int]
    SRC_PORT_FIELD_NUMBER: _ClassVar[int]
    DST_ADDR_FIELD_NUMBER: _ClassVar[int]
    DST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    protocol: str
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., src_addr: _Optional[str] = ..., src_port: _Optional[int] = ..., dst_addr: _Optional[str] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[str] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class AcceptEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "src_addr", "src_port", "dst_addr", "dst_port", "protocol", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    SRC_ADDR_FIELD_NUMBER: _ClassVar[int]
    SRC_PORT_FIELD_NUMBER: _ClassVar[int]
    DST_ADDR_FIELD_NUMBER: _ClassVar[int]
    DST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    protocol: str
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., src_addr: _Optional[str] = ..., src_port: _Optional[int] = ..., dst_addr: _Optional[str] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[str] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SocketDataEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "direction", "dst_addr", "dst_port", "bytes", "protocol", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DST_ADDR_FIELD_NUMBER: _ClassVar[int]
    DST_PORT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    direction: str
    dst_addr: str
    dst_port: int
    bytes: int
    protocol: str
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., direction: _Optional[str] = ..., dst_addr: _Optional[str] = ..., dst_port: _Optional[int] = ..., bytes: _Optional[int] = ..., protocol: _Optional[str] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class MmapEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "addr", "length", "prot", "flags", "filename", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    addr: int
    length: int
    prot: int
    flags: int
    filename: str
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ..., flags: _Optional[int] = ..., filename: _Optional[str] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class MprotectEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "addr", "length", "prot", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    addr: int
    length: int
    prot: int
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class FileEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "path", "operation", "bytes", "non_utf8")
    class NonUtf8Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    NON_UTF8_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    path: str
    operation: str
    bytes: int
    non_utf8: _containers.ScalarMap[str, bytes]
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., path: _Optional[str] = ..., operation: _Optional[str] = ..., bytes: _Optional[int] = ..., non_utf8: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class QueryTelemetryRequest(_message.Message):
    __slots__ = ("job_uuid", "start_time", "end_time", "limit", "offset", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    start_time: int
    end_time: int
    limit: int
    offset: int
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class QueryEventsBatchedRequest(_message.Message):
    __slots__ = ("job_uuid", "start_time", "end_time", "limit", "offset", "node_id", "kind")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    start_time: int
    end_time: int
    limit: int
    offset: int
    node_id: str
    kind: EventKind
    def __init__(self, job_uuid: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., node_id: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("kind", "exec_events", "connect_events", "accept_events", "socket_data_events", "mmap_events", "mprotect_events", "file_events")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXEC_EVENTS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SOCKET_DATA_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MMAP_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MPROTECT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    FILE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    exec_events: _containers.RepeatedCompositeFieldContainer[ExecEvent]
    connect_events: _containers.RepeatedCompositeFieldContainer[ConnectEvent]
    accept_events: _containers.RepeatedCompositeFieldContainer[AcceptEvent]
    socket_data_events: _containers.RepeatedCompositeFieldContainer[SocketDataEvent]
    mmap_events: _containers.RepeatedCompositeFieldContainer[MmapEvent]
    mprotect_events: _containers.RepeatedCompositeFieldContainer[MprotectEvent]
    file_events: _containers.RepeatedCompositeFieldContainer[FileEvent]
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., exec_events: _Optional[_Iterable[_Union[ExecEvent, _Mapping]]] = ..., connect_events: _Optional[_Iterable[_Union[ConnectEvent, _Mapping]]] = ..., accept_events: _Optional[_Iterable[_Union[AcceptEvent, _Mapping]]] = ..., socket_data_events: _Optional[_Iterable[_Union[SocketDataEvent, _Mapping]]] = ..., mmap_events: _Optional[_Iterable[_Union[MmapEvent, _Mapping]]] = ..., mprotect_events: _Optional[_Iterable[_Union[MprotectEvent, _Mapping]]] = ..., file_events: _Optional[_Iterable[_Union[FileEvent, _Mapping]]] = ...) -> None: ...

class TailLogsRequest(_message.Message):
    __slots__ = ("job_uuid", "stream", "start_time", "end_time", "lines", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    stream: StreamType
    start_time: int
    end_time: int
    lines: int
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., stream: _Optional[_Union[StreamType, str]] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., lines: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class FollowLogsRequest(_message.Message):
    __slots__ = ("job_uuid", "stream", "start_time", "start_from", "tail_lines", "idle_timeout_ms", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    START_FROM_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    stream: StreamType
    start_time: int
    start_from: FollowFrom
    tail_lines: int
    idle_timeout_ms: int
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., stream: _Optional[_Union[StreamType, str]] = ..., start_time: _Optional[int] = ..., start_from: _Optional[_Union[FollowFrom, str]] = ..., tail_lines: _Optional[int] = ..., idle_timeout_ms: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class SearchLogsRequest(_message.Message):
    __slots__ = ("job_uuid", "stream", "start_time", "end_time", "limit", "offset", "node_id", "pattern", "regex", "ignore_case", "all_jobs", "jobs_since", "jobs_until", "count_only", "max_scan_bytes")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    IGNORE_CASE_FIELD_NUMBER: _ClassVar[int]
    ALL_JOBS_FIELD_NUMBER: _ClassVar[int]
    JOBS_SINCE_FIELD_NUMBER: _ClassVar[int]
    JOBS_UNTIL_FIELD_NUMBER: _ClassVar[int]
    COUNT_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_SCAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    stream: StreamType
    start_time: int
    end_time: int
    limit: int
    offset: int
    node_id: str
    pattern: str
    regex: bool
    ignore_case: bool
    all_jobs: bool
    jobs_since: int
    jobs_until: int
    count_only: bool
    max_scan_bytes: int
    def __init__(self, job_uuid: _Optional[str] = ..., stream: _Optional[_Union[StreamType, str]] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., node_id: _Optional[str] = ..., pattern: _Optional[str] = ..., regex: _Optional[bool] = ..., ignore_case: _Optional[bool] = ..., all_jobs: _Optional[bool] = ..., jobs_since: _Optional[int] = ..., jobs_until: _Optional[int] = ..., count_only: _Optional[bool] = ..., max_scan_bytes: _Optional[int] = ...) -> None: ...

class SearchLogsResponse(_message.Message):
    __slots__ = ("lines", "summary")
    LINES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    summary: SearchSummary
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., summary: _Optional[_Union[SearchSummary, _Mapping]] = ...) -> None: ...

class SearchSummary(_message.Message):
    __slots__ = ("matches", "bytes_scanned", "jobs_searched", "members_scanned")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SCANNED_FIELD_NUMBER: _ClassVar[int]
    JOBS_SEARCHED_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_SCANNED_FIELD_NUMBER: _ClassVar[int]
    matches: int
    bytes_scanned: int
    jobs_searched: int
    members_scanned: int
    def __init__(self, matches: _Optional[int] = ..., bytes_scanned: _Optional[int] = ..., jobs_searched: _Optional[int] = ..., members_scanned: _Optional[int] = ...) -> None: ...

class AggregateMetricsRequest(_message.Message):
    __slots__ = ("job_uuid", "start_time", "end_time", "step_ns", "max_points", "fields", "functions", "node_id")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    start_time: int
    end_time: int
    step_ns: int
    max_points: int
    fields: _containers.RepeatedScalarFieldContainer[str]
    functions: _containers.RepeatedScalarFieldContainer[str]
    node_id: str
    def __init__(self, job_uuid: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., step_ns: _Optional[int] = ..., max_points: _Optional[int] = ..., fields: _Optional[_Iterable[str]] = ..., functions: _Optional[_Iterable[str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class AggregateMetricsResponse(_message.Message):
    __slots__ = ("step_ns", "fields", "functions", "points", "samples")
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    step_ns: int
    fields: _containers.RepeatedScalarFieldContainer[str]
    functions: _containers.RepeatedScalarFieldContainer[str]
    points: _containers.RepeatedCompositeFieldContainer[AggregatePoint]
    samples: int
    def __init__(self, step_ns: _Optional[int] = ..., fields: _Optional[_Iterable[str]] = ..., functions: _Optional[_Iterable[str]] = ..., points: _Optional[_Iterable[_Union[AggregatePoint, _Mapping]]] = ..., samples: _Optional[int] = ...) -> None: ...

class AggregatePoint(_message.Message):
    __slots__ = ("timestamp", "count", "values")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    timestamp: int
    count: int
    values: _containers.RepeatedCompositeFieldContainer[FieldAggregate]
    def __init__(self, timestamp: _Optional[int] = ..., count: _Optional[int] = ..., values: _Optional[_Iterable[_Union[FieldAggregate, _Mapping]]] = ...) -> None: ...

class FieldAggregate(_message.Message):
    __slots__ = ("field", "avg", "min", "max", "sum", "last", "count", "p50", "p95", "p99", "rate", "has_rate")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    AVG_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    HAS_RATE_FIELD_NUMBER: _ClassVar[int]
    field: str
    avg: float
    min: float
    max: float
    sum: float
    last: float
    count: int
    p50: float
    p95: float
    p99: float
    rate: float
    has_rate: bool
    def __init__(self, field: _Optional[str] = ..., avg: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., sum: _Optional[float] = ..., last: _Optional[float] = ..., count: _Optional[int] = ..., p50: _Optional[float] = ..., p95: _Optional[float] = ..., p99: _Optional[float] = ..., rate: _Optional[float] = ..., has_rate: _Optional[bool] = ...) -> None: ...
