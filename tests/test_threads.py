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
