"""Tests for ingest's limits against hostile local senders: the partial-frame memory budget,
the stalled-frame timeout and the refused-connection health check."""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.ingest import PartialFrameBudget
from joblet_persist.metrics import PersistMetrics
from tests.test_ingest import IngestTestMixin, frame, log_body


def header(length: int) -> bytes:
    return struct.pack(">I", length)


class PartialBudgetTests(IngestTestMixin, SynchronousTestCase):
    def test_partial_frame_reserves_its_announced_size(self):
        """A frame incomplete at the end of a read reserves its whole announced size (with
        the prefix) at once; completing it delivers it and returns the reservation."""
        factory = self.make_factory(max_partial_bytes=10_000)
        data = frame(log_body(b"x" * 500))
        proto, transport = self.connect(factory)
        proto.dataReceived(data[:10])
        self.assertEqual(factory.budget.used, len(data))
        proto.dataReceived(data[10:300])
        self.assertEqual(factory.budget.used, len(data))
        proto.dataReceived(data[300:])
        self.assertEqual(factory.budget.used, 0)
        self.assertEqual([c[5] for c in self.writer.calls], [b"x" * 500])
        self.assertEqual(transport.producerState, "producing")

    def test_complete_frames_reserve_nothing(self):
        """Frames that arrive whole within one read never touch the budget: a budget too
        small for any of them does not refuse them."""
        factory = self.make_factory(max_partial_bytes=16)
        data = b"".join(frame(log_body(b"line %d\n" % i, seq=i)) for i in range(50))
        self.feed(data, factory=factory)
        self.assertEqual(len(self.writer.calls), 50)
        self.assertEqual(self.metrics.rejected, [])
        self.assertEqual(factory.budget.waits, 0)

    def test_frame_that_can_never_fit_is_refused_before_buffering(self):
        """A frame larger than the per-connection cap (or the whole budget) is refused as
        over_budget as soon as its header is seen: nothing is kept, its bytes are skipped as
        they arrive, the next frame on the connection is stored, and the budget check fails
        for a minute."""
        factory = self.make_factory(max_partial_bytes=100_000,
                                    max_partial_bytes_per_connection=1000)
        big = frame(log_body(b"y" * 5000))
        after = frame(log_body(b"after\n", seq=9))
        proto, transport = self.connect(factory)
        proto.dataReceived(big[:100])
        self.assertEqual(self.metrics.rejected, ["over_budget"])
        self.assertEqual((factory.budget.used, proto._chunks), (0, []))
        ok, detail, extra = factory.budget.check()
        self.assertFalse(ok)
        self.assertIn("ipc.maxPartialBytes", detail)
        self.assertEqual(extra["refused_frames"], 1)
        for i in range(100, len(big), 700):
            proto.dataReceived(big[i : i + 700])
        proto.dataReceived(after)
        self.assertEqual([c[5] for c in self.writer.calls], [b"after\n"])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(61)
        self.assertTrue(factory.budget.check()[0])

    def test_frame_above_the_global_budget_is_refused(self):
        """With a per-connection cap above the global budget, the global budget is the
        largest frame that may be buffered."""
        factory = self.make_factory(max_partial_bytes=2000)
        proto, _ = self.connect(factory)
        proto.dataReceived(frame(log_body(b"z" * 3000))[:50])
        self.assertEqual(self.metrics.rejected, ["over_budget"])

    def test_connection_waits_for_budget_then_finishes(self):
        """When the budget is taken, a second large frame pauses its connection (no
        reservation, reads stop, the check fails); when the first frame completes the
        waiting connection gets its reservation and is read again; both frames are stored."""
        factory = self.make_factory(max_partial_bytes=100_000)
        a_data = frame(log_body(b"a" * 70_000, seq=1))
        b_data = frame(log_body(b"b" * 70_000, seq=2))
        a, ta = self.connect(factory)
        b, tb = self.connect(factory)
        a.dataReceived(a_data[:100])
        b.dataReceived(b_data[:100])
        self.assertEqual(factory.budget.used, len(a_data))
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "paused"))
        self.assertEqual(factory.budget.waiting, 1)
        self.assertFalse(factory.budget.check()[0])
        a.dataReceived(a_data[100:])
        self.assertEqual(factory.budget.used, len(b_data))
        self.assertEqual(tb.producerState, "producing")
        self.assertTrue(factory.budget.check()[0])
        b.dataReceived(b_data[100:])
        self.assertEqual(factory.budget.used, 0)
        self.assertEqual([c[5] for c in self.writer.calls], [b"a" * 70_000, b"b" * 70_000])

    def test_small_frames_never_wait(self):
        """Frames of at most one read (64 KiB) split across reads are reserved even when the
        budget is taken, so small senders never queue behind large frames."""
        factory = self.make_factory(max_partial_bytes=100_000)
        a, _ = self.connect(factory)
        a.dataReceived(frame(log_body(b"a" * 70_000))[:10])
        b, tb = self.connect(factory)
        small = frame(log_body(b"s" * 1000))
        b.dataReceived(small[:10])
        self.assertEqual(tb.producerState, "producing")
        self.assertEqual(factory.budget.waiting, 0)
        b.dataReceived(small[10:])
        self.assertEqual([c[5] for c in self.writer.calls], [b"s" * 1000])

    def test_close_returns_reservation_and_wakes_waiter(self):
        """A connection closing in the middle of its frame returns its reservation, which
        goes to the first connection waiting."""
        factory = self.make_factory(max_partial_bytes=100_000)
        a, _ = self.connect(factory)
        b, tb = self.connect(factory)
        c, tc = self.connect(factory)
        a.dataReceived(frame(log_body(b"a" * 70_000))[:10])
        b.dataReceived(frame(log_body(b"b" * 70_000))[:10])
        c.dataReceived(frame(log_body(b"c" * 70_000))[:10])
        self.assertEqual(factory.budget.waiting, 2)
        a.connectionLost(None)
        self.assertEqual((tb.producerState, tc.producerState), ("producing", "paused"))
        b.connectionLost(None)
        c.connectionLost(None)
        self.assertEqual((factory.budget.used, factory.budget.waiting), (0, 0))

    def test_backpressure_and_budget_pauses_combine(self):
        """resume_all (end of backpressure) does not resume a connection waiting for budget;
        budget granted during backpressure leaves the connection paused until resume_all."""
        factory = self.make_factory(max_partial_bytes=100_000)
        a, _ = self.connect(factory)
        b, tb = self.connect(factory)
        a_data = frame(log_body(b"a" * 70_000))
        a.dataReceived(a_data[:10])
        b.dataReceived(frame(log_body(b"b" * 70_000))[:10])
        factory.pause_all()
        factory.resume_all()
        self.assertEqual(tb.producerState, "paused")
        factory.pause_all()
        a.dataReceived(a_data[10:])  # bytes already read are still handled
        self.assertEqual(factory.budget.waiting, 0)
        self.assertEqual(tb.producerState, "paused")
        factory.resume_all()
        self.assertEqual(tb.producerState, "producing")

    def test_large_frame_stored_within_budget(self):
        """A legitimate 20 MiB LOG line split into 64 KiB reads is stored whole while the
        budget allows it, and the reservation is returned."""
        content = bytes(range(256)) * (20 * 4096)
        factory = self.make_factory(max_frame_bytes=32 << 20, max_partial_bytes=24 << 20)
        data = frame(log_body(content))
        proto, _ = self.connect(factory)
        for i in range(0, len(data), 65536):
            proto.dataReceived(data[i : i + 65536])
        self.assertEqual(len(self.writer.calls), 1)
        self.assertEqual(self.writer.calls[0][5], content)
        self.assertEqual(factory.budget.used, 0)

    def test_budget_exported_as_metrics(self):
        """The budget's usage, limit, waiting connections and waits are exported."""
        metrics = PersistMetrics(process=False)
        factory = self.make_factory(max_partial_bytes=100_000)
        factory = type(factory)(self.writer, metrics, self.clock, max_frame_bytes=1 << 20,
                                max_partial_bytes=100_000)
        a, _ = self.connect(factory)
        b, _ = self.connect(factory)
        a.dataReceived(frame(log_body(b"a" * 70_000))[:10])
        b.dataReceived(frame(log_body(b"b" * 70_000))[:10])
        reg = metrics.registry
        self.assertEqual(reg.get_sample_value("persist_ipc_partial_bytes"), factory.budget.used)
        self.assertEqual(reg.get_sample_value("persist_ipc_partial_bytes_limit"), 100_000)
        self.assertEqual(reg.get_sample_value("persist_ipc_partial_waiting_connections"), 1)
        self.assertEqual(reg.get_sample_value("persist_ipc_partial_budget_waits_total"), 1)


