"""MAC re-verification for real: the MAC a guest announces on this host's vSwitch against its signed binding.

The paper's verification module recomputes a hash over the MAC a moved VM "throws back" to the network.
Here, after a migration, move or clone commits, the agent makes QEMU announce the guest (``announce-self``:
RARP frames from the NIC's MAC, whatever the guest does), captures the source MACs of the frames that
arrive from the VM's tap and reads what the bridge learned on the tap's port, and checks every MAC seen
with :func:`secmig.security.location.verify_location`. One foreign MAC, no binding, a binding for
another host or an older epoch: the paper's DESTROY verdict, audited. The right MAC: CONTINUE, audited.

:class:`BindingCheck` is the identity check both this module and the NIC monitor's challenge use. This
module decides and audits; destroying the VM is the caller's (the daemon's) job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from secmig.agent import hostnet
from secmig.errors import HostNetError
from secmig.security.audit import AuditSink, Decision
from secmig.security.credentials import LocationBinding
from secmig.security.grants import TrustRoots
from secmig.security.location import LocationAction, LocationVerdict, verify_location


def _no_epoch(_vm: str) -> int | None:
    return None


@dataclass(frozen=True, slots=True)
class BindingCheck:
    """Where a host finds what a location check needs: its id, each VM's binding, the trust roots, epochs."""

    host_id: str
    binding_of: Callable[[str], LocationBinding | None]
    roots: Callable[[], TrustRoots]
    latest_epoch: Callable[[str], int | None] = field(default=_no_epoch)

    def verify(self, vm: str, macs: Iterable[str]) -> LocationVerdict:
        """CONTINUE when every MAC in ``macs`` is the one ``vm``'s valid binding places on this host; DESTROY
        otherwise (no MAC at all included: an unverifiable VM is not allowed to stay)."""
        seen = sorted({m.lower() for m in macs})
        if not seen:
            return LocationVerdict(LocationAction.DESTROY, f"VM {vm!r} on {self.host_id!r}: announced no MAC")
        binding = self.binding_of(vm)
        roots = self.roots()
        verdict = LocationVerdict(LocationAction.DESTROY, "unchecked")
        for mac in seen:
            verdict = verify_location(
                binding, roots, vm_id=vm, vm_mac=mac, host_id=self.host_id, latest_epoch=self.latest_epoch(vm)
            )
            if not verdict.ok:
                return verdict
        return verdict


@dataclass(frozen=True, slots=True)
class MacCheck:
    """The outcome of one re-verification: what was seen where, and the verdict."""

    vm: str
    bridge: str
    tap: str
    observed: tuple[str, ...]
    verdict: LocationVerdict

    @property
    def action(self) -> LocationAction:
        """CONTINUE or DESTROY."""
        return self.verdict.action


_ANNOUNCE_ATTEMPTS = 3


async def observe_announced_macs(
    bridge: str,
    tap: str,
    *,
    announce: Callable[[], Awaitable[object]] | None = None,
    timeout_s: float = 1.0,
) -> tuple[str, ...]:
    """The MACs the VM behind ``tap`` announces: source MACs of its frames within ``timeout_s`` (after
    ``announce()``, e.g. QEMU's ``announce-self``, is called), plus what ``bridge`` learned on the tap's port."""
    seen: list[str] = []
    # A loaded host can delay QEMU's announcement past one window: announce again before concluding that
    # the VM announced nothing (which the binding check treats as DESTROY).
    for _ in range(_ANNOUNCE_ATTEMPTS):
        sock = hostnet.open_capture(tap)  # bound before the announcement, so no frame is missed
        capture = asyncio.create_task(
            asyncio.to_thread(hostnet.capture_source_macs, tap, timeout_s, max_frames=8, sock=sock)
        )
        try:
            if announce is not None:
                await announce()
            seen = list(await capture)
        finally:
            if not capture.done():
                capture.cancel()
                with contextlib.suppress(asyncio.CancelledError, HostNetError):
                    await capture
        if seen or announce is None:
            break
    with contextlib.suppress(HostNetError):
        seen += sorted(hostnet.learned_macs(bridge, tap) - set(seen))
    return tuple(seen)


async def reverify_mac(
    check: BindingCheck,
    vm: str,
    bridge: str,
    tap: str,
    *,
    announce: Callable[[], Awaitable[object]] | None = None,
    timeout_s: float = 1.0,
    audit: AuditSink | None = None,
) -> MacCheck:
    """After a commit: observe the MACs ``vm`` announces on ``bridge`` via ``tap`` and check them against its
    binding; audited as ``vm.mac_verified`` (allow) or ``vm.mac_mismatch`` (destroy). The caller destroys."""
    observed = await observe_announced_macs(bridge, tap, announce=announce, timeout_s=timeout_s)
    verdict = check.verify(vm, observed)
    binding = check.binding_of(vm)
    if audit is not None:
        audit.record(
            "vm.mac_verified" if verdict.ok else "vm.mac_mismatch",
            Decision.ALLOW if verdict.ok else Decision.DESTROY,
            vm,
            {
                "bridge": bridge,
                "tap": tap,
                "observed": ",".join(observed),
                "bound_mac": binding.vm_mac if binding is not None else None,
                "epoch": binding.epoch if binding is not None else None,
                "reason": verdict.reason,
            },
        )
    return MacCheck(vm, bridge, tap, observed, verdict)
