"""Operation grants and location-binding checks: who may do what to which VM, once.

A :class:`Grant` names an operation, a VM, the source and destination hosts, the VM's size (the most
memory a handshake under it may claim), a random nonce and an expiry, and is signed by the cluster
authority or by a delegated operator whose policy rule covers it.
A grant may bind the migration's manifest (the driver and the VM definition the destination will run)
by its SHA-256 ``manifest_digest``: the destination then refuses any other manifest.
Grants that relocate the VM (migrate, move) carry the VM's next :class:`LocationBinding` (epoch + 1 at
the destination), signed by the same issuer, so the destination obtains its new binding with the grant.

Single use is enforced by a :class:`NonceStore` that remembers every consumed nonce until its grant
expires. This module does no I/O; the SQLite store is in :mod:`.store`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import AuthenticationError, AuthorizationError, DocumentFormatError
from secmig.security.credentials import LocationBinding, doc_id
from secmig.security.encoding import (
    JsonObject,
    SignedDocument,
    b64decode,
    b64encode,
    get_int,
    get_str,
)
from secmig.security.policy import AUTHORITY, Operation, Policy

NONCE_BYTES = 16
MAX_GRANT_LIFETIME_S = 24 * 3600
"""Longer-lived grants are refused: it bounds how long a nonce must be remembered."""
CLOCK_SKEW_S = 300


@dataclass(frozen=True, slots=True)
class Grant(SignedDocument):
    """A signed, single-use permission for one operation on one VM between two hosts."""

    KIND = "grant"

    cluster_id: str
    operation: Operation
    vm_id: str
    source_host: str
    destination_host: str
    nonce: bytes
    issued_at: int
    expires_at: int
    issuer: str
    next_binding: LocationBinding | None = None
    manifest_digest: bytes | None = None
    """SHA-256 of the manifest this grant allows (None: the grant binds no manifest)."""
    memory_bytes: int = 16 * 1024**3
    """The VM's size: a handshake claiming more memory (page size × page count) under this grant is refused."""
    signature: bytes = field(default=b"", repr=False)

    def payload(self) -> JsonObject:
        """The signed fields (the next binding and the manifest digest are signed inside: no swapping)."""
        doc: JsonObject = {
            "cluster_id": self.cluster_id,
            "operation": self.operation.value,
            "vm_id": self.vm_id,
            "source_host": self.source_host,
            "destination_host": self.destination_host,
            "nonce": b64encode(self.nonce),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "issuer": self.issuer,
            "next_binding": None if self.next_binding is None else self.next_binding.to_json(),
            "memory_bytes": self.memory_bytes,
        }
        if self.manifest_digest is not None:  # absent, not null: grants that bind none read as before
            doc["manifest_digest"] = b64encode(self.manifest_digest)
        return doc

    @classmethod
    def parse_payload(cls, p: JsonObject) -> Grant:
        """The unsigned grant whose payload is ``p``; raises DocumentFormatError."""
        try:
            operation = Operation(get_str(p, "operation", max_len=16))
        except ValueError as err:
            raise DocumentFormatError("operation: unknown") from err
        nb = p.get("next_binding")
        if nb is not None and not isinstance(nb, dict):
            raise DocumentFormatError("next_binding: expected an object or null")
        return cls(
            cluster_id=doc_id(p, "cluster_id"),
            operation=operation,
            vm_id=doc_id(p, "vm_id"),
            source_host=doc_id(p, "source_host"),
            destination_host=doc_id(p, "destination_host"),
            nonce=b64decode(p.get("nonce"), "nonce", NONCE_BYTES),
            issued_at=get_int(p, "issued_at"),
            expires_at=get_int(p, "expires_at"),
            issuer=doc_id(p, "issuer"),
            next_binding=None if nb is None else LocationBinding.from_json(nb),
            manifest_digest=(
                None if p.get("manifest_digest") is None else b64decode(p["manifest_digest"], "manifest_digest", 32)
            ),
            memory_bytes=get_int(p, "memory_bytes", minimum=1),
        )


def bind_manifest(grant: Grant, manifest_digest: bytes, key: Ed25519PrivateKey) -> Grant:
    """``grant`` binding the manifest whose SHA-256 is ``manifest_digest``, signed again by its issuer's ``key``."""
    if len(manifest_digest) != 32:
        raise ValueError("a manifest digest is 32 bytes (SHA-256)")
    return replace(grant, manifest_digest=manifest_digest, signature=b"").signed_by(key)


