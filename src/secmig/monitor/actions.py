"""Carrying out verdicts: continue, challenge (the identity check), throttle, abort, destroy — audited.

The monitor only says what should happen; a :class:`Responder` (the simulator, an agent) does it. A
challenge is the paper's signature identity check, done by the security core behind the responder; a
failed one escalates to the rule set's ``on_failed_challenge`` (destroy, by default). Every decision,
passed checks included, goes to the audit log with the evidence that triggered it.

:class:`Enforcer` is the loop a source runs: samples in, ``tick(now)`` every ``rules.step_s``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from secmig.monitor.monitor import TrafficMonitor
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, TrafficSample, Verdict
from secmig.security.audit import AuditSink, Decision


class Responder(Protocol):
    """What the monitor can ask of whoever runs the VMs."""

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """The identity check: (passed, why)."""
        ...

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        """Cap the VM's traffic at ``rate_bytes_per_s``."""
        ...

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        """Stop the VM's migration, if any: it stays on (or resumes on) its source."""
        ...

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        """Stop the VM and wipe its memory."""
        ...


def _reason(verdict: Verdict) -> str:
    ev = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in verdict.evidence.items())
    return f"{verdict.rule} rule ({verdict.level.value}): {ev}"


def carry_out(
    verdict: Verdict,
    rules: RuleSet,
    responder: Responder,
    audit: AuditSink | None = None,
    *,
    preset_bytes_per_s: float | None = None,
) -> Verdict:
    """Do what ``verdict`` asks; return it with the action finally taken and the check's outcome in evidence."""
    action = verdict.action
    evidence = dict(verdict.evidence)
    reason = _reason(verdict)
    if action in (Action.CHALLENGE, Action.ABORT):
        # The check comes first, while the stream that tripped the rule is still there to be checked.
        passed, why = responder.challenge(verdict.vm, verdict.t_s)
        evidence["challenge"] = "passed" if passed else "failed"
        evidence["challenge_detail"] = why
        if not passed:
            action = rules.on_failed_challenge
        elif action is Action.CHALLENGE:
            action = Action.CONTINUE
    if action is Action.ABORT:
        # The data rule's forced stop (passed or not), or a failed check's consequence.
        responder.abort_migration(verdict.vm, verdict.t_s, reason)
    if action is Action.THROTTLE:
        preset = preset_bytes_per_s if preset_bytes_per_s is not None else evidence.get("preset_bytes_per_s", 0.0)
        cap = rules.throttle_to * float(preset) if isinstance(preset, int | float) else 0.0
        evidence["throttled_to_bytes_per_s"] = cap
        responder.throttle(verdict.vm, verdict.t_s, cap)
    elif action is Action.DESTROY:
        responder.abort_migration(verdict.vm, verdict.t_s, reason)
        responder.destroy(verdict.vm, verdict.t_s, reason)
    if action is not verdict.action:
        evidence["asked"] = verdict.action.value
    final = replace(verdict, action=action, evidence=evidence)
    if audit is not None:
        detail: dict[str, str | int | float | bool | None] = {
            "t_s": verdict.t_s,
            "vswitch": verdict.vswitch,
            "rule": verdict.rule,
            "level": verdict.level.value,
        }
        detail.update(evidence)
        decision = Decision.ALLOW if action is Action.CONTINUE else Decision(action.value)
        audit.record(f"monitor.{verdict.rule}", decision, verdict.vm, detail)
    return final


class Enforcer:
    """A monitor and the hands that carry out its verdicts: what a sample source drives."""

    def __init__(self, monitor: TrafficMonitor, responder: Responder, audit: AuditSink | None = None) -> None:
        self.monitor = monitor
        self.responder = responder
        self.audit = audit

    def observe(self, sample: TrafficSample) -> None:
        """Account one sample."""
        self.monitor.observe(sample)

    def tick(self, now_s: float) -> list[Verdict]:
        """Judge the window ending at ``now_s``, act on it; returns every verdict acted on, as it ended."""
        done: list[Verdict] = []
        for verdict in self.monitor.evaluate(now_s):
            if verdict.vm not in self.monitor.profiles:
                continue  # destroyed by an earlier verdict of this same tick
            prof = self.monitor.profiles[verdict.vm]
            final = carry_out(
                verdict, self.monitor.rules, self.responder, self.audit, preset_bytes_per_s=prof.preset_rate_bytes_per_s
            )
            self.monitor.settle(final)
            done.append(final)
        return done
