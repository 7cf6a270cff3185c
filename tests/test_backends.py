"""The storage backend factory (storage/backends.py) and the ``storage.backend`` key."""

from __future__ import annotations

import dataclasses
import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.config import ConfigError, config_from_string, default_config
from joblet_persist.storage.api import IStorageBackend
from joblet_persist.storage.backends import BACKENDS, make_storage
from joblet_persist.storage.local import LocalStorage
from tests.fakes import FakeStorage


def _run(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class BackendKeyTests(SynchronousTestCase):
    def test_default_is_local(self):
        """Omitted, storage.backend is "local"; the factory builds LocalStorage on dataDir
        with the configured fsync policy."""
        self.assertEqual(default_config().storage.backend, "local")
        data_dir = os.path.abspath(self.mktemp())
        config = config_from_string(f"storage:\n  dataDir: {data_dir}\n  fsync: never\n")
        storage = make_storage(config, run=_run, clock=task.Clock())
        self.assertIsInstance(storage, LocalStorage)
        self.assertTrue(IStorageBackend.providedBy(storage))
        self.assertEqual((storage.data_dir, storage._fsync), (data_dir, "never"))

    def test_unknown_backend_names_key_file_and_known(self):
        """An unknown name, or a value that is not a name, is a ConfigError naming the key
        and the file and listing the known backends."""
        for value in ("s3", "5", "[local]"):
            with self.assertRaises(ConfigError) as caught:
                config_from_string(f"storage:\n  backend: {value}\n", source="persist.yml")
            error = caught.exception
            self.assertEqual((error.source, error.key), ("persist.yml", "storage.backend"))
            self.assertTrue(str(error).startswith("persist.yml: storage.backend: "), str(error))
            self.assertIn("expected one of cloudwatch, local", str(error))

    def test_registered_backend_selected(self):
        """A backend added to the registry is accepted by the configuration and built by the
        factory with the service's runner, clock, metrics and file budget."""
        calls = []

        def make_memory(config, *, run, clock, metrics=None, file_budget=None):
            calls.append((config.storage.backend, run, clock, metrics, file_budget))
            return FakeStorage(now=clock.seconds)

        BACKENDS["memory"] = make_memory
        self.addCleanup(BACKENDS.pop, "memory", None)
        config = config_from_string("storage:\n  backend: Memory\n")
        self.assertEqual(config.storage.backend, "memory")
        clock = task.Clock()
        storage = make_storage(config, run=_run, clock=clock, metrics="m", file_budget="b")
        self.assertIsInstance(storage, FakeStorage)
        self.assertEqual(calls, [("memory", _run, clock, "m", "b")])

    def test_factory_refuses_what_config_cannot_hold(self):
        """The factory itself refuses an unknown name (a config built in code) with the same
        ConfigError, and a builder that returns no IStorageBackend with TypeError."""
        config = dataclasses.replace(
            default_config(), storage=dataclasses.replace(default_config().storage, backend="x")
        )
        error = self.assertRaises(ConfigError, make_storage, config, run=_run, clock=None)
        self.assertEqual(error.key, "storage.backend")
        BACKENDS["broken"] = lambda config, **kwargs: object()
        self.addCleanup(BACKENDS.pop, "broken", None)
        config = config_from_string("storage:\n  backend: broken\n")
        self.assertRaises(TypeError, make_storage, config, run=_run, clock=None)
