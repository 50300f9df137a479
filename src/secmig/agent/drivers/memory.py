"""The in-memory VM driver: :class:`~secmig.agent.memvm.MemoryVM` behind :class:`~secmig.agent.driver.VMDriver`.

The source runs the one pre-copy driver (:mod:`secmig.agent.precopy_driver`) over the channel with the
VM as its page source and the host's policy preset as configured (QEMU's in-round rule included when
the preset has it); a ``move`` is a non-live stop-and-copy. The destination writes received pages into
a fresh zeroed buffer and restores the VM from the device state at COMMIT; on any failure the buffer
is wiped and nothing is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np

from secmig.agent.channel import SecureChannel
from secmig.agent.driver import DriverContext, SendRequest
from secmig.agent.manifest import FIRST_DATA_ROUND, MANIFEST_SLOT, Manifest
from secmig.agent.memvm import MemoryVM, VMState, WorkloadSpec, restore, write_pages
from secmig.agent.precopy_driver import PreCopySender, SendHooks, drive_async
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import (
    ChannelClosed,
    IntegrityError,
    LocalProtocolError,
    MigrationAborted,
    MigrationError,
    StateError,
)
from secmig.migration import policy_preset
from secmig.migration.result import MigrationResult
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


async def _peer_abort_reason(channel: SecureChannel) -> str | None:
    """After a local send failed because the state is terminal: the peer's reason, if it sent one."""
    with contextlib.suppress(Exception):
        event = await channel.next_event(0.5)
        if isinstance(event, Aborted):
            return f"{event.code.name.lower()}: {event.reason}"
    return None


class _Pacer:
    """A token bucket at the handle's rate cap (the monitor's throttle) or the host's bandwidth cap."""

    def __init__(self, handle: MigrationHandle, max_bandwidth_bytes_per_s: float | None) -> None:
        self.handle = handle
        self.max_bandwidth = max_bandwidth_bytes_per_s
        self._next_send = time.monotonic()

    async def __call__(self, nbytes: int) -> None:
        self.handle.count(nbytes)
        cap = self.handle.rate_cap_bytes_per_s or self.max_bandwidth
        if cap is not None:
            # Each batch earns its send time at the cap (the cap may change mid-way).
            now = time.monotonic()
            self._next_send = max(self._next_send, now - 0.05) + nbytes / cap
            if self._next_send > now:
                await asyncio.sleep(self._next_send - now)
                return
        await asyncio.sleep(0)  # let the reader, the monitor and the control API run


