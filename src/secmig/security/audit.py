"""The audit log: every security decision, appended to SQLite, each row chained by hash to the one before.

Row ``n`` stores ``hash_n = SHA-256(TAG || hash_{n-1} || canonical_json(row n))``; row 1 chains to the
log's random 32-byte id. That catches an edited row (its hash no longer matches), an inserted or deleted
row in the middle (a sequence gap or a broken ``prev_hash`` link). A hash chain alone cannot see the
*last* rows being cut off, so the log also keeps a **signed head**: the sequence number and hash of the
newest row, signed with the writer's Ed25519 key (the authority's for the cluster log, a host's for its
own) after every append. Truncating, or appending without the key, leaves a head that does not match or
does not verify. The head is **bound to the log's owner** (the ``actor`` that writes it: ``authority`` or a
host id): the owner's name is inside the signed head, and :func:`verify_audit_log` given an
:class:`AuditOwner` requires the head to be signed by that owner's own key, not revoked, and every row to
be written by that owner — so a log re-signed with another member's key, or with a revoked host's key,
does not verify. What this cannot catch is a wholesale rollback of the file to an older copy whose
head was validly signed then; that needs an external witness (e.g. shipping heads off-host), which is
outside this module.

The module writes only to the database it is given; :class:`MemoryAuditSink` keeps records in memory.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import AuditError
from secmig.security.encoding import canonical_json, sign_document, verify_document
from secmig.security.keys import fingerprint, public_key_from_raw, raw_public_key

_ROW_TAG = b"secmig-audit-row/v1\x00"
_HEAD_KIND = "audit-head"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY,
    ts_us     INTEGER NOT NULL,
    event     TEXT NOT NULL,
    decision  TEXT NOT NULL,
    actor     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    log_id    BLOB NOT NULL,
    seq       INTEGER NOT NULL,
    hash      BLOB NOT NULL,
    signer    BLOB NOT NULL,
    signature BLOB NOT NULL,
    owner     TEXT NOT NULL DEFAULT ''
);
"""

Detail = dict[str, str | int | float | bool | None]


class Decision(enum.StrEnum):
    """What a security decision was: the audit log's ``decision`` column."""

    ALLOW = "allow"
    REFUSE = "refuse"
    INFO = "info"
    """A fact worth keeping (an agent started, a VM released) that decided nothing."""
    CHALLENGE = "challenge"
    THROTTLE = "throttle"
    ABORT = "abort"
    DESTROY = "destroy"


class AuditSink(Protocol):
    """Where security decisions go."""

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        """Append one decision."""
        ...


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the log."""

    seq: int
    ts: float
    event: str
    decision: str
    actor: str
    subject: str
    detail: Detail = field(default_factory=dict)


class MemoryAuditSink:
    """Keeps records in a list: for the simulator and tests."""

    def __init__(self, actor: str = "memory") -> None:
        self.actor = actor
        self.records: list[AuditRecord] = []

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        """Append one decision."""
        self.records.append(
            AuditRecord(len(self.records) + 1, time.time(), event, decision, self.actor, subject, dict(detail or {}))
        )

    def events(self) -> list[str]:
        """``event:decision`` of every record, in order (handy in tests)."""
        return [f"{r.event}:{r.decision}" for r in self.records]


def _row_hash(
    prev: bytes, seq: int, ts_us: int, event: str, decision: str, actor: str, subject: str, detail: str
) -> bytes:
    body = canonical_json(
        {
            "seq": seq,
            "ts_us": ts_us,
            "event": event,
            "decision": decision,
            "actor": actor,
            "subject": subject,
            "detail": detail,
        }
    )
    return hashlib.sha256(_ROW_TAG + prev + body).digest()


def _head_payload(log_id: bytes, seq: int, head_hash: bytes, owner: str = "") -> dict[str, str | int]:
    payload: dict[str, str | int] = {"log_id": log_id.hex(), "seq": seq, "hash": head_hash.hex()}
    if owner:  # a head from before owners were bound has none (and verifies as "not bound")
        payload["owner"] = owner
    return payload


def _text(value: str) -> str:
    """``value`` as text SQLite can always store: a lone surrogate from a peer's bytes must not make a
    refusal unrecordable, so anything that does not encode is escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


