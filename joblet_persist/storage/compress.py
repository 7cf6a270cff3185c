"""Raw-deflate compressors for segment members.

Leaf module: pure, blocking functions with no reactor imports.  Compressors are
immutable and thread-safe; the writer's CPU pool threads call them.  Every
backend releases the GIL while it compresses a large buffer, so batches of
different files compress in parallel.

Every compressor produces a complete raw deflate stream (RFC 1951, no zlib or
gzip wrapper); ``joblet_persist.storage.format`` wraps it into a gzip member.
Reading never depends on the producer: any raw deflate stream inflates with
the standard library's ``zlib``.

The level of each batch is chosen by a level policy (``FixedLevel`` or
``AdaptiveLevel``) on the reactor thread, where the storage backend hands the
batch to its pool; the member records nothing about the level, so files stay
plain gzip and readers need nothing new.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Callable, Optional

from zope.interface import Interface, implementer

__all__ = [
    "ADAPTIVE",
    "ADAPTIVE_LEVELS",
    "COMPRESSOR_LEVELS",
    "ISAL_DEFAULT_LEVEL",
    "JSON_FAST_LEVELS",
    "AdaptiveLevel",
    "Compressor",
    "FixedLevel",
    "ILevelPolicy",
    "make_compressor",
    "make_level_policy",
    "proc_stat_cpu",
]

#: Accepted levels per compressor name (inclusive ranges).
COMPRESSOR_LEVELS: dict[str, tuple[int, int]] = {
    "zlib": (0, 9),
    "deflate": (0, 12),  # libdeflate: 0 stores, 12 is slowest/smallest
    "isal": (0, 3),  # ISA-L igzip
}

#: The value of ``storage.compressionLevel`` that selects the adaptive policy.
ADAPTIVE = "adaptive"

#: The levels the adaptive policy moves between, per compressor (inclusive).  The lowest
#: is the fastest level that full-speed ingest has always used (libdeflate 5: the old
#: default), the highest the compressor's smallest output.
ADAPTIVE_LEVELS: dict[str, tuple[int, int]] = {
    "zlib": (4, 9),
    "deflate": (5, 12),
    "isal": (1, 3),
}

#: The level the adaptive policy gives batches of metric and event JSON lines while ingest
#: runs at full speed (see AdaptiveLevel.choose), per compressor: the fastest level that
#: still compresses.  JSON lines of samples and events repeat their keys, so they keep most
#: of their ratio at it (about 5.5x and 4.4x for events and metrics at libdeflate 1 against
#: 7.0x and 5.1x at 5) at a third of the CPU; logs keep the policy's level.
JSON_FAST_LEVELS: dict[str, int] = {"zlib": 1, "deflate": 1, "isal": 0}

#: The level used for ``isal`` when configuration names none: ISA-L's own default
#: (the service's default level, 5, is outside isal's range).
ISAL_DEFAULT_LEVEL = 2


class Compressor:
    """A named raw-deflate compressor at a fixed level.  Any thread.

    ``compress_raw(data)`` returns a complete raw deflate stream of ``data``;
    ``crc32(data, value=0)`` is the gzip CRC-32 (same result as
    ``zlib.crc32``), from the same library for speed.
    """

    __slots__ = ("name", "level", "_compress", "_crc32")

    def __init__(
        self,
        name: str,
        level: int,
        compress: Callable[[bytes], bytes],
        crc32: Callable[..., int],
    ) -> None:
        self.name = name
        self.level = level
        self._compress = compress
        self._crc32 = crc32

    def compress_raw(self, data) -> bytes:
        """Compress ``data`` (any bytes-like object) into one raw deflate stream."""
        return self._compress(data)

    def crc32(self, data, value: int = 0) -> int:
        """CRC-32 of ``data`` continuing from ``value``."""
        return self._crc32(data, value)

    def __repr__(self) -> str:
        return f"Compressor({self.name!r}, {self.level})"


def _zlib_compressor(level: int) -> Compressor:
    def compress(data) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    return Compressor("zlib", level, compress, zlib.crc32)


def _deflate_compressor(level: int) -> Compressor:
    import deflate

    def compress(data) -> bytes:
        return deflate.deflate_compress(data, level)

    return Compressor("deflate", level, compress, deflate.crc32)


def _isal_compressor(level: int) -> Compressor:
    from isal import isal_zlib

    def compress(data) -> bytes:
        return isal_zlib.compress(data, level, -15)

    return Compressor("isal", level, compress, isal_zlib.crc32)


_FACTORIES = {
    "zlib": _zlib_compressor,
    "deflate": _deflate_compressor,
    "isal": _isal_compressor,
}


def make_compressor(name: str, level: int) -> Compressor:
    """Return the compressor ``name`` ("zlib", "deflate" or "isal") at ``level``.

    Raises ValueError naming the compressor and the level when either is not
    supported (see COMPRESSOR_LEVELS).
    """
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown compressor {name!r}: expected one of {', '.join(sorted(_FACTORIES))}"
        )
    low, high = COMPRESSOR_LEVELS[name]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ValueError(
            f"compressor {name!r} does not support level {level!r}: expected {low}..{high}"
        )
    return _FACTORIES[name](level)


class ILevelPolicy(Interface):
    """Picks the compressor of each batch (FixedLevel, AdaptiveLevel).  Reactor thread."""

    def set_backlog(backlog):
        """Follow ``backlog()``: the writer's buffered bytes over its high-water mark."""

    def choose(json_lines=False):
        """The compressor for the next batch; ``json_lines``: metric or event lines."""


