"""Per-VM and per-vSwitch rates over a sliding window, RTT peaks, memory moved against RAM, pauses.

:meth:`TrafficMonitor.observe` takes samples as they come; :meth:`TrafficMonitor.evaluate` judges the
window that ends at a given instant (call it every ``rules.step_s``: the window slides) and returns
every verdict that is not "LOW, continue". :meth:`TrafficMonitor.settle` tells it how a verdict ended,
so that a VM that passed its identity check is not asked again for the same cause before
``rules.recheck`` has passed. Pure: no clock, no I/O, no knowledge of the sample source.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Level, TrafficSample, Verdict

_EPS = 1e-9
_LEVELS = (Level.LOW, Level.MEDIUM, Level.HIGH)


@dataclass(frozen=True, slots=True)
class VMProfile:
    """What the monitor must know of a VM: its preset transfer rate and its RAM."""

    preset_rate_bytes_per_s: float
    ram_bytes: int


class TrafficMonitor:
    """The paper's monitor at the VM ↔ vSwitch level."""

    def __init__(
        self,
        rules: RuleSet,
        profiles: Mapping[str, VMProfile],
        vswitch_capacity_bytes_per_s: Mapping[str, float] | None = None,
    ) -> None:
        self.rules = rules
        self.profiles = dict(profiles)
        self.vswitch_capacity = dict(vswitch_capacity_bytes_per_s or {})
        self._vm: dict[str, deque[tuple[float, float]]] = defaultdict(deque)
        self._vswitch: dict[str, deque[tuple[float, float]]] = defaultdict(deque)
        self._vm_vswitch: dict[str, str] = {}
        self._rtt_base: dict[str, float] = {}
        self._rtt_peaks: dict[str, deque[float]] = defaultdict(deque)
        self.moved_bytes: dict[str, float] = defaultdict(float)
        """Memory bytes of each VM's current stream (reset when a stream with a new id starts)."""
        self._stream: dict[str, str] = {}
        self._data_flagged: set[str] = set()
        self._paused: dict[str, float] = {}
        self._downtime_flagged: set[str] = set()
        self._cleared: dict[tuple[str, str], tuple[float, Level]] = {}
        self.windows_evaluated = 0

    # --- samples in ------------------------------------------------------------------------------------

    def observe(self, sample: TrafficSample) -> None:
        """Account one sample (samples of one VM come in time order)."""
        vm = sample.vm
        self._vm_vswitch[vm] = sample.vswitch
        if sample.bytes:
            self._vm[vm].append((sample.t_s, sample.bytes))
            self._vswitch[sample.vswitch].append((sample.t_s, sample.bytes))
            if sample.memory is not False:
                if sample.flow and self._stream.get(vm, sample.flow) != sample.flow:
                    self.moved_bytes[vm] = 0.0  # a new stream: the 3 × VRAM budget starts again
                    self._data_flagged.discard(vm)
                if sample.flow:
                    self._stream[vm] = sample.flow
                self.moved_bytes[vm] += sample.bytes
        if sample.rtt_s is not None:
            base = self._rtt_base.get(vm)
            if base is not None and sample.rtt_s > self.rules.rtt.peak_factor * base:
                self._rtt_peaks[vm].append(sample.t_s)
            else:  # the baseline follows the RTTs that are not peaks
                self._rtt_base[vm] = sample.rtt_s if base is None else 0.9 * base + 0.1 * sample.rtt_s
        self._paused[vm] = sample.paused_s
        if sample.paused_s == 0.0:
            self._downtime_flagged.discard(vm)

    def forget(self, vm: str) -> None:
        """Stop judging a VM (it was destroyed, or left this host)."""
        self.profiles.pop(vm, None)
        for table in (self._vm, self._rtt_peaks, self._rtt_base, self._paused, self._stream, self.moved_bytes):
            table.pop(vm, None)
        self._data_flagged.discard(vm)
        self._downtime_flagged.discard(vm)

    # --- what the window says ----------------------------------------------------------------------------

    def _window_sum(self, q: deque[tuple[float, float]] | None, now_s: float) -> float:
        if not q:
            return 0.0
        start = now_s - self.rules.window
        while q and q[0][0] <= start + _EPS:
            q.popleft()
        return sum(b for t, b in q if t <= now_s + _EPS)

    def rate(self, vm: str, now_s: float) -> float:
        """Bytes per second the VM moved over the window ending at ``now_s``."""
        return self._window_sum(self._vm.get(vm), now_s) / self.rules.window

    def vswitch_rate(self, vswitch: str, now_s: float) -> float:
        """Bytes per second through a vSwitch (the VMs' samples at it) over the window ending at ``now_s``."""
        return self._window_sum(self._vswitch.get(vswitch), now_s) / self.rules.window

    def rtt_peaks(self, vm: str, now_s: float) -> int:
        """RTT peaks of the VM in the window ending at ``now_s``."""
        q = self._rtt_peaks.get(vm)
        if not q:
            return 0
        while q and q[0] <= now_s - self.rules.window + _EPS:
            q.popleft()
        return sum(1 for t in q if t <= now_s + _EPS)

    def level(self, vm: str, now_s: float) -> tuple[Level, float]:
        """The VM's rate level and its rate ÷ preset over the window ending at ``now_s``."""
        prof = self.profiles.get(vm)
        if prof is None or prof.preset_rate_bytes_per_s <= 0:
            return Level.LOW, 0.0
        ratio = self.rate(vm, now_s) / prof.preset_rate_bytes_per_s
        r = self.rules.rate
        if ratio >= r.high:
            return Level.HIGH, ratio
        return (Level.MEDIUM if ratio >= r.medium else Level.LOW), ratio

    # --- verdicts --------------------------------------------------------------------------------------

    def evaluate(self, now_s: float) -> list[Verdict]:
        """Judge every known VM over the window ending at ``now_s``."""
        r = self.rules
        out: list[Verdict] = []
        util_of: dict[str, float] = {}
        for vm, prof in sorted(self.profiles.items()):
            self.windows_evaluated += 1
            vswitch = self._vm_vswitch.get(vm, "")
            level, ratio = self.level(vm, now_s)
            rate = ratio * prof.preset_rate_bytes_per_s
            base: dict[str, float | str] = {
                "rate_bytes_per_s": rate,
                "preset_bytes_per_s": prof.preset_rate_bytes_per_s,
                "ratio": ratio,
            }
            if r.rate.enabled and level is not Level.LOW:
                action = r.rate.high_action if level is Level.HIGH else r.rate.medium_action
                self._emit(out, Verdict(now_s, vm, vswitch, "rate", level, action, dict(base)))
            if r.vswitch.enabled and vswitch in self.vswitch_capacity and rate > 0 and ratio >= r.vswitch.min_ratio:
                if vswitch not in util_of:
                    cap = self.vswitch_capacity[vswitch]
                    util_of[vswitch] = self.vswitch_rate(vswitch, now_s) / cap if cap > 0 else 0.0
                if util_of[vswitch] >= r.vswitch.high:
                    ev = {**base, "vswitch_utilization": util_of[vswitch]}
                    self._emit(out, Verdict(now_s, vm, vswitch, "vswitch", Level.HIGH, r.vswitch.action, ev))
            if r.rtt.enabled:
                peaks = self.rtt_peaks(vm, now_s)
                if peaks > r.rtt.max_peaks:
                    ev = {"rtt_peaks": float(peaks), "max_peaks": float(r.rtt.max_peaks)}
                    self._emit(out, Verdict(now_s, vm, vswitch, "rtt", Level.HIGH, r.rtt.action, ev))
            moved = self.moved_bytes.get(vm, 0.0)
            if r.data.enabled and vm not in self._data_flagged and moved > r.data.factor * prof.ram_bytes:
                self._data_flagged.add(vm)
                ev = {"moved_bytes": moved, "ram_bytes": float(prof.ram_bytes), "factor": moved / prof.ram_bytes}
                out.append(Verdict(now_s, vm, vswitch, "data", Level.HIGH, r.data.action, ev))
            paused = self._paused.get(vm, 0.0)
            if vm not in self._downtime_flagged:
                v = self.judge_downtime(vm, paused, now_s)
                if v is not None:
                    self._downtime_flagged.add(vm)
                    out.append(v)
        return out

    def _emit(self, out: list[Verdict], v: Verdict) -> None:
        if v.action is Action.CONTINUE:
            return
        cleared = self._cleared.get((v.vm, v.rule))
        if cleared is not None and v.t_s < cleared[0] - _EPS and _LEVELS.index(v.level) <= _LEVELS.index(cleared[1]):
            return  # the VM passed its check for this cause a moment ago, at this level or above
        out.append(v)

    def settle(self, final: Verdict) -> None:
        """How a verdict ended: a VM that passed its check is left alone for ``rules.recheck``."""
        if final.evidence.get("challenge") == "passed":
            self._cleared[(final.vm, final.rule)] = (final.t_s + self.rules.recheck, final.level)
        if final.action is Action.DESTROY:
            self.forget(final.vm)

    def judge_downtime(self, vm: str, downtime_s: float, now_s: float) -> Verdict | None:
        """The paper's eq. (3): a stop-and-copy downtime (so far, or final) over the threshold."""
        d = self.rules.downtime
        if not d.enabled or downtime_s <= d.threshold:
            return None
        ev: dict[str, float | str] = {"downtime_s": downtime_s, "threshold_s": d.threshold}
        return Verdict(now_s, vm, self._vm_vswitch.get(vm, ""), "downtime", Level.HIGH, d.action, ev)
