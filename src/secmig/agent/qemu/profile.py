"""Profile a running QEMU VM over its QMP socket: what a migration prediction needs, measured live.

A user about to migrate a VM has only what the running VM shows. :func:`profile_vm` measures:

1. **RAM** (``query-memory-size-summary``) and the QEMU version and accelerator.
2. **A probe migration to a null sink** (``exec:cat > /dev/null``, uncapped, downtime-limit 0 so that
   it cannot switch over), cancelled after a few seconds. Its first pass over RAM counts the pages
   that hold data (``ram.normal``) and the untouched ones (``ram.duplicate``) — the used memory, exactly;
   QEMU's ``dirty-pages-rate`` over the following syncs is the guest's dirty rate *while its writes are
   being tracked*, which is what a migration sees (under TCG every first write to a page after a sync
   takes the slow, not-dirty path, and the guest runs slower). This is the only step that disturbs the
   guest, for ``probe_s`` seconds plus the first pass; the source keeps running throughout and the
   migration parameters are put back afterwards.
3. **The dirty curve**: QEMU's ``calc-dirty-rate`` in page-sampling mode at several windows (1 s and
   4 s by default). It hashes a random sample of pages and counts those changed after the window, so
   it sees *distinct* pages dirtied in the window — how a dirty set saturates on its working set. It
   does not touch dirty logging and costs the guest nothing. (Its dirty-bitmap mode crashes QEMU 7.2
   under TCG, so it is not used.)

:func:`fit_dirty_model` then fits the rate, the working set and the pattern (sequential, uniform,
hotspot) to those points. Nothing here prints; ``secmig predict --qmp`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ExecuteError, QMPClient, QMPError

from secmig.errors import ConfigError, MigrationError, QemuError
from secmig.model.dirty import DirtyModel, Hotspot, NoDirtying, Sequential, Uniform
from secmig.model.units import PAGE_SIZE

DEFAULT_WINDOWS_S = (1, 4)
"""calc-dirty-rate windows, seconds (QEMU takes whole seconds)."""
SAMPLE_PAGES_PER_GIB = 10_000
"""The most pages per GiB QEMU 7.2's page sampling accepts: the least noise."""
NULL_SINK = "exec:cat > /dev/null"


class QmpSession:
    """A bare QMP connection to a VM someone else started (``secmig predict --qmp unix:PATH``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._qmp = QMPClient("profile")

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout=timeout_s)
        except ExecuteError as err:
            raise QemuError(f"{self.address}: {cmd} refused: {err.error.error.desc}") from err
        except TimeoutError as err:
            raise QemuError(f"{self.address}: {cmd} got no answer in {timeout_s:.0f} s") from err
        except (QMPError, OSError, EOFError) as err:
            raise QemuError(f"{self.address}: {cmd} failed: {err}") from err


def parse_qmp_address(address: str) -> Path:
    """``unix:PATH`` (or a bare path) → the socket path; ConfigError for anything else or a missing socket."""
    path = address.removeprefix("unix:")
    if address.startswith(("tcp:", "vsock:")) or not path:
        raise ConfigError(f"--qmp: {address!r}: give unix:PATH of the VM's QMP socket")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--qmp: {p}: no such socket (is the VM running with -qmp unix:{p},server=on?)")
    if not p.is_socket():
        raise ConfigError(f"--qmp: {p} is not a socket")
    return p


@contextlib.asynccontextmanager
async def qmp_session(address: str, timeout_s: float = 10.0) -> AsyncIterator[QmpSession]:
    """Connect to the QMP socket at ``address`` (``unix:PATH``) for the block's duration."""
    path = parse_qmp_address(address)
    session = QmpSession(address)
    try:
        await asyncio.wait_for(session._qmp.connect(str(path)), timeout=timeout_s)
    except (QMPError, OSError, TimeoutError) as err:
        raise ConfigError(f"--qmp: cannot talk QMP on {path}: {err}") from err
    try:
        yield session
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await session._qmp.disconnect()


class Executor(Protocol):
    """Anything with QEMU's ``execute`` (a :class:`QmpSession` or a :class:`QemuMachine`)."""

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any: ...


@dataclass(frozen=True, slots=True)
class DirtySample:
    """Distinct pages the guest dirtied in a window, as calc-dirty-rate's page sampling estimates them."""

    window_s: float
    pages: float


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one pass of a probe migration to a null sink saw."""

    used_pages: int
    """Pages with data (``ram.normal``)."""
    zero_pages: int
    """Untouched pages (``ram.duplicate``), sent as a header and one byte each."""
    first_pass_s: float
    pause_s: float
    """How long the source was stopped: QEMU's downtime of the probe plus the time to resume it."""
    tracked_s: float
    """How long dirty logging was on."""


