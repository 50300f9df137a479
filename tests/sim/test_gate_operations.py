"""Issue 15: operations and the real handshake inside the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from secmig.monitor.rules import RuleSet
from secmig.sim.engine import SimulationSpec
from secmig.sim.gate import SecureRun, run_secure
from secmig.sim.scenario import load_scenario_text

BASE = """
name: ops
seed: 1
until: {until}
datacenters:
  - name: dc
    hosts:
      - {{name: h1, nic: 1Gbit/s, latency: 100us}}
      - {{name: h2, nic: 1Gbit/s, latency: 100us}}
      - {{name: rogue, nic: 1Gbit/s, latency: 100us}}
vms:
  - {{name: vm, host: h1, ram: 64MiB, used: 48MiB, transfer_rate: 200MB/s,
     dirty: {{pattern: uniform, rate: 200pages/s, working_set: 8MiB}}}}
migrations:
  - {{vm: vm, to: {to}, at: 1s, operation: {op}, grant: {grant}, policy: paper}}
attack:
  kind: benign
  outside: [rogue]
"""

OPERATIONS = ("migrate", "copy", "move", "clone", "template")


def _run(op: str, grant: str, to: str = "h2", until: str = "20s") -> SecureRun:
    _, spec = load_scenario_text(BASE.format(op=op, grant=grant, to=to, until=until), "ops.yaml", Path("."))
    assert isinstance(spec, SimulationSpec) and spec.secure
    return run_secure(spec, RuleSet())


def _page_bytes(run: SecureRun) -> float:
    return sum(f.bytes for f in run.sim.flows if f.kind == "migration")


@pytest.mark.parametrize("op", OPERATIONS)
def test_an_ungranted_operation_moves_zero_page_bytes(op: str) -> None:
    """With no grant, each of the five operations is refused by the real handshake: only handshake bytes cross."""
    run = _run(op, "none")
    assert _page_bytes(run) == 0.0
    hs = [f for f in run.sim.flows if f.kind == "handshake"]
    assert len(hs) == 1 and 0 < hs[0].bytes < 20_000
    (effect,) = run.sim.effects
    assert not effect.completed and effect.source_kept and "refused at the gate" in effect.reason
    assert run.sim.location["vm"] == "h1" and not run.sim.images and set(run.sim.vms) == {"vm"}


@pytest.mark.parametrize("grant", ["forged", "replayed", "stale"])
def test_forged_replayed_and_stale_grants_are_refused(grant: str) -> None:
    """A grant edited after signing, one whose nonce is spent, one expired: refused, 0 page bytes."""
    run = _run("migrate", grant)
    assert _page_bytes(run) == 0.0 and run.sim.location["vm"] == "h1"
    ((_vm, _op, decision),) = run.gate.decisions
    assert not decision.accepted and decision.flights >= 2


def test_a_host_outside_the_cluster_is_refused_even_with_a_grant_signed_for_it() -> None:
    """TLS against the cluster CA fails first: the rogue host never sees a page."""
    run = _run("migrate", "none", to="rogue")
    assert _page_bytes(run) == 0.0 and "certificate" in run.sim.effects[0].reason


def test_granted_operations_complete_with_their_effect() -> None:
    """migrate/move: the VM ends on h2; copy: a stored copy, source kept; clone: a new identity running on
    h2, source kept; template: a non-runnable image, source kept."""
    expect_location = {"migrate": "h2", "move": "h2", "copy": "h1", "clone": "h1", "template": "h1"}
    for op in OPERATIONS:
        run = _run(op, "valid")
        (effect,) = run.sim.effects
        assert effect.completed, (op, effect.reason)
        assert _page_bytes(run) >= 48 * 2**20
        assert run.sim.location["vm"] == expect_location[op]
        assert effect.source_kept is (op in ("copy", "clone", "template"))
        if op == "clone":
            assert effect.new_vm == "vm-clone1" and run.sim.location["vm-clone1"] == "h2"
            assert run.sim.vms["vm-clone1"].mac != run.sim.vms["vm"].mac
        elif op in ("copy", "template"):
            assert effect.image is not None and run.sim.images[effect.image] == ("h2", op)
        else:
            assert effect.new_vm is None and effect.image is None
        result = run.sim.results[0]
        # A move is non-live (stop-and-copy: all of it is downtime); the others are live pre-copies.
        assert result.strategy == ("stop-and-copy" if op == "move" else "precopy")


TWICE = """
name: twice
seed: 1
until: 30s
datacenters:
  - name: dc
    hosts:
      - {name: h1, nic: 1Gbit/s, latency: 100us}
      - {name: h2, nic: 1Gbit/s, latency: 100us}
      - {name: h3, nic: 1Gbit/s, latency: 100us}
vms:
  - {name: vm, host: h1, ram: 64MiB, used: 48MiB, transfer_rate: 200MB/s,
     dirty: {pattern: uniform, rate: 200pages/s, working_set: 8MiB}}
migrations:
  - {vm: vm, to: h2, at: 1s, operation: migrate, policy: paper}
  - {vm: vm, to: h3, at: 10s, operation: {op}, policy: paper}
"""


@pytest.mark.parametrize("op", ["migrate", "move"])
def test_a_vm_moved_twice_completes_both_moves(op: str) -> None:
    """Grants are issued when each operation starts, from the VM's binding then: the second move of the
    same VM (from h2, where the first left it) passes the gate and completes."""
    _, spec = load_scenario_text(TWICE.replace("{op}", op), "twice.yaml", Path("."))
    assert isinstance(spec, SimulationSpec)
    run = run_secure(spec, RuleSet())
    assert [d.accepted for _vm, _op, d in run.gate.decisions] == [True, True]
    assert [e.completed for e in run.sim.effects] == [True, True]
    assert run.sim.location["vm"] == "h3"
    assert {(src, dst) for (_vm, src, dst) in run.security.grants} == {("h1", "h2"), ("h2", "h3")}
    assert run.security.bindings["vm"].host_id == "h3" and run.security.bindings["vm"].epoch == 2
