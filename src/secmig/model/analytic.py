"""Closed-form model of pre-copy migration: the paper's equations (1)–(6) and the geometric series.

With V bytes to send in round 0, a link of B bytes/s and pages dirtied at P bytes/s (λ = P / B), round i
sends V·λ^i and lasts V·λ^i / B. The paper writes the same quantities as ``V·(P/B)^n``. These formulas are
the reference the simulator is checked against; they assume one flow with the whole bandwidth, dirtying
that never saturates a working set (the ``sequential`` model below its working set), and no noise.
:func:`precopy_rounds` iterates the same recurrence for any dirty-page model, for the models that do
saturate. Pure: no I/O, no simulator.
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
    max_rounds: int = 100_000,
) -> PreCopyEstimate:
    """Pre-copy as QEMU decides it: the downtime budget is tested as pages are sent, not per round.

    QEMU's migration thread compares the pages left in the dirty bitmap (counted at 4 KiB each) with
    ``bandwidth × downtime_limit`` after every ``sync_interval_s`` of sending; once they fit it syncs the
    bitmap and stops the VM if what is then pending still fits. So a round leaves up to the budget's
    worth of pages unsent, and the next starts from those plus the pages dirtied meanwhile. Untouched
    pages cost a few bytes on the wire but a full page in the budget, as in QEMU; pages dirtied again
    while still pending count once (writes spread over ``working_set_pages``). The stop-and-copy runs
    at ``switchover_bytes_per_s`` (QEMU lifts the rate limit; with avail-switchover-bandwidth set it
    also budgets with it).
    """
    b = bandwidth_bytes_per_s
    sw = switchover_bytes_per_s or b
    budget = int(sw * downtime_limit_s // PAGE_SIZE)
    chunk = max(int(b * sync_interval_s // PAGE_SIZE), 1)
    total = math.ceil(ram_bytes / PAGE_SIZE)
    pending, zero = total, total - math.ceil(used_bytes / PAGE_SIZE)
    wire = first_round_bytes(ram_bytes, used_bytes)
    sent = 0.0
    elapsed = 0.0
    for n in range(max_rounds + 1):
        if pending <= budget and n > 0:
            last = (pending - zero) * PAGE_WIRE_BYTES + zero * ZERO_PAGE_WIRE_BYTES
            down = last / sw + latency_s
            return PreCopyEstimate(n, elapsed + down, down, sent + last, last, True)
        to_send = min(pending, max(pending - budget, chunk))
        share = to_send / pending
        zero_sent = round(zero * share)
        nbytes = round(wire * share)
        sent += nbytes
        elapsed += nbytes / b
        d = round(min(dirty_pages(nbytes / b), total))
        carry, carry_zero = pending - to_send, zero - zero_sent
        used = max(math.ceil(used_bytes / PAGE_SIZE), 1)
        ws = working_set_pages or used
        in_ws = (carry - carry_zero) * (min(ws / used, 1.0) if n == 0 else 1.0)
        pending = min(carry + round(d * (1.0 - min(in_ws / ws, 1.0))), total)
        zero = min(carry_zero, max(pending - d, 0))
        wire = (pending - zero) * PAGE_WIRE_BYTES + zero * ZERO_PAGE_WIRE_BYTES
    return PreCopyEstimate(max_rounds, math.inf, math.inf, sent, wire, False)


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
