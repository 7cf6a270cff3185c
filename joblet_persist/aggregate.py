"""Metric aggregation over a time range in steps: the AggregateMetrics RPC's arithmetic.

Leaf module: pure functions and one accumulator, no reactor, no I/O.  The
servicer (gRPC thread) feeds an ``Aggregator`` the samples of one read of the
range, in arrival order, and builds the answer from ``points()``: one pass, with
per-bucket running values (and the bucket's values per field only when a
percentile is asked for).

Definitions (docs/query-api.md, "Aggregation"):

- a bucket is ``[k * step, (k + 1) * step)`` in Unix ns (aligned on the epoch, so
  ``1m`` buckets start on whole minutes); only buckets holding samples are
  returned, oldest first;
- ``avg`` = ``sum`` / ``count``; ``last`` is the last sample of the bucket in
  arrival order;
- ``p50``/``p95``/``p99``: linear interpolation between the closest ranks (the
  "inclusive" method of Python's ``statistics.quantiles``, numpy's default);
- ``rate`` (counters only): over consecutive samples in arrival order whose
  timestamps rise, the increase (a drop is a counter reset: the new value is the
  increase) divided by the time between them, summed over the intervals that
  end in the bucket: ``sum(increase) / sum(seconds)``.
"""

from __future__ import annotations

from typing import Callable, Optional

#: Fields that can be aggregated, in the order answers list them.
FIELDS = (
    "cpu_usage",
    "memory_usage",
    "gpu_usage",
    "disk_io.read_bytes",
    "disk_io.write_bytes",
    "disk_io.read_ops",
    "disk_io.write_ops",
    "network_io.rx_bytes",
    "network_io.tx_bytes",
    "network_io.rx_packets",
    "network_io.tx_packets",
)
#: Cumulative counters: the fields that have a ``rate``.
COUNTERS = frozenset(FIELDS[3:])
FUNCTIONS = ("avg", "min", "max", "sum", "last", "count", "p50", "p95", "p99", "rate")
DEFAULT_FUNCTIONS = ("avg", "min", "max")
PERCENTILES = {"p50": 50, "p95": 95, "p99": 99}

#: Steps ``auto`` chooses from (ns): the smallest that gives at most the target points.
_SECOND = 10**9
NICE_STEPS = tuple(
    s * _SECOND
    for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
              43200, 86400, 2 * 86400, 7 * 86400)
)


def number(data: dict, key: str, kind):
    """A numeric field of a stored metric object; missing or unreadable -> 0.

    snake_case keys (the stored format) and protobuf JSON's camelCase are both read.
    """
    value = data.get(key)
    if value is None:
        head, *rest = key.split("_")
        value = data.get(head + "".join(w.title() for w in rest))
    if value is None:
        return kind(0)
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return kind(0)


def _getter(field: str) -> Callable[[dict], object]:
    """The function reading ``field`` from a sample's ``data`` object as QueryMetrics does."""
    if "." not in field:
        kind = float if field in ("cpu_usage", "gpu_usage") else int
        return lambda data: number(data, field, kind)
    group, name = field.split(".")
    camel = {"disk_io": "diskIo", "network_io": "networkIo"}[group]

    def get(data: dict):
        sub = data.get(group, data.get(camel))
        return number(sub, name, int) if isinstance(sub, dict) else 0

    return get


