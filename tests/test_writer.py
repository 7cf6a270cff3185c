"""Tests for joblet_persist.writer.BatchingWriter, with task.Clock and tests.fakes.FakeStorage.

The storage completes appends only when a test says so (``auto=False``), in any order, or
fails them, to prove ordering, flush-on-stop, retries and backpressure.
"""

from __future__ import annotations

from array import array

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from joblet_persist.storage.api import StorageUnavailable
from joblet_persist.writer import (
    FLUSH_PHASES,
    MESSAGE_MEMORY,
    MESSAGE_OVERHEAD,
    BatchingWriter,
    IIngestWriter,
    WriterStopped,
)
from tests.fakes import FakeStorage


class RecordingMetrics:
    def __init__(self):
        self.events = []

    def write_done(self, seconds, messages, nbytes):
        self.events.append(("write_done", seconds, messages, nbytes))

    def durable(self, age):
        self.events.append(("durable", age))

    def write_error(self):
        self.events.append(("write_error",))

    def buffered(self, nbytes):
        self.events.append(("buffered", nbytes))

    def backpressure(self, active):
        self.events.append(("backpressure", active))

    def named(self, name):
        return [e for e in self.events if e[0] == name]


class WriterTestMixin:
    def make(self, auto=False, **kwargs):
        self.clock = task.Clock()
        self.storage = FakeStorage(auto=auto, now=lambda: 1_700_000_000.0)
        self.pauses = []
        kwargs.setdefault("on_pause", lambda: self.pauses.append("pause"))
        kwargs.setdefault("on_resume", lambda: self.pauses.append("resume"))
        self.writer = BatchingWriter(self.storage, self.clock, **kwargs)
        return self.writer

    def add(self, job, stream, content, ts=1, seq=0):
        self.writer.add_log(job, stream, ts, seq, content)

    def stored_contents(self):
        """Contents per key from succeeded appends, in completion order."""
        out: dict = {}
        for call in self.storage.calls:
            if call.outcome == "ok":
                out.setdefault(call.key, []).extend(call.items)
        return out


class FlushTriggerTests(WriterTestMixin, SynchronousTestCase):
    def test_flush_by_message_count(self):
        """A buffer is appended as soon as it holds batch_max_messages, not before, with its
        columns in arrival order."""
        w = self.make(batch_max_messages=3)
        self.add("job1", 1, b"a", ts=10, seq=1)
        self.add("job1", 1, b"b", ts=11, seq=2)
        self.assertEqual(self.storage.calls, [])
        self.add("job1", 1, b"c", ts=12, seq=3)
        self.assertEqual(len(self.storage.calls), 1)
        batch = self.storage.calls[0].batch
        self.assertEqual(batch.job_id, "job1")
        self.assertEqual(batch.stream, 1)
        self.assertEqual(list(batch.contents), [b"a", b"b", b"c"])
        self.assertEqual(list(batch.timestamps), [10, 11, 12])
        self.assertEqual(list(batch.sequences), [1, 2, 3])
        self.assertEqual(list(batch.arrivals), [0, 1, 2])
        self.assertEqual(w.buffered_bytes, 3 * (1 + MESSAGE_MEMORY))

    def test_flush_by_size(self):
        """A buffer is appended as soon as its accounted bytes (content plus the per-message
        overhead) reach batch_max_bytes."""
        self.make(batch_max_bytes=2 * (10 + MESSAGE_OVERHEAD))
        self.add("job1", 2, b"x" * 10)
        self.assertEqual(self.storage.calls, [])
        self.add("job1", 2, b"y" * 10)
        self.assertEqual([c.items for c in self.storage.calls], [[b"x" * 10, b"y" * 10]])

    def test_flush_phases_spread_the_buffers(self):
        """Buffers that only fill by the timer (here 8 jobs' metrics, opened at once) are
        appended a quarter at each tick, each once per flush_interval, not all at one tick."""
        self.assertEqual(FLUSH_PHASES, 4)
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        for round_ in range(2):
            for job in range(8):
                w.add_metric(f"job{job}", round_, 0, b"m%d" % round_)
            sealed = []
            for _tick in range(4):
                before = len(self.storage.calls)
                self.clock.advance(0.25)
                sealed.append(sorted(c.key[0] for c in self.storage.calls[before:]))
            self.assertEqual(sealed, [["job1", "job5"], ["job2", "job6"], ["job3", "job7"],
                                      ["job0", "job4"]])

    def test_late_tick_seals_every_buffer_an_interval_old(self):
        """A tick that comes late (a stalled reactor) also seals every buffer whose oldest
        message has waited flush_interval, whatever its phase."""
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        for job in range(4):
            self.add(f"job{job}", 1, b"x")
        self.clock.advance(3.0)  # one tick, at 3.0 (phase 1)
        self.assertEqual(sorted(c.key[0] for c in self.storage.calls),
                         ["job0", "job1", "job2", "job3"])
        self.add("job0", 1, b"y")  # at 3.0
        self.clock.advance(0.5)  # the tick at 3.25 (phase 2): job0 is phase 0 and young
        self.assertEqual(len(self.storage.calls), 4)

    def test_flush_by_time(self):
        """The timer ticks FLUSH_PHASES times per flush_interval and each tick appends the
        non-empty buffers of its phase (dealt out in turn as buffers are created), so every
        buffer is appended within flush_interval; the timer keeps running and an empty
        writer appends nothing."""
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        self.add("job1", 1, b"a")  # phase 0
        self.writer.add_metric("job1", 5, 6, b"m")  # phase 1
        self.add("job2", 2, b"b")  # phase 2
        self.clock.advance(0.249)
        self.assertEqual(self.storage.calls, [])
        self.clock.advance(0.001)  # tick 1 at 0.25: phase 1
        self.assertEqual([c.items for c in self.storage.calls], [[b"m"]])
        self.clock.advance(0.25)  # tick 2: phase 2
        self.assertEqual([c.items for c in self.storage.calls], [[b"m"], [b"b"]])
        self.clock.advance(0.25)  # tick 3: phase 3, no buffer of it
        self.assertEqual(len(self.storage.calls), 2)
        self.clock.advance(0.249)
        self.assertEqual(len(self.storage.calls), 2)
        self.clock.advance(0.001)  # tick 4 at 1.0: phase 0
        self.assertEqual(
            sorted((str(c.key), c.items) for c in self.storage.calls),
            sorted(
                (str(k), v)
                for k, v in [
                    (("job1", 1), [b"a"]),
                    (("job1", "metrics"), [b"m"]),
                    (("job2", 2), [b"b"]),
                ]
            ),
        )
        self.clock.advance(5)
        self.assertEqual(len(self.storage.calls), 3)
        self.add("job1", 1, b"c")
        self.clock.advance(1.0)
        self.assertEqual(self.storage.calls[-1].items, [b"c"])
        self.assertEqual(w.buffered_bytes, 0)

    def test_metric_batch_columns(self):
        """Metric samples become a MetricBatch with the payloads as given."""
        self.make(batch_max_messages=2)
        self.writer.add_metric("job1", 100, 7, b"p1")
        self.writer.add_metric("job1", 200, 8, b"p2")
        (call,) = self.storage.calls
        self.assertEqual(call.kind, "metrics")
        self.assertEqual(
            (list(call.batch.timestamps), list(call.batch.sequences), list(call.batch.payloads)),
            ([100, 200], [7, 8], [b"p1", b"p2"]),
        )

    def test_bad_stream_refused(self):
        """add_log accepts only stream 1 or 2."""
        w = self.make()
        self.assertRaises(ValueError, w.add_log, "job1", 0, 1, 1, b"x")
        self.assertRaises(ValueError, w.add_log, "job1", 3, 1, 1, b"x")
        self.assertEqual(w.messages_received, 0)

    def test_constructor_checks(self):
        """Inconsistent settings are refused at construction."""
        clock = task.Clock()
        storage = FakeStorage()
        self.assertRaises(
            ValueError, BatchingWriter, storage, clock, high_water_bytes=10, low_water_bytes=11
        )
        self.assertRaises(ValueError, BatchingWriter, storage, clock, flush_interval=0)
        self.assertRaises(ValueError, BatchingWriter, storage, clock, batch_max_messages=0)
        self.assertRaises(ValueError, BatchingWriter, storage, clock, retry_initial=0)


