"""Scenario files: YAML validated with pydantic v2, turned into a :class:`SimulationSpec`.

Sizes, rates and durations take units (``4GiB``, ``10Gbit/s``, ``20000pages/s``, ``300ms``). Any problem
becomes one :class:`ConfigError` naming the file, the field path and the value, e.g.
``demo.yaml: vms[3].ram: "4 GB" is not a size (try 4GiB)``.

Parsing and validation only: it runs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secmig.errors import ConfigError
from secmig.migration.policy import POLICY_PRESETS, NonConvergence, policy_preset
from secmig.model.dirty import DirtyModel, Hotspot, NoDirtying, Sequential, Uniform, parse_trace_csv
from secmig.model.infra import VM, Datacenter, Host, Infrastructure, WanLink
from secmig.model.units import PAGE_SIZE, parse_bandwidth, parse_duration, parse_rate, parse_size
from secmig.monitor.rules import parse_rules
from secmig.sim.engine import AttackSpec, MigrationSpec, SimulationSpec, TrafficSpec
from secmig.yamlfile import parse_yaml, read_yaml, unit_validator, validation_error

Size = Annotated[int, unit_validator(parse_size)]
Bandwidth = Annotated[float, unit_validator(parse_bandwidth)]
Duration = Annotated[float, unit_validator(parse_duration)]
PageRate = Annotated[float, unit_validator(lambda v: parse_rate(v).in_pages_per_s())]
ByteRate = Annotated[float, unit_validator(lambda v: parse_rate(v).in_bytes_per_s())]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostModel(_Model):
    name: str
    nic: Bandwidth = Field(default=1.25e9, description="NIC speed (default 10Gbit/s)")
    vswitch: Bandwidth = Field(default=math.inf)
    latency: Duration = 0.0
    macs: tuple[str, ...] = ()
    count: int = Field(default=1, ge=1, description="Expand to COUNT hosts; the name must contain {i}")


class DatacenterModel(_Model):
    name: str
    core: Bandwidth = Field(default=math.inf)
    core_latency: Duration = 0.0
    hosts: list[HostModel] = Field(min_length=1)


class WanModel(_Model):
    between: tuple[str, str]
    bandwidth: Bandwidth
    latency: Duration = 0.0


class DirtyModelSpec(_Model):
    pattern: Literal["none", "sequential", "uniform", "hotspot", "trace"] = "none"
    rate: PageRate = 0.0
    working_set: Size | None = None
    hot_set: Size | None = None
    hot_share: float = Field(default=0.9, ge=0.0, le=1.0)
    file: str | None = None
    noise: float = Field(default=0.0, ge=0.0, le=2.0)


class VMModel(_Model):
    name: str
    host: str
    ram: Size
    used: Size | None = None
    vcpus: int = Field(default=1, ge=1)
    mac: str | None = None
    dirty: DirtyModelSpec = DirtyModelSpec()
    device_state: Size = 0
    transfer_rate: ByteRate | None = None


StrategyName = Literal["precopy", "stop-and-copy", "postcopy", "hybrid"]


OperationName = Literal["migrate", "copy", "move", "clone", "template"]
GrantKind = Literal["valid", "none", "forged", "replayed", "stale"]


class MigrationModel(_Model):
    vm: str
    to: str
    at: Duration = 0.0
    operation: OperationName = Field(default="migrate", description="Table 4.1: migrate, copy, move, clone, template")
    grant: GrantKind = Field(
        default="valid",
        description="valid; none; forged (a valid grant's expiry pushed back, its signature kept); "
        "replayed (its nonce already used); stale (expired before the operation starts)",
    )
    psi: float | None = Field(default=None, gt=0, lt=1, description="eq. (6): stop once the rest is below psi x RAM")
    strategy: StrategyName | None = None
    auto_converge: bool | None = None
    switchover_bandwidth: Bandwidth | None = None
    postcopy_after: int = Field(default=1, ge=1)
    policy: str | None = None
    downtime_limit: Duration | None = None
    on_nonconvergence: NonConvergence | None = None
    max_bandwidth: Bandwidth | None = None
    max_time: Duration | None = None


class TrafficModel(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    src: str = Field(alias="from")
    to: str
    rate: ByteRate
    start: Duration = 0.0
    duration: Duration = 60.0
    kind: Literal["app", "exfil"] = "app"


class AttackModel(_Model):
    """What a run is for the attack lab: the monitor and the gate are never told any of it, except
    which hosts are outside the cluster (they get no Vsignature) and which migrations have no grant."""

    kind: Literal["detection", "benign", "experiment"] = "detection"
    target: str | None = None
    start_s: float = Field(default=0.0, ge=0)
    description: str = ""
    outside: list[str] = []
    ungranted: list[str] = Field(default=[], description="VMs whose scheduled operations have no grant")


class DefaultsModel(_Model):
    strategy: StrategyName = "precopy"
    auto_converge: bool = False
    policy: str = "qemu"
    downtime_limit: Duration | None = None
    on_nonconvergence: NonConvergence | None = None
    max_bandwidth: Bandwidth | None = None
    max_time: Duration | None = None
    psi: float | None = Field(default=None, gt=0, lt=1)


class ScenarioModel(_Model):
    name: str
    description: str = ""
    seed: int = 0
    until: Duration | None = None
    usage_bin: Duration = Field(default=0.1, gt=0)
    defaults: DefaultsModel = DefaultsModel()
    datacenters: list[DatacenterModel] = Field(min_length=1)
    wan: list[WanModel] = []
    vms: list[VMModel] = []
    migrations: list[MigrationModel] = []
    traffic: list[TrafficModel] = []
    attack: AttackModel | None = None
    monitor: dict[str, Any] | None = Field(
        default=None, description="Overrides of the monitor's rules (rules.yaml's shape) for this scenario"
    )
    secure: bool | None = Field(
        default=None,
        description="Run the gate (the real handshake per operation) and the monitor; default: when the "
        "scenario has an attack block, a monitor block, or an operation other than a granted migrate",
    )






def parse_scenario(data: Any, source: str) -> ScenarioModel:
    """Validate already-loaded YAML data; ``source`` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return ScenarioModel.model_validate(data)
    except ValidationError as exc:
        raise validation_error(source, exc) from None


