"""Stop conditions for pre-copy, as data, with the presets of QEMU, Xen and the paper.

A policy says when the live rounds end: when the VM has *converged* (what is left fits the downtime
budget, or fewer than Th pages are dirty), or when a cap is reached without converging (rounds, data sent,
time). On a cap, ``on_nonconvergence`` decides: ``force`` the stop-and-copy anyway, or ``abort`` and leave
the VM running on its source.

Data only: the strategies in :mod:`secmig.migration.precopy` apply it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from secmig.errors import ConfigError
from secmig.model.units import PAGE_SIZE

NonConvergence = Literal["force", "abort"]

DOWNTIME_THRESHOLD_S = 2.0
"""The paper's downtime threshold ("Est. Th value" of eq. 3, in seconds): a VM whose stop-and-copy
downtime Tsd exceeds it behaves abnormally, and "downtime > Th value → destroy VM & migration".

One threshold, two places it acts: the ``paper`` preset does not start a stop-and-copy whose estimated
downtime is over it (:attr:`StopPolicy.abort_if_downtime_over_s`; the VM stays on its source), and the
monitor's ``downtime`` rule flags a pause that lasts longer (``rules.yaml``: ``downtime.threshold``). The
rule file is the setting: when a scenario runs under the monitor, its ``downtime.threshold`` replaces the
preset's abort limit (:meth:`StopPolicy.with_downtime_threshold`); this constant is the default of both.
"""


@dataclass(frozen=True, slots=True)
class StopPolicy:
    """When pre-copy stops iterating, and what happens when it does not converge."""

    name: str
    downtime_limit_s: float | None = None
    """Converged when the remaining bytes ÷ measured bandwidth fit in this (QEMU's downtime-limit)."""
    dirty_pages_threshold: int | None = None
    """Converged when fewer pages than this are dirty (the paper's and Xen's Th = 50)."""
    max_rounds: int | None = None
    """Live rounds (round 0 included) after which pre-copy gives up (Xen: 30)."""
    max_data_factor: float | None = None
    """Gives up once this many times the RAM has been sent (Xen and the paper: 3)."""
    max_time_s: float = 3600.0
    """Hard cap on the live phase, for every policy."""
    on_nonconvergence: NonConvergence = "force"
    abort_if_downtime_over_s: float | None = None
    """The paper's eq. (3): a stop-and-copy whose estimated downtime exceeds this is not started. For the
    ``paper`` preset this is the downtime threshold :data:`DOWNTIME_THRESHOLD_S`; under the monitor the rule
    file's ``downtime.threshold`` replaces it (:meth:`with_downtime_threshold`), so one value drives both."""
    check_in_round: bool = False
    """Test the downtime budget as pages are sent (QEMU), not only when a whole round has been sent."""
    psi: float | None = None
    """The paper's Ψ (eq. 6): converged once the data left for the stop-and-copy is below Ψ × the VM's RAM.
    Applied per VM by :meth:`for_vm`, as the page threshold it amounts to (whichever of it and Th is larger)."""

    def __post_init__(self) -> None:
        if self.on_nonconvergence not in ("force", "abort"):
            raise ConfigError(f"policy {self.name}: on_nonconvergence must be force or abort")
        if self.max_time_s <= 0:
            raise ConfigError(f"policy {self.name}: max_time_s must be positive")
        if self.psi is not None and not 0 < self.psi < 1:
            raise ConfigError(f"policy {self.name}: psi must be between 0 and 1 (got {self.psi:g})")

    def for_vm(self, ram_bytes: int) -> StopPolicy:
        """This policy for a VM of ``ram_bytes``: Ψ (eq. 6) becomes the page threshold it stands for.

        "Stop when the residual is below Ψ·V" is "stop when fewer than ⌈Ψ·V ÷ page size⌉ pages are
        pending"; with Th also set, the larger threshold stops first. Without Ψ the policy is unchanged.
        """
        if self.psi is None:
            return self
        pages = max(math.ceil(self.psi * ram_bytes / PAGE_SIZE), 1)
        return replace(self, dirty_pages_threshold=max(pages, self.dirty_pages_threshold or 0))

    def with_downtime_threshold(self, threshold_s: float) -> StopPolicy:
        """This policy with the downtime threshold of eq. (3) set to ``threshold_s`` (the monitor's
        ``downtime.threshold``), when the policy aborts on it at all; unchanged otherwise."""
        if self.abort_if_downtime_over_s is None:
            return self
        return replace(self, abort_if_downtime_over_s=threshold_s)

    def with_overrides(
        self,
        *,
        downtime_limit_s: float | None = None,
        on_nonconvergence: NonConvergence | None = None,
        max_time_s: float | None = None,
        psi: float | None = None,
    ) -> StopPolicy:
        """A copy with the given fields changed (None keeps the preset's value)."""
        p = self
        if downtime_limit_s is not None:
            if p.downtime_limit_s is not None:
                p = replace(p, downtime_limit_s=downtime_limit_s)
            if p.abort_if_downtime_over_s is not None:
                p = replace(p, abort_if_downtime_over_s=downtime_limit_s)
        if on_nonconvergence is not None:
            p = replace(p, on_nonconvergence=on_nonconvergence)
        if max_time_s is not None:
            p = replace(p, max_time_s=max_time_s)
        if psi is not None:
            p = replace(p, psi=psi)
        return p


POLICY_PRESETS: dict[str, StopPolicy] = {
    # QEMU iterates until the rest fits the downtime limit; it never gives up on its own, so the hard
    # cap stands for the operator cancelling the job: the VM stays on its source.
    # QEMU's migration thread compares the pages left in the bitmap with bandwidth × downtime-limit
    # continuously and syncs the bitmap to decide (migration/migration.c: migration_iteration_run).
    "qemu": StopPolicy(
        name="qemu", downtime_limit_s=0.3, max_time_s=1800.0, on_nonconvergence="abort", check_in_round=True
    ),
    # Xen stops at 50 dirty pages, or after 30 rounds or 3 × RAM sent, and then copies what is left.
    "xen": StopPolicy(
        name="xen", dirty_pages_threshold=50, max_rounds=30, max_data_factor=3.0, on_nonconvergence="force"
    ),
    # The paper: Th = 50 pages; more than 3 × VRAM sent forces the stop; a downtime over the downtime
    # threshold (DOWNTIME_THRESHOLD_S, the monitor's downtime rule) destroys the migration (the VM stays
    # where it was).
    "paper": StopPolicy(
        name="paper",
        dirty_pages_threshold=50,
        max_data_factor=3.0,
        on_nonconvergence="force",
        abort_if_downtime_over_s=DOWNTIME_THRESHOLD_S,
    ),
}


def policy_preset(name: str) -> StopPolicy:
    """The preset called ``name``; a clear error naming the choices otherwise."""
    try:
        return POLICY_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r} (choose from {', '.join(POLICY_PRESETS)})") from None
