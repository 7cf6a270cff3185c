"""DirtyPaths alone: the "interval" fsync policy's timer and its retry on failure."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.logs import Logger
from joblet_persist.storage.diskwork import thd_fsync_paths
from joblet_persist.storage.syncer import DirtyPaths


class ManualRunner:
    """A thread runner whose jobs complete when the test says so."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d


class DirtyPathsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.run = ManualRunner()
        self.dirty = DirtyPaths(self.run, self.clock, 1.0, Logger(namespace="test.syncer"))

    def test_fsync_within_the_interval_of_the_first_append(self):
        """Paths added within one interval are fsync'd together, interval after the first."""
        self.dirty.add(("/d/a",))
        self.clock.advance(0.5)
        self.dirty.add(("/d/b", "/d"))
        self.clock.advance(0.5)
        [(f, args, _)] = self.run.calls
        self.assertIs(f, thd_fsync_paths)
        self.assertEqual(args, (["/d", "/d/a", "/d/b"],))

    def test_append_during_an_fsync_starts_its_timer_at_once(self):
        """An append while an fsync runs is synced one interval after it, not after the fsync."""
        self.dirty.add(("/d/a",))
        self.clock.advance(1.0)
        self.assertEqual(len(self.run.calls), 1)  # in flight, not finished
        self.dirty.add(("/d/b",))
        self.clock.advance(1.0)
        self.assertEqual(len(self.run.calls), 2)
        self.assertEqual(self.run.calls[1][1], (["/d/b"],))

    def test_failed_fsync_keeps_the_paths(self):
        """A failed sync() fails its Deferred and leaves the paths for the next one."""
        self.dirty.add(("/d/a",))
        d = self.dirty.sync()
        self.run.calls[0][2].errback(OSError("EIO"))
        self.failureResultOf(d, OSError)
        self.assertTrue(self.dirty)
        d = self.dirty.sync()
        self.run.calls[1][2].callback(None)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertFalse(self.dirty)

    def test_stop_timer_then_only_sync(self):
        """After stop_timer() nothing is synced by time; sync() (the stop's last step) still is."""
        self.dirty.add(("/d/a",))
        self.dirty.stop_timer()
        self.dirty.add(("/d/b",))
        self.clock.advance(10)
        self.assertEqual(self.run.calls, [])
        self.dirty.sync()
        self.assertEqual(self.run.calls[0][1], (["/d/a", "/d/b"],))

    def test_discard_under_forgets_removed_directories(self):
        """Paths under a removed job directory are not fsync'd (they are gone)."""
        self.dirty.add(("/d/logs/j/stdout.log.gz", "/d/logs/j", "/d/logs/k/x"))
        self.dirty.discard_under(("/d/logs/j/",))
        self.dirty.sync()
        self.assertEqual(self.run.calls[0][1], (["/d/logs/k/x"],))
