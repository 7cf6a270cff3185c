"""gRPC server reflection v1 and v1alpha on a real gRPC server (reflection_v1.py)."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from joblet_persist import reflection_v1
from joblet_persist.grpc_server import PERSIST_SERVICE_NAME
from tests.test_cli import CliTestBase


def _v1(name):
    """A v1 message class from the descriptor pool (not grpcio-reflection's v1alpha ones)."""
    reflection_v1.v1_file_descriptor()
    pool = descriptor_pool.Default()
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}"))


class ReflectionTests(CliTestBase):
    def ask(self, version, **request):
        """One ServerReflectionInfo exchange over reflection ``version``."""
        if version == "v1":
            req_cls, resp_cls = _v1("ServerReflectionRequest"), _v1("ServerReflectionResponse")
        else:
            req_cls = reflection_pb2.ServerReflectionRequest
            resp_cls = reflection_pb2.ServerReflectionResponse
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
            (response,) = list(call(iter([req_cls(**request)]), timeout=5))
        return response

    def test_v1_and_v1alpha_list_the_services(self):
        """Both reflection versions answer list_services with the query API, health and
        both reflection services."""
        self.serve()
        for version in ("v1", "v1alpha"):
            response = self.ask(version, list_services="")
            names = {s.name for s in response.list_services_response.service}
            self.assertEqual(
                names,
                {PERSIST_SERVICE_NAME, "grpc.health.v1.Health",
                 "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection"},
                version,
            )

    def test_v1_describes_the_api_and_itself(self):
        """v1 file_containing_symbol returns persist.proto for the query API, and v1's own
        file (package grpc.reflection.v1) for the v1 service."""
        self.serve()
        response = self.ask("v1", file_containing_symbol=PERSIST_SERVICE_NAME)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in response.file_descriptor_response.file_descriptor_proto]
        services = {s.name for f in files for s in f.service}
        self.assertIn("PersistService", services)
        response = self.ask("v1", file_containing_symbol=reflection_v1.SERVICE_NAME)
        (own,) = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                  for raw in response.file_descriptor_response.file_descriptor_proto]
        self.assertEqual((own.name, own.package), (reflection_v1.V1_FILE, "grpc.reflection.v1"))
        method = own.service[0].method[0]
        self.assertEqual(method.input_type, ".grpc.reflection.v1.ServerReflectionRequest")

    def test_v1alpha_stub_still_works(self):
        """grpcio-reflection's own v1alpha stub is answered as before."""
        self.serve()
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (response,) = list(stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        self.assertTrue(response.list_services_response.service)