class OrderingTests(WriterTestMixin, SynchronousTestCase):
    def test_one_in_flight_per_key_in_order(self):
        """While a key's append is in flight, its next batches wait and are sent one by one in
        order as each completes; another key appends in parallel and may finish first."""
        self.make(batch_max_messages=1)
        for c in (b"a1", b"a2", b"a3"):
            self.add("jobA", 1, c)
        for c in (b"b1", b"b2"):
            self.add("jobB", 1, c)
        pending = self.storage.pending()
        self.assertEqual(sorted((c.key, c.items) for c in pending),
                         [(("jobA", 1), [b"a1"]), (("jobB", 1), [b"b1"])])
        # Complete B first, then A: each key's next batch is sent only then.
        b1 = next(c for c in pending if c.key == ("jobB", 1))
        b1.succeed()
        self.assertEqual([c.items for c in self.storage.pending() if c.key == ("jobB", 1)],
                         [[b"b2"]])
        a1 = next(c for c in pending if c.key == ("jobA", 1))
        a1.succeed()
        self.assertEqual([c.items for c in self.storage.pending() if c.key == ("jobA", 1)],
                         [[b"a2"]])
        while self.storage.pending():
            self.storage.pending()[-1].succeed()
        self.assertEqual(self.stored_contents(),
                         {("jobA", 1): [b"a1", b"a2", b"a3"], ("jobB", 1): [b"b1", b"b2"]})
        self.assertEqual(self.writer.messages_written, 5)

    def test_streams_of_a_job_are_separate_keys(self):
        """stdout, stderr and metrics of one job append in parallel (separate files)."""
        self.make(batch_max_messages=1)
        self.add("job1", 1, b"out")
        self.add("job1", 2, b"err")
        self.writer.add_metric("job1", 1, 1, b"m")
        self.assertEqual(sorted(str(c.key) for c in self.storage.pending()),
                         sorted(str(k) for k in [("job1", 1), ("job1", 2), ("job1", "metrics")]))

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["add", "add", "add", "tick", "complete", "fail"]),
                st.integers(0, 2),  # job
                st.integers(1, 2),  # stream
                st.integers(0, 50),  # which pending call
            ),
            max_size=60,
        )
    )
    def test_random_schedules_lose_nothing(self, ops):
        """Under any interleaving of appends, ticks, completions in any order and failures,
        each key has at most one append in flight, storage receives every message exactly
        once, in per-key arrival order, and stop() fires once everything is stored."""
        self.make(batch_max_messages=3, retry_initial=1.0, retry_max=4.0)
        self.writer.start()
        expected: dict = {}
        n = 0
        for op, job, stream, pick in ops:
            if op == "add":
                content = b"%d" % n
                n += 1
                self.add(f"job{job}", stream, content)
                expected.setdefault((f"job{job}", stream), []).append(content)
            elif op == "tick":
                self.clock.advance(1.0)
            else:
                pending = self.storage.pending()
                if pending:
                    call = pending[pick % len(pending)]
                    call.succeed() if op == "complete" else call.fail()
            keys = [c.key for c in self.storage.pending()]
            self.assertEqual(len(keys), len(set(keys)))
        stopped = self.writer.stop()
        for _ in range(1000):
            pending = self.storage.pending()
            if not pending:
                if stopped.called:
                    break
                self.clock.advance(1.0)
                continue
            pending[0].succeed()
        self.successResultOf(stopped)
        self.assertEqual(self.stored_contents(), expected)
        self.assertEqual(self.writer.messages_written, n)
        self.assertEqual(self.writer.buffered_bytes, 0)
        self.assertTrue(self.writer.healthy)
        self.flushLoggedErrors(StorageUnavailable)


