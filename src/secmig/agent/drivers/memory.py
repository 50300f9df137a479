"""The in-memory VM driver: :class:`~secmig.agent.memvm.MemoryVM` behind :class:`~secmig.agent.driver.VMDriver`.

The source runs the one pre-copy driver (:mod:`secmig.agent.precopy_driver`) over the channel with the
VM as its page source and the host's policy preset as configured (QEMU's in-round rule included when
the preset has it); a ``move`` is a non-live stop-and-copy. The destination writes received pages into
a fresh zeroed buffer and restores the VM from the device state at COMMIT, then votes (PREPARED) and
returns it *not running*: the daemon starts it once the source confirmed and the location register
holds the new epoch (see :mod:`secmig.security.state`). On any failure before the vote the buffer is
wiped and nothing is installed; after COMMIT the source is never resumed here on its own.

Crash safety: with a :class:`~secmig.agent.vmstate.VMStore` (an agent's), a VM's RAM is a file in the
store and its state file is rewritten before each step of a migration that a restart must know of —
SENDING when the handshake is done, COMMITTING before the COMMIT frame goes out, RECEIVING while pages
come in, PREPARED before the vote — so that a restarted agent finds every copy and asks the register
what to do with it (see :mod:`secmig.agent.vmstate`). ``crash_point`` marks those steps for tests.
Received pages are written into the VM's buffer and their decrypted frame is zeroed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secmig.agent.channel import SecureChannel
from secmig.agent.driver import DriverContext, SendRequest
from secmig.agent.manifest import FIRST_DATA_ROUND, MANIFEST_SLOT, Manifest
from secmig.agent.memvm import (
    MemoryVM,
    VMState,
    WorkloadSpec,
    device_state_of,
    open_ram,
    restore,
    write_pages,
)
from secmig.agent.precopy_driver import PreCopySender, SendHooks, drive_async
from secmig.agent.report import MigrationHandle, MigrationReport
from secmig.agent.vmstate import IN_DOUBT_PHASES, VMPhase, VMRecord, VMStore, crash_point
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import (
    ChannelClosed,
    IntegrityError,
    LocalProtocolError,
    MigrationAborted,
    MigrationError,
    StateError,
)
from secmig.migration import Finished, StopPolicy, policy_preset
from secmig.migration.result import MigrationResult
from secmig.model.units import PAGE_SIZE
from secmig.security import frames
from secmig.security.events import (
    Abort,
    AbortCode,
    Aborted,
    Authorized,
    Commit,
    DeviceState,
    PageBatch,
    Prepared,
    ReceivedEvent,
    Role,
    RoundEnd,
    RoundStart,
    SendableEvent,
    StopAndCopy,
)
from secmig.security.policy import Operation
from secmig.security.register import Move
from secmig.security.state import RUNNER, State
from secmig.security.tls import scrub

_CRASH_AFTER_BYTES = 1 << 20
"""Test hook: the ``*.transfer`` crash points fire once this much of the VM crossed (mid-transfer)."""


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
        if self.handle.bytes >= _CRASH_AFTER_BYTES:
            crash_point("source.transfer")
        cap = self.handle.rate_cap_bytes_per_s or self.max_bandwidth
        if cap is not None:
            # Each batch earns its send time at the cap (the cap may change mid-way).
            now = time.monotonic()
            self._next_send = max(self._next_send, now - 0.05) + nbytes / cap
            if self._next_send > now:
                await asyncio.sleep(self._next_send - now)
                return
        await asyncio.sleep(0)  # let the reader, the monitor and the control API run


class _RecordingLink:
    """The channel, with the COMMITTING record written (durably) before COMMIT goes out."""

    def __init__(self, channel: SecureChannel, before_commit: Callable[[], None]) -> None:
        self.channel = channel
        self.before_commit = before_commit

    async def send(self, event: SendableEvent) -> None:
        if isinstance(event, Commit):
            self.before_commit()
        await self.channel.send(event)
        if isinstance(event, Commit):
            crash_point("source.commit")

    async def next_event(self, timeout_s: float | None = None) -> ReceivedEvent:
        return await self.channel.next_event(timeout_s)


class MemoryDriver:
    """In-memory VMs on this host."""

    kind = DriverKind.MEMORY

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.store: VMStore | None = ctx.vm_store

    # -- life cycle -----------------------------------------------------------------------------------

    def _new_ram(self, name: str, ram_bytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A fresh zeroed buffer: a file in the store when there is one (StateError if ``name`` has one)."""
        if self.store is None:
            return np.zeros(ram_bytes, dtype=np.uint8)
        try:
            return open_ram(self.store.ram_path(name), ram_bytes, create=True)
        except FileExistsError:
            raise StateError(f"VM {name!r} already has memory on {self.ctx.host_id}") from None

    def _save(self, vm: MemoryVM, phase: VMPhase, **fields: Any) -> None:
        if self.store is not None:
            old = self.store.get(vm.name)
            binding = fields.pop("binding", None if old is None else old.binding)
            self.store.save(
                VMRecord(vm.name, phase, vm.spec.to_json(), vm.writes, binding=binding, move=fields.pop("move", None))
            )

    async def start(self, name: str, spec: dict[str, Any]) -> MemoryVM:
        workload = WorkloadSpec.from_json(spec)
        if self.store is None:
            vm = MemoryVM(name, workload)
        else:
            memory = self._new_ram(name, workload.ram_bytes)
            vm = MemoryVM(name, workload, memory, boot=True)
            self._save(vm, VMPhase.RUNNING)
        vm.start()
        return vm

    def adopt(self, record: VMRecord) -> MemoryVM:
        """The VM a crashed agent left in the store, from its files (not running)."""
        assert self.store is not None
        spec = WorkloadSpec.from_json(record.spec)
        memory = open_ram(self.store.ram_path(record.name), spec.ram_bytes, create=False)
        return restore(record.name, memory, device_state_of(spec, record.writes))

    def describe(self, vm: MemoryVM) -> dict[str, object]:
        return vm.describe()

    def ram_bytes(self, vm: MemoryVM) -> int:
        return vm.ram_bytes

    async def pause(self, vm: MemoryVM) -> None:
        vm.pause()

    async def resume(self, vm: MemoryVM) -> None:
        if vm.state is VMState.CREATED:  # a received VM runs for the first time
            vm.start()
        else:
            vm.resume()
        self._save(vm, VMPhase.RUNNING)

    def keep_stored(self, vm: MemoryVM) -> None:
        """A received copy stays here paused (a copy operation): a restart keeps it so."""
        self._save(vm, VMPhase.STORED)

    async def stop(self, vm: MemoryVM) -> None:
        vm.stop()
        record = None if self.store is None else self.store.get(vm.name)
        if record is not None and record.phase not in IN_DOUBT_PHASES:
            vm.memory[:] = 0  # its file goes: the guest's memory must not stay behind in it
            assert self.store is not None
            self.store.remove(vm.name)

    async def destroy(self, vm: MemoryVM) -> None:
        vm.destroy()
        if self.store is not None:
            self.store.remove(vm.name)

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
            confirm=False,  # stop at the destination's vote: the daemon asks the register, then confirms
        )
        move = Move.of(auth) if auth.operation.relocates else None
        self._save(vm, VMPhase.SENDING, move=move)
        link = _RecordingLink(channel, lambda: self._save(vm, VMPhase.COMMITTING, move=move))
        try:
            finished = await drive_async(sender, link, after_batch=_Pacer(handle, m.max_bandwidth))
        except BaseException as err:
            if RUNNER[channel.conn.state] is not Role.SOURCE:
                raise  # after COMMIT: paused here until the register decides (the daemon asks it)
            await self._unwind(sender, channel, request, err)
            self._save(vm, VMPhase.RUNNING)
            raise
        return self._report(vm, auth, policy, sender, finished, channel)

    async def _unwind(
        self, sender: PreCopySender, channel: SecureChannel, request: SendRequest, err: BaseException
    ) -> None:
        """A failure before the commit point: the source runs again, the destination is told; raises."""
        sender.recover()
        if isinstance(err, LocalProtocolError):
            reason = await _peer_abort_reason(channel)
            raise MigrationAborted(f"destination aborted: {reason}" if reason else str(err)) from err
        with contextlib.suppress(Exception):
            code = AbortCode.INTEGRITY if isinstance(err, IntegrityError) else AbortCode.REQUESTED
            await channel.send(Abort(str(err) or type(err).__name__, code))
        if isinstance(err, ChannelClosed):
            raise MigrationAborted(f"connection to {request.destination} lost: {err}") from err

    def _report(
        self,
        vm: MemoryVM,
        auth: Authorized,
        policy: StopPolicy,
        sender: PreCopySender,
        finished: Finished,
        channel: SecureChannel,
    ) -> MigrationReport:
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
        name = auth.vm_id
        if self.store is not None and self.store.get(name) is not None:
            raise StateError(f"VM {name!r} already has a copy on {self.ctx.host_id}")
        memory = self._new_ram(name, auth.page_size * auth.page_count)
        if self.store is not None:
            self.store.save(VMRecord(name, VMPhase.RECEIVING, {}))
        device: bytes | None = None
        try:
            while True:
                event = await channel.next_event(m.idle_timeout)
                if isinstance(event, PageBatch):
                    write_pages(memory, event.page_numbers, event.data)
                    scrub(event.data)  # the decrypted frame: the pages now live in the VM's buffer only
                    handle.count(len(event.data))
                    if handle.bytes >= _CRASH_AFTER_BYTES:
                        crash_point("destination.transfer")
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
                    crash_point("destination.commit")
                    move = Move.of(auth) if auth.operation.relocates else None
                    self._save(vm, VMPhase.PREPARED, binding=auth.next_binding, move=move)
                    try:
                        await channel.send(Prepared())  # the vote: the daemon starts the VM once confirmed
                    except (ChannelClosed, OSError):
                        if channel.conn.state is not State.PREPARED:
                            raise
                        # The vote may have reached the source: the register decides (the daemon asks it).
                    crash_point("destination.prepared")
                    return vm
                elif isinstance(event, Aborted):
                    raise event.as_error()
                else:
                    raise MigrationError(f"unexpected {type(event).__name__} while receiving")
        except BaseException as err:
            memory[:] = 0  # discard: nothing half-applied
            if self.store is not None:
                self.store.remove(name)
            if not isinstance(err, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    code = AbortCode.INTEGRITY if isinstance(err, IntegrityError) else AbortCode.REQUESTED
                    await channel.send(Abort(str(err) or type(err).__name__, code))
            raise
