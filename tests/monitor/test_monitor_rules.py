"""The monitor's rules: levels from rates, RTT peaks, data moved, downtime, and bad rule files."""

from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import ConfigError
from secmig.monitor import Action, Level, RuleSet, TrafficMonitor, TrafficSample, VMProfile, load_rules
from secmig.monitor.actions import carry_out
from secmig.security.audit import MemoryAuditSink

MB = 1e6


def monitor(**kw: object) -> TrafficMonitor:
    return TrafficMonitor(load_rules(), {"vm": VMProfile(10 * MB, 2**30)}, {"h": 1e9}, **kw)  # type: ignore[arg-type]


def feed(m: TrafficMonitor, rate: float, t0: float = 0.0, rtt: float | None = None) -> None:
    for k in range(10):
        m.observe(TrafficSample(t0 + (k + 1) * 0.1, "vm", "h", rate * 0.1, rtt_s=rtt))


@pytest.mark.parametrize(("ratio", "level"), [(0.9, None), (1.3, Level.MEDIUM), (2.5, Level.HIGH)])
def test_rate_levels_follow_the_preset_rate(ratio: float, level: Level | None) -> None:
    """LOW under 1.25 × preset (no verdict), MEDIUM from 1.25 ×, HIGH from 2 ×, both asking for a check."""
    m = monitor()
    feed(m, ratio * 10 * MB)
    verdicts = [v for v in m.evaluate(1.0) if v.rule == "rate"]
    if level is None:
        assert verdicts == []
    else:
        assert verdicts[0].level is level and verdicts[0].action is Action.CHALLENGE
        assert verdicts[0].evidence["ratio"] == pytest.approx(ratio)


def test_more_than_five_rtt_peaks_is_abnormal() -> None:
    """Six RTTs over 3 × the baseline in one window flag the VM; five do not."""
    m = monitor()
    feed(m, 1 * MB, rtt=0.001)
    assert not [v for v in m.evaluate(1.0) if v.rule == "rtt"]
    for k in range(10):
        m.observe(TrafficSample(1.0 + (k + 1) * 0.1, "vm", "h", 0.1 * MB, rtt_s=0.01 if k < 6 else 0.001))
    assert next(v for v in m.evaluate(2.0) if v.rule == "rtt").evidence["rtt_peaks"] == 6


def test_data_over_three_times_ram_forces_a_stop_once() -> None:
    """Moving more than 3 × VRAM asks to abort (force stop + identity check), once."""
    m = monitor()
    m.observe(TrafficSample(0.5, "vm", "h", 3.2 * 2**30))
    data = [v for v in m.evaluate(1.0) if v.rule == "data"]
    assert data and data[0].action is Action.ABORT
    assert not [v for v in m.evaluate(2.0) if v.rule == "data"]


def test_downtime_over_threshold_destroys() -> None:
    """A stop-and-copy downtime over the threshold destroys the VM (eq. 3)."""
    m = monitor()
    assert m.judge_downtime("vm", 0.5, 1.0) is None
    v = m.judge_downtime("vm", 3.0, 1.0)
    assert v is not None and v.action is Action.DESTROY


class Recorder:
    def __init__(self, passes: bool) -> None:
        self.passes = passes
        self.done: list[str] = []

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        return self.passes, "checked"

    def throttle(self, vm: str, now_s: float) -> None:
        self.done.append("throttle")

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        self.done.append("abort")

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        self.done.append("destroy")


@pytest.mark.parametrize(
    ("passes", "final", "done"), [(True, Action.CONTINUE, []), (False, Action.DESTROY, ["abort", "destroy"])]
)
def test_a_failed_identity_check_destroys_and_is_audited(passes: bool, final: Action, done: list[str]) -> None:
    """HIGH → challenge; a pass continues, a failure destroys; either way the decision is audited."""
    m = monitor()
    feed(m, 30 * MB)
    (verdict,) = [v for v in m.evaluate(1.0) if v.rule == "rate"]
    audit, responder = MemoryAuditSink("t"), Recorder(passes)
    out = carry_out(verdict, RuleSet(), responder, audit)
    assert out.action is final and responder.done == done
    assert audit.records[-1].event == "monitor.rate" and audit.records[-1].detail["challenge"] in ("passed", "failed")


def test_bad_rule_file_names_rule_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is one line naming the file, the rule and the field; exit 2."""
    p = tmp_path / "rules.yaml"
    p.write_text("rate:\n  medium: 2\n  high: 1.5\n")
    with pytest.raises(ConfigError, match=r"rules.yaml: rate: high must be above medium"):
        load_rules(p)
    p.write_text("rtt:\n  max_peaks: lots\n")
    with pytest.raises(ConfigError, match=r"rules.yaml: rtt.max_peaks"):
        load_rules(p)
    p.write_text("rate:\n  high_action: explode\n")
    assert main(["attack", "run", "low-rate-exfil", "--rules", str(p)]) == 2
    assert "rate.high_action: 'explode' is not an action" in capsys.readouterr().err
