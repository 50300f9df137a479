"""Per-VM and per-vSwitch rates over a sliding window, RTT peaks, memory moved against RAM, pauses,
and each VM's destinations: first contacts and the bytes it sent each host over its life.

:meth:`TrafficMonitor.observe` takes samples as they come; :meth:`TrafficMonitor.evaluate` judges the
window that ends at a given instant (call it every ``rules.step_s``: the window slides) and returns
every verdict that is not "LOW, continue". :meth:`TrafficMonitor.settle` tells it how a verdict ended,
so that a VM that passed its identity check is not asked again for the same cause before
``rules.recheck`` has passed. Pure: no clock, no I/O, no knowledge of the sample source.

Slow exfiltration: the rate rule alone only sees a leak once the VM's *total* rate crosses ``medium`` ×
its preset, so a VM with honest traffic at 80 % of its preset could leak the other 45 % forever (in the
bundled scenario: below about 22 MB/s). The contact rule asks for the authorization of every new
destination at its first sample, and the volume rule again each ``ram_fraction`` × RAM sent to it; so
the floor is set by the identity check, not by a threshold: a flow the check cannot explain is caught
at its first sample whatever its rate. What stays under the floor is a leak the check *can* explain: to
a host the VM legitimately talks to (see ``secmig attack run all``, which measures the floor).
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
        self._live: dict[str, bool] = {}
        self._last_memory_t: dict[str, float] = {}
        self._contact_t: dict[tuple[str, str], float] = {}
        self._new_contacts: dict[str, list[str]] = defaultdict(list)
        self.sent_to: dict[tuple[str, str], float] = defaultdict(float)
        """Bytes each VM sent each destination host since it was first watched: what the volume rule counts."""
        self._volume_mark: dict[tuple[str, str], float] = {}
        self._destinations: dict[str, set[str]] = defaultdict(set)
        self.windows_evaluated = 0

    # --- samples in ------------------------------------------------------------------------------------

    def observe(self, sample: TrafficSample) -> None:
        """Account one sample (samples of one VM come in time order)."""
        vm = sample.vm
        self._vm_vswitch[vm] = sample.vswitch
        if sample.paused_s > 0.0 and self._paused.get(vm, 0.0) == 0.0:
            self._last_memory_t.pop(vm, None)  # a new pause: progress is counted from its start
        if sample.bytes:
            self._vm[vm].append((sample.t_s, sample.bytes))
            self._vswitch[sample.vswitch].append((sample.t_s, sample.bytes))
            if sample.memory is not False:
                # A stream is one flow to one destination: another destination starts another budget.
                stream = f"{sample.flow}→{sample.dst}" if sample.dst else sample.flow
                if stream and self._stream.get(vm, stream) != stream:
                    self.moved_bytes[vm] = 0.0  # a new stream: the 3 × VRAM budget starts again
                    self._data_flagged.discard(vm)
                if stream:
                    self._stream[vm] = stream
                self.moved_bytes[vm] += sample.bytes
                self._last_memory_t[vm] = sample.t_s
            if sample.dst:
                key = (vm, sample.dst)
                last = self._contact_t.get(key)
                if last is None or sample.t_s - last > self.rules.contact.window:
                    self._new_contacts[vm].append(sample.dst)
                self._contact_t[key] = sample.t_s
                self._destinations[vm].add(sample.dst)
                self.sent_to[key] += sample.bytes
        if sample.rtt_s is not None:
            base = self._rtt_base.get(vm)
            if base is not None and sample.rtt_s > self.rules.rtt.peak_factor * base:
                self._rtt_peaks[vm].append(sample.t_s)
            else:  # the baseline follows the RTTs that are not peaks
                self._rtt_base[vm] = sample.rtt_s if base is None else 0.9 * base + 0.1 * sample.rtt_s
        self._paused[vm] = sample.paused_s
        self._live[vm] = sample.live
        if sample.paused_s == 0.0:
            self._downtime_flagged.discard(vm)

    def forget(self, vm: str) -> None:
        """Stop judging a VM (it was destroyed, or left this host)."""
        self.profiles.pop(vm, None)
        for table in (
            self._vm,
            self._rtt_peaks,
            self._rtt_base,
            self._paused,
            self._stream,
            self.moved_bytes,
            self._live,
            self._last_memory_t,
            self._new_contacts,
        ):
            table.pop(vm, None)
        for dst in self._destinations.pop(vm, set()):
            for pairs in (self._contact_t, self._volume_mark, self.sent_to):
                pairs.pop((vm, dst), None)
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

    def judged_rate(self, vm: str, now_s: float) -> float:
        """The rate the rate rule judges: over ``rate.over`` when set, else over the whole window."""
        over = self.rules.rate.over
        if over is None:
            return self.rate(vm, now_s)
        self._window_sum(self._vm.get(vm), now_s)  # trims the window
        q = self._vm.get(vm) or ()
        return sum(b for t, b in q if now_s - over + _EPS < t <= now_s + _EPS) / over

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
        ratio = self.judged_rate(vm, now_s) / prof.preset_rate_bytes_per_s
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
            if vm not in self._downtime_flagged and paused > 0.0:
                live = self._live.get(vm, True)
                last = self._last_memory_t.get(vm)
                stalled = paused if last is None else min(paused, now_s - last)
                v = self.judge_downtime(vm, paused, now_s, live=live, stalled_s=stalled)
                if v is not None:
                    self._downtime_flagged.add(vm)
                    out.append(v)
            new = self._new_contacts.pop(vm, None)
            if r.contact.enabled and new and r.contact.action is not Action.CONTINUE:
                ev = {"destination": ",".join(sorted(set(new))), "contacts": float(len(set(new)))}
                out.append(Verdict(now_s, vm, vswitch, "contact", Level.MEDIUM, r.contact.action, ev))
            if r.volume.enabled and r.volume.action is not Action.CONTINUE and prof.ram_bytes > 0:
                step = r.volume.ram_fraction * prof.ram_bytes
                over = []
                for dst in sorted(self._destinations.get(vm, ())):
                    sent = self.sent_to[(vm, dst)]
                    if sent >= self._volume_mark.get((vm, dst), step):
                        self._volume_mark[(vm, dst)] = (sent // step + 1) * step
                        over.append((dst, sent))
                if over:
                    dst, sent = max(over, key=lambda x: x[1])
                    ev = {"destination": dst, "sent_bytes": sent, "ram_bytes": float(prof.ram_bytes)}
                    ev["factor"] = sent / prof.ram_bytes
                    out.append(Verdict(now_s, vm, vswitch, "volume", Level.MEDIUM, r.volume.action, ev))
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

    def judge_downtime(
        self, vm: str, downtime_s: float, now_s: float, *, live: bool = True, stalled_s: float | None = None
    ) -> Verdict | None:
        """The paper's eq. (3) for a live VM: a stop-and-copy downtime (so far, or final) over the threshold.

        A non-live operation is paused by design, for as long as its copy takes: it is judged on progress
        instead, ``stalled_s`` (seconds since its stream last moved a byte; the whole pause if unknown)
        over ``stall``. Either way the verdict asks for the rule's action (abort: check, then keep the VM on
        its source), never a destroy without a failed check.
        """
        d = self.rules.downtime
        if not d.enabled:
            return None
        ev: dict[str, float | str] = {"downtime_s": downtime_s, "live": "yes" if live else "no"}
        if live:
            if downtime_s <= d.threshold:
                return None
            ev["threshold_s"] = d.threshold
        else:
            stalled = downtime_s if stalled_s is None else stalled_s
            if stalled <= d.stall:
                return None
            ev.update(stalled_s=stalled, stall_s=d.stall)
        return Verdict(now_s, vm, self._vm_vswitch.get(vm, ""), "downtime", Level.HIGH, d.action, ev)
