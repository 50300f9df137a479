"""The attack suite: adversaries against the security core and the monitor, and their metrics.

Two kinds of attack:

- **authentication** attacks run the real migration protocol (TLS 1.3, Vsignatures, grants) in memory
  between two :class:`~secmig.security.MigrationConnection` ends: a rogue or revoked hypervisor, a
  man in the middle altering pages, a replayed session, a clone/copy/template with no grant. The pages
  that reached the attacker are counted from what actually crossed, never assumed.
- **detection** attacks are scenarios (``scenarios/attacks/*.yaml``) run in the simulator with the
  monitor attached: memory copied out of a VM with no grant (fast, or slowly to stay under the
  thresholds; to an outsider or to a compromised cluster member), a co-located VM flooding the vSwitch,
  a migration storm, a flood of the WAN at an honest VM's switchover. Their pages leaked are the bytes
  of the target's memory that reached any host with no grant for them, member or not. An attack is
  stopped when the monitor acted on its target, or when it was harmless: nothing leaked and the target
  was not destroyed (a granted move that was merely slow, say).

The slow-exfiltration floor (:func:`slow_exfil_floor`) is measured, not assumed: the slow-leak scenarios
are rerun at falling rates until the monitor no longer catches the leak within the run.

Benign scenarios (``benign-*.yaml``) measure false alarms: a VM-window where the monitor throttled,
aborted or destroyed something that was authorized. Identity checks that pass are counted apart.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from secmig.agent.precopy_driver import LoopbackLink, PreCopySender, drive_sync
from secmig.errors import ConfigError, LocalProtocolError, MigrationError, RemoteProtocolError, SecurityError
from secmig.lab.attack_commit import COMMIT_ATTACKS
from secmig.lab.attack_trust import TRUST_ATTACKS
from secmig.migration import StopPolicy
from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Verdict
from secmig.security.audit import AuditSink, Decision, Detail, MemoryAuditSink
from secmig.security.cluster import Cluster
from secmig.security.events import (
    Commit,
    Committed,
    ConnectionClosed,
    MigrationRequest,
    NeedData,
    PageBatch,
    ReceivedEvent,
    Role,
)
from secmig.security.grants import MemoryNonceStore
from secmig.security.location import MemoryBindingRegistry
from secmig.security.loopback import ConnectionPair, Tamper
from secmig.security.policy import Operation
from secmig.security.protocol import MigrationConnection
from secmig.sim.engine import RunResult, Simulation
from secmig.sim.gate import run_secure
from secmig.sim.monitoring import MonitorLog, SimSecurity, new_cluster
from secmig.sim.scenario import build_spec, parse_scenario
from secmig.yamlfile import read_yaml

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


@dataclass(frozen=True, slots=True)
class Transcript:
    """What one in-memory migration attempt let through, measured from the two ends and the wire."""

    memory: bytes
    page_bytes_released: int
    """Page bytes the source handed to its end of the channel (after authentication and authorization)."""
    page_bytes_delivered: int
    """Page bytes the destination end decoded and accepted."""
    pages_on_wire_in_clear: int
    """Source pages whose contents can be read on the wire (a 64-byte slice of each is searched for)."""
    pages_altered_accepted: int
    """Pages the destination accepted whose contents differ from the source's."""
    committed: bool
    wire: bytes