@dataclass(frozen=True, slots=True)
class DirtyFit:
    """A dirty-page model fitted to measured points."""

    pattern: str
    """sequential, uniform or hotspot (``none`` for a guest that dirties nothing)."""
    rate_pages_per_s: float
    working_set_pages: int
    hot_share: float
    residual: float
    """Root-mean-square relative misfit over the points."""

    def model(self, ram_pages: int) -> DirtyModel:
        if self.rate_pages_per_s <= 0 or self.pattern == "none":
            return NoDirtying()
        if self.pattern == "sequential":
            return Sequential(self.rate_pages_per_s, self.working_set_pages)
        if self.pattern == "uniform":
            return Uniform(self.rate_pages_per_s, self.working_set_pages)
        return Hotspot(self.rate_pages_per_s, self.working_set_pages, ram_pages, self.hot_share)


@dataclass(frozen=True, slots=True)
class VMProfile:
    """A running VM, measured: everything :func:`secmig.sim.predict.predict` needs about it."""

    ram_bytes: int
    used_bytes: int
    zero_pages: int
    qemu_version: tuple[int, int, int]
    accel: str
    probe: ProbeResult
    samples: tuple[DirtySample, ...]
    fit: DirtyFit
    wall_s: float

    @property
    def working_set_bytes(self) -> int:
        return self.fit.working_set_pages * PAGE_SIZE

    def dirty_model(self) -> DirtyModel:
        return self.fit.model(math.ceil(self.ram_bytes / PAGE_SIZE))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ram_bytes": self.ram_bytes,
            "used_bytes": self.used_bytes,
            "zero_pages": self.zero_pages,
            "qemu_version": ".".join(map(str, self.qemu_version)),
            "accel": self.accel,
            "probe": {"first_pass_s": self.probe.first_pass_s, "pause_s": self.probe.pause_s},
            "dirty_samples": [{"window_s": s.window_s, "pages": s.pages} for s in self.samples],
            "fit": {
                "pattern": self.fit.pattern,
                "rate_pages_per_s": self.fit.rate_pages_per_s,
                "working_set_bytes": self.working_set_bytes,
                "hot_share": self.fit.hot_share,
                "residual": self.fit.residual,
            },
            "wall_s": self.wall_s,
        }


