"""The in-memory VM: RAM as a numpy buffer, a workload thread that dirties pages, a dirty bitmap.

It stands in for a hypervisor's guest so that anyone can try a secure migration with no hypervisor: the
workload writes to random pages of its working set at a paced rate and marks each page in the dirty
bitmap *after* writing it, so a page synced and then read by the migration is either read with the write
or marked again for the next round (the same guarantee KVM's write-protection gives QEMU). ``pause``
returns only when no write is in flight, so the stop-and-copy reads a frozen memory.

A VM's RAM may live in a file (:func:`open_ram`: a shared mapping of ``STATE_DIR/vms/<vm>.ram``), so that
what the guest wrote outlives a crash of the agent's process (see :mod:`secmig.agent.vmstate`);
:meth:`MemoryVM.destroy` zeroes it either way.

Nothing here knows about sockets or the protocol; :mod:`secmig.agent.drivers.memory` drives it (it is a
:class:`~secmig.agent.precopy_driver.PageSource`).
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from secmig.errors import ConfigError, StateError
from secmig.model.units import PAGE_SIZE

_TICK_S = 0.005
_WORDS_PER_PAGE = PAGE_SIZE // 8


class VMState(enum.StrEnum):
    """Where an in-memory VM is."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What the guest does: RAM, how much of it holds data at boot, and how fast it dirties its working set."""

    ram_bytes: int
    used_bytes: int
    working_set_bytes: int
    dirty_rate_pages_per_s: float
    seed: int = 1

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.ram_bytes % PAGE_SIZE:
            raise ConfigError(f"VM RAM: {self.ram_bytes} bytes is not a whole number of {PAGE_SIZE}-byte pages")
        if not 0 <= self.used_bytes <= self.ram_bytes:
            raise ConfigError(f"VM used memory: {self.used_bytes} bytes is not within its RAM")
        if not PAGE_SIZE <= self.working_set_bytes <= self.ram_bytes:
            raise ConfigError(f"VM working set: {self.working_set_bytes} bytes is not within its RAM")
        if self.dirty_rate_pages_per_s < 0:
            raise ConfigError(f"VM dirty rate: {self.dirty_rate_pages_per_s} pages/s is negative")

    @property
    def page_count(self) -> int:
        return self.ram_bytes // PAGE_SIZE

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> WorkloadSpec:
        """Inverse of :meth:`to_json` (ConfigError on anything odd)."""
        try:
            return cls(
                ram_bytes=int(doc["ram_bytes"]),  # type: ignore[call-overload]
                used_bytes=int(doc["used_bytes"]),  # type: ignore[call-overload]
                working_set_bytes=int(doc["working_set_bytes"]),  # type: ignore[call-overload]
                dirty_rate_pages_per_s=float(doc["dirty_rate_pages_per_s"]),  # type: ignore[arg-type]
                seed=int(doc.get("seed", 1)),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"VM workload spec: {err}") from err


