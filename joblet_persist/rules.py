"""One definition of each value rule shared by the configuration, the CLI, security
and services: durations, host:port addresses, loopback hosts, octal file modes and
groups.  Any thread; a leaf (standard library only).

Parsers raise :class:`InvalidValue` (a ValueError) with a message that does not
name the key or option: the caller adds that.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import math
import re
from fractions import Fraction
from typing import Any, Optional


class InvalidValue(ValueError):
    """A value that does not parse; the caller adds the file and the key."""


def show_value(value: Any) -> str:
    """Render a YAML value for an error message, the way it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > 60:
            return json.dumps(value[:57]) + "..."
        return json.dumps(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


_DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(604800),
}
#: A non-negative decimal number as durations and sizes write it ("5", "1.5", ".5", "5.").
NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({NUMBER})(ms|s|m|h|d|w)")
_DURATION_TEXT = re.compile(rf"(?:{NUMBER}(?:ms|s|m|h|d|w))+")
_DURATION_HELP = (
    'a duration: a number of seconds or a string like "500ms", "30s", "15m", "12h", "7d"'
)


def parse_duration(value: Any) -> float:
    """Return ``value`` as float seconds, or raise ValueError.

    Accepts a number of seconds (int or float, not a bool) or a string: a bare number of
    seconds or one or more ``<number><unit>`` parts with units ms, s, m, h, d, w
    (``"500ms"``, ``"1.5h"``, ``"1h30m"``, ``"2w"``).  Negative, infinite and NaN values are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidValue(f"expected {_DURATION_HELP}, got {show_value(value)}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise InvalidValue(f"must not be negative, got {show_value(value)}")
        if re.fullmatch(NUMBER, text):
            seconds = float(text)
        elif _DURATION_TEXT.fullmatch(text):
            total = Fraction(0)
            for number, unit in _DURATION_PART.findall(text):
                total += Fraction(number) * _DURATION_UNITS[unit]
            seconds = float(total)
        else:
            raise InvalidValue(f"expected {_DURATION_HELP}, got {show_value(value)}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise InvalidValue(f"expected a finite duration, got {show_value(value)}")
    if seconds < 0:
        raise InvalidValue(f"must not be negative, got {show_value(value)}")
    return seconds


def duration_with_units(text: str) -> Optional[float]:
    """Seconds of ``text`` when it is written with units only (``"90s"``, ``"1h30m"``,
    ``"500ms"``), else None: the form the CLI's ``--since``/``--until`` take, where a
    bare number means Unix nanoseconds instead."""
    if not isinstance(text, str) or not _DURATION_TEXT.fullmatch(text):
        return None
    return parse_duration(text)


_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?"
)


def valid_host(host: str) -> bool:
    """True for an IP address or a syntactically valid host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None
    return True


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` into ``(host, port)``, or raise ValueError.

    ``host`` is an IPv4 address, a hostname, or an IPv6 address in brackets
    (``"[::1]:50052"``, returned without the brackets).  ``port`` is 0..65535.
    """
    if not isinstance(text, str):
        raise InvalidValue(f"expected host:port, got {show_value(text)}")
    help_ = 'expected host:port, e.g. "127.0.0.1:50052" or "[::1]:50052"'
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
        if match is None:
            raise InvalidValue(f"{help_}, got {show_value(text)}")
        host, port_text = match.groups()
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise InvalidValue(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise InvalidValue(f"{help_}, got {show_value(text)}")
        if ":" in host:
            raise InvalidValue(f'an IPv6 address needs brackets, e.g. "[::1]:50052"; got {show_value(text)}')
        if not valid_host(host):
            raise InvalidValue(f"{host!r} is not an IP address or a host name")
    if not port_text.isdigit() or not port_text.isascii():
        raise InvalidValue(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise InvalidValue(f"port {port} is out of range (0-65535)")
    return host, port


def listen_host(address: str) -> str:
    """The host a listen address binds: ``parse_host_port``'s host, or "" (every
    interface) for the ``":port"`` form grpc accepts.  Raises ValueError when malformed."""
    if address.startswith(":") and address[1:].isdigit():
        parse_host_port("0.0.0.0" + address)  # the port's range
        return ""
    return parse_host_port(address)[0]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return mapped.is_loopback
    return address.is_loopback


def parse_mode(value: Any) -> int:
    """A file mode: "0600" (octal string), YAML 0600 (octal int) or a decimal int (384)."""
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"(?:0o)?[0-7]{1,4}", text):
            raise InvalidValue(f'expected an octal file mode like "0600", got {show_value(value)}')
        mode = int(text, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        literal = getattr(value, "literal", None)
        # "600" without a leading zero is YAML decimal 600 (0o1130), almost certainly
        # meant as octal 0600: refuse it rather than create a socket with the wrong mode.
        if literal is not None and re.fullmatch(r"[1-7][0-7]{1,2}", literal):
            raise InvalidValue(
                f"{literal} is read as a decimal number; write the octal mode with a "
                f'leading zero or in quotes, e.g. "0{literal}"'
            )
        mode = int(value)
    else:
        raise InvalidValue(f'expected an octal file mode like "0600", got {show_value(value)}')
    if not 0 <= mode <= 0o777:
        raise InvalidValue(f"file mode {mode:#o} is out of range (0000-0777)")
    return mode



_GROUP_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?")


def group_text(value: Any) -> str:
    """A group as configured, a name or a numeric gid (a string or an int), as text;
    "" (or null) keeps the process's group.  Checks the form only."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidValue(f"expected a group name or a gid, got {show_value(value)}")
        return str(int(value))
    if not isinstance(value, str):
        raise InvalidValue(f"expected a group name or a gid, got {show_value(value)}")
    text = value.strip()
    if text and not _GROUP_NAME.fullmatch(text):
        raise InvalidValue(f"{show_value(value)} is not a group name or a gid")
    return text


def parse_group(value: Any) -> Optional[int]:
    """The gid of a group name or numeric gid (``group_text``); None for "" or null.

    Reads the group database (NSS): call at startup.
    """
    text = group_text(value)
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise InvalidValue(f"no group named {show_value(value)} on this host") from None
