"""Signed credentials: a hypervisor's Vsignature, the revocation list, and a VM's location binding.

The paper gives each hypervisor a "hash based signature" when it joins a cluster group and has a
verification module recompute a hash over a VM's new MAC address after a move. Here both are real
Ed25519 signatures by the cluster authority (or, for bindings, a delegated operator):

- :class:`Vsignature` binds cluster id, host id, the host's public key, its MAC addresses, issue and
  expiry times.
- :class:`RevocationList` names revoked hosts; it is signed and numbered, and every check consults it.
- :class:`LocationBinding` binds (VM id, VM MAC, host, epoch); each move produces the next epoch.

Pure: parsing, signing and checking; files are handled by :mod:`.cluster`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from secmig.errors import AuthenticationError, ConfigError, DocumentFormatError
from secmig.security.encoding import (
    PUBLIC_KEY_BYTES,
    JsonObject,
    SignedDocument,
    b64decode,
    b64encode,
    get_int,
    get_str,
    get_str_list,
)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""The one strict id format (VM, host, operator, cluster): ASCII only, so an id can never fail to encode
(a lone surrogate, a newline) in a log line, an SQLite row or a file name. Always used with fullmatch."""
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string in the one id format; checks nothing else (no I/O, never raises)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """A host, VM, operator or cluster id: 1–63 of ``[A-Za-z0-9._-]``, safe as a file name."""
    if not is_valid_id(value):
        raise ConfigError(f"{what} {value!r}: use 1-63 letters, digits, '.', '_' or '-', starting alphanumeric")
    return value


def normalize_mac(value: str, what: str = "MAC address") -> str:
    """``AA-BB-CC-DD-EE-FF`` or ``aa:bb:…`` → ``aa:bb:cc:dd:ee:ff``; anything else is a ConfigError."""
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(mac):
        raise ConfigError(f"{what} {value!r}: expected six hex pairs such as 52:54:00:12:34:56")
    return mac


def _doc_id(obj: JsonObject, name: str) -> str:
    value = get_str(obj, name, max_len=63)
    if not is_valid_id(value):
        raise DocumentFormatError(f"{name}: not a valid id")
    return value


def doc_id(obj: JsonObject, name: str) -> str:
    """A required id field of a document or message; DocumentFormatError unless it is in the one id format."""
    return _doc_id(obj, name)


def _doc_mac(obj: JsonObject, name: str) -> str:
    value = get_str(obj, name, max_len=17)
    if not _MAC_RE.fullmatch(value):
        raise DocumentFormatError(f"{name}: not a normalized MAC address")
    return value