class MemoryDriver:
    """In-memory VMs on this host."""

    kind = DriverKind.MEMORY

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self, name: str, spec: dict[str, Any]) -> MemoryVM:
        vm = MemoryVM(name, WorkloadSpec.from_json(spec))
        vm.start()
        return vm

    def describe(self, vm: MemoryVM) -> dict[str, object]:
        return vm.describe()

    def ram_bytes(self, vm: MemoryVM) -> int:
        return vm.ram_bytes

    async def pause(self, vm: MemoryVM) -> None:
        vm.pause()

    async def resume(self, vm: MemoryVM) -> None:
        vm.resume()

    async def stop(self, vm: MemoryVM) -> None:
        vm.stop()

    async def destroy(self, vm: MemoryVM) -> None:
        vm.destroy()

    async def close(self) -> None:
        """Nothing beyond the VMs."""

    # -- source ---------------------------------------------------------------------------------------

    def check_send(self, vm: MemoryVM, request: SendRequest) -> None:
        if vm.state is not VMState.RUNNING:
            raise StateError(f"VM {vm.name!r} is {vm.state.value}, not running")

    def geometry(self, vm: MemoryVM) -> tuple[int, int]:
        return PAGE_SIZE, vm.spec.page_count

    def manifest(self, vm: MemoryVM, request: SendRequest) -> dict[str, Any]:
        return {}  # the workload's spec travels in the device state

    async def send(
        self, vm: MemoryVM, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, request: SendRequest
    ) -> MigrationReport:
        """Pre-copy ``vm``; MigrationAborted/Error leave it running here, success leaves it paused and intact."""
        m = self.ctx.config.migration
        limit = request.downtime_limit_s or m.downtime_limit
        policy = policy_preset(m.policy).with_overrides(downtime_limit_s=limit, max_time_s=m.max_time)

        def paused(t: float) -> None:
            handle.paused_at = t

        sender = PreCopySender(
            vm,
            policy,
            live=auth.operation is not Operation.MOVE,
            batch_pages=m.batch_pages,
            first_round=FIRST_DATA_ROUND,
            resend=(MANIFEST_SLOT,),
            memory_digest=(lambda: frames.memory_digest(vm.memory.data, PAGE_SIZE)) if m.verify_memory else None,
            hooks=SendHooks(check=handle.check, paused=paused),
        )
        try:
            finished = await drive_async(sender, channel, after_batch=_Pacer(handle, m.max_bandwidth))
        except LocalProtocolError as err:
            sender.recover()
            reason = await _peer_abort_reason(channel)
            raise MigrationAborted(f"destination aborted: {reason}" if reason else str(err)) from err
        except BaseException as err:
            sender.recover()
            with contextlib.suppress(Exception):
                code = AbortCode.INTEGRITY if isinstance(err, IntegrityError) else AbortCode.REQUESTED
                await channel.send(Abort(str(err) or type(err).__name__, code))
            if isinstance(err, ChannelClosed):
                raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err
            raise
        total = time.monotonic() - sender.started_at
        assert sender.strategy is not None and sender.downtime_s is not None
        result = MigrationResult(
            vm=vm.name,
            source=self.ctx.host_id,
            destination=auth.peer_host,
            strategy="pre-copy" if sender.live else "stop-and-copy",
            policy=policy.name,
            start_s=0.0,
            end_s=total,
            downtime_s=sender.downtime_s,
            converged=finished.converged,
            stop_reason=finished.reason,
            outcome="completed",
            rounds=tuple(sender.strategy.rounds),
            extra=dict(sender.strategy.extra),
        )
        return MigrationReport(
            result,
            operation=auth.operation.value,
            driver=self.kind.value,
            data_plane=DataPlane.CHANNEL.value,
            wire_bytes=channel.bytes_out,
            payload_bytes=sender.payload_bytes,
            memory_digest=sender.digest.hex(),
            extra={
                "converged": finished.converged,
                "ram_bytes": vm.ram_bytes,
                "guest_writes": vm.writes,
                "payload_rate_bytes_per_s": sender.payload_bytes / max(total, 1e-9),
            },
        )

    # -- destination ----------------------------------------------------------------------------------

    async def receive(
        self, channel: SecureChannel, auth: Authorized, handle: MigrationHandle, manifest: Manifest
    ) -> MemoryVM:
        """Receive a VM into a fresh buffer; on any failure the buffer is wiped and nothing is returned."""
        if auth.page_size != PAGE_SIZE:
            raise MigrationAborted(f"in-memory VMs use {PAGE_SIZE}-byte pages, not {auth.page_size}")
        m = self.ctx.config.migration
        log = channel.logger
        memory = np.zeros(auth.page_size * auth.page_count, dtype=np.uint8)
        device: bytes | None = None
        try:
            while True:
                event = await channel.next_event(m.idle_timeout)
                if isinstance(event, PageBatch):
                    write_pages(memory, event.page_numbers, event.data)
                    handle.count(len(event.data))
                    handle.check()
                elif isinstance(event, RoundStart | RoundEnd | StopAndCopy):
                    if isinstance(event, StopAndCopy):
                        handle.paused_at = time.monotonic()
                    handle.check()
                    log.debug("%s", event)
                elif isinstance(event, DeviceState):
                    device = bytes(event.data)
                elif isinstance(event, Commit):
                    if device is None:
                        raise MigrationError("COMMIT before the device state")
                    if m.verify_memory and frames.memory_digest(memory.data, PAGE_SIZE) != event.memory_digest:
                        raise IntegrityError("received memory does not hash to the committed digest")
                    vm = restore(auth.vm_id, memory, device)
                    await channel.send(Committed())
                    if auth.operation.relocates:
                        vm.start()
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