class MemoryTrimTests(SynchronousTestCase):
    def test_trim_after_large_releases_at_most_once_a_second(self):
        """Releasing ``trim_after`` bytes of large frames (summed) schedules one trim on the
        next reactor turn, however many releases there were, and at most one per second;
        releases of small frames (one read or less) never trim."""
        from twisted.internet import task

        clock = task.Clock()
        trims = []
        budget = PartialFrameBudget(None, clock=clock, trim_after=300_000,
                                    trim=lambda: trims.append(clock.seconds()))
        for _ in range(100):
            budget.reserve(object(), 60_000)
            budget.release(60_000)
        clock.advance(0)
        self.assertEqual(trims, [])
        for _ in range(3):
            budget.reserve(object(), 100_000)
        budget.release(100_000)
        budget.release(100_000)
        clock.advance(0)
        self.assertEqual(trims, [])
        budget.release(100_000)
        self.assertEqual(trims, [])
        clock.advance(0)
        self.assertEqual(trims, [0])
        for _ in range(3):
            budget.reserve(object(), 100_000)
            budget.release(100_000)
        clock.advance(0.5)
        self.assertEqual(trims, [0])
        clock.advance(0.5)
        self.assertEqual(trims, [0, 1.0])
        self.assertEqual(budget.used, 0)


