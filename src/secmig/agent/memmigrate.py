"""Migrating an in-memory VM over a :class:`~secmig.agent.channel.SecureChannel`, both ends.

The source drives the shared pre-copy state machine (:class:`~secmig.migration.PreCopyMigration`) with
the VM's real dirty bitmap: round 0 sends every non-zero page (the destination starts zeroed, as QEMU
skips zero pages), each later round the pages dirtied during the one before, and when the policy says
stop the VM is paused, the rest and the device state are sent, and COMMIT carries the memory digest
built from the per-page digests of what was sent. Any failure before COMMITTED resumes the VM on its
source; the destination wipes what it received.

Rounds are sent whole (the policy's in-round budget test is QEMU's; here a round is one bitmap sync), so
the agent's policies run with ``check_in_round=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secmig.agent.channel import SecureChannel
from secmig.agent.memvm import MemoryVM, restore, write_pages
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.errors import IntegrityError, LocalProtocolError, MigrationAborted, MigrationError
from secmig.migration import (
    AbortMigration,
    Finished,
    PreCopyMigration,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
    StopPolicy,
)
from secmig.model.units import PAGE_SIZE
from secmig.security import frames
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    Committed,
    DeviceState,
    PageBatch,
    RoundEnd,
    RoundStart,
    StopAndCopy,
)
from secmig.security.policy import Operation

COMMIT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SendSettings:
    """How the source sends."""

    policy: StopPolicy
    batch_pages: int = 512
    max_bandwidth_bytes_per_s: float | None = None
    verify_memory: bool = False


async def _peer_abort_reason(channel: SecureChannel) -> str | None:
    """After a local send failed because the state is terminal: the peer's reason, if it sent one."""
    with contextlib.suppress(Exception):
        event = await channel.next_event(0.5)
        if isinstance(event, Aborted):
            return f"{event.code.name.lower()}: {event.reason}"
    return None


class _Sender:
    def __init__(self, vm: MemoryVM, channel: SecureChannel, handle: MigrationHandle, settings: SendSettings) -> None:
        self.vm = vm
        self.channel = channel
        self.handle = handle
        self.settings = settings
        self.table = frames.zero_page_table(PAGE_SIZE, vm.spec.page_count)
        self.table_rows = np.frombuffer(self.table, dtype=np.uint8).reshape(-1, frames.DIGEST_BYTES)
        self.payload_bytes = 0
        self._next_send = time.monotonic()

    async def send_pages(self, round_no: int, pages: npt.NDArray[np.intp]) -> None:
        step = self.settings.batch_pages
        for i in range(0, len(pages), step):
            self.handle.check()
            chunk = pages[i : i + step]
            data = self.vm.read_pages(chunk)
            digests = frames.page_digests(data, PAGE_SIZE)
            self.table_rows[chunk] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, frames.DIGEST_BYTES)
            await self.channel.send(PageBatch(round_no, tuple(chunk.tolist()), data, digests))
            self.payload_bytes += len(data)
            self.handle.count(len(data))
            cap = self.handle.rate_cap_bytes_per_s or self.settings.max_bandwidth_bytes_per_s
            if cap is not None:
                # A token bucket: each batch earns its send time at the cap (the cap may change mid-way).
                now = time.monotonic()
                self._next_send = max(self._next_send, now - 0.05) + len(data) / cap
                if self._next_send > now:
                    await asyncio.sleep(self._next_send - now)
                    continue
            await asyncio.sleep(0)  # let the reader, the monitor and the control API run


