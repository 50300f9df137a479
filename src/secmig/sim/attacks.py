"""The attack suite: adversaries against the security core and the monitor, and their metrics.

Two kinds of attack:

- **authentication** attacks run the real migration protocol (TLS 1.3, Vsignatures, grants) in memory
  between two :class:`~secmig.security.MigrationConnection` ends: a rogue or revoked hypervisor, a
  man in the middle altering pages, a replayed session, a clone/copy/template with no grant. The pages
  that reached the attacker are counted from what actually crossed, never assumed.
- **detection** attacks are scenarios (``scenarios/attacks/*.yaml``) run in the simulator with the
  monitor attached: memory copied out of a VM with no grant (fast, or slowly to stay under the
  thresholds), a co-located VM flooding the vSwitch, a migration storm. Their pages leaked are the
  bytes that left before the VM was destroyed.

Benign scenarios (``benign-*.yaml``) measure false alarms: a VM-window where the monitor throttled,
aborted or destroyed something that was authorized. Identity checks that pass are counted apart.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from secmig.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Verdict
from secmig.security.audit import MemoryAuditSink
from secmig.security.cluster import Cluster
from secmig.security.events import (
    Commit,
    ConnectionClosed,
    DeviceState,
    MigrationRequest,
    NeedData,
    PageBatch,
    Role,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.frames import memory_digest
from secmig.security.grants import MemoryNonceStore
from secmig.security.location import MemoryBindingRegistry
from secmig.security.loopback import ConnectionPair, Tamper
from secmig.security.policy import Operation
from secmig.security.protocol import MigrationConnection
from secmig.sim.engine import RunResult, Simulation
from secmig.sim.monitoring import MonitorLog, SimSecurity, attach_monitor, new_cluster
from secmig.sim.scenario import build_spec, parse_scenario

PAGE = 4096


@dataclass(frozen=True, slots=True)
class AttackResult:
    """One attack's outcome."""

    name: str
    kind: str
    """``authentication``, ``detection`` or ``benign``."""
    stopped: bool
    """Blocked (authentication) or detected (detection); for benign runs: no wrongful action."""
    rule: str
    time_to_detect_s: float | None
    pages_leaked: int
    vm_fate: str
    detail: str
    windows: int = 0
    false_alarms: int = 0
    identity_checks: int = 0


# --- authentication attacks: the real protocol in memory ------------------------------------------


@dataclass
class _Lab:
    cluster: Cluster
    nonces: MemoryNonceStore = field(default_factory=MemoryNonceStore)
    bindings: MemoryBindingRegistry = field(default_factory=MemoryBindingRegistry)
    audit: MemoryAuditSink = field(default_factory=lambda: MemoryAuditSink("destination"))


def _migrate_in_memory(
    lab: _Lab,
    *,
    src_identity: Any,
    dst_identity: Any,
    trust_src: Any,
    trust_dst: Any,
    operation: Operation,
    grant: Any,
    binding: Any,
    tamper: Tamper | None = None,
    pages: int = 64,
) -> tuple[int, ConnectionPair]:
    """Try a whole pre-copy; return the page bytes the destination end received, and the pair."""
    memory = bytearray((i * 7 + 1) % 256 for i in range(pages * PAGE))
    request = MigrationRequest(operation, "vm-1", PAGE, pages, grant, binding)
    source = MigrationConnection.source(src_identity, trust_src, request, audit=MemoryAuditSink("source"))
    destination = MigrationConnection.destination(
        dst_identity, trust_dst, nonces=lab.nonces, bindings=lab.bindings, audit=lab.audit
    )
    pair = ConnectionPair(source, destination, tamper=tamper)
    received = 0

    def pump() -> None:
        nonlocal received
        for ev in pair.pump():
            if isinstance(ev, PageBatch):
                received += len(ev.data)

    pump()
    try:
        pair.send(Role.SOURCE, RoundStart(0))
        for k in range(0, pages, 16):
            chunk = tuple(range(k, min(k + 16, pages)))
            data = b"".join(memory[n * PAGE : (n + 1) * PAGE] for n in chunk)
            pair.send(Role.SOURCE, PageBatch(0, chunk, data))
            pump()
        pair.send(Role.SOURCE, RoundEnd(0))
        pair.send(Role.SOURCE, StopAndCopy())
        pair.send(Role.SOURCE, DeviceState(b"cpu"))
        pair.send(Role.SOURCE, Commit(memory_digest(memory, PAGE)))
        pump()
    except LocalProtocolError:
        pass  # the source's state machine refuses to send pages before AUTHORIZED: what we test
    except RemoteProtocolError:
        pass  # an end saw altered or out-of-order bytes and dropped the connection
    return received, pair