def _pages_in_clear(memory: bytes, wire: bytes, pages: int) -> int:
    return sum(1 for n in range(pages) if memory[n * PAGE + 1000 : n * PAGE + 1064] in wire)


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
    seed: int = 1,
) -> Transcript:
    """Try a whole pre-copy of ``pages`` random pages and measure what crossed."""
    memory = random.Random(seed).randbytes(pages * PAGE)  # every page distinct: a leak is findable on the wire
    request = MigrationRequest(operation, "vm-1", PAGE, pages, grant, binding)
    source = MigrationConnection.source(src_identity, trust_src, request, audit=MemoryAuditSink("source"))
    destination = MigrationConnection.destination(
        dst_identity, trust_dst, nonces=lab.nonces, bindings=lab.bindings, audit=lab.audit
    )
    pair = ConnectionPair(source, destination, tamper=tamper)
    received: dict[int, bytes] = {}

    def destination_end(event: ReceivedEvent) -> None:
        if isinstance(event, PageBatch):
            data = bytes(event.data)
            for i, n in enumerate(event.page_numbers):
                received[n] = data[i * PAGE : (i + 1) * PAGE]
        elif isinstance(event, Commit):
            # The destination's digest of what it accepted matched the source's: it takes the VM over.
            pair.send(Role.DESTINATION, Committed())

    try:
        pair.pump()
        # One pass of every page, then the stop-and-copy: the shared pre-copy driver, policy "one round".
        drive_sync(PreCopySender(_StaticMemory(memory), ONE_ROUND, batch_pages=16), LoopbackLink(pair, destination_end))
    except LocalProtocolError:
        pass  # the source's state machine refuses to send pages before AUTHORIZED: what we test
    except RemoteProtocolError:
        pass  # an end saw altered or out-of-order bytes and dropped the connection
    except (MigrationError, SecurityError):
        pass  # the destination refused the commit or never answered: the source keeps the VM
    wire = b"".join(pair.wire[Role.SOURCE]) + b"".join(pair.wire[Role.DESTINATION])
    altered = sum(1 for n, d in received.items() if d != memory[n * PAGE : (n + 1) * PAGE])
    return Transcript(
        memory,
        source.page_bytes_sent,
        destination.page_bytes_received,
        _pages_in_clear(memory, wire, pages),
        altered,
        destination.state.name == "DONE",
        wire,
    )


class _StaticMemory:
    """The attack lab's VM: random pages that nothing dirties (a :class:`PageSource`)."""

    page_size = PAGE

    def __init__(self, memory: bytes) -> None:
        self.memory = memory
        self.page_count = len(memory) // PAGE

    def nonzero_pages(self) -> npt.NDArray[np.intp]:
        return np.arange(self.page_count, dtype=np.intp)

    def sync_dirty(self) -> npt.NDArray[np.intp]:
        return np.empty(0, dtype=np.intp)

    def read_pages(self, pages: npt.NDArray[np.intp]) -> bytes:
        return b"".join(self.memory[n * PAGE : (n + 1) * PAGE] for n in pages.tolist())

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def device_state(self) -> bytes:
        return b"cpu"


ONE_ROUND = StopPolicy(name="one round", max_rounds=1, on_nonconvergence="force")
"""Round 0 sends every page, then the stop-and-copy (the lab's VM dirties nothing)."""

AuthRun = Callable[[_Lab, Cluster, Path], tuple[int, str, str]]
"""An authentication attack: (pages that reached the attacker, what stopped it, how it was measured)."""


def _auth_attack(name: str, detail: str, run: AuthRun) -> AttackResult:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cluster = new_cluster(root / "cluster", ["hv-a", "hv-b", "hv-revoked"], revoked=["hv-revoked"])
        lab = _Lab(cluster)
        leaked, why, measured = run(lab, cluster, root)
        refusals = [r for r in lab.audit.records if r.decision != Decision.ALLOW]
        stopped = leaked == 0
        return AttackResult(
            name,
            "authentication",
            stopped,
            why,
            0.0 if stopped else None,
            leaked,
            "stays on its source" if stopped else "copied",
            f"{detail}; {measured}; {len(refusals)} refusal(s) in the destination's audit log",
        )


def _legit(cluster: Cluster, dst: str = "hv-b", operation: Operation = Operation.MIGRATE) -> dict[str, Any]:
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


