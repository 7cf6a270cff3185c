"""Tests for TailLogs and FollowLogs: joblet_persist.follow, storage.tail and the servicer.

Deterministic: LocalStorage on a temporary directory with a manual thread
runner (appends complete when and in what order a test says), a
BatchingWriter on a task.Clock, and the follower's gRPC-thread functions
called on the test thread with zero wait.
"""

from __future__ import annotations

import os

import grpc
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import follow
from joblet_persist._proto import persist_pb2
from joblet_persist.follow import FollowEnded, FollowHub
from joblet_persist.query import PersistServicer
from joblet_persist.storage.api import ReadStats
from joblet_persist.storage.compress import make_compressor
from joblet_persist.storage.local import LocalStorage
from joblet_persist.writer import BatchingWriter
from tests.fakes import Aborted, FakeContext, FakeStorage, ImmediateReactor
from tests.test_storage_local import ManualRunner, sync_runner

JOB = "5b1e8d2c-7f3a-4c19-8e6d-0000000000f0"
START = 1_700_000_000.0


def line(i: int) -> bytes:
    return f"line {i}\n".encode()


class Harness:
    """A writer over a LocalStorage, a hub, and a record of every line sent."""

    def __init__(self, case: SynchronousTestCase, runner, buffer_bytes: int = 1 << 20):
        self.case = case
        self.clock = task.Clock()
        self.clock.advance(START)
        self.runner = runner
        self.storage = LocalStorage(
            os.path.abspath(case.mktemp()),
            runner,
            compressor=make_compressor("zlib", 1),
            clock=self.clock,
            segment_max_bytes=1 << 20,
            fsync="never",
        )
        d = self.storage.start()
        if isinstance(runner, ManualRunner):
            runner.run_all()
        case.successResultOf(d)
        self.writer = BatchingWriter(self.storage, self.clock, batch_max_messages=4)
        self.hub = FollowHub(self.writer, self.storage, self.clock, buffer_bytes=buffer_bytes,
                             delivery_interval=0)
        self.sent: list[tuple] = []  # (stream, timestamp, sequence, content) in arrival order
        self.n = 0

    def send(self, stream: int, count: int = 1) -> None:
        """``count`` lines on ``stream``, one add_log call each (arrival order = call order)."""
        for _ in range(count):
            self.n += 1
            rec = (stream, 1000 + self.n, self.n, line(self.n))
            self.writer.add_log(JOB, *rec)
            self.sent.append(rec)

    def send_bulk(self, groups: list) -> None:
        """One decoded read: ``[(stream, count)]`` groups numbered like the frame decoder
        (arrivals in frame order, then delivered group by group)."""
        recs = {}
        for stream, count in groups:
            for _ in range(count):
                self.n += 1
                arrival = self.writer.arrivals.get(JOB, 0)
                self.writer.arrivals[JOB] = arrival + 1
                rec = (stream, 1000 + self.n, self.n, line(self.n))
                recs.setdefault(stream, []).append((arrival, rec))
                self.sent.append(rec)
        for stream, items in recs.items():
            self.writer.add_logs(
                JOB, stream,
                [r[1] for _a, r in items], [r[2] for _a, r in items],
                [a for a, _r in items], [r[3] for _a, r in items],
            )

    def start(self, stream: int = 0) -> follow.FollowStart:
        return self.case.successResultOf(self.hub.start(JOB, stream))

    def stored(self, start, stream=0, start_from=follow.FOLLOW_FROM_START, tail=0, since=0):
        return flatten(follow.stored_part(start, stream, start_from, tail, since, ReadStats(),
                                          lambda: False))

    def live(self, start, stream=0):
        self.clock.advance(0)  # the hub's delivery call
        chunks = follow.live_chunks(start.follower, stream, 0, lambda: False,
                                    wake=0)
        return flatten(chunk.lines(stream) for chunk in chunks)


def flatten(chunks) -> list[tuple]:
    out = []
    for streams, ts, seqs, contents in chunks:
        out.extend(zip(streams, ts, seqs, contents, strict=True))
    return out


def only(recs, stream):
    return [r for r in recs if stream == 0 or r[0] == stream]