def _auth_attack(name: str, detail: str, run: Callable[[_Lab, Cluster, Path], tuple[int, str]]) -> AttackResult:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cluster = new_cluster(root / "cluster", ["hv-a", "hv-b", "hv-revoked"], revoked=["hv-revoked"])
        lab = _Lab(cluster)
        leaked, why = run(lab, cluster, root)
        refused = [r for r in lab.audit.records if r.decision not in ("allow", "accept", "ok", "success")]
        stopped = leaked == 0
        return AttackResult(
            name,
            "authentication",
            stopped,
            why,
            0.0 if stopped else None,
            leaked // PAGE,
            "stays on its source" if stopped else "copied",
            detail + (f" ({len(refused)} refusals audited)" if refused else ""),
        )


def _legit(lab: _Lab, cluster: Cluster, dst: str = "hv-b", operation: Operation = Operation.MIGRATE) -> dict[str, Any]:
    binding = cluster.issue_binding("vm-1", "52:54:00:00:00:01", "hv-a", 0)
    grant = cluster.issue_grant(operation, "vm-1", "hv-a", dst, current_binding=binding)
    trust = cluster.trust()
    return {
        "src_identity": cluster.host_identity("hv-a"),
        "trust_src": trust,
        "trust_dst": trust,
        "operation": operation,
        "grant": grant,
        "binding": binding,
    }


def _rogue(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str]:
    other = new_cluster(root / "other", ["hv-x"])
    kw = _legit(lab, cluster)
    kw["grant"] = cluster.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-x", current_binding=kw["binding"])
    got, _ = _migrate_in_memory(lab, dst_identity=other.host_identity("hv-x"), **{**kw, "trust_dst": other.trust()})
    return got, "TLS: peer certificate not from this cluster's CA"


def _revoked(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str]:
    kw = _legit(lab, cluster, dst="hv-revoked")
    got, _ = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-revoked"), **kw)
    return got, "revocation list"


def _mitm(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str]:
    seen = {"bytes": 0}

    def flip(role: Role, data: bytes) -> bytes:
        # The attacker on the wire sees TLS records only; it alters one byte of every later record.
        seen["bytes"] += len(data)
        if role is Role.SOURCE and seen["bytes"] > 8000 and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        return data

    kw = _legit(lab, cluster)
    got, pair = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), tamper=flip, **kw)
    # Pages reach the attacker only as TLS ciphertext; what the destination accepted stops at the
    # first altered record (TLS's AEAD tag), so the migration aborts and the VM stays on its source.
    committed = pair.destination.state.name == "COMMITTED"
    return (0 if not committed else got), "TLS record integrity (AEAD), then abort"


def _replay(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str]:
    kw = _legit(lab, cluster)
    recorded: list[bytes] = []

    def record(role: Role, data: bytes) -> bytes:
        if role is Role.SOURCE:
            recorded.append(data)
        return data

    _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), tamper=record, **kw)
    # Replay the recorded source bytes, as they were, to a fresh destination end of the same host.
    destination = MigrationConnection.destination(
        cluster.host_identity("hv-b"), cluster.trust(), nonces=lab.nonces, bindings=lab.bindings, audit=lab.audit
    )
    got = 0
    try:
        for chunk in recorded:
            destination.receive_data(chunk)
            while not isinstance(ev := destination.next_event(), NeedData | ConnectionClosed):
                if isinstance(ev, PageBatch):
                    got += len(ev.data)
            if isinstance(ev, ConnectionClosed):
                break
    except RemoteProtocolError:
        pass  # the replay does not fit this session's fresh TLS keys: the destination drops it
    return got, "fresh TLS session keys (and a single-use grant nonce)"


def _no_grant(operation: Operation) -> Callable[[_Lab, Cluster, Path], tuple[int, str]]:
    def run(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str]:
        kw = _legit(lab, cluster, operation=operation)
        kw["grant"] = None
        got, _ = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), **kw)
        return got, "grant check"

    return run


AUTH_ATTACKS: dict[str, tuple[str, Callable[[_Lab, Cluster, Path], tuple[int, str]]]] = {
    "rogue-hypervisor": ("a hypervisor outside the cluster asks for the VM", _rogue),
    "revoked-hypervisor": ("a revoked member asks for the VM", _revoked),
    "mitm-page-tamper": ("a man in the middle alters page bytes on the wire", _mitm),
    "replay-old-migration": ("a recorded session's bytes are replayed to the destination", _replay),
    "unauthorized-clone": ("an insider clones the VM with no grant", _no_grant(Operation.CLONE)),
    "unauthorized-copy": ("an insider copies the VM with no grant", _no_grant(Operation.COPY)),
    "unauthorized-template": ("an insider makes a template of the VM with no grant", _no_grant(Operation.TEMPLATE)),
}


# --- detection attacks and benign runs: scenarios with the monitor ---------------------------------


