"""The consolidation day: a datacenter that migrates by itself, over a day of PlanetLab CPU traces.

Beloglazov & Buyya's PlanetLab experiment, the one CloudSim ships: 800 hosts (HP ProLiant ML110 G4 and G5
alternately, 2 PEs of 1,860 / 2,660 MIPS, 4 GiB, 1 Gbit/s), one single-PE VM per trace file (types of
2,500 / 2,000 / 1,000 / 500 MIPS and 870 / 1,740 / 1,740 / 613 MB in blocks of ⌈n/4⌉, in sorted file-name
order), each running one cloudlet of 2,500 × 86,400 MI whose CPU demand follows its trace.

The clock lives here, the decisions in :mod:`secmig.cloud`. As CloudSim's ``PowerDatacenter``: the hosts
are updated (CPU shared, energy integrated, state recorded) at every scheduling instant — 0.1 s after
each 300 s boundary, CloudSim's cloudlet-submission offset — and whenever a migration ends; after each
scheduling update the consolidation round (:func:`secmig.cloud.planner.plan`) issues migrations.

How long a migration takes is the ``migration_model``:

- ``cloudsim`` — CloudSim's rule: RAM ÷ half the host's bandwidth, no downtime, no bytes on any link.
- ``network`` — secmig's simulator: each round's migrations run together over the shared fluid network
  (:mod:`secmig.sim.engine`), pre-copy rounds and a stop-and-copy, capped at half the NIC (CloudSim's
  share for migrations, QEMU's max-bandwidth). The guest's dirty rate follows its CPU: ``utilisation ×
  dirty_pages_per_s_at_full_cpu`` page writes per second spread uniformly over its RAM, so a busy VM is
  costlier to move. The traffic monitor watches every migrating VM at its vSwitch.

In both, a migrating VM keeps 90 % of its CPU at its source and costs its destination 10 % (CloudSim),
and, with ``retire_idle_vms`` (the default, CloudSim's behaviour), a VM that asks 0 MIPS at an update has
finished and leaves the datacenter — on 2011-03-03, 532 of the 1,052 VMs do.

Security: every host gets a Vsignature from the cluster authority and only hosts whose Vsignature
verifies are destinations (a revoked host never is); the consolidation manager is an operator of the
cluster's ``policy.yaml`` allowed to grant ``migrate``; each migration carries its grant (with the VM's
next location binding) and the destination checks it — nonce included — before any page moves.
"""

from __future__ import annotations

import enum
import heapq
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from secmig.cloud.capacity import HostSpec, VmSpec
from secmig.cloud.fleet import Allocation, Fleet, share_cpu
from secmig.cloud.metrics import ConsolidationMetrics, StateLog, summarize
from secmig.cloud.overload import HISTORY_LENGTH, OverloadPolicy, parse_overload
from secmig.cloud.planner import ConsolidationPolicy, PlannedMigration, Snapshot, initial_placement, plan
from secmig.cloud.power import HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5, clamp_utilisation, interval_energy_j
from secmig.cloud.selection import SelectionKind
from secmig.cloud.utilisation import PLANETLAB_INTERVAL_S, TraceSet, parse_planetlab
from secmig.errors import ConfigError, SecurityError
from secmig.migration.policy import StopPolicy
from secmig.model.dirty import Uniform
from secmig.model.infra import VM, Datacenter, Host, Infrastructure
from secmig.monitor.rules import RuleSet, load_rules
from secmig.monitor.samples import Action, Verdict
from secmig.security.audit import Decision, MemoryAuditSink
from secmig.security.cluster import Cluster, ClusterTrust
from secmig.security.credentials import LocationBinding, Vsignature
from secmig.security.grants import CLOCK_SKEW_S, Grant, check_grant, new_nonce
from secmig.security.keys import generate_key, raw_public_key
from secmig.security.policy import Operation
from secmig.sim.engine import MigrationSpec, Simulation, SimulationSpec
from secmig.sim.monitoring import SimSecurity, attach_monitor

FloatArray = npt.NDArray[np.float64]