@dataclass(frozen=True, slots=True)
class AuditOwner:
    """Who a log must belong to: the owner's name, the key its head must be signed by, whether it is revoked."""

    name: str
    key: Ed25519PublicKey = field(repr=False)
    revoked: bool = False


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:
        raise AuditError(f"{path}: cannot open audit log: {err}") from err
    return conn


class AuditLog:
    """An append-only, hash-chained audit log in SQLite whose head is signed by ``signer``."""

    def __init__(self, path: Path, signer: Ed25519PrivateKey, actor: str) -> None:
        self.path = path
        self.actor = actor
        self._signer = signer
        self._conn = _connect(path)
        try:
            with self._transaction():
                # executescript() would COMMIT our transaction; run the statements one by one instead.
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                columns = {row[1] for row in self._conn.execute("PRAGMA table_info(audit_head)")}
                if "owner" not in columns:  # a log created before heads named their owner
                    self._conn.execute("ALTER TABLE audit_head ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
                head = self._conn.execute(
                    "SELECT log_id, signer, seq, hash, signature, owner FROM audit_head WHERE id = 1"
                ).fetchone()
                if head is None:
                    log_id = os.urandom(32)
                    self._write_head(log_id, 0, log_id)
                elif bytes(head[1]) != raw_public_key(signer):
                    raise AuditError(f"{path}: audit log belongs to another key ({fingerprint(bytes(head[1]))})")
                elif not head[5] and verify_document(
                    signer.public_key(), _HEAD_KIND, _head_payload(bytes(head[0]), head[2], bytes(head[3])), head[4]
                ):
                    # Our own valid legacy head: bind it to its owner now (an invalid one stays, to be reported).
                    self._write_head(bytes(head[0]), int(head[2]), bytes(head[3]))
        except sqlite3.Error as err:
            raise AuditError(f"{path}: cannot initialise audit log: {err}") from err

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so two writers cannot both extend the same head.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _write_head(self, log_id: bytes, seq: int, head_hash: bytes) -> None:
        owner = _text(self.actor)
        signature = sign_document(self._signer, _HEAD_KIND, _head_payload(log_id, seq, head_hash, owner))
        self._conn.execute(
            "INSERT OR REPLACE INTO audit_head (id, log_id, seq, hash, signer, signature, owner)"
            " VALUES (1, ?, ?, ?, ?, ?, ?)",
            (log_id, seq, head_hash, raw_public_key(self._signer), signature, owner),
        )

    def record(self, event: str, decision: Decision, subject: str, detail: Detail | None = None) -> None:
        """Append one decision and re-sign the head, atomically."""
        detail_text = canonical_json(detail or {}).decode()
        event, subject, actor = _text(event), _text(subject), _text(self.actor)
        ts_us = time.time_ns() // 1000
        try:
            with self._transaction():
                log_id, seq, prev = self._conn.execute(
                    "SELECT log_id, seq, hash FROM audit_head WHERE id = 1"
                ).fetchone()
                seq += 1
                row_hash = _row_hash(bytes(prev), seq, ts_us, event, decision, actor, subject, detail_text)
                self._conn.execute(
                    "INSERT INTO audit (seq, ts_us, event, decision, actor, subject, detail, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts_us, event, decision, actor, subject, detail_text, bytes(prev), row_hash),
                )
                self._write_head(bytes(log_id), seq, row_hash)
        except sqlite3.Error as err:
            raise AuditError(f"{self.path}: cannot append to audit log: {err}") from err


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The result of verifying a log: ``problems`` is empty when the log is intact."""

    rows: int
    signer: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def read_records(path: Path) -> list[AuditRecord]:
    """Every row of a log, in order (no verification)."""
    import json

    if not path.exists():
        raise AuditError(f"{path}: no such audit log")
    conn = _connect(path)
    try:
        rows = conn.execute(
            "SELECT seq, ts_us, event, decision, actor, subject, detail FROM audit ORDER BY seq"
        ).fetchall()
    except sqlite3.Error as err:
        raise AuditError(f"{path}: cannot read audit log: {err}") from err
    finally:
        conn.close()
    out = []
    for seq, ts_us, event, decision, actor, subject, detail in rows:
        try:
            parsed = json.loads(detail)
        except ValueError:
            parsed = {"unparsed": str(detail)}
        out.append(
            AuditRecord(seq, ts_us / 1e6, event, decision, actor, subject, parsed if isinstance(parsed, dict) else {})
        )
    return out


def head_owner(path: Path) -> str:
    """The owner named in a log's head ('' for a legacy head); no verification."""
    if not path.exists():
        raise AuditError(f"{path}: no such audit log")
    conn = _connect(path)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(audit_head)")}
        row = conn.execute("SELECT owner FROM audit_head WHERE id = 1").fetchone() if "owner" in columns else None
    except sqlite3.Error as err:
        raise AuditError(f"{path}: not an audit log: {err}") from err
    finally:
        conn.close()
    return "" if row is None else str(row[0])


def verify_audit_log(
    path: Path, trusted_keys: Iterable[Ed25519PublicKey] | None = None, *, owner: AuditOwner | None = None
) -> AuditReport:
    """Check the chain and the signed head; with ``trusted_keys``, also that the head's signer is one of them;
    with ``owner``, that the head is bound to that owner, signed by the owner's own (unrevoked) key, and
    that every row was written by the owner."""
    if not path.exists():
        raise AuditError(f"{path}: no such audit log")
    conn = _connect(path)
    problems: list[str] = []
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(audit_head)")}
        owner_col = "owner" if "owner" in columns else "''"
        head = conn.execute(
            f"SELECT log_id, seq, hash, signer, signature, {owner_col} FROM audit_head WHERE id = 1"
        ).fetchone()
        rows = conn.execute(
            "SELECT seq, ts_us, event, decision, actor, subject, detail, prev_hash, hash FROM audit ORDER BY seq"
        ).fetchall()
    except sqlite3.Error as err:
        raise AuditError(f"{path}: not an audit log: {err}") from err
    finally:
        conn.close()
    if head is None:
        return AuditReport(len(rows), "?", ("signed head is missing",))
    log_id, head_seq, head_hash, signer_raw, signature, head_owner = (
        bytes(head[0]),
        int(head[1]),
        bytes(head[2]),
        bytes(head[3]),
        bytes(head[4]),
        str(head[5]),
    )
    signer_name = fingerprint(signer_raw)
    prev = log_id
    expected_seq = 1
    for seq, ts_us, event, decision, actor, subject, detail, prev_hash, row_hash in rows:
        if seq != expected_seq:
            problems.append(f"row {seq}: expected row {expected_seq} (a row was deleted or inserted)")
            expected_seq = seq
        if bytes(prev_hash) != prev:
            problems.append(f"row {seq}: does not chain to the row before it")
        recomputed = _row_hash(bytes(prev_hash), seq, ts_us, event, decision, actor, subject, detail)
        if recomputed != bytes(row_hash):
            problems.append(f"row {seq}: contents do not match its hash (edited)")
        if owner is not None and actor != owner.name:
            problems.append(f"row {seq}: written by {actor!r}, the log belongs to {owner.name!r}")
        prev = bytes(row_hash)
        expected_seq += 1
    last_seq = rows[-1][0] if rows else 0
    if head_seq != last_seq or head_hash != prev:
        problems.append(f"signed head names row {head_seq}, log ends at row {last_seq} (rows cut off or added)")
    try:
        signer = public_key_from_raw(signer_raw)
        head_ok = verify_document(signer, _HEAD_KIND, _head_payload(log_id, head_seq, head_hash, head_owner), signature)
    except ValueError:
        head_ok = False
    if not head_ok:
        problems.append("signed head does not verify")
    if trusted_keys is not None and signer_raw not in {raw_public_key(k) for k in trusted_keys}:
        problems.append(f"head is signed by {signer_name}, which is not a key of this cluster")
    if owner is not None:
        if head_owner != owner.name:
            problems.append(f"head is bound to owner {head_owner or '(none)'!r}, not {owner.name!r}")
        if signer_raw != raw_public_key(owner.key):
            problems.append(f"head is signed by {signer_name}, not by {owner.name!r}'s key")
        if owner.revoked:
            problems.append(f"head is signed by {owner.name!r}, whose key is revoked")
    return AuditReport(len(rows), signer_name, tuple(problems))