def parse_fields(names) -> tuple:
    """The fields to aggregate (all when empty), validated; ValueError names a bad one."""
    if not names:
        return FIELDS
    out = []
    for name in names:
        if name not in FIELDS:
            raise ValueError(f"unknown field {name!r}: expected one of {', '.join(FIELDS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_functions(names) -> tuple:
    """The functions to compute (avg, min, max when empty); ValueError names a bad one."""
    if not names:
        return DEFAULT_FUNCTIONS
    out = []
    for name in names:
        if name not in FUNCTIONS:
            raise ValueError(
                f"unknown function {name!r}: expected one of {', '.join(FUNCTIONS)}"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def auto_step(span_ns: int, points: int) -> int:
    """The smallest nice step (1s, 2s, 5s, 10s, ... 1d, 2d, 7d, then weeks) that divides
    ``span_ns`` into at most ``points`` buckets."""
    points = max(1, points)
    need = -(-max(0, span_ns) // points)  # ceil
    for step in NICE_STEPS:
        if step >= need:
            return step
    week = NICE_STEPS[-1]
    return -(-need // week) * week


def percentile(sorted_values: list, p: int):
    """The ``p``-th percentile (integer 1..99) of ascending values, interpolated linearly
    between the closest ranks; the value itself for a single one."""
    n = len(sorted_values)
    if n == 1:
        return sorted_values[0]
    j, delta = divmod(p * (n - 1), 100)
    return (sorted_values[j] * (100 - delta) + sorted_values[j + 1] * delta) / 100


class FieldStats:
    """One field's running values in one bucket."""

    __slots__ = ("count", "sum", "min", "max", "last", "values", "increase", "seconds")

    def __init__(self, keep_values: bool) -> None:
        self.count = 0
        self.sum = 0
        self.min = None
        self.max = None
        self.last = None
        self.values: Optional[list] = [] if keep_values else None
        self.increase = 0
        self.seconds = 0.0

    def result(self, function: str):
        """The value of ``function`` (one of FUNCTIONS) over this bucket."""
        if function == "avg":
            return self.sum / self.count
        if function == "count":
            return self.count
        if function in PERCENTILES:
            return percentile(sorted(self.values), PERCENTILES[function])
        if function == "rate":
            return self.increase / self.seconds if self.seconds > 0 else None
        return getattr(self, function)


class Aggregator:
    """Accumulates samples into buckets of ``step`` ns.  One thread (the RPC's).

    ``add(timestamp, data)`` takes the samples in arrival order; ``points()``
    returns ``[(bucket start, samples, [FieldStats per field])]`` oldest first.
    """

    def __init__(self, step: int, fields: tuple, functions: tuple) -> None:
        if step <= 0:
            raise ValueError(f"step must be > 0 ns, not {step}")
        self.step = step
        self.fields = fields
        self.functions = functions
        self._getters = [_getter(f) for f in fields]
        self._keep = any(f in PERCENTILES for f in functions)
        rate = "rate" in functions
        self._rated = [rate and f in COUNTERS for f in fields]
        self._buckets: dict = {}
        self._prev_ts: Optional[int] = None
        self._prev: list = [None] * len(fields)
        self.samples = 0

    def add(self, timestamp: int, data: dict) -> None:
        if not isinstance(data, dict):
            data = {}
        key = timestamp - timestamp % self.step
        bucket = self._buckets.get(key)
        if bucket is None:
            keep = self._keep
            bucket = self._buckets[key] = [0, [FieldStats(keep) for _ in self.fields]]
        bucket[0] += 1
        self.samples += 1
        prev_ts = self._prev_ts
        rising = prev_ts is not None and timestamp > prev_ts
        for i, stats in enumerate(bucket[1]):
            value = self._getters[i](data)
            stats.count += 1
            stats.sum += value
            if stats.min is None or value < stats.min:
                stats.min = value
            if stats.max is None or value > stats.max:
                stats.max = value
            stats.last = value
            if stats.values is not None:
                stats.values.append(value)
            if self._rated[i]:
                before = self._prev[i]
                if rising:
                    stats.increase += value - before if value >= before else value
                    stats.seconds += (timestamp - prev_ts) / 1e9
                self._prev[i] = value
        self._prev_ts = timestamp

    def bucket_count(self) -> int:
        return len(self._buckets)

    def points(self) -> list:
        return [(key, b[0], b[1]) for key, b in sorted(self._buckets.items())]
