"""The reactor-only mark: a checkable thread-ownership rule."""

from __future__ import annotations

import threading

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import threads


class ReactorOnlyTests(SynchronousTestCase):
    def test_suite_runs_with_checking_on(self):
        """The test suite turns the check on, so marked methods are checked in every test."""
        self.assertTrue(threads.CHECKING)

    def test_call_on_the_reactor_thread_passes(self):
        """A marked function called on the reactor (here: the test's) thread runs normally."""

        @threads.reactor_only
        def double(x):
            return 2 * x

        self.assertEqual(double(21), 42)

    def test_call_from_another_thread_raises_naming_the_function(self):
        """A marked function called from a pool or gRPC thread raises WrongThread."""

        @threads.reactor_only
        def mutate():
            return "mutated"

        caught = []

        def run():
            try:
                mutate()
            except threads.WrongThread as e:
                caught.append(str(e))

        t = threading.Thread(target=run, name="grpc-handler-7")
        t.start()
        t.join()
        self.assertEqual(len(caught), 1)
        self.assertIn("mutate", caught[0])
        self.assertIn("grpc-handler-7", caught[0])


def _from_other_thread(f, *args) -> list:
    """Call ``f(*args)`` on a new thread; the WrongThread messages it raised."""
    caught = []

    def run():
        try:
            f(*args)
        except threads.WrongThread as e:
            caught.append(str(e))

    t = threading.Thread(target=run, name="grpc-handler-3")
    t.start()
    t.join()
    return caught


class MarkedMethodsTests(SynchronousTestCase):
    """LocalStorage's, the writer's, ingest's, health's and the services' reactor-thread
    methods carry the mark; the any-thread reads that gRPC handlers make do not."""

    def test_local_storage(self):
        """Every reactor-thread method of LocalStorage refuses another thread; snapshot,
        job_info, list_jobs, list_jobs_page, totals and part_sizes answer there."""
        from twisted.internet import defer, task

        from joblet_persist.storage.api import LogBatch, MetricBatch
        from joblet_persist.storage.compress import make_compressor
        from joblet_persist.storage.local import LocalStorage

        storage = LocalStorage(
            self.mktemp(), defer.maybeDeferred, compressor=make_compressor("zlib", 1),
            segment_max_bytes=1 << 20, fsync="never", clock=task.Clock(),
        )
        job = "job-1"
        marked = [
            (storage.start,), (storage.stop,), (storage.open_job, job),
            (storage.append_logs, LogBatch(job, 1, [1], [1], [0], [b"x"])),
            (storage.append_metrics, MetricBatch(job, [1], [1], [0], [b""])),
            (storage.delete_job, job), (storage.delete_part, job, "logs"),
            (storage.drop_segment, job, "stdout", 0), (storage.segment_usage, job),
            (storage.unload_idle, 60), (storage.resident, job), (storage.flush_index,),
            (storage.sync_dirty,), (storage.probe_space,), (storage.free_bytes,),
        ]
        for f, *args in marked:
            self.assertEqual(len(_from_other_thread(f, *args)), 1, f.__name__)
        for f, *args in (
            (storage.snapshot, job), (storage.job_info, job), (storage.list_jobs,),
            (storage.list_jobs_page, 0, 0, 0, 0), (storage.totals,), (storage.part_sizes, job),
        ):
            self.assertEqual(_from_other_thread(f, *args), [], f.__name__)

    def test_writer(self):
        """The writer's methods that change its buffers refuse another thread."""
        from twisted.internet import task

        from joblet_persist.writer import BatchingWriter
        from tests.fakes import FakeStorage

        writer = BatchingWriter(FakeStorage(), task.Clock())
        for f, *args in (
            (writer.start,), (writer.stop,), (writer.add_log, "j", 1, 1, 1, b"x"),
            (writer.add_logs, "j", 1, [1], [1], [b"x"]), (writer.add_metric, "j", 1, 1, b""),
            (writer.unload_idle, 60), (writer.flush_all,), (writer.discard_job, "j"),
            (writer.busy_jobs,),
        ):
            self.assertEqual(len(_from_other_thread(f, *args)), 1, f.__name__)

    def test_ingest(self):
        """The ingest protocol's and factory's callbacks and the partial-frame budget
        refuse another thread (Twisted calls them on the reactor only)."""
        from twisted.internet import task

        from joblet_persist.ingest import IngestFactory
        from joblet_persist.writer import BatchingWriter
        from tests.fakes import FakeStorage

        clock = task.Clock()
        factory = IngestFactory(BatchingWriter(FakeStorage(), clock), None, clock)
        proto = factory.buildProtocol(None)
        budget = factory.budget
        for f, *args in (
            (factory.buildProtocol, None), (factory.startFactory,), (factory.stopFactory,),
            (factory.pause_all,), (factory.resume_all,), (factory.disconnect_all, 1.0),
            (proto.dataReceived, b"\0\0\0\0"), (proto.stringReceived, b""),
            (proto.lengthLimitExceeded, 1 << 30), (proto.connectionMade,),
            (proto.connectionLost,), (proto.pauseProducing,), (proto.resumeProducing,),
            (budget.refuse,), (budget.reserve, proto, 1), (budget.cancel, proto),
            (budget.release, 1), (budget.stop,),
        ):
            self.assertEqual(len(_from_other_thread(f, *args)), 1, f.__name__)

    def test_health(self):
        """The health monitor's verdict and probe loop refuse another thread; ``healthy``
        stays a plain attribute that gRPC threads read."""
        from twisted.internet import defer, task

        from joblet_persist.health import HealthMonitor

        health = HealthMonitor(task.Clock(), None, run_in_thread=defer.maybeDeferred)
        for f, *args in (
            (health.start,), (health.stop,), (health.probe_now,), (health.refresh,),
            (health.set_min_free_bytes, 1), (health.add_check, "x", lambda: (True, "")),
            (health.add_probe, lambda: (None, None)),
        ):
            self.assertEqual(len(_from_other_thread(f, *args)), 1, f.__name__)
        self.assertEqual(_from_other_thread(lambda: health.healthy), [])

    def test_services(self):
        """The services' start and stop, the pool's ``run`` and the IPC listener's
        path-check steps that act on the reactor refuse another thread; the path check's
        pool-thread half (``thd_check_path``) does not."""
        from twisted.internet.testing import MemoryReactorClock

        from joblet_persist import services

        reactor = MemoryReactorClock()
        listener = services.UnixListenerService(reactor, "ingest", "/nonexistent/s", None)
        pool = services.ThreadPoolService(reactor, "cpu-pool", 1)
        for f, *args in (
            (services.OrderedMultiService().startService,),
            (services.OrderedMultiService().stopService,),
            (pool.startService,), (pool.stopService,), (pool.run, len, ""),
            (services.CallbackService("c", list, list).startService,),
            (services.CallbackService("c", list, list).stopService,),
            (listener.startService,), (listener.stopService,), (listener.path_probe,),
            (listener.apply_path_check, (0, None)),
            (services.TCPListenerService(reactor, "h", "127.0.0.1", 0, None).startService,),
            (services.TCPListenerService(reactor, "h", "127.0.0.1", 0, None).stopService,),
            (services.DataDirLockService("/nonexistent/d").startService,),
            (services.DataDirLockService("/nonexistent/d").stopService,),
        ):
            self.assertEqual(len(_from_other_thread(f, *args)), 1, f)
        self.assertEqual(_from_other_thread(listener.thd_check_path, 0), [])
