"""Closed-form model of pre-copy migration: the paper's equations (1)–(6) and the geometric series.

With V bytes to send in round 0, a link of B bytes/s and pages dirtied at P bytes/s (λ = P / B), round i
sends V·λ^i and lasts V·λ^i / B. The paper writes the same quantities as ``V·(P/B)^n``. These formulas are
the reference the simulator is checked against; they assume one flow with the whole bandwidth, dirtying
that never saturates a working set (the ``sequential`` model below its working set), and no noise.
:func:`precopy_rounds` iterates the same recurrence for any dirty-page model, for the models that do
saturate; :func:`qemu_precopy` is QEMU's own stop rule, derived from its migration loop.

Pure: no I/O, no simulator, and nothing from :mod:`secmig.migration`: these formulas are derived on their
own so that checking the simulator against them means something.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from secmig.model.units import PAGE_SIZE

PAGE_HEADER_BYTES = 8
"""Bytes of framing QEMU puts before each page it sends (the page offset and its flags)."""

ZERO_PAGE_WIRE_BYTES = PAGE_HEADER_BYTES + 1
"""Bytes on the wire for an untouched (all-zero) page: its header and one fill byte, as QEMU sends it."""

PAGE_WIRE_BYTES = PAGE_SIZE + PAGE_HEADER_BYTES
"""Bytes on the wire for a page with data."""


def first_round_bytes(ram_bytes: int, used_bytes: int) -> int:
    """Wire bytes of round 0: every used page in full, every untouched page as a zero-page marker."""
    used_pages = math.ceil(used_bytes / PAGE_SIZE)
    zero_pages = max(math.ceil(ram_bytes / PAGE_SIZE) - used_pages, 0)
    return used_pages * PAGE_WIRE_BYTES + zero_pages * ZERO_PAGE_WIRE_BYTES


# --- the paper's equations -------------------------------------------------------------------------


def migration_time(tc_s: float, tsd_s: float) -> float:
    """Eq. (1): Tmr = Tc + Tsd, the copy phase plus the service downtime."""
    return tc_s + tsd_s


def service_downtime(tmr_s: float, tcycles_s: float) -> float:
    """Eq. (2): Tsd = Tmr − Tcycles, what is left of the migration time after the live copy cycles."""
    return tmr_s - tcycles_s


def downtime_is_abnormal(tsd_s: float, threshold_s: float) -> bool:
    """Eq. (3): a downtime above the estimated threshold marks the VM's behaviour as abnormal."""
    return tsd_s > threshold_s


def round_bytes(v_bytes: float, p_bytes_per_s: float, b_bytes_per_s: float, n: int) -> float:
    """Eq. (4): data sent in round n, V·(P/B)^n (the paper's ``V·[P/B]_n``); below V when P < B."""
    return v_bytes * (p_bytes_per_s / b_bytes_per_s) ** n


def copy_time(v_bytes: float, b_bytes_per_s: float) -> float:
    """Eq. (5): Tc = V / B, the time of a full copy at bandwidth B (the paper also uses the RTT peak rate)."""
    return v_bytes / b_bytes_per_s


def downtime_data_within_limit(
    v_bytes: float, p_bytes_per_s: float, b_bytes_per_s: float, n: int, psi: float
) -> bool:
    """Eq. (6): the data left for the downtime after n rounds, V·(P/B)^n, is below Ψ·V."""
    return round_bytes(v_bytes, p_bytes_per_s, b_bytes_per_s, n) < psi * v_bytes


# --- the geometric series ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreCopyEstimate:
    """What the closed form predicts for one pre-copy migration."""

    live_rounds: int
    """Rounds sent while the VM runs (round 0 included)."""
    total_time_s: float
    downtime_s: float
    total_bytes: float
    downtime_bytes: float
    converged: bool


def rounds_to_threshold(v0_bytes: float, lam: float, threshold_bytes: float) -> int | None:
    """Live rounds n after which the next round's data V·λ^n is at most the threshold; None if never."""
    if v0_bytes <= threshold_bytes:
        return 1
    if lam <= 0.0:
        return 1
    if lam >= 1.0:
        return None
    return max(1, math.ceil(math.log(threshold_bytes / v0_bytes) / math.log(lam)))