class MemoryVM:
    """A VM whose RAM is a numpy buffer. Start it, pause it for the switchover, destroy it (wiped)."""

    page_size = PAGE_SIZE

    def __init__(
        self, name: str, spec: WorkloadSpec, memory: npt.NDArray[np.uint8] | None = None, *, boot: bool = False
    ) -> None:
        self.name = name
        self.spec = spec
        if memory is None:
            # np.zeros is calloc: untouched pages cost nothing until written, like a fresh guest.
            memory = np.zeros(spec.ram_bytes, dtype=np.uint8)
            boot = True
        if boot:
            self._boot_fill(memory)
        elif memory.shape != (spec.ram_bytes,) or memory.dtype != np.uint8:
            raise ConfigError(f"VM {name}: memory buffer does not match {spec.ram_bytes} bytes of RAM")
        self.memory = memory
        self.dirty = np.zeros(spec.page_count, dtype=np.bool_)
        self.writes = 0
        self.state = VMState.CREATED
        self._lock = threading.Lock()
        self._paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = np.random.default_rng(spec.seed)

    def _boot_fill(self, memory: npt.NDArray[np.uint8]) -> None:
        # Data in the first used_bytes (the working set lies inside it); the rest stays zero pages.
        rng = np.random.default_rng(self.spec.seed)
        used = self.spec.used_bytes - self.spec.used_bytes % 8
        memory[:used].view(np.uint64)[:] = rng.integers(0, 2**63, used // 8, dtype=np.uint64)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or, on a destination, resume) the workload."""
        if self.state is not VMState.CREATED:
            raise StateError(f"VM {self.name} is {self.state.value}, cannot start")
        self.state = VMState.RUNNING
        self._thread = threading.Thread(target=self._workload, name=f"vm-{self.name}", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop dirtying pages; returns once no write is in flight."""
        if self.state is not VMState.RUNNING:
            raise StateError(f"VM {self.name} is {self.state.value}, cannot pause")
        with self._lock:
            self._paused = True
        self.state = VMState.PAUSED

    def resume(self) -> None:
        """Dirty pages again after a pause (a migration that did not complete)."""
        if self.state is not VMState.PAUSED:
            raise StateError(f"VM {self.name} is {self.state.value}, cannot resume")
        with self._lock:
            self._paused = False
        self.state = VMState.RUNNING

    def stop(self) -> None:
        """End the workload thread; the memory stays (a stored image, or a VM about to be wiped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.state is not VMState.DESTROYED:
            self.state = VMState.STOPPED

    def destroy(self) -> None:
        """Stop and wipe the memory (self-destruction, or release after a completed migration)."""
        self.stop()
        self.memory[:] = 0
        self.dirty[:] = False
        self.state = VMState.DESTROYED

    @property
    def ram_bytes(self) -> int:
        return self.spec.ram_bytes

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    @property
    def running(self) -> bool:
        return self.state is VMState.RUNNING

    # -- the guest ------------------------------------------------------------------------------------

    def _workload(self) -> None:
        spec = self.spec
        ws_pages = max(spec.working_set_bytes // PAGE_SIZE, 1)
        words = self.memory.view(np.uint64)
        owed = 0.0
        last = time.monotonic()
        while not self._stop.wait(_TICK_S):
            now = time.monotonic()
            owed += spec.dirty_rate_pages_per_s * (now - last)
            last = now
            n = int(owed)
            if n <= 0:
                continue
            owed -= n
            with self._lock:
                if self._paused:
                    owed = 0.0
                    continue
                pages = self._rng.integers(0, ws_pages, n)
                offsets = self._rng.integers(0, _WORDS_PER_PAGE, n)
                words[pages * _WORDS_PER_PAGE + offsets] = self.writes + np.arange(1, n + 1, dtype=np.uint64)
                self.dirty[pages] = True  # after the data: see the module docstring
                self.writes += n

    # -- what a migration needs -----------------------------------------------------------------------

    def nonzero_pages(self) -> npt.NDArray[np.intp]:
        """Pages holding any non-zero byte (round 0 sends only these; the destination starts zeroed)."""
        return np.flatnonzero(self.memory.view(np.uint64).reshape(-1, _WORDS_PER_PAGE).any(axis=1))

    def sync_dirty(self) -> npt.NDArray[np.intp]:
        """The pages marked since the last sync, and clear their marks (QEMU's bitmap sync)."""
        pages = np.flatnonzero(self.dirty)
        self.dirty[pages] = False
        return pages

    def read_pages(self, pages: npt.NDArray[np.intp]) -> bytes:
        """The contents of ``pages``, concatenated in that order."""
        return self.memory.reshape(-1, PAGE_SIZE)[pages].tobytes()

    def device_state(self) -> bytes:
        """The "CPU and device state": the workload's spec and its write counter."""
        return device_state_of(self.spec, self.writes)

    def describe(self) -> dict[str, object]:
        """One row of ``secmig vm list``."""
        return {
            "name": self.name,
            "driver": "memory",
            "state": self.state.value,
            "ram_bytes": self.spec.ram_bytes,
            "writes": self.writes,
        }


def open_ram(path: Path, ram_bytes: int, *, create: bool) -> npt.NDArray[np.uint8]:
    """A VM's RAM as a shared mapping of ``path``: a new sparse zeroed file (``create``), or an existing
    one of exactly ``ram_bytes`` (ConfigError otherwise). Writes reach the page cache, which keeps them
    when the process dies."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, ram_bytes)
        finally:
            os.close(fd)
    elif not path.is_file() or path.stat().st_size != ram_bytes:
        raise ConfigError(f"{path}: not a RAM file of {ram_bytes} bytes")
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=(ram_bytes,))


def write_pages(memory: npt.NDArray[np.uint8], pages: tuple[int, ...], data: bytes | bytearray | memoryview) -> None:
    """Put received pages into a destination's buffer (one vectorised copy per batch)."""
    rows = memory.reshape(-1, PAGE_SIZE)
    rows[np.asarray(pages, dtype=np.intp)] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)


def device_state_of(spec: WorkloadSpec, writes: int) -> bytes:
    """The device state :meth:`MemoryVM.device_state` would give (for a VM re-adopted from its files)."""
    return json.dumps({"spec": spec.to_json(), "writes": writes}).encode()


def restore(name: str, memory: npt.NDArray[np.uint8], device_state: bytes) -> MemoryVM:
    """The destination's VM from received memory and device state (not started)."""
    try:
        doc = json.loads(device_state)
        spec = WorkloadSpec.from_json(doc["spec"])
        writes = int(doc["writes"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"VM {name}: device state does not parse: {err}") from err
    vm = MemoryVM(name, spec, memory)
    vm.writes = writes
    vm._rng = np.random.default_rng([spec.seed, writes])
    return vm
