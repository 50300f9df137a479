"""A cluster directory: the authority's keys, the CA, members' identities, revocations, policy and audit log.

Layout (everything an operator needs to back up is in one folder)::

    DIR/cluster.json         cluster id, name, authority public key
    DIR/authority.key        the authority's Ed25519 key (0600): signs the CA, Vsignatures, revocations
    DIR/ca.pem               the cluster CA certificate
    DIR/revocations.json     the signed revocation list
    DIR/policy.yaml          which operator may grant what (see :mod:`.policy`)
    DIR/operators/NAME.key   delegated operator keys (0600)
    DIR/hosts/HOST/          host.key (0600), host.pem, vsignature.json
    DIR/audit.db             the authority's hash-chained audit log

Host keys are generated here for convenience, as easy-rsa does; a host receives its own folder plus
the public trust material (cluster.json, ca.pem, revocations.json, policy.yaml). This is the only module
of the package that touches files besides the SQLite stores.

The revocation list and the policy are signed and numbered. A host opens its cluster folder with a
:class:`TrustFloor` (its SQLite state): every list and policy it accepts is offered to the floor, which
keeps the newest; an older signed file put back later is refused (the newest one seen stays in force).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import AuthenticationError, ConfigError, DocumentFormatError, SecurityError
from secmig.security.audit import AuditLog, AuditOwner, Decision
from secmig.security.credentials import (
    LocationBinding,
    RevocationList,
    RevokedHost,
    Vsignature,
    check_id,
    check_revocation_list,
    check_vsignature,
    normalize_mac,
)
from secmig.security.encoding import (
    PUBLIC_KEY_BYTES,
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    parse_json_object,
)
from secmig.security.grants import MAX_GRANT_LIFETIME_S, Grant, TrustRoots, new_nonce
from secmig.security.keys import (
    fingerprint,
    generate_key,
    load_private_key,
    public_key_from_raw,
    raw_public_key,
    write_private_key,
)
from secmig.security.pki import certificate_pem, make_ca_certificate, make_host_certificate
from secmig.security.policy import AUTHORITY, Operation, OperatorRule, Policy

if TYPE_CHECKING:
    from secmig.security.register import SqliteRegister

DEFAULT_CLUSTER_VALIDITY_S = 10 * 365 * 86400
DEFAULT_HOST_VALIDITY_S = 365 * 86400
DEFAULT_GRANT_MEMORY_BYTES = 16 * 1024**3
"""The VM size a grant allows when the issuer does not name one (``--memory``): a handshake claiming more
memory than its grant is refused before the destination allocates anything for it."""
_LOG = logging.getLogger("secmig.security.cluster")
REVOCATIONS_KIND = "revocation-list"
POLICY_KIND = "policy"


class TrustFloor(Protocol):
    """Remembers the newest signed trust material a host accepted (implemented by the host's SQLite state)."""

    def offer_trust(self, kind: str, serial: int, document: str) -> tuple[int, str]:
        """Keep ``document`` if its serial is newer; return the newest (serial, document) held."""
        ...

    def newest_trust(self, kind: str) -> tuple[int, str] | None:
        """The newest (serial, document) of ``kind`` held, if any."""
        ...


def _write_json(path: Path, obj: JsonObject) -> None:
    # Write then rename, so a crash never leaves a half-written signed document behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> JsonObject:
    try:
        return parse_json_object(path.read_bytes(), str(path))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except DocumentFormatError as err:
        raise ConfigError(str(err)) from err


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"{path}: not a PEM certificate") from err


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What one hypervisor holds: its key, TLS certificate and Vsignature."""

    host_id: str
    key: Ed25519PrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)
    vsignature: Vsignature


@dataclass(frozen=True, slots=True)
class ClusterTrust:
    """The public trust material every member uses to check the others."""

    cluster_id: str
    authority: Ed25519PublicKey = field(repr=False)
    ca_certificate: x509.Certificate = field(repr=False)
    revocations: RevocationList
    policy: Policy

    def roots(self) -> TrustRoots:
        """What grant and binding checks need."""
        return TrustRoots(self.cluster_id, self.authority, self.policy)

    def check_member(self, cred: Vsignature, now: float) -> None:
        """Refuse (AuthenticationError) a Vsignature that is not a current, unrevoked member of this cluster."""
        check_vsignature(
            cred, authority=self.authority, cluster_id=self.cluster_id, revocations=self.revocations, now=now
        )


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One row of ``secmig cluster list``."""

    host_id: str
    macs: tuple[str, ...]
    serial: int
    issued_at: int
    expires_at: int
    key_fingerprint: str
    revoked: bool


