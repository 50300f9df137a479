"""A calibration run: real QEMU migrations of the reference guest, beside secmig's prediction of them.

:func:`run_calibration` boots the guest in a source QEMU, measures its write rate, starts a destination
QEMU on loopback, migrates with the given max-bandwidth and downtime-limit, checks that the guest runs on
the destination, and stops both. :func:`predict_for` asks :func:`secmig.sim.predict.predict` about the
same parameters — only those a user could measure: RAM, used memory, working set, write rate, pattern,
bandwidth, downtime limit — and :func:`compare` lines the two up with relative errors. CloudSim's
formula (RAM ÷ (bandwidth / 2)) is the baseline the benchmark prints beside them.

Nothing here prints; the CLI and ``benchmarks/fidelity.py`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from secmig.agent.qemu.guest import PATTERN_TO_MODEL, GuestParams, build_guest
from secmig.agent.qemu.machine import (
    Accel,
    AccelChoice,
    MachineConfig,
    QemuMachine,
    choose_accel,
    find_qemu,
)
from secmig.agent.qemu.migration import (
    MemoryCheck,
    MigrationMeasurement,
    MigrationSettings,
    WriteRate,
    compare_guest_memory,
    installed_qemu_version,
    measure_write_rate,
    migrate,
    tcg_dirty_sync_workaround,
)
from secmig.agent.qemu.profile import VMProfile, profile_vm
from secmig.errors import ConfigError, GuestError, QemuError

__all__ = [
    "GUEST_BASE_USED_BYTES",
    "CalibrationConfig",
    "CalibrationRun",
    "ComparisonRow",
    "LinuxCase",
    "LinuxRun",
    "Prediction",
    "calibrate",
    "cloudsim_linux",
    "cloudsim_prediction",
    "compare",
    "find_qemu",
    "measure_loopback_bandwidth",
    "predict_for",
    "predict_linux",
    "run_calibration",
    "run_linux_case",
]

GUEST_BASE_USED_BYTES = 512 << 10
"""Non-zero RAM besides the working set (BIOS data, option ROM copies, the kernel): about 130 pages,
measured from ram.normal of an idle guest's migration."""


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """One calibration case."""

    ram_bytes: int = 256 << 20
    guest: GuestParams = field(default_factory=GuestParams)
    bandwidth_bytes_per_s: float = 100e6
    downtime_limit_s: float = 0.3
    accel: AccelChoice = "auto"
    qemu_binary: str | None = None
    measure_s: float = 2.0
    """How long the write rate is measured before migrating."""
    timeout_s: float = 60.0
    """A migration not completed after this long is cancelled and recorded as not converging."""
    link_bandwidth_bytes_per_s: float | None = None
    """Speed of the path itself (here loopback): QEMU lifts max-bandwidth for the stop-and-copy."""

    def __post_init__(self) -> None:
        if self.ram_bytes < self.guest.min_ram_bytes():
            need_mib = -(-self.guest.min_ram_bytes() // (1 << 20))
            raise ConfigError(
                f"--ram {self.ram_bytes >> 20} MiB is too small for a {self.guest.working_set_bytes >> 20} "
                f"MiB working set (needs at least {need_mib} MiB)"
            )

    @property
    def used_bytes(self) -> int:
        """Guest RAM that is not zero when the migration starts."""
        return min(self.guest.working_set_bytes + GUEST_BASE_USED_BYTES, self.ram_bytes)


@dataclass(frozen=True, slots=True)
class CalibrationRun:
    """What one real run measured."""

    config: CalibrationConfig
    accel: Accel
    qemu_version: str
    boot_s: float
    """From starting QEMU to the guest running its workload."""
    write_rate: WriteRate
    migration: MigrationMeasurement
    resumed_on_destination: bool
    """The guest's write counter advanced on the destination after a completed migration."""


async def run_calibration(config: CalibrationConfig, workdir: Path | None = None) -> CalibrationRun:
    """Boot, measure, migrate, verify, stop. Both QEMU processes are gone when this returns or raises."""
    qemu = find_qemu(config.qemu_binary)
    accel = choose_accel(config.accel)
    elf = await asyncio.to_thread(build_guest)
    settings = MigrationSettings(config.bandwidth_bytes_per_s, config.downtime_limit_s, config.timeout_s)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="secmig-qemu-")))
        machine = MachineConfig(elf, config.guest.append_line(), config.ram_bytes, accel, qemu)
        t0 = time.monotonic()
        async with QemuMachine("source", machine, workdir) as source:
            await source.wait_guest_running(timeout_s=60.0)
            boot_s = time.monotonic() - t0
            actual = await source.accelerator()
            version = await source.execute("query-version")
            rate = await measure_write_rate(source, config.measure_s)
            async with QemuMachine("destination", replace(machine, incoming=True), workdir) as dest:
                measured = await migrate(source, dest, settings)
                resumed = False
                if measured.converged:
                    resumed = await _advances(dest)
        qemu_version = _version_text(version)
    return CalibrationRun(config, actual, qemu_version, boot_s, rate, measured, resumed)


