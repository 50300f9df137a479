"""The hash-chained audit log: intact logs verify; edited, inserted and deleted rows (even the last) do not."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from secmig.cli import main
from secmig.security import Cluster
from secmig.security.audit import AuditLog, _row_hash, verify_audit_log
from secmig.security.keys import generate_key


@pytest.fixture
def log_path(tmp_path: Path) -> tuple[Path, object]:
    """A log with five rows, and the public key that signed its head."""
    key = generate_key()
    path = tmp_path / "audit.db"
    with AuditLog(path, key, actor="hv-a") as log:
        for i in range(5):
            log.record("grant.used", "allow", f"vm-{i}", {"i": i})
    return path, key.public_key()


def _sql(path: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def test_intact_log_verifies(log_path: tuple[Path, object]) -> None:
    """Five appended rows verify against the signer's key."""
    path, pub = log_path
    report = verify_audit_log(path, [pub])  # type: ignore[list-item]
    assert report.ok and report.rows == 5


def test_edited_row_detected(log_path: tuple[Path, object]) -> None:
    """Changing a row's decision breaks its hash."""
    path, _ = log_path
    _sql(path, "UPDATE audit SET decision = 'refuse' WHERE seq = 3")
    report = verify_audit_log(path)
    assert not report.ok and any("row 3" in p for p in report.problems)


def test_deleted_middle_row_detected(log_path: tuple[Path, object]) -> None:
    """Deleting a row in the middle leaves a gap and a broken link."""
    path, _ = log_path
    _sql(path, "DELETE FROM audit WHERE seq = 2")
    assert not verify_audit_log(path).ok


def test_deleted_last_row_detected(log_path: tuple[Path, object]) -> None:
    """Cutting off the newest row is caught by the signed head, which the chain alone could not do."""
    path, _ = log_path
    _sql(path, "DELETE FROM audit WHERE seq = 5")
    report = verify_audit_log(path)
    assert not report.ok and any("head" in p for p in report.problems)


def test_inserted_row_with_valid_chain_detected(log_path: tuple[Path, object]) -> None:
    """An appended row with a correctly computed chain hash is still caught: the attacker cannot re-sign the head."""
    path, _ = log_path
    conn = sqlite3.connect(path)
    prev = conn.execute("SELECT hash FROM audit WHERE seq = 5").fetchone()[0]
    row = (6, 1, "grant.used", "allow", "hv-a", "vm-x", "{}")
    conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, prev, _row_hash(prev, *row)))
    conn.commit()
    conn.close()
    assert not verify_audit_log(path).ok


def test_inserted_middle_row_detected(log_path: tuple[Path, object]) -> None:
    """Shifting rows up to insert one in the middle breaks the chain."""
    path, _ = log_path
    _sql(path, "UPDATE audit SET seq = seq + 10 WHERE seq >= 3")
    _sql(path, "INSERT INTO audit VALUES (3, 1, 'x', 'allow', 'a', 's', '{}', ?, ?)", b"\0" * 32, b"\0" * 32)
    assert not verify_audit_log(path).ok


def test_head_resigned_with_foreign_key_detected(log_path: tuple[Path, object]) -> None:
    """A log whose head an attacker re-signed with their own key fails against the trusted key."""
    path, pub = log_path
    _sql(path, "DELETE FROM audit WHERE seq = 5")
    _sql(path, "DELETE FROM audit_head")
    forger = generate_key()
    with AuditLog(path, forger, actor="evil"):
        pass
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM audit_head")
    conn.commit()
    conn.close()
    assert not verify_audit_log(path, [pub]).ok  # type: ignore[list-item]


def test_cli_audit_verify_fails_after_edit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`secmig audit verify` exits 0 on the cluster log, then 1 with one line after a row is edited."""
    root = tmp_path / "c"
    assert main(["cluster", "init", str(root)]) == 0
    assert main(["cluster", "join", "hv-a", "--mac", "52:54:00:00:00:01", "-c", str(root)]) == 0
    assert main(["audit", "verify", "-c", str(root)]) == 0
    _sql(root / "audit.db", "UPDATE audit SET subject = 'hv-z' WHERE seq = 2")
    capsys.readouterr()
    assert main(["audit", "verify", "-c", str(root)]) == 1
    err = capsys.readouterr().err
    assert "row 2" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_cli_audit_verify_fails_after_delete(tmp_path: Path) -> None:
    """`secmig audit verify --db` fails once the newest row is deleted."""
    root = tmp_path / "c"
    assert main(["cluster", "init", str(root)]) == 0
    assert main(["cluster", "join", "hv-a", "-c", str(root)]) == 0
    _sql(root / "audit.db", "DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    assert main(["audit", "verify", "--db", str(root / "audit.db"), "-c", str(root)]) == 1


def test_row_hash_is_sha256_over_previous(log_path: tuple[Path, object]) -> None:
    """Each stored hash is SHA-256 and chains: row n's prev_hash is row n-1's hash."""
    path, _ = log_path
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT prev_hash, hash FROM audit ORDER BY seq").fetchall()
    conn.close()
    assert all(len(h) == hashlib.sha256().digest_size for _, h in rows)
    assert all(rows[i][0] == rows[i - 1][1] for i in range(1, len(rows)))


def test_cluster_log_records_security_decisions(tmp_path: Path) -> None:
    """init, join, revoke and grant issuance are all in the authority's log, which verifies."""
    from secmig.security import Operation

    c = Cluster.create(tmp_path / "c")
    c.join("hv-a")
    c.join("hv-b")
    c.issue_grant(Operation.CLONE, "vm-1", "hv-a", "hv-b")
    c.revoke("hv-b")
    from secmig.security.audit import read_records

    events = [r.event for r in read_records(tmp_path / "c" / "audit.db")]
    assert events == ["cluster.init", "join", "join", "grant.issued", "revoke"]
    assert verify_audit_log(tmp_path / "c" / "audit.db", [c.authority_public]).ok
