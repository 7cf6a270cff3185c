"""``twistd joblet-persist --check-config``: validate a configuration without starting.

Plain blocking code, run from tap.Options before twistd sets up logging or a reactor.
Success prints the effective configuration (every key, defaults filled in, as YAML with
the file's key names) and exits 0; an error prints one line naming the file, the line
and the key, and exits 1.
"""

from __future__ import annotations

import re
from typing import IO, Optional

import yaml

from joblet_persist.config import ConfigError


def key_line(text: str, dotted: str) -> Optional[int]:
    """1-based line of ``dotted`` (``storage.retention.interval``, ``archive.s3.kinds[1]``)
    in the YAML ``text``: of the deepest part of the path present; None when unknown."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted.split("."):
        name, indices = re.match(r"([^\[]*)((?:\[\d+\])*)$", part).groups()
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
        for index in re.findall(r"\d+", indices):
            if not isinstance(node, yaml.SequenceNode) or int(index) >= len(node.value):
                break
            node = node.value[int(index)]
            line = node.start_mark.line + 1
    return line


def with_line(error: ConfigError) -> ConfigError:
    """``error`` with the line of its key in its file, when it names both and has none."""
    if error.line is not None or not error.key or not error.source:
        return error
    try:
        with open(error.source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return error
    line = key_line(text, error.key)
    if line is None:
        return error
    return ConfigError(error.source, error.key, error.message, line)


def check(config_path: Optional[str], data_dir: Optional[str], out: IO[str],
          err: IO[str]) -> int:
    """Load the configuration as twistd would; print it (0) or its one-line error (1)."""
    from joblet_persist.config import load_config

    try:
        config = load_config(config_path, data_dir=data_dir)
    except ConfigError as e:
        err.write(f"joblet-persist: configuration error: {with_line(e)}\n")
        return 1
    described = config.describe()
    source = described.pop("source")
    out.write(f"# effective configuration of {source} (defaults filled in): OK\n")
    out.write(yaml.safe_dump(described, sort_keys=False, default_flow_style=False))
    return 0