MB = 2**20
HOST_MIPS = (1860.0, 2660.0)
HOST_POWER = (HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5)
HOST_NAMES = ("ml110-g4", "ml110-g5")
VM_MIPS = (2500.0, 2000.0, 1000.0, 500.0)
VM_RAM_MB = (870, 1740, 1740, 613)
VM_TYPE_NAMES = ("high-cpu-medium", "extra-large", "small", "micro")
HOST_RAM_MB = 4096
HOST_BANDWIDTH_BITS_PER_S = 1e9
CLOUDLET_MIPS = 2500.0
SUBMISSION_OFFSET_S = 0.1
"""CloudSim's VM-creation acknowledgement delay: cloudlets start, and the 300 s clock ticks, at 0.1 s."""
MANAGER = "consolidation-manager"


class MigrationModel(enum.StrEnum):
    CLOUDSIM = "cloudsim"
    NETWORK = "network"


def parse_migration_model(value: str) -> MigrationModel:
    try:
        return MigrationModel(value.strip().lower())
    except ValueError:
        raise ConfigError(f"--migration-model {value!r}: one of cloudsim, network") from None


@dataclass(frozen=True, slots=True)
class NetworkModel:
    """How ``migration_model: network`` moves memory."""

    migration_share: float = 0.5
    """Fraction of the NIC a migration may use (CloudSim assumes half; the rest is the VMs' own traffic)."""
    dirty_pages_per_s_at_full_cpu: float = 5000.0
    """Page writes per second of a VM at 100 % CPU; proportional to its utilisation (4 KiB pages)."""
    downtime_limit_s: float = 0.3
    """QEMU's downtime-limit for the switch to stop-and-copy."""
    monitor_step_s: float = 1.0
    """How often the monitor's window slides during the day (the paper's 0.1 s costs 10× more)."""


@dataclass(frozen=True, slots=True)
class DayConfig:
    """One consolidation day."""

    workload_dir: Path
    overload: OverloadPolicy = field(default_factory=lambda: parse_overload("thr:0.8"))
    selection: SelectionKind = SelectionKind.MMT
    migration_model: MigrationModel = MigrationModel.CLOUDSIM
    hosts: int = 800
    interval_s: float = PLANETLAB_INTERVAL_S
    duration_s: float | None = None
    """Defaults to the traces' length (24 h for PlanetLab)."""
    seed: int = 0
    secure: bool = True
    revoked: tuple[int, ...] = ()
    """Hosts whose Vsignature is revoked before the day starts (they may run VMs, never receive one)."""
    network: NetworkModel = field(default_factory=NetworkModel)
    rules: RuleSet | None = None
    retire_idle_vms: bool = True
    """CloudSim's rule: a VM asking 0 MIPS at an update (and not migrating) has finished and leaves the
    datacenter for good (``PowerDatacenter`` removes ``host.getCompletedVms()``). On 2011-03-03 that is
    532 of the 1,052 VMs, 400 of them in the first two hours; False keeps every VM all day."""


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    vm: str
    source: str
    destination: str
    reason: str
    start_s: float
    end_s: float
    downtime_s: float
    bytes_moved: float
    outcome: str


@dataclass(frozen=True, slots=True)
class IntervalRecord:
    """One scheduling instant: the energy since the previous one, active hosts, migrations issued."""

    t_s: float
    energy_kwh: float
    active_hosts: int
    migrations: int
    cloudlet_capacity_mips: float = math.nan
    """The paper's Σ C(i) / Nvm averaged over this instant's active hosts (NaN: no host was active)."""


@dataclass(frozen=True, slots=True)
class MonitorSummary:
    verdicts: int
    challenges_passed: int
    alarms: int
    """Verdicts that ended in throttle, abort or destroy."""
    destroyed: int
    vm_hours_watched: float
    false_alarms_per_vm_hour: float
    """Alarms on honest (granted) consolidation migrations per VM-hour the monitor watched."""


