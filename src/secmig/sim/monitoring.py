"""The monitor inside a simulation: samples from the network's byte counters, actions on the simulation.

Every ``rules.step_s`` each VM's byte counters become :class:`~secmig.monitor.TrafficSample` s — its own
traffic, split per destination host in proportion to its flows' rates, and, apart, its migration stream
(``memory=True``, ``live=False`` for a stop-and-copy) — with the RTT it sees, modelled from its vSwitch's
utilisation as an M/M/1 queue (base ÷ (1 − u)), and how long it has been paused for a stop-and-copy. An
:class:`~secmig.monitor.Enforcer` judges the sliding window and carries its verdicts out through
:class:`SimResponder`, whose identity check is the security core's real one and asks of every flow of
the VM "is this flow authorized": a migration stream needs a valid grant for this VM, this source, this
destination and this operation at this instant, to a current member; any other flow must be addressed
to a peer VM (one the VM talks to as a VM) on a member host. Bytes sent to a host itself — member or
not — with no grant are not authorized: cluster membership alone explains nothing. And the VM itself
must be where its signed location binding says. What the scenario intends (its ``kind: exfil``) is
never looked at.

The simulator's flows carry host endpoints only, so a flow to a host where one of the VM's peer VMs runs
is read as traffic to that VM: a leak to such a host is explained by the check (a real vSwitch sees the
destination address and tells them apart). That is the one place the slow-exfiltration floor is not
set by the check.

Clocked by simulated time only: credentials are checked at :attr:`SimSecurity.epoch_s` (the wall-clock
instant that simulated time 0 stands for, fixed when the run's security is set up) plus ``env.now``, so
the same seed gives the same verdicts however fast the host runs. This module must not read the wall
clock during a run, and must not judge traffic itself: that is :mod:`secmig.monitor`'s job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import simpy

from secmig.errors import ConfigError, SecurityError
from secmig.migration.result import MigrationResult
from secmig.monitor.actions import Enforcer
from secmig.monitor.monitor import TrafficMonitor, VMProfile
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import TrafficSample, Verdict
from secmig.security.audit import AuditSink, MemoryAuditSink
from secmig.security.cluster import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.grants import Grant, check_grant
from secmig.security.location import verify_location
from secmig.security.policy import Operation
from secmig.sim.engine import Simulation

BASE_RTT_S = 0.0002


@dataclass
class SimSecurity:
    """The security core's view of a simulated cluster: real keys, grants and bindings."""

    cluster: Cluster
    bindings: dict[str, LocationBinding] = field(default_factory=dict)
    grants: dict[tuple[str, str, str], Grant] = field(default_factory=dict)
    epoch_s: float = field(default_factory=time.time)
    """Wall-clock time (s since 1970) that simulated time 0 stands for; read once, before the run."""
    outside_cluster: Cluster | None = None
    """The hosts outside the cluster, as members of another one (a CA this cluster does not trust)."""
    spent: list[Grant] = field(default_factory=list)
    """Grants whose single-use nonce a recorded session already consumed (replays)."""

    def at(self, now_s: float) -> float:
        """The wall-clock instant of simulated time ``now_s``: what signatures are checked against."""
        return self.epoch_s + now_s

    def check_member(self, host: str, now_s: float = 0.0) -> tuple[bool, str]:
        """Does ``host`` hold a current, unrevoked Vsignature of this cluster at simulated ``now_s``?"""
        try:
            self.cluster.trust().check_member(self.cluster.host_identity(host).vsignature, self.at(now_s))
        except (SecurityError, ConfigError) as err:
            return False, f"{host}: {err}"
        return True, f"{host}'s Vsignature verifies"

    def check_move(self, vm: str, src: str, dst: str, now_s: float = 0.0) -> tuple[bool, str]:
        """Is moving ``vm`` from ``src`` to ``dst`` covered by a grant to a current cluster member?"""
        try:
            grant = self.grants.get((vm, src, dst))
            check_grant(
                grant,
                self.cluster.trust().roots(),
                now=self.at(now_s),
                operation=grant.operation if grant is not None else Operation.MIGRATE,
                vm_id=vm,
                source_host=src,
                destination_host=dst,
                current_binding=self.bindings.get(vm),
            )
        except (SecurityError, ConfigError) as err:
            return False, f"migration {src}→{dst}: {err}"
        ok, why = self.check_member(dst, now_s)
        return ok, f"grant for {vm} {src}→{dst} verifies; {why}" if ok else why

    def moved(self, vm: str, src: str, dst: str) -> None:
        """A granted move completed: the grant's next binding becomes the VM's binding, here and in the
        authority's location register (so the VM's next operation is granted from where it now is)."""
        grant = self.grants.get((vm, src, dst))
        if grant is not None and grant.next_binding is not None:
            self.bindings[vm] = grant.next_binding
            register = self.cluster.location_register()
            try:
                register.place(grant.next_binding)  # the register's commit of the move, as the agents do
            finally:
                register.close()

    def check_location(self, vm: str, mac: str, host: str) -> tuple[bool, str]:
        """Is the VM where its signed location binding says?"""
        verdict = verify_location(
            self.bindings.get(vm), self.cluster.trust().roots(), vm_id=vm, vm_mac=mac, host_id=host
        )
        return verdict.ok, f"location binding: {verdict.reason}"