def scenario_files() -> dict[str, Path]:
    """The bundled attack and benign scenarios, by name."""
    root = Path(str(resources.files("secmig.data").joinpath("attacks")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


@dataclass(frozen=True, slots=True)
class ScenarioRun:
    """A monitored simulation and what its ``attack:`` block says about it."""

    name: str
    kind: str
    target: str | None
    start_s: float
    description: str
    sim: Simulation
    log: MonitorLog
    security: SimSecurity
    result: RunResult


def run_scenario(path: Path, rules: RuleSet) -> ScenarioRun:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "attack" not in data:
        raise ConfigError(f"{path.name}: an attack scenario needs an 'attack:' block")
    block = data.pop("attack")
    members = block.get("members")
    spec = build_spec(parse_scenario(data, path.name), path.name, path.parent)
    with tempfile.TemporaryDirectory() as tmp:
        hosts = [h.name for h in spec.infra.hosts]
        cluster = new_cluster(Path(tmp) / "cluster", members if members is not None else hosts)
        security = SimSecurity(cluster)
        for vm in spec.vms:
            security.bindings[vm.name] = cluster.issue_binding(vm.name, vm.mac, vm.host, 0)
        for m in spec.migrations:  # every scheduled migration is authorized: a grant is issued for it
            src = next(v.host for v in spec.vms if v.name == m.vm)
            security.grants[(m.vm, src, m.destination)] = cluster.issue_grant(
                Operation.MIGRATE, m.vm, src, m.destination, current_binding=security.bindings[m.vm], ttl_s=3600
            )
        sim = Simulation(spec)
        log = attach_monitor(sim, rules, security, until_s=spec.until_s)
        result = sim.run()
    return ScenarioRun(
        path.stem,
        str(block.get("kind", "detection")),
        block.get("target"),
        float(block.get("start_s", 0.0)),
        str(block.get("description", "")),
        sim,
        log,
        security,
        result,
    )


def _score(run: ScenarioRun) -> AttackResult:
    sim, log = run.sim, run.log
    checks = sum(1 for v in log.verdicts if "challenge" in v.evidence)
    if run.kind == "benign":
        wrong = [v for v in log.verdicts if v.action is not Action.CONTINUE]
        return AttackResult(
            run.name,
            "benign",
            not wrong,
            ", ".join(sorted({v.rule for v in wrong})) or "—",
            None,
            0,
            "all running" if not sim.destroyed else f"destroyed: {', '.join(sim.destroyed)}",
            run.description,
            log.windows,
            len(wrong),
            checks,
        )
    target = run.target or ""
    hits = [v for v in log.verdicts if v.vm == target and v.action is not Action.CONTINUE]
    first: Verdict | None = hits[0] if hits else None
    exfil = [t for t in sim.spec.traffic if t.kind == "exfil" and t.src_vm == target]
    leaked = sum(f.bytes for f in sim.flows if f.kind == "exfil" and f.vm == target)
    fate = "destroyed" if target in sim.destroyed else f"running on {sim.location.get(target, '?')}"
    return AttackResult(
        run.name,
        "detection",
        first is not None,
        first.rule if first else "—",
        (first.t_s - run.start_s) if first else None,
        int(leaked // PAGE) if exfil else 0,
        fate,
        run.description,
        log.windows,
        0,
        checks,
    )


def run_attack(name: str, rules: RuleSet | None = None) -> AttackResult:
    """Run one attack (or benign scenario) by name."""
    rules = rules or RuleSet()
    if name in AUTH_ATTACKS:
        detail, fn = AUTH_ATTACKS[name]
        return _auth_attack(name, detail, fn)
    files = scenario_files()
    if name not in files:
        raise ConfigError(f"unknown attack {name!r} (see `secmig attack list`)")
    return _score(run_scenario(files[name], rules))


def attack_names() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every attack and benign scenario."""
    out = [(n, "authentication", d) for n, (d, _) in AUTH_ATTACKS.items()]
    for n, p in scenario_files().items():
        block = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("attack", {})
        out.append((n, str(block.get("kind", "detection")), str(block.get("description", ""))))
    return out


def false_alarm_rate(results: list[AttackResult]) -> float:
    """Wrongful actions per VM-window over the benign runs."""
    windows = sum(r.windows for r in results if r.kind == "benign")
    alarms = sum(r.false_alarms for r in results if r.kind == "benign")
    return alarms / windows if windows else math.nan


def sweep(factors: list[float]) -> list[dict[str, float]]:
    """Detection and false alarms of the scenario suite as the rate thresholds move (high = 1.6 × medium)."""
    rows = []
    names = [n for n, k, _ in attack_names() if k in ("detection", "benign")]
    for f in factors:
        rules = RuleSet(rate=replace_rate(RuleSet().rate, medium=f, high=1.6 * f))
        results = [run_attack(n, rules) for n in names]
        det = [r for r in results if r.kind == "detection"]
        ben = [r for r in results if r.kind == "benign"]
        windows = sum(r.windows for r in ben) or 1
        rows.append(
            {
                "medium": f,
                "high": 1.6 * f,
                "detected": sum(r.stopped for r in det) / max(len(det), 1),
                "false_alarm_rate": sum(r.false_alarms for r in ben) / windows,
                "identity_check_rate": sum(r.identity_checks for r in ben) / windows,
            }
        )
    return rows


def replace_rate(rate: Any, **kw: float) -> Any:
    return rate.model_copy(update=kw)


__all__ = ["AttackResult", "attack_names", "false_alarm_rate", "run_attack", "sweep"]