def load_scenario(path: str | Path) -> tuple[ScenarioModel, SimulationSpec]:
    """Read, validate and build a scenario file."""
    p = Path(path)
    model = parse_scenario(read_yaml(p), p.name)
    return model, build_spec(model, p.name, p.parent)


def load_scenario_text(text: str, source: str, base_dir: Path | None = None) -> tuple[ScenarioModel, SimulationSpec]:
    model = parse_scenario(parse_yaml(text, source), source)
    return model, build_spec(model, source, base_dir or Path("."))


def _dirty(vm: VMModel, where: str, source: str, base_dir: Path) -> DirtyModel:
    d = vm.dirty
    pages = math.ceil(vm.ram / PAGE_SIZE)
    ws = d.working_set if d.working_set is not None else (vm.used if vm.used is not None else vm.ram)
    if ws <= 0 or ws > vm.ram:
        raise ConfigError(f"{source}: {where}.dirty.working_set: must be positive and at most ram")
    w = math.ceil(ws / PAGE_SIZE)
    if d.pattern == "trace":
        if not d.file:
            raise ConfigError(f"{source}: {where}.dirty.file: a trace needs a CSV file")
        tp = base_dir / d.file
        try:
            text = tp.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{source}: {where}.dirty.file: cannot read {tp}: {err.strerror}") from None
        return parse_trace_csv(text, str(tp))
    if d.pattern == "none" or d.rate == 0:
        return NoDirtying()
    if d.pattern == "sequential":
        return Sequential(d.rate, w)
    if d.pattern == "uniform":
        return Uniform(d.rate, w)
    hot = math.ceil((d.hot_set if d.hot_set is not None else ws) / PAGE_SIZE)
    return Hotspot(d.rate, min(hot, pages), pages, d.hot_share)


def _expand_hosts(dc: DatacenterModel, i: int, source: str) -> list[Host]:
    hosts = []
    for j, h in enumerate(dc.hosts):
        if h.count > 1 and "{i}" not in h.name:
            raise ConfigError(f"{source}: datacenters[{i}].hosts[{j}].name: count > 1 needs {{i}} in the name")
        for k in range(1, h.count + 1):
            hosts.append(Host(h.name.replace("{i}", str(k)), dc.name, h.nic, h.vswitch, h.latency, h.macs))
    return hosts


