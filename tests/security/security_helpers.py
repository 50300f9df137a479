"""Helpers for the security tests: a migration setup, and pre-copy with the agents' one driver (fixtures: conftest.py).

A uniquely named module, because ``from conftest import`` would be ambiguous across test folders.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from secmig.agent.precopy_driver import LoopbackLink, PreCopySender, drive_sync
from secmig.errors import MigrationError, SecurityError
from secmig.migration import StopPolicy
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
)
from secmig.security.credentials import LocationBinding
from secmig.security.events import ReceivedEvent
from secmig.security.grants import Grant
from secmig.security.loopback import ConnectionPair, Tamper

PAGE = 4096
VM = "vm-1"
VM_MAC = "52:54:00:00:00:01"


@dataclass
class Setup:
    """Everything one migration test needs, with overridable pieces."""

    cluster: Cluster
    source_host: str = "hv-a"
    destination_host: str = "hv-b"
    operation: Operation = Operation.MIGRATE
    page_count: int = 64
    page_size: int = PAGE
    nonces: MemoryNonceStore = field(default_factory=MemoryNonceStore)
    bindings: MemoryBindingRegistry = field(default_factory=MemoryBindingRegistry)
    source_audit: MemoryAuditSink = field(default_factory=lambda: MemoryAuditSink("hv-a"))
    destination_audit: MemoryAuditSink = field(default_factory=lambda: MemoryAuditSink("hv-b"))

    def binding(self, host: str | None = None, epoch: int = 0) -> LocationBinding:
        """A current binding for the VM on ``host`` (default: the source)."""
        return self.cluster.issue_binding(VM, VM_MAC, host or self.source_host, epoch)

    def grant(self, **overrides: object) -> Grant:
        """A valid grant for this setup; keyword overrides go to issue_grant."""
        kwargs: dict[str, object] = {
            "current_binding": self.binding(),
        }
        kwargs.update(overrides)
        op = kwargs.pop("operation", self.operation)
        vm = kwargs.pop("vm_id", VM)
        src = kwargs.pop("source_host", self.source_host)
        dst = kwargs.pop("destination_host", self.destination_host)
        return self.cluster.issue_grant(op, vm, src, dst, **kwargs)  # type: ignore[arg-type]

    def pair(
        self,
        grant: Grant | None,
        binding: LocationBinding | None = None,
        *,
        tamper: Tamper | None = None,
        source_identity: object = None,
        destination_clock: Callable[[], float] | None = None,
    ) -> ConnectionPair:
        """Two connected ends; the source asks for this setup's operation with ``grant``."""
        src_id = source_identity or self.cluster.host_identity(self.source_host)
        request = MigrationRequest(
            self.operation, VM, self.page_size, self.page_count, grant, binding or self.binding()
        )
        source = MigrationConnection.source(src_id, self.cluster.trust, request, audit=self.source_audit)  # type: ignore[arg-type]
        kwargs = {} if destination_clock is None else {"clock": destination_clock}
        destination = MigrationConnection.destination(
            self.cluster.host_identity(self.destination_host),
            self.cluster.trust,
            nonces=self.nonces,
            bindings=self.bindings,
            audit=self.destination_audit,
            **kwargs,
        )
        return ConnectionPair(source, destination, tamper=tamper)


class _DirtyingGuest:
    """A page source over ``memory`` whose seeded guest dirties pages during each live round.

    Round 0 sends every page; at the end of round r the guest has written ``max(1, pages // (4 (r + 1)))``
    random pages; once paused it writes nothing.
    """

    def __init__(self, memory: bytearray, page_size: int, seed: int) -> None:
        self.memory = memory
        self.page_size = page_size
        self.page_count = len(memory) // page_size
        self.rng = random.Random(seed)
        self.dirty: set[int] = set()
        self.rounds = 0
        self.logging = False
        self.paused = False

    def nonzero_pages(self) -> npt.NDArray[np.intp]:
        return np.arange(self.page_count, dtype=np.intp)

    def sync_dirty(self) -> npt.NDArray[np.intp]:
        if self.logging and not self.paused:
            for _ in range(max(1, self.page_count // (4 * (self.rounds + 1)))):
                n = self.rng.randrange(self.page_count)
                off = n * self.page_size + self.rng.randrange(self.page_size - 8)
                self.memory[off : off + 8] = self.rng.randbytes(8)
                self.dirty.add(n)
            self.rounds += 1
        self.logging = True  # the first sync starts dirty logging
        pages = np.array(sorted(self.dirty), dtype=np.intp)
        self.dirty.clear()
        return pages

    def read_pages(self, pages: npt.NDArray[np.intp]) -> bytes:
        size = self.page_size
        return b"".join(self.memory[n * size : (n + 1) * size] for n in pages.tolist())

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def device_state(self) -> bytes:
        return b"cpu-and-devices"


def run_precopy(
    pair: ConnectionPair,
    memory: bytearray,
    page_size: int,
    *,
    rounds: int = 3,
    seed: int = 1,
    batch_pages: int = 16,
) -> bytearray:
    """Migrate ``memory`` with pre-copy while a seeded 'guest' keeps dirtying it; returns the destination's copy.

    The agents' pre-copy driver runs over the in-memory link, with a policy of exactly ``rounds`` live rounds.
    """
    dest = bytearray(len(memory))

    def destination_end(event: ReceivedEvent) -> None:
        if isinstance(event, PageBatch):
            mv = memoryview(event.data)
            for i, n in enumerate(event.page_numbers):
                dest[n * page_size : (n + 1) * page_size] = mv[i * page_size : (i + 1) * page_size]
        elif isinstance(event, Commit):
            pair.send(Role.DESTINATION, Committed())

    policy = StopPolicy(name=f"{rounds} rounds", max_rounds=rounds, on_nonconvergence="force")
    sender = PreCopySender(_DirtyingGuest(memory, page_size, seed), policy, batch_pages=batch_pages)
    with contextlib.suppress(MigrationError, SecurityError):  # a refused commit: the source keeps its VM
        drive_sync(sender, LoopbackLink(pair, destination_end))
    return dest