@dataclass(frozen=True, slots=True)
class DayResult:
    config: DayConfig
    metrics: ConsolidationMetrics
    intervals: tuple[IntervalRecord, ...]
    migrations: tuple[MigrationRecord, ...]
    monitor: MonitorSummary | None
    grants_issued: int
    grants_refused: int
    eligible_hosts: int
    mean_cloudlet_capacity_mips: float
    """The paper's Σ C(i) / Nvm, averaged over the active hosts of every interval."""
    wall_time_s: float
    vms_retired: int = 0
    """VMs that left the datacenter under CloudSim's completion rule (``retire_idle_vms``)."""
    verdicts: tuple[Verdict, ...] = ()
    """Every verdict the monitor acted on during the day (network model), passed checks included."""
    vms: int = 0
    """VMs in the workload (one a trace file)."""

    def summary(self) -> dict[str, float | int | str | None]:
        """The run's figures as plain numbers (fractions, not percent), for ``--json`` and storage."""
        m = self.metrics
        done = [r for r in self.migrations if r.outcome == "completed"]
        return {
            "overload": self.config.overload.spec,
            "selection": self.config.selection.value,
            "migration_model": self.config.migration_model.value,
            "hosts": self.config.hosts,
            "energy_kwh": m.energy_kwh,
            "migrations": m.migrations,
            "slatah": m.slatah,
            "pdm": m.pdm,
            "slav": m.slav,
            "esv": m.esv,
            "overall_sla_violation": m.overall_sla_violation,
            "average_sla_violation": m.average_sla_violation,
            "shutdowns": m.shutdowns,
            "mean_time_before_shutdown_s": m.mean_time_before_shutdown_s,
            "mean_time_before_migration_s": m.mean_time_before_migration_s,
            "mean_migration_time_s": float(np.mean([r.end_s - r.start_s for r in done])) if done else None,
            "total_downtime_s": float(sum(r.downtime_s for r in done)),
            "bytes_moved": float(sum(r.bytes_moved for r in self.migrations)),
            "aborted_migrations": sum(1 for r in self.migrations if r.outcome != "completed"),
            "grants_issued": self.grants_issued,
            "grants_refused": self.grants_refused,
            "eligible_hosts": self.eligible_hosts,
            "vms_retired": self.vms_retired,
            "monitor_alarms": self.monitor.alarms if self.monitor else None,
            "monitor_destroyed": self.monitor.destroyed if self.monitor else None,
            "false_alarms_per_vm_hour": self.monitor.false_alarms_per_vm_hour if self.monitor else None,
            "mean_cloudlet_capacity_mips": self.mean_cloudlet_capacity_mips,
            "wall_time_s": self.wall_time_s,
        }


# --- the workload and the fleet --------------------------------------------------------------------------


def load_workload(directory: Path, interval_s: float = PLANETLAB_INTERVAL_S) -> TraceSet:
    """Every file of a PlanetLab day directory, in sorted name order (one VM each)."""
    if not directory.exists():
        raise ConfigError(f"{directory}: no such workload directory")
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{directory}: no trace files")
    rows = []
    for p in files:
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot be read as a trace ({err})") from None
        rows.append(parse_planetlab(text, str(p)))
    return TraceSet.from_samples(tuple(p.name for p in files), np.stack(rows), interval_s)


