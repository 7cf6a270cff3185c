"""Tests for the retention planner (pure) and runner (reactor side, with fakes)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.retention import (
    JobUsage,
    RetentionPolicy,
    RetentionRunner,
    SegmentUsage,
    Target,
    plan_retention,
)
from joblet_persist.storage.api import SpaceProbe, StorageUnavailable
from tests.fakes import FakeStorage, log_batch, metric_batch
from tests.storage_contract import event_batch, event_payload

DAY = 86400.0
NOW = 1_800_000_000.0


def job(job_id, idle_days, logs=100, metrics=10, segments=None):
    return JobUsage(job_id, NOW - idle_days * DAY, logs, metrics, segments)


class PlannerTests(SynchronousTestCase):
    def test_nothing_configured_deletes_nothing(self):
        """With every rule disabled the plan is empty, whatever the ages."""
        plan = plan_retention([job("a", 1000)], RetentionPolicy(), NOW)
        self.assertEqual(plan.actions, ())

    def test_age_deletes_idle_jobs_and_spares_active(self):
        """Jobs idle past both ages are deleted whole; jobs inside the active window, or
        busy with buffered data, are never deleted by age."""
        policy = RetentionPolicy(log_max_age=7 * DAY, metric_max_age=7 * DAY, active_window=600)
        jobs = [job("old", 10), job("young", 1), job("busy-old", 10),
                JobUsage("just-now", NOW - 10, 5, 5)]
        plan = plan_retention(jobs, policy, NOW, busy={"busy-old"})
        self.assertEqual(plan.deleted_job_ids, ["old"])
        self.assertEqual(plan.bytes_freed, 110)

    def test_separate_ages_for_logs_and_metrics(self):
        """A job idle past the log age but not the metric age loses only its logs; past both
        it is deleted whole."""
        policy = RetentionPolicy(log_max_age=2 * DAY, metric_max_age=30 * DAY)
        plan = plan_retention([job("a", 5), job("b", 40)], policy, NOW)
        self.assertEqual(
            [(a.what, a.job_id, a.size_bytes) for a in plan.actions],
            [("logs", "a", 100), ("job", "b", 110)],
        )

    def test_events_have_their_own_age(self):
        """Events expire after event_max_age on their own; a job whose every part with
        data expired is deleted whole, events included; quota counts event bytes."""
        policy = RetentionPolicy(log_max_age=30 * DAY, metric_max_age=30 * DAY,
                                 event_max_age=2 * DAY)
        jobs = [JobUsage("a", NOW - 5 * DAY, 100, 10, None, 50),
                JobUsage("b", NOW - 40 * DAY, 100, 10, None, 50),
                JobUsage("events-only", NOW - 5 * DAY, 0, 0, None, 70)]
        plan = plan_retention(jobs, policy, NOW)
        self.assertEqual(
            [(a.what, a.job_id, a.size_bytes) for a in plan.actions],
            [("events", "a", 50), ("job", "b", 160), ("job", "events-only", 70)],
        )
        self.assertIs(plan.actions[0].what, Target.EVENTS)
        quota = plan_retention(jobs[:1], RetentionPolicy(total_max_bytes=120), NOW)
        self.assertEqual([(a.what, a.size_bytes) for a in quota.actions], [("job", 160)])

    def test_disabled_metric_age_keeps_metrics(self):
        """metric_max_age 0 never deletes metrics, even when logs expire."""
        policy = RetentionPolicy(log_max_age=DAY)
        plan = plan_retention([job("a", 5), job("nometrics", 5, metrics=0)], policy, NOW)
        self.assertEqual(
            [(a.what, a.job_id) for a in plan.actions], [("logs", "a"), ("job", "nometrics")]
        )

    def test_job_cap_drops_oldest_closed_segments(self):
        """A job over the cap loses its oldest closed segments until it fits; the segment
        being written is never dropped."""
        segs = (
            SegmentUsage("stdout", 0, 40, False),
            SegmentUsage("stdout", 1, 40, False),
            SegmentUsage("stdout", 2, 40, True),
            SegmentUsage("metrics", 0, 10, True),
        )
        policy = RetentionPolicy(job_max_bytes=60)
        plan = plan_retention([JobUsage("a", NOW, 120, 10, segs)], policy, NOW)
        self.assertEqual(
            [(a.what, a.segment.kind, a.segment.index) for a in plan.actions],
            [("segment", "stdout", 0), ("segment", "stdout", 1)],
        )
        self.assertEqual(plan.bytes_freed, 80)

    def test_quota_deletes_least_recently_updated_first(self):
        """Over the total quota, whole jobs go in order of last update until under it;
        active jobs are spared and a remaining shortfall is reported."""
        policy = RetentionPolicy(total_max_bytes=250, active_window=60)
        jobs = [job("mid", 5), job("oldest", 9), job("newest", 1), job("active", 0)]
        plan = plan_retention(jobs, policy, NOW)
        self.assertEqual(plan.deleted_job_ids, ["oldest", "mid"])
        self.assertEqual(plan.shortfall_bytes, 0)
        tight = RetentionPolicy(total_max_bytes=10, active_window=60)
        plan = plan_retention(jobs, tight, NOW)
        self.assertEqual(plan.deleted_job_ids, ["oldest", "mid", "newest"])
        self.assertEqual(plan.shortfall_bytes, 100)

    def test_free_space_floor(self):
        """Below the free-space floor, LRU jobs are deleted until the deficit is covered."""
        policy = RetentionPolicy(min_free_bytes=1000)
        jobs = [job("a", 3), job("b", 2), job("c", 1)]
        plan = plan_retention(jobs, policy, NOW, free_bytes=800)
        self.assertEqual(plan.deleted_job_ids, ["a", "b"])
        self.assertEqual(plan_retention(jobs, policy, NOW, free_bytes=5000).actions, ())

    def test_quota_folds_partial_actions(self):
        """A job that lost its logs by age and is then deleted for quota appears once, as a
        whole-job deletion of its full size."""
        policy = RetentionPolicy(log_max_age=DAY, total_max_bytes=5)
        plan = plan_retention([job("a", 3)], policy, NOW)
        self.assertEqual([(a.what, a.size_bytes) for a in plan.actions], [("job", 110)])


def _storage(clock, jobs, **kwargs) -> FakeStorage:
    """A FakeStorage holding ``jobs``: (job id, Unix seconds of its data), each with one log
    and one metric batch, written with the clock at that time; the clock is left at NOW."""
    storage = FakeStorage(now=clock.seconds, **kwargs)
    for job_id, when in sorted(jobs, key=lambda j: j[1]):
        clock.advance(when - clock.seconds())
        storage.append_logs(log_batch(job_id, 1, [(1, 1, b"x" * 36)]))
        storage.append_metrics(metric_batch(job_id, [(1, 1, {"cpu_usage": 1.0})]))
    clock.advance(NOW - clock.seconds())
    return storage


class RunnerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.storage = _storage(self.clock, [("old", NOW - 10 * DAY), ("new", NOW)])
        self.old_size = self.storage.job_info("old").size_bytes
        self.discarded = []

        def discard(job_id):
            self.discarded.append(job_id)
            return defer.succeed(None)

        self.runner = RetentionRunner(
            self.storage,
            RetentionPolicy(log_max_age=DAY, metric_max_age=DAY),
            self.clock,
            busy_jobs=set,
            discard_job=discard,
        )

    def test_dry_run_deletes_nothing(self):
        """A dry run reports what would go and deletes nothing."""
        result = self.successResultOf(self.runner.run(dry_run=True))
        self.assertEqual(result.deleted_job_ids, ["old"])
        self.assertEqual(result.bytes_freed, self.old_size)
        self.assertEqual(self.storage.deleted, [])
        self.assertEqual(self.discarded, [])

    def test_run_discards_writer_state_then_deletes(self):
        """A real run discards the writer's buffers for the job before deleting it."""
        result = self.successResultOf(self.runner.run())
        self.assertEqual(result.deleted_job_ids, ["old"])
        self.assertEqual(result.jobs_deleted, 1)
        self.assertEqual(self.discarded, ["old"])
        self.assertEqual(self.storage.deleted, ["old"])

    def test_failed_deletion_logged_and_run_continues(self):
        """A deletion that fails is logged and counted; the run still completes."""
        self.storage.fail_deletes.add("old")
        result = self.successResultOf(self.runner.run())
        self.assertEqual(result.errors, 1)
        self.assertEqual(result.deleted_job_ids, [])
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 1)


