"""A real pre-copy migration between two QEMU machines on loopback, and what QEMU says about it.

:func:`measure_write_rate` reads the guest's write counter twice over QMP. :func:`migrate` sets
``max-bandwidth`` and ``downtime-limit`` on the source, points it at a destination started with
``-incoming defer``, polls ``query-migrate`` until the migration completes, fails, or runs past its
time cap — then it cancels it and records that it did not converge. The figures are QEMU's own
(total-time, downtime, ram.transferred, ram.dirty-sync-count, …), in SI units with the unit in the name.

**QEMU before 9.0 loses dirty pages under TCG.** Its fast bitmap sync (``ram_addr.h``:
``cpu_physical_memory_sync_dirty_bitmap``, taken when a RAM block is a whole number of 64-page words)
clears the migration dirty bits without resetting the vCPUs' TLB entries, so a page the guest keeps in
its TLB (the kernel's jiffies, timekeeping, run queues) is written from then on without being marked
dirty, and the destination gets a stale copy: measured here, 31–48 stale pages in every one of 12
Linux-guest migrations with more than three syncs, kernel data at 16–45 MiB, a guest oops some of the
time. QEMU 9.0 fixed it (commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG
memory access"). Ruled out by measurement: calc-dirty-rate (not run at all in those migrations),
MTTCG (``thread=single`` lost as many pages) and the ``-S``/resume sequence (the pages differ before
the destination ever runs); an idle guest (3 syncs) lost none. :func:`tcg_dirty_sync_workaround`
gives the guest 4 KiB more RAM so that the block is not word-sized and QEMU takes its per-page path,
which does reset the TLB entries: 0 stale pages in 256 MiB guests, but that path resets the whole
TLB once per dirty page, and on a 512 MiB guest with a 128 MiB working set the syncs grew so slow
that a migration converging in 2.9 s without it did not converge in 60 s — so it is opt-in, not a
fix. :func:`compare_guest_memory` checks a migration page by page; the real fix is QEMU ≥ 9.0 (or KVM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secmig.agent.qemu.machine import QemuMachine
from secmig.errors import ConfigError, GuestError, MigrationAborted, MigrationError, QemuError

_LOG = logging.getLogger(__name__)

_DONE = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class WriteRate:
    """The guest's measured page-write rate over an interval of host time."""

    pages_per_s: float
    writes: int
    interval_s: float
    lagged: int
    """Times the guest's pacing fell 100 ms behind during the interval (it could not keep up)."""


async def measure_write_rate(vm: QemuMachine, duration_s: float = 2.0) -> WriteRate:
    """Count the guest's writes over ``duration_s`` of host time."""
    if duration_s <= 0:
        raise ConfigError(f"write-rate measurement: {duration_s} s is not a duration")
    t0a = time.monotonic()
    s0 = await vm.read_status()
    t0 = (t0a + time.monotonic()) / 2
    await asyncio.sleep(duration_s)
    t1a = time.monotonic()
    s1 = await vm.read_status()
    t1 = (t1a + time.monotonic()) / 2
    writes = s1.writes - s0.writes
    if writes < 0:
        raise GuestError(f"{vm.name}: the guest's write counter went backwards ({s0.writes} → {s1.writes})")
    return WriteRate(writes / (t1 - t0), writes, t1 - t0, s1.lagged - s0.lagged)


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    """What a migration is allowed: QEMU's max-bandwidth and downtime-limit, and our time cap."""

    max_bandwidth_bytes_per_s: float
    downtime_limit_s: float = 0.3
    timeout_s: float = 60.0
    """Cancel and record 'did not converge' when it has not completed after this long."""
    poll_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_bandwidth_bytes_per_s <= 0:
            raise ConfigError(f"max bandwidth: {self.max_bandwidth_bytes_per_s} B/s is not positive")
        if not 0 < self.downtime_limit_s <= 2000:
            raise ConfigError(f"downtime limit: {self.downtime_limit_s} s is out of range")
        if self.timeout_s <= 0:
            raise ConfigError(f"migration timeout: {self.timeout_s} s is not positive")


@dataclass(frozen=True, slots=True)
class MigrationSample:
    """One poll of ``query-migrate`` during the live phase."""

    t_s: float
    transferred_bytes: int
    remaining_bytes: int
    dirty_sync_count: int
    dirty_pages_rate: int
    expected_downtime_s: float | None


