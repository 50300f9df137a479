"""The gate inside the simulator: every operation opens the real migration protocol, in memory, first.

Before a single page of a scheduled operation (migrate, copy, move, clone, template) crosses the
simulated network, :class:`SimGate` runs the security core's sans-IO
:class:`~secmig.security.protocol.MigrationConnection` handshake between the source host's and the
destination host's real identities over :class:`~secmig.security.loopback.ConnectionPair`: TLS 1.3 with
mutual authentication, Vsignatures and proofs, then the destination's :class:`GrantAuthorizer` (binding,
grant, nonce), checked at the *simulated* instant. Not a model calibrated on it: the same code, the same
accept/refuse decision, and the bytes and flights it really put on the wire (the engine sends those
bytes over the path and waits one path latency per flight). A refused operation therefore moves zero
page bytes in the simulator, exactly as over TCP. Only the handshake runs for real; once AUTHORIZED, the
pages follow the fluid network model (running them through TLS for gigabytes would measure the host
CPU, not the network).

Hosts in the scenario's ``attack.outside`` belong to a second cluster (a real CA the first does not
trust): they are reachable on the network, but hold no Vsignature of this one. Grants are issued by the
cluster's authority as the scenario says: ``valid``; ``none``; ``forged`` (a valid grant whose expiry
was pushed back after signing, its signature kept); ``replayed`` (its single-use nonce already consumed
by the session it was recorded from); ``stale`` (expired a minute before the operation starts).

Must not read the scenario's intent beyond the grants and the outside hosts, and must not read the wall
clock during a run (signatures are checked at :meth:`SimSecurity.at` of the simulated time).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from secmig.errors import LocalProtocolError, RemoteProtocolError, SecurityError
from secmig.monitor.rules import RuleSet, with_overrides
from secmig.security.audit import AuditSink, MemoryAuditSink
from secmig.security.cluster import ClusterTrust, HostIdentity
from secmig.security.events import Aborted, Authorized, MigrationRequest, Role
from secmig.security.grants import Grant, MemoryNonceStore
from secmig.security.location import MemoryBindingRegistry
from secmig.security.loopback import ConnectionPair
from secmig.security.policy import Operation
from secmig.security.protocol import MigrationConnection
from secmig.sim.engine import GateDecision, MigrationSpec, RunResult, Simulation, SimulationSpec
from secmig.sim.monitoring import MonitorLog, SimSecurity, attach_monitor, new_cluster

PAGE = 4096
STALE_BY_S = 60.0
"""A stale grant expired this long before its operation starts."""


def build_security(spec: SimulationSpec, root: Path, epoch_s: float | None = None) -> SimSecurity:
    """A real cluster for the scenario in ``root``: every host a member except ``attack.outside`` (who
    join a second, untrusted cluster) and a location binding per VM. Grants are not issued here: the
    gate asks for each when its operation starts (:func:`issue_grant_for`), from the VM's binding then."""
    epoch = time.time() if epoch_s is None else epoch_s
    outside = set(spec.attack.outside) if spec.attack is not None else set()
    hosts = [h.name for h in spec.infra.hosts]
    cluster = new_cluster(root / "cluster", [h for h in hosts if h not in outside])
    rogue = new_cluster(root / "outside", sorted(outside)) if outside else None
    security = SimSecurity(cluster, epoch_s=epoch)
    security.outside_cluster = rogue
    for vm in spec.vms:
        security.bindings[vm.name] = cluster.issue_binding(vm.name, vm.mac, vm.host, 0, now=epoch)
    return security


def issue_grant_for(
    security: SimSecurity, spec: MigrationSpec, source: str, now_s: float, ram_bytes: int
) -> Grant | None:
    """The grant ``spec`` presents when it starts at simulated ``now_s`` from ``source`` (None for ``grant:
    none``), issued by the cluster's authority from the VM's *current* binding, as an operator asks for a
    grant when the operation begins: a VM moved once is granted its next move from where it now is.

    ``forged``: a valid grant whose expiry was pushed back after signing; ``replayed``: its nonce is
    recorded as spent (a session already used it); ``stale``: expired :data:`STALE_BY_S` before ``now_s``.
    The grant is kept in ``security.grants`` under (vm, source, destination) for the monitor and the lab.
    """
    if spec.grant == "none":
        return None
    at = security.at(now_s)
    stale = spec.grant == "stale"
    grant = security.cluster.issue_grant(
        Operation(spec.operation),
        spec.vm,
        source,
        spec.destination,
        current_binding=security.bindings[spec.vm],
        ttl_s=STALE_BY_S if stale else 3600.0,
        now=at - 2 * STALE_BY_S if stale else at,
        memory_bytes=max(ram_bytes, PAGE),
    )
    if spec.grant == "forged":
        grant = replace(grant, expires_at=grant.expires_at + 86_400)  # signed before the edit
    if spec.grant == "replayed":
        security.spent.append(grant)
    security.grants[(spec.vm, source, spec.destination)] = grant
    return grant