def _ram(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram")
    return ram if isinstance(ram, dict) else {}


async def probe_migration(vm: Executor, timeout_s: float = 600.0, poll_s: float = 0.01) -> ProbeResult:
    """One uncapped pass over RAM to a null sink, cancelled at the bitmap sync that ends it.

    downtime-limit 1 ms: after the pass QEMU syncs its bitmap (the second ``dirty-sync-count``), and
    ``ram.normal``/``ram.duplicate`` then count every page once. The probe is cancelled there. A guest
    that dirties almost nothing may fit the 1 ms budget at once, and QEMU switches over to the sink:
    the source is then resumed with ``cont`` (its pause is reported). Parameters are restored afterwards.
    """
    status = await vm.execute("query-migrate")
    if isinstance(status, dict) and status.get("status") in ("active", "setup", "pre-switchover", "device"):
        raise MigrationError("the VM is already migrating; profile it before or after")
    old = await vm.execute("query-migrate-parameters")
    keep = {k: old[k] for k in ("max-bandwidth", "downtime-limit") if isinstance(old, dict) and k in old}
    await vm.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 1})
    t0 = time.monotonic()
    info: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    first: float | None = None
    pause = 0.0
    try:
        await vm.execute("migrate", {"uri": NULL_SINK})
        while True:
            got = await vm.execute("query-migrate")
            info = got if isinstance(got, dict) else {}
            state = info.get("status")
            if state in ("completed", "failed", "cancelled"):
                break
            ram = _ram(info)
            if state == "active" and int(ram.get("dirty-sync-count", 0) or 0) >= 2:
                first, seen = time.monotonic() - t0, ram
                await vm.execute("migrate_cancel")
            elif time.monotonic() - t0 > timeout_s:
                await vm.execute("migrate_cancel")
                raise MigrationError(f"the probe's pass over RAM did not end in {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)
        if info.get("status") == "completed":
            stopped_seen = time.monotonic()
            await vm.execute("cont")
            down_ms = info.get("downtime")
            pause = (down_ms / 1000 if isinstance(down_ms, int | float) else 0.0) + time.monotonic() - stopped_seen
    finally:
        run = await vm.execute("query-status")
        if isinstance(run, dict) and run.get("status") == "postmigrate":
            await vm.execute("cont")
        if keep:
            await vm.execute("migrate-set-parameters", keep)
    tracked = time.monotonic() - t0
    if info.get("status") == "completed" and first is None:
        seen, first = _ram(info), tracked
    if first is None:
        raise MigrationError(f"the probe migration {info.get('status')}: {info.get('error-desc', 'no reason given')}")
    return ProbeResult(int(seen.get("normal", 0)), int(seen.get("duplicate", 0)), first, pause, tracked)


async def sample_dirty_pages(vm: Executor, window_s: int, ram_pages: int) -> DirtySample:
    """Distinct pages dirtied in ``window_s`` seconds, from calc-dirty-rate's page sampling."""
    await vm.execute(
        "calc-dirty-rate", {"calc-time": int(window_s), "mode": "page-sampling", "sample-pages": SAMPLE_PAGES_PER_GIB}
    )
    deadline = time.monotonic() + window_s + 30.0
    await asyncio.sleep(window_s)
    while time.monotonic() < deadline:
        info = await vm.execute("query-dirty-rate")
        if isinstance(info, dict) and info.get("status") == "measured":
            mb_per_s = float(info.get("dirty-rate", 0))
            return DirtySample(float(window_s), min(mb_per_s * (1 << 20) / PAGE_SIZE * window_s, float(ram_pages)))
        await asyncio.sleep(0.1)
    raise QemuError(f"calc-dirty-rate did not finish in {window_s + 30} s")


def _invert_rate(pattern: str, pages: float, window_s: float, w: float) -> float:
    """The write rate that dirties ``pages`` distinct pages in ``window_s`` over a working set of ``w``."""
    if pattern == "sequential" or pages >= w:
        return pages / window_s
    return -w * math.log1p(-pages / w) / window_s


def fit_dirty_model(samples: Sequence[DirtySample], used_pages: int, ram_pages: int) -> DirtyFit:
    """The pattern, rate and working set that best explain the dirty curve.

    For each pattern (sequential: min(W, r·t); uniform: W·(1 − e^(−r·t/W))) and each working set W on
    a log grid, r is the rate that matches the shortest window exactly; the misfit is the RMS relative
    error over the other windows; the best (pattern, W) wins, ties going to sequential. A curve still
    growing as rate × window at the longest window shows no working set: W is then taken as the used
    memory (what the guest could write without touching new pages), a bound rather than a measurement.
    """
    pts = sorted((s for s in samples if s.window_s > 0), key=lambda s: s.window_s)
    if not pts or all(s.pages <= 0 for s in pts):
        return DirtyFit("none", 0.0, max(used_pages, 1), 0.9, 0.0)
    first, last = pts[0], pts[-1]
    linear = first.pages / first.window_s * last.window_s
    if first.pages <= 0 or last.pages >= 0.9 * linear:
        w = max(used_pages, int(last.pages), 1)
        r = _invert_rate("uniform", first.pages, first.window_s, w)
        return DirtyFit("uniform", r, w, 0.9, 0.0)

    def misfit(model: DirtyModel) -> float:
        errs = [((model.dirty_pages(s.window_s) - s.pages) / s.pages) ** 2 for s in pts if s.pages > 0]
        return math.sqrt(sum(errs) / len(errs))

    best: DirtyFit | None = None
    lo, hi = max(last.pages, 1.0), float(max(ram_pages, 1))
    for k in range(241):
        wf = lo * (hi / lo) ** (k / 240) if hi > lo else lo
        for pattern in ("sequential", "uniform"):
            r = _invert_rate(pattern, first.pages, first.window_s, wf)
            wp = max(round(wf), 1)
            model: DirtyModel = Sequential(r, wp) if pattern == "sequential" else Uniform(r, wp)
            fit = DirtyFit(pattern, r, wp, 0.9, misfit(model))
            bias = 0.01 if pattern == "sequential" else 0.0
            best_bias = 0.01 if best is not None and best.pattern == "sequential" else 0.0
            if best is None or fit.residual - bias < best.residual - best_bias:
                best = fit
    assert best is not None
    return best


async def profile_vm(
    vm: Executor,
    *,
    windows_s: Sequence[int] = DEFAULT_WINDOWS_S,
) -> VMProfile:
    """Measure a running VM (see the module docstring): RAM, used memory, dirty rate and curve; fit them."""
    t0 = time.monotonic()
    mem = await vm.execute("query-memory-size-summary")
    ram_bytes = int(mem["base-memory"]) if isinstance(mem, dict) else 0
    if ram_bytes <= 0:
        raise QemuError("query-memory-size-summary: no base memory")
    version = await vm.execute("query-version")
    q = version.get("qemu", {}) if isinstance(version, dict) else {}
    qv = (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))
    kvm = await vm.execute("query-kvm")
    accel = "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "tcg"
    ram_pages = math.ceil(ram_bytes / PAGE_SIZE)
    samples = [await sample_dirty_pages(vm, int(w), ram_pages) for w in sorted(windows_s)]
    probe = await probe_migration(vm)
    used_pages = min(probe.used_pages, ram_pages)
    fit = fit_dirty_model(samples, used_pages, ram_pages)
    return VMProfile(
        ram_bytes=ram_bytes,
        used_bytes=used_pages * PAGE_SIZE,
        zero_pages=probe.zero_pages,
        qemu_version=qv,
        accel=accel,
        probe=probe,
        samples=tuple(samples),
        fit=fit,
        wall_s=time.monotonic() - t0,
    )


async def profile_over_qmp(address: str, windows_s: Sequence[int] = DEFAULT_WINDOWS_S) -> VMProfile:
    """:func:`profile_vm` on the VM whose QMP socket is ``address`` (``unix:PATH``)."""
    async with qmp_session(address) as session:
        return await profile_vm(session, windows_s=windows_s)
