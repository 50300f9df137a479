"""The scenario runner: SimPy processes for migrations and application traffic over a fluid network.

A migration process drives a strategy state machine from :mod:`secmig.migration`: each round is a flow
on the path between the two hosts; when it ends, the VM's dirty-page model says how many pages were
dirtied meanwhile and the strategy decides what comes next. The VM pauses for the stop-and-copy and
resumes on the destination once the last byte has crossed the path's latency. Application traffic is
chunked into flows so that the monitor sees it over time. Every random draw comes from a generator
seeded by the run's seed and the object's index: same seed, same results.

The engine decides nothing about a migration itself (the strategy does) and judges no traffic (a
monitor attaches through :mod:`secmig.sim.monitoring` and acts through :meth:`Simulation.throttle`,
:meth:`Simulation.abort_migration` and :meth:`Simulation.destroy`). The wall clock is read only to
report how long a run took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import simpy

from secmig.errors import ConfigError
from secmig.migration.policy import StopPolicy
from secmig.migration.precopy import (
    AbortMigration,
    AutoConverge,
    Finished,
    MigrationStrategy,
    Phase,
    PostCopyMigration,
    PostCopyPush,
    PreCopyMigration,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
)
from secmig.migration.result import MigrationResult
from secmig.model.analytic import expected_remote_faults
from secmig.model.infra import VM, Infrastructure
from secmig.sim.network import Flow, FluidNetwork, LinkUsage
from secmig.sim.topology import Topology

Strategy = Literal["precopy", "stop-and-copy", "postcopy", "hybrid"]
STRATEGIES: tuple[str, ...] = ("precopy", "stop-and-copy", "postcopy", "hybrid")


@dataclass(frozen=True, slots=True)
class MigrationSpec:
    """Move ``vm`` to host ``destination`` at ``at_s`` (after any earlier migration of it has ended)."""

    vm: str
    destination: str
    at_s: float = 0.0
    strategy: Strategy = "precopy"
    policy: StopPolicy = field(default_factory=lambda: StopPolicy(name="qemu", downtime_limit_s=0.3))
    max_bandwidth_bytes_per_s: float = math.inf
    """QEMU's max-bandwidth: caps the live rounds; lifted for the stop-and-copy and the post-copy push."""
    auto_converge: bool = False
    switchover_bandwidth_bytes_per_s: float | None = None
    postcopy_after_rounds: int = 1
    """Hybrid only: pre-copy rounds before the switch to post-copy."""
    operation: str = "migrate"
    """Table 4.1: ``migrate`` (live, the VM ends on the destination), ``move`` (non-live, likewise),
    ``copy`` (a stored copy on the destination, the VM stays), ``clone`` (a new running VM with a new
    identity on the destination, the VM stays), ``template`` (a stored, non-runnable image; the VM stays)."""
    grant: str = "valid"
    """What the operation presents at the gate: ``valid``, ``none``, ``forged``, ``replayed``, ``stale``."""

    @property
    def relocates(self) -> bool:
        """True when the VM itself ends up on the destination."""
        return self.operation in ("migrate", "move")


@dataclass(frozen=True, slots=True)
class AttackSpec:
    """A scenario's ``attack:`` block: what the lab scores the run on. The gate reads ``outside`` (those
    hosts hold no Vsignature) and the grants; the monitor reads none of it."""

    kind: str = "detection"
    target: str | None = None
    start_s: float = 0.0
    description: str = ""
    outside: tuple[str, ...] = ()
    ungranted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GateDecision:
    """What the gate said of one operation, and what its handshake cost on the wire."""

    accepted: bool
    reason: str
    handshake_bytes: int
    flights: int
    """One-way trips of the handshake (each costs the path's latency)."""


Gate = Callable[[MigrationSpec, str, float], GateDecision]
"""Before any page: (operation, source host, now) → accepted or refused. See :mod:`secmig.sim.gate`."""


@dataclass(frozen=True, slots=True)
class OperationEffect:
    """What one operation left behind."""

    vm: str
    operation: str
    source: str
    destination: str
    completed: bool
    source_kept: bool
    """The VM still runs on its source (copy, clone, template; or any refused or aborted operation)."""
    new_vm: str | None = None
    """A clone's new identity, running on the destination."""
    image: str | None = None
    """``copy`` (a stored, paused copy) or ``template`` (not runnable) on the destination."""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TrafficSpec:
    """Application traffic from a VM to another VM (or a host), at up to a rate, for a while."""

    src_vm: str
    dst: str
    rate_bytes_per_s: float
    start_s: float = 0.0
    duration_s: float = 60.0
    chunk_s: float = 1.0
    kind: str = "app"
    """``app`` for a VM's own traffic; ``exfil`` for memory copied out of it with no grant (attacks)."""