class HandOffTests(SynchronousTestCase):
    """Stored and live lines meet without gap or duplicate, in arrival order."""

    def test_published_pending_and_live_lines_each_once_in_arrival_order(self):
        """stdout published further than stderr, a stderr batch in flight, open columns and
        lines arriving after the start: the follower sees every line once, in arrival
        order, whatever completes when."""
        runner = ManualRunner()
        h = Harness(self, runner)
        h.send(1, 1)
        d = h.writer.flush_all()
        runner.run_all()  # creates the job and appends the line
        self.successResultOf(d)
        h.send(2, 1)  # open stderr column
        h.send(1, 4)  # stdout batch 1 sealed (4 lines), in flight
        h.send(2, 3)  # stderr batch 1 sealed (4 lines), in flight
        h.send(1, 4)  # stdout batch 2 sealed, queued behind batch 1
        h.send(2, 1)  # open stderr column
        runner.run("thd_append_logs")  # stdout 1 published; stdout 2 now in flight
        runner.run("thd_append_logs")  # stderr 1 published
        h.send(2, 4)  # stderr: 1 + 3 sealed and in flight, 1 open
        h.send(1, 1)  # stdout: batch 2 in flight, 1 open
        start = h.start()
        self.assertTrue(start.pending, "some lines are not published yet")
        self.assertIsNotNone(start.base)
        h.send_bulk([(1, 1), (2, 1), (1, 2)])  # live, delivered group by group
        runner.run_all()  # the in-flight stderr batch is published after the start
        h.send(2, 2)
        got = h.stored(start) + h.live(start)
        self.assertEqual(got, h.sent)

    def test_a_later_stream_published_first_stays_in_arrival_order(self):
        """Lines of stderr wait in the writer while later stdout lines are published: the
        stored part interleaves them by arrival, not stored before pending."""
        runner = ManualRunner()
        h = Harness(self, runner)
        d = h.storage.open_job(JOB)
        h.send(2, 2)  # stderr, open (older)
        h.send(1, 4)  # stdout sealed at 4
        runner.run_all()
        self.successResultOf(d)
        runner.run_all()
        self.assertEqual(h.writer.pending_logs(JOB)[0][0], 2)
        start = h.start()
        self.assertEqual(h.stored(start), h.sent)
        self.assertEqual(h.live(start), [])

    def test_lines_collected_before_a_start_are_not_delivered_twice(self):
        """Lines accepted in the same reactor turn as a start (the hub's delivery call not
        run yet) reach the new follower once, from the writer's pending list."""
        h = Harness(self, sync_runner)
        h.send(1, 1)
        first = h.start()
        h.send(1, 2)  # collected by the tap; delivery scheduled, not run
        second = h.start()
        h.send(2, 1)
        self.assertEqual(h.stored(second) + h.live(second), h.sent)
        self.assertEqual(h.stored(first) + h.live(first), h.sent)

    def test_one_stream(self):
        """A follower of one stream gets that stream's lines only, stored and live."""
        h = Harness(self, sync_runner)
        h.send(1, 5)
        h.send(2, 5)
        self.successResultOf(h.writer.flush_all())
        h.send(2, 1)
        h.send(1, 1)
        start = h.start(stream=2)
        h.send(1, 2)
        h.send(2, 2)
        self.assertEqual(h.stored(start, stream=2) + h.live(start, stream=2), only(h.sent, 2))

    def test_from_tail_takes_the_last_lines_of_stored_and_pending(self):
        """FOLLOW_FROM_TAIL N: the last N lines before the start (published or not), then
        live lines; N larger than the job gives it all; 0 gives none."""
        h = Harness(self, sync_runner)
        h.send(1, 9)
        h.send(2, 3)  # 9 stdout: two batches of 4 published, 1 + 3 stderr open
        start = h.start()
        before = list(h.sent)
        for n in (0, 1, 3, 5, 11, 12, 50):
            self.assertEqual(
                h.stored(start, start_from=follow.FOLLOW_FROM_TAIL, tail=n),
                before[len(before) - n:] if n else [], n)
        self.assertEqual(h.stored(start, stream=1, start_from=follow.FOLLOW_FROM_TAIL, tail=6),
                         only(before, 1)[-6:])

    def test_from_now_and_from_a_time(self):
        """FOLLOW_FROM_NOW skips what is stored; start_time leaves older stored lines out."""
        h = Harness(self, sync_runner)
        h.send(1, 6)
        start = h.start()
        self.assertEqual(h.stored(start, start_from=follow.FOLLOW_FROM_NOW), [])
        self.assertEqual(h.stored(start, since=1004), h.sent[3:])

    def test_unknown_job_is_not_found(self):
        """Following a job that neither storage nor the writer knows is NOT_FOUND."""
        h = Harness(self, sync_runner)
        f = self.failureResultOf(h.hub.start("no-such-job", 0), FollowEnded)
        self.assertEqual(f.value.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(h.writer.log_taps, {})


class BoundTests(SynchronousTestCase):
    """A follower that stops reading is cut off by its bound; nobody following costs nothing."""

    def test_slow_follower_is_cut_off_not_grown(self):
        """Lines beyond the follower's byte bound end it with RESOURCE_EXHAUSTED; its buffer
        never holds more than the bound; the hub forgets it and removes the writer's tap."""
        h = Harness(self, sync_runner, buffer_bytes=2000)
        h.send(1, 1)
        start = h.start()
        f = start.follower
        for _ in range(100):
            h.send(1, 1)
            h.clock.advance(0)
            self.assertLessEqual(f.buffered_bytes, 2000)
        self.assertEqual(f.ended.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("query.followBufferBytes", f.ended.details)
        self.assertEqual(h.hub.follower_count, 0)
        self.assertEqual(h.writer.log_taps, {})
        e = self.assertRaises(FollowEnded, h.live, start)
        self.assertEqual(e.code, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_a_reading_follower_is_not_cut_off(self):
        """A follower that takes its lines keeps following past many times its bound."""
        h = Harness(self, sync_runner, buffer_bytes=2000)
        start = h.start() if h.send(1, 1) is None else None
        got = []
        for _ in range(50):
            h.send(1, 5)
            got += h.live(start)
        self.assertIsNone(start.follower.ended)
        self.assertEqual(got, h.sent[1:])

    def test_many_followers_are_woken_within_the_budget(self):
        """The delivery interval stretches with the followers so that they wake up at most
        DELIVERY_WAKEUPS times a second in all, and never beyond DELIVERY_MAX_INTERVAL:
        lines collected for 100 followers are not delivered before 100 ms, and then to
        every one of them at once."""
        h = Harness(self, sync_runner)
        h.hub = FollowHub(h.writer, h.storage, h.clock, delivery_interval=follow.DELIVERY_INTERVAL)
        h.send(1, 1)
        one = h.start()
        self.assertEqual(h.hub.delivery_delay(), follow.DELIVERY_INTERVAL)
        starts = [one] + [h.start() for _ in range(99)]
        self.assertAlmostEqual(h.hub.delivery_delay(), 100 / follow.DELIVERY_WAKEUPS)
        self.assertLessEqual(h.hub.delivery_delay(), follow.DELIVERY_MAX_INTERVAL)
        h.send(1, 3)
        h.clock.advance(h.hub.delivery_delay() * 0.99)
        self.assertEqual([s.follower.buffered_bytes for s in starts], [0] * 100)
        h.clock.advance(h.hub.delivery_delay() * 0.02)
        self.assertTrue(all(s.follower.buffered_bytes > 0 for s in starts))
        for _ in range(400):
            h.start()
        self.assertEqual(h.hub.delivery_delay(), follow.DELIVERY_MAX_INTERVAL)

    def test_tap_only_while_followed(self):
        """The writer's tap dict is empty unless a job is followed, and emptied after."""
        h = Harness(self, sync_runner)
        h.send(1, 1)
        self.assertEqual(h.writer.log_taps, {})
        start = h.start()
        self.assertEqual(list(h.writer.log_taps), [JOB])
        h.hub.remove(start.follower)
        self.assertEqual(h.writer.log_taps, {})

    def test_stop_ends_followers_and_refuses_new_ones(self):
        """Stopping the hub (service shutdown) ends every follower with UNAVAILABLE at once."""
        h = Harness(self, sync_runner)
        h.send(1, 1)
        start = h.start()
        h.hub.stop()
        self.assertEqual(start.follower.ended.code, grpc.StatusCode.UNAVAILABLE)
        f = self.failureResultOf(h.hub.start(JOB, 0), FollowEnded)
        self.assertEqual(f.value.code, grpc.StatusCode.UNAVAILABLE)

    def test_deleted_job_ends_its_followers(self):
        """end_job (DeleteJob) ends the job's followers with NOT_FOUND and forgets them."""
        h = Harness(self, sync_runner)
        h.send(1, 1)
        start = h.start()
        h.hub.end_job(JOB, grpc.StatusCode.NOT_FOUND, f"job {JOB} was deleted")
        self.assertEqual(start.follower.ended.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual((h.hub.follower_count, h.writer.log_taps), (0, {}))

    def test_idle_timeout_ends_normally(self):
        """With an idle timeout, live_chunks returns once no line came for that long."""
        h = Harness(self, sync_runner)
        h.send(1, 1)
        start = h.start()
        now = [0.0]

        def clock():
            now[0] += 0.4
            return now[0]

        self.assertEqual(list(follow.live_chunks(start.follower, 0, 1.0, lambda: True,
                                                 clock=clock, wake=0)), [])


class TailTests(SynchronousTestCase):
    """TailLogs reads the last lines from the end, counting from member headers."""

    def setUp(self):
        self.h = Harness(self, sync_runner)
        self.h.send(1, 30)
        self.h.send(2, 13)
        self.h.send(1, 7)
        self.successResultOf(self.h.writer.flush_all())
        self.snap = self.h.storage.snapshot(JOB)

    def tail(self, stream, n, start=0, end=0, stats=None):
        return flatten(follow.tail_chunks(self.snap, stream, n, start, end,
                                          stats or ReadStats(), lambda: False))

    def test_last_lines(self):
        """The last N lines of both streams or one, and of a time range."""
        sent = self.h.sent
        for n in (0, 1, 4, 9, 50, 51):
            self.assertEqual(self.tail(0, n), sent[max(0, len(sent) - n):] if n else [])
            self.assertEqual(self.tail(2, n), only(sent, 2)[-n:] if n else [])
        ranged = [r for r in sent if 1010 <= r[1] <= 1040]
        self.assertEqual(self.tail(0, 5, 1010, 1040), ranged[-5:])

    def test_inflates_only_the_last_members(self):
        """A tail of 5 lines inflates the two members that hold them, not the 13 the job
        has."""
        stats = ReadStats()
        self.tail(0, 5, stats=stats)
        self.assertEqual(stats.members_inflated, 2)
        self.assertGreater(len(self.snap.stdout[0].members) + len(self.snap.stderr[0].members),
                           10)

    def test_generic_snapshot(self):
        """A snapshot without ILogTail (the fake) is tailed by counting through iter_logs."""
        storage = FakeStorage()
        from tests.fakes import log_batch
        self.successResultOf(storage.append_logs(
            log_batch(JOB, 1, [(1000 + i, i, line(i)) for i in range(10)])))
        snap = storage.snapshot(JOB)
        got = flatten(follow.tail_chunks(snap, 0, 3, 0, 0, ReadStats(), lambda: False))
        self.assertEqual([r[3] for r in got], [line(7), line(8), line(9)])


class ServicerTests(SynchronousTestCase):
    """The TailLogs and FollowLogs RPCs: validation, status codes, batches."""

    def setUp(self):
        self.h = Harness(self, sync_runner)
        self.h.send(1, 10)
        self.successResultOf(self.h.writer.flush_all())
        self.reactor = ImmediateReactor()
        self.servicer = PersistServicer(
            self.h.storage, self.reactor, is_healthy=lambda: True, ingest_stats=dict,
            delete_job=lambda job: None, follow_hub=self.h.hub,
        )

    def call(self, rpc, request, context=None):
        return list(getattr(self.servicer, rpc)(request, context or FakeContext()))

    def lines(self, batches):
        return [(m.stream, m.timestamp, m.sequence, m.content) for b in batches for m in b.lines]

    def test_tail_logs(self):
        """TailLogs answers the last lines as LogLineBatches with the job id set."""
        out = self.call("TailLogs", persist_pb2.TailLogsRequest(job_uuid=JOB, lines=3))
        self.assertEqual(self.lines(out), self.h.sent[-3:])
        self.assertEqual({m.job_uuid for b in out for m in b.lines}, {JOB})

    def test_bad_requests(self):
        """Bad stream, negative lines, inverted range, bad start_from: INVALID_ARGUMENT;
        unknown job: NOT_FOUND."""
        cases = [
            ("TailLogs", persist_pb2.TailLogsRequest(job_uuid=JOB, lines=-1)),
            ("TailLogs", persist_pb2.TailLogsRequest(job_uuid=JOB, lines=1, stream=7)),
            ("TailLogs", persist_pb2.TailLogsRequest(job_uuid=JOB, start_time=5, end_time=4)),
            ("TailLogs", persist_pb2.TailLogsRequest(job_uuid="../x", lines=1)),
            ("FollowLogs", persist_pb2.FollowLogsRequest(job_uuid=JOB, start_from=9)),
            ("FollowLogs", persist_pb2.FollowLogsRequest(job_uuid=JOB, tail_lines=-2)),
            ("FollowLogs", persist_pb2.FollowLogsRequest(job_uuid=JOB, idle_timeout_ms=-1)),
        ]
        for rpc, request in cases:
            e = self.assertRaises(Aborted, self.call, rpc, request)
            self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT, (rpc, request))
        for rpc, request in (("TailLogs", persist_pb2.TailLogsRequest(job_uuid="nope", lines=1)),
                             ("FollowLogs", persist_pb2.FollowLogsRequest(job_uuid="nope"))):
            e = self.assertRaises(Aborted, self.call, rpc, request)
            self.assertEqual(e.code, grpc.StatusCode.NOT_FOUND)

    def test_follow_until_cancelled(self):
        """FollowLogs sends the stored lines, then new ones, until the call ends; the
        follower is then forgotten."""
        context = FakeContext()
        gen = self.servicer.FollowLogs(persist_pb2.FollowLogsRequest(job_uuid=JOB), context)
        got = []
        while len(got) < len(self.h.sent):
            got += self.lines([next(gen)])
        self.assertEqual(got, self.h.sent)
        self.h.send(2, 2)
        self.h.clock.advance(0)
        got += self.lines([next(gen)])
        self.assertEqual(got, self.h.sent)
        context.cancel()
        context.terminate()
        self.assertEqual(list(gen), [])
        self.assertEqual(self.h.hub.follower_count, 0)

    def test_follow_ends_unavailable_when_stopping(self):
        """set_stopping ends a follower with UNAVAILABLE (not after the grace period)."""
        gen = self.servicer.FollowLogs(
            persist_pb2.FollowLogsRequest(
                job_uuid=JOB, start_from=follow.FOLLOW_FROM_TAIL, tail_lines=1),
            FakeContext())
        self.assertEqual(self.lines([next(gen)]), self.h.sent[-1:])
        self.h.send(1, 1)
        self.h.clock.advance(0)
        self.assertEqual(self.lines([next(gen)]), self.h.sent[-1:])
        self.servicer.set_stopping()
        e = self.assertRaises(Aborted, next, gen)
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)

    def test_followers_share_the_live_messages(self):
        """Two followers of a job get the very same LogLineBatch objects for live lines
        (built once per delivery, not per follower); a one-stream follower its own."""
        gens = []
        for stream in (0, 0, 1):
            gen = self.servicer.FollowLogs(
                persist_pb2.FollowLogsRequest(job_uuid=JOB, stream=stream, tail_lines=1,
                                              start_from=follow.FOLLOW_FROM_TAIL),
                FakeContext())
            self.assertEqual(len(next(gen).lines), 1)  # the stored line; now registered
            gens.append(gen)
        self.h.send(1, 1)
        self.h.send(2, 1)
        self.h.clock.advance(0)
        first, second, stdout = (next(gen) for gen in gens)
        self.assertIs(first, second)
        self.assertEqual([m.stream for m in first.lines], [1, 2])
        self.assertEqual([m.stream for m in stdout.lines], [1])

    def decode(self, pieces):
        """Serialized LogLineBatches -> lines; each must be exactly what the generated
        code serializes for the message it decodes to."""
        out = []
        for data in pieces:
            self.assertIsInstance(data, bytes)
            batch = persist_pb2.LogLineBatch.FromString(data)
            self.assertEqual(batch.SerializeToString(), data)
            self.assertEqual({m.job_uuid for m in batch.lines}, {JOB})
            out.append(batch)
        return self.lines(out)

    def test_serialized_follow_sends_what_follow_sends(self):
        """follow_logs_serialized sends the same lines as FollowLogs, stored then live, as
        bytes identical to the generated serialization of LogLineBatches."""
        context = FakeContext()
        gen = self.servicer.follow_logs_serialized(
            persist_pb2.FollowLogsRequest(job_uuid=JOB), context)
        got = []
        while len(got) < len(self.h.sent):
            got += self.decode([next(gen)])
        self.assertEqual(got, self.h.sent)
        self.h.send(2, 2)
        self.h.send(1, 1)
        self.h.clock.advance(0)
        got += self.decode([next(gen)])
        self.assertEqual(got, self.h.sent)
        context.cancel()
        context.terminate()
        self.assertEqual(list(gen), [])
        self.assertEqual(self.h.hub.follower_count, 0)

    def test_serialized_followers_share_the_same_bytes(self):
        """Followers of a job with the same stream filter are sent the very same bytes
        object for a delivery (serialized once, not per follower); a one-stream follower
        gets bytes of its own lines."""
        gens = []
        for stream in (0, 0, 1):
            gen = self.servicer.follow_logs_serialized(
                persist_pb2.FollowLogsRequest(job_uuid=JOB, stream=stream, tail_lines=1,
                                              start_from=follow.FOLLOW_FROM_TAIL),
                FakeContext())
            self.assertEqual(len(self.decode([next(gen)])), 1)  # the stored line
            gens.append(gen)
        self.h.send(1, 1)
        self.h.send(2, 1)
        self.h.clock.advance(0)
        first, second, stdout = (next(gen) for gen in gens)
        self.assertIs(first, second)
        self.assertEqual(self.decode([first]), self.h.sent[-2:])
        self.assertEqual(self.decode([stdout]), self.h.sent[-2:-1])

    def test_a_follower_behind_gets_deliveries_together_within_the_bounds(self):
        """Deliveries that wait for a follower go out joined into as few messages as
        batchMaxItems allows (fewer wake-ups and sends), in order, none over the bound."""
        servicer = PersistServicer(
            self.h.storage, self.reactor, is_healthy=lambda: True, ingest_stats=dict,
            delete_job=lambda job: None, follow_hub=self.h.hub, batch_max_items=5,
        )
        gen = servicer.follow_logs_serialized(
            persist_pb2.FollowLogsRequest(job_uuid=JOB, start_from=follow.FOLLOW_FROM_TAIL,
                                          tail_lines=1, idle_timeout_ms=1),
            FakeContext())
        self.assertEqual(self.decode([next(gen)]), self.h.sent[-1:])  # stored; registered
        for _ in range(4):  # four deliveries of two lines before the follower reads
            self.h.send(1, 1)
            self.h.send(2, 1)
            self.h.clock.advance(0)
        messages = list(gen)  # the idle timeout ends the call after them
        sizes = [len(persist_pb2.LogLineBatch.FromString(m).lines) for m in messages]
        self.assertEqual(sizes, [4, 4])
        self.assertEqual(self.decode(messages), self.h.sent[-8:])

    def test_follow_without_hub_is_unimplemented(self):
        """A servicer built without a hub answers FollowLogs with UNIMPLEMENTED."""
        servicer = PersistServicer(self.h.storage, self.reactor, is_healthy=lambda: True,
                                   ingest_stats=dict, delete_job=lambda job: None)
        e = self.assertRaises(Aborted, list, servicer.FollowLogs(
            persist_pb2.FollowLogsRequest(job_uuid=JOB), FakeContext()))
        self.assertEqual(e.code, grpc.StatusCode.UNIMPLEMENTED)
