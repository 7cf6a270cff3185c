"""Tests for ``joblet-persist-ctl grep`` and ``metrics --step/--agg`` (real gRPC, FakeStorage)."""

from __future__ import annotations

import csv
import io
import json

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import cli, timefmt
from tests.fakes import log_batch, metric_batch
from tests.test_cli import JOB, CliTestBase, _ClosedPipe

OTHER = "1a2b3c4d-other"


class TimeFormatTests(SynchronousTestCase):
    def test_json_time(self):
        """JSON times are RFC 3339 UTC (nanosecond digits, trailing zeros dropped), plus
        integer ns."""
        ns = 1796523000 * 10**9 + 123456789
        self.assertEqual(timefmt.time_fields("timestamp", ns),
                         {"timestamp": "2026-12-06T02:10:00.123456789Z", "timestamp_ns": ns})
        self.assertEqual(timefmt.time_fields("start", 5)["start"], "1970-01-01T00:00:00.000000005Z")


class GrepTests(CliTestBase):
    def setUp(self):
        super().setUp()
        self.successResultOf(self.storage.append_logs(
            log_batch(OTHER, 1, [(7, 1, b"an ERROR\nsecond line\n"), (8, 2, b"fine\n")])))
        self.serve()

    def test_raw_matches_of_one_job(self):
        """grep writes the whole matching messages, raw, in arrival order; exit 0."""
        self.assertEqual(self.run_cli("grep", "", JOB), (0, b"old\nerr \xff\nnew\n", ""))
        self.assertEqual(self.run_cli("grep", "e", JOB), (0, b"err \xff\nnew\n", ""))
        self.assertEqual(self.run_cli("grep", "ne", JOB)[1], b"new\n")
        self.assertEqual(self.run_cli("grep", "E", JOB, "-i", "--stream", "stderr")[1],
                         b"err \xff\n")
        self.assertEqual(self.run_cli("grep", "-E", "^(old|new)$", JOB)[1], b"old\nnew\n")
        self.assertEqual(self.run_cli("grep", "e", JOB, "--since", "2h", "--limit", "1")[1],
                         b"err \xff\n")

    def test_no_match_exits_1_like_grep(self):
        """Nothing matched: no output and status 1, as grep."""
        self.assertEqual(self.run_cli("grep", "zzz", JOB), (1, b"", ""))

    def test_all_jobs_prefix_each_line(self):
        """--all-jobs prefixes every line of each match with its job id (grep's file
        names), unless --no-job-id."""
        code, out, _ = self.run_cli("grep", "-i", "error", "--all-jobs")
        self.assertEqual(code, 0)
        self.assertEqual(out, f"{OTHER}:an ERROR\n{OTHER}:second line\n".encode())
        self.assertEqual(self.run_cli("grep", "-i", "error", "--all-jobs", "--no-job-id")[1],
                         b"an ERROR\nsecond line\n")

    def test_json_records(self):
        """--json prints one object per match with the stream, both time forms, the
        sequence and the content (base64 when it is not UTF-8)."""
        code, out, _ = self.run_cli("grep", "err", JOB, "--json")
        self.assertEqual(code, 0)
        (record,) = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(record["job_uuid"], JOB)
        self.assertEqual(record["stream"], "stderr")
        self.assertEqual(record["sequence"], 2)
        self.assertEqual(record["content"], {"b64": "ZXJyIP8K"})
        self.assertEqual(timefmt.rfc3339(record["timestamp_ns"]), record["timestamp"])
        self.assertTrue(record["timestamp"].endswith("Z"))

    def test_count(self):
        """-c prints the number of matches only."""
        self.assertEqual(self.run_cli("grep", "-c", "e", "--all-jobs"), (0, b"4\n", ""))

    def test_errors(self):
        """A bad regex is an invalid argument naming the problem (status 1); a JOB and
        --all-jobs together, or neither, a usage error (2); an unknown job 3."""
        code, out, err = self.run_cli("grep", "-E", "(", JOB)
        self.assertEqual((code, out), (1, b""))
        self.assertIn("missing )", err)
        self.assertEqual(self.run_cli("grep", "x", JOB, "--all-jobs")[0], 2)
        self.assertEqual(self.run_cli("grep", "x")[0], 2)
        self.assertEqual(self.run_cli("grep", "x", "--jobs-since", "1h", JOB)[0], 2)
        self.assertEqual(self.run_cli("grep", "x", "nosuchjob")[0], 3)

    def test_closed_pipe(self):
        """grep | head ends quietly with status 0 when the reader goes away."""
        stdout, err = _ClosedPipe(), io.StringIO()
        code = cli.main(["--socket", self.socket, "grep", "e", JOB], stdout=stdout, stderr=err)
        self.assertEqual((code, err.getvalue()), (0, ""))


class MetricsAggregateTests(CliTestBase):
    def setUp(self):
        super().setUp()
        s = 10**9
        self.successResultOf(self.storage.append_metrics(metric_batch(OTHER, [
            (100 * s + i * s, i, dict(cpu_usage=float(i), disk_io=dict(read_bytes=1000 * i)))
            for i in range(30)
        ])))
        self.serve()

    def test_table(self):
        """--step/--agg print one row per bucket and field with a column per function."""
        code, out, _ = self.run_cli("metrics", OTHER, "--step", "10s", "--agg", "avg,max",
                                    "--fields", "cpu_usage")
        lines = out.decode().splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0].split(), ["TIME", "FIELD", "SAMPLES", "AVG", "MAX"])
        self.assertEqual(lines[1].split(),
                         ["1970-01-01T00:01:40.000000000Z", "cpu_usage", "10", "4.5", "9"])
        self.assertEqual(len(lines), 4)

    def test_json_and_csv(self):
        """--json prints one object per bucket (RFC 3339 and ns times, values per field and
        function, rate null where there is none); --csv a header and one row per bucket."""
        code, out, _ = self.run_cli("metrics", OTHER, "--step", "10s", "--agg", "sum,rate",
                                    "--fields", "cpu_usage,disk_io.read_bytes", "--json")
        records = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(code, 0)
        self.assertEqual(records[0]["timestamp"], "1970-01-01T00:01:40Z")
        self.assertEqual(records[0]["timestamp_ns"], 100 * 10**9)
        self.assertEqual(records[0]["step_ns"], 10 * 10**9)
        self.assertEqual(records[0]["values"]["cpu_usage"], {"sum": 45.0, "rate": None})
        self.assertEqual(records[1]["values"]["disk_io.read_bytes"]["rate"], 1000.0)
        code, out, _ = self.run_cli("metrics", OTHER, "--agg", "count", "--fields",
                                    "cpu_usage", "--csv", "--step", "auto", "--points", "3")
        rows = list(csv.DictReader(io.StringIO(out.decode())))
        self.assertEqual([r["cpu_usage.count"] for r in rows], ["10", "10", "10"])

    def test_usage_errors(self):
        """Unknown functions or fields, a bad step, --limit with --agg: usage errors."""
        for argv in (["--agg", "median"], ["--fields", "cpu"], ["--step", "soon"],
                     ["--step", "0s"], ["--agg", "avg", "--limit", "5"]):
            code, _, err = self.run_cli("metrics", OTHER, *argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("joblet-persist-ctl", err + "joblet-persist-ctl")
