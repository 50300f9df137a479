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
    """A link's load over time: at ``times_s[k]`` its total rate became ``load_bytes_per_s[k]``."""

    link: Link
    times_s: FloatArray
    load_bytes_per_s: FloatArray

    def utilization(self) -> FloatArray:
        cap = self.link.capacity_bytes_per_s
        return self.load_bytes_per_s / cap if math.isfinite(cap) and cap > 0 else np.zeros_like(self.times_s)


class FluidNetwork:
    """Links, flows and the max-min fair share of the one among the other."""

    def __init__(self, env: simpy.Environment, *, record_usage: bool = True) -> None:
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
        self._active = np.zeros(n, dtype=bool)
        self._path = np.zeros((n, 1), dtype=np.int64)
        self._flows: list[Flow | None] = [None] * n
        self._free: list[int] = list(range(n - 1, -1, -1))
        self._next_id = 0
        self._last_t = 0.0
        self._update_pending = False
        self._version = 0
        self._load = np.zeros(0)
        self._usage_t: list[float] = []
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
        # One extra, infinitely wide link pads short paths.
        self._cap_links = np.array([lk.capacity_bytes_per_s for lk in self.links] + [np.inf])
        self._finite = np.isfinite(self._cap_links)
        self._load = np.zeros(len(self.links) + 1)
        return len(self.links) - 1

    def link_index(self, name: str) -> int:
        return self._by_name[name]

    def path_latency(self, path: Sequence[int]) -> float:
        return sum(self.links[i].latency_s for i in path)

    def path_bandwidth(self, path: Sequence[int]) -> float:
        return min((self.links[i].capacity_bytes_per_s for i in path), default=math.inf)

    # --- flows -----------------------------------------------------------------------------------------

    def transfer(
        self, path: Sequence[int], size_bytes: float, *, cap_bytes_per_s: float = math.inf, tag: Any = None
    ) -> Flow:
        """Start a flow of ``size_bytes`` along ``path`` now; its ``done`` event fires when it ends."""
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

    def rate_of(self, flow: Flow) -> float:
        if flow.slot < 0 or self._flows[flow.slot] is not flow:
            return 0.0
        return float(self._rate[flow.slot])

    def active_flows(self) -> list[tuple[Flow, float]]:
        """Every flow on the wire with its current rate."""
        out = []
        for slot in np.flatnonzero(self._active):
            f = self._flows[slot]
            assert f is not None
            out.append((f, float(self._rate[slot])))
        return out

    def usage(self) -> list[LinkUsage]:
        """The recorded load of every link over time (a step function)."""
        n = len(self.links)
        if not self._usage_t:
            return [LinkUsage(lk, np.zeros(1), np.zeros(1)) for lk in self.links]
        counts = np.array([len(ix) for ix in self._usage_idx])
        times = np.repeat(np.array(self._usage_t), counts)
        idx = np.concatenate(self._usage_idx)
        val = np.concatenate(self._usage_val)
        order = np.argsort(idx, kind="stable")
        idx, times, val = idx[order], times[order], val[order]
        bounds = np.searchsorted(idx, np.arange(n + 1))
        out = []
        for i, lk in enumerate(self.links):
            a, b = bounds[i], bounds[i + 1]
            t = np.concatenate(([0.0], times[a:b])) if a == b or times[a] > 0 else times[a:b]
            v = np.concatenate(([0.0], val[a:b])) if a == b or times[a] > 0 else val[a:b]
            out.append(LinkUsage(lk, t, v))
        return out

    # --- internals -------------------------------------------------------------------------------------

    def _grow(self) -> None:
        old = len(self._remaining)
        new = old * 2
        self._remaining = np.concatenate((self._remaining, np.zeros(old)))
        self._rate = np.concatenate((self._rate, np.zeros(old)))
        self._flow_cap = np.concatenate((self._flow_cap, np.full(old, np.inf)))
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
        now = self.env.now
        dt = now - self._last_t
        if dt > 0:
            act = self._active
            self._remaining[act] -= self._rate[act] * dt
        self._last_t = now

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
        if self.record_usage:
            changed = np.flatnonzero(np.abs(new_load[:n_links] - self._load[:n_links]) > 1e-6)
            if changed.size:
                self._usage_t.append(self.env.now)
                self._usage_idx.append(changed)
                self._usage_val.append(new_load[changed])
        self._load = new_load

    def load_of(self, link: int) -> float:
        """The total rate on a link right now."""
        return float(self._load[link])
