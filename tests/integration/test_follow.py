"""FollowLogs and TailLogs against a real ``twistd joblet-persist`` (real sockets, threads, gRPC).

A sender thread writes LOG frames to the IPC socket while a follower thread
reads FollowLogs; the follower must receive exactly what was sent, in order,
without gap or duplicate at the hand-off from stored to live lines.  SIGTERM
in the middle ends the follower cleanly (UNAVAILABLE, within the grace period)
with a prefix of what was sent.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import grpc
from twisted.internet import defer
from twisted.trial import unittest

from joblet_persist._proto import persist_pb2, persist_pb2_grpc
from tests.integration.support import (
    SpawnedTwistd,
    in_thread,
    log_frame,
    ping,
    short_tempdir,
    wait_for,
    write_service_config,
)

JOB = "0f01ab7e-6c1d-4e2f-8a3b-00000000f011"


def _lines(n: int, first: int = 0) -> list[tuple]:
    """(stream, timestamp, sequence, content): both streams, a run of each in turn."""
    out = []
    for i in range(first, first + n):
        stream = 1 if (i // 7) % 2 == 0 else 2
        out.append((stream, 1_800_000_000_000_000_000 + i, i, b"line %d of the job\n" % i))
    return out


class _Sender:
    """Writes lines to the IPC socket in small groups from a thread of its own."""

    def __init__(self, path: str, lines: list, group: int = 25, pause: float = 0.002):
        self.path, self.lines, self.group, self.pause = path, lines, group, pause
        self.sent = 0
        self.halfway = threading.Event()
        self.stop = threading.Event()

    def run(self) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(self.path)
            for i in range(0, len(self.lines), self.group):
                if self.stop.is_set():
                    break
                part = self.lines[i:i + self.group]
                sock.sendall(b"".join(log_frame(JOB, *rec) for rec in part))
                self.sent = i + len(part)
                if self.sent >= len(self.lines) // 2:
                    self.halfway.set()
                # Paced so that the follower starts while lines still arrive.
                time.sleep(self.pause)
        self.halfway.set()
        return self.sent


class _Follower:
    """Reads FollowLogs on a thread of its own until it has ``want`` lines or the call ends."""

    def __init__(self, sock: str, want: int, last=None, **request):
        self.sock, self.want, self.last = sock, want, last
        self.request = persist_pb2.FollowLogsRequest(job_uuid=JOB, **request)
        self.got: list[tuple] = []
        self.code = None
        self.details = ""
        self.started = threading.Event()

    def run(self):
        with grpc.insecure_channel(f"unix:{self.sock}") as channel:
            call = persist_pb2_grpc.PersistServiceStub(channel).FollowLogs(self.request,
                                                                           timeout=60)
            self.started.set()
            try:
                for batch in call:
                    self.got.extend((m.stream, m.timestamp, m.sequence, m.content)
                                    for m in batch.lines)
                    if len(self.got) >= self.want or (self.got and self.got[-1] == self.last):
                        call.cancel()
                        break
                self.code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                self.code, self.details = e.code(), e.details()
        return self.got


class FollowTwistdTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.dir = short_tempdir(self)
        self.ipc = os.path.join(self.dir, "ipc.sock")
        self.grpc = os.path.join(self.dir, "grpc.sock")

    @defer.inlineCallbacks
    def start(self, **sections):
        config = write_service_config(self.dir, {
            "writer": {"flushInterval": "200ms", "batchMaxMessages": 50},
            "server": {"shutdownGrace": "5s"},
            **sections,
        })
        self.proc = SpawnedTwistd(self, self.dir, ["--config", config])
        yield wait_for(lambda: in_thread(ping, self.grpc), what="the service to answer Ping")

    @defer.inlineCallbacks
    def test_follow_while_written_gets_exactly_what_was_sent(self):
        """Followers started before and while a job is written (from the start, and from
        the last lines) receive exactly the lines sent, in order, once each."""
        yield self.start()
        sent = _lines(3000)
        # Some lines stored before anyone follows, so that the job exists.
        first = _Sender(self.ipc, sent[:200], group=200, pause=0)
        yield in_thread(first.run)
        sender = _Sender(self.ipc, sent[200:])
        sending = in_thread(sender.run)
        yield in_thread(sender.halfway.wait, 30)
        from_start = _Follower(self.grpc, len(sent))
        from_tail = _Follower(self.grpc, len(sent), last=sent[-1],
                              start_from=persist_pb2.FOLLOW_FROM_TAIL, tail_lines=10)
        following = [in_thread(from_start.run), in_thread(from_tail.run)]
        yield sending
        yield defer.gatherResults(following)
        self.assertEqual(from_start.got, sent)
        # The tail follower started at some line k: it got the 10 before k, then the rest.
        self.assertEqual(from_tail.got, sent[len(sent) - len(from_tail.got):])
        self.assertGreaterEqual(len(from_tail.got), 10)
        yield self.stop()

    @defer.inlineCallbacks
    def test_sigterm_ends_followers_cleanly(self):
        """SIGTERM while lines are sent and followed: every follower ends with UNAVAILABLE
        well within the grace period, having received a prefix of what was sent, and the
        process exits cleanly."""
        yield self.start()
        sent = _lines(100_000)
        sender = _Sender(self.ipc, sent, group=50, pause=0.001)
        sending = in_thread(sender.run)
        yield wait_for(lambda: sender.sent >= 500, what="lines to be sent")
        followers = [_Follower(self.grpc, len(sent)) for _ in range(3)]
        following = [in_thread(f.run) for f in followers]
        yield wait_for(lambda: all(len(f.got) >= 500 for f in followers),
                       what="followers to receive lines")
        stopped_at = time.monotonic()
        self.proc.signal("TERM")
        yield defer.gatherResults(following)
        ended_in = time.monotonic() - stopped_at
        sender.stop.set()
        yield sending.addErrback(lambda _f: None)  # the socket may close under the sender
        code = yield self.proc.wait_exit(60)
        self.assertIn(code, (0, -signal.SIGTERM), self.proc.output)
        for f in followers:
            self.assertEqual(f.code, grpc.StatusCode.UNAVAILABLE, f.details)
            self.assertIn("shutting down", f.details)
            self.assertEqual(f.got, sent[:len(f.got)])
        self.assertLess(ended_in, 5.0)

    @defer.inlineCallbacks
    def stop(self):
        self.proc.signal("TERM")
        code = yield self.proc.wait_exit(30)
        self.assertIn(code, (0, -signal.SIGTERM), self.proc.output)

    @defer.inlineCallbacks
    def test_tail_over_grpc(self):
        """TailLogs returns the last N lines of a stored job over the real socket."""
        yield self.start()
        sent = _lines(500)
        yield in_thread(_Sender(self.ipc, sent, group=100, pause=0).run)

        def tail(stub, _t):
            request = persist_pb2.TailLogsRequest(job_uuid=JOB, lines=25)
            try:
                return [(m.stream, m.timestamp, m.sequence, m.content)
                        for b in stub.TailLogs(request, timeout=10) for m in b.lines]
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.NOT_FOUND:  # not flushed yet
                    raise
                return None

        from tests.integration.support import grpc_call

        yield wait_for(lambda: in_thread(grpc_call, self.grpc, tail).addCallback(
            lambda got: got == sent[-25:]), what="the tail to hold the last lines")
        yield self.stop()
