"""storage.remote: ranged reads of a remote segment, cached by span (no network)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import remote
from joblet_persist.storage.files import FileBudget, OpenFiles


class _Object:
    def __init__(self, data: bytes):
        self.data = data
        self.calls = []

    def fetch(self, start, end):
        self.calls.append((start, end))
        return self.data[start:end]


class RangedFileTests(SynchronousTestCase):
    def setUp(self):
        self.obj = _Object(bytes(range(256)) * 1024)  # 256 KiB
        self.path = remote.RemotePath("s3://b/k", self.obj.fetch, len(self.obj.data))

    def test_small_reads_fetch_ahead_then_hit_the_cache(self):
        """A 12-byte read fetches READ_AHEAD bytes; reads inside that span fetch nothing."""
        f = self.path.open()
        f.seek(1000)
        self.assertEqual(f.read(12), self.obj.data[1000:1012])
        self.assertEqual(f.read(256), self.obj.data[1012:1268])
        self.assertEqual(self.obj.calls, [(1000, 1000 + remote.READ_AHEAD)])
        self.assertEqual(f.tell(), 1268)

    def test_a_read_starting_in_a_span_fetches_only_the_rest(self):
        """A member read after its header fetches the bytes past the header's span only."""
        f = self.path.open()
        f.seek(0)
        f.read(12)
        f.seek(0)
        self.assertEqual(f.read(40_000), self.obj.data[:40_000])
        self.assertEqual(self.obj.calls, [(0, remote.READ_AHEAD), (remote.READ_AHEAD, 40_000)])
        self.assertEqual(f.fetched_bytes, 40_000)

    def test_reads_stop_at_the_object_end(self):
        """Reads never ask for bytes past the object's size."""
        f = self.path.open()
        f.seek(len(self.obj.data) - 10)
        self.assertEqual(f.read(100), self.obj.data[-10:])
        self.assertEqual(f.read(5), b"")
        self.assertEqual(self.obj.calls, [(len(self.obj.data) - 10, len(self.obj.data))])

    def test_open_files_take_no_budget_slot_for_remote_paths(self):
        """A query's OpenFiles opens a RemotePath without a descriptor slot of the budget."""
        budget = FileBudget(1)
        files = OpenFiles(budget)
        f = files.get(self.path)
        self.assertIsInstance(f, remote.RangedFile)
        self.assertEqual(budget.in_use, 0)
        files.release_all()
        self.assertTrue(f.closed)
        self.assertEqual(budget.in_use, 0)