class StalledFrameTests(IngestTestMixin, SynchronousTestCase):
    def test_stalled_partial_frame_closed_after_timeout(self):
        """A connection holding part of a frame closes ``partial_frame_timeout`` seconds
        after its last byte, counted as stalled_frame; progress restarts the wait."""
        factory = self.make_factory(partial_frame_timeout=30)
        proto, transport = self.connect_socket(factory)
        data = frame(log_body(b"q" * 100))
        proto.dataReceived(data[:4])
        self.clock.advance(29)
        proto.dataReceived(data[4:20])
        self.clock.advance(29)
        self.assertIsNone(transport.closed_at)
        self.clock.advance(1)
        self.assertEqual(transport.closed_at, 59)
        self.assertEqual(self.metrics.rejected, ["stalled_frame", "truncated_frame"])
        self.assertEqual(factory.budget.used, 0)

    def test_stalled_length_prefix_closed(self):
        """Fewer than 4 bytes of a length prefix also count as a frame in progress."""
        factory = self.make_factory(partial_frame_timeout=5)
        proto, transport = self.connect_socket(factory)
        proto.dataReceived(b"\x00\x00")
        self.clock.advance(5)
        self.assertEqual(transport.closed_at, 5)

    def test_idle_connection_between_frames_stays_open(self):
        """A connection that sent whole frames (even after a partial one) and then goes
        quiet is never closed."""
        factory = self.make_factory(partial_frame_timeout=5)
        proto, transport = self.connect_socket(factory)
        data = frame(log_body(b"hi\n"))
        proto.dataReceived(data[:7])
        proto.dataReceived(data[7:])
        self.clock.advance(3600)
        self.assertIsNone(transport.closed_at)
        self.assertEqual(self.metrics.rejected, [])
        self.assertEqual(len(self.writer.calls), 1)

    def test_paused_connection_is_not_stalled(self):
        """Time a connection spends paused by backpressure does not count against it."""
        factory = self.make_factory(partial_frame_timeout=30)
        proto, transport = self.connect_socket(factory)
        proto.dataReceived(frame(log_body(b"p" * 100))[:10])
        factory.pause_all()
        self.clock.advance(300)
        self.assertIsNone(transport.closed_at)
        self.clock.advance(15)
        factory.resume_all()
        self.clock.advance(29)
        self.assertIsNone(transport.closed_at)
        self.clock.advance(1)
        self.assertEqual(transport.closed_at, 345)

    def test_connection_waiting_for_budget_is_not_stalled(self):
        """A connection paused for budget is not closed while it waits; once granted it
        has the full timeout to send."""
        factory = self.make_factory(partial_frame_timeout=30, max_partial_bytes=100_000)
        a, ta = self.connect_socket(factory)
        b, tb = self.connect_socket(factory)
        a.dataReceived(frame(log_body(b"a" * 70_000))[:10])
        self.clock.advance(10)
        b_data = frame(log_body(b"b" * 70_000))
        b.dataReceived(b_data[:10])
        self.clock.advance(20)  # a stalls at t=30 and closes; b is granted then
        self.assertEqual(ta.closed_at, 30)
        self.assertIsNone(tb.closed_at)
        self.assertEqual(factory.budget.used, len(b_data))
        self.clock.advance(29)
        self.assertIsNone(tb.closed_at)
        self.clock.advance(31)
        self.assertIsNotNone(tb.closed_at)
        self.assertEqual(factory.budget.used, 0)

    def test_skipped_refused_frame_stalls_too(self):
        """A connection skipping a refused frame that stops sending is closed as well."""
        factory = self.make_factory(partial_frame_timeout=5, max_partial_bytes=100)
        proto, transport = self.connect_socket(factory)
        proto.dataReceived(frame(log_body(b"r" * 500))[:50])
        self.assertEqual(self.metrics.rejected, ["over_budget"])
        self.clock.advance(5)
        self.assertEqual(transport.closed_at, 5)


