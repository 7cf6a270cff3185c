"""The storage backend factory: ``storage.backend`` names the backend to build.

Reactor thread at startup (the composition root calls it once).  ``BACKENDS``
maps each backend name to a builder ``make(config, *, run, clock, metrics,
file_budget)`` returning an object that provides
``storage.api.IStorageBackend``; a new backend (S3, CloudWatch) adds itself
here and then passes tests/storage_contract.py.  Builders import their
backend's module when called, so that naming a backend costs nothing.
With ``archive.s3.enabled`` the backend built is wrapped in a TieredStorage
(storage/tiered.py): the same interfaces, reading archive-only segments
from S3.
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
        # A batch after more than 2.5 flush intervals without one ends a quiet spell:
        # it moves no adaptive level (AdaptiveLevel, ``gap``).
        compressor=make_level_policy(
            sc.compressor, sc.compression_level, clock=clock.seconds,
            gap=2.5 * max(1.0, wc.flush_interval),
        ),
        segment_max_bytes=sc.segment_max_bytes,
        fsync=sc.fsync,
        clock=clock,
        index_interval=wc.index_interval,
        sync_interval=wc.flush_interval,
        metrics=metrics,
        file_budget=file_budget,
        modes=FileModes(sc.file_mode, sc.dir_mode, sc.group),
        line_tables=sc.line_tables,
    )


def _make_cloudwatch(config, *, run, clock, metrics=None, file_budget=None):
    """LocalStorage in front of CloudWatch as the long-term store (archive.cloudwatch):
    data whose local copy is gone is read from CloudWatch (archive/cloudwatch_tier.py)."""
    from joblet_persist.archive.cloudwatch_tier import make_tier

    return make_tier(_make_local(config, run=run, clock=clock, metrics=metrics,
                                 file_budget=file_budget))


#: Backend name (the value of ``storage.backend``) -> builder.
BACKENDS: dict[str, Callable[..., object]] = {"local": _make_local}
BACKENDS["cloudwatch"] = _make_cloudwatch


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
    if config.archive.s3.enabled:
        # Tiering: the backend stays the hot tier, the S3 archive is read where local
        # retention dropped the local copy (storage/tiered.py).
        from joblet_persist.storage.tiered import make_tiered

        storage = make_tiered(config, storage, clock=clock, metrics=metrics,
                              file_budget=file_budget)
    return storage


def unknown_backend(name) -> str:
    """The message for a ``storage.backend`` that names no known backend."""
    known = ", ".join(sorted(BACKENDS))
    return f"unknown storage backend {name!r}: expected one of {known}"