def planetlab_fleet(n_vms: int, n_hosts: int = 800) -> Fleet:
    """CloudSim's PlanetLab hosts (G4, G5 alternately) and VMs (four types in blocks of ⌈n/4⌉)."""
    if n_hosts <= 0:
        raise ConfigError("--hosts must be positive")
    hosts = tuple(
        HostSpec(f"host-{i}", 2, HOST_MIPS[i % 2], HOST_RAM_MB, HOST_BANDWIDTH_BITS_PER_S, HOST_POWER[i % 2])
        for i in range(n_hosts)
    )
    block = math.ceil(n_vms / 4)
    vms = tuple(VmSpec(f"vm-{i}", 1, VM_MIPS[i // block], VM_RAM_MB[i // block]) for i in range(n_vms))
    return Fleet(hosts, vms)


# --- security: Vsignatures, the manager's grants ----------------------------------------------------------


class ExpiringNonceStore:
    """Consumed grant nonces until their grants expire; forgetting costs O(log n) per nonce, not O(n)."""

    def __init__(self) -> None:
        self._used: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []

    def consume(self, nonce: bytes, expires_at: int, now: float) -> bool:
        while self._expiry and self._expiry[0][0] + CLOCK_SKEW_S < now:
            self._used.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._used:
            return False
        self._used.add(nonce)
        heapq.heappush(self._expiry, (expires_at, nonce))
        return True


class ConsolidationSecurity(SimSecurity):
    """The cluster as the consolidation manager and the monitor see it: in-memory host identities.

    Every host's Vsignature is minted by the real cluster authority (same key, same checks as
    ``secmig cluster join``), kept in memory rather than in 800 folders; grants and bindings are signed
    with the manager's operator key from ``policy.yaml``.
    """

    def __init__(self, root: Path, host_names: list[str], revoked: list[str], vm_names: list[str]) -> None:
        cluster = Cluster.create(root, name="consolidation")
        super().__init__(cluster)
        cluster.add_operator(MANAGER, [Operation.MIGRATE])
        self.audit = MemoryAuditSink(MANAGER)
        authority = cluster.authority_key()
        now = int(self.epoch_s)
        self.vsignatures: dict[str, Vsignature] = {}
        for i, h in enumerate(host_names):
            key = generate_key()
            self.vsignatures[h] = Vsignature(
                cluster.cluster_id, h, raw_public_key(key), (), 2 * i + 1, now, now + 30 * 86400
            ).signed_by(authority)
        for h in revoked:
            cluster.join(h)  # a revocation names a joined member
            cluster.revoke(h, "compromised")
        self._trust: ClusterTrust = cluster.trust()
        self._key = cluster.issuer_key(MANAGER)
        self.nonces = ExpiringNonceStore()
        self.vm_names = vm_names
        self._verified: dict[str, int] = {}
        self.day_epoch_s = self.epoch_s

    def check_member(self, host: str, now_s: float = 0.0) -> tuple[bool, str]:
        """Does ``host`` hold a current, unrevoked Vsignature? (Verified once; expiry re-checked each time.)

        The revocation list is read when the day starts and holds for the day, so a Vsignature that
        verified once keeps verifying until it expires: the signature check is not repeated.
        """
        cred = self.vsignatures.get(host)
        if cred is None:
            return False, f"{host}: no Vsignature"
        now = self.at(now_s)
        expires = self._verified.get(host)
        if expires is None:
            try:
                self._trust.check_member(cred, now)
            except (SecurityError, ConfigError) as err:
                return False, f"{host}: {err}"
            expires = cred.expires_at
            self._verified[host] = expires
        if now >= expires:
            return False, f"{host}: Vsignature expired"
        return True, f"{host}'s Vsignature verifies"

    def start_round(self, day_t_s: float) -> None:
        """Simulated time 0 of the next round's simulator is ``day_t_s`` into the day."""
        self.epoch_s = self.day_epoch_s + day_t_s

    def bind(self, vm: str, host: str) -> None:
        self.bindings[vm] = LocationBinding(
            self.cluster.cluster_id, vm, "52:54:00:00:00:01", host, 0, int(self.day_epoch_s), MANAGER
        ).signed_by(self._key)

    def grant(self, vm: str, src: str, dst: str, current: LocationBinding | None, day_t_s: float) -> Grant:
        """The manager's signed grant for one migration, with the VM's next binding."""
        now = int(self.day_epoch_s + day_t_s)
        cur = current if current is not None else self.bindings[vm]
        nb = LocationBinding(self.cluster.cluster_id, vm, cur.vm_mac, dst, cur.epoch + 1, now, MANAGER).signed_by(
            self._key
        )
        g = Grant(
            self.cluster.cluster_id, Operation.MIGRATE, vm, src, dst, new_nonce(), now, now + 600, MANAGER, nb
        ).signed_by(self._key)
        self.grants[(vm, src, dst)] = g
        self.audit.record("grant.issued", Decision.ALLOW, vm, {"source": src, "destination": dst, "t_s": day_t_s})
        return g

    def admit(self, g: Grant, current: LocationBinding | None, day_t_s: float) -> tuple[bool, str]:
        """The destination's check before a page moves: grant, Vsignature, then the single-use nonce."""
        now = self.day_epoch_s + day_t_s
        try:
            check_grant(
                g,
                self._trust.roots(),
                now=now,
                operation=Operation.MIGRATE,
                vm_id=g.vm_id,
                source_host=g.source_host,
                destination_host=g.destination_host,
                current_binding=current,
            )
        except (SecurityError, ConfigError) as err:
            return False, str(err)
        ok, why = self.check_member(g.destination_host, day_t_s - (self.epoch_s - self.day_epoch_s))
        if not ok:
            return False, why
        if not self.nonces.consume(g.nonce, g.expires_at, now):
            return False, "grant nonce already used"
        return True, "granted"


# --- the day ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Day:
    cfg: DayConfig
    traces: TraceSet
    fleet: Fleet
    alloc: Allocation
    policy: ConsolidationPolicy
    security: ConsolidationSecurity | None
    rules: RuleSet
    rng: np.random.Generator
    log: StateLog = field(default_factory=StateLog)
    used: FloatArray = field(init=False)
    incoming: FloatArray = field(init=False)
    history: FloatArray = field(init=False)
    placed: npt.NDArray[np.bool_] = field(init=False)
    energy_j: float = 0.0
    interval_energy_j: float = 0.0
    last_t: float = 0.0
    migrations: int = 0
    records: list[MigrationRecord] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    vm_seconds_watched: float = 0.0
    grants_issued: int = 0
    grants_refused: int = 0
    history_length: int = 0
    retired: int = 0
    capacity_sum: float = 0.0
    capacity_n: int = 0
    intervals: list[IntervalRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.used = np.zeros(self.fleet.n_hosts)
        self.incoming = np.zeros(self.fleet.n_hosts)
        self.history = np.zeros((self.fleet.n_vms, HISTORY_LENGTH))
        self.placed = self.alloc.host_of >= 0

    def requested(self, t: float) -> FloatArray:
        out: FloatArray = np.where(self.placed, self.traces.at(t) * self.fleet.vm_mips, 0.0)
        return out

    def update(self, t: float) -> FloatArray:
        """CloudSim's host update at ``t``: share the CPU, integrate the energy since the last, record."""
        f = self.fleet
        req = self.requested(t)
        share = share_cpu(f, self.alloc, req)
        dt = t - self.last_t
        if dt > 0:
            u0 = clamp_utilisation(self.used / f.total_mips)
            u1 = clamp_utilisation(share.host_used_mips / f.total_mips)
            e = interval_energy_j(f.power_w(np.minimum(u0, 1.0)), f.power_w(np.minimum(u1, 1.0)), u0, dt)
            self.energy_j += float(e.sum())
            self.interval_energy_j += float(e.sum())
        self.used = share.host_used_mips
        self.incoming = share.host_incoming_mips
        self.log.record(
            t,
            share.host_used_mips,
            share.host_requested_mips,
            share.vm_allocated_mips,
            req,
            share.vm_migrating_out,
            self.placed,
        )
        self.last_t = t
        if self.cfg.retire_idle_vms:
            done = np.flatnonzero(self.placed & (req == 0))
            for v in done:
                if not self.alloc.targets[v]:
                    self.alloc.remove(int(v))
                    self.placed[v] = False
                    self.retired += 1
        return req

    def eligible(self) -> npt.NDArray[np.bool_]:
        if self.security is None:
            return np.ones(self.fleet.n_hosts, dtype=bool)
        self.security.start_round(self.last_t)
        return np.array([self.security.check_member(h.name)[0] for h in self.fleet.hosts])


def run_day(cfg: DayConfig, progress: Callable[[float, float], None] | None = None) -> DayResult:
    """Run the consolidation day described by ``cfg``; ``progress(t, end)`` is called every interval."""
    t_wall = time.perf_counter()
    traces = load_workload(cfg.workload_dir, cfg.interval_s)
    fleet = planetlab_fleet(len(traces.names), cfg.hosts)
    policy = ConsolidationPolicy(cfg.overload, cfg.selection, cfg.interval_s)
    for h in cfg.revoked:
        if not 0 <= h < fleet.n_hosts:
            raise ConfigError(f"--revoke {h}: no such host (0–{fleet.n_hosts - 1})")
    end = cfg.duration_s if cfg.duration_s is not None else traces.duration_s
    if not 0 < end <= traces.duration_s:
        raise ConfigError(f"--duration {end:g} s: must be within (0, {traces.duration_s:g}] for these traces")
    alloc = initial_placement(fleet, policy)
    rules = cfg.rules or load_rules()
    with tempfile.TemporaryDirectory(prefix="secmig-consolidation-") as tmp:
        security = None
        if cfg.secure:
            security = ConsolidationSecurity(
                Path(tmp) / "cluster",
                [h.name for h in fleet.hosts],
                [fleet.hosts[h].name for h in cfg.revoked],
                [v.name for v in fleet.vms],
            )
            for v in np.flatnonzero(alloc.host_of >= 0):
                security.bind(fleet.vms[v].name, fleet.hosts[int(alloc.host_of[v])].name)
        day = _Day(cfg, traces, fleet, alloc, policy, security, rules, np.random.default_rng(cfg.seed))
        _run(day, end, progress)
    m = summarize(day.log, day.energy_j, day.migrations)
    monitor = None
    if cfg.migration_model is MigrationModel.NETWORK:
        alarms = [v for v in day.verdicts if v.action not in (Action.CONTINUE, Action.CHALLENGE)]
        hours = day.vm_seconds_watched / 3600
        monitor = MonitorSummary(
            verdicts=len(day.verdicts),
            challenges_passed=sum(1 for v in day.verdicts if v.evidence.get("challenge") == "passed"),
            alarms=len(alarms),
            destroyed=sum(1 for v in day.verdicts if v.action is Action.DESTROY),
            vm_hours_watched=hours,
            false_alarms_per_vm_hour=len(alarms) / hours if hours > 0 else 0.0,
        )
    capacity = day.capacity_sum / day.capacity_n if day.capacity_n else 0.0
    return DayResult(
        cfg,
        m,
        tuple(day.intervals),
        tuple(day.records),
        monitor,
        day.grants_issued,
        day.grants_refused,
        int(day.eligible().sum()),
        capacity,
        time.perf_counter() - t_wall,
        day.retired,
        tuple(day.verdicts),
        fleet.n_vms,
    )


def _run(day: _Day, end: float, progress: Callable[[float, float], None] | None) -> None:
    cfg, fleet, alloc = day.cfg, day.fleet, day.alloc
    completions: list[tuple[float, int, int, int, int]] = []  # (t, seq, vm, target, aborted)
    seq = 0
    t_grid = SUBMISSION_OFFSET_S + cfg.interval_s
    eligible = day.eligible()
    while True:
        t_done = completions[0][0] if completions else math.inf
        if min(t_grid, t_done) > end:
            if day.interval_energy_j > 0:  # migrations that ended after the last scheduling instant
                n_active = int((day.used > 0).sum())
                day.intervals.append(IntervalRecord(day.last_t, day.interval_energy_j / 3.6e6, n_active, 0))
            break
        if t_done < t_grid:
            t = t_done
            day.update(t)
            while completions and completions[0][0] == t:
                _, _, v, target, aborted = heapq.heappop(completions)
                if aborted:
                    alloc.abort_migration(v, target)
                else:
                    src = fleet.hosts[int(alloc.host_of[v])].name
                    alloc.finish_migration(v, target)
                    if day.security is not None:
                        day.security.moved(fleet.vms[v].name, src, fleet.hosts[target].name)
            day.update(t)
            continue
        t = t_grid
        req = day.update(t)
        u = np.where(day.placed, req / fleet.vm_mips, 0.0)
        # PowerVm: one utilisation value per scheduling instant, newest first, 30 kept.
        day.history[:, 1:] = day.history[:, :-1]
        day.history[:, 0] = np.where(day.placed, u, 0.0)
        day.history_length = min(day.history_length + 1, HISTORY_LENGTH)
        snap = Snapshot(req, day.history, day.used, day.incoming, eligible, history_length=day.history_length)
        rnd = plan(fleet, alloc, snap, day.policy, day.rng)
        started = _start_migrations(day, t, rnd.migrations, req, completions, seq)
        seq += len(rnd.migrations) + 1
        if started:
            day.update(t)
        active = day.used > 0
        n_active = int(active.sum())
        capacity = math.nan
        if n_active:
            vms_per_host = np.bincount(alloc.host_of[alloc.host_of >= 0], minlength=fleet.n_hosts)
            cap = fleet.total_mips[active] / np.maximum(vms_per_host[active], 1)
            day.capacity_sum += float(cap.sum())
            day.capacity_n += n_active
            capacity = float(cap.mean())
        day.intervals.append(IntervalRecord(t, day.interval_energy_j / 3.6e6, n_active, started, capacity))
        day.interval_energy_j = 0.0
        if progress is not None:
            progress(t, end)
        t_grid = t + cfg.interval_s


def _cloudsim_duration_s(ram_mb: float, bandwidth_bits_per_s: float) -> float:
    """CloudSim's migration delay: RAM ÷ (bandwidth ÷ 2), its bandwidth in kbit/s and RAM in MB."""
    return ram_mb / ((bandwidth_bits_per_s / 1000) / (2 * 8000))


def _start_migrations(
    day: _Day,
    t: float,
    planned: tuple[PlannedMigration, ...],
    req: FloatArray,
    completions: list[tuple[float, int, int, int, int]],
    seq: int,
) -> int:
    """Grant, admit and start the round's migrations; schedule their ends. Returns how many started."""
    fleet, alloc, sec = day.fleet, day.alloc, day.security
    admitted: list[PlannedMigration] = []
    expected: dict[int, LocationBinding] = {}
    for pm in planned:
        vm = fleet.vms[pm.vm].name
        dst = fleet.hosts[pm.destination].name
        if sec is not None:
            current = expected.get(pm.vm, sec.bindings.get(vm))
            src = current.host_id if current is not None else fleet.hosts[int(alloc.host_of[pm.vm])].name
            g = sec.grant(vm, src, dst, current, t)
            day.grants_issued += 1
            ok, _why = sec.admit(g, current, t)
            if not ok:
                day.grants_refused += 1
                continue
            assert g.next_binding is not None
            expected[pm.vm] = g.next_binding
        admitted.append(pm)
    for pm in admitted:
        alloc.start_migration(pm.vm, pm.destination)
    day.migrations += len(admitted)
    if not admitted:
        return 0
    if day.cfg.migration_model is MigrationModel.CLOUDSIM:
        for k, pm in enumerate(admitted):
            ram = float(fleet.vm_ram_mb[pm.vm])
            end = t + _cloudsim_duration_s(ram, float(fleet.bandwidth_bits_per_s[pm.destination]))
            heapq.heappush(completions, (end, seq + k, pm.vm, pm.destination, 0))
            day.records.append(
                MigrationRecord(
                    fleet.vms[pm.vm].name,
                    fleet.hosts[pm.source].name,
                    fleet.hosts[pm.destination].name,
                    pm.reason.value,
                    t,
                    end,
                    0.0,
                    ram * MB,
                    "completed",
                )
            )
        return len(admitted)
    _network_round(day, t, admitted, req, completions, seq)
    return len(admitted)


def _network_round(
    day: _Day,
    t: float,
    admitted: list[PlannedMigration],
    req: FloatArray,
    completions: list[tuple[float, int, int, int, int]],
    seq: int,
) -> None:
    """Run one round's migrations together through secmig's network simulator, under the monitor."""
    fleet, alloc, net = day.fleet, day.alloc, day.cfg.network
    host_ids = sorted(
        {int(alloc.host_of[pm.vm]) for pm in admitted}
        | {pm.source for pm in admitted}
        | {pm.destination for pm in admitted}
    )
    nic = {h: float(fleet.bandwidth_bits_per_s[h]) / 8 for h in host_ids}
    infra = Infrastructure((Datacenter("dc"),), tuple(Host(fleet.hosts[h].name, "dc", nic[h]) for h in host_ids))
    vm_ids = sorted({pm.vm for pm in admitted})
    vms = []
    for v in vm_ids:
        ram = int(fleet.vm_ram_mb[v] * MB)
        pages = ram // 4096
        util = float(req[v] / fleet.vm_mips[v])
        src = int(alloc.host_of[v])
        vms.append(
            VM(
                fleet.vms[v].name,
                fleet.hosts[src].name,
                ram,
                ram,
                dirty=Uniform(util * net.dirty_pages_per_s_at_full_cpu, pages),
                transfer_rate_bytes_per_s=net.migration_share * nic[src],
            )
        )
    stop = StopPolicy("qemu", downtime_limit_s=net.downtime_limit_s)
    specs = tuple(
        MigrationSpec(
            fleet.vms[pm.vm].name,
            fleet.hosts[pm.destination].name,
            policy=stop,
            max_bandwidth_bytes_per_s=net.migration_share * nic[pm.destination],
        )
        for pm in admitted
    )
    sim = Simulation(SimulationSpec(f"round-{t:.1f}", infra, tuple(vms), specs, seed=day.cfg.seed), record_usage=False)
    log = None
    if day.security is not None:
        # Flows share each NIC fairly: the busiest NIC's bytes ÷ its bandwidth bound the round, and the
        # dirty rounds add to it. The monitor watches that long (at most one interval).
        through: dict[int, float] = {}
        for pm in admitted:
            b = float(fleet.vm_ram_mb[pm.vm]) * MB
            for h in (int(alloc.host_of[pm.vm]), pm.destination):
                through[h] = through.get(h, 0.0) + b / nic[h]
        horizon = min(day.cfg.interval_s, 1.5 * max(through.values()) + 10.0)
        rules = day.rules.model_copy(update={"step": min(net.monitor_step_s, day.rules.window)})
        day.security.start_round(t)
        log = attach_monitor(sim, rules, day.security, day.security.audit, until_s=horizon)
    run = sim.run()
    if log is not None:
        # The round's simulator starts its clock at 0: its verdicts are moved onto the day's clock.
        day.verdicts.extend(replace(v, t_s=t + v.t_s) for v in log.verdicts)
        day.vm_seconds_watched += log.vm_seconds
    by_vm: dict[str, list[PlannedMigration]] = {}
    for pm in admitted:
        by_vm.setdefault(fleet.vms[pm.vm].name, []).append(pm)
    for k, r in enumerate(run.migrations):
        pm = by_vm[r.vm].pop(0)
        end = t + r.end_s
        done = r.outcome == "completed"
        heapq.heappush(completions, (end, seq + k, pm.vm, pm.destination, 0 if done else 1))
        day.records.append(
            MigrationRecord(
                r.vm,
                r.source,
                r.destination,
                pm.reason.value,
                t + r.start_s,
                end,
                r.downtime_s,
                float(r.bytes_sent),
                r.outcome,
            )
        )
    for name, rest in by_vm.items():
        for pm in rest:  # never started (its VM was destroyed first): it stays where it is
            heapq.heappush(completions, (t, seq, pm.vm, pm.destination, 1))
            day.records.append(
                MigrationRecord(
                    name,
                    fleet.hosts[pm.source].name,
                    fleet.hosts[pm.destination].name,
                    pm.reason.value,
                    t,
                    t,
                    0.0,
                    0.0,
                    "aborted",
                )
            )