class ArrivalTests(WriterTestMixin, SynchronousTestCase):
    @given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=80))
    def test_arrivals_increase_across_streams(self, adds):
        """Each job's messages get arrivals 0, 1, 2, ... in add order across stdout, stderr
        and metrics, whatever the batching."""
        self.make(auto=True, batch_max_messages=2)
        order: dict = {}
        for job, kind in adds:
            job_id = f"job{job}"
            tag = b"%d" % len(order.setdefault(job_id, []))
            order[job_id].append(tag)
            if kind == 0:
                self.writer.add_metric(job_id, 1, 1, tag)
            else:
                self.add(job_id, kind, tag)
        self.successResultOf(self.writer.flush_all())
        seen: dict = {}
        for call in self.storage.calls:
            for arrival, item in zip(call.batch.arrivals, call.items, strict=True):
                seen.setdefault(call.batch.job_id, {})[arrival] = item
        for job_id, tags in order.items():
            self.assertEqual(seen[job_id], dict(enumerate(tags)))


class StopTests(WriterTestMixin, SynchronousTestCase):
    def test_stop_flushes_at_once(self):
        """stop() appends every open buffer at once without waiting for the timer, and
        fires when the appends have completed."""
        w = self.make(flush_interval=60)
        w.start()
        self.add("job1", 1, b"a")
        self.add("job2", 2, b"b")
        stopped = w.stop()
        self.assertEqual(len(self.storage.pending()), 2)
        self.assertNoResult(stopped)
        self.storage.pending()[0].succeed()
        self.assertNoResult(stopped)
        self.storage.pending()[0].succeed()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_in_flight_and_queued(self):
        """A batch already in flight and one queued behind it are both appended before
        stop()'s Deferred fires."""
        w = self.make(batch_max_messages=1)
        self.add("job1", 1, b"a")
        self.add("job1", 1, b"b")
        stopped = w.stop()
        self.assertNoResult(stopped)
        self.storage.pending()[0].succeed()
        self.assertNoResult(stopped)
        self.assertEqual(self.storage.pending()[0].items, [b"b"])
        self.storage.pending()[0].succeed()
        self.successResultOf(stopped)
        self.assertEqual(self.stored_contents(), {("job1", 1): [b"a", b"b"]})

    def test_stop_with_nothing_buffered(self):
        """stop() on an idle writer fires at once, and again on a second call."""
        w = self.make()
        w.start()
        self.successResultOf(w.stop())
        self.successResultOf(w.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_add_after_stop_raises(self):
        """Once stop() was called, add_log and add_metric raise WriterStopped."""
        w = self.make(auto=True)
        w.stop()
        self.assertRaises(WriterStopped, w.add_log, "job1", 1, 1, 1, b"x")
        self.assertRaises(WriterStopped, w.add_metric, "job1", 1, 1, b"x")
        self.assertRaises(WriterStopped, w.start)

    def test_stop_retries_failing_batch_at_once(self):
        """A batch waiting for its backoff retry is retried at once by stop(), and stop fires
        when it succeeds."""
        w = self.make(batch_max_messages=1, retry_initial=5.0)
        self.add("job1", 1, b"a")
        self.storage.pending()[0].fail()
        self.assertEqual(self.storage.pending(), [])
        stopped = w.stop()
        (retry,) = self.storage.pending()
        self.assertEqual(retry.items, [b"a"])
        retry.succeed()
        self.successResultOf(stopped)
        self.flushLoggedErrors(StorageUnavailable)

    def test_stop_gives_up_after_timeout(self):
        """If storage keeps failing during stop, attempts are spaced retry_initial apart and
        stop fires after stop_timeout, logging the jobs and counts it could not store."""
        w = self.make(auto=True, batch_max_messages=1000, retry_initial=0.5, stop_timeout=3.0)
        self.storage.fail_next = 10**6
        self.add("job1", 1, b"a")
        self.add("job1", 1, b"b")
        self.writer.add_metric("job2", 1, 1, b"m")
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        stopped = w.stop()
        self.assertEqual(len(self.storage.calls), 2)
        self.assertNoResult(stopped)
        self.clock.pump([0.5] * 5 + [0.49])
        self.assertNoResult(stopped)
        self.clock.advance(0.01)
        self.successResultOf(stopped)
        # Two keys, each attempted at 0, 0.5, ..., 2.5; at 3.0 the stop gives up.
        self.assertEqual(len(self.storage.calls), 2 * 6)
        self.assertEqual(w.buffered_bytes, 0)
        self.assertEqual(w.messages_written, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        errors = [e for e in logged if "timed out" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["total"], 3)
        self.assertIn("job1/stdout: 2", errors[0]["lost"])
        self.assertIn("job2/metrics: 1", errors[0]["lost"])
        self.flushLoggedErrors(StorageUnavailable)

    def test_stop_gives_up_on_hung_append(self):
        """An append that never completes does not hold stop() beyond stop_timeout; its late
        completion changes nothing."""
        w = self.make(batch_max_messages=1, stop_timeout=2.0)
        self.add("job1", 1, b"a")
        (hung,) = self.storage.pending()
        stopped = w.stop()
        self.clock.advance(2.0)
        self.successResultOf(stopped)
        hung.succeed()
        self.assertEqual(w.messages_written, 0)
        self.assertEqual(w.buffered_bytes, 0)


class FailureTests(WriterTestMixin, SynchronousTestCase):
    def test_retry_with_backoff_then_success(self):
        """A failed append is retried after retry_initial, then doubling delays up to
        retry_max; meanwhile the writer is unhealthy and the key's later batches wait;
        after success nothing is lost, order is kept and the writer is healthy again."""
        metrics = RecordingMetrics()
        w = self.make(batch_max_messages=1, retry_initial=0.5, retry_max=1.5, metrics=metrics)
        self.add("job1", 1, b"a")
        self.add("job1", 1, b"b")
        times = []
        for _ in range(4):
            (call,) = self.storage.pending()
            self.assertEqual(call.items, [b"a"])
            times.append(self.clock.seconds())
            call.fail()
            self.assertFalse(w.healthy)
            self.assertEqual(w.failed_pending, 1)
            self.assertEqual(self.storage.pending(), [])
            self.clock.advance(min(self.clock.getDelayedCalls(), key=lambda c: c.getTime())
                               .getTime() - self.clock.seconds())
        self.assertEqual(times, [0, 0.5, 1.5, 3.0])
        self.assertEqual(w.write_errors, 4)
        (call,) = self.storage.pending()
        self.assertEqual(self.clock.seconds(), 4.5)  # capped at retry_max
        call.succeed()
        self.assertTrue(w.healthy)
        self.assertEqual(w.failed_pending, 0)
        (call,) = self.storage.pending()
        self.assertEqual(call.items, [b"b"])
        call.succeed()
        self.assertEqual(self.stored_contents(), {("job1", 1): [b"a", b"b"]})
        self.assertEqual(len(metrics.named("write_error")), 4)
        self.assertEqual([e[2] for e in metrics.named("write_done")], [1, 1])
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 4)

    def test_backoff_restarts_after_success(self):
        """After a success, the next failure of that key waits retry_initial again."""
        self.make(batch_max_messages=1, retry_initial=0.5, retry_max=30)
        self.add("job1", 1, b"a")
        self.storage.pending()[0].fail()
        self.clock.advance(0.5)
        self.storage.pending()[0].fail()
        self.clock.advance(1.0)
        self.storage.pending()[0].succeed()
        self.add("job1", 1, b"b")
        self.storage.pending()[0].fail()
        self.clock.advance(0.5)
        self.assertEqual(self.storage.pending()[0].items, [b"b"])
        self.flushLoggedErrors(StorageUnavailable)

    def test_unhealthy_until_all_failing_keys_recover(self):
        """With two keys failing, one success is not enough to be healthy again."""
        w = self.make(batch_max_messages=1, retry_initial=1.0)
        self.add("job1", 1, b"a")
        self.add("job2", 1, b"b")
        for call in self.storage.pending():
            call.fail()
        self.assertEqual(w.failed_pending, 2)
        self.clock.advance(1.0)
        first, second = self.storage.pending()
        first.succeed()
        self.assertFalse(w.healthy)
        second.succeed()
        self.assertTrue(w.healthy)
        self.flushLoggedErrors(StorageUnavailable)

    def test_synchronous_storage_exception_is_a_failure(self):
        """A storage method raising instead of returning a failed Deferred is retried like
        any failure."""
        w = self.make(batch_max_messages=1, retry_initial=1.0)
        calls = []

        def broken(batch):
            calls.append(batch)
            if len(calls) == 1:
                raise StorageUnavailable("no space left on device")
            return defer.succeed(0)

        self.storage.append_logs = broken
        self.add("job1", 1, b"a")
        self.assertFalse(w.healthy)
        self.clock.advance(1.0)
        self.assertTrue(w.healthy)
        self.assertEqual(w.messages_written, 1)
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 1)


