"""The paper's VM ↔ vSwitch monitor on real NICs: tap counters and ICMP RTTs in, verdicts carried out for real.

Every ``interval`` (the rule set's step, 100 ms by default) :class:`NicMonitor` reads each watched VM NIC's
tap counters and judges what the VM sent (the tap's rx: what the bridge floods to it, or anyone aims at it,
is not the VM's doing), takes the newest RTT of
an ICMP echo to the VM's address when the NIC has one (:class:`~secmig.agent.hostnet.RttProber`), and
feeds a :class:`~secmig.monitor.TrafficSample` (``memory=False``: the VM's own traffic, not its migration
stream) to the same :class:`~secmig.monitor.Enforcer` — rules, LOW/MEDIUM/HIGH, ``carry_out`` — the
simulator runs, with each NIC's preset rate as its profile.

Verdicts are carried out through :class:`NicResponder`:

- challenge: the MACs the bridge learned on the VM's tap port (its configured MAC when none yet) checked
  against its signed location binding (:class:`~secmig.agent.macverify.BindingCheck`), then the daemon's
  own identity check (``actions.challenge``: revoked peers and so on);
- throttle: ``tc`` on the tap, both directions (:func:`~secmig.agent.hostnet.limit_rate`);
- abort, destroy: the daemon's (``actions``); destroy also drops the tap's rate limit and the VM's NICs.

A VM with one NIC is judged (and audited) under its own name; a VM with several NICs under ``vm/tap``.
:func:`self_destruct` is the QEMU end of a destroy: kill QEMU, zero the RAM backing file, audit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secmig.agent import hostnet
from secmig.agent.macverify import BindingCheck
from secmig.agent.qemu.machine import QemuMachine, scrub_ram
from secmig.errors import HostNetError, SecmigError
from secmig.monitor import Enforcer, RuleSet, TrafficMonitor, TrafficSample, Verdict, VMProfile
from secmig.security.audit import AuditSink, Decision

_LOG = logging.getLogger("secmig.agent.nicmonitor")


@dataclass(frozen=True, slots=True)
class NicSpec:
    """One VM NIC as the monitor sees it: the tap on the bridge (the vSwitch), its preset, its addresses."""

    vm: str
    tap: str
    bridge: str
    preset_rate_bytes_per_s: float
    mac: str | None = None
    """The MAC the VM definition gives the NIC (used by the challenge only when the bridge learned none)."""
    ip: str | None = None
    """The guest's IPv4 address on this NIC, for ICMP RTT probes (none: no RTT for this NIC)."""


class NicActions(Protocol):
    """What the daemon does for the NIC monitor (the agent's own Responder methods fit)."""

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """The daemon's identity check of ``vm``: (passed, why)."""
        ...

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        """Stop ``vm``'s migration, if any."""
        ...

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        """Stop ``vm`` and wipe its memory (QEMU: :func:`self_destruct`)."""
        ...


class NicResponder:
    """The monitor's hands on real NICs: identity check with the observed MAC, tc throttle, daemon actions."""

    def __init__(self, owner: NicMonitor, actions: NicActions, identity: BindingCheck | None) -> None:
        self._owner = owner
        self._actions = actions
        self._identity = identity

    def challenge(self, vm: str, now_s: float) -> tuple[bool, str]:
        """The observed MACs against the binding, then the daemon's check."""
        name, nics = self._owner.nics_of(vm)
        if self._identity is not None:
            macs: set[str] = set()
            for nic in nics:
                try:
                    learned = hostnet.learned_macs(nic.bridge, nic.tap)
                except HostNetError:
                    learned = set()
                if not learned and nic.mac:
                    learned = {nic.mac}
                macs |= learned
            verdict = self._identity.verify(name, macs)
            if not verdict.ok:
                return False, verdict.reason
        return self._actions.challenge(name, now_s)

    def throttle(self, vm: str, now_s: float, rate_bytes_per_s: float) -> None:
        """Cap the NIC(s) with tc at ``rate_bytes_per_s`` each way."""
        _name, nics = self._owner.nics_of(vm)
        for nic in nics:
            hostnet.limit_rate(nic.tap, rate_bytes_per_s)
            self._owner.throttled[nic.tap] = rate_bytes_per_s

    def abort_migration(self, vm: str, now_s: float, reason: str) -> None:
        """The daemon aborts the VM's migration."""
        self._actions.abort_migration(self._owner.nics_of(vm)[0], now_s, reason)

    def destroy(self, vm: str, now_s: float, reason: str) -> None:
        """The daemon destroys the VM; its NICs are no longer watched or capped."""
        name, _nics = self._owner.nics_of(vm)
        self._owner.destroyed[name] = time.monotonic()
        self._owner.unwatch_vm(name)
        self._actions.destroy(name, now_s, reason)