async def _advances(vm: QemuMachine) -> bool:
    """Whether the guest's write counter moves (it survived the migration and runs)."""
    try:
        before = await vm.read_status()
        rate = before.rate_pages_per_s
        await asyncio.sleep(min(max(0.3, 3.0 / rate), 5.0) if rate else 0.3)
        after = await vm.read_status()
    except (GuestError, QemuError):
        return False
    return after.writes > before.writes


def _version_text(version: object) -> str:
    if isinstance(version, dict):
        q = version.get("qemu", {})
        if isinstance(q, dict):
            return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    return "unknown"


def calibrate(config: CalibrationConfig) -> CalibrationRun:
    """:func:`run_calibration` from synchronous code."""
    return asyncio.run(run_calibration(config))


# ---- prediction and comparison ----


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a model says one migration will do. ``None`` where the model has no figure."""

    model: str
    total_time_s: float
    downtime_s: float | None
    bytes_sent: int | None
    rounds: int | None
    converged: bool


def predict_for(config: CalibrationConfig, write_rate_pages_per_s: float) -> Prediction:
    """secmig's prediction for a case, from the parameters a user can measure (pre-copy, QEMU's rule).

    Not converging is predicted as the migration still running when ``config.timeout_s`` is reached.
    """
    from secmig.sim.predict import predict  # the simulator is optional for the measuring side

    result = predict(
        ram_bytes=config.ram_bytes,
        used_bytes=config.used_bytes,
        dirty_rate_pages_per_s=write_rate_pages_per_s,
        working_set_bytes=config.guest.working_set_bytes,
        pattern=PATTERN_TO_MODEL[config.guest.pattern],
        bandwidth_bytes_per_s=config.bandwidth_bytes_per_s,
        latency_s=0.0,
        downtime_limit_s=config.downtime_limit_s,
        policy="qemu",
        on_nonconvergence="abort",
        max_time_s=config.timeout_s,
        # QEMU 7.2 budgets the downtime with the measured (capped) speed but sends the stop-and-copy
        # uncapped, at the link's speed; it has no avail-switchover-bandwidth to say otherwise.
        switchover_bandwidth_bytes_per_s=config.link_bandwidth_bytes_per_s,
        budget_with_switchover_bandwidth=False,
    )
    return Prediction(
        model="secmig",
        total_time_s=result.total_time_s,
        downtime_s=result.downtime_s if result.converged else None,
        bytes_sent=result.bytes_sent,
        rounds=len(result.rounds),
        converged=result.converged,
    )


def measure_loopback_bandwidth(total_bytes: int = 512 << 20, chunk: int = 1 << 20) -> float:
    """Bytes per second one TCP connection carries on loopback here: the link speed of a local migration.

    What a user would measure with iperf on a real link; the stop-and-copy of a capped migration runs at it.
    """
    import socket
    import threading
    import time

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = 0

        def sink() -> None:
            nonlocal received
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(chunk):
                    received += len(data)

        reader = threading.Thread(target=sink, daemon=True)
        reader.start()
        payload = b"\xa5" * chunk
        with socket.create_connection(("127.0.0.1", port)) as client:
            t0 = time.perf_counter()
            for _ in range(total_bytes // chunk):
                client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reader.join()
            elapsed = time.perf_counter() - t0
    return received / elapsed


def cloudsim_prediction(config: CalibrationConfig) -> Prediction:
    """CloudSim's migration model: the whole RAM over half the bandwidth, no downtime, always converges."""
    return Prediction(
        model="cloudsim",
        total_time_s=config.ram_bytes / (config.bandwidth_bytes_per_s / 2),
        downtime_s=None,
        bytes_sent=None,
        rounds=None,
        converged=True,
    )


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    """One figure, measured and predicted."""

    metric: str
    unit: str
    measured: float | None
    predicted: float | None

    @property
    def rel_error(self) -> float | None:
        """(predicted − measured) ÷ measured; None when either is missing or measured is 0."""
        if self.measured is None or self.predicted is None or self.measured == 0:
            return None
        return (self.predicted - self.measured) / self.measured

    @property
    def abs_error(self) -> float | None:
        if self.measured is None or self.predicted is None:
            return None
        return self.predicted - self.measured


