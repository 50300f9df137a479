"""Real qemu-system-x86_64 (TCG): the guest boots and writes, migrations complete or are cancelled."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from secmig.agent.qemu import (
    GuestParams,
    MachineConfig,
    MigrationSettings,
    QemuError,
    QemuMachine,
    measure_write_rate,
    migrate,
)
from secmig.agent.qemu.guest import GuestState

pytestmark = pytest.mark.qemu

RAM = 128 << 20


def _config(qemu: str, elf: Path, params: GuestParams) -> MachineConfig:
    return MachineConfig(elf, params.append_line(), RAM, "tcg", qemu)


def test_guest_boots_and_its_counter_advances(qemu_binary: str, guest_elf: Path, workdir: Path) -> None:
    """The guest reports its parameters and writes at the rate it was asked for."""
    params = GuestParams(working_set_bytes=16 << 20, rate_pages_per_s=5000, pattern="rand")

    async def run() -> None:
        async with QemuMachine("vm", _config(qemu_binary, guest_elf, params), workdir) as vm:
            st = await vm.wait_guest_running()
            assert st.state == GuestState.RUNNING
            assert st.ws_pages == 4096 and st.rate_pages_per_s == 5000 and st.pattern == 1
            assert abs(st.mem_bytes - RAM) < 2 << 20
            assert st.tsc_hz > 10_000_000
            rate = await measure_write_rate(vm, 1.0)
            assert 0.85 * 5000 < rate.pages_per_s < 1.15 * 5000
            assert await vm.accelerator() == "tcg"

    asyncio.run(run())
    assert "secmig-guest: running" in (workdir / "vm.serial").read_text()


def test_migration_completes_and_the_guest_runs_on(qemu_binary: str, guest_elf: Path, workdir: Path) -> None:
    """A converging migration completes, QEMU's figures are read, the guest writes on at the destination."""
    params = GuestParams(working_set_bytes=16 << 20, rate_pages_per_s=2000, pattern="seq")
    cfg = _config(qemu_binary, guest_elf, params)

    async def run() -> None:
        async with (
            QemuMachine("src", cfg, workdir) as src,
            QemuMachine("dst", replace(cfg, incoming=True), workdir) as dst,
        ):
            await src.wait_guest_running()
            m = await migrate(src, dst, MigrationSettings(200e6, 0.3, timeout_s=30))
            assert m.converged and m.status == "completed"
            assert m.total_time_s > 0 and m.downtime_s is not None and 0 < m.downtime_s < 1.0
            # At least the working set went over the wire, and the zero pages were not sent in full.
            assert 16 << 20 < m.transferred_bytes < RAM
            assert m.normal_pages >= 4096 and m.zero_pages > 0
            assert m.dirty_sync_count >= 2 and m.rounds == m.dirty_sync_count
            assert m.ram_total_bytes >= RAM
            before = (await dst.read_status()).writes
            await asyncio.sleep(0.3)
            assert (await dst.read_status()).writes > before

    asyncio.run(run())


def test_a_migration_that_cannot_converge_is_cancelled(
    qemu_binary: str, guest_elf: Path, workdir: Path
) -> None:
    """Dirtying faster than the link: cancelled at the cap, not converged, the VM still runs on its source."""
    params = GuestParams(working_set_bytes=32 << 20, rate_pages_per_s=0, pattern="seq")
    cfg = _config(qemu_binary, guest_elf, params)

    async def run() -> None:
        async with (
            QemuMachine("src", cfg, workdir) as src,
            QemuMachine("dst", replace(cfg, incoming=True), workdir) as dst,
        ):
            await src.wait_guest_running()
            m = await migrate(src, dst, MigrationSettings(20e6, 0.1, timeout_s=3.0))
            assert not m.converged and m.status == "cancelled"
            assert m.downtime_s is None and m.total_time_s >= 3.0
            assert m.transferred_bytes > 32 << 20 and m.dirty_sync_count >= 2
            status = await src.execute("query-status")
            assert status["running"] is True
            assert (await measure_write_rate(src, 0.3)).writes > 0

    asyncio.run(run())


def test_qemu_is_killed_when_the_caller_fails(qemu_binary: str, guest_elf: Path, workdir: Path) -> None:
    """An error inside the machine's context kills the process: nothing is left running."""
    cfg = _config(qemu_binary, guest_elf, GuestParams(working_set_bytes=4 << 20))
    pids: list[int] = []

    async def run() -> None:
        async with QemuMachine("vm", cfg, workdir) as vm:
            assert vm._proc is not None
            pids.append(vm._proc.pid)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_refused_command_raises_qemu_error(qemu_binary: str, guest_elf: Path, workdir: Path) -> None:
    """QEMU's refusal of a command surfaces as QemuError naming the command, with its cause kept."""
    cfg = _config(qemu_binary, guest_elf, GuestParams(working_set_bytes=4 << 20))

    async def run() -> None:
        async with QemuMachine("vm", cfg, workdir) as vm:
            with pytest.raises(QemuError, match="no-such-command") as info:
                await vm.execute("no-such-command")
            assert info.value.__cause__ is not None

    asyncio.run(run())


def test_qemu_that_exits_at_once_is_reported(qemu_binary: str, guest_elf: Path, workdir: Path) -> None:
    """A QEMU that refuses its command line fails start() with the tail of its own message."""
    cfg = replace(
        _config(qemu_binary, guest_elf, GuestParams(working_set_bytes=4 << 20)), kernel=workdir / "nope"
    )

    async def run() -> None:
        await QemuMachine("vm", cfg, workdir).start()

    with pytest.raises(QemuError, match="exited"):
        asyncio.run(run())