def _endpoint_leak(t: Transcript) -> tuple[int, str]:
    """The attacker is the destination end: it gets what the source released, and what the wire shows."""
    pages = max(t.page_bytes_released // PAGE, t.page_bytes_delivered // PAGE, t.pages_on_wire_in_clear)
    return pages, (
        f"measured: source released {t.page_bytes_released} page bytes, destination decoded "
        f"{t.page_bytes_delivered}, {t.pages_on_wire_in_clear} pages readable on the wire"
    )


def _rogue(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str, str]:
    other = new_cluster(root / "other", ["hv-x"])
    kw = _legit(cluster)
    kw["grant"] = cluster.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-x", current_binding=kw["binding"])
    t = _migrate_in_memory(lab, dst_identity=other.host_identity("hv-x"), **{**kw, "trust_dst": other.trust()})
    pages, how = _endpoint_leak(t)
    return pages, "TLS: not this cluster's CA", how


def _revoked(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str, str]:
    kw = _legit(cluster, dst="hv-revoked")
    t = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-revoked"), **kw)
    pages, how = _endpoint_leak(t)
    return pages, "revocation list", how


def _mitm(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str, str]:
    seen = {"bytes": 0}

    def flip(role: Role, data: bytes) -> bytes:
        # On the wire the attacker sees TLS records; once the handshake is over it flips a byte of each.
        seen["bytes"] += len(data)
        if role is Role.SOURCE and seen["bytes"] > 8000 and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        return data

    t = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), tamper=flip, **_legit(cluster))
    # What the attacker reads: pages in the clear on the wire. What it achieves: altered pages accepted.
    pages = t.pages_on_wire_in_clear + t.pages_altered_accepted
    how = (
        f"measured: {t.pages_on_wire_in_clear} pages readable on the wire, {t.pages_altered_accepted} altered "
        f"pages accepted, destination {'committed' if t.committed else 'aborted'}"
    )
    return pages, "TLS record integrity", how


def _replay(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str, str]:
    kw = _legit(cluster)
    recorded: list[bytes] = []

    def record(role: Role, data: bytes) -> bytes:
        if role is Role.SOURCE:
            recorded.append(data)
        return data

    _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), tamper=record, **kw)
    # 1. The recorded source bytes, as they were, to a fresh destination end of the same host.
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
    # 2. The old grant, replayed by a member in a new session: its nonce was used up by the first one.
    again = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), **kw)
    pages = got // PAGE + again.page_bytes_delivered // PAGE
    how = (
        f"measured: replayed bytes gave {got} page bytes, the replayed grant {again.page_bytes_delivered} "
        f"(source released {again.page_bytes_released})"
    )
    return pages, "TLS keys, grant nonce", how


def _no_grant(operation: Operation) -> AuthRun:
    def run(lab: _Lab, cluster: Cluster, root: Path) -> tuple[int, str, str]:
        kw = _legit(cluster, operation=operation)
        kw["grant"] = None
        t = _migrate_in_memory(lab, dst_identity=cluster.host_identity("hv-b"), **kw)
        pages, how = _endpoint_leak(t)
        return pages, "no grant", how

    return run


