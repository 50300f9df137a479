"""Helpers for the security tests: a migration setup and a pre-copy driver (fixtures are in conftest.py).

A uniquely named module, because ``from conftest import`` would be ambiguous across test folders.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from secmig.security import (
    Cluster,
    Commit,
    Committed,
    DeviceState,
    MemoryAuditSink,
    MemoryBindingRegistry,
    MemoryNonceStore,
    MigrationConnection,
    MigrationRequest,
    Operation,
    PageBatch,
    Role,
    RoundEnd,
    RoundStart,
    StopAndCopy,
    memory_digest,
)
from secmig.security.credentials import LocationBinding
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


def run_precopy(
    pair: ConnectionPair,
    memory: bytearray,
    page_size: int,
    *,
    rounds: int = 3,
    seed: int = 1,
    batch_pages: int = 16,
) -> bytearray:
    """Migrate ``memory`` with pre-copy while a seeded 'guest' keeps dirtying it; returns the destination's copy."""
    rng = random.Random(seed)
    page_count = len(memory) // page_size
    dest = bytearray(len(memory))
    dirty = set(range(page_count))

    def apply(events: Sequence[object]) -> None:
        for ev in events:
            if isinstance(ev, PageBatch):
                mv = memoryview(ev.data)
                for i, n in enumerate(ev.page_numbers):
                    dest[n * page_size : (n + 1) * page_size] = mv[i * page_size : (i + 1) * page_size]

    def send_dirty(round_no: int) -> None:
        pages = sorted(dirty)
        dirty.clear()
        for k in range(0, len(pages), batch_pages):
            chunk = pages[k : k + batch_pages]
            data = b"".join(memory[n * page_size : (n + 1) * page_size] for n in chunk)
            pair.send(Role.SOURCE, PageBatch(round_no, tuple(chunk), data))
            apply(pair.pump())

    def guest_writes(n_pages: int) -> None:
        for _ in range(n_pages):
            n = rng.randrange(page_count)
            off = n * page_size + rng.randrange(page_size - 8)
            memory[off : off + 8] = rng.randbytes(8)
            dirty.add(n)

    for r in range(rounds):
        pair.send(Role.SOURCE, RoundStart(r))
        send_dirty(r)
        guest_writes(max(1, page_count // (4 * (r + 1))))
        pair.send(Role.SOURCE, RoundEnd(r))
        apply(pair.pump())
    pair.send(Role.SOURCE, StopAndCopy())
    send_dirty(pair.source.current_round)
    pair.send(Role.SOURCE, DeviceState(b"cpu-and-devices"))
    pair.send(Role.SOURCE, Commit(memory_digest(memory, page_size)))
    events = pair.pump()
    apply(events)
    if any(isinstance(e, Commit) for e in events):
        pair.send(Role.DESTINATION, Committed())
        pair.pump()
    return dest
