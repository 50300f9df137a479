"""The monitor inside a simulation: samples from the network's byte counters, actions on the simulation.

Every tick (a tenth of the monitor's window) each VM's byte counter and its vSwitch's load become a
:class:`~secmig.monitor.TrafficSample`; the RTT a VM sees is modelled from its vSwitch's utilisation
(an M/M/1 queue: base ÷ (1 − u)). Every window the monitor judges, and its verdicts are carried out
through :class:`SimResponder`, whose identity check is the security core's real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import simpy

from secmig.errors import ConfigError, SecurityError
from secmig.migration.result import MigrationResult
from secmig.monitor.actions import carry_out
from secmig.monitor.monitor import TrafficMonitor, VMProfile
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, TrafficSample, Verdict
from secmig.security.audit import AuditSink, MemoryAuditSink
from secmig.security.cluster import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.grants import Grant, check_grant
from secmig.security.location import verify_location
from secmig.security.policy import Operation
from secmig.sim.engine import Simulation, TrafficSpec

BASE_RTT_S = 0.0002


@dataclass
class SimSecurity:
    """The security core's view of a simulated cluster: real keys, grants and bindings."""

    cluster: Cluster
    bindings: dict[str, LocationBinding] = field(default_factory=dict)
    grants: dict[tuple[str, str, str], Grant] = field(default_factory=dict)

    def check_move(self, vm: str, src: str, dst: str) -> tuple[bool, str]:
        """Is moving ``vm`` from ``src`` to ``dst`` covered by a grant to a current cluster member?"""
        trust = self.cluster.trust()
        now = time.time()
        try:
            check_grant(
                self.grants.get((vm, src, dst)),
                trust.roots(),
                now=now,
                operation=Operation.MIGRATE,
                vm_id=vm,
                source_host=src,
                destination_host=dst,
                current_binding=self.bindings.get(vm),
            )
            trust.check_member(self.cluster.host_identity(dst).vsignature, now)
        except (SecurityError, ConfigError) as err:
            return False, str(err) or f"host {dst!r} is not a member of this cluster"
        return True, f"grant for {vm} {src}→{dst} and {dst}'s Vsignature verify"

    def moved(self, vm: str, src: str, dst: str) -> None:
        """A granted move completed: the grant's next binding becomes the VM's binding."""
        grant = self.grants.get((vm, src, dst))
        if grant is not None and grant.next_binding is not None:
            self.bindings[vm] = grant.next_binding

    def check_location(self, vm: str, mac: str, host: str) -> tuple[bool, str]:
        verdict = verify_location(
            self.bindings.get(vm), self.cluster.trust().roots(), vm_id=vm, vm_mac=mac, host_id=host
        )
        return verdict.ok, verdict.reason


class SimResponder:
    """Carries out the monitor's verdicts on a running simulation."""

    def __init__(self, sim: Simulation, security: SimSecurity) -> None:
        self.sim = sim
        self.security = security

    def _unauthorized(self, vm: str, now_s: float) -> TrafficSpec | None:
        for t in self.sim.spec.traffic:
            if t.kind == "exfil" and t.src_vm == vm and t.start_s <= now_s <= t.start_s + t.duration_s + 1:
                return t
        return None

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        host = self.sim.location[vm]
        exfil = self._unauthorized(vm, now_s)
        if exfil is not None:
            dst = self.sim.location.get(exfil.dst, exfil.dst)
            return self.security.check_move(vm, host, dst)
        moving = self.sim.migrating(vm)
        if moving is not None:
            return self.security.check_move(vm, *moving)
        return self.security.check_location(vm, self.sim.vms[vm].mac, host)

    def throttle(self, vm: str, now_s: float) -> None:  # the simulator has no per-VM throttle yet
        return None

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        self.sim.abort_migration(vm, reason)

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.sim.destroy(vm, reason)


@dataclass
class MonitorLog:
    """What the monitor saw and did during a run."""

    verdicts: list[Verdict] = field(default_factory=list)
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    windows: int = 0


def attach_monitor(
    sim: Simulation,
    rules: RuleSet,
    security: SimSecurity,
    audit: AuditSink | None = None,
    until_s: float | None = None,
) -> MonitorLog:
    """Make ``sim`` run a monitor over all its VMs; returns the log it fills as the run goes."""
    log = MonitorLog()
    audit = audit or MemoryAuditSink("monitor")
    profiles = {vm.name: VMProfile(vm.transfer_rate_bytes_per_s or 0.0, vm.ram_bytes) for vm in sim.spec.vms}
    caps = {h.name: h.vswitch_bytes_per_s for h in sim.spec.infra.hosts}
    monitor = TrafficMonitor(rules, profiles, caps)
    responder = SimResponder(sim, security)
    tick = rules.window / 10
    horizon = until_s or sim.spec.until_s or 600.0

    def migration_ended(result: MigrationResult) -> None:
        if result.outcome == "completed":
            # The destination obtained the VM's new binding with the grant: the verification module
            # now expects the VM on its new host (the paper's "recomputed hash value").
            security.moved(result.vm, result.source, result.destination)
            v = monitor.judge_downtime(result.vm, result.downtime_s, float(sim.env.now))
            if v is not None:
                log.verdicts.append(carry_out(v, rules, responder, audit))

    sim.on_migration_end = migration_ended

    def process() -> simpy.events.ProcessGenerator:
        last_vm = {vm: 0.0 for vm in sim.vms}
        last_link = {h.name: 0.0 for h in sim.spec.infra.hosts}
        n = 0
        while sim.env.now < horizon:
            yield sim.env.timeout(tick)
            now = float(sim.env.now)
            util: dict[str, float] = {}
            for host, link in sim.topo.vswitch.items():
                carried = sim.net.link_bytes(link)
                cap = caps.get(host, 0.0)
                util[host] = (carried - last_link[host]) / tick / cap if cap and cap != float("inf") else 0.0
                last_link[host] = carried
            for vm in sim.vms:
                if vm in sim.destroyed:
                    continue
                moved = sim.net.account_bytes(sim.account[vm])
                delta, last_vm[vm] = moved - last_vm[vm], moved
                host = sim.location[vm]
                rtt = BASE_RTT_S / max(1.0 - util.get(host, 0.0), 0.01)
                monitor.observe(TrafficSample(now, vm, host, delta, rtt_s=rtt))
                log.rates.setdefault(vm, []).append((now, delta / tick))
            n += 1
            if n % 10 == 0:
                log.windows += len([v for v in sim.vms if v not in sim.destroyed])
                for verdict in monitor.evaluate(now):
                    if verdict.vm in sim.destroyed:
                        continue
                    final = carry_out(verdict, rules, responder, audit)
                    log.verdicts.append(final)
                    if final.action is Action.DESTROY:
                        monitor.forget(verdict.vm)

    sim.processes.append(process)
    return log


def new_cluster(root: object, hosts: list[str], revoked: list[str] | None = None) -> Cluster:
    """A real cluster in ``root`` with these hosts joined (and some revoked)."""
    from pathlib import Path

    cluster = Cluster.create(Path(str(root)), name="sim")
    for h in hosts:
        cluster.join(h, macs=())
    for h in revoked or []:
        cluster.revoke(h, "compromised")
    return cluster