@dataclass(frozen=True, slots=True)
class Vsignature(SignedDocument):
    """A hypervisor's signed cluster membership (the paper's Vsignature)."""

    KIND = "vsignature"

    cluster_id: str
    host_id: str
    public_key: bytes
    macs: tuple[str, ...]
    serial: int
    issued_at: int
    expires_at: int
    signature: bytes = field(default=b"", repr=False)

    def payload(self) -> JsonObject:
        """The signed fields."""
        return {
            "cluster_id": self.cluster_id,
            "host_id": self.host_id,
            "public_key": b64encode(self.public_key),
            "macs": list(self.macs),
            "serial": self.serial,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def parse_payload(cls, p: JsonObject) -> Vsignature:
        """The unsigned credential whose payload is ``p``; raises DocumentFormatError."""
        return cls(
            cluster_id=_doc_id(p, "cluster_id"),
            host_id=_doc_id(p, "host_id"),
            public_key=b64decode(p.get("public_key"), "public_key", PUBLIC_KEY_BYTES),
            macs=tuple(_mac_list(p)),
            serial=get_int(p, "serial"),
            issued_at=get_int(p, "issued_at"),
            expires_at=get_int(p, "expires_at"),
        )


def _mac_list(p: JsonObject) -> list[str]:
    macs = list(get_str_list(p, "macs"))
    for mac in macs:
        if not _MAC_RE.fullmatch(mac):
            raise DocumentFormatError("macs: not normalized MAC addresses")
    return macs


@dataclass(frozen=True, slots=True)
class RevokedHost:
    """One entry of the revocation list."""

    host_id: str
    revoked_at: int
    reason: str


@dataclass(frozen=True, slots=True)
class RevocationList(SignedDocument):
    """The authority's signed list of revoked hosts; ``number`` only grows, so an old list is detectable."""

    KIND = "revocation-list"

    cluster_id: str
    number: int
    issued_at: int
    revoked: tuple[RevokedHost, ...]
    signature: bytes = field(default=b"", repr=False)

    def payload(self) -> JsonObject:
        """The signed fields."""
        return {
            "cluster_id": self.cluster_id,
            "number": self.number,
            "issued_at": self.issued_at,
            "revoked": [{"host_id": r.host_id, "revoked_at": r.revoked_at, "reason": r.reason} for r in self.revoked],
        }

    @classmethod
    def parse_payload(cls, p: JsonObject) -> RevocationList:
        """The unsigned list whose payload is ``p``; raises DocumentFormatError."""
        entries = p.get("revoked")
        if not isinstance(entries, list) or len(entries) > 100_000:
            raise DocumentFormatError("revoked: expected a list")
        revoked = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise DocumentFormatError("revoked: expected objects")
            revoked.append(
                RevokedHost(_doc_id(entry, "host_id"), get_int(entry, "revoked_at"), get_str(entry, "reason"))
            )
        return cls(
            cluster_id=_doc_id(p, "cluster_id"),
            number=get_int(p, "number"),
            issued_at=get_int(p, "issued_at"),
            revoked=tuple(revoked),
        )

    def is_revoked(self, host_id: str) -> bool:
        """True when ``host_id`` is on the list."""
        return any(r.host_id == host_id for r in self.revoked)


@dataclass(frozen=True, slots=True)
class LocationBinding(SignedDocument):
    """A VM's signed location: (VM id, VM MAC, host, epoch). Each move issues epoch + 1."""

    KIND = "location-binding"

    cluster_id: str
    vm_id: str
    vm_mac: str
    host_id: str
    epoch: int
    issued_at: int
    issuer: str
    """``authority`` or the name of a delegated operator in the policy file."""
    signature: bytes = field(default=b"", repr=False)

    def payload(self) -> JsonObject:
        """The signed fields."""
        return {
            "cluster_id": self.cluster_id,
            "vm_id": self.vm_id,
            "vm_mac": self.vm_mac,
            "host_id": self.host_id,
            "epoch": self.epoch,
            "issued_at": self.issued_at,
            "issuer": self.issuer,
        }

    @classmethod
    def parse_payload(cls, p: JsonObject) -> LocationBinding:
        """The unsigned binding whose payload is ``p``; raises DocumentFormatError."""
        return cls(
            cluster_id=_doc_id(p, "cluster_id"),
            vm_id=_doc_id(p, "vm_id"),
            vm_mac=_doc_mac(p, "vm_mac"),
            host_id=_doc_id(p, "host_id"),
            epoch=get_int(p, "epoch"),
            issued_at=get_int(p, "issued_at"),
            issuer=_doc_id(p, "issuer"),
        )


def check_vsignature(
    cred: Vsignature,
    *,
    authority: Ed25519PublicKey,
    cluster_id: str,
    revocations: RevocationList,
    now: float,
) -> None:
    """Refuse (AuthenticationError) a Vsignature that is forged, foreign, expired, not yet valid or revoked.

    The message names the check that failed but never echoes key material.
    """
    if not cred.verify(authority):
        raise AuthenticationError(f"host {cred.host_id!r}: Vsignature is not signed by this cluster's authority")
    if cred.cluster_id != cluster_id:
        raise AuthenticationError(f"host {cred.host_id!r}: Vsignature is for cluster {cred.cluster_id!r}")
    if now >= cred.expires_at:
        raise AuthenticationError(f"host {cred.host_id!r}: Vsignature expired")
    if now + 300 < cred.issued_at:
        raise AuthenticationError(f"host {cred.host_id!r}: Vsignature is not valid yet")
    if revocations.is_revoked(cred.host_id):
        raise AuthenticationError(f"host {cred.host_id!r}: revoked")


def check_revocation_list(
    rl: RevocationList, *, authority: Ed25519PublicKey, cluster_id: str, newest_seen: int | None = None
) -> None:
    """Refuse a revocation list that the authority did not sign, that belongs to another cluster, or (with
    ``newest_seen``, the highest list number this host has accepted) that is older than one already seen."""
    if rl.cluster_id != cluster_id or not rl.verify(authority):
        raise AuthenticationError("revocation list is not signed by this cluster's authority")
    if newest_seen is not None and rl.number < newest_seen:
        raise AuthenticationError(
            f"revocation list #{rl.number} is older than #{newest_seen}, already seen here (rollback refused)"
        )
