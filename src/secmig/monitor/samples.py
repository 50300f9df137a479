"""What the monitor reads (traffic samples) and what it says (verdicts), as frozen values.

A sample is a byte-counter delta of one VM at one vSwitch port over the interval that ends at ``t_s``,
with an RTT measurement and the VM's pause if its source has them. Nothing here says where samples
come from: the simulator's network, an agent's counters and Linux interface counters all produce them.
"""

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
    """The paper's signature identity check; a failure escalates to the rule set's ``on_failed_challenge``."""
    THROTTLE = "throttle"
    ABORT = "abort"
    """Stop the VM's migration now: the VM stays (or resumes) on its source."""
    DESTROY = "destroy"
    """The self-destruct: the VM stops and its memory is wiped."""


ACTION_ORDER: tuple[Action, ...] = tuple(Action)


@dataclass(frozen=True, slots=True)
class TrafficSample:
    """Bytes a VM moved through a vSwitch port in the interval ending at ``t_s``."""

    t_s: float
    vm: str
    vswitch: str
    bytes: float
    packets: int = 0
    rtt_s: float | None = None
    """An RTT measured in the interval (probe, TCP), if the source has one."""
    flow: str = ""
    """Which stream the bytes belong to, when the source knows (a migration's id, say)."""
    memory: bool | None = None
    """True: the bytes carry the VM's memory (its migration stream); False: the VM's own traffic;
    None: the source cannot tell, and the data rule counts them against the RAM (the cautious reading)."""
    paused_s: float = 0.0
    """How long the VM has been paused for a stop-and-copy at ``t_s``; 0 while it runs."""
    dst: str = ""
    """The host the bytes went to, when the source knows: what the contact and volume rules count per
    destination (a VM that talks to several hosts is judged per host, not on its total alone)."""
    live: bool = True
    """False when the VM's operation is non-live (a ``move``, a stop-and-copy): it is paused by design, and
    the downtime rule judges the stream's progress, not the pause."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision of the monitor, with the evidence that triggered it."""

    t_s: float
    vm: str
    vswitch: str
    rule: str
    """``rate``, ``vswitch``, ``rtt``, ``data``, ``downtime``, ``contact`` or ``volume``."""
    level: Level
    action: Action
    evidence: dict[str, float | str] = field(default_factory=dict)
