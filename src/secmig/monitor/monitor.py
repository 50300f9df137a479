"""Per-VM and per-vSwitch rates over a sliding window, RTT peaks, bytes moved against RAM.

:meth:`TrafficMonitor.observe` takes samples as they come; :meth:`TrafficMonitor.evaluate` judges the
window that ends at a given instant and returns the verdicts that are not "LOW, continue". Pure: no
clock, no I/O, no knowledge of the sample source.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from secmig.monitor.rules import RuleSet
from secmig.monitor.samples import Action, Level, TrafficSample, Verdict


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
        self._rtt: dict[str, deque[tuple[float, float]]] = defaultdict(deque)
        self._baseline_rtt: dict[str, float] = {}
        self.moved_bytes: dict[str, float] = defaultdict(float)
        self._data_flagged: set[str] = set()
        self.windows_evaluated = 0

    def observe(self, sample: TrafficSample) -> None:
        """Account one sample."""
        if sample.bytes:
            self._vm[sample.vm].append((sample.t_s, sample.bytes))
            self._vswitch[sample.vswitch].append((sample.t_s, sample.bytes))
            self.moved_bytes[sample.vm] += sample.bytes
        self._vm_vswitch[sample.vm] = sample.vswitch
        if sample.rtt_s is not None:
            self._rtt[sample.vm].append((sample.t_s, sample.rtt_s))

    def forget(self, vm: str) -> None:
        """Stop judging a VM (it was destroyed, or left this host)."""
        self.profiles.pop(vm, None)
        self._vm.pop(vm, None)
        self._rtt.pop(vm, None)

    def rate(self, vm: str, now_s: float) -> float:
        """Bytes per second the VM moved over the window ending at ``now_s``."""
        return self._window_sum(self._vm.get(vm), now_s) / self.rules.window

    def vswitch_rate(self, vswitch: str, now_s: float) -> float:
        return self._window_sum(self._vswitch.get(vswitch), now_s) / self.rules.window

    def _window_sum(self, q: deque[tuple[float, float]] | None, now_s: float) -> float:
        if not q:
            return 0.0
        start = now_s - self.rules.window
        while q and q[0][0] <= start - 1e-12:
            q.popleft()
        return sum(b for t, b in q if t <= now_s + 1e-12)

    def evaluate(self, now_s: float) -> list[Verdict]:
        """Judge every known VM over the window ending at ``now_s``."""
        r = self.rules
        out: list[Verdict] = []
        for vm, prof in sorted(self.profiles.items()):
            self.windows_evaluated += 1
            vswitch = self._vm_vswitch.get(vm, "")
            rate = self.rate(vm, now_s)
            if r.rate.enabled and rate > 0 and prof.preset_rate_bytes_per_s > 0:
                ratio = rate / prof.preset_rate_bytes_per_s
                cap = self.vswitch_capacity.get(vswitch, 0.0)
                util = self.vswitch_rate(vswitch, now_s) / cap if cap > 0 else 0.0
                if ratio >= r.rate.high or util >= r.rate.vswitch_high:
                    level, action = Level.HIGH, r.rate.high_action
                elif ratio >= r.rate.medium:
                    level, action = Level.MEDIUM, r.rate.medium_action
                else:
                    level, action = Level.LOW, r.rate.low_action
                if action is not Action.CONTINUE:
                    ev: dict[str, float | str] = {
                        "rate_bytes_per_s": rate,
                        "preset_bytes_per_s": prof.preset_rate_bytes_per_s,
                        "ratio": ratio,
                        "vswitch_utilization": util,
                    }
                    out.append(Verdict(now_s, vm, vswitch, "rate", level, action, ev))
            if r.rtt.enabled:
                peaks = self._rtt_peaks(vm, now_s)
                if peaks > r.rtt.max_peaks:
                    out.append(
                        Verdict(now_s, vm, vswitch, "rtt", Level.HIGH, r.rtt.action, {"rtt_peaks": float(peaks)})
                    )
            if r.data.enabled and vm not in self._data_flagged:
                moved = self.moved_bytes.get(vm, 0.0)
                if moved > r.data.factor * prof.ram_bytes:
                    self._data_flagged.add(vm)
                    ev = {"moved_bytes": moved, "ram_bytes": float(prof.ram_bytes), "factor": moved / prof.ram_bytes}
                    out.append(Verdict(now_s, vm, vswitch, "data", Level.HIGH, r.data.action, ev))
        return out

    def _rtt_peaks(self, vm: str, now_s: float) -> int:
        q = self._rtt.get(vm)
        if not q:
            return 0
        start = now_s - self.rules.window
        while q and q[0][0] <= start - 1e-12:
            q.popleft()
        base = self._baseline_rtt.get(vm)
        peaks = 0
        for _, rtt in q:
            if base is not None and rtt > self.rules.rtt.peak_factor * base:
                peaks += 1
            else:  # the baseline follows the RTTs that are not peaks
                base = rtt if base is None else 0.9 * base + 0.1 * rtt
        if base is not None:
            self._baseline_rtt[vm] = base
        return peaks

    def judge_downtime(self, vm: str, downtime_s: float, now_s: float) -> Verdict | None:
        """The paper's eq. (3): a stop-and-copy downtime over the threshold."""
        d = self.rules.downtime
        if not d.enabled or downtime_s <= d.threshold:
            return None
        ev: dict[str, float | str] = {"downtime_s": downtime_s, "threshold_s": d.threshold}
        return Verdict(now_s, vm, self._vm_vswitch.get(vm, ""), "downtime", Level.HIGH, d.action, ev)
