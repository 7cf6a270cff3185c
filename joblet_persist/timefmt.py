"""Times as the CLI reads and writes them: one home for parsing and formatting.

Output: every time in JSON is a pair, an RFC 3339 UTC string and integer Unix
nanoseconds (``time_fields("created_at", ns)`` gives ``{"created_at": "...Z",
"created_at_ns": N}``); a zero time (unset) is ``null`` and ``0``.

Input (``parse_time``): a duration before now (``2h``, ``30m``, ``1h30m``, ``500ms``),
``now``, an RFC 3339 / ISO 8601 time (``2024-05-01T12:00:00Z``; without an offset it is
local time), or a Unix time with an explicit unit: ``1700000000s``, ``1700000000.5s``,
``1700000000000ms``, ``1700000000000000us``, ``1700000000000000000ns``.  A bare integer is
refused: seconds and nanoseconds are both common, and a wrong guess means 1970 or 2500.

Plain functions, no I/O; any thread.
"""

from __future__ import annotations

import datetime
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Optional

from joblet_persist import rules

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

_UNIX_UNITS = {"s": 10**9, "ms": 10**6, "us": 10**3, "µs": 10**3, "ns": 1}
_UNIX = re.compile(r"^(\d+(?:\.\d+)?)(s|ms|us|µs|ns)$")

CHOICES = (
    "a duration before now (30m, 2h, 1d), 'now', an RFC 3339 time "
    "(2024-05-01T12:00:00Z), or a Unix time with its unit (1700000000s, "
    "1700000000000ms, 1700000000000000000ns)"
)


def parse_time(text: str, now_ns: Optional[int] = None) -> int:
    """Unix nanoseconds of a time argument (see the module docstring); ValueError naming
    the accepted forms otherwise."""
    value = text.strip()
    if now_ns is None:
        now_ns = time.time_ns()
    if value == "now":
        return now_ns
    if value.isdigit():
        raise ValueError(
            f"ambiguous time {text!r}: give the unit of a Unix time ({value}s, {value}ms or "
            f"{value}ns), or write {CHOICES}"
        )
    unix = _UNIX.match(value)
    if unix:
        number, unit = unix.groups()
        try:
            return int(Decimal(number) * _UNIX_UNITS[unit])
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
            pass
    seconds = rules.duration_with_units(value)
    if seconds is not None:
        return max(0, now_ns - round(seconds * 1e9))
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: expected {CHOICES}") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    whole = (moment - EPOCH) // datetime.timedelta(microseconds=1)
    return whole * 1000


def rfc3339(ns: int) -> Optional[str]:
    """``2024-05-01T12:00:00.123456789Z`` (fraction only when not whole, trailing zeros
    dropped); None for 0 (unset)."""
    if ns <= 0:
        return None
    seconds, frac = divmod(ns, 10**9)
    moment = EPOCH + datetime.timedelta(seconds=seconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def rfc3339_fixed(ns: int) -> str:
    """``2024-05-01T12:00:00.123456789Z`` with all nine fraction digits, so that
    prefixes line up (``logs --timestamps``); the epoch for 0."""
    seconds, frac = divmod(int(ns), 10**9)
    moment = EPOCH + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def rfc3339_seconds(ns: int) -> str:
    """Whole-second UTC time for tables (``2024-05-01T12:00:00Z``); ``-`` for 0."""
    if ns <= 0:
        return "-"
    moment = EPOCH + datetime.timedelta(seconds=ns // 10**9)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def time_fields(name: str, ns: int) -> dict:
    """The JSON pair for one time: ``{name: RFC 3339 or None, name + "_ns": ns}``."""
    return {name: rfc3339(ns), f"{name}_ns": ns}
