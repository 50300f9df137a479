"""Carrying out verdicts: continue, challenge (the identity check), throttle, abort, destroy — audited.

The monitor only says what should happen; a :class:`Responder` (the simulator, an agent) does it. A
challenge is the paper's signature identity check, done by the security core behind the responder: it
asks "is every flow of this VM authorized" — a valid grant for this VM, this destination and this
operation, or traffic addressed to a peer VM — not merely "is the destination a member". A failed one
escalates to the rule set's ``on_failed_challenge`` (destroy, by default). Every decision, passed checks
included, goes to the audit log with the evidence that triggered it.

No VM is destroyed without a failed check: ``abort`` and ``destroy`` both check first; a VM that passes
is only stopped from moving (its migration is aborted, it stays on its source), so a slow or stalled
network can cost a migration, never the VM.

:class:`Enforcer` is the loop a source runs: samples in, ``tick(now)`` every ``rules.step_s``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Protocol

from secmig.monitor.monitor import TrafficMonitor
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Level, TrafficSample, Verdict
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
    checked: tuple[bool, str] | None = None,
) -> Verdict:
    """Do what ``verdict`` asks; return it with the action finally taken and the check's outcome in evidence.

    ``checked`` is the outcome of an identity check already asked (by :class:`Enforcer` when checks take
    time); without it the check runs now.
    """
    action = verdict.action
    evidence = dict(verdict.evidence)
    reason = _reason(verdict)
    if action in (Action.CHALLENGE, Action.ABORT, Action.DESTROY):
        # The check comes first, while the stream that tripped the rule is still there to be checked.
        passed, why = checked if checked is not None else responder.challenge(verdict.vm, verdict.t_s)
        evidence["challenge"] = "passed" if passed else "failed"
        evidence["challenge_detail"] = why
        if not passed:
            action = rules.on_failed_challenge
        elif action is Action.CHALLENGE:
            action = Action.CONTINUE
        elif action is Action.DESTROY:
            action = Action.ABORT  # a VM that proved its flows are authorized is not destroyed
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


_CHECKED = (Action.CHALLENGE, Action.ABORT, Action.DESTROY)


class Enforcer:
    """A monitor and the hands that carry out its verdicts: what a sample source drives.

    With ``check_time_s`` > 0 an identity check takes that long, and the paper's policy table says what
    the VM does meanwhile: at MEDIUM it continues, throttled to ``throttle_to`` × its preset rate; at
    HIGH its flows are cut at once (throttled to 0: nothing more crosses). When the answer comes, a
    failed check leads to ``on_failed_challenge`` (destroy) and a passed one lifts the hold (rate
    ``inf``) and carries out the verdict as if the check had been instant. The check itself is asked at
    detection, of the flows that tripped the rule. With 0 (the default, and the agents') it is instant.
    """

    def __init__(
        self,
        monitor: TrafficMonitor,
        responder: Responder,
        audit: AuditSink | None = None,
        *,
        check_time_s: float = 0.0,
    ) -> None:
        self.monitor = monitor
        self.responder = responder
        self.audit = audit
        self.check_time_s = check_time_s
        self.pending: dict[str, tuple[Verdict, float, tuple[bool, str]]] = {}
        """VMs whose identity check is running: the verdict (with its hold), when it answers, its answer."""

    def observe(self, sample: TrafficSample) -> None:
        """Account one sample."""
        self.monitor.observe(sample)

    def _hold(self, verdict: Verdict, preset: float) -> Verdict:
        """Contain the VM while its check runs: throttled at MEDIUM (and below), cut at HIGH."""
        if verdict.level is Level.HIGH:
            self.responder.throttle(verdict.vm, verdict.t_s, 0.0)
            held = "flows cut"
        else:
            self.responder.throttle(verdict.vm, verdict.t_s, self.monitor.rules.throttle_to * preset)
            held = "throttled to preset"
        return replace(verdict, evidence={**verdict.evidence, "held": held, "check_s": self.check_time_s})

    def tick(self, now_s: float) -> list[Verdict]:
        """Judge the window ending at ``now_s``, act on it; returns every verdict acted on, as it ended."""
        done: list[Verdict] = []
        for vm, (verdict, due, answer) in list(self.pending.items()):
            if now_s + 1e-9 < due:
                continue
            del self.pending[vm]
            if vm not in self.monitor.profiles:
                continue
            if answer[0]:
                self.responder.throttle(vm, now_s, math.inf)  # the hold is lifted
            done.append(self._finish(verdict, answer, now_s))
        for verdict in self.monitor.evaluate(now_s):
            if verdict.vm not in self.monitor.profiles:
                continue  # destroyed by an earlier verdict of this same tick
            if verdict.vm in self.pending:
                continue  # a check is already running for this VM: its answer settles this too
            preset = self.monitor.profiles[verdict.vm].preset_rate_bytes_per_s
            if self.check_time_s > 0 and verdict.action in _CHECKED:
                answer = self.responder.challenge(verdict.vm, verdict.t_s)
                held = self._hold(verdict, preset)
                self.pending[verdict.vm] = (held, now_s + self.check_time_s, answer)
                continue
            done.append(self._finish(verdict, None, now_s))
        return done

    def _finish(self, verdict: Verdict, answer: tuple[bool, str] | None, now_s: float) -> Verdict:
        prof = self.monitor.profiles[verdict.vm]
        if answer is not None:
            verdict = replace(verdict, evidence={**verdict.evidence, "answered_s": now_s})
        final = carry_out(
            verdict,
            self.monitor.rules,
            self.responder,
            self.audit,
            preset_bytes_per_s=prof.preset_rate_bytes_per_s,
            checked=answer,
        )
        self.monitor.settle(final)
        return final
