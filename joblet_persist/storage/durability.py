"""The local backend's durability policies: one definition, for storage and configuration.

Leaf module (any thread, no reactor imports): config.py validates
``storage.fsync`` against FSYNC_POLICIES and LocalStorage accepts the same.
"""

from __future__ import annotations

__all__ = ["FSYNC_POLICIES"]

#: ``storage.fsync``: "batch" fsyncs each append before it is published;
#: "interval" appends without fsync and fsyncs what changed within the sync
#: interval, with every job index write and on stop; "never" leaves it to the OS.
FSYNC_POLICIES = ("batch", "interval", "never")
