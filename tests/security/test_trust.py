"""Monotonic, signed trust material (issue 12, point 3): revocation lists and the policy never roll back,
the policy is signed by the authority, and an audit head is bound to its owner's own, unrevoked key."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import AuthenticationError
from secmig.security import (
    Cluster,
    MemoryAuditSink,
    MemoryBindingRegistry,
    MemoryNonceStore,
    MigrationConnection,
    MigrationRequest,
    Operation,
)
from secmig.security.audit import AuditLog, _head_payload, _row_hash, verify_audit_log
from secmig.security.encoding import sign_document
from secmig.security.events import AbortCode, Aborted
from secmig.security.keys import generate_key, raw_public_key
from secmig.security.loopback import ConnectionPair
from secmig.security.policy import OperatorRule
from secmig.security.store import SqliteHostState

VM_MAC = "52:54:00:00:00:01"


@pytest.fixture
def fresh(tmp_path: Path) -> Cluster:
    """A cluster of its own (these tests revoke and re-sign): hv-a, hv-b and hv-x."""
    cluster = Cluster.create(tmp_path / "c", name="trust")
    for host in ("hv-a", "hv-b", "hv-x"):
        cluster.join(host)
    return cluster


def _handshake(cluster: Cluster, host_view: Cluster, source: str, grant_issuer: str = "authority") -> Aborted | None:
    """A migration from ``source`` to hv-b, whose trust material is ``host_view``'s; the destination's outcome."""
    binding = cluster.issue_binding("vm-1", VM_MAC, source, issuer=grant_issuer)
    grant = cluster.issue_grant(Operation.MIGRATE, "vm-1", source, "hv-b", current_binding=binding, issuer=grant_issuer)
    request = MigrationRequest(Operation.MIGRATE, "vm-1", 4096, 4, grant, binding)
    src = MigrationConnection.source(cluster.host_identity(source), cluster.trust, request, audit=MemoryAuditSink())
    dst = MigrationConnection.destination(
        cluster.host_identity("hv-b"),
        host_view.trust,
        nonces=MemoryNonceStore(),
        bindings=MemoryBindingRegistry(),
        audit=MemoryAuditSink(),
    )
    pair = ConnectionPair(src, dst)
    pair.pump()
    aborted = [e for e in pair.events[pair.destination.role] if isinstance(e, Aborted)]
    return aborted[0] if aborted else None


def test_older_revocation_list_refused_after_newer_seen(fresh: Cluster, tmp_path: Path) -> None:
    """Putting back the signed list from before hv-x's revocation does not let hv-x migrate to hv-b."""
    old = (fresh.root / "revocations.json").read_bytes()
    floor = SqliteHostState(tmp_path / "state.db")
    host_view = Cluster(fresh.root, floor=floor)
    assert _handshake(fresh, host_view, "hv-x") is None  # a member before its revocation
    fresh.revoke("hv-x", "compromised")
    assert host_view.revocations().number == 1  # hv-b has now seen list #1
    (fresh.root / "revocations.json").write_bytes(old)  # the attacker restores list #0 (validly signed)
    assert host_view.revocations().number == 1 and host_view.revocations().is_revoked("hv-x")
    refused = _handshake(fresh, host_view, "hv-x")
    assert refused is not None and refused.code is AbortCode.AUTHENTICATION
    floor.close()
    # The floor is on disk: a restarted host still refuses the old list.
    restarted = Cluster(fresh.root, floor=SqliteHostState(tmp_path / "state.db"))
    assert restarted.revocations().is_revoked("hv-x")


def test_policy_tamper_refused(fresh: Cluster) -> None:
    """Adding one's own operator key to policy.yaml without the authority key is refused when loaded."""
    fresh.add_operator("ops", [Operation.MIGRATE])
    signed = fresh.policy()
    mine = generate_key()
    tampered = signed.with_operator(OperatorRule("mallory", raw_public_key(mine), frozenset(Operation)))
    text = (fresh.root / "policy.yaml").read_text()
    signature_line = next(line for line in text.splitlines() if line.startswith("signature:"))
    (fresh.root / "policy.yaml").write_text(tampered.to_yaml(fresh.cluster_id) + signature_line + "\n")
    with pytest.raises(AuthenticationError, match="does not verify"):
        fresh.policy()
    (fresh.root / "policy.yaml").write_text(tampered.to_yaml(fresh.cluster_id))
    with pytest.raises(AuthenticationError, match="not signed"):
        fresh.policy()


def test_policy_rollback_refused(fresh: Cluster, tmp_path: Path) -> None:
    """A host that saw policy #2 keeps it when the signed policy #1 is put back."""
    fresh.add_operator("ops", [Operation.MIGRATE])
    older = (fresh.root / "policy.yaml").read_text()
    host_view = Cluster(fresh.root, floor=SqliteHostState(tmp_path / "state.db"))
    assert host_view.policy().serial == 1
    fresh.add_operator("ops2", [Operation.COPY])
    assert host_view.policy().serial == 2
    (fresh.root / "policy.yaml").write_text(older)
    assert host_view.policy().serial == 2 and host_view.policy().operator("ops2") is not None


def test_operator_command_signs_policy_and_grants_work(fresh: Cluster, tmp_path: Path) -> None:
    """`secmig cluster operator` writes a signed policy; a grant from that operator is then accepted."""
    assert main(["cluster", "operator", "ops", "--op", "migrate", "-c", str(fresh.root)]) == 0
    assert "signature:" in (fresh.root / "policy.yaml").read_text()
    host_view = Cluster(fresh.root, floor=SqliteHostState(tmp_path / "state.db"))
    assert _handshake(fresh, host_view, "hv-a", grant_issuer="ops") is None