class BackpressureTests(WriterTestMixin, SynchronousTestCase):
    def test_pause_and_resume_at_exact_thresholds(self):
        """on_pause is called once when buffered bytes exceed high water (not when equal),
        on_resume once when they fall below low water (not when equal).  A message counts
        as its content plus MESSAGE_MEMORY bytes."""
        unit = 200  # accounted bytes per message below
        content = b"x" * (unit - MESSAGE_MEMORY)
        metrics = RecordingMetrics()
        w = self.make(batch_max_messages=1, high_water_bytes=10 * unit,
                      low_water_bytes=5 * unit, metrics=metrics)
        for i in range(10):
            self.add(f"job{i}", 1, content)
        self.assertEqual(w.buffered_bytes, 10 * unit)
        self.assertEqual(self.pauses, [])
        self.assertFalse(w.paused)
        self.add("job10", 1, b"")  # 10 units + MESSAGE_MEMORY > high water
        self.assertEqual(self.pauses, ["pause"])
        self.assertTrue(w.paused)
        self.add("job11", 1, content)
        self.assertEqual(self.pauses, ["pause"])
        # 11 units + the empty message; it completes first, then five others: 6 units.
        calls = {c.batch.job_id: c for c in self.storage.pending()}
        calls.pop("job10").succeed()
        for i in range(5):
            calls.pop(f"job{i}").succeed()
        self.assertEqual(w.buffered_bytes, 6 * unit)
        self.assertEqual(self.pauses, ["pause"])
        calls.pop("job5").succeed()
        self.assertEqual(w.buffered_bytes, 5 * unit)  # equal to low water: still paused
        self.assertEqual(self.pauses, ["pause"])
        calls.pop("job6").succeed()
        self.assertEqual(w.buffered_bytes, 4 * unit)
        self.assertEqual(self.pauses, ["pause", "resume"])
        self.assertFalse(w.paused)
        for call in calls.values():
            call.succeed()
        self.assertEqual(self.pauses, ["pause", "resume"])
        self.assertEqual(metrics.named("backpressure"), [("backpressure", True),
                                                         ("backpressure", False)])
        self.assertEqual(metrics.named("buffered")[-1], ("buffered", 0))

    def test_in_flight_bytes_count(self):
        """Bytes stay accounted while their append is in flight, and while it is retried."""
        one = 100 + MESSAGE_MEMORY
        w = self.make(batch_max_messages=1, high_water_bytes=one + 50, low_water_bytes=one,
                      retry_initial=1.0)
        self.add("job1", 1, b"x" * 100)
        self.assertEqual(w.buffered_bytes, one)
        self.assertEqual(self.pauses, [])
        self.add("job1", 1, b"x" * 100)
        self.assertEqual(self.pauses, ["pause"])
        self.storage.pending()[0].fail()
        self.assertEqual(w.buffered_bytes, 2 * one)
        self.clock.advance(1.0)
        self.storage.pending()[0].succeed()
        self.assertEqual(self.pauses, ["pause"])
        self.storage.pending()[0].succeed()
        self.assertEqual(self.pauses, ["pause", "resume"])
        self.flushLoggedErrors(StorageUnavailable)


