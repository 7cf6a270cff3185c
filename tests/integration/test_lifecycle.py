"""Lifecycle end to end: deletion racing a flush, the retention timer, SIGHUP, a second instance.

The first two classes run the whole service in-process on the test's reactor (real sockets,
threads and files); the last starts real ``twistd -n joblet-persist`` children.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import textwrap

import grpc
from twisted.internet import defer, task
from twisted.trial import unittest

from joblet_persist import __version__
from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.retention import RetentionPolicy
from joblet_persist.storage.local import thd_append_logs
from tests.integration.support import TwistdProcess, free_port, short_tempdir, wait_for
from tests.integration.test_observability import (
    IPCClient,
    ReadOnlyDataDir,
    get_health,
    in_thread,
    log_body,
    rpc_code,
    scrape,
    seed_legacy_job,
    service_config,
    start_service,
    value,
)

X = "7a7a7a7a-0000-4111-8222-933333333333"
OTHER = "7b7b7b7b-0000-4111-8222-933333333333"
IDLE = "1d1e1d1e-0000-4111-8222-933333333333"
ACTIVE = "ac7ac7ac-0000-4111-8222-933333333333"


class _GatedRunner:
    """Wraps the storage's thread runner; holds appends to the log files of one job.

    While ``job`` is set, each ``thd_append_logs`` for a path of that job waits for
    ``release()`` before it goes to the pool: the batch stays in flight as long as the test
    wants.  Reactor thread.
    """

    def __init__(self, run):
        self._run = run
        self.job = None
        self.held: list[defer.Deferred] = []

    def __call__(self, f, *args, **kwargs):
        if self.job is not None and f is thd_append_logs and f"/{self.job}/" in args[0]:
            d = defer.Deferred()
            d.addCallback(lambda _: self._run(f, *args, **kwargs))
            self.held.append(d)
            return d
        return self._run(f, *args, **kwargs)

    def release(self) -> None:
        self.job = None
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


def _decoded_logs(data_dir: str, job_id: str) -> bytes:
    """Everything in the job's stdout segment files, decompressed (what zcat prints)."""
    directory = os.path.join(data_dir, "logs", job_id)
    if not os.path.isdir(directory):
        return b""
    out = b""
    for name in sorted(os.listdir(directory)):
        if name.startswith("stdout"):
            with open(os.path.join(directory, name), "rb") as f:
                out += gzip.decompress(f.read())
    return out