def build_spec(model: ScenarioModel, source: str, base_dir: Path) -> SimulationSpec:
    """Check cross-references and turn the validated model into a :class:`SimulationSpec`."""
    dcs = [Datacenter(dc.name, dc.core, dc.core_latency) for dc in model.datacenters]
    hosts: list[Host] = []
    for i, dc in enumerate(model.datacenters):
        hosts += _expand_hosts(dc, i, source)
    host_names = {h.name for h in hosts}
    if len(host_names) != len(hosts):
        raise ConfigError(f"{source}: datacenters: two hosts share a name")
    dc_names = {dc.name for dc in dcs}
    for i, w in enumerate(model.wan):
        for end in w.between:
            if end not in dc_names:
                raise ConfigError(f"{source}: wan[{i}].between: unknown datacenter {end!r}")
    vms: list[VM] = []
    for i, v in enumerate(model.vms):
        where = f"vms[{i}]"
        if v.host not in host_names:
            raise ConfigError(f"{source}: {where}.host: unknown host {v.host!r}")
        used = v.ram if v.used is None else v.used
        if used > v.ram:
            raise ConfigError(f"{source}: {where}.used: {used} bytes is more than ram ({v.ram} bytes)")
        mac = v.mac or f"52:54:00:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
        vms.append(
            VM(
                name=v.name,
                host=v.host,
                ram_bytes=v.ram,
                used_bytes=used,
                vcpus=v.vcpus,
                mac=mac,
                dirty=_dirty(v, where, source, base_dir),
                dirty_noise=v.dirty.noise,
                device_state_bytes=v.device_state,
                transfer_rate_bytes_per_s=v.transfer_rate,
            )
        )
    vm_names = {v.name for v in vms}
    if len(vm_names) != len(vms):
        raise ConfigError(f"{source}: vms: two VMs share a name")
    dflt = model.defaults
    if dflt.policy not in POLICY_PRESETS:
        raise ConfigError(f"{source}: defaults.policy: unknown policy {dflt.policy!r}")
    migrations = []
    for i, m in enumerate(model.migrations):
        where = f"migrations[{i}]"
        if m.vm not in vm_names:
            raise ConfigError(f"{source}: {where}.vm: unknown vm {m.vm!r}")
        if m.to not in host_names:
            raise ConfigError(f"{source}: {where}.to: unknown host {m.to!r}")
        name = m.policy or dflt.policy
        if name not in POLICY_PRESETS:
            raise ConfigError(
                f"{source}: {where}.policy: unknown policy {name!r} (choose from {', '.join(POLICY_PRESETS)})"
            )
        policy = policy_preset(name).with_overrides(
            downtime_limit_s=m.downtime_limit if m.downtime_limit is not None else dflt.downtime_limit,
            on_nonconvergence=m.on_nonconvergence or dflt.on_nonconvergence,
            max_time_s=m.max_time if m.max_time is not None else dflt.max_time,
            psi=m.psi if m.psi is not None else dflt.psi,
        )
        strategy = m.strategy or dflt.strategy
        if m.operation == "move":
            if m.strategy not in (None, "stop-and-copy"):
                raise ConfigError(f"{source}: {where}.strategy: a move is non-live: stop-and-copy only")
            strategy = "stop-and-copy"  # the agents pause the guest before the first byte of a move
        elif m.operation != "migrate" and strategy != "precopy":
            raise ConfigError(f"{source}: {where}.strategy: a {m.operation} is a live pre-copy of the running VM")
        grant = "none" if model.attack is not None and m.vm in model.attack.ungranted else m.grant
        max_bw = m.max_bandwidth if m.max_bandwidth is not None else dflt.max_bandwidth
        migrations.append(
            MigrationSpec(
                m.vm,
                m.to,
                m.at,
                strategy,
                policy,
                max_bw or math.inf,
                auto_converge=dflt.auto_converge if m.auto_converge is None else m.auto_converge,
                switchover_bandwidth_bytes_per_s=m.switchover_bandwidth,
                postcopy_after_rounds=m.postcopy_after,
                operation=m.operation,
                grant=grant,
            )
        )
    traffic = []
    for i, t in enumerate(model.traffic):
        if t.src not in vm_names:
            raise ConfigError(f"{source}: traffic[{i}].from: unknown vm {t.src!r}")
        if t.to not in vm_names and t.to not in host_names:
            raise ConfigError(f"{source}: traffic[{i}].to: unknown vm or host {t.to!r}")
        if t.rate <= 0:
            raise ConfigError(f"{source}: traffic[{i}].rate: must be positive")
        traffic.append(TrafficSpec(t.src, t.to, t.rate, t.start, t.duration, kind=t.kind))
    attack = _attack(model, source, host_names, vm_names)
    if model.monitor is not None:
        parse_rules(model.monitor, f"{source}: monitor")  # the same shape as rules.yaml, checked now
    secure = model.secure
    if secure is None:
        secure = (
            model.attack is not None
            or model.monitor is not None
            or any(m.operation != "migrate" or m.grant != "valid" for m in migrations)
        )
    return SimulationSpec(
        name=model.name,
        infra=Infrastructure(
            tuple(dcs),
            tuple(hosts),
            tuple(WanLink(w.between[0], w.between[1], w.bandwidth, w.latency) for w in model.wan),
        ),
        vms=tuple(vms),
        migrations=tuple(migrations),
        traffic=tuple(traffic),
        seed=model.seed,
        until_s=model.until,
        usage_bin_s=model.usage_bin,
        attack=attack,
        secure=secure,
        monitor_rules=dict(model.monitor) if model.monitor is not None else None,
    )


def _attack(model: ScenarioModel, source: str, hosts: set[str], vms: set[str]) -> AttackSpec | None:
    a = model.attack
    if a is None:
        return None
    for h in a.outside:
        if h not in hosts:
            raise ConfigError(f"{source}: attack.outside: unknown host {h!r}")
    for i, v in enumerate(a.ungranted):
        if v not in vms:
            raise ConfigError(f"{source}: attack.ungranted[{i}]: unknown vm {v!r}")
    if a.target is not None and a.target not in vms:
        raise ConfigError(f"{source}: attack.target: unknown vm {a.target!r}")
    return AttackSpec(a.kind, a.target, a.start_s, a.description, tuple(a.outside), tuple(a.ungranted))