def geometric_precopy(
    v0_bytes: float,
    dirty_bytes_per_s: float,
    bandwidth_bytes_per_s: float,
    threshold_bytes: float,
    *,
    latency_s: float = 0.0,
    max_rounds: int | None = None,
) -> PreCopyEstimate:
    """Pre-copy with linear dirtying: round i sends V·λ^i; stop-and-copy once V·λ^n ≤ threshold.

    With ``max_rounds`` the copy is forced after that many live rounds even when it has not converged.
    """
    lam = dirty_bytes_per_s / bandwidth_bytes_per_s
    n = rounds_to_threshold(v0_bytes, lam, threshold_bytes)
    converged = n is not None and (max_rounds is None or n <= max_rounds)
    if not converged:
        if max_rounds is None:
            return PreCopyEstimate(0, math.inf, math.inf, math.inf, math.inf, False)
        n = max_rounds
    assert n is not None
    live = v0_bytes * n if lam == 1.0 else v0_bytes * (1.0 - lam**n) / (1.0 - lam)
    last = v0_bytes * lam**n
    b = bandwidth_bytes_per_s
    return PreCopyEstimate(
        live_rounds=n,
        total_time_s=(live + last) / b + latency_s,
        downtime_s=last / b + latency_s,
        total_bytes=live + last,
        downtime_bytes=last,
        converged=converged,
    )


def precopy_rounds(
    v0_bytes: float,
    dirty_pages: Callable[[float], float],
    bandwidth_bytes_per_s: float,
    threshold_bytes: float,
    *,
    page_wire_bytes: int = PAGE_WIRE_BYTES,
    latency_s: float = 0.0,
    max_rounds: int = 1000,
) -> PreCopyEstimate:
    """The same recurrence for any dirty-page model: V_{i+1} = D(V_i / B) pages, iterated to the threshold."""
    b = bandwidth_bytes_per_s
    v = v0_bytes
    live = 0.0
    for n in range(1, max_rounds + 1):
        live += v
        v = dirty_pages(v / b) * page_wire_bytes
        if v <= threshold_bytes:
            return PreCopyEstimate(n, (live + v) / b + latency_s, v / b + latency_s, live + v, v, True)
    return PreCopyEstimate(max_rounds, (live + v) / b + latency_s, v / b + latency_s, live + v, v, False)


