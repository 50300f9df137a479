"""The agent's side of the traffic monitor: byte-counter samples in, the rule table's actions carried out.

:class:`MonitorHook` is the narrow interface the daemon calls (watch a VM, feed it samples, tick). The
real implementation, :class:`RulesMonitor`, wraps :class:`secmig.monitor.Enforcer` — the same monitor
and the same ``carry_out`` the simulator runs — with the agent as the
:class:`~secmig.monitor.Responder`, so the agents enforce exactly the rules of the simulation: a cold
``move`` is paused by design (judged on progress, not on its pause), a stall aborts the migration after
a passed check (the VM stays on its source), and a destroy always follows a failed check of the flow's
grant.
"""

from __future__ import annotations

from typing import Protocol

from secmig.monitor import Enforcer, Responder, RuleSet, TrafficMonitor, TrafficSample, Verdict, VMProfile
from secmig.security.audit import AuditSink


class MonitorHook(Protocol):
    """What the daemon needs of a monitor."""

    def watch(self, vm: str, ram_bytes: int) -> None:
        """Start judging ``vm`` (it migrates, in or out)."""
        ...

    def unwatch(self, vm: str) -> None:
        """Stop judging ``vm``."""
        ...

    def sample(
        self,
        vm: str,
        t_s: float,
        nbytes: int,
        *,
        flow: str = "",
        paused_s: float = 0.0,
        dst: str = "",
        live: bool = True,
    ) -> None:
        """``nbytes`` of ``vm``'s memory moved to host ``dst`` since the previous sample (``paused_s``: its
        stop-and-copy so far; ``live``: False for a cold move, paused by design)."""
        ...

    def tick(self, now_s: float) -> list[Verdict]:
        """Judge the window ending now and carry out what it asks; returns the verdicts acted on."""
        ...


class RulesMonitor:
    """The paper's LOW/MEDIUM/HIGH monitor on this host's migration byte counters."""

    def __init__(
        self,
        rules: RuleSet,
        responder: Responder,
        audit: AuditSink,
        *,
        preset_rate_bytes_per_s: float,
        vswitch: str,
    ) -> None:
        self.rules = rules
        self.enforcer = Enforcer(TrafficMonitor(rules, {}), responder, audit)
        self._preset = preset_rate_bytes_per_s
        self._vswitch = vswitch

    def watch(self, vm: str, ram_bytes: int) -> None:
        """Start judging ``vm`` against the host's preset rate."""
        self.enforcer.monitor.forget(vm)
        self.enforcer.monitor.profiles[vm] = VMProfile(self._preset, ram_bytes)

    def unwatch(self, vm: str) -> None:
        """Forget ``vm``."""
        self.enforcer.monitor.forget(vm)

    def sample(
        self,
        vm: str,
        t_s: float,
        nbytes: int,
        *,
        flow: str = "",
        paused_s: float = 0.0,
        dst: str = "",
        live: bool = True,
    ) -> None:
        """Account a byte-counter delta of a migration stream (memory, by construction) to host ``dst``."""
        self.enforcer.observe(
            TrafficSample(
                t_s, vm, self._vswitch, float(nbytes), flow=flow, memory=True, paused_s=paused_s, dst=dst, live=live
            )
        )

    def tick(self, now_s: float) -> list[Verdict]:
        """Evaluate and act; verdicts and actions are audited by the enforcer."""
        return self.enforcer.tick(now_s)
