"""The operator policy file: which delegated operator key may grant which operation, on which VMs and hosts.

The cluster authority may grant everything; an operator only what a rule here allows. The file is trust
material, like the CA certificate: hosts read it from their copy of the cluster directory, so it is
**signed by the authority** (Ed25519 over the canonical JSON of its meaning, domain-separated as
``policy``) and numbered: a host refuses a file whose signature does not verify, and keeps the newest
serial it has seen (see :mod:`.store`). Format::

    cluster_id: c0123456789abcdef
    serial: 3                            # grows with every change; an older file is a rollback
    signature: <base64 Ed25519 signature of the authority>
    operators:
      ops-alice:
        public_key: <base64 of the raw 32-byte Ed25519 key>
        operations: [migrate, move]      # any of migrate, copy, move, clone, template, or "*"
        vms: ["web-*"]                   # shell-style globs over VM ids (default ["*"])
        hosts: ["*"]                     # globs the source and destination host must both match

Loading checks every field and raises ConfigError naming the file, operator and field; a signature that
does not verify is an AuthenticationError.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secmig.errors import AuthenticationError, ConfigError, DocumentFormatError
from secmig.security.credentials import check_id, is_valid_id
from secmig.security.encoding import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    JsonObject,
    b64decode,
    b64encode,
    sign_document,
    verify_document,
)
from secmig.security.keys import public_key_from_raw
from secmig.yamlfile import parse_yaml

AUTHORITY = "authority"
"""Issuer name of documents signed by the cluster authority itself."""
POLICY_KIND = "policy"
"""Domain separation of the policy file's signature."""


class Operation(enum.StrEnum):
    """The VM operations of the paper's Table 4.1; each needs a grant."""

    MIGRATE = "migrate"
    """Live migration: the VM keeps running while its memory moves."""
    COPY = "copy"
    """Copy the VM's contents to another host; the original stays."""
    MOVE = "move"
    """Cold move to another host."""
    CLONE = "clone"
    """Make further running copies of the VM."""
    TEMPLATE = "template"
    """Capture the VM as a template for new copies."""

    @property
    def relocates(self) -> bool:
        """True when the VM itself ends up on the destination, so it needs a new location binding."""
        return self in (Operation.MIGRATE, Operation.MOVE)


def parse_operation(text: str) -> Operation:
    """An operation name, or ConfigError listing the valid ones."""
    try:
        return Operation(text.strip().lower())
    except ValueError as err:
        names = ", ".join(op.value for op in Operation)
        raise ConfigError(f"operation {text!r}: expected one of {names}") from err