class FlushAllTests(WriterTestMixin, SynchronousTestCase):
    def test_flush_all_waits_for_everything_buffered(self):
        """flush_all() seals all buffers and fires only when every batch buffered at call
        time, including queued ones, has been appended."""
        self.make(batch_max_messages=2)
        self.add("job1", 1, b"a")
        self.add("job1", 1, b"b")  # sealed, in flight
        self.add("job1", 1, b"c")  # open
        self.writer.add_metric("job2", 1, 1, b"m")
        d = self.writer.flush_all()
        self.assertNoResult(d)
        by_key = {c.key: c for c in self.storage.pending()}
        by_key[("job2", "metrics")].succeed()
        by_key[("job1", 1)].succeed()
        self.assertNoResult(d)
        (last,) = self.storage.pending()
        self.assertEqual(last.items, [b"c"])
        last.succeed()
        self.successResultOf(d)

    def test_flush_all_idle(self):
        """flush_all() with nothing buffered fires at once."""
        self.make()
        self.successResultOf(self.writer.flush_all())

    def test_metrics_on_write(self):
        """write_done reports latency on the clock, message count and raw content bytes."""
        metrics = RecordingMetrics()
        self.make(batch_max_messages=2, metrics=metrics)
        self.add("job1", 1, b"abc")
        self.add("job1", 1, b"de")
        self.clock.advance(0.25)
        self.storage.pending()[0].succeed()
        self.assertEqual(metrics.named("write_done"),
                         [("write_done", 0.25, 2, 5)])
        self.assertEqual(metrics.named("durable"), [("durable", 0.25)])

    def test_durability_lag_counts_from_the_oldest_message(self):
        """durable() reports the age of a batch's oldest message when its append is done:
        the wait for the flush timer, the append's time, and any failed attempts between."""
        metrics = RecordingMetrics()
        self.make(flush_interval=1.0, retry_initial=0.5, metrics=metrics).start()
        self.clock.advance(0.2)
        self.add("job1", 1, b"first")  # opens the buffer (phase 0) at 0.2
        self.clock.pump([0.05, 0.25])  # ticks at 0.25 and 0.5: other phases
        self.clock.advance(0.2)
        self.add("job1", 1, b"second")
        self.clock.pump([0.05, 0.25])  # ticks at 0.75 and 1.0: phase 0 seals the batch
        [call] = self.storage.pending()
        self.clock.advance(0.1)
        call.fail()
        self.clock.advance(0.5)  # retried at 1.6
        [retry] = self.storage.pending()
        self.clock.advance(0.4)
        retry.succeed()
        [(_, age)] = metrics.named("durable")
        self.assertAlmostEqual(age, 1.8)  # 2.0 - 0.2
        [(_, seconds, count, _n)] = metrics.named("write_done")
        self.assertAlmostEqual(seconds, 0.4)  # from the successful hand-over only
        self.assertEqual(count, 2)
        # The next batch counts from its own first message.
        self.add("job1", 1, b"third")  # at 2.0
        self.clock.advance(1.0)
        self.storage.pending()[0].succeed()
        self.assertAlmostEqual(metrics.named("durable")[1][1], 1.0)
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 1)


class DiscardTests(WriterTestMixin, SynchronousTestCase):
    def test_discard_drops_buffered_and_waits_for_in_flight(self):
        """discard_job drops the job's open and queued data at once, waits for its in-flight
        append, and leaves other jobs alone."""
        w = self.make(batch_max_messages=1, flush_interval=10)
        self.add("job1", 1, b"a")  # in flight
        self.add("job1", 1, b"b")  # queued
        self.writer.add_metric("job1", 1, 1, b"m")  # in flight (other key)
        self.add("job2", 1, b"keep")
        d = w.discard_job("job1")
        self.assertNoResult(d)
        pending = {c.key: c for c in self.storage.pending()}
        pending[("job1", 1)].succeed()
        self.assertNoResult(d)
        pending[("job1", "metrics")].succeed()
        self.successResultOf(d)
        self.assertEqual([c.items for c in self.storage.pending()], [[b"keep"]])
        self.assertEqual(w.buffered_bytes, 4 + MESSAGE_MEMORY)
        self.assertNotIn([b"b"], [c.items for c in self.storage.calls])

    def test_discard_resets_arrivals_and_holds_new_data(self):
        """Data arriving during a discard starts a fresh job (arrivals from 0) and reaches
        storage only after the discard's callbacks ran (where the caller deletes the job)."""
        w = self.make(batch_max_messages=1)
        self.add("job1", 1, b"old1")
        self.add("job1", 1, b"old2")
        (inflight,) = self.storage.pending()
        d = w.discard_job("job1")
        self.add("job1", 2, b"new")
        self.assertEqual(self.storage.pending(), [inflight])
        events = []
        d.addCallback(lambda _: events.append(("deleted", len(self.storage.calls))))
        inflight.succeed()
        self.assertEqual(events, [("deleted", 1)])
        (fresh,) = self.storage.pending()
        self.assertEqual((fresh.items, list(fresh.batch.arrivals)), ([b"new"], [0]))

    def test_discard_drops_failing_batch(self):
        """A batch waiting for its retry is dropped by discard_job, which fires at once, and
        the writer is healthy again."""
        w = self.make(batch_max_messages=1, retry_initial=1.0)
        self.add("job1", 1, b"a")
        self.storage.pending()[0].fail()
        self.assertFalse(w.healthy)
        self.successResultOf(w.discard_job("job1"))
        self.assertTrue(w.healthy)
        self.assertEqual(w.buffered_bytes, 0)
        self.clock.advance(10)
        self.assertEqual(len(self.storage.calls), 1)
        self.flushLoggedErrors(StorageUnavailable)

    def test_discard_in_flight_failure_not_retried(self):
        """An in-flight append of a job being discarded that fails is dropped, not retried."""
        w = self.make(batch_max_messages=1, retry_initial=1.0)
        self.add("job1", 1, b"a")
        d = w.discard_job("job1")
        self.storage.pending()[0].fail()
        self.successResultOf(d)
        self.clock.advance(10)
        self.assertEqual(len(self.storage.calls), 1)
        self.assertTrue(w.healthy)
        self.assertEqual(w.buffered_bytes, 0)
        self.flushLoggedErrors(StorageUnavailable)

    def test_discard_unknown_job(self):
        """Discarding a job the writer does not know fires at once."""
        self.make()
        self.successResultOf(self.writer.discard_job("nope"))

    def test_flush_all_released_by_discard(self):
        """A flush_all waiting on a job's data fires when that data is discarded."""
        self.make(batch_max_messages=1)
        self.add("job1", 1, b"a")
        self.add("job1", 1, b"b")
        flushed = self.writer.flush_all()
        discarded = self.writer.discard_job("job1")
        self.assertNoResult(flushed)
        self.storage.pending()[0].succeed()
        self.successResultOf(discarded)
        self.successResultOf(flushed)


