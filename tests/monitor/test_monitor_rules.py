"""The monitor's rules one by one: rate levels, vSwitch, RTT peaks, data moved, downtime, the rule file."""

from pathlib import Path

import pytest

from secmig.cli import main
from secmig.errors import ConfigError
from secmig.monitor import Action, Level, RuleSet, TrafficMonitor, TrafficSample, VMProfile, load_rules

MB = 1e6
GIB = 2**30


def monitor(rules: RuleSet | None = None) -> TrafficMonitor:
    """One VM 'vm' (preset 10 MB/s, 1 GiB) and a bystander 'calm' (preset 100 MB/s) on vSwitch 'h' of 100 MB/s."""
    profiles = {"vm": VMProfile(10 * MB, GIB), "calm": VMProfile(100 * MB, GIB)}
    return TrafficMonitor(rules or load_rules(), profiles, {"h": 100 * MB})


def feed(m: TrafficMonitor, rate: float, t0: float = 0.0, vm: str = "vm", rtt: float | None = None) -> None:
    for k in range(10):
        m.observe(TrafficSample(t0 + (k + 1) * 0.1, vm, "h", rate * 0.1, rtt_s=rtt, memory=False))


def test_bundled_rule_file_holds_the_paper_values() -> None:
    """rules.yaml is the paper's table: 5 RTT peaks, 3 × VRAM, LOW/MEDIUM/HIGH → continue/check/check-or-destroy."""
    rules = load_rules()
    assert rules == RuleSet(step=0.1)
    assert (rules.rtt.max_peaks, rules.data.factor, rules.on_failed_challenge) == (5, 3.0, Action.DESTROY)
    assert (rules.rate.low_action, rules.rate.medium_action, rules.rate.high_action) == (
        Action.CONTINUE,
        Action.CHALLENGE,
        Action.CHALLENGE,
    )
    assert rules.step_s == pytest.approx(0.1)


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


def test_the_window_slides_so_a_burst_is_caught_before_a_full_window() -> None:
    """A VM at 8 × its preset is MEDIUM after 0.2 s: the window slides by steps, it does not wait a full second."""
    m = monitor()
    m.observe(TrafficSample(0.1, "vm", "h", 8 * MB, memory=False))
    m.observe(TrafficSample(0.2, "vm", "h", 8 * MB, memory=False))
    (v,) = [v for v in m.evaluate(0.2) if v.rule == "rate"]
    assert v.level is Level.MEDIUM and v.evidence["rate_bytes_per_s"] == pytest.approx(16 * MB)
    assert [v.rule for v in m.evaluate(1.3)] == []  # both samples have left the window


def test_a_saturated_vswitch_makes_its_heavy_senders_high() -> None:
    """vSwitch over 90 %: the VM above its preset is HIGH by the vswitch rule, the one under its preset is not."""
    m = monitor(RuleSet.model_validate({"rate": {"medium": 20, "high": 40}}))  # keep the rate rule out of the way
    feed(m, 15 * MB)  # 1.5 × its preset
    feed(m, 40 * MB, vm="calm")  # 0.4 × its preset; the vSwitch at 55 %
    assert m.evaluate(1.0) == []
    feed(m, 15 * MB, t0=1.0)
    feed(m, 80 * MB, t0=1.0, vm="calm")  # the vSwitch at 95 %
    verdicts = m.evaluate(2.0)
    assert [(v.vm, v.rule, v.level) for v in verdicts] == [("vm", "vswitch", Level.HIGH)]
    assert verdicts[0].evidence["vswitch_utilization"] == pytest.approx(0.95)


def test_more_than_five_rtt_peaks_is_abnormal() -> None:
    """Six RTTs over 3 × the baseline in one window flag the VM; five do not."""
    m = monitor()
    feed(m, 1 * MB, rtt=0.001)
    assert not [v for v in m.evaluate(1.0) if v.rule == "rtt"]
    for k in range(10):
        m.observe(TrafficSample(1.0 + (k + 1) * 0.1, "vm", "h", 0.1 * MB, rtt_s=0.01 if k < 5 else 0.001))
    assert not [v for v in m.evaluate(2.0) if v.rule == "rtt"]
    for k in range(10):
        m.observe(TrafficSample(2.0 + (k + 1) * 0.1, "vm", "h", 0.1 * MB, rtt_s=0.01 if k < 6 else 0.001))
    (v,) = [v for v in m.evaluate(3.0) if v.rule == "rtt"]
    assert v.evidence["rtt_peaks"] == 6 and v.action is Action.CHALLENGE


def test_memory_over_three_times_ram_forces_a_stop_once_per_stream() -> None:
    """A migration stream past 3 × VRAM asks to abort, once; app traffic never counts; a new stream starts at 0."""
    m = monitor()
    m.observe(TrafficSample(0.5, "vm", "h", 5 * GIB, memory=False))
    assert not [v for v in m.evaluate(1.0) if v.rule == "data"]
    m.observe(TrafficSample(1.5, "vm", "h", 3.2 * GIB, memory=True, flow="m1"))
    (v,) = [v for v in m.evaluate(2.0) if v.rule == "data"]
    assert v.action is Action.ABORT and v.evidence["factor"] == pytest.approx(3.2)
    m.observe(TrafficSample(2.5, "vm", "h", 1 * GIB, memory=True, flow="m1"))
    assert not [v for v in m.evaluate(3.0) if v.rule == "data"]
    m.observe(TrafficSample(3.5, "vm", "h", 1 * GIB, memory=True, flow="m2"))
    assert m.moved_bytes["vm"] == 1 * GIB
    # A source that cannot tell memory from traffic (memory=None) is counted: the cautious reading.
    m.observe(TrafficSample(4.0, "calm", "h", 3.5 * GIB))
    assert [v.vm for v in m.evaluate(4.0) if v.rule == "data"] == ["calm"]


