"""Metric aggregation over a time range in steps: the AggregateMetrics RPC's arithmetic.

Leaf module: pure functions and one accumulator, no reactor, no I/O.  The
servicer (gRPC thread) feeds an ``Aggregator`` the samples of one read of the
range, in arrival order (as columns of the asked fields from
``storage.metric_columns`` where the snapshot reads them so, else sample by
sample), and builds the answer from ``points()``: one pass, with per-bucket
running values (and the bucket's values per field only when a percentile is
asked for).

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

import operator
from bisect import bisect_left
from typing import Callable, Optional

from joblet_persist.storage import metric_columns

#: Fields that can be aggregated, in the order answers list them.
FIELDS = metric_columns.FIELDS
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


#: One reading of stored metric fields (QueryMetrics' and the columnar read's).
number = metric_columns.number
_getter = metric_columns.getter


def _extractor(fields: tuple) -> Callable[[dict], tuple]:
    """A function reading ``fields`` of a sample's ``data`` in one call, as stored (plain
    dict lookups: a missing key is None, fixed up by the Aggregator with the getters)."""
    plan = tuple((None, f) if "." not in f else tuple(f.split(".")) for f in fields)

    def extract(data: dict) -> tuple:
        disk = data.get("disk_io")
        net = data.get("network_io")
        where = {
            None: data,
            "disk_io": disk if type(disk) is dict else _NO_GROUP,
            "network_io": net if type(net) is dict else _NO_GROUP,
        }
        return tuple([where[g].get(k) for g, k in plan])

    return extract


#: Stands in for a missing disk_io/network_io object (its values read as None, then 0).
_NO_GROUP: dict = {}


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
    """One field's values in one bucket, merged run by run."""

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

    def merge(self, column) -> None:
        """Add a run of the bucket's values (in arrival order)."""
        self.count += len(column)
        self.sum += sum(column)
        low, high = min(column), max(column)
        if self.min is None or low < self.min:
            self.min = low
        if self.max is None or high > self.max:
            self.max = high
        self.last = column[-1]
        if self.values is not None:
            self.values.extend(column)

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

    ``add(timestamp, data)`` takes the samples in arrival order (``add_columns``
    the same as columns); ``points()``
    returns ``[(bucket start, samples, [FieldStats per field])]`` oldest first.
    Samples are held as rows while they fall into one bucket (a run) and merged
    into the bucket column by column when the run ends, so the per-sample work
    is one read of the fields; a bucket that samples come back to later (times
    out of order) gets several runs.  A float field's sum is then the sum of
    its runs' sums.
    """

    def __init__(self, step: int, fields: tuple, functions: tuple) -> None:
        if step <= 0:
            raise ValueError(f"step must be > 0 ns, not {step}")
        self.step = step
        self.fields = fields
        self.functions = functions
        self._getters = [_getter(f) for f in fields]
        self._kinds = [float if f in ("cpu_usage", "gpu_usage") else int for f in fields]
        self._extract = _extractor(fields)
        self._datas: list = []
        self._keep = any(f in PERCENTILES for f in functions)
        rate = "rate" in functions
        self._rated = [i for i, f in enumerate(fields) if rate and f in COUNTERS]
        self._buckets: dict = {}
        self._key: Optional[int] = None
        self._rows: list = []
        self._times: list = []
        self._prev_ts: Optional[int] = None  # the sample before the current run
        self._prev_row: Optional[tuple] = None
        self._run_times: list = []  # add_columns' current run: its times and columns
        self._run_cols: list = []
        self.samples = 0

    def add(self, timestamp: int, data: dict) -> None:
        if not isinstance(data, dict):
            data = {}
        key = timestamp - timestamp % self.step
        if key != self._key:
            self._flush()
            self._key = key
        self._rows.append(self._extract(data))
        self._datas.append(data)
        self._times.append(timestamp)
        self.samples += 1

    def add_columns(self, timestamps: list, columns: list) -> None:
        """Add samples given as columns: ``timestamps`` in arrival order and, per field of
        ``self.fields``, its values as the getters read them (``storage.metric_columns``).

        The same result as ``add`` for each sample in turn: the samples of a bucket in a
        row (across calls too) form one run, merged column by column when it ends.  Do not
        mix with ``add`` on one Aggregator.
        """
        n = len(timestamps)
        if not n:
            return
        step = self.step
        ordered = all(map(operator.le, timestamps, timestamps[1:]))
        i = 0
        while i < n:
            t = timestamps[i]
            key = t - t % step
            if ordered:
                j = bisect_left(timestamps, key + step, i)
            else:
                j = i + 1
                while j < n and key <= timestamps[j] < key + step:
                    j += 1
            if key != self._key:
                self._flush()
                self._key = key
            if not self._run_times:
                self._run_cols = [[] for _ in columns]
            self._run_times += timestamps[i:j]
            for run, column in zip(self._run_cols, columns, strict=True):
                run += column[i:j]
            i = j
        self.samples += n

    def _columns(self) -> list:
        """The run's values per field; a column holding anything but the stored format's
        numbers (a missing key, camelCase, a string) is read again value by value."""
        columns = list(zip(*self._rows, strict=True)) if self._rows else []
        for i, column in enumerate(columns):
            if set(map(type, column)) != {self._kinds[i]}:
                get = self._getters[i]
                columns[i] = tuple([get(d) for d in self._datas])
        return columns

    def _flush(self) -> None:
        if self._run_times:
            rows, times = self._run_times, self._run_times
            columns = self._run_cols
            self._run_times = []
            self._run_cols = []
        else:
            rows, times = self._rows, self._times
            if not rows:
                return
            columns = self._columns()
        bucket = self._buckets.get(self._key)
        if bucket is None:
            keep = self._keep
            bucket = self._buckets[self._key] = [0, [FieldStats(keep) for _ in self.fields]]
        bucket[0] += len(rows)
        stats = bucket[1]
        for i, column in enumerate(columns):
            stats[i].merge(column)
        if self._rated:
            self._rates(columns, stats, times)
        self._prev_ts = times[-1]
        self._prev_row = [column[-1] for column in columns]
        self._rows = []
        self._datas = []
        self._times = []

    def _rates(self, columns: list, stats: list, times: list) -> None:
        """Add the run's counter increases and their seconds (intervals ending in it)."""
        first = 0 if self._prev_ts is not None else 1  # the very first sample starts nothing
        before_ts = [self._prev_ts, *times[:-1]]
        if all(map(operator.lt, before_ts[first:], times[first:])):
            if first >= len(times):
                return
            rising = None  # every interval: the sums telescope where values never drop
            seconds = (times[-1] - before_ts[first]) / 1e9
        else:
            rising = [j for j in range(first, len(times)) if times[j] > before_ts[j]]
            if not rising:
                return
            seconds = sum((times[j] - before_ts[j]) / 1e9 for j in rising)
        for i in self._rated:
            column = columns[i]
            prev = [None if self._prev_row is None else self._prev_row[i], *column[:-1]]
            fs = stats[i]
            if rising is None and all(map(operator.le, prev[first:], column[first:])):
                fs.increase += column[-1] - prev[first]
            else:
                for j in (range(first, len(times)) if rising is None else rising):
                    value, before = column[j], prev[j]
                    fs.increase += value - before if value >= before else value
            fs.seconds += seconds

    def bucket_count(self) -> int:
        running = self._rows or self._run_times
        return len(self._buckets) + (1 if running and self._key not in self._buckets else 0)

    def points(self) -> list:
        self._flush()
        return [(key, b[0], b[1]) for key, b in sorted(self._buckets.items())]