class PersistMetricsTests(WriterTestMixin, SynchronousTestCase):
    def test_with_service_metrics(self):
        """The service's PersistMetrics accepts every call the writer makes."""
        from prometheus_client import CollectorRegistry

        from joblet_persist.metrics import PersistMetrics

        metrics = PersistMetrics(CollectorRegistry(), process=False)
        metrics.set_clock(lambda: self.clock.seconds())
        w = self.make(batch_max_messages=1, high_water_bytes=10, low_water_bytes=5,
                      retry_initial=1.0, metrics=metrics)
        self.add("job1", 1, b"x" * 20)
        self.storage.pending()[0].fail()
        self.clock.advance(1.0)
        self.storage.pending()[0].succeed()
        self.assertEqual(self.pauses, ["pause", "resume"])
        self.assertEqual(metrics.registry.get_sample_value("persist_messages_written_total"), 1)
        self.assertEqual(metrics.registry.get_sample_value("persist_write_errors_total"), 1)
        self.assertEqual(metrics.backpressure_seconds(), 1.0)
        self.assertEqual(w.write_errors, 1)
        self.flushLoggedErrors(StorageUnavailable)


class UnloadIdleTests(WriterTestMixin, SynchronousTestCase):
    """unload_idle forgets idle jobs, with their arrival counters only when storage holds
    nothing of them."""

    def test_idle_job_forgotten_with_its_counter(self):
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        self.add("job1", 1, b"a")
        self.add("job1", 2, b"b")
        self.add("job2", 1, b"c")
        self.clock.advance(1.0)  # flushed and appended
        self.assertEqual(w.arrivals, {"job1": 2, "job2": 1})
        self.clock.advance(50)
        self.add("job2", 1, b"d")  # job2 is in use
        self.clock.advance(1.0)
        self.assertEqual(w.unload_idle(30, resident=lambda job: False), 1)
        self.assertEqual(w.arrivals, {"job2": 2})
        self.assertEqual(w.busy_jobs(), set())
        # job1 starts afresh: arrivals from 0 (storage re-bases on its next load).
        self.add("job1", 1, b"e")
        self.clock.advance(1.0)
        self.assertEqual(list(self.storage.calls[-1].batch.arrivals), [0])

    def test_kept_while_storage_holds_it(self):
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        self.add("job1", 1, b"a")
        self.clock.advance(100)
        self.assertEqual(w.unload_idle(30, resident=lambda job: True), 0)
        self.assertEqual(w.arrivals, {"job1": 1})
        self.add("job1", 1, b"b")
        self.clock.advance(1.0)
        self.assertEqual(list(self.storage.calls[-1].batch.arrivals), [1])

    def test_kept_while_data_is_buffered_or_in_flight(self):
        w = self.make(flush_interval=10.0, batch_max_messages=1, retry_initial=5.0)
        w.start()
        self.add("open", 1, b"a")  # sealed at once (batch of 1): in flight
        self.clock.advance(100)
        self.assertEqual(w.unload_idle(30, resident=lambda job: False), 0)
        self.storage.pending()[0].fail()  # failing: waits for its retry
        self.clock.advance(1)
        self.assertEqual(w.unload_idle(0, resident=lambda job: False), 0)
        self.clock.advance(5)
        self.storage.pending()[0].succeed()
        self.assertEqual(w.unload_idle(0, resident=lambda job: False), 1)
        self.assertEqual(w.arrivals, {})
        self.assertEqual(w.messages_written, 1)
        self.flushLoggedErrors(StorageUnavailable)

    def test_recently_opened_buffer_keeps_the_job(self):
        w = self.make(flush_interval=100.0)
        w.start()
        self.clock.advance(50)
        self.add("job1", 1, b"a")  # open buffer, not flushed
        self.assertEqual(w.unload_idle(0, resident=lambda job: False), 0)  # data buffered
        self.assertEqual(w.unload_idle(30, resident=lambda job: False), 0)


