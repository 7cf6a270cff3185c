"""Compression level policies: the adaptive level's decisions from injected load signals,
the fixed level, the factory, and what storage writes with them (plain gzip at any level)."""

from __future__ import annotations

import gzip
import os

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.metrics import PersistMetrics
from joblet_persist.storage import format as fmt
from joblet_persist.storage.api import STREAM_STDOUT
from joblet_persist.storage.compress import (
    ADAPTIVE,
    ADAPTIVE_LEVELS,
    COMPRESSOR_LEVELS,
    AdaptiveLevel,
    FixedLevel,
    make_compressor,
    make_level_policy,
    proc_stat_cpu,
)
from joblet_persist.storage.local import LocalStorage
from tests.storage_contract import log_batch
from tests.test_storage_local import JOB, START, rows, sync_runner


class FakeLoad:
    """Injected signals: a clock, the process's CPU seconds, and the writer's backlog."""

    def __init__(self, cores=2):
        self.now = 100.0
        self.cpu_seconds = 0.0
        self.backlog_fraction = 0.0
        self.reactor_seconds = 0.0
        self.cores = cores

    def clock(self):
        return self.now

    def cpu(self):
        return self.cpu_seconds

    def backlog(self):
        return self.backlog_fraction

    def reactor(self):
        return self.reactor_seconds

    def run(self, seconds, busy):
        """``seconds`` pass during which the process used ``busy`` of its cores."""
        self.now += seconds
        self.cpu_seconds += seconds * busy * self.cores


def adaptive(load, name="deflate", **kwargs):
    low, high = ADAPTIVE_LEVELS[name]
    policy = AdaptiveLevel(name, low, high, clock=load.clock, cpu=load.cpu, cores=load.cores,
                           reactor_cpu=load.reactor, **kwargs)
    policy.set_backlog(load.backlog)
    return policy


