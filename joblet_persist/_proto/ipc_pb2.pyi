from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