AUTH_ATTACKS: dict[str, tuple[str, AuthRun]] = {
    "rogue-hypervisor": ("a hypervisor outside the cluster asks for the VM", _rogue),
    "revoked-hypervisor": ("a revoked member asks for the VM", _revoked),
    "mitm-page-tamper": ("a man in the middle alters page bytes on the wire", _mitm),
    "replay-old-migration": ("a recorded session, then its used grant, replayed to the destination", _replay),
    "unauthorized-clone": ("an insider clones the VM with no grant", _no_grant(Operation.CLONE)),
    "unauthorized-copy": ("an insider copies the VM with no grant", _no_grant(Operation.COPY)),
    "unauthorized-template": ("an insider makes a template of the VM with no grant", _no_grant(Operation.TEMPLATE)),
    **TRUST_ATTACKS,
    **COMMIT_ATTACKS,
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
    members: frozenset[str]
    sim: Simulation
    log: MonitorLog
    security: SimSecurity
    result: RunResult
    rules: RuleSet
    audit: MemoryAuditSink


def run_scenario(path: Path, rules: RuleSet, audit: AuditSink | None = None) -> ScenarioRun:
    """Run an attack scenario with the monitor attached.

    The ``attack:`` block says what the run is (``kind``: detection, benign, experiment), who the
    adversary's ``target`` VM is and when it starts, which hosts are on the network but ``outside`` the
    cluster (no Vsignature), and which scheduled migrations are ``ungranted``; every other migration gets
    a real grant. The monitor is told none of it.
    """
    return run_scenario_doc(read_yaml(path), path.stem, path.parent, rules, audit)


def run_scenario_doc(
    data: Any, name: str, base_dir: Path, rules: RuleSet, audit: AuditSink | None = None
) -> ScenarioRun:
    """:func:`run_scenario` on a scenario already read (``name`` without ``.yaml``; ``base_dir`` for its paths).

    The scenario's ``attack:`` block is part of the scenario language (:mod:`secmig.sim.scenario`); the
    run goes through :func:`secmig.sim.gate.run_secure`: the real handshake before every operation, the
    monitor on every VM.
    """
    source = f"{name}.yaml"
    if not isinstance(data, dict) or not isinstance(data.get("attack"), dict):
        raise ConfigError(f"{source}: an attack scenario needs an 'attack:' block")
    spec = build_spec(parse_scenario(data, source), source, base_dir)
    block = spec.attack
    assert block is not None
    memory_audit = MemoryAuditSink("monitor")
    secure = run_secure(spec, rules, _Tee(memory_audit, audit))
    members = frozenset(h.name for h in spec.infra.hosts if h.name not in block.outside)
    return ScenarioRun(
        name,
        block.kind,
        block.target,
        block.start_s,
        block.description,
        members,
        secure.sim,
        secure.log,
        secure.security,
        secure.result,
        secure.rules,
        memory_audit,
    )


class _Tee:
    """One audit record to two sinks (the run's memory, and a persistent log if one was given)."""

    def __init__(self, first: AuditSink, second: AuditSink | None) -> None:
        self.sinks = [first] if second is None else [first, second]

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        for sink in self.sinks:
            sink.record(event, decision, subject, detail)


def bytes_to_outsiders(run: ScenarioRun, vm: str) -> float:
    """Bytes of ``vm``'s flows that reached a host outside the cluster (finished, cut, or still going)."""
    done = sum(f.bytes for f in run.sim.flows if f.vm == vm and f.dst_host not in run.members)
    cut = sum(b for (v, dst), b in run.log.leaked.items() if v == vm and dst not in run.members)
    return done + cut


def bytes_unauthorized(run: ScenarioRun, vm: str) -> float:
    """Bytes of ``vm``'s memory that reached a host with no grant for them, member or not: its copies out
    (finished or cut) and its ungranted migration streams (finished or cut).

    The lab may read the scenario's intent (``kind: exfil``) to score a run; the monitor never does.
    """
    granted = {(src, dst) for (v, src, dst) in run.security.grants if v == vm}
    granted_dst = {dst for _src, dst in granted}
    done = sum(
        f.bytes
        for f in run.sim.flows
        if f.vm == vm and (f.kind == "exfil" or (f.kind == "migration" and (f.src_host, f.dst_host) not in granted))
    )
    cut = sum(b for (v, dst), b in run.log.leaked.items() if v == vm and dst not in granted_dst)
    return done + cut


def _score(run: ScenarioRun) -> AttackResult:
    sim, log = run.sim, run.log
    checks = sum(1 for v in log.verdicts if "challenge" in v.evidence)
    windows = round(log.vm_seconds / run.rules.window)
    if run.kind == "benign":
        wrong = [v for v in log.verdicts if v.action is not Action.CONTINUE]
        # A VM-window with a wrongful throttle, abort or destroy counts once, however many rules fired.
        alarms = len({(v.vm, math.floor(v.t_s / run.rules.window)) for v in wrong})
        return AttackResult(
            run.name,
            "benign",
            not wrong,
            ", ".join(sorted({v.rule for v in wrong})) or "—",
            None,
            0,
            "all running" if not sim.destroyed else f"destroyed: {', '.join(sim.destroyed)}",
            f"{run.description}; {checks} identity checks, all passed" if not wrong else run.description,
            windows,
            alarms,
            checks,
        )
    target = run.target or ""
    hits = [v for v in log.verdicts if v.vm == target and v.action is not Action.CONTINUE]
    first: Verdict | None = hits[0] if hits else None
    leaked = bytes_unauthorized(run, target)
    harmless = first is None and leaked == 0 and target not in sim.destroyed
    refused = [e for e in sim.effects if e.vm == target and e.reason.startswith("refused at the gate")]
    if harmless and refused:
        # The real handshake refused the operation: not one page crossed (the flows show only handshake bytes).
        return AttackResult(
            run.name,
            "detection",
            True,
            "gate",
            0.0,
            0,
            f"stays on {sim.location.get(target, '?')}",
            f"{run.description}; refused at the gate ({refused[0].reason}), 0 page bytes sent",
            windows,
            0,
            checks,
        )
    if target in sim.destroyed:
        fate = "destroyed"
    elif first is not None and first.action is Action.THROTTLE:
        fate = f"throttled on {sim.location.get(target, '?')}"
    else:
        fate = f"running on {sim.location.get(target, '?')}"
    detail = run.description
    if first is not None:
        detail += f"; {first.rule} {first.level.value} → check {first.evidence.get('challenge', '—')} → {first.action}"
    elif harmless:
        detail += "; harmless: nothing of its memory reached a host without a grant, and it was not destroyed"
    else:
        preset = sim.vms[target].transfer_rate_bytes_per_s or 0.0
        rate = leaked / max(float(sim.env.now) - run.start_s, 1e-9)
        if rate > 0 and preset > 0:
            detail += f"; it leaked {rate / 1e6:.1f} MB/s on average, {rate / preset:.0%} of its preset rate"
    return AttackResult(
        run.name,
        "detection",
        first is not None or harmless,
        first.rule if first else ("harmless" if harmless else "—"),
        (first.t_s - run.start_s) if first else None,
        int(leaked // PAGE),
        fate,
        detail,
        windows,
        0,
        checks,
    )


def run_attack(name: str, rules: RuleSet | None = None, audit: AuditSink | None = None) -> AttackResult:
    """Run one attack (or benign scenario) by name."""
    return run_attack_full(name, rules, audit)[0]


def run_attack_full(
    name: str, rules: RuleSet | None = None, audit: AuditSink | None = None
) -> tuple[AttackResult, ScenarioRun | None]:
    """Run one attack by name; with its monitored simulation when it is a scenario."""
    rules = rules or RuleSet()
    if name in AUTH_ATTACKS:
        detail, fn = AUTH_ATTACKS[name]
        return _auth_attack(name, detail, fn), None
    files = scenario_files()
    if name not in files:
        raise ConfigError(f"unknown attack {name!r} (see `secmig attack list`)")
    run = run_scenario(files[name], rules, audit)
    return _score(run), run


def attack_names() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every attack and benign scenario."""
    out = [(n, "authentication", d) for n, (d, _) in AUTH_ATTACKS.items()]
    for n, p in scenario_files().items():
        doc = read_yaml(p)
        block = doc.get("attack", {}) if isinstance(doc, dict) else {}
        out.append((n, str(block.get("kind", "detection")), str(block.get("description", ""))))
    return out


def false_alarm_rate(results: list[AttackResult]) -> float:
    """VM-windows with a wrongful throttle, abort or destroy, over all VM-windows of the benign runs."""
    windows = sum(r.windows for r in results if r.kind == "benign")
    alarms = sum(r.false_alarms for r in results if r.kind == "benign")
    return alarms / windows if windows else math.nan


SLOW_EXFIL_SCENARIOS: tuple[str, ...] = ("low-rate-exfil", "slow-exfil-to-member")
"""The slow leaks whose rate :func:`slow_exfil_floor` lowers: to an outsider, and to a compromised member."""
FLOOR_RATES_MB_S: tuple[float, ...] = (50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1)
"""Exfiltration rates tried, fastest first (MB/s); the lowest is the finest floor the measure can show."""


@dataclass(frozen=True, slots=True)
class ExfilFloor:
    """The slowest exfiltration the monitor catches within a run, measured on the slow-leak scenarios."""

    floor_mb_s: float | None
    """The lowest rate tried at and above which every leak was caught (None: even the fastest escaped)."""
    lowest_tried_mb_s: float
    caught: dict[str, dict[float, bool]]
    """Per scenario, per rate (MB/s): caught or not."""

    @property
    def at_resolution(self) -> bool:
        """True when every rate tried was caught: the real floor is at or below the lowest one."""
        return self.floor_mb_s is not None and self.floor_mb_s <= self.lowest_tried_mb_s

    def describe(self) -> str:
        """One line for the attack summary."""
        if self.floor_mb_s is None:
            return f"slow exfiltration: not caught even at {max(FLOOR_RATES_MB_S):g} MB/s"
        bound = "≤ " if self.at_resolution else ""
        return (
            f"slow-exfiltration floor: {bound}{self.floor_mb_s:g} MB/s (every leak tried down to it caught within "
            f"its run, in {', '.join(self.caught)})"
        )


def slow_exfil_floor(
    rules: RuleSet | None = None,
    rates_mb_s: tuple[float, ...] = FLOOR_RATES_MB_S,
    scenarios: tuple[str, ...] = SLOW_EXFIL_SCENARIOS,
) -> ExfilFloor:
    """Rerun each slow-leak scenario with its leak at each rate (fastest first) and find the detection floor.

    "Caught" means the monitor acted on the leaking VM (a verdict other than continue) before the run
    ended. The floor is the lowest rate such that every rate tried at or above it was caught in every
    scenario; the walk down a scenario stops at its first escape.
    """
    rules = rules or RuleSet()
    files = scenario_files()
    caught: dict[str, dict[float, bool]] = {}
    lowest: list[float | None] = []
    for name in scenarios:
        doc = read_yaml(files[name])
        caught[name] = {}
        low: float | None = None
        for rate in sorted(rates_mb_s, reverse=True):
            run = run_scenario_doc(_with_exfil_rate(doc, rate * 1e6), name, files[name].parent, rules)
            target = run.target or ""
            hit = any(v.vm == target and v.action is not Action.CONTINUE for v in run.log.verdicts)
            caught[name][rate] = hit
            if not hit:
                break
            low = rate
        lowest.append(low)
    floor = None if any(x is None for x in lowest) else max(x for x in lowest if x is not None)
    return ExfilFloor(floor, min(rates_mb_s), caught)


def _with_exfil_rate(doc: Any, rate_bytes_per_s: float) -> Any:
    """The scenario with each of its ``kind: exfil`` flows at ``rate_bytes_per_s``."""
    out = dict(doc)
    traffic = []
    for t in doc.get("traffic", []):
        if isinstance(t, dict) and t.get("kind") == "exfil":
            t = {**t, "rate": f"{rate_bytes_per_s:.0f}B/s"}
        traffic.append(t)
    out["traffic"] = traffic
    return out


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """The scenario suite under one rate threshold."""

    medium: float
    high: float
    detected: float
    """Share of the detection attacks detected."""
    detected_by_rate: float
    """Share detected by the rate rule itself (the threshold under test)."""
    median_time_to_detect_s: float
    false_alarm_rate: float
    """Benign VM-windows with a wrongful action."""
    check_rate: float
    """Benign VM-windows that triggered an identity check (which passed): the cost of a low threshold."""


def sweep(mediums: list[float], high_over_medium: float = 1.6, base: RuleSet | None = None) -> list[SweepPoint]:
    """Detection and false alarms of the scenario suite as the rate thresholds move together."""
    base = base or RuleSet()
    names = [n for n, k, _ in attack_names() if k in ("detection", "benign")]
    points = []
    for m in mediums:
        rules = base.model_copy(
            update={"rate": base.rate.model_copy(update={"medium": m, "high": high_over_medium * m})}
        )
        results = [run_attack(n, rules) for n in names]
        det = [r for r in results if r.kind == "detection"]
        ben = [r for r in results if r.kind == "benign"]
        windows = sum(r.windows for r in ben) or 1
        ttds = [r.time_to_detect_s for r in det if r.time_to_detect_s is not None]
        points.append(
            SweepPoint(
                m,
                high_over_medium * m,
                sum(r.stopped for r in det) / max(len(det), 1),
                sum(r.rule == "rate" for r in det) / max(len(det), 1),
                statistics.median(ttds) if ttds else math.nan,
                sum(r.false_alarms for r in ben) / windows,
                sum(r.identity_checks for r in ben) / windows,
            )
        )
    return points


__all__ = [
    "AUTH_ATTACKS",
    "FLOOR_RATES_MB_S",
    "SLOW_EXFIL_SCENARIOS",
    "AttackResult",
    "ExfilFloor",
    "ScenarioRun",
    "SweepPoint",
    "attack_names",
    "bytes_unauthorized",
    "false_alarm_rate",
    "run_attack",
    "run_attack_full",
    "run_scenario",
    "run_scenario_doc",
    "scenario_files",
    "slow_exfil_floor",
    "sweep",
]