@implementer(ILevelPolicy)
class FixedLevel:
    """The level policy of a configured fixed level: every batch gets ``compressor``.

    Same interface as AdaptiveLevel (reactor thread; ``set_backlog`` is accepted and
    ignored).
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.level = compressor.level

    def set_backlog(self, backlog: Callable[[], float]) -> None:
        """Ignored: a fixed level follows no signal."""

    def choose(self, json_lines: bool = False) -> Compressor:
        """The compressor for the next batch: always the configured one."""
        return self.compressor

    def __repr__(self) -> str:
        return f"FixedLevel({self.compressor!r})"


@implementer(ILevelPolicy)
class AdaptiveLevel:
    """Spare CPU buys a stronger level: the level follows the CPU left idle and the
    writer's backlog, per batch.  Reactor thread; deterministic given its signals.

    Signals, all injected (tests pass fakes; the service passes the real ones):

    - ``clock()``: seconds (the reactor's ``seconds``);
    - ``cpu()``: CPU seconds used by this process so far (``time.process_time``): the
      reactor decoding frames plus the pool compressing and appending;
    - ``machine()``: ``(busy, total)`` CPU seconds of the whole machine so far
      (``proc_stat_cpu``, from ``/proc/stat``; None where there is none): CPU that other
      processes (the jobs themselves) use is not spare;
    - ``reactor_cpu()``: CPU seconds of the calling (reactor) thread so far
      (``time.thread_time``; ``choose`` runs on the reactor): when the reactor itself is
      busy more than ``reactor_limit`` of the time, ingest runs at full speed and every
      cycle the pool takes from it is ingest lost;
    - ``backlog()``: the writer's buffered bytes as a fraction of its high-water mark
      (set with ``set_backlog``; 0 until then).

    ``choose(json_lines)`` is called once per batch and returns the compressor for it.  At most
    once per ``interval`` seconds it takes the process's CPU use since the previous
    decision, as a fraction of ``cores``, and the machine's busy fraction over the same
    time; the larger of the two is ``busy``, and it moves the level:

    - ``backlog() >= backlog_limit`` (ingest is waiting on appends): straight down to
      the lowest level, the speed full-speed ingest always had;
    - ``busy > drop_above``, or the reactor thread busy more than ``reactor_limit``:
      straight down to the lowest level;
    - ``busy > lower_above``: one level down;
    - ``busy < jump_below``: two levels up; ``busy < raise_below``: one level up;
    - otherwise the level stays.

    It starts at the lowest level, so a service that starts under full load never
    meets a slow level; a steady moderate rate climbs to the strongest level its spare
    CPU pays for within a few decisions.  A burst after a quiet spell meets the level
    the quiet spell bought for at most one interval: the next decision sees the CPU
    busy (or the writer's backlog growing) and falls back.  A batch after ``gap``
    seconds without one (a quiet spell) moves no level: that window measured mostly the
    idle time before the batch, which may be the start of a burst, so it only starts a
    new window.  ``counts`` holds the
    batches chosen per level.

    Batches of metric and event JSON lines (``choose(json_lines=True)``) get the same
    level, except at full speed: while the last fall to the lowest level was forced (the
    writer's backlog, the CPU above ``drop_above``, or the reactor above ``reactor_limit``),
    they get ``json_level`` (default JSON_FAST_LEVELS[name], when below ``low``), which
    costs about a third of the CPU on such lines and frees it for ingest; logs keep the
    lowest level.  ``full_speed`` says whether that holds.
    """

    def __init__(
        self,
        name: str,
        low: int,
        high: int,
        *,
        clock: Callable[[], float],
        cpu: Callable[[], float] = time.process_time,
        machine: Optional[Callable[[], tuple[float, float]]] = None,
        reactor_cpu: Optional[Callable[[], float]] = time.thread_time,
        reactor_limit: float = 0.7,
        cores: Optional[int] = None,
        interval: float = 0.25,
        raise_below: float = 0.6,
        jump_below: float = 0.3,
        lower_above: float = 0.75,
        drop_above: float = 0.9,
        backlog_limit: float = 0.25,
        json_level: Optional[int] = None,
        gap: float = 2.5,
    ) -> None:
        if low > high:
            raise ValueError(f"adaptive levels {low}..{high}: the lowest exceeds the highest")
        if not 0 < jump_below <= raise_below < lower_above <= drop_above:
            raise ValueError(
                "adaptive thresholds must satisfy 0 < jump_below <= raise_below < "
                "lower_above <= drop_above"
            )
        if interval <= 0:
            raise ValueError(f"adaptive interval must be > 0, not {interval!r}")
        # Every level's compressor is built up front: a bad name or range fails at startup.
        self._compressors = {lv: make_compressor(name, lv) for lv in range(low, high + 1)}
        if json_level is None:
            json_level = JSON_FAST_LEVELS.get(name)
        self._json_fast = (
            make_compressor(name, json_level)
            if json_level is not None and json_level < low else None
        )
        #: Whether ingest runs at full speed (the last decision was a forced fall to the
        #: lowest level): JSON-line batches then get the fast level.
        self.full_speed = False
        self.name = name
        self.low = low
        self.high = high
        self.level = low
        self._clock = clock
        self._cpu = cpu
        self._machine = machine
        self._reactor_cpu = reactor_cpu
        self._reactor_limit = reactor_limit
        self._reactor_since = reactor_cpu() if reactor_cpu is not None else 0.0
        self._cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
        self._interval = interval
        self._gap = max(gap, interval)
        self._raise_below = raise_below
        self._jump_below = jump_below
        self._lower_above = lower_above
        self._drop_above = drop_above
        self._backlog_limit = backlog_limit
        self._backlog: Callable[[], float] = lambda: 0.0
        self._since = clock()
        self._cpu_since = cpu()
        self._machine_since = machine() if machine is not None else None
        #: The CPU fraction measured at the last decision (None before the first).
        self.busy: Optional[float] = None
        #: The reactor thread's busy fraction at the last decision.
        self.reactor_busy = 0.0
        #: Batches given each level so far.
        self.counts: dict[int, int] = {}

    def set_backlog(self, backlog: Callable[[], float]) -> None:
        """Follow ``backlog()``: the writer's buffered bytes over its high-water mark."""
        self._backlog = backlog

    def choose(self, json_lines: bool = False) -> Compressor:
        """The compressor for the next batch (and a new level, when one is due);
        ``json_lines``: a batch of metric or event JSON lines."""
        if self._backlog() >= self._backlog_limit:
            self.level = self.low
            self.full_speed = True
        else:
            now = self._clock()
            elapsed = now - self._since
            if elapsed >= self._gap:
                # No batch for a while: the window is mostly idle time before this batch,
                # which may open a burst.  It buys no level: measure afresh from here.
                self._restart(now)
                self.full_speed = False
            elif elapsed >= self._interval:
                cpu = self._cpu()
                busy = (cpu - self._cpu_since) / (elapsed * self._cores)
                self._since, self._cpu_since = now, cpu
                if self._machine is not None:
                    sample = self._machine()
                    if sample is not None and self._machine_since is not None:
                        used = sample[0] - self._machine_since[0]
                        total = sample[1] - self._machine_since[1]
                        if total > 0:
                            busy = max(busy, used / total)
                    self._machine_since = sample
                self.busy = busy
                if self._reactor_cpu is not None:
                    reactor = self._reactor_cpu()
                    self.reactor_busy = (reactor - self._reactor_since) / elapsed
                    self._reactor_since = reactor
                if self.reactor_busy > self._reactor_limit:
                    self.level = self.low
                    self.full_speed = True
                else:
                    self.level = self.next_level(self.level, busy)
                    self.full_speed = busy > self._drop_above
        if json_lines and self.full_speed and self._json_fast is not None:
            fast = self._json_fast
            self.counts[fast.level] = self.counts.get(fast.level, 0) + 1
            return fast
        self.counts[self.level] = self.counts.get(self.level, 0) + 1
        return self._compressors[self.level]

    def _restart(self, now: float) -> None:
        """Start a new measurement window at ``now``; the level is kept."""
        self._since, self._cpu_since = now, self._cpu()
        if self._machine is not None:
            self._machine_since = self._machine()
        if self._reactor_cpu is not None:
            self._reactor_since = self._reactor_cpu()

    def next_level(self, level: int, busy: float) -> int:
        """The level after ``level`` when the process used ``busy`` of its cores.  Pure."""
        if busy > self._drop_above:
            return self.low
        if busy > self._lower_above:
            return max(self.low, level - 1)
        if busy < self._jump_below:
            return min(self.high, level + 2)
        if busy < self._raise_below:
            return min(self.high, level + 1)
        return level

    def __repr__(self) -> str:
        return f"AdaptiveLevel({self.name!r}, {self.low}..{self.high}, at {self.level})"


def proc_stat_cpu(path: str = "/proc/stat") -> Optional[tuple[float, float]]:
    """``(busy, total)`` jiffies of all CPUs since boot, from the first line of Linux's
    ``/proc/stat``; None when it cannot be read.  Idle and iowait count as not busy;
    guest time is already inside user and nice.  Any thread (a short procfs read)."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
        values = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return None
    if len(values) < 5:
        return None
    total = sum(values)
    return float(total - values[3] - values[4]), float(total)


def make_level_policy(name: str, level, *, clock: Callable[[], float], **kwargs):
    """The level policy of ``storage.compressor``/``storage.compressionLevel``.

    ``level`` is ADAPTIVE (an AdaptiveLevel over ADAPTIVE_LEVELS[name], with ``clock``
    and the keyword arguments of AdaptiveLevel) or an int (a FixedLevel).  Raises
    ValueError naming the compressor and the level when either is not supported.
    """
    if level == ADAPTIVE:
        if name not in ADAPTIVE_LEVELS:
            make_compressor(name, 0)  # raises the unknown-compressor error
        low, high = ADAPTIVE_LEVELS[name]
        if "machine" not in kwargs and proc_stat_cpu() is not None:
            kwargs["machine"] = proc_stat_cpu
        return AdaptiveLevel(name, low, high, clock=clock, **kwargs)
    return FixedLevel(make_compressor(name, level))
