"""secmig's security core: cluster membership (Vsignature), grants, location bindings, the sans-IO
migration protocol over TLS 1.3, and the hash-chained audit log.

The pieces, each in its own module:

- :mod:`.cluster` — a cluster directory: authority key, X.509 CA, members, revocations, policy.
- :mod:`.credentials` — Vsignature, revocation list, location binding (signed documents).
- :mod:`.grants`, :mod:`.policy` — single-use operation grants and who may issue them.
- :mod:`.location` — the verification module's verdict on a VM found on a host.
- the migration protocol, bytes in, events out, split as h11 splits HTTP:
  :mod:`.state` (roles, states and the one transition table), :mod:`.handshake` (hello and proof
  codecs, peer authentication, the injected :class:`~.handshake.Authorizer` and its default
  :class:`~.handshake.GrantAuthorizer`), :mod:`.frames` (frame codecs and the one frame reader),
  :mod:`.events` (what goes in and comes out), :mod:`.tls` (TLS 1.3 over memory BIOs) and the thin
  :mod:`.protocol` (``MigrationConnection``) that wires them; :mod:`.loopback` joins two ends in memory.
- :mod:`.encoding` — canonical JSON, the signing input, and :class:`~.encoding.SignedDocument`, the one
  sign/verify/to-and-from-JSON shape every signed document shares.
- :mod:`.audit`, :mod:`.store` — the audit log and a host's persistent nonce/epoch state (SQLite).

Nothing here opens a socket or prints; the CLI and the agents do.
"""

from secmig.security.audit import AuditLog, MemoryAuditSink, verify_audit_log
from secmig.security.cluster import Cluster, ClusterTrust, HostIdentity
from secmig.security.credentials import LocationBinding, RevocationList, Vsignature
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    MigrationRequest,
    PageBatch,
    Role,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.frames import memory_digest
from secmig.security.grants import Grant, MemoryNonceStore
from secmig.security.location import LocationVerdict, MemoryBindingRegistry, verify_location
from secmig.security.policy import Operation, Policy
from secmig.security.protocol import MigrationConnection
from secmig.security.state import State

__all__ = [
    "Abort",
    "AbortCode",
    "Aborted",
    "AuditLog",
    "Authorized",
    "Cluster",
    "ClusterTrust",
    "Commit",
    "Committed",
    "DeviceState",
    "Grant",
    "HostIdentity",
    "LocationBinding",
    "LocationVerdict",
    "MemoryAuditSink",
    "MemoryBindingRegistry",
    "MemoryNonceStore",
    "MigrationConnection",
    "MigrationRequest",
    "Operation",
    "PageBatch",
    "Policy",
    "RevocationList",
    "Role",
    "RoundEnd",
    "RoundStart",
    "State",
    "StopAndCopy",
    "Vsignature",
    "memory_digest",
    "verify_audit_log",
    "verify_location",
]
