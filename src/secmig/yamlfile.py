"""Reading YAML input files with one clear error line: the one place every config loader goes through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secmig.errors import ConfigError


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to data; a syntax error names ``source`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where} not valid YAML: {getattr(err, 'problem', None) or err}") from None


def read_yaml(path: Path, what: str = "") -> Any:
    """Read and parse a YAML file; ``what`` prefixes the messages (e.g. ``grid.yaml: scenario:``)."""
    prefix = f"{what} " if what else ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{prefix}{path}: cannot read: {err.strerror}") from None
    return parse_yaml(text, f"{prefix}{path.name}")
