"""Attacks on trust material and bounds (issue 12, points 3 and 5), for ``secmig attack run``.

Each is an authentication attack in the shape of :data:`secmig.lab.attacks.AUTH_ATTACKS`: given the lab
(its destination's audit), a real cluster with ``hv-a``, ``hv-b`` and the revoked ``hv-revoked``, and a
scratch folder, it returns (pages or units that reached the attacker, what stopped it, how it was
measured). Zero means blocked. Nothing is assumed: each runs the real check it attacks.

- ``revocation-rollback``: the signed list from before a revocation is put back on the destination.
- ``policy-tamper``: an operator key of the attacker's own is added to ``policy.yaml``.
- ``audit-resign``: a host's audit log is re-signed with another member's key, then with a revoked key.
- ``oversized-handshake``: a valid grant for 64 pages, a hello claiming 2^40.
- ``surrogate-id``: a VM id with a lone surrogate in the hello.
- ``descriptor-exhaustion``: thousands of idle connections against the admission cap.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

from secmig.agent.admission import MAX_PENDING, Admission
from secmig.errors import SecmigError, SecurityError
from secmig.security.audit import AuditLog, Decision, MemoryAuditSink, _head_payload, verify_audit_log
from secmig.security.cluster import Cluster
from secmig.security.credentials import RevocationList
from secmig.security.encoding import sign_document
from secmig.security.events import Aborted, MigrationRequest, PageBatch, Role, RoundStart
from secmig.security.keys import generate_key, raw_public_key
from secmig.security.loopback import ConnectionPair
from secmig.security.policy import Operation, OperatorRule
from secmig.security.protocol import MigrationConnection
from secmig.security.store import SqliteHostState

PAGE = 4096
Outcome = tuple[int, str, str]


def _try_migration(lab: Any, cluster: Cluster, dst_view: Cluster, source: str, **grant_kw: Any) -> tuple[int, str]:
    """Run a handshake and one page from ``source`` to hv-b (whose trust is ``dst_view``); pages accepted."""
    vm_id = grant_kw.pop("vm_id", "vm-1")
    pages = grant_kw.pop("pages", 4)
    issuer = grant_kw.pop("issuer", "authority")
    binding = cluster.issue_binding("vm-1", "52:54:00:00:00:01", source, issuer=issuer)
    grant = cluster.issue_grant(
        Operation.MIGRATE, "vm-1", source, "hv-b", current_binding=binding, issuer=issuer, **grant_kw
    )
    request = MigrationRequest(Operation.MIGRATE, vm_id, PAGE, pages, grant, binding)
    src = MigrationConnection.source(cluster.host_identity(source), cluster.trust(), request, audit=MemoryAuditSink())
    dst = MigrationConnection.destination(
        cluster.host_identity("hv-b"), dst_view.trust, nonces=lab.nonces, bindings=lab.bindings, audit=lab.audit
    )
    pair = ConnectionPair(src, dst)
    try:
        pair.pump()
        if dst.authorized is not None:
            pair.send(Role.SOURCE, RoundStart(0))
            pair.send(Role.SOURCE, PageBatch(0, (0,), random.Random(1).randbytes(PAGE)))
            pair.pump()
    except SecmigError as err:
        return dst.page_bytes_received // PAGE, f"{type(err).__name__}: {err}"
    aborted = [e for e in pair.events[Role.DESTINATION] if isinstance(e, Aborted)]
    return dst.page_bytes_received // PAGE, aborted[0].reason if aborted else "accepted"


def revocation_rollback(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """hv-b has seen list #1 (hv-revoked revoked); the attacker restores a validly signed list #0."""
    floor = SqliteHostState(root / "hv-b-state.db")
    view = Cluster(cluster.root, floor=floor)
    view.revocations()  # hv-b accepts the current list (hv-revoked is on it)
    # Forge nothing: the authority's own list #0 (empty), exactly the document that was valid before.
    rl0 = RevocationList(cluster.cluster_id, 0, 0, ()).signed_by(cluster.authority_key())
    (cluster.root / "revocations.json").write_text(json.dumps(rl0.to_json()))
    pages, why = _try_migration(lab, cluster, view, "hv-revoked")
    floor.close()
    return pages, "revocation-list serial floor", f"measured: {pages} page(s) accepted from the revoked host ({why})"


