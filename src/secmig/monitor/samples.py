"""What the monitor reads and what it says."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Level(enum.StrEnum):
    """The paper's traffic-rate levels."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"


class Action(enum.StrEnum):
    """What a verdict asks for, mildest first."""

    CONTINUE = "continue"
    CHALLENGE = "challenge"
    THROTTLE = "throttle"
    ABORT = "abort"
    DESTROY = "destroy"


@dataclass(frozen=True, slots=True)
class TrafficSample:
    """Bytes a VM moved through a vSwitch between two instants, with an RTT measurement if there is one."""

    t_s: float
    vm: str
    vswitch: str
    bytes: float
    packets: int = 0
    rtt_s: float | None = None
    flow: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision of the monitor, with the evidence that triggered it."""

    t_s: float
    vm: str
    vswitch: str
    rule: str
    level: Level
    action: Action
    evidence: dict[str, float | str] = field(default_factory=dict)
