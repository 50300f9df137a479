"""Fuzzing the whole connection (issue 12): both roles, every state an honest run reaches, adversarial frames
in, nothing but the protocol's own errors out. CI runs a seeded slice; ``benchmarks/fuzz.py`` runs 1,000,000."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _engine() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("secmig_fuzz_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_frames_raise_only_protocol_errors(tmp_path: Path, seed: int) -> None:
    """6,000 structure-aware frames over every reachable (role, state) and 40 real-TLS cases: no finding."""
    fuzz = _engine()
    world = fuzz.World.create(tmp_path)
    report = fuzz.campaign(world, 6_000, seed)
    report.merge(fuzz.tls_campaign(world, 40, seed))
    assert report.findings == []
    assert report.frames >= 6_000
    reached = {key.split(":", 1)[1] for key in report.states}
    for state in ("await-source-hello", "await-destination-hello", "await-authorization", "in-round", "stopped"):
        assert state in reached
    assert report.outcomes["RemoteProtocolError"] > 0 and report.outcomes["Aborted"] > 0


def test_fuzz_engine_reports_a_foreign_exception(tmp_path: Path) -> None:
    """The engine's oracle is live: an audit sink that raises KeyError on refusals is reported as a finding."""
    fuzz = _engine()
    world = fuzz.World.create(tmp_path)

    class Broken(fuzz.EncodingAuditSink):  # type: ignore[name-defined,misc]
        def record(self, event: str, *args: object, **kwargs: object) -> None:
            if event == "protocol.error":
                raise KeyError("audit exploded")

    world.audit = Broken()
    report = fuzz.campaign(world, 300, 3)
    assert any("KeyError" in f for f in report.findings)
