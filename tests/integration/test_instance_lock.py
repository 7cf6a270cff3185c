"""One instance per data directory, with real ``twistd -n joblet-persist`` processes.

Two services with the same data directory but their own sockets and ports: the second
refuses to start, naming the first; the first keeps ingesting and serving; once the first
is killed with SIGKILL (no cleanup of its own), the kernel has released its lock and a new
instance starts on the same data directory.
"""

from __future__ import annotations

import os
import signal
import textwrap

from twisted.trial import unittest

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.services import flock_holders, read_proc_locks
from tests.integration.support import TwistdProcess, free_port, short_tempdir, wait_for
from tests.integration.test_observability import IPCClient, get_health, in_thread, log_body

JOB = "10c410c4-0000-4111-8222-933333333333"


class _Instance:
    """The configuration of one service: its own sockets and ports, a shared data dir."""

    def __init__(self, testcase, data_dir: str):
        self.dir = short_tempdir(testcase, "jplock")
        self.grpc_sock = os.path.join(self.dir, "g.sock")
        self.ipc_sock = os.path.join(self.dir, "i.sock")
        self.health_port = free_port()
        self.config = os.path.join(self.dir, "persist.yml")
        with open(self.config, "w") as f:
            f.write(textwrap.dedent(
                f"""\
                server:
                  grpcSocket: {self.grpc_sock}
                  grpcAddress: ""
                ipc:
                  socket: {self.ipc_sock}
                storage:
                  dataDir: {data_dir}
                  retention:
                    minFreeBytes: 0
                writer:
                  flushInterval: 50ms
                monitoring:
                  metricsPort: {free_port()}
                  healthPort: {self.health_port}
                """
            ))


class InstanceLockTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.data_dir = os.path.join(short_tempdir(self, "jpdata"), "data")

    async def start(self, inst: _Instance) -> TwistdProcess:
        proc = TwistdProcess(self, inst.dir, ["--config", inst.config])

        async def healthy():
            if proc.proto.ended.called:
                return True
            try:
                code, _ = await get_health(inst.health_port)
            except Exception:
                return False
            return code == 200

        await wait_for(healthy, timeout=40, what="/health 200")
        if proc.proto.ended.called:
            self.fail(f"service exited at start; output:\n{proc.output}")
        return proc

    async def lines(self, inst: _Instance) -> list[bytes]:
        found = await in_thread(inst.grpc_sock, lambda stub: list(
            stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), timeout=10)))
        return [line.content for line in found]

    async def send_and_see(self, inst: _Instance, seq: int, expected: list[bytes]) -> None:
        client = await IPCClient.connect(self, inst.ipc_sock)
        client.send(log_body(JOB, seq, b"line %d\n" % seq))
        await client.close()

        async def stored():
            try:
                return await self.lines(inst) == expected
            except Exception:
                return False

        await wait_for(stored, timeout=20, what=f"line {seq} stored and queryable")

    async def test_second_instance_refused_until_the_first_is_killed(self):
        """A second twistd with the same --data-dir but other sockets and ports exits non-zero
        at once with one log line naming the data directory and the first's PID and command
        line, no traceback, and creates none of its sockets; the first keeps ingesting and
        serving.  After the first is SIGKILLed, a new instance takes the lock and serves
        what the first stored."""
        a, b = _Instance(self, self.data_dir), _Instance(self, self.data_dir)
        first = await self.start(a)
        pid = first.transport.pid
        st = os.stat(self.data_dir)
        self.assertEqual(flock_holders(read_proc_locks(), st.st_dev, st.st_ino), [pid])
        await self.send_and_see(a, 1, [b"line 1\n"])

        second = TwistdProcess(self, b.dir, ["--config", b.config, "--data-dir", self.data_dir])
        code = await second.wait_exit(40)
        self.assertNotEqual(code, 0, second.output)
        refused = [line for line in second.output.splitlines() if "startup refused" in line]
        self.assertEqual(len(refused), 1, second.output)
        self.assertIn(f"data directory {self.data_dir} is in use by pid {pid} (", refused[0])
        self.assertIn(f"joblet-persist --config {a.config})", refused[0])
        self.assertNotIn("Traceback", second.output)
        self.assertFalse(os.path.exists(b.ipc_sock), "the refused instance created its socket")
        self.assertFalse(os.path.exists(b.grpc_sock), "the refused instance created its socket")

        # The first one is undisturbed: same sockets, still ingesting and answering.
        self.assertFalse(first.proto.ended.called, first.output)
        self.assertTrue(os.path.exists(a.ipc_sock) and os.path.exists(a.grpc_sock))
        await self.send_and_see(a, 2, [b"line 1\n", b"line 2\n"])

        first.signal("KILL")
        self.assertEqual(await first.wait_exit(20), -signal.SIGKILL)
        third = await self.start(b)
        self.assertEqual(await self.lines(b), [b"line 1\n", b"line 2\n"])
        await self.send_and_see(b, 3, [b"line 1\n", b"line 2\n", b"line 3\n"])
        st = os.stat(self.data_dir)
        self.assertEqual(flock_holders(read_proc_locks(), st.st_dev, st.st_ino),
                         [third.transport.pid])
        third.signal("TERM")
        self.assertIn(await third.wait_exit(20), (0, -signal.SIGTERM), third.output)
        self.assertNotIn("Traceback", third.output)