def policy_tamper(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """The attacker adds its own operator key (may grant everything) to hv-b's policy.yaml."""
    mine = generate_key()
    rule = OperatorRule("mallory", raw_public_key(mine), frozenset(Operation))
    tampered = cluster.policy().with_operator(rule)
    path = cluster.root / "policy.yaml"
    signature = next((ln for ln in path.read_text().splitlines() if ln.startswith("signature:")), "")
    path.write_text(tampered.to_yaml(cluster.cluster_id) + signature + "\n")
    try:
        cluster.policy()
    except SecurityError as err:
        return 0, "policy signed by the authority", f"measured: policy refused on load ({err})"
    return 1, "nothing", "measured: the tampered policy loaded"


def audit_resign(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """hv-a's audit log, its head re-signed with member hv-b's key, then with the revoked host's key."""
    path = root / "hv-a-audit.db"
    with AuditLog(path, cluster.host_identity("hv-a").key, actor="hv-a") as log:
        log.record("vm.released", Decision.INFO, "vm-1", {"to": "hv-b"})
    verified = 0
    for forger in ("hv-b", "hv-revoked"):
        key = cluster.host_identity(forger).key
        conn = sqlite3.connect(path)
        log_id, seq, head_hash, owner = conn.execute("SELECT log_id, seq, hash, owner FROM audit_head").fetchone()
        sig = sign_document(key, "audit-head", _head_payload(bytes(log_id), seq, bytes(head_hash), owner))
        conn.execute("UPDATE audit_head SET signer = ?, signature = ?", (raw_public_key(key), sig))
        conn.commit()
        conn.close()
        verified += verify_audit_log(path, owner=cluster.audit_owner("hv-a")).ok
    return verified, "audit head bound to its owner's key", f"measured: {verified} of 2 re-signed logs verified"


def oversized_handshake(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """A valid grant for 64 pages and a hello claiming 2^40 pages (2^40 × 32 bytes of digest table)."""
    pages, why = _try_migration(lab, cluster, cluster, "hv-a", pages=2**40, memory_bytes=64 * PAGE)
    return pages, "VM size in the signed grant", f"measured: {pages} page(s) accepted ({why})"


def surrogate_id(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """A VM id with a lone surrogate: must be a protocol error, audited, not an UnicodeEncodeError."""
    audit = AuditLog(root / "dst-audit.db", cluster.host_identity("hv-b").key, actor="hv-b")
    lab.audit = audit
    try:
        pages, why = _try_migration(lab, cluster, cluster, "hv-a", vm_id="vm-\udc80")
    except UnicodeError as err:
        return 1, "nothing", f"measured: {type(err).__name__} escaped the connection"
    finally:
        audit.close()
        lab.audit = MemoryAuditSink("destination")
    return pages, "one strict id format", f"measured: {pages} page(s) accepted, refusal audited ({why})"


def descriptor_exhaustion(lab: Any, cluster: Cluster, root: Path) -> Outcome:
    """6,000 idle connections against the admission policy: how many descriptors they hold at the end."""
    held: list[int] = []
    adm = Admission(MemoryAuditSink(), audit_budget=10)
    for i in range(6000):
        adm.admit(f"10.0.0.{i % 250}", lambda: None)
        held.append(adm.pending)
    over = max(0, max(held) - MAX_PENDING)
    return (
        over,
        "admission cap and eviction",
        (
            f"measured: at most {max(held)} pending connections held (cap {MAX_PENDING}), "
            f"{adm.stats['evicted']} evicted, {adm.stats['audit_rows_held_back']} audit rows counted in a summary"
        ),
    )


TRUST_ATTACKS: dict[str, tuple[str, Any]] = {
    "revocation-rollback": ("an older signed revocation list is put back on the destination", revocation_rollback),
    "policy-tamper": ("the attacker adds its own operator key to policy.yaml", policy_tamper),
    "audit-resign": ("a host's audit log re-signed with another member's, then a revoked, key", audit_resign),
    "oversized-handshake": ("a handshake claims 2^40 pages under a 64-page grant", oversized_handshake),
    "surrogate-id": ("a VM id with a lone surrogate in the source hello", surrogate_id),
    "descriptor-exhaustion": ("6,000 idle connections against the listener", descriptor_exhaustion),
}
"""Registered in :data:`secmig.lab.attacks.AUTH_ATTACKS`."""
