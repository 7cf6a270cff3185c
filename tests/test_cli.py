"""Tests for joblet-persist-ctl (joblet_persist.cli).

The command runs in-process (``main(argv, stdout=, stderr=)``) against a real
gRPC server on a Unix socket (or TLS on loopback) serving FakeStorage.  The
servicer's reactor is an ImmediateReactor, so no global reactor is involved.
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import cli, events, timefmt
from joblet_persist._proto import persist_pb2_grpc
from joblet_persist.grpc_server import GrpcServerService
from joblet_persist.query import PersistServicer
from tests.fakes import FakeStorage, ImmediateReactor, log_batch, make_pki, metric_batch
from tests.storage_contract import event_batch

JOB = "7e0d3d8a-5c1b-4b8e-9d2f-0a1b2c3d4e5f"
NOW_NS = time.time_ns()


@functools.lru_cache(maxsize=1)
def _pki():
    return make_pki()


class _ClosedPipe:
    """A stdout whose reader has gone away: every write fails with EPIPE."""

    def __init__(self):
        self.writes = 0
        self.buffer = self

    def write(self, data):
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


class ParseTests(SynchronousTestCase):
    def test_durations(self):
        """Durations combine number+unit parts; anything else is not a duration."""
        self.assertEqual(cli.parse_duration("2h"), 7200)
        self.assertEqual(cli.parse_duration("1h30m"), 5400)
        self.assertEqual(cli.parse_duration("1d"), 86400)
        self.assertEqual(cli.parse_duration("500ms"), 0.5)
        for text in ("", "h", "2", "2x", "-2h", "2h "):
            self.assertIsNone(cli.parse_duration(text), text)

    def test_timeout_is_a_duration(self):
        """--timeout takes seconds or a duration with units, like the configuration's
        durations; a negative or malformed one is a usage error naming the value."""
        parser = cli.build_parser()
        for text, seconds in (("10", 10.0), ("2.5", 2.5), ("30s", 30.0), ("2m", 120.0)):
            self.assertEqual(parser.parse_args(["--timeout", text, "ping"]).timeout, seconds)
        for text in ("-1", "soon"):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            self.assertRaises(SystemExit, parser.parse_args, ["--timeout", text, "ping"])
            self.assertIn(text, err.getvalue())

    def test_times(self):
        """--since/--until take a duration before now, ISO 8601, 'now' or a Unix time with
        its unit; a bare integer is refused."""
        now = 10**18
        self.assertEqual(cli.parse_time("30m", now), now - 1800 * 10**9)
        self.assertEqual(cli.parse_time("now", now), now)
        self.assertEqual(cli.parse_time("1700000000123456789ns", now), 1700000000123456789)
        self.assertRaises(ValueError, cli.parse_time, "1700000000123456789", now)
        self.assertEqual(cli.parse_time("2024-05-01T12:00:00Z"), 1714564800 * 10**9)
        self.assertEqual(cli.parse_time("2024-05-01T14:00:00.5+02:00"), 1714564800_500_000_000)
        naive = datetime.datetime(2024, 5, 1, 12, 0, 0).astimezone()
        self.assertEqual(cli.parse_time("2024-05-01T12:00:00"), int(naive.timestamp()) * 10**9)
        for bad in ("yesterday", "-5", "2024-13-01", ""):
            self.assertRaises(ValueError, cli.parse_time, bad, now)


class CliTestBase(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jp", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "g.sock")
        self.storage = FakeStorage(now=lambda: 1_700_000_000)
        self.reactor = ImmediateReactor()
        self.healthy = True
        self.fill()

    def fill(self):
        add = self.storage.append_logs
        self.successResultOf(add(log_batch(JOB, 1, [(NOW_NS - 3 * 3600 * 10**9, 1, b"old\n")])))
        self.successResultOf(add(log_batch(JOB, 2, [(NOW_NS - 3600 * 10**9, 2, b"err \xff\n")])))
        self.successResultOf(add(log_batch(JOB, 1, [(NOW_NS - 60 * 10**9, 3, b"new\n")])))
        self.successResultOf(
            self.storage.append_metrics(
                metric_batch(
                    JOB,
                    [
                        (
                            1714564800 * 10**9,
                            1,
                            dict(
                                cpu_usage=12.5,
                                memory_usage=3 << 20,
                                disk_io=dict(read_bytes=2048),
                                network_io=dict(tx_packets=9),
                            ),
                        ),
                        (1714564801 * 10**9, 2, dict(gpu_usage=1.25)),
                    ],
                )
            )
        )

    def servicer(self, cls=PersistServicer):
        return cls(
            self.storage,
            self.reactor,
            is_healthy=lambda: self.healthy,
            ingest_stats=lambda: {"messages_received": 11, "messages_written": 10},
            delete_job=self.storage.delete_job,
        )

    def serve(self, servicer=None, **kw):
        kw.setdefault("unix_socket", self.socket)
        service = GrpcServerService(
            servicer or self.servicer(), reactor=self.reactor, shutdown_grace=0, **kw
        )
        service.startService()

        def stop():
            done = threading.Event()
            service.stopService().addBoth(lambda result: done.set())
            self.assertTrue(done.wait(10), "the gRPC server did not stop")

        self.addCleanup(stop)
        return service

    def run_cli(self, *argv, socket=True):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n", write_through=True)
        err = io.StringIO()
        args = list(argv)
        if socket:
            args = ["--socket", self.socket, *args]
        code = cli.main(args, stdout=out, stderr=err)
        return code, out.buffer.getvalue(), err.getvalue()


class CommandTests(CliTestBase):
    def setUp(self):
        super().setUp()
        self.serve()

    def test_logs_raw_bytes(self):
        """logs writes the raw output of both streams in arrival order, nothing else."""
        self.assertEqual(self.run_cli("logs", JOB), (0, b"old\nerr \xff\nnew\n", ""))

    def test_logs_filters(self):
        """--stream, --limit/--offset and --since/--until select what is written."""
        self.assertEqual(self.run_cli("logs", JOB, "--stream", "stdout")[1], b"old\nnew\n")
        self.assertEqual(self.run_cli("logs", JOB, "--stream", "stderr")[1], b"err \xff\n")
        self.assertEqual(
            self.run_cli("logs", JOB, "--offset", "1", "--limit", "1")[1], b"err \xff\n"
        )
        self.assertEqual(self.run_cli("logs", JOB, "--since", "2h")[1], b"err \xff\nnew\n")
        self.assertEqual(self.run_cli("logs", JOB, "--until", "2h")[1], b"old\n")
        self.assertEqual(
            self.run_cli("logs", JOB, "--since", f"{NOW_NS - 60 * 10**9}ns")[1], b"new\n"
        )

    def test_logs_errors(self):
        """Unknown job exits 3, a malformed id 1, a bad time 2; each with one stderr line."""
        code, out, err = self.run_cli("logs", "nosuchjob")
        self.assertEqual((code, out), (3, b""))
        self.assertIn("nosuchjob", err)
        self.assertEqual(err.count("\n"), 1)
        code, _, err = self.run_cli("logs", "../etc")
        self.assertEqual(code, 1)
        self.assertIn("invalid argument", err)
        self.assertEqual(err.count("\n"), 1)
        code, _, err = self.run_cli("logs", JOB, "--since", "yesterday")
        self.assertEqual(code, 2)
        self.assertIn("invalid time", err)
        self.assertEqual(self.run_cli("logs", JOB, "--limit", "-1")[0], 2)

    def test_output_into_closed_pipe(self):
        """A reader that goes away (logs | head) ends the command quietly with status 0."""
        for command in (["logs", JOB], ["metrics", JOB], ["metrics", JOB, "--json"]):
            stdout, err = _ClosedPipe(), io.StringIO()
            code = cli.main(["--socket", self.socket, *command], stdout=stdout, stderr=err)
            self.assertEqual((code, err.getvalue()), (0, ""), command)
            self.assertEqual(stdout.writes, 1)

    def test_metrics_formats(self):
        """metrics prints a table by default, JSON lines with --json, CSV with --csv."""
        code, out, _ = self.run_cli("metrics", JOB)
        lines = out.decode().splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0].split()[:3], ["TIME", "SEQ", "CPU%"])
        self.assertIn("2024-05-01T12:00:00Z", lines[1])
        self.assertIn("3.0 MiB", lines[1])
        self.assertEqual(len(lines), 3)
        code, out, _ = self.run_cli("metrics", JOB, "--json")
        records = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(records[0]["timestamp"], "2024-05-01T12:00:00Z")
        self.assertEqual(records[0]["timestamp_ns"], 1714564800 * 10**9)
        self.assertEqual(records[0]["data"]["disk_io"]["read_bytes"], 2048)
        self.assertEqual(records[0]["data"]["network_io"]["tx_packets"], 9)
        self.assertEqual(records[1]["data"]["gpu_usage"], 1.25)
        code, out, _ = self.run_cli("metrics", JOB, "--csv", "--limit", "1")
        rows = list(csv.DictReader(io.StringIO(out.decode())))
        self.assertEqual(len(rows), 1)
        self.assertEqual((rows[0]["cpu_usage"], rows[0]["memory_usage"]), ("12.5", str(3 << 20)))
        self.assertEqual(self.run_cli("metrics", JOB, "--json", "--csv")[0], 2)

    def test_jobs(self):
        """jobs lists jobs newest first; a partial page is noted on stderr."""
        self.storage._now = lambda: 1_800_000_000
        self.successResultOf(self.storage.append_logs(log_batch("second", 1, [(1, 1, b"x")])))
        code, out, err = self.run_cli("jobs")
        rows = out.decode().splitlines()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([r.split()[0] for r in rows], ["JOB", "second", JOB])
        code, out, err = self.run_cli("jobs", "--json", "--limit", "1")
        self.assertEqual(json.loads(out)["job_uuid"], "second")
        self.assertIn("showing 1 of 2 jobs", err)
        code, out, _ = self.run_cli("jobs", "--json", "--until", "2025-01-01T00:00:00Z")
        self.assertEqual([json.loads(x)["job_uuid"] for x in out.decode().splitlines()], [JOB])

    def test_info_and_stats(self):
        """info shows a job's summary (3 when unknown); stats the service totals."""
        code, out, _ = self.run_cli("info", JOB)
        self.assertEqual(code, 0)
        self.assertIn(f"job:            {JOB}", out.decode())
        self.assertIn("log messages:   3", out.decode())
        code, out, _ = self.run_cli("info", JOB, "--json")
        self.assertEqual(json.loads(out)["metric_count"], 2)
        self.assertEqual(self.run_cli("info", "unknown")[0], 3)
        code, out, _ = self.run_cli("stats", "--json")
        stats = json.loads(out)
        self.assertEqual(
            (stats["total_jobs"], stats["total_logs"], stats["messages_received"]), (1, 3, 11)
        )
        code, out, _ = self.run_cli("stats")
        self.assertIn("total_metrics:     2", out.decode())

    def test_delete(self):
        """delete removes the job; deleting an unknown job also succeeds."""
        code, out, _ = self.run_cli("delete", JOB)
        self.assertEqual(code, 0)
        self.assertIn("bytes freed", out.decode())
        self.assertIsNone(self.storage.job_info(JOB))
        code, out, _ = self.run_cli("delete", JOB)
        self.assertEqual((code, out), (0, f"job {JOB} not found; nothing to delete\n".encode()))

    def test_ping(self):
        """ping exits 0 only while the service reports itself healthy."""
        code, out, _ = self.run_cli("ping")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith(b"healthy"))
        self.healthy = False
        code, out, _ = self.run_cli("ping")
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith(b"unhealthy"))

    def test_options_after_the_command_and_env(self):
        """Connection options work after the command, and the socket may come from the env."""
        self.assertEqual(self.run_cli("ping", "--socket", self.socket, socket=False)[0], 0)
        os.environ[cli.SOCKET_ENV] = self.socket
        self.addCleanup(os.environ.pop, cli.SOCKET_ENV, None)
        self.assertEqual(self.run_cli("ping", socket=False)[0], 0)

    def test_usage(self):
        """--help exits 0; a missing command or argument exits 2."""
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        self.assertIn(b"joblet-persist-ctl", out)
        self.assertEqual(self.run_cli()[0], 2)
        self.assertEqual(self.run_cli("logs")[0], 2)
        self.assertEqual(self.run_cli("frobnicate")[0], 2)


