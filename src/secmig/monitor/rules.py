"""The rule table as data: a YAML file, the paper's values as defaults, validated with pydantic.

The bundled ``secmig/data/rules.yaml`` holds the paper's values; ``--rules FILE`` replaces it, and a
missing field keeps its default. A bad file gets one line naming the file, the rule and the field, e.g.
``rules.yaml: rate: high must be above medium (got 1.2 ≤ 1.5)`` or ``rules.yaml: rtt.max_peaks: …``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secmig.errors import ConfigError
from secmig.migration.policy import DOWNTIME_THRESHOLD_S
from secmig.model.units import parse_duration
from secmig.monitor.samples import Action
from secmig.yamlfile import parse_yaml, read_yaml, unit_validator, validation_error

Duration = Annotated[float, unit_validator(parse_duration)]


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
    over: Duration | None = Field(
        default=None,
        gt=0,
        description="judge the mean rate over this much of the window (default: all of it); a short span "
        "classifies a sudden rate at its own level instead of ramping through MEDIUM on the way to HIGH",
    )

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
    """A live VM paused for its stop-and-copy longer than ``threshold`` (eq. 3), or a non-live one whose stream
    made no progress for ``stall``: check the flow, abort the migration (the VM resumes on its source).

    A ``move`` is paused by design for as long as its copy takes, so its pause alone says nothing; a stalled
    link says nothing of the VM either. Only a failed identity check leads to ``on_failed_challenge``: the
    default action is ``abort``, which checks first. ``destroy`` here is carried out as "check, then destroy
    on failure, abort otherwise" (see :func:`secmig.monitor.actions.carry_out`).

    ``threshold`` is the paper's one downtime threshold ("Est. Th value", eq. 3): under the monitor it is
    also the ``paper`` stop policy's abort limit (a stop-and-copy estimated to last longer is not started),
    see :data:`secmig.migration.policy.DOWNTIME_THRESHOLD_S`.
    """

    threshold: Duration = Field(
        default=DOWNTIME_THRESHOLD_S,
        gt=0,
        description="the paper's downtime threshold (eq. 3): also the paper stop policy's abort limit",
    )
    stall: Duration = Field(default=2.0, gt=0, description="non-live: no memory byte for this long is a stall")
    action: Action = Action.ABORT


class ContactRule(_Rule):
    """A VM's first bytes to a host it has not sent to for ``window``: is this flow authorized?

    The slow-exfiltration rule: a leak at any rate starts with a first byte to its destination, so the
    identity check (a grant for this flow, or traffic addressed to a peer VM) runs before a rate or a volume
    could give it away. One check per new destination, so its cost follows the number of peers, not traffic.
    """

    window: Duration = Field(default=600.0, gt=0)
    action: Action = Action.CHALLENGE


class VolumeRule(_Rule):
    """Bytes of one VM to one host, cumulated: each further ``ram_fraction`` × its RAM, check again.

    The paper's "data > 3 × VRAM", per destination and over the VM's whole life rather than per stream
    and window: a flow whose authorization lapses (an expired grant, a revoked host) is asked again before
    it has moved the VM's memory once.
    """

    ram_fraction: float = Field(default=0.5, gt=0)
    action: Action = Action.CHALLENGE


class RuleSet(BaseModel):
    """Every rule, the window the rates are measured over, and what a failed identity check leads to."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window: Duration = Field(default=1.0, gt=0)
    step: Duration | None = Field(default=None, gt=0, description="how often the window slides (window ÷ 10)")
    recheck: Duration = Field(default=1.0, ge=0, description="a VM that passed a check is not re-checked sooner")
    on_failed_challenge: Action = Action.DESTROY
    throttle_to: float = Field(default=1.0, gt=0, description="a throttled VM is capped at this × its preset rate")
    check_time: Duration = Field(
        default=0.0,
        ge=0,
        description="how long an identity check takes where the runner models it (the simulator): meanwhile "
        "a MEDIUM VM runs throttled to its preset and a HIGH one is cut; 0: the check is instant",
    )
    rate: RateRule = RateRule()
    vswitch: VSwitchRule = VSwitchRule()
    rtt: RttRule = RttRule()
    data: DataRule = DataRule()
    downtime: DowntimeRule = DowntimeRule()
    contact: ContactRule = ContactRule()
    volume: VolumeRule = VolumeRule()

    @model_validator(mode="after")
    def _step_fits(self) -> RuleSet:
        if self.step is not None and self.step > self.window:
            raise ValueError(f"step must not exceed window (got {self.step} > {self.window})")
        if self.on_failed_challenge is Action.CHALLENGE:
            raise ValueError("on_failed_challenge cannot be challenge again")
        if self.rate.over is not None and self.rate.over > self.window:
            raise ValueError(f"rate.over must not exceed window (got {self.rate.over} > {self.window})")
        return self

    @property
    def step_s(self) -> float:
        """Seconds between two evaluations of the sliding window."""
        return self.step if self.step is not None else self.window / 10




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
        if err["type"] == "enum":
            where = ".".join(str(p) for p in err["loc"])
            actions = ", ".join(a.value for a in Action)
            raise ConfigError(f"{source}: {where}: {err['input']!r} is not an action ({actions})") from None
        raise validation_error(source, exc) from None


def with_overrides(rules: RuleSet, overrides: dict[str, Any] | None, source: str) -> RuleSet:
    """``rules`` with a partial rule set (rules.yaml's shape, e.g. a scenario's ``monitor:`` block) laid over it."""
    if not overrides:
        return rules
    merged = rules.model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return parse_rules(merged, source)


def load_rules(path: str | Path | None = None) -> RuleSet:
    """The rules in ``path``, or the bundled defaults (the paper's values)."""
    if path is None:
        text = resources.files("secmig.data").joinpath("rules.yaml").read_text(encoding="utf-8")
        return parse_rules(parse_yaml(text, "rules.yaml"), "rules.yaml")
    p = Path(path)
    return parse_rules(read_yaml(p), p.name)
