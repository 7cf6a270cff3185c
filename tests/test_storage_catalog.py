"""JobCatalog alone: totals, ListJobs order and paging, and the debounced index write."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage.api import JobInfo
from joblet_persist.storage.catalog import JobCatalog


def info(job, created, logs=0, metrics=0, size=0):
    return JobInfo(job, created, created, logs, metrics, size, 0, 0)


class Writes:
    """The injected index write: records each call; results come from manual Deferreds."""

    def __init__(self, clock):
        self.clock = clock
        self.calls: list = []
        self.pending: list = []

    def __call__(self, jobs, parts):
        self.calls.append((self.clock.seconds(), dict(jobs), dict(parts)))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, ok=True):
        self.pending.pop(0).callback(ok)


class JobCatalogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.writes = Writes(self.clock)
        self.catalog = JobCatalog(self.clock, 5.0, self.writes)
        self.catalog.load({"a": info("a", 10, 1, 2, 30)}, {"a": (20, 10)})

    def test_totals_follow_set_and_drop(self):
        """totals() and part_sizes() add up every entry as jobs are added, changed, dropped."""
        c = self.catalog
        self.assertEqual(c.totals(), (1, 1, 2, 30))
        c.set_info("b", info("b", 20, 5, 0, 100), (100, 0))
        c.set_info("a", info("a", 10, 2, 2, 40), (30, 10))
        self.assertEqual(c.totals(), (2, 7, 2, 140))
        self.assertEqual(c.part_sizes("a"), (30, 10))
        c.drop_info("b")
        self.assertEqual(c.totals(), (1, 2, 2, 40))
        self.assertEqual(c.part_sizes("b"), (0, 0, 0))
        self.assertNotIn("b", c)

    def test_pages_newest_first_with_bounds(self):
        """list_jobs_page orders by created_at descending, ties by id, and applies the bounds."""
        c = self.catalog
        c.set_info("c", info("c", 30), (0, 0))
        c.set_info("b", info("b", 30), (0, 0))
        c.set_info("d", info("d", 40), (0, 0))
        total, infos = c.list_jobs_page(0, 0, 0, 0)
        self.assertEqual((total, [i.job_id for i in infos]), (4, ["d", "b", "c", "a"]))
        total, infos = c.list_jobs_page(20, 35, 1, 1)
        self.assertEqual((total, [i.job_id for i in infos]), (2, ["c"]))
        # created_at changes move the job in the order.
        c.set_info("a", info("a", 50), (0, 0))
        self.assertEqual([i.job_id for i in c.list_jobs_page(0, 0, 0, 1)[1]], ["a"])
        self.assertEqual([i.job_id for i in c.list_jobs()], ["a", "b", "c", "d"])

    def test_changes_are_written_once_per_interval(self):
        """Changes within the interval make one write, of the state at the time it runs."""
        c = self.catalog
        c.set_info("b", info("b", 20), (0, 0))
        self.clock.advance(1)
        c.set_info("c", info("c", 30), (0, 0))
        self.assertEqual(self.writes.calls, [])
        self.clock.advance(4)
        self.assertEqual(len(self.writes.calls), 1)
        when, jobs, _ = self.writes.calls[0]
        self.assertEqual((when, sorted(jobs)), (5.0, ["a", "b", "c"]))

    def test_flush_during_a_write_writes_again_after_it(self):
        """flush() while a write is in flight waits for it and then writes the newer state."""
        c = self.catalog
        first = c.flush()
        c.set_info("b", info("b", 20), (0, 0))
        second = c.flush()
        self.writes.finish()
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(second)
        self.assertIn("b", self.writes.calls[1][1])
        self.writes.finish(False)
        self.assertFalse(self.successResultOf(second))

    def test_write_again_retries_within_the_interval(self):
        """write_again() (after a failed write) writes again interval seconds after the run ends."""
        c = self.catalog
        c.flush()
        c.write_again()
        self.writes.finish(False)
        self.clock.advance(5)
        self.assertEqual(len(self.writes.calls), 2)

    def test_stop_writes_leaves_only_flush(self):
        """After stop_writes() changes start no timer; flush() still writes."""
        c = self.catalog
        c.set_info("b", info("b", 20), (0, 0))
        c.stop_writes()
        c.set_info("c", info("c", 30), (0, 0))
        self.clock.advance(60)
        self.assertEqual(self.writes.calls, [])
        c.flush()
        self.assertEqual(sorted(self.writes.calls[0][1]), ["a", "b", "c"])
