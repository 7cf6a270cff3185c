"""JobGate alone: per-job work in flight, deletions that wait for it, and quiescence."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage.gate import JobGate


class JobGateTests(SynchronousTestCase):
    def test_exclusive_waits_for_work_in_flight(self):
        """A deletion starts only once the job's loads/appends in flight have ended."""
        gate = JobGate()
        gate.begin("a")
        gate.begin("a")
        ran = []
        d = gate.exclusive("a", lambda: "retried", lambda: ran.append("op") or "done")
        gate.end("a")
        self.assertEqual(ran, [])
        gate.end("a")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertFalse(gate.busy("a"))

    def test_work_during_a_deletion_waits_and_retries(self):
        """While a deletion runs, deleting() is true and after_deletion runs the retry after it."""
        gate = JobGate()
        operation = defer.Deferred()
        d = gate.exclusive("a", lambda: "retried", lambda: operation)
        self.assertTrue(gate.deleting("a"))
        later = gate.after_deletion("a", lambda: "appended")
        again = gate.exclusive("a", lambda: "deleted again", lambda: "never")
        self.assertNoResult(later)
        self.assertNoResult(again)
        operation.callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(self.successResultOf(later), "appended")
        self.assertEqual(self.successResultOf(again), "deleted again")
        self.assertFalse(gate.deleting("a"))

    def test_quiescent_after_every_job_and_deletion(self):
        """wait_quiescent fires once no job has work in flight and no deletion runs."""
        gate = JobGate()
        self.successResultOf(gate.wait_quiescent())
        gate.begin("a")
        operation = defer.Deferred()
        gate.exclusive("b", lambda: None, lambda: operation)
        d = gate.wait_quiescent()
        gate.end("a")
        self.assertNoResult(d)
        operation.callback(None)
        self.successResultOf(d)

    def test_end_after_passes_the_result_on(self):
        """end_after (an addBoth callback) ends the work and passes successes and failures on."""
        gate = JobGate()
        gate.begin("a")
        gate.begin("a")
        self.assertEqual(gate.end_after(3, "a"), 3)
        failing = defer.fail(OSError("gone")).addBoth(gate.end_after, "a")
        self.failureResultOf(failing, OSError)
        self.assertFalse(gate.busy("a"))