class Cluster:
    """The authority's view of a cluster directory."""

    def __init__(self, root: Path, *, floor: TrustFloor | None = None) -> None:
        self.root = root
        self.floor = floor
        """Where a host keeps the newest revocation list and policy it accepted (None: the authority's view)."""
        meta_path = root / "cluster.json"
        if not meta_path.exists():
            raise ConfigError(f"{root}: not a cluster directory (no cluster.json); run `secmig cluster init {root}`")
        meta = _read_json(meta_path)
        try:
            self.cluster_id = check_id(str(meta["cluster_id"]), "cluster id")
            self.name = str(meta["name"])
            self.authority_public = public_key_from_raw(
                b64decode(meta["authority_public_key"], "authority_public_key", PUBLIC_KEY_BYTES)
            )
        except (KeyError, DocumentFormatError) as err:
            raise ConfigError(f"{meta_path}: missing or malformed field: {err}") from err

    # -- creation -----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        name: str = "secmig",
        validity_s: float = DEFAULT_CLUSTER_VALIDITY_S,
        now: float | None = None,
    ) -> Cluster:
        """Create a new cluster in ``root`` (which must be absent or empty)."""
        now_i = int(time.time() if now is None else now)
        if root.exists() and any(root.iterdir()):
            raise ConfigError(f"{root}: directory is not empty; refusing to create a cluster there")
        root.mkdir(parents=True, exist_ok=True)
        (root / "hosts").mkdir()
        (root / "operators").mkdir()
        os.chmod(root, 0o700)
        cluster_id = "c" + secrets.token_hex(8)
        key = generate_key()
        write_private_key(root / "authority.key", key)
        ca = make_ca_certificate(key, cluster_id, name, now_i, now_i + int(validity_s))
        (root / "ca.pem").write_bytes(certificate_pem(ca))
        _write_json(
            root / "cluster.json",
            {
                "cluster_id": cluster_id,
                "name": name,
                "created_at": now_i,
                "authority_public_key": b64encode(raw_public_key(key)),
            },
        )
        _write_json(root / "revocations.json", RevocationList(cluster_id, 0, now_i, ()).signed_by(key).to_json())
        (root / "policy.yaml").write_text(Policy().signed_yaml(key, cluster_id), encoding="utf-8")
        cluster = cls(root)
        cluster._audit("cluster.init", Decision.ALLOW, cluster_id, {"name": name, "authority": fingerprint(key)})
        return cluster

    # -- reading ------------------------------------------------------------------------------------

    def authority_key(self) -> Ed25519PrivateKey:
        """The authority's private key (only the authority's own commands need it)."""
        key = load_private_key(self.root / "authority.key")
        if raw_public_key(key) != raw_public_key(self.authority_public):
            raise SecurityError(f"{self.root / 'authority.key'}: does not match cluster.json's authority key")
        return key

    def revocations(self) -> RevocationList:
        """The signed revocation list, verified (read afresh on every call, so a revocation takes effect at once).

        With a floor, the newest list ever accepted wins: an older signed list in the folder is refused.
        """
        path = self.root / "revocations.json"
        try:
            rl = RevocationList.from_json(_read_json(path))
        except DocumentFormatError as err:
            raise ConfigError(f"{path}: {err}") from err
        check_revocation_list(rl, authority=self.authority_public, cluster_id=self.cluster_id)
        if self.floor is None:
            return rl
        number, doc = self.floor.offer_trust(REVOCATIONS_KIND, rl.number, canonical_json(rl.to_json()).decode())
        if number == rl.number and doc == canonical_json(rl.to_json()).decode():
            return rl
        _LOG.warning("%s: revocation list #%d refused, #%d was already accepted (rollback)", path, rl.number, number)
        try:
            newest = RevocationList.from_json(parse_json_object(doc, "stored revocation list"))
        except DocumentFormatError as err:
            raise AuthenticationError(f"stored revocation list is unreadable: {err}") from err
        check_revocation_list(rl=newest, authority=self.authority_public, cluster_id=self.cluster_id)
        return newest

    def policy(self) -> Policy:
        """The operator policy, signed by the authority (AuthenticationError otherwise); with a floor, the
        newest policy ever accepted wins over an older signed file."""
        path = self.root / "policy.yaml"
        text: str | None = None
        if path.exists():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{path}: cannot read policy: {err}") from err
        policy = Policy() if text is None else self._parse_policy(text, str(path))
        if self.floor is None:
            return policy
        if text is not None:
            serial, stored = self.floor.offer_trust(POLICY_KIND, policy.serial, text)
            if stored == text:
                return policy
            _LOG.warning("%s: policy #%d refused, #%d was already accepted (rollback)", path, policy.serial, serial)
        else:
            held = self.floor.newest_trust(POLICY_KIND)
            if held is None:
                return policy
            stored = held[1]
        return self._parse_policy(stored, "stored policy")

    def _parse_policy(self, text: str, source: str) -> Policy:
        return Policy.parse(text, source, authority=self.authority_public, cluster_id=self.cluster_id)

    def _write_policy(self, policy: Policy) -> Policy:
        """Sign ``policy`` as the next serial and write it (the authority's commands only)."""
        current = self.policy()
        signed = Policy(policy.operators, max(current.serial, policy.serial) + 1)
        path = self.root / "policy.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(signed.signed_yaml(self.authority_key(), self.cluster_id), encoding="utf-8")
        os.replace(tmp, path)
        return signed

    def sign_policy(self) -> Policy:
        """Sign the policy file as it stands (e.g. an unsigned file from before policies were signed)."""
        policy = Policy.load(self.root / "policy.yaml")
        signed = Policy(policy.operators, policy.serial + 1)
        path = self.root / "policy.yaml"
        path.write_text(signed.signed_yaml(self.authority_key(), self.cluster_id), encoding="utf-8")
        self._audit("policy.signed", Decision.ALLOW, self.cluster_id, {"serial": signed.serial})
        return signed

    def audit_owner(self, owner: str) -> AuditOwner:
        """The key whose signature an audit log of ``owner`` (the authority or a member) must carry."""
        if owner == AUTHORITY:
            return AuditOwner(AUTHORITY, self.authority_public)
        key = public_key_from_raw(self.host_identity_public(owner))
        return AuditOwner(owner, key, self.revocations().is_revoked(owner))

    def trust(self) -> ClusterTrust:
        """The public trust material, freshly read."""
        return ClusterTrust(
            self.cluster_id,
            self.authority_public,
            _load_cert(self.root / "ca.pem"),
            self.revocations(),
            self.policy(),
        )

    def _host_dir(self, host_id: str) -> Path:
        return self.root / "hosts" / check_id(host_id, "host id")

    def host_identity(self, host_id: str) -> HostIdentity:
        """A member's identity as stored in its folder."""
        d = self._host_dir(host_id)
        if not d.exists():
            raise ConfigError(f"host {host_id!r} is not a member of cluster {self.cluster_id} ({d} missing)")
        try:
            cred = Vsignature.from_json(_read_json(d / "vsignature.json"))
        except DocumentFormatError as err:
            raise ConfigError(f"{d / 'vsignature.json'}: {err}") from err
        return HostIdentity(host_id, load_private_key(d / "host.key"), _load_cert(d / "host.pem"), cred)

    def host_identity_public(self, host_id: str) -> bytes:
        """A member's raw public key, from its Vsignature (no private key is read)."""
        path = self._host_dir(host_id) / "vsignature.json"
        try:
            return Vsignature.from_json(_read_json(path)).public_key
        except DocumentFormatError as err:
            raise ConfigError(f"{path}: {err}") from err

    def members(self) -> list[MemberInfo]:
        """Every host that ever joined, with its revocation status."""
        rl = self.revocations()
        out = []
        for d in sorted((self.root / "hosts").iterdir()):
            path = d / "vsignature.json"
            if not path.exists():
                continue
            try:
                cred = Vsignature.from_json(_read_json(path))
            except DocumentFormatError as err:
                raise ConfigError(f"{path}: {err}") from err
            out.append(
                MemberInfo(
                    cred.host_id,
                    cred.macs,
                    cred.serial,
                    cred.issued_at,
                    cred.expires_at,
                    fingerprint(cred.public_key),
                    rl.is_revoked(cred.host_id),
                )
            )
        return out

    # -- authority actions --------------------------------------------------------------------------

    def _audit(
        self, event: str, decision: Decision, subject: str, detail: dict[str, str | int | float | bool | None]
    ) -> None:
        with AuditLog(self.root / "audit.db", self.authority_key(), actor=AUTHORITY) as log:
            log.record(event, decision, subject, detail)

    def join(
        self,
        host_id: str,
        macs: Sequence[str] = (),
        validity_s: float = DEFAULT_HOST_VALIDITY_S,
        now: float | None = None,
    ) -> HostIdentity:
        """Issue ``host_id`` a key, a TLS certificate and its Vsignature."""
        now_i = int(time.time() if now is None else now)
        d = self._host_dir(host_id)
        norm_macs = tuple(normalize_mac(m, f"--mac for {host_id}") for m in macs)
        if self.revocations().is_revoked(host_id):
            self._audit("join", Decision.REFUSE, host_id, {"reason": "revoked"})
            raise AuthenticationError(f"host {host_id!r} is revoked in cluster {self.cluster_id}; it cannot rejoin")
        if d.exists():
            raise ConfigError(f"host {host_id!r} is already a member of cluster {self.cluster_id} ({d})")
        authority = self.authority_key()
        ca = _load_cert(self.root / "ca.pem")
        key = generate_key()
        # 63 random bits: unique enough for one cluster, and an exact integer in every JSON reader.
        serial = secrets.randbits(63) | 1
        expires = min(now_i + int(validity_s), int(ca.not_valid_after_utc.timestamp()))
        cert = make_host_certificate(authority, ca, key.public_key(), self.cluster_id, host_id, serial, now_i, expires)
        cred = Vsignature(self.cluster_id, host_id, raw_public_key(key), norm_macs, serial, now_i, expires).signed_by(
            authority
        )
        d.mkdir(mode=0o700)
        write_private_key(d / "host.key", key)
        (d / "host.pem").write_bytes(certificate_pem(cert))
        _write_json(d / "vsignature.json", cred.to_json())
        self._audit(
            "join",
            Decision.ALLOW,
            host_id,
            {"macs": ",".join(norm_macs), "key": fingerprint(key), "expires_at": expires},
        )
        return HostIdentity(host_id, key, cert, cred)

    def revoke(self, host_id: str, reason: str = "unspecified", now: float | None = None) -> RevocationList:
        """Add ``host_id`` to the revocation list and re-sign it with the next number."""
        now_i = int(time.time() if now is None else now)
        if not self._host_dir(host_id).exists():
            raise ConfigError(f"host {host_id!r} is not a member of cluster {self.cluster_id}")
        rl = self.revocations()
        if rl.is_revoked(host_id):
            raise ConfigError(f"host {host_id!r} is already revoked")
        new = RevocationList(
            self.cluster_id, rl.number + 1, now_i, (*rl.revoked, RevokedHost(host_id, now_i, reason))
        ).signed_by(self.authority_key())
        _write_json(self.root / "revocations.json", new.to_json())
        self._audit("revoke", Decision.ALLOW, host_id, {"reason": reason, "list_number": new.number})
        return new

    def add_operator(
        self,
        name: str,
        operations: Sequence[Operation],
        vms: Sequence[str] = ("*",),
        hosts: Sequence[str] = ("*",),
    ) -> OperatorRule:
        """Create a delegated operator key and a policy rule for it."""
        check_id(name, "operator name")
        if name == AUTHORITY:
            raise ConfigError(f"operator name {AUTHORITY!r} is reserved")
        if not operations:
            raise ConfigError(f"operator {name!r}: give at least one --op")
        key = generate_key()
        write_private_key(self.root / "operators" / f"{name}.key", key)
        rule = OperatorRule(name, raw_public_key(key), frozenset(operations), tuple(vms), tuple(hosts))
        policy = self._write_policy(self.policy().with_operator(rule))
        self._audit(
            "operator.delegate",
            Decision.ALLOW,
            name,
            {
                "operations": ",".join(sorted(o.value for o in operations)),
                "vms": ",".join(vms),
                "hosts": ",".join(hosts),
                "policy_serial": policy.serial,
            },
        )
        return rule

    def issuer_key(self, issuer: str) -> Ed25519PrivateKey:
        """The signing key of ``issuer`` (the authority, or an operator whose key is in this directory)."""
        if issuer == AUTHORITY:
            return self.authority_key()
        path = self.root / "operators" / f"{check_id(issuer, 'operator name')}.key"
        if not path.exists():
            raise ConfigError(f"operator {issuer!r}: no key at {path}")
        return load_private_key(path)

    def issue_binding(
        self,
        vm_id: str,
        vm_mac: str,
        host_id: str,
        epoch: int = 0,
        issuer: str = AUTHORITY,
        now: float | None = None,
    ) -> LocationBinding:
        """Sign a VM's location binding (used when a VM is first placed; moves get theirs with the grant)."""
        binding = LocationBinding(
            self.cluster_id,
            check_id(vm_id, "VM id"),
            normalize_mac(vm_mac, "VM MAC"),
            check_id(host_id, "host id"),
            epoch,
            int(time.time() if now is None else now),
            issuer,
        ).signed_by(self.issuer_key(issuer))
        register = self.location_register()
        try:
            register.place(binding)  # this binding is now the VM's current one; any other is stale
        finally:
            register.close()
        self._audit("binding.issued", Decision.ALLOW, vm_id, {"host": host_id, "epoch": epoch, "issuer": issuer})
        return binding

    def location_register(self) -> SqliteRegister:
        """The location register's file in this folder (see :mod:`.register`: the authority keeps it)."""
        from secmig.security.register import REGISTER_FILE, SqliteRegister  # register builds on this module

        return SqliteRegister(self.root / REGISTER_FILE, lambda: self.trust().roots())

    def issue_grant(
        self,
        operation: Operation,
        vm_id: str,
        source_host: str,
        destination_host: str,
        *,
        ttl_s: float = 300.0,
        issuer: str = AUTHORITY,
        current_binding: LocationBinding | None = None,
        new_mac: str | None = None,
        now: float | None = None,
        memory_bytes: int = DEFAULT_GRANT_MEMORY_BYTES,
    ) -> Grant:
        """Sign a single-use grant for a VM of at most ``memory_bytes``; relocating operations also get the
        VM's next binding (epoch + 1)."""
        now_i = int(time.time() if now is None else now)
        if not 0 < ttl_s <= MAX_GRANT_LIFETIME_S:
            raise ConfigError(f"--ttl {ttl_s:g}s: must be between 0 and {MAX_GRANT_LIFETIME_S} s")
        if not 0 < memory_bytes < 2**63:
            raise ConfigError(f"--memory {memory_bytes}: must be a positive number of bytes")
        key = self.issuer_key(issuer)
        next_binding = None
        if operation.relocates:
            if current_binding is None:
                raise ConfigError(f"{operation.value} needs the VM's current binding (--binding FILE)")
            if current_binding.vm_id != vm_id or current_binding.host_id != source_host:
                raise ConfigError(
                    f"binding places VM {current_binding.vm_id!r} on {current_binding.host_id!r}, "
                    f"not {vm_id!r} on {source_host!r}"
                )
            from secmig.security.register import check_current  # register builds on this module

            register = self.location_register()
            try:
                check_current(register, current_binding)  # a grant only against the register's current epoch
            finally:
                register.close()
            next_binding = LocationBinding(
                self.cluster_id,
                vm_id,
                normalize_mac(new_mac) if new_mac else current_binding.vm_mac,
                check_id(destination_host, "destination host"),
                current_binding.epoch + 1,
                now_i,
                issuer,
            ).signed_by(key)
        grant = Grant(
            self.cluster_id,
            operation,
            check_id(vm_id, "VM id"),
            check_id(source_host, "source host"),
            check_id(destination_host, "destination host"),
            new_nonce(),
            now_i,
            now_i + int(ttl_s),
            issuer,
            next_binding,
            memory_bytes=memory_bytes,
        ).signed_by(key)
        self._audit(
            "grant.issued",
            Decision.ALLOW,
            vm_id,
            {
                "operation": operation.value,
                "source": source_host,
                "destination": destination_host,
                "issuer": issuer,
                "nonce": grant.nonce.hex(),
                "expires_at": grant.expires_at,
                "memory_bytes": memory_bytes,
            },
        )
        return grant


def load_document(path: Path, kind: type[Grant] | type[LocationBinding]) -> Grant | LocationBinding:
    """Read a grant or binding file written by the CLI."""
    try:
        return kind.from_json(_read_json(path))
    except DocumentFormatError as err:
        raise ConfigError(f"{path}: {err}") from err


def write_document(path: Path, doc: Grant | LocationBinding) -> None:
    """Write a grant or binding file."""
    _write_json(path, doc.to_json())