class EventBufferTests(WriterTestMixin, SynchronousTestCase):
    """Telemetry events get a buffer per (job, event kind) under the same rules."""

    def test_provides_ingest_writer(self):
        """BatchingWriter provides IIngestWriter (add_log, add_metric, add_event): the
        interface the ingest protocol relies on."""
        self.assertTrue(verifyObject(IIngestWriter, self.make()))

    def test_event_batch_columns(self):
        """Events of one kind become an EventBatch naming the kind, with the payloads,
        timestamps and sequences as given and arrivals from the job's one counter."""
        self.make(batch_max_messages=2)
        self.add("job1", 1, b"log")
        self.writer.add_event("job1", "exec", 100, 7, b"e1")
        self.writer.add_event("job1", "exec", 200, 8, b"e2")
        (call,) = self.storage.calls
        self.assertEqual((call.kind, call.key), ("events", ("job1", "exec")))
        b = call.batch
        self.assertEqual(
            (b.kind, list(b.timestamps), list(b.sequences), list(b.arrivals), list(b.payloads)),
            ("exec", [100, 200], [7, 8], [1, 2], [b"e1", b"e2"]),
        )

    def test_metric_and_event_batches_are_disposable_log_batches_not(self):
        """The writer gives its metric and event batches away (``disposable``: storage
        frees their messages on its pool thread); log batches stay whole, because
        pending_logs reads the one in flight until storage has published it."""
        self.make(batch_max_messages=1)
        self.add("job1", 1, b"log")
        self.writer.add_metric("job1", 1, 1, b"m")
        self.writer.add_event("job1", "file", 1, 1, b"e")
        disposable = {c.kind: getattr(c.batch, "disposable", None) for c in self.storage.calls}
        self.assertEqual(disposable, {"logs": None, "metrics": True, "events": True})

    def test_metric_and_event_ints_are_packed(self):
        """Metric and event batches carry their int columns packed (timestamps and arrivals
        array('q'), sequences array('Q')), 64-bit extremes exact, whether they came one by
        one, as lists or as the decoder's packed columns; log batches keep lists."""
        self.make(batch_max_messages=3)
        self.add("job1", 1, b"log")
        w = self.writer
        w.add_metric("job1", -(2**63), 2**64 - 1, b"m1")
        w.add_metrics("job1", [2**63 - 1, 5], [0, 6], [w.arrivals["job1"], 9], [b"m2", b"m3"])
        w.add_events("job1", "mmap", array("q", [1, 2, 3]), array("Q", [4, 5, 6]),
                     array("q", [10, 11, 12]), [b"e1", b"e2", b"e3"])
        self.writer.flush_all()
        by_kind = {c.kind: c.batch for c in self.storage.calls}
        self.assertEqual(type(by_kind["logs"].timestamps), list)
        for kind, want in (("metrics", ([-(2**63), 2**63 - 1, 5], [2**64 - 1, 0, 6], [1, 2, 9])),
                           ("events", ([1, 2, 3], [4, 5, 6], [10, 11, 12]))):
            b = by_kind[kind]
            columns = (b.timestamps, b.sequences, b.arrivals)
            self.assertEqual([(type(c), c.typecode) for c in columns],
                             [(array, "q"), (array, "Q"), (array, "q")], kind)
            self.assertEqual(tuple(map(list, columns)), want)

    def test_out_of_range_metric_or_event_ints_buffer_nothing(self):
        """A timestamp outside int64 or a sequence outside uint64 for a metric or event
        buffer is refused before anything is buffered: the buffer and the counts stay as
        they were, and the next message is buffered normally."""
        self.make(batch_max_messages=10)
        w = self.writer
        w.add_event("job1", "exec", 1, 1, b"e0")
        cases = [
            lambda: w.add_event("job1", "exec", 2**63, 1, b"x"),
            lambda: w.add_metric("job1", 1, -1, b"x"),
            lambda: w.add_events("job1", "exec", [1, 2], [1, 2**64], [5, 6], [b"x", b"y"]),
            lambda: w.add_metrics("job1", [1], [1], [-(2**63) - 1], [b"x"]),
        ]
        for call in cases:
            before = (w.messages_received, w.buffered_bytes, dict(w.arrivals))
            self.assertRaises((ValueError, OverflowError), call)
            self.assertEqual((w.messages_received, w.buffered_bytes, dict(w.arrivals)), before)
        w.add_event("job1", "exec", 3, 3, b"e1")
        self.writer.flush_all()
        (call,) = self.storage.calls
        self.assertEqual((list(call.batch.timestamps), call.batch.payloads), ([1, 3], [b"e0", b"e1"]))

    def test_kinds_are_separate_keys_in_order(self):
        """Each event kind of a job is its own key: kinds append in parallel, one batch in
        flight per kind, each kind's batches in arrival order."""
        self.make(batch_max_messages=1)
        for kind in ("exec", "connect", "file"):
            self.writer.add_event("job1", kind, 1, 1, kind.encode() + b"1")
            self.writer.add_event("job1", kind, 2, 2, kind.encode() + b"2")
        pending = self.storage.pending()
        self.assertEqual(sorted(c.key for c in pending),
                         [("job1", "connect"), ("job1", "exec"), ("job1", "file")])
        while self.storage.pending():
            self.storage.pending()[-1].succeed()
        self.assertEqual(self.stored_contents(), {
            ("job1", k): [k.encode() + b"1", k.encode() + b"2"] for k in ("exec", "connect", "file")
        })

    def test_events_flush_on_stop_and_retry(self):
        """A failing event append is retried and kept in order; stop() flushes buffered
        events at once and waits for them."""
        self.make(batch_max_messages=1, retry_initial=0.5)
        self.writer.add_event("job1", "mmap", 1, 1, b"a")
        self.storage.pending()[0].fail()
        self.writer.add_event("job1", "mmap", 2, 2, b"b")
        self.assertEqual(self.storage.pending(), [])
        self.clock.advance(0.5)
        self.storage.pending()[0].succeed()
        self.storage.pending()[0].succeed()
        self.make(flush_interval=60)
        self.writer.start()
        self.writer.add_event("job2", "socket_data", 1, 1, b"c")
        stopped = self.writer.stop()
        self.assertNoResult(stopped)
        self.storage.pending()[0].succeed()
        self.successResultOf(stopped)
        self.assertEqual(self.stored_contents(), {("job2", "socket_data"): [b"c"]})
        self.assertRaises(WriterStopped, self.writer.add_event, "job2", "exec", 1, 1, b"x")
        self.assertEqual(len(self.flushLoggedErrors(StorageUnavailable)), 1)

    def test_events_count_for_backpressure(self):
        """Buffered events count towards the high-water mark: ingest is paused."""
        self.make(high_water_bytes=1000, low_water_bytes=10, batch_max_bytes=1 << 20)
        for i in range(10):
            self.writer.add_event("job1", "file", i, i, b"x" * 100)
        self.assertEqual(self.pauses, ["pause"])


