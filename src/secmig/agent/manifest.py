"""The migration manifest: round 0 of every agent migration names the driver and what it needs.

Right after AUTHORIZED the source sends round 0 with one page, slot 0: a JSON document padded with NUL
bytes to the page size — the driver's name (the destination looks it up in its registry; nothing is
guessed), the data plane, and the driver's own fields (QEMU: RAM, accelerator, guest parameters). The
drivers' own rounds start at 1. A driver whose memory has a page 0 sends it again in its first round,
so that the destination's digest table, and so COMMIT, covers the VM's page, not the manifest.

The manifest is bound to the grant. SOURCE_HELLO announces its SHA-256 (:meth:`Manifest.digest`, over
its canonical JSON); a grant that binds a manifest (``Grant.manifest_digest``, signed with the grant)
refuses any other announcement in the handshake, and the destination refuses a round 0 whose manifest
does not hash to the digest the grant binds (:func:`check_manifest`) — so a source cannot swap the VM
definition the destination will run. A grant that binds none is accepted only for manifests that run
nothing of the user's own (the in-memory VM, the bare reference guest): anything else — a user's VM
definition, a clone's new identity — travels only under a grant that binds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from secmig.agent.channel import SecureChannel
from secmig.agent.vmdef import definition_from_json
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import AuthorizationError, ConfigError, MigrationError
from secmig.security.encoding import canonical_json
from secmig.security.events import Aborted, Authorized, PageBatch, RoundEnd, RoundStart

MANIFEST_ROUND = 0
MANIFEST_SLOT = 0
FIRST_DATA_ROUND = MANIFEST_ROUND + 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the destination must know before the first page of a VM arrives."""

    driver: DriverKind
    data_plane: DataPlane
    vm: dict[str, Any] = field(default_factory=dict)
    """The driver's own fields (QEMU: the VM definition, the operation's options)."""
    clone_binding: dict[str, Any] | None = None
    """A clone's new identity: its signed location binding (new VM id, new MAC, the destination host)."""

    def document(self) -> dict[str, Any]:
        """The manifest as JSON."""
        doc: dict[str, Any] = {"driver": self.driver.value, "data_plane": self.data_plane.value, "vm": self.vm}
        if self.clone_binding is not None:
            doc["clone_binding"] = self.clone_binding
        return doc

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON: what SOURCE_HELLO announces and a grant binds."""
        return hashlib.sha256(canonical_json(self.document())).digest()

    @property
    def needs_bound_grant(self) -> bool:
        """True when this manifest makes the destination run something of the user's (see the module doc)."""
        if self.clone_binding is not None:
            return True
        if self.driver is DriverKind.MEMORY:
            return False
        doc = self.vm.get("definition")
        try:
            return not definition_from_json(doc, "manifest").builtin
        except ConfigError:
            return True

    def encode(self, page_size: int) -> bytes:
        """One page: the JSON document, NUL-padded (MigrationError when it does not fit)."""
        doc = json.dumps(self.document()).encode()
        if len(doc) > page_size:
            raise MigrationError(f"manifest of {len(doc)} bytes does not fit a {page_size}-byte page")
        return doc.ljust(page_size, b"\0")

    @classmethod
    def decode(cls, page: bytes) -> Manifest:
        """Inverse of :meth:`encode` (MigrationError on anything else)."""
        try:
            doc = json.loads(page.rstrip(b"\0"))
            vm, clone = doc.get("vm", {}), doc.get("clone_binding")
            if not isinstance(vm, dict) or not (clone is None or isinstance(clone, dict)):
                raise TypeError("vm or clone_binding is not an object")
            return cls(DriverKind(doc["driver"]), DataPlane(doc["data_plane"]), vm, clone)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise MigrationError(f"unreadable migration manifest: {err}") from err


def check_manifest(manifest: Manifest, auth: Authorized) -> None:
    """The destination's check of round 0: the manifest the grant binds, or one that needs no binding."""
    if auth.manifest_digest is not None:
        if manifest.digest() != auth.manifest_digest:
            raise AuthorizationError(
                f"{auth.operation.value} of VM {auth.vm_id!r}: the manifest sent is not the one the grant binds"
            )
    elif manifest.needs_bound_grant:
        raise AuthorizationError(
            f"{auth.operation.value} of VM {auth.vm_id!r}: a VM definition or clone identity travels only "
            "under a grant that binds its manifest"
        )


async def send_manifest(channel: SecureChannel, manifest: Manifest, page_size: int) -> None:
    """Round 0: the manifest in slot 0."""
    await channel.send(RoundStart(MANIFEST_ROUND))
    await channel.send(PageBatch(MANIFEST_ROUND, (MANIFEST_SLOT,), manifest.encode(page_size)))
    await channel.send(RoundEnd(MANIFEST_ROUND))


async def receive_manifest(channel: SecureChannel, timeout_s: float) -> Manifest:
    """Read round 0 and decode the manifest it carries."""
    event = await channel.next_event(timeout_s)
    if isinstance(event, RoundStart) and event.round_no == MANIFEST_ROUND:
        event = await channel.next_event(timeout_s)
        if isinstance(event, PageBatch) and event.page_numbers == (MANIFEST_SLOT,):
            manifest = Manifest.decode(bytes(event.data))
            event = await channel.next_event(timeout_s)
            if isinstance(event, RoundEnd):
                return manifest
    if isinstance(event, Aborted):
        raise event.as_error()
    raise MigrationError(f"expected the migration manifest in round 0, got {type(event).__name__}")
