"""A host's persistent security state in SQLite: consumed grant nonces and accepted binding epochs.

Both must survive a restart, or a restart would re-open every replay. ``consume`` relies on the primary
key for an atomic test-and-set, so two connections racing on one grant cannot both win.
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