class SimGate:
    """The engine's :data:`~secmig.sim.engine.Gate`: the real handshake for each operation, at sim time."""

    def __init__(self, sim: Simulation, security: SimSecurity, audit: AuditSink | None = None) -> None:
        self.sim = sim
        self.security = security
        self.audit = audit or MemoryAuditSink("gate")
        self.nonces = MemoryNonceStore()
        self.registry = MemoryBindingRegistry()
        self._members = {m.host_id for m in security.cluster.members()}
        self._ends: dict[str, tuple[HostIdentity, ClusterTrust]] = {}
        self.decisions: list[tuple[str, str, GateDecision]] = []

    def _end(self, host: str) -> tuple[HostIdentity, ClusterTrust]:
        """A host's real identity and the trust it holds (read once per run)."""
        if host not in self._ends:
            cluster = self.security.cluster
            if host not in self._members and self.security.outside_cluster is not None:
                cluster = self.security.outside_cluster
            self._ends[host] = (cluster.host_identity(host), cluster.trust())
        return self._ends[host]

    def __call__(self, spec: MigrationSpec, source: str, now_s: float) -> GateDecision:
        """Run the handshake for ``spec`` from ``source`` at simulated ``now_s``; refuse or admit it."""
        vm = self.sim.vms[spec.vm]
        grant = issue_grant_for(self.security, spec, source, now_s, vm.ram_bytes)
        if grant is not None and spec.grant == "replayed":
            # The recorded session already used this grant: its nonce is spent at the destination.
            self.nonces.consume(grant.nonce, grant.expires_at, self.security.at(now_s))
        request = MigrationRequest(
            Operation(spec.operation),
            spec.vm,
            PAGE,
            max(math.ceil(vm.ram_bytes / PAGE), 1),
            grant,
            self.security.bindings.get(spec.vm),
        )
        at = self.security.at(now_s)
        src_id, src_trust = self._end(source)
        dst_id, dst_trust = self._end(spec.destination)
        flights: list[Role] = []

        def count(role: Role, data: bytes) -> bytes:
            if not flights or flights[-1] is not role:
                flights.append(role)
            return data

        src_conn = MigrationConnection.source(src_id, src_trust, request, audit=self.audit, clock=lambda: at)
        dst_conn = MigrationConnection.destination(
            dst_id, dst_trust, nonces=self.nonces, bindings=self.registry, audit=self.audit, clock=lambda: at
        )
        pair = ConnectionPair(src_conn, dst_conn, tamper=count)
        try:
            pair.pump()
            reason = ""
        except (RemoteProtocolError, LocalProtocolError, SecurityError) as err:
            # A TLS failure (a peer outside the cluster's CA) ends the connection: nothing is authorized.
            reason = f"{type(err).__name__}: {err}"
        accepted = any(isinstance(e, Authorized) for e in pair.events[Role.SOURCE]) and not reason
        aborted = [e for e in pair.events[Role.SOURCE] + pair.events[Role.DESTINATION] if isinstance(e, Aborted)]
        if aborted:
            accepted, reason = False, aborted[0].reason
        if not accepted and not reason:
            reason = f"handshake ended in {src_conn.state.name} / {dst_conn.state.name}"
        nbytes = pair.bytes_sent(Role.SOURCE) + pair.bytes_sent(Role.DESTINATION)
        decision = GateDecision(accepted, reason if not accepted else "authorized", nbytes, max(len(flights), 1))
        self.decisions.append((spec.vm, spec.operation, decision))
        return decision


@dataclass
class SecureRun:
    """A simulation run behind the gate with the monitor attached."""

    sim: Simulation
    gate: SimGate
    log: MonitorLog
    security: SimSecurity
    rules: RuleSet
    result: RunResult


def run_secure(spec: SimulationSpec, rules: RuleSet, audit: AuditSink | None = None) -> SecureRun:
    """Run ``spec`` with its real cluster, the gate before every operation and the monitor (``rules``
    with the scenario's ``monitor:`` overrides laid over them). The rules' ``downtime.threshold`` becomes
    the abort limit of every stop policy that has one (the ``paper`` preset's): one threshold for both."""
    rules = with_overrides(rules, spec.monitor_rules, f"{spec.name}: monitor")
    # One downtime threshold (the paper's eq. 3): the rule's value is also each policy's abort limit.
    threshold = rules.downtime.threshold
    spec = replace(
        spec, migrations=tuple(replace(m, policy=m.policy.with_downtime_threshold(threshold)) for m in spec.migrations)
    )
    with tempfile.TemporaryDirectory() as tmp:
        security = build_security(spec, Path(tmp))
        sim = Simulation(spec)
        gate = SimGate(sim, security, audit)
        sim.gate = gate
        log = attach_monitor(sim, rules, security, audit=audit, until_s=spec.until_s)
        result = sim.run()
    return SecureRun(sim, gate, log, security, rules, result)
