"""gRPC server reflection ``grpc.reflection.v1`` next to ``v1alpha``.

grpcio-reflection (up to 1.85 at least, grpc/grpc#38576) serves only
``grpc.reflection.v1alpha.ServerReflection``; current grpcurl and IDE clients ask for
``grpc.reflection.v1.ServerReflection`` first.  The v1 protocol is v1alpha under another
package name: the same messages, field for field, so the same bytes on the wire.  So:

- ``v1_file_descriptor`` derives v1's file from v1alpha's (package and type names
  rewritten) and adds it to the descriptor pool, so reflection can describe v1 itself;
- ``enable`` serves v1's ServerReflectionInfo with grpcio-reflection's own servicer,
  whose v1alpha messages (de)serialize v1's bytes unchanged.

Runs at server construction (reactor thread); the servicer runs on gRPC threads.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_ALPHA = "grpc.reflection.v1alpha"
_V1 = "grpc.reflection.v1"


def v1_file_descriptor(pool=None):
    """v1's FileDescriptor, added to ``pool`` (the default pool) on first use."""
    pool = pool if pool is not None else descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = _V1
    proto.ClearField("options")

    def rename(type_name: str) -> str:
        return type_name.replace(f".{_ALPHA}.", f".{_V1}.", 1)

    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


def enable(service_names, server: grpc.Server) -> None:
    """Serve reflection v1alpha and v1 on ``server`` for ``service_names`` (both
    reflection services are listed too)."""
    v1_file_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
