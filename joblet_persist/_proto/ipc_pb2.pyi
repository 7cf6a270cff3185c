from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_UNSPECIFIED: _ClassVar[MessageType]
    MESSAGE_TYPE_LOG: _ClassVar[MessageType]
    MESSAGE_TYPE_METRIC: _ClassVar[MessageType]
    MESSAGE_TYPE_EXEC_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_CONNECT_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_ACCEPT_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_SOCKET_DATA_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_MMAP_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_MPROTECT_EVENT: _ClassVar[MessageType]
    MESSAGE_TYPE_FILE_EVENT: _ClassVar[MessageType]

class StreamType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_TYPE_UNSPECIFIED: _ClassVar[StreamType]
    STREAM_TYPE_STDOUT: _ClassVar[StreamType]
    STREAM_TYPE_STDERR: _ClassVar[StreamType]
MESSAGE_TYPE_UNSPECIFIED: MessageType
MESSAGE_TYPE_LOG: MessageType
MESSAGE_TYPE_METRIC: MessageType
MESSAGE_TYPE_EXEC_EVENT: MessageType
MESSAGE_TYPE_CONNECT_EVENT: MessageType
MESSAGE_TYPE_ACCEPT_EVENT: MessageType
MESSAGE_TYPE_SOCKET_DATA_EVENT: MessageType
MESSAGE_TYPE_MMAP_EVENT: MessageType
MESSAGE_TYPE_MPROTECT_EVENT: MessageType
MESSAGE_TYPE_FILE_EVENT: MessageType
STREAM_TYPE_UNSPECIFIED: StreamType
STREAM_TYPE_STDOUT: StreamType
STREAM_TYPE_STDERR: StreamType

class IPCMessage(_message.Message):
    __slots__ = ("version", "type", "job_uuid", "timestamp", "sequence", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    type: MessageType
    job_uuid: str
    timestamp: int
    sequence: int
    data: bytes
    def __init__(self, version: _Optional[int] = ..., type: _Optional[_Union[MessageType, str]] = ..., job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

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

class ExecEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "ppid", "uid", "gid", "comm", "filename", "args")
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
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., comm: _Optional[str] = ..., filename: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...

class ConnectEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "src_addr", "src_port", "dst_addr", "dst_port", "protocol")
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
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., src_addr: _Optional[str] = ..., src_port: _Optional[int] = ..., dst_addr: _Optional[str] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class AcceptEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "src_addr", "src_port", "dst_addr", "dst_port", "protocol")
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
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., src_addr: _Optional[str] = ..., src_port: _Optional[int] = ..., dst_addr: _Optional[str] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class SocketDataEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "direction", "addr", "port", "protocol", "bytes")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    direction: str
    addr: str
    port: int
    protocol: str
    bytes: int
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., direction: _Optional[str] = ..., addr: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class MmapEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "addr", "length", "prot", "flags", "filename")
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
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ..., flags: _Optional[int] = ..., filename: _Optional[str] = ...) -> None: ...

class MprotectEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "addr", "length", "prot")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    addr: int
    length: int
    prot: int
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ...) -> None: ...

class FileEvent(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "path", "operation", "bytes")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    job_uuid: str
    timestamp: int
    sequence: int
    pid: int
    comm: str
    path: str
    operation: str
    bytes: int
    def __init__(self, job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[str] = ..., path: _Optional[str] = ..., operation: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...
