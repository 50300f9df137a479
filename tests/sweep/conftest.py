"""A small base scenario and grids for the sweep tests (about 15 ms a point, so that 200 points stay cheap)."""

from __future__ import annotations

from pathlib import Path

import pytest

BASE = """
name: sweep-base
seed: 0
defaults: {policy: qemu, downtime_limit: 300ms}
datacenters:
  - name: dc
    core: 20Gbit/s
    hosts:
      - {name: "h{i}", count: 4, nic: 10Gbit/s}
vms:
  - {name: a, host: h1, ram: 2GiB, used: 1GiB,
     dirty: {pattern: uniform, rate: 20000pages/s, working_set: 512MiB, noise: 0.1}}
  - {name: b, host: h1, ram: 2GiB, used: 1GiB,
     dirty: {pattern: hotspot, rate: 30000pages/s, hot_set: 128MiB, noise: 0.1}}
  - {name: c, host: h2, ram: 2GiB, used: 1GiB,
     dirty: {pattern: sequential, rate: 15000pages/s, working_set: 512MiB, noise: 0.1}}
  - {name: d, host: h2, ram: 2GiB, used: 1GiB,
     dirty: {pattern: uniform, rate: 10000pages/s, working_set: 256MiB, noise: 0.1}}
migrations:
  - {vm: a, to: h3, at: 1s}
  - {vm: b, to: h4, at: 1s}
  - {vm: c, to: h3, at: 1.5s}
  - {vm: d, to: h4, at: 2s}
"""

GRID_200 = """
name: rate-x-nic
scenario: base.yaml
seeds: 5
parameters:
  vms[name=a].dirty.rate: [5000pages/s, 20000pages/s, 60000pages/s, 120000pages/s, 200000pages/s]
  datacenters[0].hosts[0].nic: [1Gbit/s, 2Gbit/s, 5Gbit/s, 10Gbit/s]
  defaults.policy: [qemu, xen]
"""


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A folder holding ``base.yaml`` and a 200-point ``grid.yaml`` over it."""
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "grid.yaml").write_text(GRID_200)
    return tmp_path
