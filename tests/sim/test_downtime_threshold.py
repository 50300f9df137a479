"""Issue 15: the downtime threshold is one setting (``rules.yaml``: ``downtime.threshold``) with the paper's
meaning (eq. 3): the monitor flags a stop-and-copy pause over it, and the ``paper`` stop policy does not start
a stop-and-copy estimated to last longer."""

from __future__ import annotations

from pathlib import Path

import pytest

from secmig.migration.policy import DOWNTIME_THRESHOLD_S, policy_preset
from secmig.monitor import RuleSet, TrafficMonitor, VMProfile, load_rules
from secmig.monitor.rules import with_overrides
from secmig.sim.engine import SimulationSpec
from secmig.sim.gate import SecureRun, run_secure
from secmig.sim.scenario import load_scenario_text

# A VM dirtying its 12 MiB working set faster than 100 Mbit/s drains it: the paper's policy forces the stop
# after 3 × RAM sent, with about 1 s of stop-and-copy left.
DOC = """
name: downtime
seed: 1
until: 60s
datacenters:
  - name: dc
    hosts:
      - {name: h1, nic: 100Mbit/s, latency: 100us}
      - {name: h2, nic: 100Mbit/s, latency: 100us}
vms:
  - {name: vm, host: h1, ram: 64MiB, used: 48MiB, transfer_rate: 200MB/s,
     dirty: {pattern: uniform, rate: 20000pages/s, working_set: 12MiB}}
migrations:
  - {vm: vm, to: h2, at: 1s, policy: paper}
"""


def _rules(threshold_s: float) -> RuleSet:
    # The data rule would abort the harvest-like stream first; this test is about the downtime threshold.
    return with_overrides(load_rules(), {"downtime": {"threshold": threshold_s}, "data": {"enabled": False}}, "t")


def _run(threshold_s: float) -> SecureRun:
    _, spec = load_scenario_text(DOC, "downtime.yaml", Path("."))
    assert isinstance(spec, SimulationSpec)
    return run_secure(spec, _rules(threshold_s))


def test_the_rule_file_and_the_paper_preset_share_one_default() -> None:
    assert load_rules().downtime.threshold == DOWNTIME_THRESHOLD_S == RuleSet().downtime.threshold
    assert policy_preset("paper").abort_if_downtime_over_s == DOWNTIME_THRESHOLD_S
    assert policy_preset("paper").with_downtime_threshold(0.5).abort_if_downtime_over_s == 0.5
    assert policy_preset("xen").with_downtime_threshold(0.5) == policy_preset("xen")  # no abort limit to set


@pytest.mark.parametrize(("threshold_s", "completes", "flagged"), [(2.0, True, False), (0.5, False, True)])
def test_changing_the_one_threshold_changes_the_policy_and_the_monitor(
    threshold_s: float, completes: bool, flagged: bool
) -> None:
    """About 1 s of stop-and-copy: under 2 s the paper's policy starts it and the migration completes; at
    0.5 s the same run's policy refuses to stop the VM (it stays on its source), and the monitor flags a
    1 s pause it let pass at 2 s."""
    run = _run(threshold_s)
    (effect,) = run.sim.effects
    assert effect.completed is completes
    assert run.sim.location["vm"] == ("h2" if completes else "h1")
    if not completes:
        assert f"over the {threshold_s * 1e3:.0f} ms limit" in effect.reason
    assert not [v for v in run.log.verdicts if v.rule == "downtime"]
    monitor = TrafficMonitor(_rules(threshold_s), {"vm": VMProfile(200e6, 64 << 20)}, {})
    assert (monitor.judge_downtime("vm", 1.0, 10.0) is not None) is flagged
