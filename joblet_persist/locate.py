"""Where ``joblet-persist-ctl`` finds the service's admin gRPC socket.

Plain blocking code (no reactor), run once by the CLI before it connects.

An explicit choice wins, first found in this order: ``--socket PATH``,
``$JOBLET_PERSIST_SOCKET``, ``--config FILE`` / ``$JOBLET_PERSIST_CONFIG``
(its ``server.grpcSocket``, with ``--data-dir`` applied as the service applies
it), ``--data-dir DIR`` / ``$JOBLET_PERSIST_DATA_DIR`` (``DIR/run/persist-grpc.sock``,
where the service puts it).  Without one, the first of these that is a socket:

1. ``./data/run/persist-grpc.sock``: the README's ``twistd ... joblet-persist --data-dir ./data``
   run from the same directory;
2. ``server.grpcSocket`` of ``/etc/joblet/persist.yml``: the systemd unit's configuration;
3. ``/opt/joblet/run/persist-grpc.sock``: the service's default data directory.

When none is, ``NotFound`` lists every place and why it did not qualify.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Callable, Mapping, Optional

SOCKET_ENV = "JOBLET_PERSIST_SOCKET"
CONFIG_ENV = "JOBLET_PERSIST_CONFIG"
DATA_DIR_ENV = "JOBLET_PERSIST_DATA_DIR"
#: The README's run command keeps its data here (relative to where it runs).
README_DATA_DIR = "./data"
#: The configuration the systemd unit (deploy/joblet-persist.service) passes.
SYSTEM_CONFIG = "/etc/joblet/persist.yml"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A socket path and where it came from (for messages)."""

    path: str
    source: str

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


class NotFound(Exception):
    """No socket at any place looked at; ``str()`` lists them all."""

    def __init__(self, looked: list[tuple[Candidate, str]]):
        super().__init__(looked)
        self.looked = looked

    def __str__(self) -> str:
        places = "; ".join(f"{c.describe()}: {why}" for c, why in self.looked)
        return (
            f"no joblet-persist socket found; looked at {places}. Pass --socket PATH, "
            f"--data-dir DIR or --config FILE, or set ${SOCKET_ENV}"
        )


class LocateError(Exception):
    """An explicit --config/--data-dir that cannot give a socket (usage error)."""


def grpc_socket_of(data_dir: str) -> str:
    """The admin socket the service puts under ``--data-dir DIR`` (config.py's rule)."""
    from joblet_persist.config import GRPC_SOCKET_NAME

    return os.path.join(os.path.abspath(data_dir), "run", GRPC_SOCKET_NAME)


def default_socket() -> str:
    """The admin socket of the service's default configuration."""
    from joblet_persist.config import default_config

    return default_config().server.grpc_socket


def _from_config(path: str, data_dir: Optional[str]) -> str:
    from joblet_persist.config import ConfigError, load_config

    try:
        config = load_config(path, data_dir=data_dir)
    except ConfigError as e:
        raise LocateError(str(e)) from None
    if not config.server.grpc_socket:
        raise LocateError(f"{path}: server.grpcSocket is off; use --socket or --address")
    return config.server.grpc_socket


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _why_not(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    return "not a socket" if not stat.S_ISSOCK(st.st_mode) else "a socket"


def locate(
    *,
    socket: Optional[str] = None,
    config: Optional[str] = None,
    data_dir: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
    exists: Callable[[str], bool] = is_socket,
) -> Candidate:
    """The socket to dial; raises NotFound (nothing found) or LocateError (bad --config)."""
    if socket:
        return Candidate(socket, "--socket")
    if environ.get(SOCKET_ENV):
        return Candidate(environ[SOCKET_ENV], f"${SOCKET_ENV}")
    data_dir_source = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
    data_dir = data_dir or environ.get(DATA_DIR_ENV) or None
    config_source = "--config" if config else f"${CONFIG_ENV}"
    config = config or environ.get(CONFIG_ENV) or None
    if config:
        return Candidate(_from_config(config, data_dir), f"server.grpcSocket of {config_source} {config}")
    if data_dir:
        return Candidate(grpc_socket_of(data_dir), f"{data_dir_source} {data_dir}")
    looked = []
    for candidate in candidates():
        if isinstance(candidate, tuple):  # a configuration that could not be read
            looked.append(candidate)
            continue
        if exists(candidate.path):
            return candidate
        looked.append((candidate, _why_not(candidate.path)))
    raise NotFound(looked)


def candidates() -> list:
    """The places looked at without an explicit choice, in order; an unusable system
    configuration is a (Candidate, reason) pair."""
    found = [Candidate(grpc_socket_of(README_DATA_DIR), f"the README's --data-dir {README_DATA_DIR}")]
    if os.path.exists(SYSTEM_CONFIG):
        source = f"server.grpcSocket of {SYSTEM_CONFIG}"
        try:
            found.append(Candidate(_from_config(SYSTEM_CONFIG, None), source))
        except LocateError as e:
            found.append((Candidate(SYSTEM_CONFIG, source), str(e)))
    found.append(Candidate(default_socket(), "the default storage.dataDir"))
    return found