class ConnectionTests(CliTestBase):
    def test_unreachable(self):
        """Nothing listening: exit 5 with a message naming where it tried."""
        code, out, err = self.run_cli("ping", "--timeout", "2")
        self.assertEqual((code, out), (5, b""))
        self.assertIn(self.socket, err)
        self.assertEqual(err.count("\n"), 1)

    def test_shutting_down(self):
        """A service that is stopping answers UNAVAILABLE: exit 5."""
        servicer = self.servicer()
        self.serve(servicer)
        servicer.set_stopping()
        code, _, err = self.run_cli("info", JOB)
        self.assertEqual(code, 5)
        self.assertIn("shutting down", err)

    def test_fallback_without_batched_rpc(self):
        """Against a service without QueryLogsBatched, logs falls back to QueryLogs."""

        class OldServicer(PersistServicer):
            QueryLogsBatched = persist_pb2_grpc.PersistServiceServicer.QueryLogsBatched

        self.serve(self.servicer(OldServicer))
        self.assertEqual(self.run_cli("logs", JOB), (0, b"old\nerr \xff\nnew\n", ""))

    def test_viewer_socket(self):
        """Against the viewer socket, reading works (0) and delete is refused (4), while the
        admin socket of the same service deletes (0)."""
        viewer = os.path.join(self.dir, "v.sock")
        self.serve(viewer_socket=viewer)
        as_viewer = ["--socket", viewer]
        self.assertEqual(
            self.run_cli(*as_viewer, "logs", JOB, socket=False), (0, b"old\nerr \xff\nnew\n", "")
        )
        self.assertEqual(self.run_cli(*as_viewer, "stats", socket=False)[0], 0)
        code, _, err = self.run_cli(*as_viewer, "delete", JOB, socket=False)
        self.assertEqual(code, 4)
        self.assertIn("permission denied", err)
        self.assertIn("DeleteJob requires the admin role", err)
        self.assertIsNotNone(self.storage.job_info(JOB))
        self.assertEqual(self.run_cli("delete", JOB)[0], 0)
        self.assertIsNone(self.storage.job_info(JOB))

    def test_plaintext_tcp(self):
        """Plaintext --address reaches a service that opted in to plaintext loopback TCP."""
        service = self.serve(unix_socket=None, tcp_address="127.0.0.1:0", allow_plaintext_tcp=True)
        address = f"127.0.0.1:{service.tcp_port}"
        self.assertEqual(self.run_cli("--address", address, "ping", socket=False)[0], 0)

    def test_accepts_the_largest_line(self):
        """The CLI accepts messages as large as any the service may send (the largest line
        a maximal ipc.maxFrameBytes admits), not only the 128 MiB of the default."""
        from joblet_persist.config import GRPC_MAX_MESSAGE_BYTES, default_config

        self.assertEqual(cli.MAX_RECEIVE_MESSAGE_BYTES, GRPC_MAX_MESSAGE_BYTES)
        self.assertGreater(cli.MAX_RECEIVE_MESSAGE_BYTES, default_config().grpc_send_message_bytes)

    def _write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_tls_roles(self):
        """Over TLS a viewer certificate can read (0) but not delete (4); no certificate is 5."""
        pki = _pki()
        service = self.serve(
            unix_socket=None,
            tcp_address="127.0.0.1:0",
            tls={
                "server_cert": pki.server_cert,
                "server_key": pki.server_key,
                "ca_cert": pki.ca_cert,
                "require_client_cert": True,
            },
        )
        ca = self._write("ca.pem", pki.ca_cert)
        cert = self._write("viewer.pem", pki.clients["viewer"][0])
        key = self._write("viewer.key", pki.clients["viewer"][1])
        address = f"localhost:{service.tcp_port}"
        tls = ["--address", address, "--ca", ca, "--cert", cert, "--key", key]
        self.assertEqual(
            self.run_cli(*tls, "logs", JOB, socket=False)[:2], (0, b"old\nerr \xff\nnew\n")
        )
        code, _, err = self.run_cli(*tls, "delete", JOB, socket=False)
        self.assertEqual(code, 4)
        self.assertIn("permission denied", err)
        self.assertIsNotNone(self.storage.job_info(JOB))
        code, _, err = self.run_cli(
            "--address", address, "--ca", ca, "--timeout", "3", "ping", socket=False
        )
        self.assertEqual(code, 5)
        self.assertEqual(
            self.run_cli("--address", address, "--cert", cert, "ping", socket=False)[0], 2
        )
        code, _, err = self.run_cli(
            "--address", address, "--ca", "/nonexistent", "ping", socket=False
        )
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent", err)


