"""Stopping the gRPC server is bounded, whatever its handlers do (real gRPC, real threads).

A handler that spins and never checks cancellation (what a read loop that makes no
progress does) must neither keep its concurrency slot after the client's deadline nor
hold the stop, or the process, beyond ``shutdown_grace + stop_bound``.
"""

from __future__ import annotations

import threading
import time

import grpc
from twisted.internet import defer, reactor, threads

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist.grpc_server import DaemonThreadExecutor
from tests.integration.test_grpc import JOB, GrpcTestBase, wait_for


class _Spinner:
    """Replaces a servicer's log read with a loop that ignores cancellation.

    ``started`` is set when a handler thread enters the loop; the loop ends only when
    ``release`` is set (at cleanup), so the thread outlives any stop that does not wait
    for it.
    """

    def __init__(self, testcase, servicer):
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.spins = 0
        testcase.addCleanup(self.release.set)

        def spin(request, context):
            self.threads.append(threading.current_thread())
            self.started.set()
            while not self.release.is_set():
                self.spins += 1  # pure Python: holds the GIL as a looping reader does
            return
            yield

        servicer._log_chunks = spin


class ShutdownBoundTests(GrpcTestBase):
    timeout = 30

    @defer.inlineCallbacks
    def test_stop_completes_within_grace_and_bound_while_a_handler_spins(self):
        """With a QueryLogs handler spinning and ignoring cancellation, stopService fires
        within shutdown_grace + stop_bound (plus scheduling slack), leaving the spinning
        thread behind as a daemon thread (so it cannot hold the process open), and the
        RPC's slot is free."""
        servicer = self.make_servicer()
        spinner = _Spinner(self, servicer)
        grace, bound = 0.5, 0.5
        service = self.serve(servicer, shutdown_grace=grace, stop_bound=bound)
        stub = self.stub()
        call = stub.QueryLogs(pb.QueryLogsRequest(job_uuid=JOB), timeout=20)
        self.addCleanup(call.cancel)
        yield threads.deferToThread(spinner.started.wait, 10)
        self.assertEqual(servicer.active_rpcs, 1)

        started = time.monotonic()
        stopping = service.stopService()
        stopping.addTimeout(grace + bound + 10, reactor)
        yield stopping
        elapsed = time.monotonic() - started
        # Typically grace + bound + 0.02 s; the spinning thread slows everything else down.
        self.assertLess(elapsed, grace + bound + 5, f"stop took {elapsed:.2f}s")
        self.assertGreaterEqual(elapsed, grace)
        (thread,) = spinner.threads
        self.assertTrue(thread.is_alive(), "the handler was expected to still spin")
        self.assertTrue(thread.daemon)
        self.assertEqual(servicer.active_rpcs, 0)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_deadline_frees_the_slot_of_a_spinning_handler(self):
        """A client deadline that passes while the handler spins (ignoring cancellation)
        frees the RPC's concurrency slot at once: the next query is admitted although the
        limit is 1 and the first handler is still running."""
        servicer = self.make_servicer()
        spinner = _Spinner(self, servicer)
        self.serve(servicer, max_concurrent_rpcs=1)
        stub = self.stub()
        code = yield self.code_of(stub.QueryLogs, pb.QueryLogsRequest(job_uuid=JOB),
                                  timeout=0.5)
        ended = time.monotonic()
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertTrue(spinner.started.is_set())
        yield wait_for(lambda: servicer.active_rpcs == 0, timeout=5, interval=0.001)
        released = time.monotonic() - ended
        self.assertLess(released, 2.0, f"slot released {released:.3f}s after the deadline")
        self.assertTrue(spinner.threads[0].is_alive())
        code = yield self.code_of(stub.GetStats, pb.GetStatsRequest(), timeout=5)
        self.assertEqual(code, grpc.StatusCode.OK)


class DaemonThreadExecutorTests(GrpcTestBase):
    timeout = 15

    @defer.inlineCallbacks
    def test_runs_work_reuses_threads_and_shutdown_cancels(self):
        """The executor runs submitted calls on at most max_workers daemon threads, reuses
        idle ones, reports exceptions through the future, cancels queued work on
        shutdown(cancel_futures=True), refuses work afterwards, and join(timeout) returns the
        threads still running."""
        ex = DaemonThreadExecutor(2, thread_name_prefix="t")
        self.assertEqual(ex.submit(lambda: 41 + 1).result(5), 42)
        self.assertEqual(ex.submit(lambda: 7).result(5), 7)
        self.assertEqual(len(ex._threads), 1, "an idle thread was not reused")
        error = ex.submit(lambda: 1 / 0).exception(5)
        self.assertIsInstance(error, ZeroDivisionError)

        gate = threading.Event()
        busy = [ex.submit(gate.wait, 10) for _ in range(2)]
        queued = ex.submit(lambda: "never")
        yield wait_for(lambda: all(f.running() for f in busy))
        self.assertLessEqual(len(ex._threads), 2)
        self.assertTrue(all(t.daemon for t in ex._threads))
        ex.shutdown(wait=False, cancel_futures=True)
        self.assertTrue(queued.cancelled())
        self.assertRaises(RuntimeError, ex.submit, lambda: None)
        stuck = ex.join(0.05)
        self.assertEqual(len(stuck), 2)
        gate.set()
        self.assertEqual((yield threads.deferToThread(ex.join, 5)), [])
        self.assertTrue(all(f.result(1) for f in busy))