def qemu_precopy(
    ram_bytes: int,
    used_bytes: int,
    dirty_pages: Callable[[float], float],
    bandwidth_bytes_per_s: float,
    downtime_limit_s: float,
    *,
    switchover_bytes_per_s: float | None = None,
    latency_s: float = 0.0,
    sync_interval_s: float = 0.1,
    working_set_pages: int | None = None,
    whole_intervals: bool = False,
    max_rounds: int = 100_000,
) -> PreCopyEstimate:
    r"""Pre-copy as QEMU decides it, derived from QEMU's migration loop rather than from our state machine.

    **What QEMU does** (migration.c ``migration_iteration_run``, ram.c ``ram_save_iterate``): the
    migration thread sends pages for one rate-limit period Δ (100 ms) at a time. Before each period it
    compares the pages still in the dirty bitmap, counted at the page size whether they hold data or
    not, with ``threshold_size = bandwidth × downtime-limit``. Only when they fit does it sync the bitmap
    (adding what the guest dirtied since the last sync), and it stops the VM if what is then pending
    still fits. So QEMU's "rounds" are the periods between two syncs, and each ends with up to a
    threshold's worth of pages still unsent.

    **Notation.** N pages of RAM, U of them used and Z₀ = N − U untouched; the guest writes spread evenly
    over W pages (``working_set_pages``, default U) and D(t) distinct pages are dirty t after a sync;
    a data page costs p = :data:`PAGE_WIRE_BYTES` on the wire, an untouched one q =
    :data:`ZERO_PAGE_WIRE_BYTES`; B the live bandwidth, S the switchover bandwidth (default B), d the
    downtime limit. Then the budget and one check period, in pages, are

        T = ⌊S·d / 4 KiB⌋,  C = ⌊B·Δ / 4 KiB⌋.

    **Between syncs j and j+1** the bitmap holds Rⱼ pages, Zⱼ of them untouched (R₀ = N, Z₀ = N − U).
    The thread sends until what is left fits: sⱼ = max(Rⱼ − T, C) pages (with ``whole_intervals``,
    sⱼ = ⌈(Rⱼ − T)/C⌉·C, QEMU's check falling only on period boundaries), capped at Rⱼ. With the
    untouched pages spread through the bitmap this takes

        τⱼ = (sⱼ / Rⱼ) · (p·(Rⱼ − Zⱼ) + q·Zⱼ) / B

    and leaves Kⱼ = Rⱼ − sⱼ pages. A page dirtied while still pending is counted once, so of the
    D(τⱼ) fresh pages the share κⱼ / W already in the bitmap adds nothing. The working set is taken to
    lie in the used pages and to spill onto a share ω = min(max(W − U, 0) / Z₀, 1) of the untouched ones
    when it is larger; κⱼ counts the pages of Kⱼ in it: its data pages (times min(W/U, 1) after the
    first pass, where the used pages hold the working set among others) plus ω of its untouched ones.
    In expectation

        Rⱼ₊₁ = Kⱼ + D(τⱼ)·(1 − κⱼ/W),   Zⱼ₊₁ = Zⱼ·(Kⱼ/Rⱼ)·(1 − ω·D(τⱼ)/W)

    (an untouched page stays untouched unless the guest writes it). QEMU stops at the first sync
    j ≥ 1 with Rⱼ ≤ T; the downtime is (p·(Rⱼ − Zⱼ) + q·Zⱼ) / S plus the latency, and the migration
    time is Σ τ plus the downtime.

    **Sanity check.** For linear dirtying D(t) = r·t below saturation, with λ = r·p/B and Kⱼ = T, the
    excess eⱼ = Rⱼ − T obeys eⱼ₊₁ = λ·(1 − T/W)·eⱼ: the paper's geometric series V·λⁿ with the
    budget-sized carry removed, until eⱼ < C; from then on each period drains the bitmap by
    C·(1 − λ·(1 − T/W)) pages, i.e. at (bandwidth − dirty rate), until it fits.

    ``whole_intervals`` False models the check as falling exactly where the budget is reached (how the
    simulator's strategy idealises it); True as QEMU's rate-limited loop does. Both give the same time
    and data to well under 1 %; the downtime of the second lands anywhere in a band one period wide
    (C pages) below the budget, which is as precisely as QEMU's own downtime can be predicted.
    """
    page = PAGE_SIZE
    s_bw = switchover_bytes_per_s or bandwidth_bytes_per_s
    budget = int(s_bw * downtime_limit_s // page)
    period = max(int(bandwidth_bytes_per_s * sync_interval_s // page), 1)
    n_all = math.ceil(ram_bytes / page)
    n_used = max(math.ceil(used_bytes / page), 1)
    w = float(working_set_pages or n_used)
    # The working set lies in the used pages first and spills over onto untouched ones only when larger.
    n_untouched = n_all - math.ceil(used_bytes / page)
    untouched_in_ws = min(max(w - n_used, 0.0) / n_untouched, 1.0) if n_untouched else 0.0

    def wire(pages: float, untouched: float) -> float:
        return PAGE_WIRE_BYTES * (pages - untouched) + ZERO_PAGE_WIRE_BYTES * untouched

    bitmap, untouched = float(n_all), float(n_untouched)
    times: list[float] = []
    wires: list[float] = []
    while len(times) <= max_rounds:
        if times and bitmap <= budget:
            last = wire(bitmap, untouched)
            down = last / s_bw + latency_s
            return PreCopyEstimate(len(times), math.fsum(times) + down, down, math.fsum(wires) + last, last, True)
        excess = bitmap - budget
        sent = math.ceil(excess / period) * period if whole_intervals else max(excess, period)
        sent = min(sent, bitmap)
        wires.append(wire(bitmap, untouched) * sent / bitmap)
        times.append(wires[-1] / bandwidth_bytes_per_s)
        kept = bitmap - sent
        kept_untouched = untouched * kept / bitmap
        in_ws = (kept - kept_untouched) * (min(w / n_used, 1.0) if len(times) == 1 else 1.0)
        in_ws += kept_untouched * untouched_in_ws
        fresh = min(dirty_pages(times[-1]), n_all)
        bitmap = min(kept + fresh * (1.0 - min(in_ws / w, 1.0)), n_all)
        untouched = kept_untouched * max(1.0 - untouched_in_ws * fresh / w, 0.0)
    return PreCopyEstimate(max_rounds, math.inf, math.inf, math.fsum(wires), wire(bitmap, untouched), False)


def expected_remote_faults(dirty_pages: Callable[[float], float], push_s: float, remote_fraction: float) -> float:
    """Expected post-copy remote faults while a background push of ``push_s`` seconds runs.

    A page the guest touches for the first time at t faults if the push has not sent it yet, which for
    a push in an order unrelated to the guest's has probability 1 − t/T. Integrating D'(t)·(1 − t/T) by
    parts gives the mean of D over the push, times the share of the working set that was still remote.
    Only writes are modelled (the dirty-page model); reads of remote pages would fault too.
    """
    if push_s <= 0:
        return 0.0
    n = 64
    ts = [push_s * k / n for k in range(n + 1)]
    ds = [dirty_pages(t) for t in ts]
    mean = sum((a + b) / 2 for a, b in itertools.pairwise(ds)) / n
    return remote_fraction * mean
