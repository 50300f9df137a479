"""A fluid network on SimPy: flows share links max-min fairly, re-shared whenever a flow starts or ends.

Each flow crosses a path of links (NIC → vSwitch → core → WAN → …) and may carry its own rate cap (an
application's demand, QEMU's max-bandwidth). Rates are the max-min fair allocation computed by
progressive filling, vectorised with numpy over all active flows: every iteration raises the rate of all
unfrozen flows by the largest amount no link or cap forbids, then freezes the flows behind a saturated
link or at their cap. The number of iterations is the number of distinct bottleneck levels, not the
number of flows.

Starts and ends at the same simulated instant are coalesced into one re-share: a thousand migrations
whose rounds end together cost one computation, not a thousand. Latency is not a property of flows;
callers add it (see :meth:`FluidNetwork.path_latency`).

The network knows nothing of VMs, migrations or security: a flow is bytes on a path with an opaque tag
and a byte-counter account.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import simpy

from secmig.errors import SimulationError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_REL_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Link:
    """A shared resource of the network, one direction of a cable or a switch's fabric."""

    name: str
    capacity_bytes_per_s: float
    latency_s: float = 0.0
    kind: str = "link"


@dataclass(slots=True)
class Flow:
    """A transfer in progress. ``done`` fires with the flow when its last byte has left."""

    id: int
    slot: int
    size_bytes: float
    start_s: float
    done: simpy.Event
    tag: Any = None
    end_s: float | None = None


@dataclass(frozen=True, slots=True)
class LinkUsage:
    """A link's load over time: its mean rate over each bin of ``bin_s`` seconds starting at ``times_s``."""

    link: Link
    bin_s: float
    times_s: FloatArray
    load_bytes_per_s: FloatArray

    def utilization(self) -> FloatArray:
        cap = self.link.capacity_bytes_per_s
        return self.load_bytes_per_s / cap if math.isfinite(cap) and cap > 0 else np.zeros_like(self.times_s)

    def carried_bytes(self) -> float:
        """Everything the link carried during the run (exact: bins hold integrals, not samples)."""
        return float(self.load_bytes_per_s.sum() * self.bin_s)