class AddGroupsTests(WriterTestMixin, SynchronousTestCase):
    """``add_groups``: all of a read's decoder groups in one call, as one bulk call each."""

    #: Decoder group codes: log streams 1 and 2, metrics -2, events -3..-9.
    CODES = (1, 2, -2, -3, -5, -9)

    def per_group(self, writer, groups):
        """What the ingest protocol did before add_groups: one bulk call per group."""
        kinds = {-t: name for name, t in (("exec", 3), ("connect", 4), ("accept", 5),
                                          ("socket_data", 6), ("mmap", 7), ("mprotect", 8),
                                          ("file", 9))}
        for (job, code), columns in groups.items():
            if code > 0:
                writer.add_logs(job, code, *columns)
            elif code == -2:
                writer.add_metrics(job, *columns)
            else:
                writer.add_events(job, kinds[code], *columns)

    def recorded(self):
        return [
            (c.kind, c.key, list(c.batch.timestamps), list(c.batch.sequences),
             list(c.batch.arrivals), list(c.items))
            for c in self.storage.calls
        ]

    @given(st.lists(st.lists(st.tuples(st.sampled_from(["j1", "j2"]), st.sampled_from(CODES),
                                       st.integers(1, 4)), max_size=6),
                    min_size=1, max_size=5))
    def test_same_batches_as_one_call_per_group(self, reads):
        """Any sequence of reads' groups (logs, metrics, events of two jobs) gives the same
        appends, batch by batch (sealed at the same places), the same counters, buffered
        bytes and backpressure as one add_logs/add_metrics/add_events call per group."""
        results = []
        for use_groups in (False, True):
            w = self.make(auto=True, batch_max_messages=5, batch_max_bytes=200,
                          high_water_bytes=3000, low_water_bytes=1000)
            arrivals: dict = {}
            for r, read in enumerate(reads):
                groups: dict = {}
                for job, code, n in read:
                    columns = groups.setdefault((job, code), ([], [], [], []))
                    for _ in range(n):
                        a = arrivals.get(job, 0)
                        arrivals[job] = a + 1
                        columns[0].append(1000 + a)
                        columns[1].append(r)
                        columns[2].append(a)
                        columns[3].append(b"x" * (1 + a % 40))
                if use_groups:
                    w.add_groups(groups)
                else:
                    self.per_group(w, groups)
            buffered = w.buffered_bytes
            self.successResultOf(w.flush_all())
            results.append((self.recorded(), w.messages_received, buffered, list(self.pauses)))
        self.assertEqual(results[1], results[0])

    def test_log_taps_see_log_groups(self):
        """A job's log tap is called for each of its log groups, as add_logs calls it, and
        not for its metric or event groups."""
        w = self.make()
        seen = []
        w.log_taps["j1"] = lambda *args: seen.append(args)
        w.add_groups({("j1", 2): ([5], [6], [0], [b"err"]), ("j1", -2): ([7], [8], [1], [b"m"]),
                      ("j2", 1): ([9], [9], [0], [b"other"])})
        self.assertEqual(seen, [(2, [0], [5], [6], [b"err"])])

    def test_stopping_buffers_nothing(self):
        """Once the writer is stopping, add_groups raises WriterStopped and buffers nothing."""
        w = self.make()
        self.successResultOf(w.stop())
        with self.assertRaises(WriterStopped):
            w.add_groups({("j1", 1): ([1], [1], [0], [b"a"])})
        self.assertEqual((w.messages_received, w.buffered_bytes), (0, 0))

    def test_unknown_code_buffers_nothing(self):
        """A group code that names no buffer is a ValueError naming it and the job, raised
        before any group of the call is buffered."""
        w = self.make()
        with self.assertRaises(ValueError) as e:
            w.add_groups({("j1", 1): ([1], [1], [0], [b"a"]), ("j1", -10): ([1], [1], [1], [b"b"])})
        self.assertIn("-10", str(e.exception))
        self.assertIn("j1", str(e.exception))
        self.assertEqual(w.messages_received, 0)

    def test_discarded_job_gets_fresh_buffers(self):
        """After discard_job, the job's next groups go to the new job's buffers, which a
        second discard_job drops (the dropped buffers the cache knew would escape it); a
        third incarnation is stored with arrivals from 0."""
        w = self.make(auto=True, flush_interval=10)
        old = {("j1", 1): ([1], [1], [0], [b"old"]), ("j1", -3): ([1], [1], [1], [b"e"])}
        w.add_groups(old)
        self.successResultOf(w.discard_job("j1"))
        w.add_groups({("j1", 1): ([2], [2], [0], [b"new"]), ("j1", -3): ([2], [2], [1], [b"e2"])})
        self.successResultOf(w.discard_job("j1"))
        self.assertEqual(w.buffered_bytes, 0)
        w.add_groups({("j1", 1): ([3], [3], [0], [b"third"])})
        self.successResultOf(w.flush_all())
        self.assertEqual([(c.items, list(c.batch.arrivals)) for c in self.storage.calls],
                         [([b"third"], [0])])

    def test_unloaded_job_gets_fresh_buffers(self):
        """After unload_idle forgot a job, its next groups start a new job the writer knows:
        a discard_job then drops them (stale buffers of the forgotten job would escape it)."""
        w = self.make(auto=True, flush_interval=1.0)
        w.start()
        w.add_groups({("j1", 1): ([1], [1], [0], [b"a"])})
        self.clock.advance(1.0)
        self.clock.advance(100)
        self.assertEqual(w.unload_idle(10, resident=lambda job: False), 1)
        w.add_groups({("j1", 1): ([2], [2], [0], [b"b"])})
        self.assertEqual([list(m[4]) for m in w.pending_logs("j1")], [[b"b"]])
        self.successResultOf(w.discard_job("j1"))
        self.successResultOf(w.flush_all())
        self.assertEqual([c.items for c in self.storage.calls], [[b"a"]])
        self.assertEqual(w.buffered_bytes, 0)