class DeletionRaceTests(unittest.TestCase):
    timeout = 60

    async def _race(self, send_after_delete: list[bytes]):
        """Write old data for X, hold the append of a second batch, DeleteJob while it is
        in flight, optionally send ``send_after_delete`` meanwhile, then let it go.

        Returns (root, data_dir, grpc socket, DeleteJobResponse).
        """
        directory = short_tempdir(self)
        root = await start_service(self, service_config(directory))
        parts = root.components
        storage, writer = parts["storage"], parts["writer"]
        gate = _GatedRunner(storage._run)
        storage._run = gate
        self.addCleanup(gate.release)
        grpc_sock = os.path.join(directory, "g.sock")

        client = await IPCClient.connect(self, parts["ingest"].path)
        client.send(*[log_body(X, i, b"old-%d\n" % i) for i in range(5)])
        client.send(*[log_body(OTHER, i, b"other-%d\n" % i) for i in range(4)])
        await wait_for(lambda: writer.messages_written == 9, what="old data appended")

        gate.job = X
        client.send(*[log_body(X, 10 + i, b"mid-%d\n" % i) for i in range(3)])
        await wait_for(lambda: gate.held, what="the append of the second batch")

        original = writer.discard_job
        discarding = defer.Deferred()

        def discard(job_id):
            d = original(job_id)
            if not discarding.called:
                discarding.callback(job_id)
            return d

        writer.discard_job = discard
        deleted = in_thread(
            grpc_sock, lambda stub: stub.DeleteJob(pb.DeleteJobRequest(job_uuid=X), timeout=20)
        )
        self.assertEqual(await discarding, X)
        self.assertFalse(deleted.called, "DeleteJob returned with an append still in flight")
        if send_after_delete:
            received = writer.messages_received + len(send_after_delete)
            client.send(*send_after_delete)
            await wait_for(lambda: writer.messages_received == received, what="new data")
        gate.release()
        response = await deleted
        expected = 12 + len(send_after_delete)
        await wait_for(lambda: writer.messages_written == expected and not writer.busy_jobs(),
                       what="everything appended")
        return root, storage.data_dir, grpc_sock, response

    async def _agree(self, root, grpc_sock):
        """The job index (in memory and on disk), GetStats, ListJobs and /metrics agree."""
        storage = root.components["storage"]
        self.assertTrue(await storage.flush_index())
        with open(os.path.join(storage.data_dir, "job_index.json")) as f:
            on_disk = json.load(f)["jobs"]

        def read(stub):
            return (stub.GetStats(pb.GetStatsRequest(), timeout=10),
                    stub.ListJobs(pb.ListJobsRequest(), timeout=10))

        stats, listed = await in_thread(grpc_sock, read)
        infos = {info.job_id: info for info in storage.list_jobs()}
        self.assertEqual(set(on_disk), set(infos))
        for job_id, info in infos.items():
            self.assertEqual(on_disk[job_id]["log_count"], info.log_count)
            self.assertEqual(on_disk[job_id]["size_bytes"], info.size_bytes)
        self.assertEqual({j.job_uuid: j.log_count for j in listed.jobs},
                         {j: i.log_count for j, i in infos.items()})
        self.assertEqual(stats.total_jobs, len(infos))
        self.assertEqual(stats.total_logs, sum(i.log_count for i in infos.values()))
        self.assertEqual(stats.total_size_bytes, sum(i.size_bytes for i in infos.values()))
        for job_id, info in infos.items():
            actual = sum(
                os.path.getsize(os.path.join(dirpath, name))
                for top in ("logs", "metrics")
                for dirpath, _, names in os.walk(os.path.join(storage.data_dir, top, job_id))
                for name in names
            )
            self.assertEqual(info.size_bytes, actual, job_id)
        metrics_port = root.components["web"][0].port_number
        m = await scrape(metrics_port)
        self.assertEqual(value(m, "persist_jobs"), stats.total_jobs)
        self.assertEqual(value(m, "persist_storage_bytes"), stats.total_size_bytes)
        return infos

    async def test_delete_racing_a_flush_leaves_nothing_behind(self):
        """DeleteJob issued while a batch of the job is being appended waits for that
        append and then deletes everything: the in-flight batch does not resurrect the job,
        and the job index, the file, GetStats and /metrics agree afterwards."""
        root, data_dir, grpc_sock, response = await self._race([])
        self.assertTrue(response.success)

        def read(stub):
            return (rpc_code(stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=X)),
                    rpc_code(stub.QueryLogs, pb.QueryLogsRequest(job_uuid=X)),
                    list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=OTHER), timeout=10)))

        info_code, query_code, other = await in_thread(grpc_sock, read)
        self.assertEqual((info_code, query_code),
                         (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND))
        self.assertEqual([line.content for line in other], [b"other-%d\n" % i for i in range(4)])
        self.assertFalse(os.path.exists(os.path.join(data_dir, "logs", X)))
        infos = await self._agree(root, grpc_sock)
        self.assertEqual(set(infos), {OTHER})

    async def test_data_arriving_during_the_delete_starts_a_fresh_job(self):
        """Frames for the job that arrive while its deletion waits for the in-flight batch
        are kept, and stored after the deletion: the job then holds exactly them, with none
        of the old or the in-flight data, in the files as well as in queries."""
        fresh = [log_body(X, 20 + i, b"new-%d\n" % i) for i in range(2)]
        root, data_dir, grpc_sock, response = await self._race(fresh)
        self.assertTrue(response.success)

        def read(stub):
            return (stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=X), timeout=10),
                    list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=X), timeout=10)))

        info, lines = await in_thread(grpc_sock, read)
        self.assertEqual([line.content for line in lines], [b"new-0\n", b"new-1\n"])
        self.assertEqual([line.sequence for line in lines], [20, 21])
        self.assertEqual(info.log_count, 2)
        self.assertEqual(_decoded_logs(data_dir, X), b"new-0\nnew-1\n")
        infos = await self._agree(root, grpc_sock)
        self.assertEqual(set(infos), {X, OTHER})
        self.assertEqual(infos[X].log_count, 2)


