"""Small PlanetLab-shaped workloads written to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_traces(directory: Path, n_vms: int, seed: int = 0, busy: float = 0.35) -> Path:
    """``n_vms`` files of 288 integer percentages: a slow daily wave plus noise, seeded."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(288)
    for i in range(n_vms):
        base = busy * 100 * (1 + 0.8 * np.sin(2 * np.pi * (t / 288 + rng.random())))
        values = np.clip(base + rng.normal(0, 12, 288), 0, 100).astype(int)
        (directory / f"vm {i:03d}").write_text("\n".join(str(v) for v in values) + "\n", encoding="ascii")
    return directory


@pytest.fixture
def small_day(tmp_path: Path) -> Path:
    """Twenty VMs' traces (names with a space, as some PlanetLab files have)."""
    return write_traces(tmp_path / "day", 20)