class EventCommandTests(CliTestBase):
    """``joblet-persist-ctl events`` over a real gRPC server."""

    def setUp(self):
        super().setUp()
        from tests.test_events import SAMPLES, encode_event

        self.payloads = {}
        arrival = 100
        for t in range(3, 10):
            kind = events.KINDS_BY_TYPE[t]
            values = dict(SAMPLES[t])
            if t == 9:
                values["path"] = b"/tmp/\xff\xfe"  # not UTF-8: kept as b64 in the stored line
            rows = []
            for i in range(3):
                ts = NOW_NS - (3 - i) * 3600 * 10**9
                rows.append((ts, i + 1, arrival, encode_event(t, values, ts=ts, seq=i + 1)))
                arrival += 1
            self.payloads[kind.name] = rows
            self.successResultOf(
                self.storage.append_events(event_batch(JOB, kind.name, rows))
            )
        self.serve()

    def stored_lines(self, kind, rows):
        """The stored lines, with the time as the CLI writes every time (RFC 3339 + ns)."""
        from joblet_persist.timefmt import time_fields

        k = events.KINDS_BY_NAME[kind]
        lines = []
        for ts, seq, _a, p in rows:
            stored = json.loads(events.payload_json_line(k, p, JOB, ts, seq))
            cli_form = {}
            for key, value in stored.items():
                cli_form.update(time_fields(key, value) if key == "timestamp" else {key: value})
            lines.append(json.dumps(cli_form, separators=(",", ":"), ensure_ascii=False))
        return lines

    def test_json_prints_the_stored_lines(self):
        """--kind K --json prints the stored JSON lines (zcat's), the time as an RFC 3339
        timestamp plus timestamp_ns, for every kind: socket data under addr/port, invalid
        UTF-8 as {"b64": ...}."""
        for kind, rows in self.payloads.items():
            code, out, err = self.run_cli("events", JOB, "--kind", kind, "--json")
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(out.decode().splitlines(), self.stored_lines(kind, rows), kind)
        line = json.loads(self.run_cli("events", JOB, "--kind", "file", "--json")[1].splitlines()[0])
        self.assertEqual(line["path"], {"b64": "L3RtcC///g=="})

    def test_all_kinds_table_and_filters(self):
        """Without --kind every kind is printed (JSON lines carry "kind"); --since/--until,
        --limit and --offset select; the table has one row per event."""
        code, out, _ = self.run_cli("events", JOB, "--json")
        records = [json.loads(x) for x in out.decode().splitlines()]
        self.assertEqual(len(records), 21)
        self.assertEqual([r["kind"] for r in records[::3]], [k.name for k in events.KINDS])
        out = self.run_cli("events", JOB, "--kind", "exec", "--json", "--since", "150m")[1]
        self.assertEqual([json.loads(x)["sequence"] for x in out.decode().splitlines()], [2, 3])
        out = self.run_cli("events", JOB, "--kind", "exec", "--json", "--until", "150m")[1]
        self.assertEqual([json.loads(x)["sequence"] for x in out.decode().splitlines()], [1])
        out = self.run_cli("events", JOB, "--kind", "mmap", "--json", "--offset", "1",
                           "--limit", "1")[1]
        self.assertEqual([json.loads(x)["sequence"] for x in out.decode().splitlines()], [2])
        code, out, _ = self.run_cli("events", JOB, "--kind", "connect")
        lines = out.decode().splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0].split()[:4], ["TIME", "SEQ", "KIND", "PID"])
        self.assertEqual(len(lines), 4)
        self.assertIn("dst_addr=93.184.216.34", lines[1])

    def test_errors_and_info(self):
        """An unknown job exits 3, an unknown kind 2; info shows the event counts."""
        self.assertEqual(self.run_cli("events", "nosuchjob")[0], 3)
        self.assertEqual(self.run_cli("events", JOB, "--kind", "nonsense")[0], 2)
        code, out, _ = self.run_cli("info", JOB)
        self.assertIn("events:         21", out.decode())
        self.assertEqual(json.loads(self.run_cli("info", JOB, "--json")[1])["event_counts"]["exec"], 3)