@dataclass(frozen=True, slots=True)
class MigrationMeasurement:
    """What QEMU reported for one migration (or for the part of it that ran before we cancelled it)."""

    status: str
    """completed, cancelled (after the time cap: did not converge) or failed."""
    converged: bool
    total_time_s: float
    """QEMU's total-time for a completed migration; host time until the cancel otherwise."""
    downtime_s: float | None
    setup_time_s: float | None
    transferred_bytes: int
    ram_total_bytes: int
    normal_pages: int
    zero_pages: int
    dirty_sync_count: int
    throughput_mbps: float | None
    precopy_bytes: int | None
    downtime_bytes: int | None
    guest_writes: int | None
    """Guest page writes from the migrate command to the last reading before the source stopped."""
    guest_write_rate_pages_per_s: float | None
    """The guest's write rate during the live phase (dirty tracking may slow it down)."""
    samples: tuple[MigrationSample, ...] = field(default=(), repr=False)
    error: str | None = None

    @property
    def rounds(self) -> int:
        """Rounds, the stop-and-copy included: QEMU syncs the dirty bitmap once before each (an idle
        guest gives 2: the full copy, then the stop-and-copy), as ``len(MigrationResult.rounds)``."""
        return self.dirty_sync_count


TCG_SYNC_FIXED_IN = (9, 0)
"""The QEMU version whose TCG bitmap sync keeps the TLB coherent (commit 03bfc2188f)."""
WORKAROUND_EXTRA_BYTES = 4096
"""RAM added by :func:`tcg_dirty_sync_workaround`: one page, so the block is not a whole 64-page word."""


def qemu_version_tuple(version: object) -> tuple[int, int, int]:
    """``query-version``'s answer as (major, minor, micro); (0, 0, 0) when it cannot be read."""
    if isinstance(version, dict):
        q = version.get("qemu", {})
        if isinstance(q, dict):
            parts = (q.get("major"), q.get("minor"), q.get("micro"))
            if all(isinstance(v, int) for v in parts):
                return (int(q["major"]), int(q["minor"]), int(q["micro"]))
    return (0, 0, 0)


def installed_qemu_version(binary: str) -> tuple[int, int, int]:
    """``qemu-system-x86_64 --version`` of this binary as (major, minor, micro); (0, 0, 0) if unreadable."""
    import re
    import subprocess

    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0, 0)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)


def tcg_dirty_sync_workaround(accel: str, qemu_version: tuple[int, int, int], ram_bytes: int) -> tuple[str, ...]:
    """Extra QEMU arguments that keep a TCG migration from losing dirty pages on QEMU < 9.0.

    A second ``-m`` (QEMU merges its memory options, the last size wins) with one page more than
    ``ram_bytes``: the RAM block is then not a whole number of 64-page bitmap words, and QEMU syncs it
    page by page, resetting the TLB entries of every page it clears. Source and destination need the
    same arguments. Empty under KVM and on fixed QEMUs.
    """
    if accel != "tcg" or qemu_version >= TCG_SYNC_FIXED_IN:
        return ()
    return ("-m", f"{(ram_bytes + WORKAROUND_EXTRA_BYTES) >> 10}k")


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    """Source and destination RAM compared page by page, both paused after a migration."""

    pages: int
    stale_pages: int
    first_stale: tuple[int, ...]
    """Guest-physical addresses of the first few pages that differ."""

    @property
    def intact(self) -> bool:
        return self.stale_pages == 0


