"""The storage backend factory: ``storage.backend`` names the backend to build.

Reactor thread at startup (the composition root calls it once).  ``BACKENDS``
maps each backend name to a builder ``make(config, *, run, clock, metrics,
file_budget)`` returning an object that provides
``storage.api.IStorageBackend``; a new backend (S3, CloudWatch) adds itself
here and then passes tests/storage_contract.py.  Builders import their
backend's module when called, so that naming a backend costs nothing.
"""

from __future__ import annotations

from typing import Callable, Optional

from joblet_persist.storage.api import IStorageBackend


def _make_local(config, *, run, clock, metrics=None, file_budget=None):
    """LocalStorage on ``storage.dataDir``, appending on the ``run`` pool."""
    from joblet_persist.storage.compress import make_level_policy
    from joblet_persist.storage.local import LocalStorage
    from joblet_persist.storage.safefs import FileModes

    sc, wc = config.storage, config.writer
    return LocalStorage(
        sc.data_dir,
        run,
        compressor=make_level_policy(sc.compressor, sc.compression_level, clock=clock.seconds),
        segment_max_bytes=sc.segment_max_bytes,
        fsync=sc.fsync,
        clock=clock,
        index_interval=wc.index_interval,
        sync_interval=wc.flush_interval,
        metrics=metrics,
        file_budget=file_budget,
        modes=FileModes(sc.file_mode, sc.dir_mode, sc.group),
    )


#: Backend name (the value of ``storage.backend``) -> builder.
BACKENDS: dict[str, Callable[..., object]] = {"local": _make_local}


def make_storage(config, *, run, clock, metrics=None, file_budget=None):
    """Build the backend ``config.storage.backend`` names; it provides IStorageBackend.

    ``run(f, *args) -> Deferred`` runs blocking work on the service's pool,
    ``clock`` provides ``seconds`` and ``callLater``, ``metrics`` receives the
    backend's counters (PersistMetrics) and ``file_budget`` caps the files
    queries hold open.  An unknown name is a ConfigError naming the key and
    the file (configuration loading already refuses one; this guards configs
    built in code).
    """
    name = config.storage.backend
    make: Optional[Callable[..., object]] = BACKENDS.get(name)
    if make is None:
        from joblet_persist.config import ConfigError

        raise ConfigError(config.source, "storage.backend", unknown_backend(name))
    storage = make(config, run=run, clock=clock, metrics=metrics, file_budget=file_budget)
    if not IStorageBackend.providedBy(storage):
        raise TypeError(f"storage backend {name!r} built {storage!r}, not an IStorageBackend")
    return storage


def unknown_backend(name) -> str:
    """The message for a ``storage.backend`` that names no known backend."""
    known = ", ".join(sorted(BACKENDS))
    return f"unknown storage backend {name!r}: expected one of {known}"