def test_sign_policy_command_signs_a_legacy_file(fresh: Cluster) -> None:
    """An unsigned policy file is refused until `secmig cluster sign-policy` signs it."""
    legacy = fresh.policy().with_operator(OperatorRule("ops", raw_public_key(generate_key()), frozenset(Operation)))
    (fresh.root / "policy.yaml").write_text(legacy.to_yaml())
    with pytest.raises(AuthenticationError):
        fresh.policy()
    assert main(["cluster", "sign-policy", "-c", str(fresh.root)]) == 0
    assert fresh.policy().operator("ops") is not None


def _host_log(cluster: Cluster, host: str, path: Path) -> None:
    with AuditLog(path, cluster.host_identity(host).key, actor=host) as log:
        for i in range(3):
            log.record("grant.used", "allow", f"vm-{i}", {"i": i})  # type: ignore[arg-type]


def _resign_head(path: Path, key: object, owner: str | None = None) -> None:
    conn = sqlite3.connect(path)
    log_id, seq, head_hash, old_owner = conn.execute("SELECT log_id, seq, hash, owner FROM audit_head").fetchone()
    owner = old_owner if owner is None else owner
    sig = sign_document(key, "audit-head", _head_payload(bytes(log_id), seq, bytes(head_hash), owner))  # type: ignore[arg-type]
    conn.execute(
        "UPDATE audit_head SET signer = ?, signature = ?, owner = ?",
        (raw_public_key(key), sig, owner),  # type: ignore[arg-type]
    )
    conn.commit()
    conn.close()


def _rewrite_rows_as(path: Path, actor: str) -> None:
    """Rebuild the whole chain as if ``actor`` had written every row (what a thief with the file can do)."""
    conn = sqlite3.connect(path)
    (log_id,) = conn.execute("SELECT log_id FROM audit_head").fetchone()
    prev = bytes(log_id)
    rows = conn.execute("SELECT seq, ts_us, event, decision, subject, detail FROM audit ORDER BY seq").fetchall()
    for seq, ts_us, event, decision, subject, detail in rows:
        h = _row_hash(prev, seq, ts_us, event, decision, actor, subject, detail)
        conn.execute("UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", (actor, prev, h, seq))
        prev = h
    conn.execute("UPDATE audit_head SET hash = ?", (prev,))
    conn.commit()
    conn.close()


def _cli_verify(cluster: Cluster, path: Path, *extra: str) -> int:
    return main(["audit", "verify", "--db", str(path), "-c", str(cluster.root), *extra])


def test_audit_head_resigned_by_another_member_fails(fresh: Cluster, tmp_path: Path) -> None:
    """hv-a's log with its head re-signed by member hv-b's key fails `audit verify`, even rebuilt as hv-b's."""
    path = tmp_path / "hv-a.db"
    _host_log(fresh, "hv-a", path)
    assert _cli_verify(fresh, path) == 0
    assert verify_audit_log(path, owner=fresh.audit_owner("hv-a")).ok
    other = fresh.host_identity("hv-b").key
    _resign_head(path, other)
    assert _cli_verify(fresh, path) != 0
    assert not verify_audit_log(path, owner=fresh.audit_owner("hv-a")).ok
    # Rebuilt wholesale as hv-b's own log: consistent, but not hv-a's log, which is what was asked for.
    _rewrite_rows_as(path, "hv-b")
    _resign_head(path, other, owner="hv-b")
    assert _cli_verify(fresh, path, "--owner", "hv-a") != 0


def test_audit_head_of_revoked_host_fails(fresh: Cluster, tmp_path: Path) -> None:
    """A log signed by hv-x verifies until hv-x is revoked, then no longer does."""
    path = tmp_path / "hv-x.db"
    _host_log(fresh, "hv-x", path)
    assert _cli_verify(fresh, path) == 0
    fresh.revoke("hv-x", "compromised")
    assert _cli_verify(fresh, path) != 0
    report = verify_audit_log(path, owner=fresh.audit_owner("hv-x"))
    assert any("revoked" in p for p in report.problems)


def test_legacy_audit_head_is_bound_on_open(fresh: Cluster, tmp_path: Path) -> None:
    """A head written before owners were bound is re-signed with its owner by the owner's next open."""
    path = tmp_path / "legacy.db"
    _host_log(fresh, "hv-a", path)
    key = fresh.host_identity("hv-a").key
    conn = sqlite3.connect(path)
    log_id, seq, head_hash = conn.execute("SELECT log_id, seq, hash FROM audit_head").fetchone()
    sig = sign_document(key, "audit-head", _head_payload(bytes(log_id), seq, bytes(head_hash)))
    conn.execute("UPDATE audit_head SET signature = ?, owner = ''", (sig,))
    conn.commit()
    conn.close()
    assert not verify_audit_log(path, owner=fresh.audit_owner("hv-a")).ok
    AuditLog(path, key, actor="hv-a").close()
    assert verify_audit_log(path, owner=fresh.audit_owner("hv-a")).ok


def test_host_copy_of_cluster_folder(fresh: Cluster, tmp_path: Path) -> None:
    """A host's copy of the public trust material (no authority key) loads its signed policy and list."""
    copy = tmp_path / "host-copy"
    copy.mkdir()
    for name in ("cluster.json", "ca.pem", "revocations.json", "policy.yaml"):
        shutil.copy(fresh.root / name, copy / name)
    shutil.copytree(fresh.root / "hosts" / "hv-b", copy / "hosts" / "hv-b")
    view = Cluster(copy, floor=SqliteHostState(tmp_path / "s.db"))
    assert view.trust().policy.serial == fresh.policy().serial