class PumpedReactor(ImmediateReactor):
    """A Clock whose callFromThread queues the call for the thread that pumps it."""

    def __init__(self):
        super().__init__()
        import queue

        self.queued = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.queued.put((f, args, kwargs))

    def pump_until(self, done, timeout=20.0):
        import queue

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError("the command did not finish")
            try:
                f, args, kwargs = self.queued.get(timeout=0.01)
            except queue.Empty:
                continue
            f(*args, **kwargs)
            self.advance(0)
        while not self.queued.empty():
            f, args, kwargs = self.queued.get()
            f(*args, **kwargs)


class TailFollowCommandTests(CliTestBase):
    """logs --tail, -f, --timestamps and --json (TailLogs / FollowLogs)."""

    def setUp(self):
        super().setUp()
        from joblet_persist.follow import FollowHub
        from joblet_persist.writer import BatchingWriter

        # The servicer's reactor calls run on this (the main) thread, as the reactor-only
        # methods of the writer and the hub require, while the command runs in a thread.
        self.pumped = PumpedReactor()
        self.writer = BatchingWriter(self.storage, self.pumped)
        self.hub = FollowHub(self.writer, self.storage, self.pumped)
        servicer = PersistServicer(
            self.storage, self.pumped, is_healthy=lambda: True, ingest_stats=dict,
            delete_job=self.storage.delete_job, follow_hub=self.hub,
        )
        self.serve(servicer)

    def run_cli(self, *argv, socket=True):
        result = []
        worker = threading.Thread(
            target=lambda: result.append(CliTestBase.run_cli(self, *argv, socket=socket))
        )
        worker.start()
        self.pumped.pump_until(lambda: not worker.is_alive())
        worker.join()
        return result[0]

    def test_tail(self):
        """--tail N writes the last N messages of the chosen streams; 0 writes nothing."""
        self.assertEqual(self.run_cli("logs", JOB, "--tail", "2"), (0, b"err \xff\nnew\n", ""))
        self.assertEqual(self.run_cli("logs", JOB, "--tail", "1", "--stream", "stderr")[1],
                         b"err \xff\n")
        self.assertEqual(self.run_cli("logs", JOB, "--tail", "0")[:2], (0, b""))
        self.assertEqual(self.run_cli("logs", JOB, "--tail", "9", "--until", "2h")[1], b"old\n")

    def test_timestamps(self):
        """-t prefixes each message with its RFC 3339 UTC time and a space, and ends a
        message without a newline with one (and only then)."""
        self.successResultOf(self.storage.append_logs(
            log_batch(JOB, 1, [(NOW_NS, 4, b"no newline")])))
        code, out, _ = self.run_cli("logs", JOB, "--tail", "2", "--timestamps")
        self.assertEqual(code, 0)
        self.assertEqual(
            out,
            timefmt.rfc3339_fixed(NOW_NS - 60 * 10**9).encode() + b" new\n"
            + timefmt.rfc3339_fixed(NOW_NS).encode() + b" no newline\n",
        )

    def test_json(self):
        """--json writes one object per message with stream, timestamp (RFC 3339 and ns),
        sequence and content; content that is not UTF-8 comes as content_b64."""
        code, out, _ = self.run_cli("logs", JOB, "--json")
        self.assertEqual(code, 0)
        records = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(len(records), 3)
        self.assertEqual(records[0], {
            "stream": "stdout",
            "timestamp": timefmt.rfc3339(NOW_NS - 3 * 3600 * 10**9),
            "timestamp_ns": NOW_NS - 3 * 3600 * 10**9,
            "sequence": 1,
            "content": "old\n",
        })
        self.assertEqual(records[1]["stream"], "stderr")
        self.assertNotIn("content", records[1])
        self.assertEqual(records[1]["content_b64"], "ZXJyIP8K")

    def test_rfc3339_fixed(self):
        """Times are UTC with all nine fraction digits."""
        self.assertEqual(timefmt.rfc3339_fixed(1796523000_123456789), "2026-12-06T02:10:00.123456789Z")
        self.assertEqual(timefmt.rfc3339_fixed(0), "1970-01-01T00:00:00.000000000Z")

    def test_follow_until_idle(self):
        """-f writes what is stored, then ends with status 0 after --idle-timeout without
        new output; with --tail only the last lines come first."""
        self.assertEqual(self.run_cli("logs", JOB, "-f", "--idle-timeout", "0.2"),
                         (0, b"old\nerr \xff\nnew\n", ""))
        code, out, _ = self.run_cli("logs", JOB, "-f", "--tail", "1", "--idle-timeout", "0.2",
                                    "--json")
        self.assertEqual((code, json.loads(out)["content"]), (0, "new\n"))
        self.assertEqual(self.hub.follower_count, 0)

    def test_usage_errors(self):
        """Options that do not combine are usage errors (2), each named."""
        for argv, word in (
            (["--tail", "1", "--limit", "1"], "--limit"),
            (["-f", "--until", "1h"], "--until"),
            (["--idle-timeout", "1s"], "-f"),
            (["--tail", "-3"], "count"),
        ):
            code, _, err = self.run_cli("logs", JOB, *argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(word, err)

    def test_closed_pipe(self):
        """--tail and --json into a closed pipe end quietly with status 0."""
        for argv in (["--tail", "2"], ["--json"], ["-f", "--idle-timeout", "5"]):
            pipe = _ClosedPipe()
            err = io.StringIO()
            result = []
            worker = threading.Thread(
                target=lambda argv=argv, pipe=pipe, err=err, result=result: result.append(
                    cli.main(["--socket", self.socket, "logs", JOB, *argv], stdout=pipe,
                             stderr=err)
                )
            )
            worker.start()
            self.pumped.pump_until(lambda worker=worker: not worker.is_alive())
            self.assertEqual((result[0], err.getvalue()), (0, ""), argv)


class OldServiceTests(CliTestBase):
    def test_tail_against_a_service_without_it(self):
        """Against a service without TailLogs/FollowLogs, --tail and -f fail (1) with a
        message that says what is missing."""

        class OldServicer(PersistServicer):
            TailLogs = persist_pb2_grpc.PersistServiceServicer.TailLogs
            FollowLogs = persist_pb2_grpc.PersistServiceServicer.FollowLogs

        self.serve(self.servicer(OldServicer))
        for argv, rpc in ((["--tail", "1"], "TailLogs"), (["-f"], "FollowLogs")):
            code, out, err = self.run_cli("logs", JOB, *argv)
            self.assertEqual((code, out), (1, b""))
            self.assertIn(rpc, err)
            self.assertIn("does not support", err)
