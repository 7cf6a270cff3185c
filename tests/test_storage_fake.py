"""tests.fakes.FakeStorage held to the storage contract (tests/storage_contract.py).

The same tests hold LocalStorage (tests/test_storage_local.py), so the fake the other
suites use cannot drift from the real backend.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from joblet_persist.storage.api import (
    IBulkLogReads,
    IFreeSpace,
    IIdleUnload,
    IRetentionSegments,
    IStorageBackend,
)
from tests.fakes import FakeStorage, log_batch
from tests.storage_contract import StorageBackendContractMixin


class _FakeCase(SynchronousTestCase):
    options: dict = {}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)

    def make_storage(self):
        storage = FakeStorage(now=self.clock.seconds, **self.options)
        self.successResultOf(storage.start())
        return storage


class FakeStorageContractTests(_FakeCase, StorageBackendContractMixin):
    """FakeStorage, as most suites use it, honours the contract."""


class FakeStorageRotatingContractTests(_FakeCase, StorageBackendContractMixin):
    """With a segment per append (segment-level retention exercised) and bulk reads."""

    options = {"segment_max_bytes": 1, "bulk_reads": True}


class FakeStorageBareContractTests(_FakeCase, StorageBackendContractMixin):
    """Without any optional capability: the core contract alone."""

    options = {"capabilities": ()}


class FakeStorageTests(SynchronousTestCase):
    """What the fake adds for tests: declared capabilities and manual completion."""

    def test_capabilities_declared(self):
        """By default the fake provides every capability (verifiably); ``capabilities``
        narrows that to the core interface."""
        full = FakeStorage()
        for iface in (IStorageBackend, IRetentionSegments, IIdleUnload, IFreeSpace):
            self.assertTrue(verifyObject(iface, full))
        bare = FakeStorage(capabilities=())
        self.assertTrue(IStorageBackend.providedBy(bare))
        for iface in (IRetentionSegments, IIdleUnload, IFreeSpace):
            self.assertFalse(iface.providedBy(bare))
        bare.append_logs(log_batch("j", 1, [(1, 1, b"x")]))
        snap = self.successResultOf(bare.open_job("j"))
        self.assertFalse(IBulkLogReads.providedBy(snap))

    def test_manual_appends_publish_on_completion(self):
        """Without ``auto`` an append is visible only once the test completes it; a second
        append of the same stream meanwhile is refused, and a deletion waits for it."""
        storage = FakeStorage(auto=False)
        d = storage.append_logs(log_batch("j", 1, [(1, 1, b"x")]))
        self.assertNoResult(d)
        self.assertIsNone(storage.job_info("j"))
        self.assertTrue(storage.resident("j"))
        self.failureResultOf(storage.append_logs(log_batch("j", 1, [(2, 2, b"y")])), RuntimeError)
        deleted = storage.delete_job("j")
        self.assertNoResult(deleted)
        [call] = storage.pending()
        call.succeed()
        self.assertEqual(self.successResultOf(d), 65)
        self.assertEqual(self.successResultOf(deleted), 65)
        self.assertIsNone(storage.job_info("j"))
