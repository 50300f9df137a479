"""Reading YAML input files, and validating them, with one clear error line: the one place every config loader
goes through (scenarios, rule files, host.yaml, VM definitions, sweep grids)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BeforeValidator, ValidationError

from secmig.errors import ConfigError, UnitError


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


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validation_error(source: str, exc: ValidationError) -> ConfigError:
    """One line for what pydantic found wrong: ``source: field.path: value: problem (and N more)``.

    A misspelt field also makes the real one "missing": the misspelling is named first.
    """
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value = err.get("input")
        if not isinstance(value, dict | list | tuple) and repr(value) not in msg and str(value) not in msg:
            msg = f"{value!r}: {msg}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {_field_path(tuple(err['loc']))}: {msg}{more}")


def unit_validator(parse: Callable[[Any], Any]) -> BeforeValidator:
    """A field validator that parses a quantity with a unit (``"4GiB"``, ``"300ms"``): a :class:`UnitError`
    becomes the field's error, so :func:`validation_error` names file, field and value. ``None`` passes
    through untouched, for optional fields."""

    def convert(value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except UnitError as err:
            raise ValueError(str(err)) from None

    return BeforeValidator(convert)
