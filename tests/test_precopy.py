"""The pre-copy state machine and its stop policies, driven by hand."""

import pytest

from secmig.errors import ConfigError, LocalProtocolError
from secmig.migration import (
    AbortMigration,
    Finished,
    Phase,
    PostCopyMigration,
    PostCopyPush,
    PreCopyMigration,
    SendRound,
    StopAndCopyMigration,
    StopAndCopyRound,
    StopReason,
    policy_preset,
)
from secmig.migration.precopy import TRANSITIONS
from secmig.model.analytic import PAGE_WIRE_BYTES, ZERO_PAGE_WIRE_BYTES

GiB = 2**30


def drive(m: PreCopyMigration, dirty: int, bw: float = 1e8, max_steps: int = 10_000) -> object:
    """Run a migration where every live round dirties ``dirty`` pages, at bandwidth ``bw``."""
    now = 0.0
    action = m.start(now)
    for _ in range(max_steps):
        if isinstance(action, SendRound):
            now += action.bytes / bw
            action = m.round_done(now, dirty)
        elif isinstance(action, StopAndCopyRound):
            now += action.bytes / bw
            action = m.stop_and_copy_done(now)
        else:
            return action
    raise AssertionError("did not end")


def test_round_zero_sends_used_pages_in_full_and_zero_pages_as_markers() -> None:
    """Untouched pages cost a few bytes each, as in QEMU."""
    m = PreCopyMigration(4 * GiB, 1 * GiB, policy=policy_preset("qemu"))
    first = m.start(0.0)
    assert isinstance(first, SendRound)
    assert first.pages == GiB // 4096 and first.zero_pages == 3 * GiB // 4096
    assert first.bytes == first.pages * PAGE_WIRE_BYTES + first.zero_pages * ZERO_PAGE_WIRE_BYTES


def test_qemu_policy_stops_when_the_rest_fits_the_downtime_limit() -> None:
    """Converges once remaining ÷ measured bandwidth ≤ 300 ms."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("qemu"))
    end = drive(m, dirty=1000)  # 4 MB at 100 MB/s = 41 ms
    assert isinstance(end, Finished) and end.converged
    assert len(m.rounds) == 2 and not m.rounds[-1].live


def test_qemu_policy_aborts_when_it_never_converges() -> None:
    """Too many dirty pages every round: the hard cap aborts and the VM stays on the source."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("qemu").with_overrides(max_time_s=60))
    end = drive(m, dirty=200_000)
    assert isinstance(end, AbortMigration) and "did not converge" in end.reason


def test_xen_policy_stops_at_30_rounds() -> None:
    """Xen forces the stop-and-copy after 30 live rounds."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("xen"))
    end = drive(m, dirty=5000)
    assert isinstance(end, Finished) and not end.converged and "30 rounds" in end.reason
    assert sum(r.live for r in m.rounds) == 30


def test_xen_policy_stops_at_three_times_ram() -> None:
    """Xen forces the stop-and-copy once 3 × RAM has been sent."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("xen"))
    end = drive(m, dirty=GiB // 4096)
    assert isinstance(end, Finished) and "RAM sent" in end.reason
    assert m.bytes_sent >= 3 * GiB


def test_paper_policy_converges_under_th_and_aborts_on_long_downtime() -> None:
    """Th = 50 pages converges; an estimated downtime over its limit aborts."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("paper"))
    end = drive(m, dirty=10)
    assert isinstance(end, Finished) and end.converged
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("paper"))
    end = drive(m, dirty=GiB // 4096)
    assert isinstance(end, AbortMigration) and "downtime" in end.reason


def test_stop_and_copy_baseline_is_one_paused_copy() -> None:
    """The non-live baseline sends everything once, with the VM paused."""
    m = StopAndCopyMigration(GiB, GiB // 2, device_state_bytes=1000)
    action = m.start(0.0)
    assert isinstance(action, StopAndCopyRound)
    assert isinstance(m.stop_and_copy_done(1.0), Finished)
    with pytest.raises(LocalProtocolError):
        m.round_done(2.0, 0)


def test_out_of_order_calls_are_local_protocol_errors() -> None:
    """The driver cannot report a round before starting, or finish twice."""
    m = PreCopyMigration(GiB, GiB, policy=policy_preset("qemu"))
    with pytest.raises(LocalProtocolError):
        m.round_done(0.0, 0)
    with pytest.raises(LocalProtocolError):
        m.stop_and_copy_done(0.0)


def test_unknown_policy_names_the_choices() -> None:
    """A typo in a policy name lists the presets."""
    with pytest.raises(ConfigError, match="qemu, xen, paper"):
        policy_preset("kvm")


def test_every_phase_change_is_in_the_table() -> None:
    """Each phase has a row; terminal phases go nowhere, so a finished migration cannot be aborted."""
    assert set(TRANSITIONS) == set(Phase)
    assert not TRANSITIONS[Phase.DONE] and not TRANSITIONS[Phase.ABORTED]
    m = StopAndCopyMigration(GiB, GiB)
    m.start(0.0)
    m.stop_and_copy_done(1.0)
    assert m.phase is Phase.DONE
    with pytest.raises(LocalProtocolError, match="cannot become aborted"):
        m.abort(2.0, "too late")
    with pytest.raises(LocalProtocolError):
        PreCopyMigration(GiB, GiB).push_done(0.0, 0.0)


def test_hybrid_switch_is_told_by_its_stop_reason_not_its_text() -> None:
    """The hybrid's switch carries StopReason.POSTCOPY; a converged stop finishes with CONVERGED."""
    hybrid = PreCopyMigration(GiB, GiB, policy=policy_preset("xen"), postcopy_after_rounds=1)
    hybrid.start(0.0)
    switch = hybrid.round_done(10.0, 100_000)
    assert isinstance(switch, StopAndCopyRound) and switch.stop is StopReason.POSTCOPY
    push = hybrid.stop_and_copy_done(10.1)
    assert isinstance(push, PostCopyPush) and hybrid.phase is Phase.POSTCOPY and push.pages == 100_000
    end = hybrid.push_done(14.0, 12.0)
    assert isinstance(end, Finished) and end.stop is StopReason.POSTCOPY and hybrid.phase is Phase.DONE
    calm = PreCopyMigration(GiB, GiB, policy=policy_preset("xen"), postcopy_after_rounds=1)
    calm.start(0.0)
    stop = calm.round_done(10.0, 10)
    assert isinstance(stop, StopAndCopyRound) and stop.stop is StopReason.CONVERGED
    done = calm.stop_and_copy_done(10.1)
    assert isinstance(done, Finished) and done.stop is StopReason.CONVERGED
    post = PostCopyMigration(GiB, GiB)
    assert post.start(0.0).stop is StopReason.POSTCOPY  # type: ignore[union-attr]
    assert isinstance(post.stop_and_copy_done(0.01), PostCopyPush)
