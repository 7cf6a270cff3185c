"""FollowLogs' pass-through serializer in a real gRPC server (GrpcServerService, Unix socket).

The servicer's ``follow_logs_serialized`` yields serialized LogLineBatches; the
server must send those bytes unchanged, to a stock generated stub (which
registers its methods) and to a client that calls the method by name (which
does not), while every other RPC keeps its generated handler.
"""

from __future__ import annotations

import grpc
from twisted.internet import defer, threads

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.grpc_server import PERSIST_SERVICE_NAME
from tests.integration.test_grpc import JOB, GrpcTestBase

FOLLOW_METHOD = f"/{PERSIST_SERVICE_NAME}/FollowLogs"


def _batch(*lines) -> pb.LogLineBatch:
    return pb.LogLineBatch(lines=[
        pb.LogLine(job_uuid=JOB, stream=stream, timestamp=ts, sequence=seq, content=content)
        for stream, ts, seq, content in lines
    ])


FIRST = _batch((1, 100, 1, b"out1\n"), (2, 150, 2, b"err\xff\n"))
SECOND = _batch((1, 300, 3, b"out3"))
# Two serialized batches joined: what a follower that was behind is sent.
SENT = [FIRST.SerializeToString(), FIRST.SerializeToString() + SECOND.SerializeToString()]


class FollowWireTests(GrpcTestBase):
    timeout = 30

    def make_servicer(self, **kw):
        servicer = super().make_servicer(**kw)
        calls = self.calls = []

        def follow_logs_serialized(request, context):
            calls.append((request.job_uuid, getattr(context, "joblet_listener", None)))
            yield from SENT

        # Only the serialized form exists: a call reaching FollowLogs itself would fail.
        servicer.follow_logs_serialized = follow_logs_serialized
        servicer.FollowLogs = None
        return servicer

    @defer.inlineCallbacks
    def test_stock_stub_decodes_the_passed_through_bytes(self):
        """A generated stub's FollowLogs gets the servicer's bytes as LogLineBatches: the
        joined bytes decode to one message with the lines of both batches, and every
        message is byte for byte what the generated code serializes for it."""
        self.serve()
        stub = self.stub()
        got = yield threads.deferToThread(
            lambda: list(stub.FollowLogs(pb.FollowLogsRequest(job_uuid=JOB), timeout=10)))
        self.assertEqual(got, [FIRST, pb.LogLineBatch(lines=[*FIRST.lines, *SECOND.lines])])
        self.assertEqual([m.SerializeToString() for m in got], SENT)
        self.assertEqual(self.calls, [(JOB, "admin-socket")])

    @defer.inlineCallbacks
    def test_unregistered_call_gets_the_same_bytes(self):
        """A client calling the method by name (no registered method: the generic handlers
        answer) receives exactly the servicer's bytes; other RPCs are unchanged."""
        self.serve()
        channel = self.channel()
        call = channel.unary_stream(FOLLOW_METHOD,
                                    request_serializer=pb.FollowLogsRequest.SerializeToString,
                                    response_deserializer=None)
        raw = yield threads.deferToThread(
            lambda: list(call(pb.FollowLogsRequest(job_uuid=JOB), timeout=10)))
        self.assertEqual(raw, SENT)
        ping = channel.unary_unary(f"/{PERSIST_SERVICE_NAME}/Ping",
                                   request_serializer=pb.PingRequest.SerializeToString,
                                   response_deserializer=pb.PingResponse.FromString)
        pong = yield threads.deferToThread(lambda: ping(pb.PingRequest(), timeout=10))
        self.assertTrue(pong.healthy)
        code = yield self.code_of(self.stub().GetJobInfo, pb.GetJobInfoRequest(job_uuid=JOB),
                                  timeout=10)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