def test_downtime_over_threshold_aborts_after_a_check() -> None:
    """Paused past 2 s for a stop-and-copy (eq. 3): abort, which checks first (a destroy needs a failed check),
    said once per pause; after the fact too."""
    m = monitor()
    assert m.judge_downtime("vm", 0.5, 1.0) is None
    final = m.judge_downtime("vm", 3.0, 1.0)
    assert final is not None and final.action is Action.ABORT
    m.observe(TrafficSample(1.0, "vm", "h", 0.0, paused_s=1.9))
    assert not [v for v in m.evaluate(1.0) if v.rule == "downtime"]
    m.observe(TrafficSample(1.1, "vm", "h", 0.0, paused_s=2.05))
    (v,) = [v for v in m.evaluate(1.1) if v.rule == "downtime"]
    assert v.evidence["downtime_s"] == pytest.approx(2.05)
    m.observe(TrafficSample(1.2, "vm", "h", 0.0, paused_s=2.15))
    assert not [v for v in m.evaluate(1.2) if v.rule == "downtime"]


def test_disabled_rules_say_nothing() -> None:
    """Each rule has an 'enabled' switch."""
    off = {"enabled": False}
    m = monitor(RuleSet.model_validate({k: off for k in ("rate", "vswitch", "rtt", "data", "downtime")}))
    feed(m, 100 * MB, rtt=0.001)
    m.observe(TrafficSample(1.0, "vm", "h", 4 * GIB, memory=True, paused_s=10.0))
    assert m.evaluate(1.0) == []


def test_bad_rule_file_names_rule_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is one line naming the file, the rule and the field; exit 2 from the CLI."""
    p = tmp_path / "rules.yaml"
    cases = {
        "rate:\n  medium: 2\n  high: 1.5\n": r"rules.yaml: rate: high must be above medium",
        "rtt:\n  max_peaks: lots\n": r"rules.yaml: rtt.max_peaks: ",
        "data:\n  factr: 3\n": r"rules.yaml: data.factr: unknown field",
        "downtime:\n  threshold: soon\n": r"rules.yaml: downtime.threshold: ",
        "window: 1s\nstep: 2s\n": r"rules.yaml: \(top level\): step must not exceed window",
        "- 1\n": r"rules.yaml: expected a mapping of rules",
    }
    for text, pattern in cases.items():
        p.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_rules(p)
    p.write_text("rate:\n  high_action: explode\n")
    assert main(["attack", "run", "low-rate-exfil", "--rules", str(p)]) == 2
    err = capsys.readouterr().err
    assert "rate.high_action: 'explode' is not an action" in err and len(err.strip().splitlines()) == 1


def test_a_non_live_move_is_paused_by_design_and_judged_on_progress() -> None:
    """A cold move paused 5 s while its stream moves: no verdict; 2 s with no byte: a stall, aborted after a check."""
    m = monitor()
    for k in range(1, 51):
        m.observe(TrafficSample(k * 0.1, "vm", "h", 1 * MB, memory=True, paused_s=k * 0.1, dst="b", live=False))
    assert not [v for v in m.evaluate(5.0) if v.rule == "downtime"]
    for k in range(51, 75):
        m.observe(TrafficSample(k * 0.1, "vm", "h", 0.0, memory=True, paused_s=k * 0.1, dst="b", live=False))
    (v,) = [v for v in m.evaluate(7.4) if v.rule == "downtime"]
    assert v.action is Action.ABORT and v.evidence["stalled_s"] == pytest.approx(2.4)


def test_first_contact_and_each_ram_fraction_to_a_destination_ask_for_a_check() -> None:
    """The contact rule once per new destination; the volume rule each further ½ RAM sent to one host."""
    m = monitor()  # RAM 1 GiB
    m.observe(TrafficSample(0.1, "vm", "h", 1e3, memory=False, dst="peer"))
    assert [(v.rule, v.evidence["destination"]) for v in m.evaluate(0.1)] == [("contact", "peer")]
    m.observe(TrafficSample(0.2, "vm", "h", 1e3, memory=False, dst="peer"))
    assert m.evaluate(0.2) == []
    m.observe(TrafficSample(0.3, "vm", "h", 0.6 * GIB, memory=False, dst="peer"))
    assert [v.rule for v in m.evaluate(0.3) if v.rule in ("contact", "volume")] == ["volume"]
    m.observe(TrafficSample(0.4, "vm", "h", 0.1 * GIB, memory=False, dst="peer"))
    assert not [v for v in m.evaluate(0.4) if v.rule == "volume"]  # next mark at 1 GiB
