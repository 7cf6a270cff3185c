"""--check-config's error lines (checkconfig.py) and start-up failure lines (services.py)."""

from __future__ import annotations

import io
import os
import tempfile

from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.checkconfig import check, key_line
from joblet_persist.services import StartRefused, start_failure_reason

TEXT = """\
persist:
  storage:
    retention:
      interval: 5m
  archive:
    s3:
      kinds:
        - logs
        - nope
"""


class KeyLineTests(SynchronousTestCase):
    def test_lines_of_dotted_keys(self):
        """The line of a dotted key, of a list item, and of the deepest part present."""
        self.assertEqual(key_line(TEXT, "persist.storage.retention.interval"), 4)
        self.assertEqual(key_line(TEXT, "persist.archive.s3.kinds[1]"), 9)
        self.assertEqual(key_line(TEXT, "persist.storage.retention.nosuch"), 3)
        self.assertIsNone(key_line(TEXT, "other"))
        self.assertIsNone(key_line("a: [", "a"))

    def test_check_reports_file_line_and_key(self):
        """check() prints one error line with file, line and key, and returns 1; a valid
        file prints YAML and returns 0."""
        fd, path = tempfile.mkstemp(suffix=".yml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "w") as f:
            f.write("writer:\n  flushInterval: 1s\n  batchMaxBytes: -3\n")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check(path, None, out, err), 1)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertIn(f"{path}, line 3: writer.batchMaxBytes:", err.getvalue())
        with open(path, "w") as f:
            f.write("writer:\n  flushInterval: 2s\n")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check(path, None, out, err), 0)
        self.assertIn("flushInterval: 2.0", out.getvalue())


class StartFailureReasonTests(SynchronousTestCase):
    def test_operator_errors_are_one_line(self):
        """Refusals, addresses in use and OS errors on paths read as one line; anything
        else (a bug) gets None, so it is logged with its traceback."""
        def reason(exc):
            try:
                raise exc
            except Exception:
                return start_failure_reason(Failure())

        self.assertEqual(reason(StartRefused("locked")), "locked")
        in_use = CannotListenError("127.0.0.1", 9092, OSError(98, "Address already in use"))
        self.assertEqual(reason(in_use), "cannot listen on 127.0.0.1:9092: Address already in use")
        denied = CannotListenError(None, "/run/p/ipc.sock", OSError(13, "Permission denied"))
        self.assertEqual(reason(denied), "cannot listen on /run/p/ipc.sock: Permission denied")
        self.assertEqual(reason(NotADirectoryError(20, "Not a directory", "/x/f/s.sock")),
                         "Not a directory: /x/f/s.sock")
        self.assertEqual(reason(OSError("cannot listen on 127.0.0.1:1:\n in use")),
                         "cannot listen on 127.0.0.1:1: in use")
        self.assertIsNone(reason(KeyError("x")))
