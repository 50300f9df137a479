"""A host's persistent security state in SQLite: consumed grant nonces, accepted binding epochs, and the
newest signed trust material (revocation list, policy) it has ever accepted.

All must survive a restart, or a restart would re-open every replay or rollback. ``consume`` relies on the
primary key for an atomic test-and-set, so two connections racing on one grant cannot both win; the trust
documents only move forward (:meth:`SqliteHostState.offer_trust`), so an older signed revocation list or
policy put back in the cluster folder is ignored in favour of the newest one seen.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from secmig.errors import AuditError
from secmig.security.credentials import LocationBinding
from secmig.security.grants import CLOCK_SKEW_S


class SqliteHostState:
    """Nonce store and binding registry of one host (implements both protocols)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS used_nonces (nonce BLOB PRIMARY KEY, expires_at INTEGER NOT NULL)"
            )
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS binding_epochs (vm_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL)"
            )
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS trust_documents"
                " (kind TEXT PRIMARY KEY, serial INTEGER NOT NULL, document TEXT NOT NULL)"
            )
        except sqlite3.Error as err:
            raise AuditError(f"{path}: cannot open host state: {err}") from err

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def consume(self, nonce: bytes, expires_at: int, now: float) -> bool:
        """Record ``nonce``; False when it was already used (a replayed grant)."""
        try:
            # A nonce can be forgotten once its grant is past expiry (plus skew): the grant itself is refused then.
            self._conn.execute("DELETE FROM used_nonces WHERE expires_at < ?", (int(now) - CLOCK_SKEW_S,))
            self._conn.execute("INSERT INTO used_nonces (nonce, expires_at) VALUES (?, ?)", (nonce, expires_at))
        except sqlite3.IntegrityError:
            return False
        except sqlite3.Error as err:
            raise AuditError(f"{self.path}: cannot record grant nonce: {err}") from err
        return True

    def latest_epoch(self, vm_id: str) -> int | None:
        """The newest accepted binding epoch for ``vm_id``."""
        row = self._conn.execute("SELECT epoch FROM binding_epochs WHERE vm_id = ?", (vm_id,)).fetchone()
        return None if row is None else int(row[0])

    def record(self, binding: LocationBinding) -> None:
        """Raise the accepted epoch of ``binding.vm_id`` to ``binding.epoch``."""
        self._conn.execute(
            "INSERT INTO binding_epochs (vm_id, epoch) VALUES (?, ?) "
            "ON CONFLICT(vm_id) DO UPDATE SET epoch = max(epoch, excluded.epoch)",
            (binding.vm_id, binding.epoch),
        )

    def offer_trust(self, kind: str, serial: int, document: str) -> tuple[int, str]:
        """Keep ``document`` (already verified by the caller) if its serial is newer than the stored one of
        ``kind``; return the newest (serial, document) held, which is the one to use."""
        try:
            self._conn.execute(
                "INSERT INTO trust_documents (kind, serial, document) VALUES (?, ?, ?) "
                "ON CONFLICT(kind) DO UPDATE SET serial = excluded.serial, document = excluded.document "
                "WHERE excluded.serial > trust_documents.serial",
                (kind, serial, document),
            )
            row = self._conn.execute("SELECT serial, document FROM trust_documents WHERE kind = ?", (kind,)).fetchone()
        except sqlite3.Error as err:
            raise AuditError(f"{self.path}: cannot record trust material: {err}") from err
        return int(row[0]), str(row[1])

    def newest_trust(self, kind: str) -> tuple[int, str] | None:
        """The newest (serial, document) of ``kind`` accepted so far (None when none was)."""
        try:
            row = self._conn.execute("SELECT serial, document FROM trust_documents WHERE kind = ?", (kind,)).fetchone()
        except sqlite3.Error as err:
            raise AuditError(f"{self.path}: cannot read trust material: {err}") from err
        return None if row is None else (int(row[0]), str(row[1]))
