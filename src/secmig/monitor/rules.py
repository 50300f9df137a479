"""The rule table as data: a YAML file, the paper's values as defaults, validated with pydantic.

A bad file gets one line naming the file, the rule and the field, e.g.
``rules.yaml: rate.high: must be above rate.medium (got 1.2 ≤ 1.5)``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from secmig.errors import ConfigError, UnitError
from secmig.model.units import parse_duration
from secmig.monitor.samples import Action


def _duration(value: Any) -> Any:
    try:
        return parse_duration(value)
    except UnitError as err:
        raise ValueError(str(err)) from None


Duration = Annotated[float, BeforeValidator(_duration)]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True


class RateRule(_Rule):
    """Rate over the window relative to the VM's preset transfer rate: LOW / MEDIUM / HIGH."""

    medium: float = Field(default=1.25, gt=0, description="rate ÷ preset at or above which a VM is MEDIUM")
    high: float = Field(default=2.0, gt=0, description="rate ÷ preset at or above which a VM is HIGH")
    vswitch_high: float = Field(default=0.9, gt=0, le=1.0, description="vSwitch utilisation that is HIGH")
    low_action: Action = Action.CONTINUE
    medium_action: Action = Action.CHALLENGE
    high_action: Action = Action.CHALLENGE
    on_failed_challenge: Action = Action.DESTROY

    @model_validator(mode="after")
    def _ordered(self) -> RateRule:
        if self.high <= self.medium:
            raise ValueError(f"high must be above medium (got {self.high} ≤ {self.medium})")
        return self


class RttRule(_Rule):
    """More than ``max_peaks`` RTT peaks (RTT over ``peak_factor`` × the baseline) in a window: abnormal."""

    peak_factor: float = Field(default=3.0, gt=1)
    max_peaks: int = Field(default=5, ge=0)
    action: Action = Action.CHALLENGE


class DataRule(_Rule):
    """A VM that moved more than ``factor`` × its RAM: force the stop and check its identity."""

    factor: float = Field(default=3.0, gt=0)
    action: Action = Action.ABORT


class DowntimeRule(_Rule):
    """A stop-and-copy whose downtime exceeds the threshold: destroy the VM, abort the migration."""

    threshold: Duration = 2.0
    action: Action = Action.DESTROY


class RuleSet(BaseModel):
    """Every rule, and the window the rates are measured over."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window: Duration = Field(default=1.0, gt=0)
    rate: RateRule = RateRule()
    rtt: RttRule = RttRule()
    data: DataRule = DataRule()
    downtime: DowntimeRule = DowntimeRule()


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_rules(data: Any, source: str) -> RuleSet:
    if data is None:
        return RuleSet()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of rules")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "enum":
            msg = f"{err['input']!r} is not an action ({', '.join(a.value for a in Action)})"
        return_loc = _loc(tuple(err["loc"]))
        raise ConfigError(f"{source}: {return_loc}: {msg}") from None


def load_rules(path: str | Path | None = None) -> RuleSet:
    """The rules in ``path``, or the bundled defaults (the paper's values)."""
    if path is None:
        text = resources.files("secmig.data").joinpath("rules.yaml").read_text(encoding="utf-8")
        return parse_rules(yaml.safe_load(text), "rules.yaml")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p.name}: not valid YAML: {getattr(err, 'problem', err)}") from None
    return parse_rules(data, p.name)
