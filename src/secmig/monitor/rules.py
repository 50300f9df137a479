"""The rule table as data: a YAML file, the paper's values as defaults, validated with pydantic.

The bundled ``secmig/data/rules.yaml`` holds the paper's values; ``--rules FILE`` replaces it, and a
missing field keeps its default. A bad file gets one line naming the file, the rule and the field, e.g.
``rules.yaml: rate: high must be above medium (got 1.2 ≤ 1.5)`` or ``rules.yaml: rtt.max_peaks: …``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from secmig.errors import ConfigError, UnitError
from secmig.model.units import parse_duration
from secmig.monitor.samples import Action
from secmig.yamlfile import parse_yaml, read_yaml


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
    """The VM's rate over the window relative to its preset transfer rate: LOW / MEDIUM / HIGH."""

    medium: float = Field(default=1.25, gt=0, description="rate ÷ preset at or above which a VM is MEDIUM")
    high: float = Field(default=2.0, gt=0, description="rate ÷ preset at or above which a VM is HIGH")
    low_action: Action = Action.CONTINUE
    medium_action: Action = Action.CHALLENGE
    high_action: Action = Action.CHALLENGE

    @model_validator(mode="after")
    def _ordered(self) -> RateRule:
        if self.high <= self.medium:
            raise ValueError(f"high must be above medium (got {self.high} ≤ {self.medium})")
        return self


class VSwitchRule(_Rule):
    """A vSwitch busier than ``high`` of its capacity: the VMs on it sending above ``min_ratio`` × preset are HIGH."""

    high: float = Field(default=0.9, gt=0, le=1.0, description="vSwitch utilisation that is HIGH")
    min_ratio: float = Field(default=1.0, ge=0, description="rate ÷ preset from which a VM shares the blame")
    action: Action = Action.CHALLENGE


class RttRule(_Rule):
    """More than ``max_peaks`` RTT peaks (an RTT over ``peak_factor`` × the VM's baseline) in a window."""

    peak_factor: float = Field(default=3.0, gt=1)
    max_peaks: int = Field(default=5, ge=0)
    action: Action = Action.CHALLENGE


class DataRule(_Rule):
    """A VM whose memory stream moved more than ``factor`` × its RAM: force the stop and check its identity."""

    factor: float = Field(default=3.0, gt=0)
    action: Action = Action.ABORT


class DowntimeRule(_Rule):
    """A VM paused for its stop-and-copy longer than ``threshold``: destroy it and abort the migration."""

    threshold: Duration = Field(default=2.0, gt=0)
    action: Action = Action.DESTROY


class RuleSet(BaseModel):
    """Every rule, the window the rates are measured over, and what a failed identity check leads to."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window: Duration = Field(default=1.0, gt=0)
    step: Duration | None = Field(default=None, gt=0, description="how often the window slides (window ÷ 10)")
    recheck: Duration = Field(default=1.0, ge=0, description="a VM that passed a check is not re-checked sooner")
    on_failed_challenge: Action = Action.DESTROY
    throttle_to: float = Field(default=1.0, gt=0, description="a throttled VM is capped at this × its preset rate")
    rate: RateRule = RateRule()
    vswitch: VSwitchRule = VSwitchRule()
    rtt: RttRule = RttRule()
    data: DataRule = DataRule()
    downtime: DowntimeRule = DowntimeRule()

    @model_validator(mode="after")
    def _step_fits(self) -> RuleSet:
        if self.step is not None and self.step > self.window:
            raise ValueError(f"step must not exceed window (got {self.step} > {self.window})")
        if self.on_failed_challenge is Action.CHALLENGE:
            raise ValueError("on_failed_challenge cannot be challenge again")
        return self

    @property
    def step_s(self) -> float:
        """Seconds between two evaluations of the sliding window."""
        return self.step if self.step is not None else self.window / 10


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_rules(data: Any, source: str) -> RuleSet:
    """A rule set from parsed YAML; ``source`` names the file in error messages."""
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
        raise ConfigError(f"{source}: {_loc(tuple(err['loc']))}: {msg}") from None


def load_rules(path: str | Path | None = None) -> RuleSet:
    """The rules in ``path``, or the bundled defaults (the paper's values)."""
    if path is None:
        text = resources.files("secmig.data").joinpath("rules.yaml").read_text(encoding="utf-8")
        return parse_rules(parse_yaml(text, "rules.yaml"), "rules.yaml")
    p = Path(path)
    return parse_rules(read_yaml(p), p.name)
