"""Storage leaves and backends.

``api`` holds the storage contract; ``compress``, ``format``, ``segment``,
``legacy`` and ``reader`` are the blocking, reactor-free building blocks of the
local backend (gzip members with an FEXTRA index, segment files, reading files
of the older Go service, and seek-based queries); docs/storage-format.md
specifies the bytes.  Import the submodules directly.
"""