async def send_memory_vm(
    vm: MemoryVM,
    channel: SecureChannel,
    auth: Authorized,
    handle: MigrationHandle,
    settings: SendSettings,
    logger: logging.Logger,
    *,
    source: str,
) -> MigrationReport:
    """Run the migration of ``vm`` on an authorized channel; MigrationAborted/Error leave the VM running here.

    On success the VM is paused and its memory still intact; the caller releases (wipes) it.
    """
    t0 = time.monotonic()
    sender = _Sender(vm, channel, handle, settings)
    policy = dataclasses.replace(settings.policy, check_in_round=False)
    used = vm.nonzero_pages()
    ram = vm.spec.ram_bytes
    live = auth.operation is not Operation.MOVE
    device_bytes = len(vm.device_state())
    strategy: PreCopyMigration | StopAndCopyMigration
    if live:
        strategy = PreCopyMigration(ram, len(used) * PAGE_SIZE, device_bytes, policy=policy)
    else:
        strategy = StopAndCopyMigration(ram, len(used) * PAGE_SIZE, device_bytes)
    paused_at: float | None = None
    downtime: float | None = None
    digest = b""
    rounds = 0

    def now() -> float:
        return time.monotonic() - t0

    try:
        if not live:
            vm.pause()
            paused_at = handle.paused_at = time.monotonic()
            used = vm.nonzero_pages()
        vm.sync_dirty()  # dirty logging starts now: every later write is resent
        action = strategy.start(now())
        pages = used
        round_no = 0
        while True:
            if isinstance(action, SendRound):
                await channel.send(RoundStart(round_no))
                await sender.send_pages(round_no, pages)
                await channel.send(RoundEnd(round_no))
                logger.debug("round %d: %d pages", round_no, len(pages))
                pages = vm.sync_dirty()
                round_no += 1
                rounds += 1
                action = strategy.round_done(now(), len(pages))
            elif isinstance(action, StopAndCopyRound):
                handle.check()
                if paused_at is None:
                    vm.pause()
                    paused_at = handle.paused_at = time.monotonic()
                final = np.union1d(pages, vm.sync_dirty()) if live else pages
                await channel.send(StopAndCopy())
                await sender.send_pages(round_no, final)
                await channel.send(DeviceState(vm.device_state()))
                digest = frames.memory_digest_from_table(sender.table, PAGE_SIZE)
                if settings.verify_memory and frames.memory_digest(vm.memory.data, PAGE_SIZE) != digest:
                    raise IntegrityError("source memory changed after it was sent (dirty tracking lost a write)")
                await channel.send(Commit(digest))
                rounds += 1
                event = await channel.next_event(COMMIT_TIMEOUT_S)
                if isinstance(event, Aborted):
                    raise event.as_error()
                if not isinstance(event, Committed):
                    raise MigrationError(f"expected COMMITTED, got {type(event).__name__}")
                downtime = time.monotonic() - paused_at
                action = strategy.stop_and_copy_done(now())
            elif isinstance(action, Finished):
                break
            elif isinstance(action, AbortMigration):
                raise MigrationAborted(action.reason)
            else:  # pragma: no cover - pre-copy never pushes
                raise MigrationError(f"unexpected strategy action {action!r}")
    except LocalProtocolError as err:
        if paused_at is not None:
            vm.resume()
        reason = await _peer_abort_reason(channel)
        raise MigrationAborted(f"destination aborted: {reason}" if reason else str(err)) from err
    except BaseException as err:
        if paused_at is not None:
            vm.resume()
        with contextlib.suppress(Exception):
            code = AbortCode.INTEGRITY if isinstance(err, IntegrityError) else AbortCode.REQUESTED
            await channel.send(Abort(str(err) or type(err).__name__, code))
        raise
    stop = action.reason if isinstance(action, Finished) else ""
    return MigrationReport(
        vm=vm.name,
        source=source,
        destination=auth.peer_host,
        operation=auth.operation.value,
        driver="memory",
        data_plane="channel",
        outcome="completed",
        reason=stop,
        total_time_s=time.monotonic() - t0,
        downtime_s=downtime,
        wire_bytes=channel.bytes_out,
        payload_bytes=sender.payload_bytes,
        rounds=rounds,
        memory_digest=digest.hex(),
        extra={
            "converged": bool(isinstance(action, Finished) and action.converged),
            "ram_bytes": ram,
            "guest_writes": vm.writes,
            "payload_rate_bytes_per_s": sender.payload_bytes / max(time.monotonic() - t0, 1e-9),
        },
    )


Install = Callable[[MemoryVM], Awaitable[None]]
"""Registers the received VM on the destination host (and starts it when the operation relocates it)."""


async def receive_memory_vm(
    channel: SecureChannel,
    auth: Authorized,
    handle: MigrationHandle,
    install: Install,
    logger: logging.Logger,
    *,
    verify_memory: bool = False,
    timeout_s: float = 60.0,
) -> MemoryVM:
    """Receive a VM into a fresh buffer; on any failure the buffer is wiped and nothing is installed."""
    if auth.page_size != PAGE_SIZE:
        raise MigrationAborted(f"in-memory VMs use {PAGE_SIZE}-byte pages, not {auth.page_size}")
    memory = np.zeros(auth.page_size * auth.page_count, dtype=np.uint8)
    device: bytes | None = None
    try:
        while True:
            event = await channel.next_event(timeout_s)
            if isinstance(event, PageBatch):
                write_pages(memory, event.page_numbers, event.data)
                handle.count(len(event.data))
                handle.check()
            elif isinstance(event, RoundStart | RoundEnd | StopAndCopy):
                if isinstance(event, StopAndCopy):
                    handle.paused_at = time.monotonic()
                handle.check()
                logger.debug("%s", event)
            elif isinstance(event, DeviceState):
                device = bytes(event.data)
            elif isinstance(event, Commit):
                if device is None:
                    raise MigrationError("COMMIT before the device state")
                if verify_memory and frames.memory_digest(memory.data, PAGE_SIZE) != event.memory_digest:
                    raise IntegrityError("received memory does not hash to the committed digest")
                vm = restore(auth.vm_id, memory, device)
                await channel.send(Committed())
                await install(vm)
                return vm
            elif isinstance(event, Aborted):
                raise event.as_error()
            else:
                raise MigrationError(f"unexpected {type(event).__name__} while receiving")
    except BaseException as err:
        memory[:] = 0  # discard: nothing half-applied
        if not isinstance(err, asyncio.CancelledError):
            with contextlib.suppress(Exception):
                code = AbortCode.INTEGRITY if isinstance(err, IntegrityError) else AbortCode.REQUESTED
                await channel.send(Abort(str(err) or type(err).__name__, code))
        raise