@dataclass(frozen=True, slots=True)
class SimulationSpec:
    """Everything one run needs."""

    name: str
    infra: Infrastructure
    vms: tuple[VM, ...]
    migrations: tuple[MigrationSpec, ...] = ()
    traffic: tuple[TrafficSpec, ...] = ()
    seed: int = 0
    until_s: float | None = None
    usage_bin_s: float = 0.1
    """Link utilisation is reported as the mean load over bins of this length."""
    attack: AttackSpec | None = None
    secure: bool = False
    """Run the gate and the monitor (``secmig simulate`` and the lab read it; the engine does not)."""
    monitor_rules: dict[str, object] | None = None
    """Overrides of the monitor's rules for this scenario (rules.yaml's shape)."""


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One finished flow: what the monitor reads at the vSwitches."""

    kind: str
    """``migration`` (page bytes), ``handshake`` (the gate's bytes, no page), ``app`` or ``exfil``."""
    vm: str
    src_host: str
    dst_host: str
    start_s: float
    end_s: float
    bytes: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything one run produced."""

    name: str
    seed: int
    migrations: tuple[MigrationResult, ...]
    links: tuple[LinkUsage, ...]
    flows: tuple[FlowRecord, ...]
    sim_time_s: float
    wall_time_s: float
    reshares: int


class Simulation:
    """One run of a :class:`SimulationSpec`."""

    def __init__(self, spec: SimulationSpec, *, record_usage: bool = True, record_flows: bool = True) -> None:
        self.spec = spec
        self.env = simpy.Environment()
        self.net = FluidNetwork(self.env, record_usage=record_usage, usage_bin_s=spec.usage_bin_s)
        self.topo = Topology(spec.infra, self.net)
        self.vms = {vm.name: vm for vm in spec.vms}
        if len(self.vms) != len(spec.vms):
            raise ConfigError("two VMs share a name")
        for vm in spec.vms:
            self.topo.datacenter_of(vm.host)
        self.location = {vm.name: vm.host for vm in spec.vms}
        self._locks = {name: simpy.Resource(self.env, capacity=1) for name in self.vms}
        self._seeds = np.random.SeedSequence(spec.seed)
        self.results: list[MigrationResult] = []
        self.flows: list[FlowRecord] = []
        self.record_flows = record_flows
        self._progress: Callable[[int, int], None] | None = None
        # Per-VM byte counters in the network (what a monitor reads), and the hooks a monitor acts through.
        self.account = {name: i for i, name in enumerate(self.vms)}
        # A VM's migration stream has its own counter: the monitor weighs memory moved against the RAM.
        self.memory_account = {name: len(self.vms) + i for i, name in enumerate(self.vms)}
        self.paused: dict[str, float] = {}
        """VMs paused for a stop-and-copy, and since when."""
        self.rate_cap: dict[str, float] = {}
        """Per-VM rate caps set by :meth:`throttle`."""
        self.destroyed: dict[str, str] = {}
        self._migrating: dict[str, tuple[MigrationSpec, str, float, MigrationStrategy, list[Flow]]] = {}
        self.processes: list[Callable[[], simpy.events.ProcessGenerator]] = []
        self.on_migration_end: Callable[[MigrationResult], None] | None = None
        self.gate: Gate | None = None
        """Asked before any page of an operation moves; None: every operation is let through."""
        self.effects: list[OperationEffect] = []
        self.images: dict[str, tuple[str, str]] = {}
        """Stored images (copies, templates) by name: (host, kind). Not running, not runnable (templates)."""
        self._own_cap: dict[int, float] = {}
        """Each live flow's own rate cap (a traffic spec's rate), by id: what a lifted throttle restores."""

    def _vm(self, name: str, where: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise ConfigError(f"{where}: unknown vm {name!r}") from None

    def run(self, progress: Callable[[int, int], None] | None = None) -> RunResult:
        """Run to the end (or ``until_s``); ``progress(done, total)`` is called as migrations end."""
        self._progress = progress
        t0 = time.perf_counter()
        rngs = self._seeds.spawn(len(self.spec.migrations) + len(self.spec.traffic))
        for i, m in enumerate(self.spec.migrations):
            self._vm(m.vm, f"migrations[{i}]")
            self.topo.datacenter_of(m.destination)
            self.env.process(self._migrate(m, np.random.default_rng(rngs[i])))
        for j, t in enumerate(self.spec.traffic):
            self._vm(t.src_vm, f"traffic[{j}]")
            self.env.process(self._traffic(t))
        for make in self.processes:
            self.env.process(make())
        self.env.run(until=self.spec.until_s)
        self.results.sort(key=lambda r: (r.start_s, r.vm))
        return RunResult(
            name=self.spec.name,
            seed=self.spec.seed,
            migrations=tuple(self.results),
            links=tuple(self.net.usage()),
            flows=tuple(self.flows),
            sim_time_s=float(self.env.now),
            wall_time_s=time.perf_counter() - t0,
            reshares=self.net.reshares,
        )

    def _record_flow(self, kind: str, vm: str, src: str, dst: str, start: float, nbytes: float) -> None:
        if self.record_flows:
            self.flows.append(FlowRecord(kind, vm, src, dst, start, float(self.env.now), nbytes))

    def _strategy(self, spec: MigrationSpec, vm: VM, bandwidth: float) -> MigrationStrategy:
        if spec.strategy == "stop-and-copy":
            return StopAndCopyMigration(vm.ram_bytes, vm.used_bytes, vm.device_state_bytes)
        if spec.strategy == "postcopy":
            return PostCopyMigration(vm.ram_bytes, vm.used_bytes, vm.device_state_bytes)
        ws = getattr(vm.dirty, "working_set_pages", 0) or vm.pages
        return PreCopyMigration(
            vm.ram_bytes,
            vm.used_bytes,
            vm.device_state_bytes,
            policy=spec.policy.for_vm(vm.ram_bytes),
            auto_converge=AutoConverge() if spec.auto_converge else None,
            bandwidth_hint_bytes_per_s=min(bandwidth, spec.max_bandwidth_bytes_per_s),
            switchover_bandwidth_bytes_per_s=spec.switchover_bandwidth_bytes_per_s,
            postcopy_after_rounds=spec.postcopy_after_rounds if spec.strategy == "hybrid" else None,
            working_set_pages=int(ws),
        )

    def _migrate(self, spec: MigrationSpec, rng: np.random.Generator) -> simpy.events.ProcessGenerator:
        env = self.env
        yield env.timeout(spec.at_s)
        vm = self.vms[spec.vm]
        with self._locks[vm.name].request() as turn:
            yield turn
            src = self.location[vm.name]
            start = float(env.now)
            if src == spec.destination:
                strategy = self._strategy(spec, vm, math.inf)
                self._finish(spec, src, start, 0.0, AbortMigration(f"{vm.name} is already on {src}"), strategy)
                return
            path, latency = self.topo.path(src, spec.destination)
            strategy = self._strategy(spec, vm, self.net.path_bandwidth(path))
            dst = spec.destination
            if self.gate is not None:
                # The handshake comes first: its bytes cross the path, each of its flights costs the
                # latency, and a refusal ends the operation before any page moves.
                decision = self.gate(spec, src, start)
                t0 = float(env.now)
                hs = self.net.transfer(path, decision.handshake_bytes, account=self.account[vm.name], tag=None)
                yield hs.done
                yield env.timeout(decision.flights * latency)
                self._record_flow("handshake", vm.name, src, dst, t0, decision.handshake_bytes)
                if not decision.accepted:
                    refused = AbortMigration(f"refused at the gate: {decision.reason}")
                    self._finish(spec, src, start, 0.0, refused, strategy)
                    return
            acct = self.memory_account[vm.name]
            tag = ("migration", src, spec.destination)
            current: list[Flow] = []
            self._migrating[vm.name] = (spec, src, start, strategy, current)
            paused_at: float | None = None
            downtime = 0.0
            action = strategy.start(start)
            while True:
                t0 = float(env.now)
                if vm.name in self.destroyed:
                    return
                if isinstance(action, SendRound):
                    current[:] = [
                        self.net.transfer(
                            path,
                            action.bytes,
                            cap_bytes_per_s=min(spec.max_bandwidth_bytes_per_s, self._cap_for_new_flow(vm.name)),
                            account=acct,
                            tag=tag,
                        )
                    ]
                    self._own_cap[id(current[0])] = spec.max_bandwidth_bytes_per_s
                    yield current[0].done
                    self._own_cap.pop(id(current[0]), None)
                    self._record_flow("migration", vm.name, src, dst, t0, action.bytes)
                    # A throttled guest runs (1 − throttle) of the time, so it dirties as in a shorter period.
                    dirty = vm.dirty.dirty_pages((env.now - t0) * (1.0 - strategy.throttle))
                    if vm.dirty_noise > 0:
                        s = vm.dirty_noise
                        dirty *= rng.lognormal(-s * s / 2, s)
                    action = strategy.round_done(float(env.now), round(min(dirty, vm.pages)))
                elif isinstance(action, StopAndCopyRound):
                    # The VM is paused; QEMU lifts the rate limit for the switchover.
                    paused_at = t0
                    self.paused[vm.name] = t0
                    cap = 0.0 if self.rate_cap.get(vm.name) == 0.0 else math.inf  # a cut holds the switchover too
                    current[:] = [self.net.transfer(path, action.bytes, cap_bytes_per_s=cap, account=acct, tag=tag)]
                    yield current[0].done
                    self._record_flow("migration", vm.name, src, dst, t0, action.bytes)
                    yield env.timeout(latency)
                    downtime = float(env.now) - paused_at
                    self.paused.pop(vm.name, None)
                    action = strategy.stop_and_copy_done(float(env.now))
                elif isinstance(action, PostCopyPush):
                    # The VM runs on the destination; it faults on pages still on the source.
                    if spec.relocates:
                        self.location[vm.name] = dst
                    current[:] = [self.net.transfer(path, action.bytes, account=acct, tag=tag)]
                    yield current[0].done
                    self._record_flow("migration", vm.name, src, dst, t0, action.bytes)
                    push_s = float(env.now) - t0
                    faults = expected_remote_faults(vm.dirty.dirty_pages, push_s, action.remote_fraction)
                    action = strategy.push_done(float(env.now), faults)
                else:
                    if isinstance(action, Finished) and spec.relocates:
                        self.location[vm.name] = dst
                    if strategy.throttle > 0:
                        strategy.extra["throttle"] = strategy.throttle
                    self._finish(spec, src, start, downtime, action, strategy)
                    return

    def _finish(
        self,
        spec: MigrationSpec,
        src: str,
        start: float,
        downtime: float,
        action: Finished | AbortMigration,
        strategy: MigrationStrategy,
    ) -> None:
        done = isinstance(action, Finished)
        self._migrating.pop(spec.vm, None)
        self.results.append(
            MigrationResult(
                vm=spec.vm,
                source=src,
                destination=spec.destination,
                strategy=spec.strategy,
                policy=spec.policy.name if spec.strategy in ("precopy", "hybrid") else "none",
                start_s=start,
                end_s=float(self.env.now),
                downtime_s=downtime if done else 0.0,
                converged=action.converged if isinstance(action, Finished) else False,
                stop_reason=action.reason,
                outcome="completed" if done else "aborted",
                rounds=tuple(strategy.rounds),
                extra=dict(strategy.extra),
            )
        )
        self._effect(spec, src, done, action.reason)
        if self._progress is not None:
            self._progress(len(self.results), len(self.spec.migrations))
        if self.on_migration_end is not None:
            self.on_migration_end(self.results[-1])

    def _effect(self, spec: MigrationSpec, src: str, done: bool, reason: str) -> None:
        """What the operation leaves: the agents' semantics (``agent/daemon.py``: ``install_vm``)."""
        op, dst = spec.operation, spec.destination
        new_vm = image = None
        if done and op == "clone":
            new_vm = self._clone(spec.vm, dst)
        elif done and op in ("copy", "template"):
            image = f"{spec.vm}-{op}@{dst}"
            self.images[image] = (dst, op)
        kept = not (done and spec.relocates)
        self.effects.append(OperationEffect(spec.vm, op, src, dst, done, kept, new_vm, image, reason))

    def _clone(self, vm: str, host: str) -> str:
        """A clone: a new VM with its own identity (name, MAC) running on ``host``; the original stays."""
        n = 1 + sum(1 for name in self.vms if name.startswith(f"{vm}-clone"))
        name = f"{vm}-clone{n}"
        orig = self.vms[vm]
        mac = f"52:54:01:{(len(self.vms) >> 8) & 0xFF:02x}:{len(self.vms) & 0xFF:02x}:{n & 0xFF:02x}"
        self.vms[name] = replace(orig, name=name, host=host, mac=mac)
        self.location[name] = host
        self._locks[name] = simpy.Resource(self.env, capacity=1)
        used = set(self.account.values()) | set(self.memory_account.values())
        self.account[name] = max(used) + 1
        self.memory_account[name] = max(used) + 2
        return name

    def migrating(self, vm: str) -> tuple[str, str] | None:
        """(source, destination) of the VM's migration in progress, if any."""
        m = self._migrating.get(vm)
        return (m[1], m[0].destination) if m else None

    def abort_migration(self, vm: str, reason: str) -> bool:
        """Stop a VM's migration now: its flow is cancelled, the VM stays on its source."""
        m = self._migrating.get(vm)
        if m is None:
            return False
        spec, src, start, strategy, current = m
        for flow in current:
            self.net.cancel(flow)
        if strategy.phase is Phase.POSTCOPY:
            return False  # the VM already runs on the destination; nothing to give back
        self.location[vm] = src
        self.paused.pop(vm, None)  # it resumes on its source
        self._finish(spec, src, start, 0.0, AbortMigration(f"aborted by the monitor: {reason}"), strategy)
        return True

    def destroy(self, vm: str, reason: str) -> None:
        """The self-destruct: the VM stops, its flows end, its memory is gone."""
        self.abort_migration(vm, reason)
        self.destroyed[vm] = reason
        for flow in self.net.flows_of(self.account[vm]):
            left = self.net.cancel(flow)
            if isinstance(flow.tag, tuple):  # an application or exfiltration chunk: keep what it moved
                kind, src, dst = flow.tag
                self._record_flow(kind, vm, src, dst, flow.start_s, flow.size_bytes - left)
            # Wake the traffic process waiting on it; it sees a flow that never ended and stops.
            flow.done.succeed(flow)

    def restore(self, vm: str) -> None:
        """Lift a throttle or a cut: every flow of the VM back to its own cap."""
        self.rate_cap.pop(vm, None)
        for account in (self.account[vm], self.memory_account[vm]):
            for flow in self.net.flows_of(account):
                self.net.set_cap(flow, self._own_cap.get(id(flow), math.inf))

    def throttle(self, vm: str, cap_bytes_per_s: float) -> None:
        """Cap each of the VM's flows, those on the wire now and those to come, at ``cap_bytes_per_s``
        (never above a flow's own cap); 0 cuts them at once: nothing more crosses until :meth:`restore`."""
        self.rate_cap[vm] = cap_bytes_per_s
        flows = self.net.flows_of(self.account[vm]) + self.net.flows_of(self.memory_account[vm])
        for flow in flows:  # the VM's cap is shared among its flows, not granted to each
            self.net.set_cap(flow, min(cap_bytes_per_s / len(flows), self._own_cap.get(id(flow), math.inf)))

    def _cap_for_new_flow(self, vm: str) -> float:
        """A new flow's share of the VM's cap (its flows on the wire now, and this one)."""
        cap = self.rate_cap.get(vm, math.inf)
        if not math.isfinite(cap):
            return cap
        return cap / (1 + len(self.net.flows_of(self.account[vm])) + len(self.net.flows_of(self.memory_account[vm])))

    def _traffic(self, spec: TrafficSpec) -> simpy.events.ProcessGenerator:
        env = self.env
        yield env.timeout(spec.start_s)
        end = spec.start_s + spec.duration_s
        while env.now < end - 1e-12 and spec.src_vm not in self.destroyed:
            src = self.location[spec.src_vm]
            dst = self.location.get(spec.dst, spec.dst)
            path, _ = self.topo.path(src, dst)
            chunk = min(spec.chunk_s, end - env.now) * spec.rate_bytes_per_s
            t0 = float(env.now)
            flow = self.net.transfer(
                path,
                chunk,
                cap_bytes_per_s=min(spec.rate_bytes_per_s, self._cap_for_new_flow(spec.src_vm)),
                account=self.account[spec.src_vm],
                tag=(spec.kind, src, dst),
            )
            self._own_cap[id(flow)] = spec.rate_bytes_per_s
            yield flow.done
            self._own_cap.pop(id(flow), None)
            if flow.end_s is None:
                return
            self._record_flow(spec.kind, spec.src_vm, src, dst, t0, chunk)


def run(spec: SimulationSpec, progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Run one simulation."""
    return Simulation(spec).run(progress)