class AdaptiveLevelTests(SynchronousTestCase):
    def test_starts_at_the_fastest_level(self):
        """The first batches get the lowest level: a burst never meets a slow level."""
        load = FakeLoad()
        policy = adaptive(load)
        self.assertEqual(policy.choose().level, 5)
        self.assertEqual(policy.choose().name, "deflate")

    def test_idle_cpu_climbs_to_the_strongest_level(self):
        """With the process using little CPU, each interval buys a stronger level (two steps
        below 30% of the cores, one below 60%) until the highest, where it stays."""
        load = FakeLoad()
        policy = adaptive(load)
        levels = []
        for busy in (0.1, 0.1, 0.4, 0.1, 0.1, 0.1):
            load.run(1.0, busy)
            levels.append(policy.choose().level)
        self.assertEqual(levels, [7, 9, 10, 12, 12, 12])
        self.assertAlmostEqual(policy.busy, 0.1)

    def test_busy_cpu_steps_down_and_saturation_drops_to_fastest(self):
        """Above 75% of the cores the level steps down one per interval; above 90% it falls
        straight to the fastest; between 60% and 75% it holds."""
        load = FakeLoad()
        policy = adaptive(load)
        for _ in range(4):
            load.run(1.0, 0.1)
            policy.choose()
        self.assertEqual(policy.level, 12)
        out = []
        for busy in (0.8, 0.8, 0.6, 0.6, 0.95):
            load.run(1.0, busy)
            out.append(policy.choose().level)
        self.assertEqual(out, [11, 10, 10, 10, 5])

    def test_writer_backlog_forces_the_fastest_level_at_once(self):
        """When the writer's buffered bytes reach a quarter of its high-water mark, the next
        batch gets the fastest level without waiting for an interval, and the level
        climbs again once the backlog clears and CPU is idle."""
        load = FakeLoad()
        policy = adaptive(load)
        for _ in range(3):
            load.run(1.0, 0.1)
            policy.choose()
        self.assertEqual(policy.level, 11)
        load.now += 0.1
        load.backlog_fraction = 0.25
        self.assertEqual(policy.choose().level, 5)
        load.backlog_fraction = 0.1
        self.assertEqual(policy.choose().level, 5)  # no interval elapsed yet
        load.run(1.0, 0.1)
        self.assertEqual(policy.choose().level, 7)

    def test_a_saturated_reactor_means_full_speed(self):
        """When the reactor thread itself was busy more than 70% of the time (ingest at full
        speed), the level falls to the fastest even though the cores look half idle, and
        climbs again once the reactor has slack."""
        load = FakeLoad()
        policy = adaptive(load)
        for _ in range(2):
            load.run(1.0, 0.1)
            policy.choose()
        self.assertEqual(policy.level, 9)
        load.run(1.0, 0.5)
        load.reactor_seconds += 0.8
        self.assertEqual(policy.choose().level, 5)
        self.assertAlmostEqual(policy.reactor_busy, 0.8)
        load.run(1.0, 0.5)
        load.reactor_seconds += 0.6
        self.assertEqual(policy.choose().level, 6)

    def test_json_lines_get_the_fast_level_at_full_speed(self):
        """Batches of metric and event JSON lines get the policy's level, except while
        ingest runs at full speed (the writer's backlog, the CPU above 90%, or the reactor
        above 70% forced the lowest level): then libdeflate 1, while logs keep 5.  Once
        the load eases they follow the policy's level again; counted per level."""
        load = FakeLoad()
        policy = adaptive(load)
        self.assertEqual(policy.choose(json_lines=True).level, 5)  # not known to be busy
        load.backlog_fraction = 0.3
        self.assertEqual(policy.choose(json_lines=True).level, 1)
        self.assertEqual(policy.choose().level, 5)
        self.assertTrue(policy.full_speed)
        load.backlog_fraction = 0.0
        load.run(1.0, 0.1)
        self.assertEqual(policy.choose(json_lines=True).level, 7)
        self.assertFalse(policy.full_speed)
        load.run(1.0, 0.95)
        self.assertEqual(policy.choose(json_lines=True).level, 1)
        load.run(1.0, 0.8)  # stepping down, not forced: the policy's level
        self.assertEqual(policy.choose(json_lines=True).level, 5)
        load.run(1.0, 0.5)
        load.reactor_seconds += 0.8
        self.assertEqual(policy.choose(json_lines=True).level, 1)
        self.assertEqual(policy.choose().level, 5)
        self.assertEqual(policy.counts, {5: 4, 1: 3, 7: 1})

    def test_json_fast_level_per_compressor(self):
        """The fast level is the compressor's fastest that compresses (zlib 1, isal 0), or
        ``json_level``; none when that is not below the lowest adaptive level."""
        for name, fast in (("zlib", 1), ("isal", 0), ("deflate", 1)):
            load = FakeLoad()
            load.backlog_fraction = 1.0
            policy = adaptive(load, name)
            self.assertEqual(policy.choose(json_lines=True).level, fast)
            self.assertEqual(policy.choose(json_lines=True).name, name)
        load = FakeLoad()
        load.backlog_fraction = 1.0
        self.assertEqual(adaptive(load, json_level=3).choose(json_lines=True).level, 3)
        self.assertEqual(adaptive(load, json_level=5).choose(json_lines=True).level, 5)
        self.assertEqual(FixedLevel(make_compressor("deflate", 6)).choose(True).level, 6)

    def test_other_processes_cpu_is_not_spare(self):
        """When the machine's CPUs are busy with other processes (the jobs), the level
        follows the machine's busy fraction even though this process uses little."""
        load = FakeLoad()
        machine = {"busy": 0.0, "total": 0.0}
        policy = adaptive(load, machine=lambda: (machine["busy"], machine["total"]))
        levels = []
        for process_busy, machine_busy in ((0.1, 0.2), (0.1, 0.2), (0.1, 0.8), (0.1, 0.95)):
            load.run(1.0, process_busy)
            machine["busy"] += 200 * machine_busy
            machine["total"] += 200
            levels.append(policy.choose().level)
        self.assertEqual(levels, [7, 9, 8, 5])
        self.assertAlmostEqual(policy.busy, 0.95)

    def test_missing_machine_sample_falls_back_to_the_process(self):
        """A machine signal that cannot be read (None) leaves the process's own CPU use."""
        load = FakeLoad()
        policy = adaptive(load, machine=lambda: None)
        load.run(1.0, 0.1)
        self.assertEqual(policy.choose().level, 7)
        self.assertAlmostEqual(policy.busy, 0.1)

    def test_decides_at_most_once_per_interval(self):
        """Batches inside one interval share the level; the CPU use is measured over the
        whole time since the previous decision."""
        load = FakeLoad()
        policy = adaptive(load, interval=1.0)
        load.run(0.5, 0.0)
        self.assertEqual([policy.choose().level for _ in range(20)], [5] * 20)
        self.assertIsNone(policy.busy)
        load.run(0.5, 0.4)  # 1 s since the start, 20% busy on average
        self.assertEqual(policy.choose().level, 7)
        self.assertAlmostEqual(policy.busy, 0.2)
        self.assertEqual(policy.counts, {5: 20, 7: 1})

    def test_a_batch_after_a_quiet_spell_buys_no_level(self):
        """A window that spans a quiet spell (no batch for longer than ``gap``) measured
        the idle time before a batch that may open a burst: it raises no level and starts
        a new window, so the burst is judged by its own CPU use."""
        load = FakeLoad()
        policy = adaptive(load)
        load.run(1.0, 0.9)
        self.assertEqual(policy.choose().level, 5)
        load.run(30.0, 0.0)  # idle, then the first batch of a burst
        self.assertEqual(policy.choose().level, 5)
        self.assertFalse(policy.full_speed)
        load.run(1.0, 0.95)  # the burst, measured alone: saturated
        self.assertEqual(policy.choose().level, 5)
        self.assertTrue(policy.full_speed)
        load.run(1.0, 0.1)  # a steady moderate rate still climbs
        self.assertEqual(policy.choose().level, 7)

    def test_next_level_bounds(self):
        """next_level never leaves the configured range."""
        policy = adaptive(FakeLoad(), name="isal")
        self.assertEqual((policy.low, policy.high), (1, 3))
        self.assertEqual(policy.next_level(3, 0.0), 3)
        self.assertEqual(policy.next_level(2, 0.0), 3)
        self.assertEqual(policy.next_level(1, 0.8), 1)
        self.assertEqual(policy.next_level(3, 1.5), 1)

    def test_every_adaptive_level_is_a_valid_level(self):
        """Each compressor's adaptive range lies inside the levels it supports, and the
        policy builds a compressor for every level in it."""
        for name, (low, high) in ADAPTIVE_LEVELS.items():
            lo, hi = COMPRESSOR_LEVELS[name]
            self.assertTrue(lo <= low <= high <= hi, name)
            policy = adaptive(FakeLoad(), name=name)
            for level in range(low, high + 1):
                policy.level = level
                self.assertEqual(policy.choose().level, level)

    def test_bad_thresholds_are_refused(self):
        """Thresholds out of order, an empty range or a zero interval are ValueErrors."""
        load = FakeLoad()
        self.assertRaises(ValueError, adaptive, load, raise_below=0.8, lower_above=0.7)
        self.assertRaises(ValueError, adaptive, load, jump_below=0.0)
        self.assertRaises(ValueError, adaptive, load, interval=0)
        self.assertRaises(ValueError, AdaptiveLevel, "deflate", 9, 5, clock=load.clock)


