"""Tests for joblet_persist.storage.files: the budget of files queries hold open."""

from __future__ import annotations

import os
import threading

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import files
from joblet_persist.storage.files import FileBudget, OpenFiles, query_share


def _wait_until(predicate, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError("condition not reached in time")


class QueryShareTests(SynchronousTestCase):
    def test_share_is_what_the_pool_leaves(self):
        self.assertEqual(query_share(256, 2), 252)
        self.assertEqual(query_share(5, 2), 1)

    def test_too_small_names_both_keys(self):
        with self.assertRaises(ValueError) as cm:
            query_share(4, 2)
        message = str(cm.exception)
        self.assertIn("storage.maxOpenFiles is 4", message)
        self.assertIn("writer.threads = 2", message)
        self.assertIn("5 or more", message)


class FileBudgetTests(SynchronousTestCase):
    def test_limit_must_be_positive(self):
        self.assertRaises(ValueError, FileBudget, 0)

    def test_try_acquire_within_limit(self):
        b = FileBudget(2)
        self.assertTrue(b.try_acquire())
        self.assertTrue(b.try_acquire())
        self.assertFalse(b.try_acquire())
        self.assertEqual((b.in_use, b.peak), (2, 2))
        b.release()
        self.assertTrue(b.try_acquire())
        b.release()
        b.release()
        self.assertEqual(b.in_use, 0)
        self.assertEqual(b.peak, 2)

    def test_release_without_acquire_is_an_error(self):
        self.assertRaises(RuntimeError, FileBudget(1).release)

    def test_waiters_go_first_come_first_served(self):
        """A blocked acquire gets the next free slot; try_acquire does not jump the queue."""
        b = FileBudget(1)
        b.acquire()
        order = []

        def waiter(name):
            b.acquire()
            order.append(name)

        first = threading.Thread(target=waiter, args=("first",))
        first.start()
        _wait_until(lambda: b.waits == 1)
        second = threading.Thread(target=waiter, args=("second",))
        second.start()
        _wait_until(lambda: b.waits == 2)
        self.assertFalse(b.try_acquire())  # queued waiters come first
        b.release()
        first.join(10)
        self.assertEqual(order, ["first"])
        b.release()
        second.join(10)
        self.assertEqual(order, ["first", "second"])
        b.release()
        self.assertEqual((b.in_use, b.peak), (0, 1))


class OpenFilesTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.paths = []
        for i in range(6):
            path = os.path.join(self.dir, f"f{i}")
            with open(path, "wb") as f:
                f.write(b"%d" % i)
            self.paths.append(path)

    def test_reuses_and_caps_open_files(self):
        b = FileBudget(10)
        of = OpenFiles(b, limit=3)
        first = of.get(self.paths[0])
        self.assertIs(of.get(self.paths[0]), first)
        for p in self.paths[1:4]:
            self.assertEqual(of.get(p).read(), p[-1].encode())
        self.assertEqual(len(of), 3)
        self.assertTrue(first.closed)  # least recently used went first
        self.assertEqual(b.in_use, 3)
        self.assertEqual(of.opened, 4)
        of.release_all()
        self.assertEqual((len(of), b.in_use), (0, 0))

    def test_gives_its_own_back_before_waiting(self):
        """With the budget exhausted, a query closes its own files instead of waiting."""
        b = FileBudget(2)
        of = OpenFiles(b, limit=4)
        a = of.get(self.paths[0])
        of.get(self.paths[1])
        c = of.get(self.paths[2])  # would block forever if it waited holding two slots
        self.assertTrue(a.closed)
        self.assertFalse(c.closed)
        self.assertEqual(len(of), 1)
        self.assertEqual(b.in_use, 1)
        of.release_all()

    def test_failed_open_returns_its_slot(self):
        b = FileBudget(1)
        of = OpenFiles(b)
        self.assertRaises(FileNotFoundError, of.get, os.path.join(self.dir, "missing"))
        self.assertEqual(b.in_use, 0)
        self.assertEqual(len(of), 0)

    def test_without_a_budget_only_the_query_limit_applies(self):
        opened = []
        real = files._open_file

        def spy(path, mode):
            f = real(path, mode)
            opened.append(f)
            return f

        self.patch(files, "_open_file", spy)
        of = OpenFiles(None, limit=2)
        for p in self.paths:
            of.get(p)
        self.assertEqual(sum(not f.closed for f in opened), 2)
        of.release_all()
        self.assertTrue(all(f.closed for f in opened))
