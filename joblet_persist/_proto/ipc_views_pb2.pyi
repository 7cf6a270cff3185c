from . import ipc_pb2 as _ipc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogFrame(_message.Message):
    __slots__ = ("version", "type", "job_uuid", "timestamp", "sequence", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    type: _ipc_pb2.MessageType
    job_uuid: str
    timestamp: int
    sequence: int
    data: _ipc_pb2.LogLine
    def __init__(self, version: _Optional[int] = ..., type: _Optional[_Union[_ipc_pb2.MessageType, str]] = ..., job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., data: _Optional[_Union[_ipc_pb2.LogLine, _Mapping]] = ...) -> None: ...

class MetricFrame(_message.Message):
    __slots__ = ("version", "type", "job_uuid", "timestamp", "sequence", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    type: _ipc_pb2.MessageType
    job_uuid: str
    timestamp: int
    sequence: int
    data: _ipc_pb2.Metric
    def __init__(self, version: _Optional[int] = ..., type: _Optional[_Union[_ipc_pb2.MessageType, str]] = ..., job_uuid: _Optional[str] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., data: _Optional[_Union[_ipc_pb2.Metric, _Mapping]] = ...) -> None: ...

class ExecEventView(_message.Message):
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
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    ppid: int
    uid: int
    gid: int
    comm: bytes
    filename: bytes
    args: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., comm: _Optional[bytes] = ..., filename: _Optional[bytes] = ..., args: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ConnectEventView(_message.Message):
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
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    comm: bytes
    src_addr: bytes
    src_port: int
    dst_addr: bytes
    dst_port: int
    protocol: bytes
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[bytes] = ..., src_addr: _Optional[bytes] = ..., src_port: _Optional[int] = ..., dst_addr: _Optional[bytes] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[bytes] = ...) -> None: ...

class SocketDataEventView(_message.Message):
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
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    comm: bytes
    direction: bytes
    addr: bytes
    port: int
    protocol: bytes
    bytes: int
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[bytes] = ..., direction: _Optional[bytes] = ..., addr: _Optional[bytes] = ..., port: _Optional[int] = ..., protocol: _Optional[bytes] = ..., bytes: _Optional[int] = ...) -> None: ...

class MmapEventView(_message.Message):
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
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    comm: bytes
    addr: int
    length: int
    prot: int
    flags: int
    filename: bytes
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[bytes] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ..., flags: _Optional[int] = ..., filename: _Optional[bytes] = ...) -> None: ...

class MprotectEventView(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "addr", "length", "prot")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    comm: bytes
    addr: int
    length: int
    prot: int
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[bytes] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ...) -> None: ...

class FileEventView(_message.Message):
    __slots__ = ("job_uuid", "timestamp", "sequence", "pid", "comm", "path", "operation", "bytes")
    JOB_UUID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    job_uuid: bytes
    timestamp: int
    sequence: int
    pid: int
    comm: bytes
    path: bytes
    operation: bytes
    bytes: int
    def __init__(self, job_uuid: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., sequence: _Optional[int] = ..., pid: _Optional[int] = ..., comm: _Optional[bytes] = ..., path: _Optional[bytes] = ..., operation: _Optional[bytes] = ..., bytes: _Optional[int] = ...) -> None: ...
