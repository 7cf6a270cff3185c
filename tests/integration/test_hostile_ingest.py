"""Hostile local senders against a real ``twistd joblet-persist`` (and a real listener):
half-sent frames, stalled connections, a deleted or replaced IPC socket file."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import textwrap

import treq
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from joblet_persist.services import UnixListenerService
from tests.integration.support import (
    SpawnedTwistd,
    free_port,
    gzip_dc,
    in_thread,
    log_frame,
    query_logs,
    send_in_pieces,
    short_tempdir,
    wait_for,
)

MiB = 1024 * 1024
JOB = "7d1c3f5a-0e2b-4c8d-9f10-hostile00001"
JOB_B = "7d1c3f5a-0e2b-4c8d-9f10-hostile00002"


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _send_all_then_hold(sock: socket.socket, data) -> None:
    """Blocking: send ``data`` (a shared memoryview: no copy); errors once torn down."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def _close(sockets) -> None:
    """Shut down and close ``sockets`` (again: a no-op)."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _try_send(path: str, data: bytes) -> bool:
    """Blocking: connect and send ``data``; False when the service refused or closed."""
    try:
        send_in_pieces(path, data)
    except OSError:
        return False
    return True


class HostileTwistdBase(unittest.TestCase):
    timeout = 180

    def start(self, ipc: str) -> None:
        """Start twistd with extra ``ipc`` keys (YAML lines, indented by two)."""
        self.dir = short_tempdir(self, "jh")
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.ipc_sock = os.path.join(self.dir, "ipc.sock")
        self.grpc_sock = os.path.join(self.dir, "grpc.sock")
        text = textwrap.dedent(
            f"""\
            server:
              grpcSocket: {self.grpc_sock}
              grpcAddress: ""
            ipc:
              socket: {self.ipc_sock}
            """
        ) + textwrap.indent(textwrap.dedent(ipc), "  ") + textwrap.dedent(
            f"""\
            storage:
              dataDir: {self.dir}/data
            monitoring:
              metricsPort: {self.metrics_port}
              healthPort: {self.health_port}
            """
        )
        path = os.path.join(self.dir, "persist.yml")
        with open(path, "w") as f:
            f.write(text)
        self.proc = SpawnedTwistd(self, self.dir, ["--config", path])

    async def health(self):
        try:
            response = await treq.get(
                f"http://127.0.0.1:{self.health_port}/health", persistent=False
            )
            body = await response.content()
        except Exception:
            return None
        return response.code, json.loads(body)

    async def metric(self, name: str, labels: str = "") -> float | None:
        response = await treq.get(
            f"http://127.0.0.1:{self.metrics_port}/metrics", persistent=False
        )
        text = (await response.content()).decode()
        want = name + (("{" + labels + "}") if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def wait_healthy(self):
        async def ok():
            result = await self.health()
            return result is not None and result[0] == 200

        try:
            await wait_for(ok, timeout=60, what="/health 200")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{self.proc.output}")

    async def stored_lines(self, job: str) -> list:
        """Every stored line of ``job``; none while it is not stored yet (NOT_FOUND)."""
        import grpc

        try:
            return await in_thread(query_logs, self.grpc_sock, job)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return []

    async def wait_stored(self, job: str, count: int, timeout: float = 30.0) -> list:
        found: list = []

        async def enough():
            found[:] = await self.stored_lines(job)
            return len(found) >= count

        await wait_for(enough, timeout=timeout, interval=0.2, what=f"{count} lines of {job}")
        return found

    async def stop(self):
        self.proc.signal("TERM")
        await self.proc.wait_exit(30)


def _frames(job: str, n: int, size: int = 100) -> bytes:
    return b"".join(
        log_frame(job, 1, 1_700_000_000_000_000_000 + i, i, b"%06d" % i + b"x" * size)
        for i in range(n)
    )


class HalfFrameAttackTests(HostileTwistdBase):
    async def test_half_frame_attack_is_bounded_and_memory_comes_back(self):
        """With ipc.maxPartialBytes 64 MiB: 2 connections announce 128 MiB - 16 frames (refused
        before buffering) and 16 announce 16 MiB frames, send 15 MiB and never finish.  The
        budget holds 4 of them, the other 12 are paused; RSS stays under baseline + 96 MiB;
        /health turns 503 naming the exhausted budget and /metrics shows it; a real sender
        on another connection is stored meanwhile; when the attackers disconnect, RSS returns
        to within 24 MiB of the baseline, and a legitimate 40 MiB line is then stored."""
        self.start(
            """\
            maxPartialBytes: 64MiB
            partialFrameTimeout: 120s
            """
        )
        await self.wait_healthy()
        pid = self.proc.transport.pid
        # Warm up: the first frames build the job's state, so the baseline includes it.
        await in_thread(send_in_pieces, self.ipc_sock, _frames(JOB, 200))
        await self.wait_stored(JOB, 200)
        baseline = rss_bytes(pid)

        huge_len = 128 * MiB - 16
        big_len = 16 * MiB - 16
        body = memoryview(bytes(32 * MiB))
        attackers: list = []
        self.addCleanup(_close, attackers)
        sends = []
        finished = []
        for _ in range(2):
            sock = _connect(self.ipc_sock)
            attackers.append(sock)
            data = struct.pack(">I", huge_len) + bytes(body[: 32 * MiB])
            sends.append(in_thread(_send_all_then_hold, sock, data).addCallback(finished.append))
        big_part = struct.pack(">I", big_len) + bytes(body[: 15 * MiB])
        for _ in range(16):
            sock = _connect(self.ipc_sock)
            attackers.append(sock)
            sends.append(
                in_thread(_send_all_then_hold, sock, memoryview(big_part))
                .addCallback(finished.append)
            )
        del body

        async def budget_full():
            used = await self.metric("persist_ipc_partial_bytes")
            waiting = await self.metric("persist_ipc_partial_waiting_connections")
            over = await self.metric("persist_ipc_frames_rejected_total", 'reason="over_budget"')
            return used == 4 * (big_len + 4) and waiting == 12 and over == 2

        await wait_for(budget_full, timeout=60, what="budget taken by the attackers")
        # The 4 holders and both refused senders finish sending; the paused 12 block.
        await wait_for(lambda: len(finished) == 6, timeout=60, what="holders sent 15 MiB")
        during = rss_bytes(pid)
        code, body_json = await self.health()
        self.assertEqual(code, 503)
        check = body_json["checks"]["ipc_partial_frames"]
        self.assertFalse(check["ok"])
        self.assertEqual((check["waiting_connections"], check["limit_bytes"]), (12, 64 * MiB))
        self.assertIn("ipc.maxPartialBytes", check["detail"])

        # A real sender (frames split across reads) is stored during the attack.
        await in_thread(send_in_pieces, self.ipc_sock, _frames(JOB_B, 300))
        lines = await self.wait_stored(JOB_B, 300)
        self.assertEqual([line.sequence for line in lines], list(range(300)))

        _close(attackers)
        await defer.gatherResults(sends)

        async def released():
            used = await self.metric("persist_ipc_partial_bytes")
            conns = await self.metric("persist_ipc_connections")
            return used == 0 and conns == 0

        await wait_for(released, timeout=30, what="reservations released")
        after: list = []

        def back_down():
            after[:] = [rss_bytes(pid)]
            return after[0] < baseline + 24 * MiB

        try:
            await wait_for(back_down, timeout=20, interval=0.5, what="RSS back near baseline")
        finally:
            self.addCleanup(
                print,
                f"\nhalf-frame attack RSS: baseline {baseline / MiB:.1f} MiB, during "
                f"{during / MiB:.1f} MiB, after {after[0] / MiB if after else -1:.1f} MiB",
            )
        self.assertLess(during, baseline + 96 * MiB)

        # Larger than a query message may be (server.maxMessageBytes): read from the file.
        big_line = bytes(range(256)) * (40 * MiB // 256)
        await in_thread(
            send_in_pieces, self.ipc_sock,
            log_frame(JOB_B, 2, 1_800_000_000_000_000_000, 9999, big_line),
            (65536, 1000, 300000),
        )
        await self.stop()
        stderr = os.path.join(self.dir, "data", "logs", JOB_B)
        stored = b"".join(
            gzip_dc(os.path.join(stderr, name))
            for name in sorted(os.listdir(stderr)) if name.startswith("stderr")
        )
        self.assertEqual(stored, big_line)


class SlowLorisTests(HostileTwistdBase):
    async def test_stalled_connections_closed_then_real_sender_stored(self):
        """ipc.maxConnections 8 taken by connections that each sent 4 bytes and went silent:
        a real sender is refused and /health says so (503, ipc_connections with the count);
        after ipc.partialFrameTimeout (6 s) the silent ones are closed and counted as
        stalled_frame, and the real sender then connects and its frames are stored."""
        self.start(
            """\
            maxConnections: 8
            partialFrameTimeout: 6s
            """
        )
        await self.wait_healthy()
        loris = []
        for _ in range(8):
            sock = _connect(self.ipc_sock)
            sock.sendall(struct.pack(">I", 100))
            loris.append(sock)
        self.addCleanup(_close, loris)

        async def all_open():
            return await self.metric("persist_ipc_connections") == 8

        await wait_for(all_open, timeout=20, what="8 connections open")
        # Refused: the service closes the connection at once (what was sent is dropped).
        await in_thread(_try_send, self.ipc_sock, _frames(JOB, 5))

        async def refused_in_health():
            result = await self.health()
            if result is None or result[0] != 503:
                return False
            check = result[1]["checks"]["ipc_connections"]
            return not check["ok"] and check["refused_total"] >= 1 and check

        check = await wait_for(refused_in_health, timeout=20, what="/health shows refusals")
        self.assertEqual(check["max"], 8)
        self.assertIn("ipc.maxConnections", check["detail"])

        async def stalled_closed():
            stalled = await self.metric(
                "persist_ipc_frames_rejected_total", 'reason="stalled_frame"'
            )
            return stalled == 8

        await wait_for(stalled_closed, timeout=20, what="stalled connections closed")
        for sock in loris:
            self.assertEqual(sock.recv(10), b"", "the service closed the silent connection")
        self.assertTrue(await in_thread(_try_send, self.ipc_sock, _frames(JOB, 50)))
        lines = await self.wait_stored(JOB, 50)
        self.assertEqual([line.sequence for line in lines][-50:], list(range(50)))
        await self.stop()


class SocketPathTests(HostileTwistdBase):
    async def test_deleted_socket_recreated_and_foreign_file_left_alone(self):
        """Deleting the IPC socket file: the health probe recreates it (same path, mode
        0600, counted) and new connections are stored again.  Replacing it with another
        file: /health turns 503 naming the path, and the file is neither replaced nor
        deleted, not even at shutdown."""
        self.start("")
        await self.wait_healthy()
        os.unlink(self.ipc_sock)

        async def recreated():
            result = await self.health()
            return (
                os.path.exists(self.ipc_sock)
                and result is not None
                and result[0] == 200
                and "recreated 1 times" in result[1]["checks"]["ingest"]["detail"]
            )

        await wait_for(recreated, timeout=30, what="socket recreated")
        self.assertEqual(stat.S_IMODE(os.lstat(self.ipc_sock).st_mode), 0o600)
        self.assertEqual(await self.metric("persist_ipc_socket_recreated_total"), 1)
        await in_thread(send_in_pieces, self.ipc_sock, _frames(JOB, 20))
        await self.wait_stored(JOB, 20)

        os.unlink(self.ipc_sock)
        with open(self.ipc_sock, "w") as f:
            f.write("not yours\n")

        async def reported():
            result = await self.health()
            return result is not None and result[0] == 503 and result[1]

        body = await wait_for(reported, timeout=30, what="/health 503 for a foreign file")
        self.assertFalse(body["checks"]["ingest"]["ok"])
        self.assertIn(self.ipc_sock, body["checks"]["ingest"]["detail"])
        await self.stop()
        with open(self.ipc_sock) as f:
            self.assertEqual(f.read(), "not yours\n")


class _Echo(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hi")
        self.transport.loseConnection()


class ListenerPathCheckTests(unittest.TestCase):
    """UnixListenerService's path check on a real reactor and a real socket."""

    timeout = 20

    def setUp(self):
        self.dir = short_tempdir(self, "jl")
        self.path = os.path.join(self.dir, "ipc.sock")
        factory = protocol.Factory.forProtocol(_Echo)
        self.recreations = []
        self.svc = UnixListenerService(reactor, "ipc", self.path, factory, mode=0o600,
                                       on_recreated=lambda: self.recreations.append(1))
        self.svc.startService()
        self.addCleanup(lambda: self.svc.stopService() if self.svc.running else None)

    def check_path(self):
        thd, apply = self.svc.path_probe()
        apply(thd())

    def connects(self) -> bool:
        try:
            sock = _connect(self.path)
        except OSError:
            return False
        sock.close()
        return True

    async def test_deleted_socket_recreated(self):
        """A deleted socket file is recreated at the same path and mode on the next check,
        accepts connections, and is removed at stop; an intact one is left as it is."""
        identity = self.svc.identity
        self.check_path()
        self.assertEqual((self.svc.identity, self.recreations), (identity, []))
        os.unlink(self.path)
        self.assertFalse(self.connects())
        self.check_path()
        self.assertEqual(self.recreations, [1])
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o600)
        self.assertTrue(self.connects())
        ok, detail = self.svc.check()
        self.assertTrue(ok)
        self.assertIn("recreated 1 times", detail)
        await self.svc.stopService()
        self.assertFalse(os.path.exists(self.path))

    async def test_old_port_closing_leaves_the_recreated_socket(self):
        """After a recreation the old port closes without removing the new socket file,
        which keeps accepting connections."""
        old = self.svc.port
        os.unlink(self.path)
        self.check_path()
        self.assertIsNot(self.svc.port, old)
        await old.deferred  # the old port's connectionLost has run
        self.assertTrue(os.path.exists(self.path))
        self.assertTrue(self.connects())

    async def test_stock_port_removes_whatever_is_at_its_path(self):
        """The reason the listener is not UNIXServerEndpoint: the port the endpoint builds
        (twisted.internet.unix.Port) unlinks the file at its path when it closes, even a
        socket another listener bound there after the first was deleted."""
        from twisted.internet.endpoints import UNIXServerEndpoint

        path = os.path.join(self.dir, "e.sock")
        port = await UNIXServerEndpoint(reactor, path, mode=0o600).listen(
            protocol.Factory.forProtocol(_Echo))
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(path)
        other.listen(1)
        await port.stopListening()
        self.assertFalse(os.path.exists(path))

    async def test_foreign_file_reported_not_stolen(self):
        """Another file at the path is reported (check fails naming the path), never
        replaced, and not deleted at stop."""
        os.unlink(self.path)
        os.symlink("/nonexistent-target", self.path)
        self.check_path()
        ok, detail = self.svc.check()
        self.assertFalse(ok)
        self.assertIn(self.path, detail)
        self.assertEqual(self.recreations, [])
        self.assertTrue(os.path.islink(self.path))
        await self.svc.stopService()
        self.assertTrue(os.path.islink(self.path))