@dataclass
class MonitorLog:
    """What the monitor saw and did during a run."""

    verdicts: list[Verdict] = field(default_factory=list)
    """Every verdict acted on, as it ended (passed checks included)."""
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Per VM: (t, bytes/s over the last step) — the samples, for plots."""
    window_rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Per VM: (t, bytes/s over the sliding window) — what the rate rule judged."""
    vswitch_rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    vm_seconds: float = 0.0
    """Seconds of VM life the monitor watched (a VM-window is ``window`` of them)."""
    leaked: dict[tuple[str, str], float] = field(default_factory=dict)
    """Bytes of migration streams cut by the monitor, by (VM, destination host): they did cross."""


class SimResponder:
    """Carries out the monitor's verdicts on a running simulation."""

    def __init__(self, sim: Simulation, security: SimSecurity, log: MonitorLog) -> None:
        self.sim = sim
        self.security = security
        self.log = log

    def _flows(self, account: int) -> list[tuple[str, str]]:
        """(source host, destination host) of the account's flows on the wire now."""
        ends = set()
        for flow in self.sim.net.flows_of(account):
            if isinstance(flow.tag, tuple) and len(flow.tag) == 3:
                ends.add((str(flow.tag[1]), str(flow.tag[2])))
        return sorted(ends)

    def _peer_hosts(self, vm: str) -> dict[str, str]:
        """Hosts the VM's peer VMs (those it addresses as VMs) run on now: host → peer VM."""
        peers = {t.dst for t in self.sim.spec.traffic if t.src_vm == vm and t.dst in self.sim.vms}
        # A destroyed peer's address is still a VM's address: traffic to it explains nothing more, and nothing less.
        return {self.sim.location[p]: p for p in sorted(peers)}

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """Is every flow of the VM authorized? From what the VM is doing now, never from what the scenario intends."""
        whys = []
        moving = self.sim.migrating(vm)
        if moving is None:
            ok, why = self.security.check_location(vm, self.sim.vms[vm].mac, self.sim.location[vm])
            if not ok:
                return False, why
            whys.append(why)
        streams = self._flows(self.sim.memory_account[vm])
        if moving is not None and moving not in streams:
            streams.append(moving)  # between two rounds: the migration still needs its grant
        for src, dst in streams:
            ok, why = self.security.check_move(vm, src, dst, now_s)
            if not ok:
                return False, why
            whys.append(why)
        peers = self._peer_hosts(vm)
        for _src, dst in self._flows(self.sim.account[vm]):
            peer = peers.get(dst)
            if peer is None:
                return False, f"flow {vm}→{dst} is not authorized: no grant for it and no peer VM there"
            ok, why = self.security.check_member(dst, now_s)
            if not ok:
                return False, f"traffic to {peer} on a host outside the cluster: {why}"
        whys.append("every other flow goes to a peer VM on a cluster member")
        return True, "; ".join(whys)

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        """Cap the VM's flows in the network (0 cuts them; ``inf`` lifts the cap)."""
        if rate_bytes_per_s == float("inf"):
            self.sim.restore(vm)
        else:
            self.sim.throttle(vm, rate_bytes_per_s)

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        """Cut the VM's migration stream (counting what had crossed) and leave the VM on its source."""
        for flow in self.sim.net.flows_of(self.sim.memory_account[vm]):
            left = self.sim.net.cancel(flow)
            if isinstance(flow.tag, tuple):
                key = (vm, str(flow.tag[2]))
                self.log.leaked[key] = self.log.leaked.get(key, 0.0) + flow.size_bytes - left
        self.sim.abort_migration(vm, reason)

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        """The self-destruct."""
        self.sim.destroy(vm, reason)


