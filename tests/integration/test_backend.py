"""A storage backend chosen by configuration runs the whole service.

The storage contract (tests/storage_contract.py) is only worth something if a backend
that passes it also runs in the service.  These tests register the contract-tested
in-memory backend (tests.fakes.FakeStorage) in the backend registry, select it with
``storage.backend`` and build the whole service in-process with ``tap.build_service``
(real reactor, real thread pools, real Unix sockets, real gRPC); frames go in through the
IPC socket and come back out through QueryLogs / QueryMetrics / GetStats.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from joblet_persist.storage.api import IFreeSpace, IIdleUnload
from joblet_persist.storage.backends import BACKENDS
from tests.fakes import FakeStorage
from tests.integration.support import (
    grpc_call,
    in_thread,
    log_frame,
    metric_frame,
    metric_message_values,
    metric_values,
    ping,
    query_logs,
    query_metrics,
    send_in_pieces,
    service_config_text,
    short_tempdir,
    start_service,
    wait_for,
)

JOB = "0c7d5e3a-1b2f-4a6d-9e8c-5f4a3b2c1d0e"


class ConfiguredBackendTests(TestCase):
    timeout = 60

    def run_service(self, **fake_options):
        """Start the service with ``storage.backend: memory`` building a FakeStorage."""
        built = []

        def make_memory(config, *, run, clock, metrics=None, file_budget=None):
            storage = FakeStorage(now=clock.seconds, **fake_options)
            built.append(storage)
            return storage

        BACKENDS["memory"] = make_memory
        self.addCleanup(BACKENDS.pop, "memory", None)
        self.dir = short_tempdir(self)
        text = service_config_text(
            self.dir, {"storage": {"backend": "memory"}, "writer": {"flushInterval": "50ms"}}
        )
        d = start_service(self, text)
        d.addCallback(lambda root: (root, built))
        return d

    @defer.inlineCallbacks
    def check_ingest_and_query(self, root, storage):
        """Frames sent to the IPC socket come back from gRPC, exactly, through ``storage``."""
        lines = [(1, 1000 + i, i, b"out %d\n" % i) for i in range(40)]
        lines += [(2, 2000 + i, 100 + i, b"err %d\n" % i) for i in range(10)]
        data = b"".join(log_frame(JOB, s, ts, seq, c) for s, ts, seq, c in lines)
        data += b"".join(metric_frame(JOB, 5000 + n, n, metric_values(n)) for n in range(3))
        yield in_thread(send_in_pieces, os.path.join(self.dir, "ipc.sock"), data)

        def stored():
            info = storage.job_info(JOB)
            return info is not None and (info.log_count, info.metric_count) == (50, 3)

        yield wait_for(stored, what="the frames to reach the configured backend")
        grpc_sock = os.path.join(self.dir, "grpc.sock")
        got = yield in_thread(query_logs, grpc_sock, JOB)
        self.assertEqual(
            [(m.stream, m.timestamp, m.sequence, m.content) for m in got],
            [(s, ts, seq, c) for s, ts, seq, c in lines],
        )
        metrics = yield in_thread(query_metrics, grpc_sock, JOB)
        self.assertEqual(
            [metric_message_values(m) for m in metrics], [metric_values(n) for n in range(3)]
        )
        from joblet_persist._proto import persist_pb2

        stats = yield in_thread(
            grpc_call, grpc_sock, lambda stub, t: stub.GetStats(persist_pb2.GetStatsRequest(),
                                                               timeout=t)
        )
        self.assertEqual((stats.total_jobs, stats.total_logs, stats.total_metrics), (1, 50, 3))
        pong = yield in_thread(ping, grpc_sock)
        self.assertTrue(pong.healthy)
        # Nothing went to the local data directory: the backend holds the data.
        self.assertFalse(os.path.exists(os.path.join(self.dir, "data", "logs")))

    @defer.inlineCallbacks
    def test_backend_selected_by_configuration(self):
        """``storage.backend`` selects the registered backend through the factory; the
        service ingests into it and answers queries from it, with its capabilities wired
        (idle unloading, the health probe)."""
        root, built = yield self.run_service(bulk_reads=True)
        [storage] = built
        self.assertIs(root.components["storage"], storage)
        self.assertTrue(IIdleUnload.providedBy(storage) and IFreeSpace.providedBy(storage))
        self.assertIn("unload", [s.name for s in root])
        yield self.check_ingest_and_query(root, storage)
        self.assertEqual(
            root.components["health"].details["storage"]["detail"], "data directory writable"
        )

    @defer.inlineCallbacks
    def test_backend_without_capabilities(self):
        """A backend with only the core interface runs the service too: no idle unloader,
        no health probe (the storage check says so), queries through iter_logs."""
        root, built = yield self.run_service(capabilities=())
        [storage] = built
        self.assertNotIn("unload", [s.name for s in root])
        yield self.check_ingest_and_query(root, storage)
        self.assertIn(
            "no writability probe", root.components["health"].details["storage"]["detail"]
        )