class NicMonitor:
    """Samples every watched VM NIC each interval and runs the paper's rules on them; ``start()`` / ``stop()``."""

    def __init__(
        self,
        rules: RuleSet,
        actions: NicActions,
        audit: AuditSink | None,
        *,
        identity: BindingCheck | None = None,
        interval_s: float | None = None,
        vswitch_capacity_bytes_per_s: Mapping[str, float] | None = None,
        rtt_probe: bool = True,
    ) -> None:
        self.rules = rules
        self.interval_s = interval_s if interval_s is not None else rules.step_s
        self.responder = NicResponder(self, actions, identity)
        self.enforcer = Enforcer(TrafficMonitor(rules, {}, vswitch_capacity_bytes_per_s), self.responder, audit)
        self.audit = audit
        self._nics: dict[str, tuple[str, list[NicSpec]]] = {}
        """Monitor subject → (VM name, its NICs under that subject)."""
        self._last: dict[str, hostnet.NicCounters] = {}
        self._rtt: dict[str, float] = {}
        self._probing: set[str] = set()
        self._rtt_probe = rtt_probe
        self._prober: hostnet.RttProber | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()
        self.verdicts: list[Verdict] = []
        """Every verdict acted on, as it ended (for the daemon's status and the tests)."""
        self.throttled: dict[str, float] = {}
        self.destroyed: dict[str, float] = {}
        """VM → monotonic time its destroy was asked for."""
        self.on_verdict: Callable[[Verdict], None] | None = None

    # --- what is watched --------------------------------------------------------------------------------

    def watch_vm(self, vm: str, nics: Sequence[NicSpec], ram_bytes: int) -> None:
        """Judge ``vm``'s NICs from now on (replaces an earlier watch of it)."""
        self.unwatch_vm(vm)
        mon = self.enforcer.monitor
        for nic in nics:
            subject = vm if len(nics) == 1 else f"{vm}/{nic.tap}"
            self._nics[subject] = (vm, [nic])
            mon.profiles[subject] = VMProfile(nic.preset_rate_bytes_per_s, ram_bytes)
            with contextlib.suppress(HostNetError):
                self._last[subject] = hostnet.read_counters(nic.tap)

    def unwatch_vm(self, vm: str) -> None:
        """Stop judging ``vm``; a tc cap on its taps is removed."""
        for subject in [s for s, (name, _) in self._nics.items() if name == vm]:
            _name, nics = self._nics.pop(subject)
            self.enforcer.monitor.forget(subject)
            self._last.pop(subject, None)
            self._rtt.pop(subject, None)
            for nic in nics:
                if self.throttled.pop(nic.tap, None) is not None:
                    with contextlib.suppress(HostNetError):
                        hostnet.clear_rate_limit(nic.tap)

    def nics_of(self, subject: str) -> tuple[str, list[NicSpec]]:
        """The VM and NICs behind a monitor subject (a VM name, or ``vm/tap``)."""
        if subject in self._nics:
            return self._nics[subject]
        name = subject.split("/", 1)[0]
        return name, [n for s, (v, ns) in self._nics.items() if v == name for n in ns]

    @property
    def watched(self) -> list[str]:
        """The monitor subjects being judged."""
        return sorted(self._nics)

    # --- the loop ----------------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since this monitor was made (the samples' clock)."""
        return time.monotonic() - self._t0

    def start(self) -> None:
        """Run the sampling loop as a task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="nic-monitor")

    async def stop(self) -> None:
        """Stop sampling; remove every tc cap this monitor put; close the probe socket."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for tap in list(self.throttled):
            with contextlib.suppress(HostNetError):
                hostnet.clear_rate_limit(tap)
        self.throttled.clear()
        if self._prober is not None:
            self._prober.close()
            self._prober = None

    async def _loop(self) -> None:
        next_t = time.monotonic()
        while True:
            next_t += self.interval_s
            await asyncio.sleep(max(next_t - time.monotonic(), 0.0))
            try:
                self.step()
            except SecmigError as err:
                _LOG.error("nic monitor: %s", err)

    def step(self) -> list[Verdict]:
        """One interval: sample every NIC, start the next RTT probes, judge the window, act."""
        now = self.now()
        for subject, (_vm, nics) in list(self._nics.items()):
            nic = nics[0]
            try:
                c = hostnet.read_counters(nic.tap)
            except HostNetError:
                continue  # the tap went away (QEMU quit): nothing to count
            prev = self._last.get(subject)
            self._last[subject] = c
            if prev is None:
                continue
            rtt = self._rtt.pop(subject, None)
            # A late step (the agent's loop held up, say 3 s) must not read as 3 s of bytes in 100 ms: the
            # counters' growth is spread evenly over the intervals it took, the last window's worth observed.
            gap = max(round((c.t_s - prev.t_s) / self.interval_s), 1)
            shown = min(gap, int(self.rules.window / self.interval_s) + 1)
            # What the VM sends (the tap's rx) is judged against its preset: frames the bridge floods to it, or
            # anyone's traffic aimed at it, are not the VM's doing and must not get it destroyed.
            nbytes, npackets = max(c.rx_bytes - prev.rx_bytes, 0) / gap, max(c.rx_packets - prev.rx_packets, 0) // gap
            for k in range(shown - 1, -1, -1):
                self.enforcer.observe(
                    TrafficSample(
                        now - k * self.interval_s,
                        subject,
                        nic.bridge,
                        nbytes,
                        packets=npackets,
                        rtt_s=rtt if k == 0 else None,
                        flow=nic.tap,
                        memory=False,
                    )
                )
            if self._rtt_probe and nic.ip and subject not in self._probing:
                self._probing.add(subject)
                asyncio.get_running_loop().create_task(self._probe(subject, nic))
        done = self.enforcer.tick(now)
        for v in done:
            self.verdicts.append(v)
            if self.on_verdict is not None:
                self.on_verdict(v)
        return done

    async def _probe(self, subject: str, nic: NicSpec) -> None:
        try:
            if self._prober is None:
                self._prober = hostnet.RttProber(nic.bridge)
            assert nic.ip is not None
            rtt = await self._prober.rtt(nic.ip, timeout_s=max(self.rules.window, self.interval_s))
            if rtt is not None and subject in self._nics:
                self._rtt[subject] = rtt
        except HostNetError as err:
            _LOG.warning("RTT probe of %s: %s", subject, err)
        finally:
            self._probing.discard(subject)


async def self_destruct(
    machine: QemuMachine,
    memory_path: Path | None,
    vm: str,
    reason: str,
    audit: AuditSink | None,
    *,
    decision: Decision = Decision.DESTROY,
) -> int:
    """Destroy a QEMU VM: kill QEMU, then zero and unlink its RAM backing file; audited (``vm.ram_scrubbed``
    with ``decision``). Returns the size of the file, every byte of it zero before the unlink."""
    await machine.kill()
    scrubbed = 0
    if memory_path is not None:
        scrubbed = await asyncio.to_thread(scrub_ram, memory_path)
    if audit is not None:
        audit.record(
            "vm.ram_scrubbed" if memory_path is not None else "vm.ram_not_scrubbed",
            decision,
            vm,
            {"reason": reason, "memory_path": str(memory_path) if memory_path else None, "bytes_zeroed": scrubbed},
        )
    return scrubbed