def compare(run: CalibrationRun, prediction: Prediction) -> list[ComparisonRow]:
    """Measured against predicted: total time, downtime, bytes sent, rounds, convergence."""
    m = run.migration
    return [
        ComparisonRow("total time", "s", m.total_time_s, prediction.total_time_s),
        ComparisonRow("downtime", "s", m.downtime_s, prediction.downtime_s),
        ComparisonRow("bytes sent", "B", float(m.transferred_bytes), _opt(prediction.bytes_sent)),
        ComparisonRow("rounds", "", float(m.rounds), _opt(prediction.rounds)),
        ComparisonRow("converged", "", float(m.converged), float(prediction.converged)),
    ]


def _opt(v: int | None) -> float | None:
    return None if v is None else float(v)


# ---- the Linux guest, predicted from its QMP socket alone ----


@dataclass(frozen=True, slots=True)
class LinuxCase:
    """One Linux-guest case: the guest's workload, QEMU's settings, and the link's own speed."""

    ram_bytes: int
    working_set_bytes: int
    dirty_pages_per_s: int
    bandwidth_bytes_per_s: float
    downtime_limit_s: float
    pattern: str = "seq"
    link_bytes_per_s: float | None = None
    timeout_s: float = 60.0
    qemu_binary: str | None = None
    tcg_workaround: bool = False
    """Apply :func:`tcg_dirty_sync_workaround` (correct memory, but slow syncs on larger guests)."""


@dataclass(frozen=True, slots=True)
class LinuxRun:
    """A Linux guest profiled live, then really migrated (with the TCG workaround), then checked."""

    case: LinuxCase
    profile: VMProfile
    migration: MigrationMeasurement
    memory: MemoryCheck | None
    """Source and destination RAM compared before the destination ran (completed migrations only)."""
    workaround: tuple[str, ...]


async def run_linux_case(case: LinuxCase, workdir: Path | None = None) -> LinuxRun:
    """Boot the Linux guest, profile it over QMP, migrate it on loopback, compare the two RAMs."""
    from secmig.agent.qemu.linuxguest import LinuxGuestParams, boot_linux_guest, build_linux_guest

    qemu = find_qemu(case.qemu_binary)
    accel = choose_accel("auto")
    image = await asyncio.to_thread(build_linux_guest)
    params = LinuxGuestParams(
        working_set_bytes=case.working_set_bytes, dirty_pages_per_s=case.dirty_pages_per_s, pattern=case.pattern
    )
    extra = (
        tcg_dirty_sync_workaround(accel, installed_qemu_version(qemu), case.ram_bytes) if case.tcg_workaround else ()
    )
    config = image.machine_config(params, ram_bytes=case.ram_bytes, accel=accel, qemu_binary=qemu, extra_args=extra)
    settings = MigrationSettings(case.bandwidth_bytes_per_s, case.downtime_limit_s, case.timeout_s)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="secmig-lc-")))
        async with boot_linux_guest("source", config, workdir) as (source, _ready):
            await asyncio.sleep(1.0)
            prof = await profile_vm(source)
            # -S: the destination stays paused after the migration until its RAM has been compared.
            dest_config = replace(config, incoming=True, extra_args=(*config.extra_args, "-S"))
            async with QemuMachine("destination", dest_config, workdir) as dest:
                measured = await migrate(source, dest, settings, track_guest=False)
                memory = None
                if measured.converged:
                    memory = await compare_guest_memory(source, dest, case.ram_bytes, workdir)
                    await dest.execute("cont")
    return LinuxRun(case, prof, measured, memory, extra)


def predict_linux(run: LinuxRun) -> Prediction:
    """secmig's prediction of a Linux-guest case from its live profile and the case's QEMU settings."""
    from secmig.sim.predict import predict

    p = run.profile
    c = run.case
    result = predict(
        ram_bytes=p.ram_bytes,
        used_bytes=p.used_bytes,
        dirty_rate_pages_per_s=p.fit.rate_pages_per_s,
        working_set_bytes=p.working_set_bytes,
        pattern=p.fit.pattern if p.fit.pattern != "none" else "uniform",
        bandwidth_bytes_per_s=c.bandwidth_bytes_per_s,
        downtime_limit_s=c.downtime_limit_s,
        policy="qemu",
        on_nonconvergence="abort",
        max_time_s=c.timeout_s,
        link_bytes_per_s=c.link_bytes_per_s,
        budget_with_switchover_bandwidth=False,
    )
    return Prediction("secmig", result.total_time_s, result.downtime_s if result.converged else None,
                      result.bytes_sent, len(result.rounds), result.converged)  # fmt: skip


def cloudsim_linux(case: LinuxCase) -> Prediction:
    """CloudSim's formula for a Linux-guest case: RAM ÷ (bandwidth / 2)."""
    return Prediction("cloudsim", case.ram_bytes / (case.bandwidth_bytes_per_s / 2), None, None, None, True)
