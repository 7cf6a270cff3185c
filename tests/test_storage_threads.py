"""The storage pieces' reactor-thread methods refuse other threads (as LocalStorage's do)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.debounce import Debouncer
from joblet_persist.logs import Logger
from joblet_persist.storage.api import JobInfo, SegmentKind
from joblet_persist.storage.catalog import JobCatalog
from joblet_persist.storage.findings import Findings, NullStorageMetrics
from joblet_persist.storage.gate import JobGate
from joblet_persist.storage.jobstate import JobState
from joblet_persist.storage.loaded import LoadedJobs
from joblet_persist.storage.syncer import DirtyPaths
from tests.test_threads import _from_other_thread


class StoragePiecesThreadTests(SynchronousTestCase):
    def test_reactor_only_methods_refuse_other_threads(self):
        """Every piece LocalStorage composes checks its reactor-only methods' thread."""
        clock = task.Clock()
        log = Logger(namespace="test.threads")
        catalog = JobCatalog(clock, 5.0, lambda jobs, parts: defer.succeed(True))
        gate = JobGate()
        findings = Findings(log, NullStorageMetrics())
        jobs = LoadedJobs("/nonexistent", None, clock, gate, catalog, findings, None)
        dirty = DirtyPaths(None, clock, 1.0, log)
        info = JobInfo("j", 1, 1, 0, 0, 0, 0, 0)
        state = JobState.empty("j", info, 0.0)
        debouncer = Debouncer(clock, 1.0, lambda: None)
        marked = [
            (catalog.load, {}, {}), (catalog.set_info, "j", info, (0, 0)), (catalog.flush,),
            (catalog.stop_writes,), (catalog.write_again,),
            (gate.begin, "j"), (gate.wait_idle, "j"), (gate.wait_quiescent,),
            (gate.exclusive, "j", lambda: None, lambda: None),
            (jobs.get, "j"), (jobs.load, "j"), (jobs.for_append, "j"), (jobs.forget, "j"),
            (jobs.unload, 0.0, lambda job: False),
            (dirty.add, ("/p",)), (dirty.sync,), (dirty.stop_timer,),
            (findings.unsafe, "j", OSError("x"), "refused"),
            (state.next_append, SegmentKind.STDOUT, "/d", 1), (state.usage,),
            (state.drop, SegmentKind.STDOUT, 0),
            (debouncer,), (debouncer.flush,), (debouncer.stop,),
        ]
        for f, *args in marked:
            self.assertEqual(len(_from_other_thread(f, *args)), 1, repr(f))
        for f, *args in ((catalog.list_jobs,), (catalog.totals,), (jobs.snapshot, "j")):
            self.assertEqual(_from_other_thread(f, *args), [], repr(f))