@dataclass(frozen=True, slots=True)
class OperatorRule:
    """What one delegated operator may grant."""

    name: str
    public_key: bytes = field(repr=False)
    operations: frozenset[Operation]
    vms: tuple[str, ...] = ("*",)
    hosts: tuple[str, ...] = ("*",)

    def key(self) -> Ed25519PublicKey:
        """The operator's verification key."""
        return public_key_from_raw(self.public_key)

    def allows(self, operation: Operation, vm_id: str, hosts: tuple[str, ...]) -> bool:
        """True when this rule covers ``operation`` on ``vm_id`` between ``hosts``."""
        return (
            operation in self.operations
            and any(fnmatch.fnmatchcase(vm_id, pat) for pat in self.vms)
            and all(any(fnmatch.fnmatchcase(h, pat) for pat in self.hosts) for h in hosts)
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """All operator rules of a cluster, with the serial number of the signed file they came from."""

    operators: tuple[OperatorRule, ...] = ()
    serial: int = 0

    def operator(self, name: str) -> OperatorRule | None:
        """The rule for ``name``, if any."""
        return next((r for r in self.operators if r.name == name), None)

    def with_operator(self, rule: OperatorRule) -> Policy:
        """This policy with ``rule`` added or replacing the rule of the same name (same serial)."""
        return Policy((*(r for r in self.operators if r.name != rule.name), rule), self.serial)

    def _operators_doc(self) -> dict[str, Any]:
        return {
            r.name: {
                "public_key": b64encode(r.public_key),
                "operations": sorted(op.value for op in r.operations),
                "vms": list(r.vms),
                "hosts": list(r.hosts),
            }
            for r in sorted(self.operators, key=lambda r: r.name)
        }

    def payload(self, cluster_id: str) -> JsonObject:
        """What the authority signs: the policy's meaning (normalized), its cluster and its serial."""
        return {"cluster_id": cluster_id, "serial": self.serial, "operators": self._operators_doc()}

    def signed_yaml(self, key: Ed25519PrivateKey, cluster_id: str) -> str:
        """The policy file's text, signed with the authority's ``key``."""
        return self.to_yaml(cluster_id, sign_document(key, POLICY_KIND, self.payload(cluster_id)))

    def to_yaml(self, cluster_id: str | None = None, signature: bytes | None = None) -> str:
        """The policy file's text (unsigned unless ``signature`` is given)."""
        doc: dict[str, Any] = {"serial": self.serial, "operators": self._operators_doc()}
        if cluster_id is not None:
            doc["cluster_id"] = cluster_id
        if signature is not None:
            doc["signature"] = b64encode(signature)
        header = "# secmig operator policy: which delegated operator may grant which operation.\n"
        if signature is not None:
            header += "# Signed by the cluster authority: edit with `secmig cluster operator`, not by hand.\n"
        return header + yaml.safe_dump(doc, sort_keys=True)

    @classmethod
    def load(cls, path: Path, *, authority: Ed25519PublicKey | None = None, cluster_id: str | None = None) -> Policy:
        """Read and check a policy file; a missing file is an empty policy (authority only).

        With ``authority`` (and ``cluster_id``) the file must carry the authority's signature over exactly
        its contents for this cluster: AuthenticationError otherwise. Without, the signature is not checked
        (only ``secmig cluster sign-policy`` does that, to sign a legacy file).
        """
        if not path.exists():
            return cls()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read policy: {err}") from err
        return cls.parse(text, str(path), authority=authority, cluster_id=cluster_id)

    @classmethod
    def parse(
        cls, text: str, source: str, *, authority: Ed25519PublicKey | None = None, cluster_id: str | None = None
    ) -> Policy:
        """A policy from the text of a policy file (see :meth:`load`)."""
        path = Path(source)
        doc = parse_yaml(text, source)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict) or not isinstance(doc.get("operators") or {}, dict):
            raise ConfigError(f"{source}: expected a mapping with an 'operators' mapping")
        serial = doc.get("serial", 0)
        if not isinstance(serial, int) or isinstance(serial, bool) or not 0 <= serial < 2**63:
            raise ConfigError(f"{source}: serial: expected a non-negative integer")
        rules = []
        for name, spec in (doc.get("operators") or {}).items():
            rules.append(_parse_rule(path, str(name), spec))
        policy = cls(tuple(rules), serial)
        if authority is not None:
            policy._check_signature(doc, source, authority, cluster_id)
        return policy

    def _check_signature(
        self, doc: dict[str, Any], source: str, authority: Ed25519PublicKey, cluster_id: str | None
    ) -> None:
        if "signature" not in doc:
            raise AuthenticationError(
                f"{source}: policy is not signed by the cluster authority (run `secmig cluster sign-policy`)"
            )
        try:
            signature = b64decode(doc.get("signature"), "signature", SIGNATURE_BYTES)
        except DocumentFormatError as err:
            raise AuthenticationError(f"{source}: policy signature: {err}") from err
        signed_for = doc.get("cluster_id")
        if not is_valid_id(signed_for) or (cluster_id is not None and signed_for != cluster_id):
            raise AuthenticationError(f"{source}: policy is not for this cluster")
        assert isinstance(signed_for, str)
        if not verify_document(authority, POLICY_KIND, self.payload(signed_for), signature):
            raise AuthenticationError(f"{source}: policy signature does not verify (edited without the authority key)")


def _parse_rule(path: Path, name: str, spec: object) -> OperatorRule:
    where = f"{path}: operators.{name}"
    check_id(name, f"{where}: operator name")
    if name == AUTHORITY:
        raise ConfigError(f"{where}: the name {AUTHORITY!r} is reserved for the cluster authority")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    try:
        key = b64decode(spec.get("public_key"), "public_key", PUBLIC_KEY_BYTES)
    except DocumentFormatError as err:
        raise ConfigError(f"{where}.public_key: {err}") from err
    ops_raw = spec.get("operations")
    if not isinstance(ops_raw, list) or not ops_raw:
        raise ConfigError(f"{where}.operations: expected a non-empty list")
    ops: set[Operation] = set()
    for op in ops_raw:
        if op == "*":
            ops.update(Operation)
        else:
            try:
                ops.add(parse_operation(str(op)))
            except ConfigError as err:
                raise ConfigError(f"{where}.operations: {err}") from err
    globs: dict[str, tuple[str, ...]] = {}
    for fld in ("vms", "hosts"):
        value = spec.get(fld, ["*"])
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}.{fld}: expected a non-empty list of glob patterns")
        globs[fld] = tuple(value)
    return OperatorRule(name, key, frozenset(ops), globs["vms"], globs["hosts"])
