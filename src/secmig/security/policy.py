"""The operator policy file: which delegated operator key may grant which operation, on which VMs and hosts.

The cluster authority may grant everything; an operator only what a rule here allows. The file is trust
material, like the CA certificate: hosts read it from their copy of the cluster directory. Format::

    operators:
      ops-alice:
        public_key: <base64 of the raw 32-byte Ed25519 key>
        operations: [migrate, move]      # any of migrate, copy, move, clone, template, or "*"
        vms: ["web-*"]                   # shell-style globs over VM ids (default ["*"])
        hosts: ["*"]                     # globs the source and destination host must both match

Loading checks every field and raises ConfigError naming the file, operator and field.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from secmig.errors import ConfigError, DocumentFormatError
from secmig.security.credentials import check_id
from secmig.security.encoding import PUBLIC_KEY_BYTES, b64decode, b64encode
from secmig.security.keys import public_key_from_raw

AUTHORITY = "authority"
"""Issuer name of documents signed by the cluster authority itself."""


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
    """All operator rules of a cluster."""

    operators: tuple[OperatorRule, ...] = ()

    def operator(self, name: str) -> OperatorRule | None:
        """The rule for ``name``, if any."""
        return next((r for r in self.operators if r.name == name), None)

    def with_operator(self, rule: OperatorRule) -> Policy:
        """This policy with ``rule`` added or replacing the rule of the same name."""
        return Policy((*(r for r in self.operators if r.name != rule.name), rule))

    def to_yaml(self) -> str:
        """The policy file's text."""
        doc: dict[str, Any] = {
            "operators": {
                r.name: {
                    "public_key": b64encode(r.public_key),
                    "operations": sorted(op.value for op in r.operations),
                    "vms": list(r.vms),
                    "hosts": list(r.hosts),
                }
                for r in self.operators
            }
        }
        header = "# secmig operator policy: which delegated operator may grant which operation.\n"
        return header + yaml.safe_dump(doc, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and check a policy file; a missing file is an empty policy (authority only)."""
        if not path.exists():
            return cls()
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read policy: {err}") from err
        if doc is None:
            return cls()
        if not isinstance(doc, dict) or not isinstance(doc.get("operators", {}), dict):
            raise ConfigError(f"{path}: expected a mapping with an 'operators' mapping")
        rules = []
        for name, spec in (doc.get("operators") or {}).items():
            rules.append(_parse_rule(path, str(name), spec))
        return cls(tuple(rules))


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