class _CountingRunner:
    def __init__(self):
        self.calls = 0
        self.fail_next = False
        self.pending = None

    def run(self, dry_run=False):
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            return defer.fail(RuntimeError("disk went away"))
        if self.pending is not None:
            return self.pending
        return defer.succeed(None)


class TimerServiceTests(SynchronousTestCase):
    def test_runs_every_interval_and_survives_errors(self):
        """The timer runs retention each interval; a failed run is logged and the next
        interval runs again."""
        from joblet_persist.retention import RetentionTimerService

        clock = task.Clock()
        runner = _CountingRunner()
        svc = RetentionTimerService(clock, runner, 300)
        svc.startService()
        self.assertEqual(runner.calls, 0)
        clock.advance(300)
        self.assertEqual(runner.calls, 1)
        runner.fail_next = True
        clock.advance(300)
        self.assertEqual(runner.calls, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(300)
        self.assertEqual(runner.calls, 3)
        svc.stopService()
        clock.advance(3000)
        self.assertEqual(runner.calls, 3)

    def test_stop_waits_for_run_in_progress(self):
        """Stopping while a run is in progress fires only when the run ends."""
        from joblet_persist.retention import RetentionTimerService

        clock = task.Clock()
        runner = _CountingRunner()
        runner.pending = defer.Deferred()
        svc = RetentionTimerService(clock, runner, 10)
        svc.startService()
        clock.advance(10)
        stopped = svc.stopService()
        self.assertNoResult(stopped)
        runner.pending.callback(None)
        self.successResultOf(stopped)

    def test_overlapping_runs_serialised(self):
        """A run requested during another waits for it and both callers get their own
        result (not None)."""
        clock = task.Clock()
        storage = _storage(clock, [("old", NOW - 10 * DAY)])
        gate = defer.Deferred()
        runner = RetentionRunner(
            storage, RetentionPolicy(log_max_age=DAY, metric_max_age=DAY), clock,
            busy_jobs=set, discard_job=lambda j: gate,
        )
        first = runner.run()
        second = runner.run(dry_run=True)
        self.assertNoResult(second)
        gate.callback(None)
        self.assertEqual(self.successResultOf(first).deleted_job_ids, ["old"])
        self.assertEqual(self.successResultOf(second).deleted_job_ids, [])


class RunnerCapabilityTests(SynchronousTestCase):
    """The runner reaches what only some backends can do through their capability interfaces."""

    def runner(self, storage, clock, **policy):
        return RetentionRunner(
            storage, RetentionPolicy(**policy), clock, busy_jobs=set,
            discard_job=lambda j: defer.succeed(None),
        )

    def test_part_deleted_by_age(self):
        """Logs older than their age limit go through delete_part; the metrics stay."""
        clock = task.Clock()
        storage = _storage(clock, [("old", NOW - 10 * DAY)])
        logs, metrics, _events = storage.part_sizes("old")
        result = self.successResultOf(
            self.runner(storage, clock, log_max_age=DAY, metric_max_age=30 * DAY).run()
        )
        self.assertEqual((result.jobs_deleted, result.bytes_freed), (0, logs))
        self.assertEqual(storage.deleted, [("old", "logs")])
        self.assertEqual(storage.part_sizes("old"), (0, metrics, 0))

    def test_events_deleted_by_age_through_delete_part(self):
        """Events older than eventMaxAge go through delete_part("events"); logs and
        metrics stay, and the job keeps its other counts."""
        clock = task.Clock()
        clock.advance(NOW - 10 * DAY - clock.seconds())
        storage = FakeStorage(now=clock.seconds)
        storage.append_logs(log_batch("old", 1, [(1, 1, b"x" * 36)]))
        storage.append_events(event_batch("old", "exec", [(1, 1, 5, event_payload("exec", 1, 1))]))
        clock.advance(NOW - clock.seconds())
        logs, metrics, events_bytes = storage.part_sizes("old")
        self.assertGreater(events_bytes, 0)
        result = self.successResultOf(
            self.runner(storage, clock, log_max_age=30 * DAY, event_max_age=DAY).run()
        )
        self.assertEqual((result.jobs_deleted, result.bytes_freed), (0, events_bytes))
        self.assertEqual(storage.deleted, [("old", "events")])
        self.assertEqual(storage.part_sizes("old"), (logs, 0, 0))
        self.assertEqual(storage.job_info("old").event_count, 0)

    def test_job_cap_drops_oldest_segments(self):
        """Over the per-job cap, the oldest closed segments are dropped (IRetentionSegments)."""
        clock = task.Clock()
        clock.advance(NOW - DAY)
        storage = FakeStorage(now=clock.seconds, segment_max_bytes=1)
        for n in range(3):
            storage.append_logs(log_batch("big", 1, [(n + 1, n, b"y" * 100)]))
        clock.advance(DAY)
        segments = storage.segment_usage("big")
        self.assertEqual(len(segments), 3)
        cap = storage.job_info("big").size_bytes - 1
        result = self.successResultOf(self.runner(storage, clock, job_max_bytes=cap).run())
        self.assertEqual(storage.deleted, [("big", "stdout", 0)])
        self.assertEqual(result.bytes_freed, segments[0].size_bytes)

    def test_job_cap_needs_segments(self):
        """A backend without IRetentionSegments is never asked for segments: the cap is
        skipped, other rules still apply."""
        clock = task.Clock()
        clock.advance(NOW - DAY)
        storage = FakeStorage(now=clock.seconds, segment_max_bytes=1, capabilities=())
        for n in range(3):
            storage.append_logs(log_batch("big", 1, [(n + 1, n, b"y" * 100)]))
        clock.advance(DAY)
        result = self.successResultOf(self.runner(storage, clock, job_max_bytes=1).run())
        self.assertEqual((result.actions, storage.deleted), ((), []))

    def test_free_space_floor_from_backend(self):
        """The free-space floor reads the backend's IFreeSpace: short of it, the least
        recently updated idle job goes; with room to spare, nothing does."""
        clock = task.Clock()
        storage = _storage(clock, [("old", NOW - 10 * DAY), ("older", NOW - 20 * DAY)])
        runner = self.runner(storage, clock, min_free_bytes=1000)
        storage.space = SpaceProbe(True, None, 10**6)
        self.assertEqual(self.successResultOf(runner.run()).actions, ())
        storage.space = SpaceProbe(True, None, 999)
        self.assertEqual(self.successResultOf(runner.run()).deleted_job_ids, ["older"])

    def test_free_space_floor_needs_probe(self):
        """A backend without IFreeSpace: the floor cannot be judged and deletes nothing."""
        clock = task.Clock()
        storage = _storage(clock, [("old", NOW - 10 * DAY)], capabilities=())
        result = self.successResultOf(self.runner(storage, clock, min_free_bytes=10**18).run())
        self.assertEqual(result.actions, ())