async def compare_guest_memory(
    source: QemuMachine, destination: QemuMachine, ram_bytes: int, workdir: Path
) -> MemoryCheck:
    """Dump the RAM of both machines (``pmemsave``; both must be paused) and count the pages that differ.

    Call it after a completed migration while the source is in ``postmigrate`` and the destination was
    started with ``-S`` (so it has not run yet): any difference is a page the migration lost.
    """
    page = 4096
    dumps = (workdir / f"{source.name}.ram", workdir / f"{destination.name}.ram")
    try:
        for vm, path in zip((source, destination), dumps, strict=True):
            await vm.execute("pmemsave", {"val": 0, "size": ram_bytes, "filename": str(path)}, timeout_s=120.0)

        def diff() -> MemoryCheck:
            stale: list[int] = []
            chunk = 16 << 20
            with open(dumps[0], "rb") as a, open(dumps[1], "rb") as b:
                for base in range(0, ram_bytes, chunk):
                    x, y = a.read(chunk), b.read(chunk)
                    if x == y:
                        continue
                    stale += [base + o for o in range(0, len(x), page) if x[o : o + page] != y[o : o + page]]
            return MemoryCheck(ram_bytes // page, len(stale), tuple(stale[:8]))

        return await asyncio.to_thread(diff)
    finally:
        for path in dumps:
            with contextlib.suppress(OSError):
                path.unlink()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just said is free on ``host`` (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _int(d: dict[str, Any], key: str, default: int = 0) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, int | float) else default


async def migrate(
    source: QemuMachine,
    destination: QemuMachine,
    settings: MigrationSettings,
    *,
    host: str = "127.0.0.1",
    track_guest: bool = True,
) -> MigrationMeasurement:
    """Migrate ``source`` to ``destination`` (started with ``incoming=True``) and measure it.

    A migration still running after ``settings.timeout_s`` is cancelled: the result says
    ``converged=False`` and the VM keeps running on its source. A migration QEMU itself fails raises
    MigrationError.
    """
    log = _LOG.getChild(f"{source.name}->{destination.name}")
    port = free_tcp_port(host)
    uri = f"tcp:{host}:{port}"
    await destination.execute("migrate-incoming", {"uri": uri})
    await source.execute(
        "migrate-set-parameters",
        {
            "max-bandwidth": int(settings.max_bandwidth_bytes_per_s),
            "downtime-limit": max(round(settings.downtime_limit_s * 1000), 1),
        },
    )
    writes0: int | None = None
    if track_guest:
        writes0 = (await source.read_status()).writes
    t0 = time.monotonic()
    await source.execute("migrate", {"uri": uri})
    log.debug("migrating to %s", uri)

    samples: list[MigrationSample] = []
    last_writes: tuple[float, int] | None = None
    info: dict[str, Any] = {}
    cancelled_for_time = False
    cancel_info: dict[str, Any] = {}
    while True:
        info = await source.execute("query-migrate")
        status = str(info.get("status", ""))
        now = time.monotonic() - t0
        if status in _DONE:
            break
        ram = info.get("ram", {})
        if isinstance(ram, dict) and status == "active":
            exp = info.get("expected-downtime")
            samples.append(
                MigrationSample(
                    now,
                    _int(ram, "transferred"),
                    _int(ram, "remaining"),
                    _int(ram, "dirty-sync-count"),
                    _int(ram, "dirty-pages-rate"),
                    exp / 1000 if isinstance(exp, int | float) else None,
                )
            )
            if track_guest:
                # The source may stop between the two commands; a failed read only loses a sample.
                with contextlib.suppress(QemuError):
                    st = await source.read_status()
                    last_writes = (time.monotonic() - t0, st.writes)
        if now > settings.timeout_s and not cancelled_for_time:
            log.debug("no convergence after %.1f s: cancelling", now)
            cancelled_for_time = True
            cancel_info = info
            await source.execute("migrate_cancel")
        await asyncio.sleep(settings.poll_interval_s)

    status = str(info.get("status"))
    if status == "failed":
        tail = destination.log_tail()
        raise MigrationError(
            f"QEMU failed the migration: {info.get('error-desc', 'no reason given')}"
            + (f" (destination: {tail})" if tail else "")
        )
    if status == "cancelled":
        if not cancelled_for_time:
            raise MigrationAborted("the migration was cancelled by someone else")
        info = {**cancel_info, "status": "cancelled"}  # the figures as they were when we gave up
    ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
    converged = status == "completed"
    elapsed = time.monotonic() - t0
    total_ms = info.get("total-time")
    downtime_ms = info.get("downtime")
    setup_ms = info.get("setup-time")
    guest_writes = rate = None
    if writes0 is not None and last_writes is not None and last_writes[0] > 0:
        guest_writes = last_writes[1] - writes0
        rate = guest_writes / last_writes[0]
    return MigrationMeasurement(
        status="completed" if converged else "cancelled",
        converged=converged,
        total_time_s=total_ms / 1000 if converged and isinstance(total_ms, int | float) else elapsed,
        downtime_s=downtime_ms / 1000 if converged and isinstance(downtime_ms, int | float) else None,
        setup_time_s=setup_ms / 1000 if isinstance(setup_ms, int | float) else None,
        transferred_bytes=_int(ram, "transferred"),
        ram_total_bytes=_int(ram, "total"),
        normal_pages=_int(ram, "normal"),
        zero_pages=_int(ram, "duplicate"),
        dirty_sync_count=_int(ram, "dirty-sync-count"),
        throughput_mbps=float(ram["mbps"]) if isinstance(ram.get("mbps"), int | float) else None,
        precopy_bytes=_int(ram, "precopy-bytes") if "precopy-bytes" in ram else None,
        downtime_bytes=_int(ram, "downtime-bytes") if "downtime-bytes" in ram else None,
        guest_writes=guest_writes,
        guest_write_rate_pages_per_s=rate,
        samples=tuple(samples),
    )
