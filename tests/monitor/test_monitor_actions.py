"""The actions: continue, challenge, throttle, abort, destroy — carried out through a responder and audited."""

import pytest

from secmig.monitor import Action, Enforcer, Level, RuleSet, TrafficMonitor, TrafficSample, Verdict, VMProfile
from secmig.monitor.actions import carry_out
from secmig.security.audit import MemoryAuditSink

MB = 1e6


class Recorder:
    """A responder that records what it was asked to do."""

    def __init__(self, passes: bool) -> None:
        self.passes = passes
        self.done: list[str] = []

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        self.done.append("challenge")
        return self.passes, "grant verifies" if self.passes else "no grant"

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        self.done.append(f"throttle {rate_bytes_per_s / MB:g}")

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        self.done.append("abort")

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.done.append("destroy")


def verdict(action: Action, rule: str = "rate") -> Verdict:
    return Verdict(3.0, "vm", "h", rule, Level.HIGH, action, {"ratio": 2.5, "preset_bytes_per_s": 10 * MB})


@pytest.mark.parametrize(
    ("asked", "passes", "final", "done"),
    [
        (Action.CONTINUE, True, Action.CONTINUE, []),
        (Action.CHALLENGE, True, Action.CONTINUE, ["challenge"]),
        (Action.CHALLENGE, False, Action.DESTROY, ["challenge", "abort", "destroy"]),
        (Action.THROTTLE, True, Action.THROTTLE, ["throttle 10"]),
        (Action.ABORT, True, Action.ABORT, ["challenge", "abort"]),
        (Action.ABORT, False, Action.DESTROY, ["challenge", "abort", "destroy"]),
        # A destroy asked by a rule follows a failed check only; a VM that passes is kept (migration aborted).
        (Action.DESTROY, True, Action.ABORT, ["challenge", "abort"]),
        (Action.DESTROY, False, Action.DESTROY, ["challenge", "abort", "destroy"]),
    ],
)
def test_each_action_is_carried_out_and_audited(asked: Action, passes: bool, final: Action, done: list[str]) -> None:
    """Every action does what it says through the responder, and lands in the audit log with its evidence."""
    audit, responder = MemoryAuditSink("t"), Recorder(passes)
    out = carry_out(verdict(asked), RuleSet(), responder, audit)
    assert out.action is final and responder.done == done
    rec = audit.records[-1]
    assert rec.event == "monitor.rate" and rec.subject == "vm"
    assert rec.decision == ("allow" if final is Action.CONTINUE else final.value)
    assert rec.detail["ratio"] == 2.5 and rec.detail["level"] == "HIGH"
    if "challenge" in done:
        assert rec.detail["challenge"] == ("passed" if passes else "failed")


def test_a_failed_check_escalates_to_the_configured_action() -> None:
    """on_failed_challenge: throttle caps the VM at throttle_to × its preset instead of destroying it."""
    rules = RuleSet(on_failed_challenge=Action.THROTTLE, throttle_to=0.5)
    responder = Recorder(passes=False)
    out = carry_out(verdict(Action.CHALLENGE), rules, responder, None)
    assert out.action is Action.THROTTLE and responder.done == ["challenge", "throttle 5"]
    assert out.evidence["asked"] == "challenge"


def test_enforcer_rechecks_only_after_the_hold_off_and_forgets_the_destroyed() -> None:
    """A VM that passed is not re-checked within `recheck` unless its level rises; a destroyed VM is forgotten."""
    m = TrafficMonitor(RuleSet(), {"vm": VMProfile(10 * MB, 2**30)}, {"h": 1e9})
    responder = Recorder(passes=True)
    enforcer = Enforcer(m, responder, MemoryAuditSink("t"))
    t, acted = 0.0, []

    def run(seconds: float, rate: float) -> None:
        nonlocal t
        for _ in range(round(seconds / 0.1)):
            t = round(t + 0.1, 6)
            enforcer.observe(TrafficSample(t, "vm", "h", rate * 0.1, memory=False))
            acted.extend(enforcer.tick(t))

    run(2.0, 15 * MB)  # 1.5 × preset: MEDIUM once the window holds enough of it
    assert [v.level for v in acted] == [Level.MEDIUM, Level.MEDIUM]  # once per second, not every step
    run(0.2, 60 * MB)
    assert acted[-1].level is Level.HIGH and acted[-1].action is Action.CONTINUE  # a rise is checked at once
    responder.passes = False
    run(0.5, 60 * MB)
    assert acted[-1].level is Level.HIGH and acted[-1].action is Action.CONTINUE  # still within the hold-off
    run(1.0, 60 * MB)
    assert acted[-1].action.value == "destroy" and "vm" not in m.profiles
    assert enforcer.tick(t + 0.1) == []
