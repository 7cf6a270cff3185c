"""The debouncer: at most one run per interval, flush now, stop waits for the run in flight."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.debounce import Debouncer, PendingWrites


class Recorder:
    """The debounced function: records when it ran; each run's result is a manual Deferred."""

    def __init__(self, clock, manual: bool = False):
        self.clock = clock
        self.manual = manual
        self.runs: list[float] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self):
        self.runs.append(self.clock.seconds())
        if not self.manual:
            return len(self.runs)
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, result=None):
        self.pending.pop(0).callback(result if result is not None else len(self.runs))


class DebouncerTests(SynchronousTestCase):
    def make(self, manual=False, interval=5.0):
        clock = task.Clock()
        f = Recorder(clock, manual)
        return clock, f, Debouncer(clock, interval, f)

    def test_calls_within_the_interval_make_one_run(self):
        """Many calls inside one interval run the function once, interval seconds after the first."""
        clock, f, debounced = self.make()
        debounced()
        clock.advance(2)
        debounced()
        debounced()
        self.assertEqual(f.runs, [])
        clock.advance(3)
        self.assertEqual(f.runs, [5.0])
        clock.advance(100)
        self.assertEqual(f.runs, [5.0])

    def test_calls_during_a_run_start_a_timer_when_it_ends(self):
        """A call while a run is in flight runs again, but only interval seconds after it ends."""
        clock, f, debounced = self.make(manual=True)
        debounced()
        clock.advance(5)
        debounced()
        clock.advance(10)
        self.assertEqual(f.runs, [5.0], "at most one run in flight")
        f.finish()
        clock.advance(4.9)
        self.assertEqual(f.runs, [5.0])
        clock.advance(0.1)
        self.assertEqual(f.runs, [5.0, 20.0])

    def test_flush_runs_now_and_cancels_the_timer(self):
        """flush() runs at once, fires with the run's result, and the waiting timer is gone."""
        clock, f, debounced = self.make()
        debounced()
        clock.advance(1)
        self.assertEqual(self.successResultOf(debounced.flush()), 1)
        self.assertEqual(f.runs, [1.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_flush_during_a_run_runs_again_after_it(self):
        """flush() during a run waits for it, then runs again at once (its changes are newer)."""
        clock, f, debounced = self.make(manual=True)
        first = debounced.flush()
        second = debounced.flush()
        third = debounced.flush()
        self.assertEqual(f.runs, [0.0])
        f.finish("one")
        self.assertEqual(self.successResultOf(first), "one")
        self.assertNoResult(second)
        self.assertEqual(f.runs, [0.0, 0.0], "one more run serves every flush made meanwhile")
        f.finish("two")
        self.assertEqual(self.successResultOf(second), "two")
        self.assertEqual(self.successResultOf(third), "two")

    def test_failed_run_fails_its_flushes_and_does_not_stop_the_debouncer(self):
        """A run that fails errbacks its flush() callers; later calls still run."""
        clock, f, debounced = self.make(manual=True)
        d = debounced.flush()
        f.pending.pop(0).errback(OSError("disk full"))
        self.failureResultOf(d, OSError)
        debounced()
        clock.advance(5)
        self.assertEqual(f.runs, [0.0, 5.0])

    def test_stop_runs_a_requested_run_at_once_and_starts_no_timer(self):
        """stop() runs what was requested now; later calls start no timer, flush() still runs."""
        clock, f, debounced = self.make()
        debounced()
        self.successResultOf(debounced.stop())
        self.assertEqual(f.runs, [0.0])
        debounced()
        self.assertTrue(debounced.requested)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.successResultOf(debounced.flush())
        self.assertEqual(f.runs, [0.0, 0.0])

    def test_stop_fires_when_the_run_in_flight_ends(self):
        """stop()'s Deferred waits for the run in flight, and nothing runs after it."""
        clock, f, debounced = self.make(manual=True)
        debounced.flush()
        d = debounced.stop()
        self.assertNoResult(d)
        f.finish()
        self.assertIsNone(self.successResultOf(d))
        clock.advance(100)
        self.assertEqual(f.runs, [0.0])

    def test_stop_without_flush_leaves_the_request_for_flush(self):
        """stop(flush=False) cancels the timer and does not run; the request stays for flush()."""
        clock, f, debounced = self.make()
        debounced()
        self.successResultOf(debounced.stop(flush=False))
        clock.advance(100)
        self.assertEqual(f.runs, [])
        self.assertTrue(debounced.requested)

    def test_function_that_completes_synchronously(self):
        """A function returning a plain value (no Deferred) completes its run at once."""
        clock, f, debounced = self.make()
        self.assertEqual(self.successResultOf(debounced.flush()), 1)
        self.assertFalse(debounced.running)
        debounced()
        clock.advance(5)
        self.assertEqual(f.runs, [0.0, 5.0])


class PendingWritesTests(SynchronousTestCase):
    def test_due_once_the_last_write_is_old_enough(self):
        """Changes are counted; a change is due when the last write is at least the interval
        old (the first one at once); writing resets the count and the age."""
        clock = task.Clock()
        clock.advance(100)
        pending = PendingWrites(clock)
        self.assertEqual(pending.count, 0)
        self.assertTrue(pending.note(1.0))
        pending.writing()
        self.assertEqual(pending.count, 0)
        clock.advance(0.5)
        self.assertFalse(pending.note(1.0))
        self.assertFalse(pending.note(1.0))
        self.assertEqual(pending.count, 2)
        clock.advance(0.5)
        self.assertTrue(pending.note(1.0))
        self.assertEqual(pending.count, 3)
        self.assertFalse(pending.note(1000.0))
