"""Issue 15: while an identity check runs, MEDIUM continues throttled to its preset and HIGH is cut."""

from __future__ import annotations

from secmig.monitor.actions import Enforcer
from secmig.monitor.monitor import TrafficMonitor, VMProfile
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, TrafficSample


class Hands:
    def __init__(self, passes: bool) -> None:
        self.passes = passes
        self.log: list[tuple[str, str, float]] = []

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        self.log.append(("challenge", vm, now_s))
        return self.passes, "test"

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        self.log.append(("throttle", vm, rate_bytes_per_s))

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        self.log.append(("abort", vm, now_s))

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.log.append(("destroy", vm, now_s))


def _run(ratio: float, passes: bool) -> tuple[Hands, list[str]]:
    rules = RuleSet.model_validate({"rate": {"over": "100ms"}, "contact": {"enabled": False}})
    hands = Hands(passes)
    enf = Enforcer(TrafficMonitor(rules, {"vm": VMProfile(10.0, 1 << 30)}), hands, check_time_s=0.3)
    actions = []
    for k in range(1, 8):
        t = k * 0.1
        enf.observe(TrafficSample(t, "vm", "sw", ratio * 10.0 * 0.1))
        actions += [f"{v.level.value}:{v.action.value}" for v in enf.tick(t)]
    return hands, actions


def test_medium_is_throttled_to_its_preset_then_destroyed_when_the_check_fails() -> None:
    """MEDIUM: throttle to 1 × preset at once, the answer 0.3 s later: failed → destroy."""
    hands, actions = _run(1.6, passes=False)
    assert hands.log[0][0] == "challenge" and hands.log[1] == ("throttle", "vm", 10.0)
    assert actions == ["MEDIUM:destroy"] and hands.log[-1][0] == "destroy"


def test_high_is_cut_at_once_and_released_when_the_check_passes() -> None:
    """HIGH: flows cut (cap 0) at once; a passed check lifts the cut and the VM continues."""
    hands, actions = _run(2.5, passes=True)
    assert ("throttle", "vm", 0.0) in hands.log and ("throttle", "vm", float("inf")) in hands.log
    assert actions[0] == f"HIGH:{Action.CONTINUE.value}" and not [e for e in hands.log if e[0] == "destroy"]
