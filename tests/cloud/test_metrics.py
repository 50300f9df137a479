"""SLATAH, PDM, SLAV, ESV and the shutdown bookkeeping on a state log worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from secmig.cloud.metrics import StateLog, summarize


def test_metrics_on_a_hand_made_log() -> None:
    """Two hosts over 0–100–300–400 s; one VM migrates during the first 100 s."""
    log = StateLog()
    on = np.array([True])
    # t=0: host0 short of MIPS (90 < 100), host1 idle; the VM migrates and gets 90 of 100.
    log.record(0.0, np.array([90.0, 0.0]), np.array([100.0, 0.0]), np.array([90.0]), np.array([100.0]), on, on)
    # t=100: host0 fine; the VM no longer migrates.
    log.record(
        100.0,
        np.array([100.0, 0.0]),
        np.array([100.0, 0.0]),
        np.array([100.0]),
        np.array([100.0]),
        np.array([False]),
        on,
    )
    # a second record at the same instant replaces the first
    log.record(
        100.0,
        np.array([100.0, 0.0]),
        np.array([100.0, 0.0]),
        np.array([100.0]),
        np.array([100.0]),
        np.array([False]),
        on,
    )
    # t=300: host0 is switched off (idle), t=400 the end.
    log.record(
        300.0, np.array([0.0, 50.0]), np.array([0.0, 50.0]), np.array([50.0]), np.array([50.0]), np.array([False]), on
    )
    log.record(
        400.0, np.array([0.0, 50.0]), np.array([0.0, 50.0]), np.array([50.0]), np.array([50.0]), np.array([False]), on
    )
    m = summarize(log, energy_j=3.6e6, migrations=1)
    # Active host time: host0 0–300 (300 s), host1 300–400 (100 s); short of MIPS 0–100: SLATAH = 100/400.
    assert m.slatah == pytest.approx(0.25)
    # Requested MIPS·s: 100·300 + 50·100 = 35000; lost while migrating: 10·100 = 1000.
    assert m.pdm == pytest.approx(1000 / 35000)
    assert m.slav == pytest.approx(0.25 * 1000 / 35000)
    assert m.energy_kwh == pytest.approx(1.0) and m.esv == pytest.approx(m.slav)
    assert m.overall_sla_violation == pytest.approx(1000 / 35000)
    # host0 active since 0 shuts down at 300 (300 s); host1 is idle at its first entry, which CloudSim
    # counts as a shutdown after 0 s (every host starts "active" in its bookkeeping).
    assert m.shutdowns == 2 and m.mean_time_before_shutdown_s == pytest.approx(150.0)
    # CloudSim's "time before a migration": from the start of the migration (t=0) to its end (t=100).
    assert m.mean_time_before_migration_s == pytest.approx(100.0)