class RefusedConnectionHealthTests(IngestTestMixin, SynchronousTestCase):
    def test_refusals_fail_the_connection_check_for_a_minute(self):
        """A connection refused for ipc.maxConnections makes connections_check fail, with
        the count in its fields, until a minute passes without refusals."""
        factory = self.make_factory(max_connections=1)
        self.assertTrue(factory.connections_check()[0])
        self.connect(factory)
        self.clock.advance(10)
        self.assertIsNone(factory.buildProtocol(None))
        self.assertIsNone(factory.buildProtocol(None))
        ok, detail, extra = factory.connections_check()
        self.assertFalse(ok)
        self.assertIn("ipc.maxConnections", detail)
        self.assertEqual((extra["refused_total"], extra["open"], extra["max"]), (2, 1, 1))
        self.clock.advance(59)
        self.assertFalse(factory.connections_check()[0])
        self.clock.advance(1)
        ok, _, extra = factory.connections_check()
        self.assertTrue(ok)
        self.assertEqual(extra["refused_total"], 2)

    def test_checks_feed_the_health_verdict(self):
        """Checks returning extra fields put them in the health details next to ok/detail."""
        from joblet_persist.health import HealthMonitor

        factory = self.make_factory(max_connections=1)
        health = HealthMonitor(self.clock, None)
        health.add_check("ipc_connections", factory.connections_check)
        health._disk = {"writable": True, "error": None, "free_bytes": None}
        self.assertTrue(health.refresh())
        self.connect(factory)
        factory.buildProtocol(None)
        self.assertFalse(health.refresh())
        entry = health.details["ipc_connections"]
        self.assertEqual((entry["ok"], entry["refused_total"]), (False, 1))


class LimitConfigTests(SynchronousTestCase):
    def test_defaults(self):
        """Omitted keys: a 256 MiB budget, the per-connection cap follows ipc.maxFrameBytes,
        and a 30 s stall timeout."""
        from joblet_persist.config import config_from_string

        ipc = config_from_string("ipc:\n  maxFrameBytes: 8MiB\n").ipc
        self.assertEqual(ipc.max_partial_bytes, 256 * 1024 * 1024)
        self.assertEqual(ipc.partial_bytes_per_connection, 8 * 1024 * 1024)
        self.assertEqual(ipc.partial_frame_timeout, 30.0)

    def test_values_and_errors_name_the_key(self):
        """Values parse as sizes and durations; a per-connection cap above ipc.maxFrameBytes,
        or a wrong type, is an error naming the key and the source."""
        from joblet_persist.config import ConfigError, config_from_string

        ipc = config_from_string(
            "ipc:\n  maxPartialBytes: 64MiB\n  maxPartialBytesPerConnection: 1MiB\n"
            "  partialFrameTimeout: 5s\n"
        ).ipc
        self.assertEqual(
            (ipc.max_partial_bytes, ipc.partial_bytes_per_connection, ipc.partial_frame_timeout),
            (64 << 20, 1 << 20, 5.0),
        )
        for text, key in [
            ("ipc:\n  maxFrameBytes: 1MiB\n  maxPartialBytesPerConnection: 2MiB\n",
             "ipc.maxPartialBytesPerConnection"),
            ("ipc:\n  maxPartialBytes: lots\n", "ipc.maxPartialBytes"),
            ("ipc:\n  partialFrameTimeout: 0s\n", "ipc.partialFrameTimeout"),
        ]:
            e = self.assertRaises(ConfigError, config_from_string, text, source="p.yml")
            self.assertIn(key, str(e))
            self.assertIn("p.yml", str(e))
