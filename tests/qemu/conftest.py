"""Fixtures for the tests that run real QEMU: skipped, with the reason, only when QEMU is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from secmig.agent.qemu.guest import build_guest

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def guest_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the reference guest cannot be built")
    return build_guest(cache_dir=tmp_path_factory.mktemp("guest-cache"))


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # A short path: QMP's Unix socket path must fit in 108 bytes.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="secmig-t-") as d:
        yield Path(d)