class ProcStatTests(SynchronousTestCase):
    def test_reads_busy_and_total(self):
        """The first line of /proc/stat gives (busy, total) jiffies: idle and iowait are not
        busy; an unreadable or malformed file gives None."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
        self.assertEqual(proc_stat_cpu(path), (170.0, 990.0))
        with open(path, "w") as f:
            f.write("cpu  x y\n")
        self.assertIsNone(proc_stat_cpu(path))
        self.assertIsNone(proc_stat_cpu(path + ".missing"))


class FactoryTests(SynchronousTestCase):
    def test_adaptive_and_fixed(self):
        """``adaptive`` builds an AdaptiveLevel over the compressor's adaptive range; an int
        builds a FixedLevel that always returns that level."""
        clock = task.Clock()
        policy = make_level_policy("deflate", ADAPTIVE, clock=clock.seconds)
        self.assertIsInstance(policy, AdaptiveLevel)
        self.assertEqual((policy.low, policy.high), ADAPTIVE_LEVELS["deflate"])
        fixed = make_level_policy("zlib", 7, clock=clock.seconds)
        self.assertIsInstance(fixed, FixedLevel)
        fixed.set_backlog(lambda: 1.0)
        self.assertEqual({fixed.choose().level for _ in range(3)}, {7})

    def test_bad_name_or_level(self):
        """An unknown compressor or a level out of its range is a ValueError naming it."""
        clock = task.Clock()
        e = self.assertRaises(ValueError, make_level_policy, "lz4", ADAPTIVE, clock=clock.seconds)
        self.assertIn("lz4", str(e))
        e = self.assertRaises(ValueError, make_level_policy, "isal", 5, clock=clock.seconds)
        self.assertIn("isal", str(e))


def repetitive_lines(n):
    words = b"request handled user session cache miss worker started retry".split()
    return [b" ".join(words[(i * 7 + k) % len(words)] for k in range(6)) + b" %d\n" % i
            for i in range(n)]


class StorageLevelTests(SynchronousTestCase):
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(START)

    def make(self, compressor, metrics=None):
        storage = LocalStorage(
            self.data_dir, sync_runner, compressor=compressor, clock=self.clock,
            segment_max_bytes=1 << 30, fsync="batch", metrics=metrics,
        )
        self.successResultOf(storage.start())
        return storage

    def stdout_file(self):
        return os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")

    def test_levels_follow_load_and_files_stay_plain_gzip(self):
        """Storage asks the policy for each batch's compressor: batches appended while the
        process is idle get stronger levels (counted per level in the metrics), the
        members of every level form one plain gzip file, and the reader reads them back."""
        load = FakeLoad()
        policy = adaptive(load)
        metrics = PersistMetrics(process=False)
        storage = self.make(policy, metrics)
        self.assertIs(storage.compression, policy)
        lines = repetitive_lines(3000)
        chosen = []
        for k in range(0, 3000, 500):
            self.successResultOf(storage.append_logs(
                log_batch(JOB, STREAM_STDOUT, rows(k, *lines[k : k + 500]))))
            chosen.append(policy.level)
            load.run(1.0, 0.05)
        self.assertEqual(chosen, [5, 7, 9, 11, 12, 12])
        for level in (5, 7, 9, 11):
            self.assertEqual(metrics.compression_batches.labels(level=str(level))._value.get(), 1)
        self.assertEqual(metrics.compression_batches.labels(level="12")._value.get(), 2)
        self.assertEqual(metrics.compression_level_current._value.get(), 12)
        with open(self.stdout_file(), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), b"".join(lines))
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual([r.content for r in snap.iter_logs(0)], lines)

    def test_metric_and_event_batches_ask_for_json_lines(self):
        """Storage tells the policy which batches are JSON lines (metrics and events): at
        full speed those are compressed at libdeflate 1 and logs at 5, counted per level,
        and every file reads back."""
        from joblet_persist import events
        from joblet_persist._proto import ipc_pb2
        from joblet_persist.storage.api import EventBatch, MetricBatch
        from tests.test_events import SAMPLES, encode_event

        T_NS = int(START) * 10**9
        load = FakeLoad()
        load.backlog_fraction = 1.0
        policy = adaptive(load)
        metrics = PersistMetrics(process=False)
        storage = self.make(policy, metrics)
        lines = repetitive_lines(100)
        self.successResultOf(storage.append_logs(
            log_batch(JOB, STREAM_STDOUT, rows(0, *lines))))
        payload = ipc_pb2.Metric(timestamp=T_NS, sequence=1).SerializeToString()
        self.successResultOf(storage.append_metrics(
            MetricBatch(JOB, [T_NS], [1], [100], [payload])))
        event = encode_event(3, SAMPLES[3])
        self.successResultOf(storage.append_events(
            EventBatch(JOB, "exec", [T_NS], [2], [101], [event])))
        self.assertEqual(metrics.compression_batches.labels(level="5")._value.get(), 1)
        self.assertEqual(metrics.compression_batches.labels(level="1")._value.get(), 2)
        snap = self.successResultOf(storage.open_job(JOB))
        self.assertEqual([r.content for r in snap.iter_logs(0)], lines)
        exec_dir = os.path.join(self.data_dir, "events", JOB)
        with open(os.path.join(exec_dir, "exec_events.jsonl.gz"), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), events.payload_json_line(
                events.KINDS_BY_NAME["exec"], event, JOB, T_NS, 2))
        with open(os.path.join(self.data_dir, "metrics", JOB, "metrics.jsonl.gz"), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), fmt.metric_json_line(JOB, payload))

    def test_stronger_level_writes_smaller_files(self):
        """The same repetitive batches take fewer bytes when idle CPU bought level 12
        than at the fixed old default, libdeflate 5."""
        lines = repetitive_lines(20000)

        def stored(compressor, advance):
            storage = self.make(compressor)
            for k in range(0, len(lines), 5000):
                self.successResultOf(storage.append_logs(
                    log_batch(JOB, STREAM_STDOUT, rows(k, *lines[k : k + 5000]))))
                advance()
            size = os.path.getsize(self.stdout_file())
            self.successResultOf(storage.stop())
            return size

        fixed = stored(make_compressor("deflate", 5), lambda: None)
        os.rename(self.data_dir, self.data_dir + ".fixed")
        load = FakeLoad()
        policy = adaptive(load)
        for _ in range(4):  # a few idle seconds before the batches arrive
            load.run(1.0, 0.0)
            policy.choose()
        self.assertEqual(policy.level, 12)
        smaller = stored(policy, lambda: load.run(1.0, 0.0))
        self.assertLess(smaller, fixed * 0.97)


class MemberLevelTests(SynchronousTestCase):
    def test_every_level_decodes_the_same(self):
        """Members encoded at every level of every compressor's adaptive range inflate to
        the same data with gzip and with the member reader."""
        lines = repetitive_lines(2000)
        n = len(lines)
        for name, (low, high) in ADAPTIVE_LEVELS.items():
            for level in range(low, high + 1):
                members = fmt.encode_log_members(
                    list(range(n)), list(range(n)), list(range(n)), lines,
                    make_compressor(name, level),
                )
                blob = b"".join(m for m, _ in members)
                self.assertEqual(gzip.decompress(blob), b"".join(lines), (name, level))


class WiringTests(SynchronousTestCase):
    def test_writer_backlog_reaches_the_policy(self):
        """The composition root lets the storage's adaptive policy follow the writer's
        buffered bytes: once they reach a quarter of writer.highWaterBytes, the next batch
        gets the fastest level even though the policy stood at the strongest."""
        from prometheus_client import CollectorRegistry
        from twisted.internet.testing import MemoryReactorClock

        from joblet_persist import tap
        from joblet_persist.config import config_from_string

        directory = os.path.abspath(self.mktemp())
        cfg = config_from_string(
            f"storage:\n  dataDir: {directory}/data\n"
            "writer:\n  highWaterBytes: 1MiB\n  lowWaterBytes: 0\n  batchMaxBytes: 64MiB\n",
            source=os.path.join(directory, "persist.yml"),
        )
        reactor = MemoryReactorClock()
        metrics = PersistMetrics(CollectorRegistry())
        st = tap.build_storage(cfg, reactor, metrics)
        health = tap.build_health(cfg, reactor, st, metrics)
        wr = tap.build_writer(cfg, reactor, st, health, metrics)
        policy = st.storage.compression
        self.assertIsInstance(policy, AdaptiveLevel)
        policy.level = policy.high
        self.assertEqual(policy.choose().level, policy.high)
        wr.writer.add_log(JOB, STREAM_STDOUT, 1, 1, b"x" * (300 * 1024))
        self.assertEqual(policy.choose().level, policy.low)
