"""Bounds (issue 12, point 5): the VM size is in the signed grant, ids have one strict format, and a peer's
bytes can make neither an allocation proportional to a claim nor an unrecordable refusal."""

from __future__ import annotations

import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from security_helpers import PAGE, VM, Setup

from secmig.errors import DocumentFormatError, RemoteProtocolError
from secmig.security import MemoryAuditSink, MigrationConnection, MigrationRequest, Operation
from secmig.security.audit import AuditLog, read_records
from secmig.security.credentials import is_valid_id
from secmig.security.events import AbortCode, Aborted, Role
from secmig.security.grants import Grant
from secmig.security.keys import generate_key
from secmig.security.loopback import ConnectionPair


def _claiming(setup: Setup, page_count: int, memory_bytes: int) -> tuple[ConnectionPair, Aborted | None]:
    grant = setup.grant(memory_bytes=memory_bytes)
    request = MigrationRequest(Operation.MIGRATE, VM, PAGE, page_count, grant, setup.binding())
    source = MigrationConnection.source(
        setup.cluster.host_identity("hv-a"), setup.cluster.trust, request, audit=MemoryAuditSink()
    )
    destination = MigrationConnection.destination(
        setup.cluster.host_identity("hv-b"),
        setup.cluster.trust,
        nonces=setup.nonces,
        bindings=setup.bindings,
        audit=setup.destination_audit,
    )
    pair = ConnectionPair(source, destination)
    pair.pump()
    aborted = [e for e in pair.events[Role.DESTINATION] if isinstance(e, Aborted)]
    return pair, aborted[0] if aborted else None


@pytest.mark.parametrize("page_count", [2**40, 2**25])
def test_handshake_claiming_more_than_the_grant_is_refused(setup: Setup, page_count: int) -> None:
    """A grant for 64 pages and a hello claiming 2^40 (or 2^25) pages: refused, nothing allocated for it."""
    tracemalloc.start()
    try:
        pair, refused = _claiming(setup, page_count, memory_bytes=64 * PAGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused is not None and refused.code is AbortCode.AUTHORIZATION
    assert "claimed" in refused.reason
    assert pair.destination.authorized is None
    assert peak < 16 * 1024 * 1024  # 2^25 pages would be a 1 GiB digest table
    assert any(r.event == "grant.refused" for r in setup.destination_audit.records)


def test_handshake_within_the_grant_is_authorized(setup: Setup) -> None:
    """The same grant with a claim equal to its size is authorized (the bound is not off by one)."""
    pair, refused = _claiming(setup, 64, memory_bytes=64 * PAGE)
    assert refused is None and pair.destination.authorized is not None


def test_grant_size_is_signed(setup: Setup) -> None:
    """Raising a grant's memory_bytes after signing breaks its signature."""
    grant = setup.grant(memory_bytes=64 * PAGE)
    doc = grant.to_json()
    doc["payload"]["memory_bytes"] = 2**40
    forged = Grant.from_json(doc)
    assert not forged.verify(setup.cluster.authority_public)


def test_surrogate_vm_id_is_a_protocol_error_and_audited(setup: Setup, tmp_path: Path) -> None:
    """A VM id with a lone surrogate: RemoteProtocolError from next_event, with the refusal in the SQLite log."""
    audit = AuditLog(tmp_path / "audit.db", generate_key(), actor="hv-b")
    request = MigrationRequest(Operation.MIGRATE, "vm-\udc80", PAGE, 4, setup.grant(), setup.binding())
    source = MigrationConnection.source(
        setup.cluster.host_identity("hv-a"), setup.cluster.trust, request, audit=MemoryAuditSink()
    )
    destination = MigrationConnection.destination(
        setup.cluster.host_identity("hv-b"),
        setup.cluster.trust,
        nonces=setup.nonces,
        bindings=setup.bindings,
        audit=audit,
    )
    with pytest.raises(RemoteProtocolError, match="vm_id"):
        ConnectionPair(source, destination).pump()
    audit.close()
    assert [r.event for r in read_records(tmp_path / "audit.db")] == ["protocol.error"]


def test_audit_log_records_text_that_does_not_encode(tmp_path: Path) -> None:
    """A subject with a lone surrogate is stored escaped instead of raising UnicodeEncodeError."""
    with AuditLog(tmp_path / "audit.db", generate_key(), actor="hv-b") as log:
        log.record("protocol.error", "refuse", "vm-\udc80", {"reason": "x"})  # type: ignore[arg-type]
    conn = sqlite3.connect(tmp_path / "audit.db")
    (subject,) = conn.execute("SELECT subject FROM audit").fetchone()
    conn.close()
    assert subject == "vm-\\udc80"


@pytest.mark.parametrize("bad", ["vm-1\n", "vm\udc80", "", "-vm", "a" * 64, "vm 1", "vm/1", "ｖｍ"])
def test_ids_have_one_strict_format(setup: Setup, bad: str) -> None:
    """Ids with a trailing newline, surrogate, space, slash, non-ASCII or bad length are refused in grants."""
    assert not is_valid_id(bad)
    doc = setup.grant().to_json()
    doc["payload"]["vm_id"] = bad
    with pytest.raises(DocumentFormatError):
        Grant.from_json(doc)
