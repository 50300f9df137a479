"""``secmig predict --qmp``: a running Linux guest profiled over its QMP socket, and bad input."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from secmig.agent.qemu.linuxguest import LinuxGuestParams, boot_linux_guest, build_linux_guest
from secmig.agent.qemu.machine import choose_accel
from secmig.agent.qemu.profile import DirtySample, VMProfile, fit_dirty_model, profile_vm
from secmig.cli import main
from secmig.errors import GuestFetchError
from secmig.model.dirty import Sequential, Uniform

WS_MIB = 64
DIRTY = 5000
RAM_MIB = 256


@pytest.fixture(scope="module")
def profile(qemu_binary: str) -> VMProfile:
    """Boot the Linux guest once and profile it over QMP."""
    try:
        image = build_linux_guest()
    except GuestFetchError as err:
        pytest.skip(f"the Linux guest's Debian packages cannot be fetched: {err}")
    params = LinuxGuestParams(working_set_bytes=WS_MIB << 20, dirty_pages_per_s=DIRTY)
    config = image.machine_config(params, ram_bytes=RAM_MIB << 20, accel=choose_accel("auto"), qemu_binary=qemu_binary)

    async def go(workdir: Path) -> VMProfile:
        async with boot_linux_guest("pg", config, workdir) as (vm, _ready):
            await asyncio.sleep(1.0)
            return await profile_vm(vm, windows_s=(1, 8))

    with tempfile.TemporaryDirectory(prefix="secmig-pg-") as d:
        return asyncio.run(go(Path(d)))


@pytest.mark.qemu
def test_profile_finds_ram_used_memory_and_rate(profile: VMProfile) -> None:
    """RAM is exact; used memory holds the working set; the fitted rate is near the set one."""
    assert profile.ram_bytes == RAM_MIB << 20
    assert WS_MIB << 20 < profile.used_bytes < profile.ram_bytes
    assert 0.75 * DIRTY <= profile.fit.rate_pages_per_s <= 1.25 * DIRTY, profile.fit


@pytest.mark.qemu
def test_profile_finds_the_working_set(profile: VMProfile) -> None:
    """An 8 s window saturates on the 64 MiB working set, and the fit says so within 25 %."""
    assert 0.75 * (WS_MIB << 20) <= profile.working_set_bytes <= 1.25 * (WS_MIB << 20), profile.fit
    assert profile.probe.pause_s < 1.0


def test_fit_tells_sequential_from_uniform() -> None:
    """Points drawn from each model are fitted back to it, with its working set within 5 %."""
    for model, name in ((Sequential(5000, 16384), "sequential"), (Uniform(20000, 50000), "uniform")):
        fit = fit_dirty_model([DirtySample(t, model.dirty_pages(t)) for t in (1, 2, 4, 8)], 40000, 1 << 18)
        assert fit.pattern == name
        assert abs(fit.working_set_pages - model.working_set_pages) <= 0.05 * model.working_set_pages


def test_missing_socket_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--qmp to a socket that does not exist: exit 2 and one line on stderr."""
    assert main(["predict", "--qmp", "unix:/nonexistent/secmig.qmp", "--bandwidth", "100MB/s"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such socket" in err


def test_qmp_excludes_measured_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--qmp with --ram (a measured figure) is refused with exit 2."""
    import socket

    path = tmp_path / "q.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        code = main(["predict", "--qmp", f"unix:{path}", "--ram", "1GiB", "--bandwidth", "1GB/s"])
    assert code == 2
