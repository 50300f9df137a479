"""``secmig calibrate``: the missing-QEMU message, and one small real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from secmig.cli import main


def test_missing_qemu_binary_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --qemu-binary that does not exist: exit 2 and one line saying how to install QEMU."""
    code = main(["calibrate", "--qemu-binary", str(tmp_path / "qemu-system-x86_64"), "--accel", "tcg"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "apt-get install qemu-system-x86" in err


def test_qemu_not_on_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no qemu-system-x86_64 on PATH the same message appears."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["calibrate", "--accel", "tcg"]) == 2
    assert "apt-get install qemu-system-x86" in capsys.readouterr().err


def test_bad_pattern_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --pattern is a usage error, before anything starts."""
    assert main(["calibrate", "--pattern", "zigzag"]) == 2
    assert "--pattern" in capsys.readouterr().err


def test_ram_too_small_for_the_working_set(capsys: pytest.CaptureFixture[str]) -> None:
    """A working set that cannot fit in --ram is refused with the RAM it needs."""
    assert main(["calibrate", "--ram", "64MiB", "--working-set", "64MiB"]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.qemu
def test_calibrate_json_runs_a_real_migration(capsys: pytest.CaptureFixture[str]) -> None:
    """A small calibration prints measured figures (and, where the simulator is there, predictions)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    code = main(
        ["calibrate", "--ram", "128MiB", "--working-set", "16MiB", "--rate", "2000", "--bandwidth", "200MB/s",
         "--accel", "tcg", "--measure", "0.5s", "--timeout", "30s", "--json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accel"] == "tcg"
    assert out["measured"]["converged"] is True and out["resumed_on_destination"] is True
    assert 1500 < out["write_rate_pages_per_s"] < 2500
    assert out["measured"]["bytes_sent"] > 16 << 20
    assert out["cloudsim_total_time_s"] == pytest.approx((128 << 20) / 100e6)