def attach_monitor(
    sim: Simulation,
    rules: RuleSet,
    security: SimSecurity,
    audit: AuditSink | None = None,
    until_s: float | None = None,
) -> MonitorLog:
    """Make ``sim`` run a monitor over all its VMs; returns the log it fills as the run goes."""
    log = MonitorLog()
    profiles = {vm.name: VMProfile(vm.transfer_rate_bytes_per_s or 0.0, vm.ram_bytes) for vm in sim.spec.vms}
    caps = {h.name: h.vswitch_bytes_per_s for h in sim.spec.infra.hosts}
    monitor = TrafficMonitor(rules, profiles, {h: c for h, c in caps.items() if 0 < c < float("inf")})
    enforcer = Enforcer(
        monitor, SimResponder(sim, security, log), audit or MemoryAuditSink("monitor"), check_time_s=rules.check_time
    )
    step = rules.step_s
    horizon = until_s or sim.spec.until_s or 600.0

    def migration_ended(result: MigrationResult) -> None:
        if result.outcome == "completed":
            # The destination obtained the VM's new binding with the grant: the verification module
            # now expects the VM on its new host (the paper's "recomputed hash value").
            security.moved(result.vm, result.source, result.destination)

    sim.on_migration_end = migration_ended

    def process() -> simpy.events.ProcessGenerator:
        last_app = dict.fromkeys(sim.vms, 0.0)
        last_mem = dict.fromkeys(sim.vms, 0.0)
        last_link = {h.name: 0.0 for h in sim.spec.infra.hosts}
        k = 0
        while sim.env.now < horizon - 1e-9:
            k += 1
            yield sim.env.timeout(k * step - float(sim.env.now))  # no drift over thousands of steps
            now = float(sim.env.now)
            util: dict[str, float] = {}
            for host, link in sim.topo.vswitch.items():
                carried = sim.net.link_bytes(link)
                rate = (carried - last_link[host]) / step
                last_link[host] = carried
                cap = caps.get(host, 0.0)
                util[host] = rate / cap if 0 < cap < float("inf") else 0.0
                log.vswitch_rates.setdefault(host, []).append((now, rate))
            alive = [vm for vm in sim.vms if vm not in sim.destroyed]
            for vm in alive:
                app = sim.net.account_bytes(sim.account[vm])
                mem = sim.net.account_bytes(sim.memory_account[vm])
                d_app, d_mem = app - last_app.get(vm, 0.0), mem - last_mem.get(vm, 0.0)
                last_app[vm], last_mem[vm] = app, mem
                host = sim.location[vm]
                moving = sim.migrating(vm)
                if moving is not None:  # a migration's bytes leave from its source host's vSwitch
                    host = moving[0]
                rtt = BASE_RTT_S / max(1.0 - util.get(host, 0.0), 0.01)
                paused = now - sim.paused[vm] if vm in sim.paused else 0.0
                live = moving is None or _is_live(sim, vm, moving[1], now)
                shares = _by_destination(sim, sim.account[vm], d_app)
                for i, (dst, nbytes) in enumerate(shares):
                    enforcer.observe(
                        TrafficSample(
                            now,
                            vm,
                            host,
                            nbytes,
                            rtt_s=rtt if i == 0 else None,
                            memory=False,
                            paused_s=paused,
                            dst=dst,
                            live=live,
                        )
                    )
                if d_mem > 0 or paused > 0:
                    stream = f"migration {moving[0]}->{moving[1]}" if moving else "migration"
                    dst = moving[1] if moving else ""
                    enforcer.observe(
                        TrafficSample(
                            now, vm, host, d_mem, flow=stream, memory=True, paused_s=paused, dst=dst, live=live
                        )
                    )
                log.rates.setdefault(vm, []).append((now, (d_app + d_mem) / step))
                log.window_rates.setdefault(vm, []).append((now, monitor.judged_rate(vm, now)))
            log.vm_seconds += step * len(alive)
            log.verdicts.extend(enforcer.tick(now))

    sim.processes.append(process)
    return log


def _is_live(sim: Simulation, vm: str, destination: str, now_s: float) -> bool:
    """Is the VM's current migration to ``destination`` a live one (not a stop-and-copy, paused by design)?"""
    specs = [m for m in sim.spec.migrations if m.vm == vm and m.destination == destination and m.at_s <= now_s]
    return not specs or specs[-1].strategy != "stop-and-copy"


def _by_destination(sim: Simulation, account: int, nbytes: float) -> list[tuple[str, float]]:
    """``nbytes`` of an account split over the destination hosts of its flows, by their current rates."""
    rates: dict[str, float] = {}
    for flow in sim.net.flows_of(account):
        if isinstance(flow.tag, tuple) and len(flow.tag) == 3:
            dst = str(flow.tag[2])
            rates[dst] = rates.get(dst, 0.0) + sim.net.rate_of(flow)
    total = sum(rates.values())
    if nbytes <= 0 or total <= 0:
        return [("", nbytes)]
    return [(dst, nbytes * r / total) for dst, r in sorted(rates.items())]


def new_cluster(root: Path, hosts: list[str], revoked: list[str] | None = None) -> Cluster:
    """A real cluster in ``root`` with these hosts joined (and some revoked)."""
    cluster = Cluster.create(root, name="sim")
    for h in hosts:
        cluster.join(h, macs=())
    for h in revoked or []:
        cluster.revoke(h, "compromised")
    return cluster
