"""Rules that configuration and storage share have one definition, in a storage leaf."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import config
from joblet_persist.storage import compress, durability
from joblet_persist.storage.local import LocalStorage


class SharedRuleTests(SynchronousTestCase):
    def test_fsync_policies_defined_once_and_enforced_by_storage(self):
        """LocalStorage refuses a policy outside FSYNC_POLICIES, naming the known ones."""
        self.assertEqual(durability.FSYNC_POLICIES, ("batch", "interval", "never"))
        with self.assertRaises(ValueError) as caught:
            LocalStorage(
                "/nonexistent",
                None,
                compressor=None,
                segment_max_bytes=1,
                fsync="sometimes",
                clock=None,
            )
        self.assertIn(str(durability.FSYNC_POLICIES), str(caught.exception))

    def test_configuration_accepts_what_storage_accepts(self):
        """The configuration's compressor levels and isal default are the storage tables'.

        Holds while config.py keeps a table of its own, and keeps holding when it
        imports the storage one.
        """
        self.assertEqual(dict(config.COMPRESSION_LEVELS), compress.COMPRESSOR_LEVELS)
        self.assertEqual(config.ISAL_DEFAULT_LEVEL, compress.ISAL_DEFAULT_LEVEL)
        low, high = compress.COMPRESSOR_LEVELS["isal"]
        self.assertTrue(low <= compress.ISAL_DEFAULT_LEVEL <= high)