class FluidNetwork:
    """Links, flows and the max-min fair share of the one among the other."""

    def __init__(self, env: simpy.Environment, *, record_usage: bool = True, usage_bin_s: float = 0.1) -> None:
        self.env = env
        self.links: list[Link] = []
        self._by_name: dict[str, int] = {}
        self.record_usage = record_usage
        self._cap_links = np.zeros(0)
        self._finite = np.zeros(0, dtype=bool)
        self._max_hops = 1
        # Per-slot flow state; slots are reused through a free list and the arrays double when full.
        n = 64
        self._remaining = np.zeros(n)
        self._rate = np.zeros(n)
        self._flow_cap = np.full(n, np.inf)
        self._account = np.full(n, -1, dtype=np.int64)
        self._account_bytes = np.zeros(0)
        self._link_bytes = np.zeros(0)
        self._active = np.zeros(n, dtype=bool)
        self._path = np.zeros((n, 1), dtype=np.int64)
        self._flows: list[Flow | None] = [None] * n
        self._free: list[int] = list(range(n - 1, -1, -1))
        self._next_id = 0
        self._last_t = 0.0
        self._update_pending = False
        self._version = 0
        self._load = np.zeros(0)
        # Link usage is integrated exactly between re-shares and kept as the mean load of each time bin,
        # sparse over links: memory grows with bins × busy links, not with the number of events.
        self.usage_bin_s = usage_bin_s
        self._bin = 0
        self._acc = np.zeros(0)
        self._usage_bin: list[int] = []
        self._usage_idx: list[IntArray] = []
        self._usage_val: list[FloatArray] = []
        self.reshares = 0
        self.on_reshare: Callable[[FluidNetwork], None] | None = None

    # --- topology --------------------------------------------------------------------------------------

    def add_link(self, link: Link) -> int:
        if link.name in self._by_name:
            raise SimulationError(f"link {link.name!r} defined twice")
        if not link.capacity_bytes_per_s > 0:  # inf is allowed: a link that is never the bottleneck
            raise SimulationError(f"link {link.name!r}: capacity must be positive")
        if self._active.any():
            raise SimulationError("links must be added before the first flow starts")
        self._by_name[link.name] = len(self.links)
        self.links.append(link)
        self._cap_links = np.zeros(0)  # rebuilt by _ensure_links before the next re-share
        return len(self.links) - 1

    def _ensure_links(self) -> None:
        if len(self._cap_links) != len(self.links) + 1:
            # One extra, infinitely wide link pads short paths.
            self._cap_links = np.array([lk.capacity_bytes_per_s for lk in self.links] + [np.inf])
            self._finite = np.isfinite(self._cap_links)
            self._load = np.zeros(len(self.links) + 1)

    def path_latency(self, path: Sequence[int]) -> float:
        return sum(self.links[i].latency_s for i in path)

    def path_bandwidth(self, path: Sequence[int]) -> float:
        return min((self.links[i].capacity_bytes_per_s for i in path), default=math.inf)

    # --- flows -----------------------------------------------------------------------------------------

    def transfer(
        self,
        path: Sequence[int],
        size_bytes: float,
        *,
        cap_bytes_per_s: float = math.inf,
        tag: Any = None,
        account: int = -1,
    ) -> Flow:
        """Start a flow of ``size_bytes`` along ``path`` now; its ``done`` event fires when it ends.

        Bytes of flows with an ``account`` (≥ 0) are added up per account as they move (see
        :meth:`account_bytes`): what a monitor reads as a VM's byte counter.
        """
        if size_bytes < 0:
            raise SimulationError(f"flow of {size_bytes} bytes")
        if not path and math.isinf(cap_bytes_per_s):
            raise SimulationError("a flow needs at least one link or a rate cap")
        done = self.env.event()
        flow = Flow(self._next_id, -1, float(size_bytes), self.env.now, done, tag)
        self._next_id += 1
        if size_bytes == 0:
            flow.end_s = self.env.now
            done.succeed(flow)
            return flow
        self._advance()
        if not self._free:
            self._grow()
        slot = self._free.pop()
        flow.slot = slot
        if len(path) > self._max_hops:
            self._widen(len(path))
        self._path[slot, :] = len(self.links)
        self._path[slot, : len(path)] = path
        self._remaining[slot] = size_bytes
        self._rate[slot] = 0.0
        self._flow_cap[slot] = cap_bytes_per_s
        self._account[slot] = account
        if account >= len(self._account_bytes):
            self._account_bytes = np.concatenate(
                (self._account_bytes, np.zeros(account + 1 - len(self._account_bytes)))
            )
        self._active[slot] = True
        self._flows[slot] = flow
        self._request_update()
        return flow

    def cancel(self, flow: Flow) -> float:
        """Stop a flow before its end; returns the bytes it had left. Its ``done`` event never fires."""
        if flow.slot < 0 or not self._active[flow.slot] or self._flows[flow.slot] is not flow:
            return 0.0
        self._advance()
        left = float(self._remaining[flow.slot])
        self._release(flow.slot)
        self._request_update()
        return left

    def set_cap(self, flow: Flow, cap_bytes_per_s: float) -> None:
        """Change a flow's rate cap from now on (a throttle); a flow that has ended is left alone."""
        if flow.slot < 0 or not self._active[flow.slot] or self._flows[flow.slot] is not flow:
            return
        self._advance()
        self._flow_cap[flow.slot] = cap_bytes_per_s
        self._request_update()

    def rate_of(self, flow: Flow) -> float:
        if flow.slot < 0 or self._flows[flow.slot] is not flow:
            return 0.0
        return float(self._rate[flow.slot])

    def usage(self) -> list[LinkUsage]:
        """The mean load of every link in each time bin, from the first bin to the last busy one."""
        self._ensure_links()
        self._accumulate(self._last_t, float(self.env.now))
        self._flush_bin(final=True)
        n, b = len(self.links), self.usage_bin_s
        n_bins = (max(self._usage_bin) + 1) if self._usage_bin else 1
        dense = np.zeros((n, n_bins))
        for k, idx, val in zip(self._usage_bin, self._usage_idx, self._usage_val, strict=True):
            dense[idx, k] = val
        times = np.arange(n_bins, dtype=np.float64) * b
        return [LinkUsage(lk, b, times, dense[i]) for i, lk in enumerate(self.links)]

    # --- internals -------------------------------------------------------------------------------------

    def _grow(self) -> None:
        old = len(self._remaining)
        new = old * 2
        self._remaining = np.concatenate((self._remaining, np.zeros(old)))
        self._rate = np.concatenate((self._rate, np.zeros(old)))
        self._flow_cap = np.concatenate((self._flow_cap, np.full(old, np.inf)))
        self._account = np.concatenate((self._account, np.full(old, -1, dtype=np.int64)))
        self._active = np.concatenate((self._active, np.zeros(old, dtype=bool)))
        pad = np.full((old, self._path.shape[1]), len(self.links), dtype=np.int64)
        self._path = np.concatenate((self._path, pad))
        self._flows.extend([None] * old)
        self._free.extend(range(new - 1, old - 1, -1))

    def _widen(self, hops: int) -> None:
        extra = np.full((self._path.shape[0], hops - self._path.shape[1]), len(self.links), dtype=np.int64)
        self._path = np.concatenate((self._path, extra), axis=1)
        self._max_hops = hops

    def _advance(self) -> None:
        now = float(self.env.now)
        dt = now - self._last_t
        if dt > 0:
            act = self._active
            self._remaining[act] -= self._rate[act] * dt
            counted = act & (self._account >= 0)
            if counted.any():
                np.add.at(self._account_bytes, self._account[counted], self._rate[counted] * dt)
            if len(self._link_bytes) != len(self._load):
                self._link_bytes = np.zeros(len(self._load))
            self._link_bytes += self._load * dt
            if self.record_usage:
                self._accumulate(self._last_t, now)
        self._last_t = now

    def _accumulate(self, t0: float, t1: float) -> None:
        """Add the (constant) current load over [t0, t1] to the bins it spans."""
        if not self.record_usage:
            return
        if len(self._acc) != len(self._load):
            self._acc = np.zeros(len(self._load))
        b = self.usage_bin_s
        busy = bool(self._load.any())
        while t0 < t1:
            bin_end = (self._bin + 1) * b
            if not busy and t1 >= bin_end:  # idle: skip whole bins at once
                self._flush_bin()
                self._bin = int(t1 // b)
                while (self._bin + 1) * b <= t1:  # t1 // b can fall one bin short (1.0 // 0.1 == 9.0)
                    self._bin += 1
                t0 = t1 if t1 < (self._bin + 1) * b else self._bin * b
                continue
            seg_end = min(t1, bin_end)
            self._acc += self._load * (seg_end - t0)
            t0 = seg_end
            if seg_end >= bin_end:
                self._flush_bin()
                self._bin += 1

    def _flush_bin(self, final: bool = False) -> None:
        n = len(self.links)
        if len(self._acc) == 0:
            return
        nz = np.flatnonzero(self._acc[:n] > 0)
        if nz.size:
            self._usage_bin.append(self._bin)
            self._usage_idx.append(nz)
            self._usage_val.append(self._acc[nz] / self.usage_bin_s)
        self._acc[:] = 0.0
        if final:
            self._bin += 1

    def _release(self, slot: int) -> None:
        self._active[slot] = False
        self._rate[slot] = 0.0
        self._flows[slot] = None
        self._free.append(slot)

    def _request_update(self) -> None:
        if not self._update_pending:
            self._update_pending = True
            ev = self.env.timeout(0)
            ev.callbacks.append(self._update)

    def _wake(self, version: int) -> Callable[[simpy.Event], None]:
        def cb(_: simpy.Event) -> None:
            if version == self._version:
                self._request_update()

        return cb

    def _update(self, _: simpy.Event | None = None) -> None:
        self._update_pending = False
        self._advance()
        act = np.flatnonzero(self._active)
        if act.size:
            rem = self._remaining[act]
            finished = act[rem <= self._rate[act] * _REL_EPS + 1e-6]
            for slot in finished:
                flow = self._flows[slot]
                assert flow is not None
                flow.end_s = self.env.now
                self._release(int(slot))
                flow.done.succeed(flow)
            if finished.size:
                # Whoever waited on these flows runs next, at this same instant, and usually starts the
                # next round: re-share once after that instead of now and again then.
                self._request_update()
                return
        self._reshare()
        self._version += 1
        act = np.flatnonzero(self._active)
        if act.size:
            rate = self._rate[act]
            moving = rate > 0
            if moving.any():
                t_next = float(np.min(self._remaining[act][moving] / rate[moving]))
                ev = self.env.timeout(max(t_next, 0.0))
                ev.callbacks.append(self._wake(self._version))
        if self.on_reshare is not None:
            self.on_reshare(self)

    def _reshare(self) -> None:
        """Max-min fair rates of all active flows, by vectorised progressive filling."""
        self.reshares += 1
        self._ensure_links()
        act = np.flatnonzero(self._active)
        n_links = len(self.links)
        new_load: FloatArray
        if act.size == 0:
            new_load = np.zeros(n_links + 1)
        else:
            paths = self._path[act]
            caps = self._flow_cap[act]
            rates = np.zeros(act.size)
            residual = self._cap_links.copy()
            frozen = np.zeros(act.size, dtype=bool)
            while True:
                live = ~frozen
                lp = paths[live]
                counts = np.bincount(lp.ravel(), minlength=n_links + 1).astype(np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    share = np.where(counts > 0, residual / counts, np.inf)
                inc = np.minimum(share[lp].min(axis=1), caps[live] - rates[live])
                delta = float(inc.min())
                if not math.isfinite(delta):
                    raise SimulationError("a flow has neither a finite link nor a rate cap on its path")
                rates[live] += delta
                residual -= delta * counts
                residual[n_links] = np.inf
                saturated = (residual <= self._cap_links * _REL_EPS) & self._finite
                newly = live & (saturated[paths].any(axis=1) | (rates >= caps * (1 - _REL_EPS)))
                if not newly.any():  # numerical corner: freeze the flows that set delta
                    newly = live.copy()
                    newly[live] = inc <= delta * (1 + _REL_EPS)
                frozen |= newly
                if frozen.all():
                    break
            self._rate[act] = rates
            new_load = np.bincount(
                paths.ravel(), weights=np.repeat(rates, paths.shape[1]), minlength=n_links + 1
            ).astype(np.float64)
        self._load = new_load

    def account_bytes(self, account: int) -> float:
        """Bytes moved so far by the flows of ``account``, up to now."""
        self._advance()
        return float(self._account_bytes[account]) if account < len(self._account_bytes) else 0.0

    def link_bytes(self, link: int) -> float:
        """Bytes a link has carried so far, up to now."""
        self._advance()
        return float(self._link_bytes[link]) if link < len(self._link_bytes) else 0.0

    def flows_of(self, account: int) -> list[Flow]:
        """The active flows of an account."""
        return [f for slot in np.flatnonzero(self._active & (self._account == account)) if (f := self._flows[slot])]

    def load_of(self, link: int) -> float:
        """The total rate on a link right now."""
        self._ensure_links()
        return float(self._load[link])
