"""Carrying out verdicts: continue, challenge (the identity check), throttle, abort, destroy — audited.

The monitor only says what should happen; a :class:`Responder` (the simulator, an agent) does it. A
challenge is the paper's signature identity check, done by the security core behind the responder: it
passes when the VM's traffic is covered (a valid grant to a current cluster member, or the VM's valid
location binding), and a failed challenge escalates to the rule's ``on_failed_challenge`` action.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Verdict
from secmig.security.audit import AuditSink


class Responder(Protocol):
    """What the monitor can ask of whoever runs the VMs."""

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """The identity check: (passed, why)."""
        ...

    def throttle(self, vm: str, now_s: float) -> None: ...

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None: ...

    def destroy(self, vm: str, now_s: float, reason: str) -> None: ...


def carry_out(verdict: Verdict, rules: RuleSet, responder: Responder, audit: AuditSink | None = None) -> Verdict:
    """Do what ``verdict`` asks; return it with the action finally taken and the challenge's outcome."""
    action = verdict.action
    evidence = dict(verdict.evidence)
    reason = f"{verdict.rule} rule ({verdict.level.value}): " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in verdict.evidence.items()
    )
    if action is Action.ABORT:
        # The data rule: force the stop, then check the identity.
        responder.abort_migration(verdict.vm, verdict.t_s, reason)
    if action in (Action.CHALLENGE, Action.ABORT):
        passed, why = responder.challenge(verdict.vm, verdict.t_s)
        evidence["challenge"] = "passed" if passed else "failed"
        evidence["challenge_detail"] = why
        if passed:
            action = Action.CONTINUE if action is Action.CHALLENGE else Action.ABORT
        else:
            action = rules.rate.on_failed_challenge
    if action is Action.THROTTLE:
        responder.throttle(verdict.vm, verdict.t_s)
    elif action is Action.ABORT and verdict.action is not Action.ABORT:
        responder.abort_migration(verdict.vm, verdict.t_s, reason)
    elif action is Action.DESTROY:
        responder.abort_migration(verdict.vm, verdict.t_s, reason)
        responder.destroy(verdict.vm, verdict.t_s, reason)
    final = replace(verdict, action=action, evidence=evidence)
    if audit is not None:
        decision = "allowed" if action is Action.CONTINUE else action.value
        detail: dict[str, str | int | float | bool | None] = {"rule": verdict.rule, "level": verdict.level.value}
        detail.update({k: v for k, v in evidence.items()})
        audit.record(f"monitor.{verdict.rule}", decision, verdict.vm, detail)
    return final
