"""joblet-persist-ctl for operators: one time representation (timefmt.py), --version,
--csv, cleanup, delete confirmation and dry run, no output before an error."""

from __future__ import annotations

import csv
import io
import json
import types

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import __version__, cli, timefmt
from joblet_persist.query import PersistServicer
from tests.test_cli import JOB, CliTestBase


class TimeFormatTests(SynchronousTestCase):
    def test_unix_times_need_a_unit(self):
        """A Unix time is read with its unit (s, fractional s, ms, us, ns); a bare integer
        is an error naming the choices."""
        for text in ("1700000000s", "1700000000.5s", "1700000000500ms", "1700000000500000us",
                     "1700000000500000000ns"):
            expected = 1700000000 * 10**9 + (0 if text == "1700000000s" else 5 * 10**8)
            self.assertEqual(timefmt.parse_time(text, 0), expected, text)
        e = self.assertRaises(ValueError, timefmt.parse_time, "1700000000", 0)
        for hint in ("1700000000s", "1700000000ms", "1700000000ns", "RFC 3339", "2h"):
            self.assertIn(hint, str(e))
        for bad in ("-5", "5x", "1.5.2s", "yesterday", ""):
            self.assertRaises(ValueError, timefmt.parse_time, bad, 0)

    def test_rfc3339_round_trip(self):
        """Output times are RFC 3339 UTC with the fraction only when not whole, and parse
        back to the same nanoseconds; 0 is null."""
        for ns in (1714564800 * 10**9, 1714564800_123456789, 1714564800_500000000):
            text = timefmt.rfc3339(ns)
            self.assertTrue(text.endswith("Z"), text)
            self.assertEqual(timefmt.parse_time(text, 0) // 1000, ns // 1000)
        self.assertEqual(timefmt.rfc3339(1714564800_500000000), "2024-05-01T12:00:00.5Z")
        self.assertEqual(timefmt.time_fields("t", 0), {"t": None, "t_ns": 0})


class OperatorCommandTests(CliTestBase):
    def setUp(self):
        super().setUp()
        self.cleanups = []

        def cleanup(dry_run):
            self.cleanups.append(dry_run)
            return defer.succeed(types.SimpleNamespace(
                jobs_deleted=1, bytes_freed=2048, deleted_job_ids=[JOB]))

        self.serve(PersistServicer(
            self.storage, self.reactor, is_healthy=lambda: True, ingest_stats=lambda: {},
            delete_job=self.storage.delete_job, cleanup=cleanup,
        ))

    def test_json_times_are_rfc3339_and_ns(self):
        """jobs and info JSON carry created_at/last_updated as RFC 3339 plus _ns; either
        form pasted into --since selects the job."""
        for argv in (["jobs", "--json"], ["info", JOB, "--json"]):
            record = json.loads(self.run_cli(*argv)[1].splitlines()[0])
            self.assertEqual(record["created_at"], "2023-11-14T22:13:20Z")
            self.assertEqual(record["created_at_ns"], 1_700_000_000 * 10**9)
            self.assertEqual(record["last_updated_ns"], 1_700_000_000 * 10**9)
        record = json.loads(self.run_cli("jobs", "--json")[1].splitlines()[0])
        for since in (record["created_at"], f"{record['created_at_ns']}ns"):
            out = self.run_cli("jobs", "--json", "--since", since)[1]
            self.assertEqual(len(out.splitlines()), 1, since)
        code, out, err = self.run_cli("jobs", "--since", str(record["created_at_ns"]))
        self.assertEqual((code, out), (2, b""))
        self.assertIn("ambiguous time", err)

    def test_no_header_before_an_error(self):
        """metrics and events of an unknown job print nothing on stdout, one error line."""
        for argv in (["metrics", "nosuchjob"], ["metrics", "nosuchjob", "--csv"],
                     ["events", "nosuchjob"], ["events", "nosuchjob", "--csv"]):
            code, out, err = self.run_cli(*argv)
            self.assertEqual((code, out), (3, b""), argv)
            self.assertEqual(err.count("\n"), 1)

    def test_version(self):
        """--version prints the package version and exits 0."""
        code, out, _ = self.run_cli("--version", socket=False)
        self.assertEqual((code, out.decode().strip()), (0, f"joblet-persist-ctl {__version__}"))

    def test_csv_tables(self):
        """jobs and events have --csv: a header row with the time pair, then one row each."""
        rows = list(csv.DictReader(io.StringIO(self.run_cli("jobs", "--csv")[1].decode())))
        self.assertEqual([r["job_uuid"] for r in rows], [JOB])
        self.assertEqual(rows[0]["created_at"], "2023-11-14T22:13:20Z")
        self.assertEqual(rows[0]["log_count"], "3")
        out = self.run_cli("events", JOB, "--csv")[1].decode()
        self.assertEqual(out.splitlines()[0],
                         "timestamp,timestamp_ns,sequence,kind,pid,comm,detail")
        out = self.run_cli("metrics", JOB, "--csv")[1].decode()
        row = next(csv.DictReader(io.StringIO(out)))
        self.assertEqual((row["timestamp"], row["timestamp_ns"]),
                         ("2024-05-01T12:00:00Z", str(1714564800 * 10**9)))
        self.assertEqual(self.run_cli("jobs", "--csv", "--json")[0], 2)

    def test_cleanup(self):
        """cleanup calls CleanupOldData (dry run or not) and prints what it freed."""
        code, out, _ = self.run_cli("cleanup", "--dry-run")
        self.assertEqual(code, 0)
        self.assertIn("would delete 1 jobs, 2048 bytes", out.decode())
        self.assertIn(JOB, out.decode())
        code, out, _ = self.run_cli("cleanup", "--json")
        self.assertEqual(json.loads(out), {"dry_run": False, "jobs_deleted": 1,
                                           "bytes_freed": 2048, "deleted_job_ids": [JOB]})
        self.assertEqual(self.cleanups, [True, False])

    def run_tty(self, answer, *argv):
        class Terminal(io.StringIO):
            def isatty(self):
                return True

        out, err = io.StringIO(), Terminal()
        code = cli.main(["--socket", self.socket, *argv], stdout=out, stderr=err,
                        stdin=Terminal(answer))
        return code, out.getvalue(), err.getvalue()

    def exists(self):
        return self.run_cli("info", JOB)[0] == 0

    def test_delete_asks_on_a_terminal(self):
        """On a terminal delete shows the job and asks; anything but y keeps the job
        (exit 1); y deletes it."""
        code, out, err = self.run_tty("n\n", "delete", JOB)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"delete job {JOB}: 3 log messages", err)
        self.assertIn("[y/N]", err)
        self.assertTrue(self.exists())
        code, out, err = self.run_tty("y\n", "delete", JOB)
        self.assertEqual(code, 0)
        self.assertFalse(self.exists())

    def test_delete_does_not_ask_without_a_terminal(self):
        """With stdin or stderr not a terminal (a script), delete does not ask."""
        code, out, err = self.run_cli("delete", JOB)
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(self.exists())

    def test_delete_yes_and_dry_run(self):
        """--dry-run deletes nothing and says what it would delete; an unknown job is
        exit 3; --yes deletes without asking."""
        code, out, err = self.run_tty("", "delete", JOB, "--dry-run")
        self.assertEqual(code, 0)
        self.assertIn(f"would delete job {JOB}", out)
        self.assertTrue(self.exists())
        self.assertEqual(self.run_tty("", "delete", "nosuchjob", "--dry-run")[0], 3)
        code, out, err = self.run_tty("", "delete", JOB, "--yes")
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(self.exists())