class ReadOnlyDeleteTests(unittest.TestCase):
    timeout = 60

    async def test_delete_on_read_only_filesystem_is_failed_precondition(self):
        """DeleteJob while the data directory is read-only (a real read-only bind mount as
        root, mode 0555 otherwise) ends FAILED_PRECONDITION, not INTERNAL, with a message
        naming the job and the cause; the job's files are untouched and the job is still
        queryable.  Once the directory is writable again, the same DeleteJob succeeds."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        os.makedirs(data_dir)
        read_only = ReadOnlyDataDir(self, data_dir)
        root = await start_service(self, service_config(directory))
        parts = root.components
        client = await IPCClient.connect(self, parts["ingest"].path)
        client.send(*[log_body(X, i, b"keep-%d\n" % i) for i in range(3)])
        await wait_for(lambda: parts["writer"].messages_written == 3, what="the job stored")
        self.assertTrue(await parts["storage"].flush_index())
        await client.close()

        def files():
            found = {}
            for dirpath, _, names in os.walk(data_dir):
                for name in names:
                    path = os.path.join(dirpath, name)
                    with open(path, "rb") as f:
                        found[path] = f.read()
            return found

        before = files()
        self.assertTrue(any(f"/{X}/" in path for path in before), before)
        grpc_sock = os.path.join(directory, "g.sock")
        read_only.make_read_only()

        def delete(stub):
            try:
                stub.DeleteJob(pb.DeleteJobRequest(job_uuid=X), timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

        code, details = await in_thread(grpc_sock, delete)
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION, details)
        self.assertIn(f"DeleteJob of job {X} failed: ", details)
        cause = "Read-only file system" if read_only.mounted else "Permission denied"
        self.assertIn(cause, details)
        self.assertEqual(files(), before)

        def read(stub):
            return (stub.GetJobInfo(pb.GetJobInfoRequest(job_uuid=X), timeout=10),
                    list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=X), timeout=10)))

        info, lines = await in_thread(grpc_sock, read)
        self.assertEqual(info.log_count, 3)
        self.assertEqual([line.content for line in lines], [b"keep-%d\n" % i for i in range(3)])

        read_only.make_writable()
        response = await in_thread(
            grpc_sock, lambda stub: stub.DeleteJob(pb.DeleteJobRequest(job_uuid=X), timeout=10))
        self.assertTrue(response.success)
        self.assertFalse(os.path.exists(os.path.join(data_dir, "logs", X)))
        self.assertEqual(
            await in_thread(grpc_sock, lambda stub: rpc_code(
                stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=X))),
            grpc.StatusCode.NOT_FOUND,
        )
        # Storage logs its failed job index writes while the directory was read-only.
        for failure in self.flushLoggedErrors(OSError):
            self.assertIn(failure.value.errno, (errno.EROFS, errno.EACCES))


class RetentionTimerTests(unittest.TestCase):
    timeout = 60

    async def test_timer_deletes_idle_job_and_spares_active_one(self):
        """With the retention timer running every 100 ms, a job idle for longer than
        logMaxAge is deleted, while a job just as old on disk that keeps receiving data is
        spared run after run; deletions show in the index, GetStats and /metrics."""
        directory = short_tempdir(self)
        data_dir = os.path.join(directory, "data")
        idle_size = seed_legacy_job(data_dir, IDLE, [b"idle\n"] * 4, age=7200)
        seed_legacy_job(data_dir, ACTIVE, [b"was idle\n"] * 2, age=7200)
        root = await start_service(
            self,
            service_config(
                directory,
                f"""\
                storage:
                  dataDir: {data_dir}
                  retention:
                    logMaxAge: 0
                    metricMaxAge: 0
                    activeWindow: 10m
                    minFreeBytes: 0
                    interval: 100ms
                """,
            ),
        )
        parts = root.components
        runner, storage, writer = parts["retention"], parts["storage"], parts["writer"]
        runs = []
        original = runner.run

        def counting_run(dry_run=False):
            d = original(dry_run)
            d.addCallback(lambda result: (runs.append(result), result)[1])
            return d

        runner.run = counting_run

        client = await IPCClient.connect(self, parts["ingest"].path)
        sent = [0]

        def feed():
            client.send(log_body(ACTIVE, sent[0], b"active %d\n" % sent[0]))
            sent[0] += 1

        feeder = task.LoopingCall(feed)
        feeder.start(0.05)
        self.addCleanup(lambda: feeder.running and feeder.stop())
        await wait_for(lambda: writer.messages_written >= 1, what="the active job's data")
        await wait_for(lambda: len(runs) >= 1, what="a retention run (nothing to delete)")
        self.assertEqual({j.job_id for j in storage.list_jobs()}, {IDLE, ACTIVE})

        # Turn on age limits as a SIGHUP reload does; both jobs' files are two hours old.
        runner.policy = RetentionPolicy(log_max_age=3600, metric_max_age=3600,
                                        active_window=600)
        await wait_for(lambda: storage.job_info(IDLE) is None, what="the idle job deleted")
        seen = len(runs)
        await wait_for(lambda: len(runs) >= seen + 3, what="three more retention runs")
        feeder.stop()
        deleted = [job for result in runs for job in result.deleted_job_ids]
        self.assertEqual(deleted, [IDLE])
        self.assertFalse(os.path.exists(os.path.join(data_dir, "logs", IDLE)))
        self.assertIsNotNone(storage.job_info(ACTIVE))

        total = sent[0]
        await wait_for(lambda: writer.messages_written == total, what="the feed appended")

        def read(stub):
            return (list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=ACTIVE), timeout=10)),
                    stub.GetStats(pb.GetStatsRequest(), timeout=10))

        lines, stats = await in_thread(os.path.join(directory, "g.sock"), read)
        self.assertEqual([line.content for line in lines],
                         [b"was idle\n"] * 2 + [b"active %d\n" % i for i in range(total)])
        self.assertEqual(stats.total_jobs, 1)
        m = await scrape(parts["web"][0].port_number)
        self.assertEqual(value(m, "persist_retention_deleted_jobs_total"), 1)
        self.assertEqual(value(m, "persist_retention_bytes_freed_total"), idle_size)
        self.assertEqual(value(m, "persist_jobs"), 1)
        self.assertEqual(value(m, "persist_storage_bytes"), stats.total_size_bytes)


def _grpc(sock: str, fn):
    return in_thread(sock, fn)


class TwistdLifecycleTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.dir = short_tempdir(self)
        self.data_dir = os.path.join(self.dir, "data")
        self.grpc_sock = os.path.join(self.dir, "g.sock")
        self.ipc_sock = os.path.join(self.dir, "i.sock")
        self.config_path = os.path.join(self.dir, "persist.yml")
        self.health_port = free_port()
        self.metrics_port = free_port()

    def write_config(self, level: str = "info", max_age: str = "30d", extra: str = "") -> None:
        text = textwrap.dedent(
            f"""\
            server:
              grpcSocket: {self.grpc_sock}
              grpcAddress: ""
            ipc:
              socket: {self.ipc_sock}
            storage:
              dataDir: {self.data_dir}
              retention:
                logMaxAge: {max_age}
                metricMaxAge: {max_age}
                minFreeBytes: 0
                interval: 1h
            monitoring:
              metricsPort: {self.metrics_port}
              healthPort: {self.health_port}
            logging:
              level: {level}
            """
        )
        with open(self.config_path, "w") as f:
            f.write(text + textwrap.dedent(extra))

    async def start(self) -> TwistdProcess:
        proc = TwistdProcess(self, self.dir, ["--config", self.config_path])

        async def healthy():
            try:
                code, _ = await get_health(self.health_port)
            except Exception:
                return False
            return code == 200

        try:
            await wait_for(healthy, timeout=30, what="/health 200")
        except AssertionError:
            self.fail(f"service did not become healthy; output:\n{proc.output}")
        return proc

    async def wait_output(self, proc, text: str, after: int = 0) -> int:
        """Wait until ``text`` appears in the child's output after offset ``after``."""
        try:
            await wait_for(lambda: text in proc.output[after:], timeout=20, what=repr(text))
        except AssertionError:
            self.fail(f"{text!r} not in the output:\n{proc.output}")
        return proc.output.index(text, after) + len(text)

    def cleanup(self, dry_run: bool):
        return _grpc(self.grpc_sock, lambda stub: stub.CleanupOldData(
            pb.CleanupRequest(dry_run=dry_run), timeout=10))

    async def test_sighup_reloads_level_and_retention_and_survives_a_broken_file(self):
        """SIGHUP applies a new log level (info lines disappear from the output) and a new
        retention policy (a dry-run CleanupOldData now names the old job) without a restart;
        a broken file on SIGHUP is refused with an error naming the key and the file, and
        the service keeps running and answering."""
        old_size = seed_legacy_job(self.data_dir, IDLE, [b"old\n"] * 3, age=7200)
        self.write_config(level="info", max_age="30d")
        proc = await self.start()
        started = f"joblet-persist {__version__} started"
        self.assertIn(started, proc.output)  # the startup line, at info
        dry = await self.cleanup(True)
        self.assertEqual(list(dry.deleted_job_ids), [])

        self.write_config(level="warn", max_age="1h")
        mark = len(proc.output)
        proc.signal("HUP")
        end = await self.wait_output(proc, "reload: applied", mark)
        applied = proc.output[end:].splitlines()[0]
        self.assertIn("logging.level 'info' -> 'warn'", applied)
        self.assertIn("storage.retention.logMaxAge 2592000.0 -> 3600.0", applied)

        dry = await self.cleanup(True)
        self.assertEqual((list(dry.deleted_job_ids), dry.bytes_freed), ([IDLE], old_size))
        self.assertTrue(os.path.isdir(os.path.join(self.data_dir, "logs", IDLE)))
        # A real cleanup logs its deletions at info: filtered out at warn.
        done = await self.cleanup(False)
        self.assertEqual(list(done.deleted_job_ids), [IDLE])
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "logs", IDLE)))

        with open(self.config_path, "a") as f:
            f.write("writer:\n  flushEvery: 1s\n")
        mark = len(proc.output)
        proc.signal("HUP")
        await self.wait_output(proc, "reload refused", mark)
        refused = proc.output[mark:]
        self.assertIn("writer.flushEvery", refused)
        self.assertIn(self.config_path, refused)
        # Output is in order: the error above came after the cleanup's info line would have.
        self.assertNotIn("retention: deleted", proc.output)

        ping = await _grpc(self.grpc_sock,
                           lambda stub: stub.Ping(pb.PingRequest(), timeout=2))
        self.assertTrue(ping.healthy)
        code, _ = await get_health(self.health_port)
        self.assertEqual(code, 200)
        self.assertEqual(proc.output.count(started), 1, "the service restarted")
        self.assertFalse(proc.proto.ended.called)
        proc.signal("TERM")
        await proc.wait_exit(15)
        self.assertNotIn("Traceback", proc.output)

    async def test_second_instance_on_the_same_ipc_socket_exits_nonzero(self):
        """A second twistd configured with the IPC socket of a running one refuses to start
        (exit status not 0, the reason in its output) and leaves the first one's socket
        alone: frames sent to it afterwards are stored and queryable."""
        self.write_config()
        first = await self.start()

        other_dir = short_tempdir(self)
        other_config = os.path.join(other_dir, "persist.yml")
        with open(other_config, "w") as f:
            f.write(textwrap.dedent(
                f"""\
                server:
                  grpcSocket: {other_dir}/g.sock
                  grpcAddress: ""
                ipc:
                  socket: {self.ipc_sock}
                storage:
                  dataDir: {other_dir}/data
                monitoring:
                  metricsPort: {free_port()}
                  healthPort: {free_port()}
                """
            ))
        second = TwistdProcess(self, other_dir, ["--config", other_config])
        code = await second.wait_exit(30)
        self.assertNotEqual(code, 0, second.output)
        self.assertIn("another process is listening", second.output)
        self.assertTrue(os.path.exists(self.ipc_sock))
        self.assertFalse(first.proto.ended.called)

        client = await IPCClient.connect(self, self.ipc_sock)
        client.send(log_body(X, 1, b"still here\n"))

        def query(stub):
            return rpc_code(stub.GetJobInfo, pb.GetJobInfoRequest(job_uuid=X))

        await wait_for(lambda: _grpc(self.grpc_sock, query).addCallback(
            lambda c: c == grpc.StatusCode.OK), what="the frame stored by the first service")
        lines = await _grpc(self.grpc_sock, lambda stub: list(
            stub.QueryLogs(pb.QueryLogsRequest(job_uuid=X), timeout=10)))
        self.assertEqual([line.content for line in lines], [b"still here\n"])
        await client.close()
        first.signal("TERM")
        await first.wait_exit(15)
