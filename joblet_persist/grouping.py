"""Per-read bookkeeping of the frame decoder's groups, in one call each.

The decoder returns a read's frames grouped by ``(job_id, code)`` (code 1 or 2 a log
stream, ``-t`` frames of IPC message type ``t``), each group four equally long columns
``[timestamps, sequences, arrivals, items]`` (lists for a log stream; for metrics and events
the int columns are packed, ``array('q')``, ``array('Q')``, ``array('q')``).  A read of mixed
traffic holds dozens of groups, and the two steps here ran as several Python statements per
group on the reactor thread: counting the frames (``census_groups``) and appending each group to its writer
buffer (``extend_groups``).  The C extension does each in one call (``extend_groups`` one
call per run of groups that fit their open buffers); the pure-Python functions below are the
reference and run when it is not built.
"""

from __future__ import annotations

import itertools
from array import array

#: Frame types 0..9 (LOG 1, METRIC 2, the telemetry events 3..9): the length of
#: ``census_groups``' per-type tuple.
CENSUS_TYPES = 10


def census_groups_py(groups: dict, valid_ids, counts: dict) -> tuple:
    """Count the frames of ``groups``: ``(total, per_type, unknown)``.

    ``per_type`` is a tuple indexed by frame type (code 1 or 2 counts as type 1, code ``-t``
    as type ``t``); each type's count is also added to ``counts`` (type -> frames).
    ``unknown`` lists, in the groups' order, the keys whose job id is not in ``valid_ids``.
    Raises ValueError for a code of no frame type."""
    per = [0] * CENSUS_TYPES
    total = 0
    unknown = []
    for key, columns in groups.items():
        code = key[1]
        if code == 1 or code == 2:
            msg_type = 1
        elif -CENSUS_TYPES < code <= -2:
            msg_type = -code
        else:
            raise ValueError(f"unknown group code {code}")
        n = len(columns[0])
        total += n
        per[msg_type] += n
        if key[0] not in valid_ids:
            unknown.append(key)
    for msg_type, n in enumerate(per):
        if n:
            counts[msg_type] = counts.get(msg_type, 0) + n
    return total, tuple(per), unknown


def extend_groups_py(
    groups: dict, buffers: dict, max_bytes: int, max_messages: int, overhead: int,
    position: int,
) -> tuple:
    """From ``position`` on (0 at first, then what the previous call returned), append each
    non-empty group to ``buffers[key]`` while that buffer is open and stays below both
    limits with it; stop at the first other non-empty group: ``(messages, nbytes, key,
    position)``.

    A buffer has column attributes ``timestamps``, ``sequences``, ``arrivals`` (lists, or
    packed int columns for metrics and events: ``new_packed_columns``), a list ``contents``
    and an int ``nbytes`` (its items' bytes plus ``overhead`` per message).  A group is
    appended when its buffer exists, already holds messages, and both ``nbytes + size <
    max_bytes`` and ``messages + n < max_messages`` hold with it (so appending never seals
    it); ``messages`` and ``nbytes`` sum what this call appended.  The group it stops at (no
    buffer yet, an empty buffer, or one the group would fill) is left untouched for the
    caller's step, which opens and seals buffers; ``key`` is None once every group is done.
    (The C function also stops at a group whose items are not all bytes, which the decoder's
    never are: the caller's step then appends it the same way.)
    ``position`` is opaque (this function's is an index into the groups' order, the C
    function's a dict position); the groups must not change during one walk."""
    messages = 0
    nbytes = 0
    for key, columns in itertools.islice(groups.items(), position, None):
        position += 1
        timestamps, sequences, arrivals, items = columns
        n = len(timestamps)
        if not n:
            continue
        buf = buffers.get(key)
        if buf is None or not buf.timestamps or len(buf.timestamps) + n >= max_messages:
            return messages, nbytes, key, position
        size = sum(map(len, items)) + overhead * n
        if buf.nbytes + size >= max_bytes:
            return messages, nbytes, key, position
        buf.timestamps.extend(timestamps)
        buf.sequences.extend(sequences)
        buf.arrivals.extend(arrivals)
        buf.contents.extend(items)
        buf.nbytes += size
        messages += n
        nbytes += size
    return messages, nbytes, None, position


def new_columns_py() -> tuple:
    """A buffer's four empty columns (timestamps, sequences, arrivals, contents).  The C
    twin's lists are not tracked by the cyclic garbage collector: they only ever hold bytes
    and ints, and its full passes then skip every buffered message."""
    return [], [], [], []


def is_packed(column, typecode: str) -> bool:
    """Whether ``column`` is a packed int column of ``typecode`` (``"q"`` or ``"Q"``)."""
    return type(column) is array and column.typecode == typecode


def new_packed_columns() -> tuple:
    """A metric or event buffer's four empty columns: packed int columns for timestamps and
    arrivals (``array('q')``) and sequences (``array('Q')``), as the decoder's metric and
    event groups hold them (one buffer each, no object per value to allocate and free), and
    a payload list like ``new_columns``'."""
    return array("q"), array("Q"), array("q"), new_columns()[3]


try:
    from joblet_persist._speedups import census_groups as _census_groups_c
    from joblet_persist._speedups import extend_groups as _extend_groups_c
    from joblet_persist._speedups import new_columns as _new_columns_c
except ImportError:  # the C extension is optional
    _census_groups_c = _extend_groups_c = _new_columns_c = None

census_groups = _census_groups_c or census_groups_py
extend_groups = _extend_groups_c or extend_groups_py
new_columns = _new_columns_c or new_columns_py
