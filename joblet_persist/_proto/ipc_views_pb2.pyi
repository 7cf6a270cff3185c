from . import ipc_pb2 as _ipc_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
