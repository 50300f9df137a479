"""The migration manifest: round 0 of every agent migration names the driver and what it needs.

Right after AUTHORIZED the source sends round 0 with one page, slot 0: a JSON document padded with NUL
bytes to the page size — the driver's name (the destination looks it up in its registry; nothing is
guessed), the data plane, and the driver's own fields (QEMU: RAM, accelerator, guest parameters). The
drivers' own rounds start at 1. A driver whose memory has a page 0 sends it again in its first round,
so that the destination's digest table, and so COMMIT, covers the VM's page, not the manifest.

The manifest travels inside the authenticated channel, after the grant was checked, but the grant's
digest does not cover it: carried in the handshake instead, it would be bound to the grant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from secmig.agent.channel import SecureChannel
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import MigrationError
from secmig.security.events import Aborted, PageBatch, RoundEnd, RoundStart

MANIFEST_ROUND = 0
MANIFEST_SLOT = 0
FIRST_DATA_ROUND = MANIFEST_ROUND + 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the destination must know before the first page of a VM arrives."""

    driver: DriverKind
    data_plane: DataPlane
    vm: dict[str, Any] = field(default_factory=dict)
    """The driver's own fields."""

    def encode(self, page_size: int) -> bytes:
        """One page: the JSON document, NUL-padded (MigrationError when it does not fit)."""
        doc = json.dumps({"driver": self.driver.value, "data_plane": self.data_plane.value, "vm": self.vm}).encode()
        if len(doc) > page_size:
            raise MigrationError(f"manifest of {len(doc)} bytes does not fit a {page_size}-byte page")
        return doc.ljust(page_size, b"\0")

    @classmethod
    def decode(cls, page: bytes) -> Manifest:
        """Inverse of :meth:`encode` (MigrationError on anything else)."""
        try:
            doc = json.loads(page.rstrip(b"\0"))
            vm = doc.get("vm", {})
            if not isinstance(vm, dict):
                raise TypeError("vm is not an object")
            return cls(DriverKind(doc["driver"]), DataPlane(doc["data_plane"]), vm)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise MigrationError(f"unreadable migration manifest: {err}") from err


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