def new_nonce() -> bytes:
    """A fresh random grant nonce."""
    return os.urandom(NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class TrustRoots:
    """What a host needs to check grants and bindings: the cluster id, authority key and policy."""

    cluster_id: str
    authority: Ed25519PublicKey
    policy: Policy

    def issuer_key(self, issuer: str) -> Ed25519PublicKey | None:
        """The key that signs for ``issuer``: the authority's or a delegated operator's."""
        if issuer == AUTHORITY:
            return self.authority
        rule = self.policy.operator(issuer)
        return None if rule is None else rule.key()


class NonceStore(Protocol):
    """Remembers consumed grant nonces; ``consume`` is atomic test-and-set."""

    def consume(self, nonce: bytes, expires_at: int, now: float) -> bool:
        """Record ``nonce``; False when it was already consumed (a replay)."""
        ...


class MemoryNonceStore:
    """An in-process nonce store, for the simulator and tests."""

    def __init__(self) -> None:
        self._used: dict[bytes, int] = {}

    def consume(self, nonce: bytes, expires_at: int, now: float) -> bool:
        """Record ``nonce``; False on replay. Forgets nonces whose grants expired long ago."""
        for old in [n for n, exp in self._used.items() if exp + CLOCK_SKEW_S < now]:
            del self._used[old]
        if nonce in self._used:
            return False
        self._used[nonce] = expires_at
        return True


def check_binding_signature(binding: LocationBinding, roots: TrustRoots) -> None:
    """Refuse (AuthenticationError) a binding not signed by the authority or an operator allowed to place the VM."""
    if binding.cluster_id != roots.cluster_id:
        raise AuthenticationError(f"VM {binding.vm_id!r}: binding is for cluster {binding.cluster_id!r}")
    key = roots.issuer_key(binding.issuer)
    if key is None:
        raise AuthenticationError(f"VM {binding.vm_id!r}: binding issuer {binding.issuer!r} is unknown")
    if binding.issuer != AUTHORITY:
        rule = roots.policy.operator(binding.issuer)
        # An operator may place a VM on a host only if it could relocate the VM there.
        if rule is None or not any(
            rule.allows(op, binding.vm_id, (binding.host_id,)) for op in Operation if op.relocates
        ):
            raise AuthenticationError(
                f"VM {binding.vm_id!r}: operator {binding.issuer!r} may not bind it to {binding.host_id!r}"
            )
    if not binding.verify(key):
        raise AuthenticationError(f"VM {binding.vm_id!r}: binding signature does not verify")


def check_grant(
    grant: Grant | None,
    roots: TrustRoots,
    *,
    now: float,
    operation: Operation,
    vm_id: str,
    source_host: str,
    destination_host: str,
    current_binding: LocationBinding | None,
    manifest_digest: bytes | None = None,
    memory_bytes: int | None = None,
) -> None:
    """Refuse (AuthorizationError) a grant that is missing, forged, unauthorized, expired or mismatched.

    ``manifest_digest`` is the digest of the manifest the source announces: a grant that binds one
    refuses any other (or none). ``memory_bytes`` is the memory the handshake claims: more than the
    grant's ``memory_bytes`` is refused.

    Does not consume the nonce: call the NonceStore after every other check has passed, so that a
    refused use does not burn a valid grant.
    """
    if grant is None:
        raise AuthorizationError(f"{operation.value} of VM {vm_id!r}: no grant presented")
    label = f"grant for {grant.operation.value} of VM {grant.vm_id!r}"
    if grant.cluster_id != roots.cluster_id:
        raise AuthorizationError(f"{label}: issued for cluster {grant.cluster_id!r}")
    key = roots.issuer_key(grant.issuer)
    if key is None:
        raise AuthorizationError(f"{label}: issuer {grant.issuer!r} is not in the policy")
    if not grant.verify(key):
        raise AuthorizationError(f"{label}: signature does not verify")
    if grant.issuer != AUTHORITY:
        rule = roots.policy.operator(grant.issuer)
        if rule is None or not rule.allows(grant.operation, grant.vm_id, (grant.source_host, grant.destination_host)):
            raise AuthorizationError(f"{label}: operator {grant.issuer!r} may not grant this")
    if grant.expires_at - grant.issued_at > MAX_GRANT_LIFETIME_S:
        raise AuthorizationError(f"{label}: lifetime longer than {MAX_GRANT_LIFETIME_S} s")
    if now >= grant.expires_at:
        raise AuthorizationError(f"{label}: expired")
    if now + CLOCK_SKEW_S < grant.issued_at:
        raise AuthorizationError(f"{label}: not valid yet")
    if grant.operation != operation:
        raise AuthorizationError(f"{label}: presented for {operation.value}")
    if grant.vm_id != vm_id:
        raise AuthorizationError(f"{label}: presented for VM {vm_id!r}")
    if grant.source_host != source_host:
        raise AuthorizationError(f"{label}: names source {grant.source_host!r}, peer is {source_host!r}")
    if grant.destination_host != destination_host:
        raise AuthorizationError(f"{label}: names destination {grant.destination_host!r}, not {destination_host!r}")
    if memory_bytes is not None and memory_bytes > grant.memory_bytes:
        raise AuthorizationError(f"{label}: allows {grant.memory_bytes} bytes of memory, {memory_bytes} claimed")
    if grant.manifest_digest is not None and grant.manifest_digest != manifest_digest:
        raise AuthorizationError(f"{label}: the manifest presented is not the one the grant binds")
    if operation.relocates:
        _check_next_binding(grant, roots, current_binding)


def _check_next_binding(grant: Grant, roots: TrustRoots, current: LocationBinding | None) -> None:
    label = f"grant for {grant.operation.value} of VM {grant.vm_id!r}"
    nb = grant.next_binding
    if nb is None:
        raise AuthorizationError(f"{label}: carries no next location binding")
    if current is None:
        raise AuthorizationError(f"{label}: VM has no current location binding")
    if nb.issuer != grant.issuer or nb.vm_id != grant.vm_id or nb.host_id != grant.destination_host:
        raise AuthorizationError(f"{label}: next binding does not match the grant")
    # The MAC may change with the move (the paper's "new MAC address"); the issuer's signature covers it.
    if nb.epoch != current.epoch + 1:
        raise AuthorizationError(f"{label}: next binding is not epoch {current.epoch + 1}")
    try:
        check_binding_signature(nb, roots)
    except AuthenticationError as err:
        raise AuthorizationError(f"{label}: {err}") from err
