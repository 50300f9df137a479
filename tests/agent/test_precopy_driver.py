"""The agents' one pre-copy driver over the in-memory link, and the manifest that names a migration's driver."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from secmig.agent.manifest import Manifest
from secmig.agent.precopy_driver import LoopbackLink, PreCopySender, drive_sync
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import MigrationError
from secmig.migration import StopPolicy, policy_preset
from secmig.security import (
    Cluster,
    Commit,
    Committed,
    MemoryAuditSink,
    MemoryBindingRegistry,
    MemoryNonceStore,
    MigrationConnection,
    MigrationRequest,
    Operation,
    PageBatch,
    Role,
    State,
    memory_digest,
)
from secmig.security.events import ReceivedEvent
from secmig.security.loopback import ConnectionPair

PAGE = 4096
PAGES = 256


class BusyGuest:
    """A page source whose guest dirties ``per_sync`` random pages of its first half between syncs."""

    page_size = PAGE
    page_count = PAGES

    def __init__(self, per_sync: int) -> None:
        self.memory = bytearray(random.Random(5).randbytes(PAGES * PAGE))
        self.rng = random.Random(7)
        self.per_sync = per_sync
        self.paused = False
        self.sent_per_round: list[int] = []

    def nonzero_pages(self) -> npt.NDArray[np.intp]:
        return np.arange(PAGES, dtype=np.intp)

    def sync_dirty(self) -> npt.NDArray[np.intp]:
        if self.paused:
            return np.empty(0, dtype=np.intp)
        pages = sorted({self.rng.randrange(PAGES // 2) for _ in range(self.per_sync)})
        for n in pages:
            self.memory[n * PAGE] = (self.memory[n * PAGE] + 1) % 256
        return np.array(pages, dtype=np.intp)

    def read_pages(self, pages: npt.NDArray[np.intp]) -> bytes:
        return b"".join(self.memory[n * PAGE : (n + 1) * PAGE] for n in pages.tolist())

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def device_state(self) -> bytes:
        return b"cpu"


def _pair(cluster: Cluster) -> ConnectionPair:
    binding = cluster.issue_binding("vm-1", "52:54:00:00:00:01", "hv-a")
    grant = cluster.issue_grant(Operation.MIGRATE, "vm-1", "hv-a", "hv-b", current_binding=binding)
    request = MigrationRequest(Operation.MIGRATE, "vm-1", PAGE, PAGES, grant, binding)
    src_id = cluster.host_identity("hv-a")
    source = MigrationConnection.source(src_id, cluster.trust(), request, audit=MemoryAuditSink())
    destination = MigrationConnection.destination(
        cluster.host_identity("hv-b"),
        cluster.trust(),
        nonces=MemoryNonceStore(),
        bindings=MemoryBindingRegistry(),
        audit=MemoryAuditSink(),
    )
    pair = ConnectionPair(source, destination)
    pair.pump()
    return pair


def _migrate(
    cluster: Cluster, guest: BusyGuest, policy: StopPolicy, clock: Callable[[], float] = time.monotonic
) -> tuple[PreCopySender, bytearray, ConnectionPair]:
    pair = _pair(cluster)
    dest = bytearray(PAGES * PAGE)

    def destination_end(event: ReceivedEvent) -> None:
        if isinstance(event, PageBatch):
            guest.sent_per_round.append(len(event.page_numbers))
            for i, n in enumerate(event.page_numbers):
                dest[n * PAGE : (n + 1) * PAGE] = bytes(event.data)[i * PAGE : (i + 1) * PAGE]
        elif isinstance(event, Commit):
            pair.send(Role.DESTINATION, Committed())

    sender = PreCopySender(guest, policy, batch_pages=PAGES, clock=clock)
    drive_sync(sender, LoopbackLink(pair, destination_end))
    return sender, dest, pair


def test_round_end_policy_converges_and_the_copy_matches(cluster: Cluster) -> None:
    """Xen's rule over the real protocol: rounds until fewer than Th pages are dirty; the copy is exact."""
    guest = BusyGuest(per_sync=20)
    sender, dest, pair = _migrate(cluster, guest, policy_preset("xen"))
    assert dest == guest.memory and sender.digest == memory_digest(guest.memory, PAGE)
    assert pair.destination.state is State.DONE and sender.outcome is not None and sender.outcome.converged
    assert sender.strategy is not None and sender.strategy.rounds[-1].live is False


def test_in_round_rule_carries_pages_it_does_not_send(cluster: Cluster) -> None:
    """QEMU's in-round rule: a round sends only the pages the strategy names; the rest still arrive later."""
    guest = BusyGuest(per_sync=120)
    ticks = iter(range(1_000_000))
    # One second per clock reading: round 0 measures about 1 MB/s, so a 50 ms budget is about 12 pages.
    policy = StopPolicy(name="tight", downtime_limit_s=0.05, max_rounds=3, check_in_round=True)
    sender, dest, _ = _migrate(cluster, guest, policy, clock=lambda: float(next(ticks)))
    assert dest == guest.memory
    assert sender.strategy is not None
    first, second = sender.strategy.rounds[:2]
    assert guest.sent_per_round[1] == second.pages + second.zero_pages
    assert guest.sent_per_round[1] < first.dirty_pages_after  # some dirty pages waited for a later round


def test_manifest_names_the_driver() -> None:
    """The manifest round-trips through one page; an unknown driver name is refused, never guessed."""
    m = Manifest(DriverKind.QEMU, DataPlane.RELAY, {"ram_bytes": 1 << 27})
    assert Manifest.decode(m.encode(PAGE)) == m
    with pytest.raises(MigrationError):
        Manifest.decode(b'{"driver": "xen", "data_plane": "relay"}'.ljust(PAGE, b"\0"))
    with pytest.raises(MigrationError):
        Manifest(DriverKind.MEMORY, DataPlane.CHANNEL, {"x": "y" * PAGE}).encode(PAGE)
