"""What survives an agent's crash: one small state file per VM (in-memory or QEMU), beside its RAM file.

An in-memory VM lives inside its agent's process, so a crashed agent would take the VM with it, and a
crash in the middle of a commit could leave no copy anywhere. Its memory therefore lives in a file,
``STATE_DIR/vms/<vm>.ram`` (mapped by :mod:`.memvm`; the page cache keeps what the guest wrote when the
process dies), and ``STATE_DIR/vms/<vm>.json`` says what the copy is: name, workload, the binding it
runs under, and its :class:`VMPhase` — with the move when it is at a commit point. The file is written
atomically (temporary file, fsync, rename, fsync of the folder) *before* each step it describes: the
phase on disk is never behind what the peer may have seen.

A restarted agent reads every record and :func:`decide` says what to do, asking the location register
(:mod:`secmig.security.register`) wherever a move may have happened:

===========  ==============================================  ===============================
phase        where the copy is                               on restart
===========  ==============================================  ===============================
RUNNING      runs here                                       resume, unless the register
SENDING      source, before COMMIT went out                  places the VM elsewhere: wipe
STORED       a paused copy kept here (copy operation)        keep paused
COMMITTING   source, COMMIT sent: paused, the register        MOVED → wipe; STAYED → resume
             decides
RECEIVING    destination, before its vote                    wipe (the source cannot commit)
PREPARED     destination, voted: loaded, paused              MOVED → resume; STAYED → wipe
===========  ==============================================  ===============================

A **QEMU VM** (``driver: qemu``) has the same record and the same table; its ``spec`` says where the
copy is: QEMU's ``pid``, its work directory (the QMP socket ``<name>.qmp`` is in it), its RAM file
(``/dev/shm/secmig-<host>-<vm>.ram``), the definition, the accelerator and whether it is an incoming
QEMU. Owned QEMUs run detached from the agent (see :mod:`secmig.agent.qemu.machine`) and carry the
store's :meth:`VMStore.owner` token, so a restarted agent re-adopts a recorded one (the pid verified
against /proc), applies :func:`decide`, and kills and scrubs one no record names. A QEMU that died with
nothing to run it any more (a crash of QEMU itself) is not brought back: its record and RAM go.

What it does not cover: a crash of the host itself (power, kernel). The state file is fsynced, but the
RAM file's pages are not flushed to the disk on the switchover path (that would add the VM's whole
memory to its downtime); they survive the death of the agent's process, not of the machine. A destroyed
VM's RAM is zeroed through its mapping and its file unlinked; blocks the kernel had already written back
are freed, not overwritten (as for any deleted file): keep ``STATE_DIR`` on a tmpfs or an encrypted
volume when guest memory must not reach the disk at all.

:func:`crash_point` is a **test hook**: when the environment variable ``SECMIG_TEST_CRASH_AT`` names a
point, the agent kills itself there with SIGKILL, so tests can stop a real agent between any two steps
of a migration. It is read here and nowhere else; unset (always, in production) it does nothing.

Must not: decide anything the register decides, talk to peers, or know the daemon.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secmig.errors import DocumentFormatError
from secmig.security.credentials import LocationBinding
from secmig.security.register import LocationRegister, Move, MoveOutcome

CRASH_ENV = "SECMIG_TEST_CRASH_AT"
"""Test hook: the crash point (e.g. ``source.commit``) at which the agent SIGKILLs itself."""
_STATE_SUFFIX = ".json"
_RAM_SUFFIX = ".ram"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``SECMIG_TEST_CRASH_AT`` names ``name`` (else nothing)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class VMPhase(enum.StrEnum):
    """Where an in-memory VM's copy on this host is (see the module docstring's table)."""

    RUNNING = "running"
    STORED = "stored"
    SENDING = "sending"
    COMMITTING = "committing"
    RECEIVING = "receiving"
    PREPARED = "prepared"


IN_DOUBT_PHASES = frozenset({VMPhase.COMMITTING, VMPhase.PREPARED})
"""Phases whose copy only the register may release: a clean stop keeps them on disk too."""


class Recovery(enum.Enum):
    """What a restarted agent does with one recorded copy."""

    RESUME = "resume"
    KEEP_STORED = "keep-stored"
    WIPE = "wipe"


@dataclass(frozen=True, slots=True)
class VMRecord:
    """One VM's state file."""

    name: str
    phase: VMPhase
    spec: dict[str, Any]
    """The workload (:class:`~secmig.agent.memvm.WorkloadSpec` as JSON)."""
    writes: int = 0
    binding: LocationBinding | None = None
    """The binding this copy runs under (on a destination that voted: the move's new one)."""
    move: Move | None = None
    """The move whose outcome decides this copy (COMMITTING, PREPARED; also SENDING)."""
    driver: str = "memory"
    """The driver that owns the copy (``memory`` or ``qemu``: then ``spec`` locates the QEMU process)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "name": self.name,
            "phase": self.phase.value,
            "spec": self.spec,
            "writes": self.writes,
            "binding": None if self.binding is None else self.binding.to_json(),
            "move": None if self.move is None else self.move.to_json(),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VMRecord:
        try:
            binding, move = doc.get("binding"), doc.get("move")
            return cls(
                name=str(doc["name"]),
                phase=VMPhase(doc["phase"]),
                spec=dict(doc["spec"]),
                writes=int(doc.get("writes", 0)),
                binding=None if binding is None else LocationBinding.from_json(binding),
                move=None if move is None else Move.from_json(move),
                driver=str(doc.get("driver", "memory")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DocumentFormatError(f"VM state file: {err}") from err


class VMStore:
    """``STATE_DIR/vms``: the state and RAM files of this host's in-memory VMs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def owner(self) -> str:
        """This store's token (created once, kept): the agent's QEMUs carry it, so that a restarted agent
        knows its own QEMUs — and only them — even when no state file names one."""
        path = self.root / "owner"
        try:
            token = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            token = ""
        if len(token) != 32:
            token = os.urandom(16).hex()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, token.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return token

    def ram_path(self, name: str) -> Path:
        """Where ``name``'s memory lives."""
        return self.root / f"{name}{_RAM_SUFFIX}"

    def _state_path(self, name: str) -> Path:
        return self.root / f"{name}{_STATE_SUFFIX}"

    def save(self, record: VMRecord) -> None:
        """Write ``record`` atomically and durably (it must never be behind what it describes)."""
        path = self._state_path(record.name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record.to_json()).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get(self, name: str) -> VMRecord | None:
        """``name``'s record (None when there is none)."""
        path = self._state_path(name)
        try:
            return VMRecord.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except ValueError as err:
            raise DocumentFormatError(f"{path}: {err}") from err

    def update(self, name: str, **changes: Any) -> VMRecord | None:
        """Change fields of ``name``'s record; nothing when it has none (a VM this store does not keep)."""
        record = self.get(name)
        if record is None:
            return None
        record = replace(record, **changes)
        self.save(record)
        return record

    def records(self) -> list[VMRecord | str]:
        """Every record, by name; an unreadable one as its name alone. Leftover temporary files go."""
        out: list[VMRecord | str] = []
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in sorted(self.root.glob(f"*{_STATE_SUFFIX}")):
            name = path.name[: -len(_STATE_SUFFIX)]
            try:
                record = self.get(name)
            except DocumentFormatError:
                record = None
            out.append(name if record is None else record)
        return out

    def orphan_ram(self) -> list[str]:
        """Names of RAM files with no state file (a crash between creating one and recording it)."""
        return sorted(
            p.name[: -len(_RAM_SUFFIX)]
            for p in self.root.glob(f"*{_RAM_SUFFIX}")
            if not self._state_path(p.name[: -len(_RAM_SUFFIX)]).exists()
        )

    def remove(self, name: str, *, zero: bool = False) -> None:
        """Forget ``name``: both files are unlinked (the state file last). ``zero`` first overwrites the RAM
        file with zeros and syncs it (a copy nobody mapped); a mapped VM was zeroed through its mapping."""
        ram = self.ram_path(name)
        with contextlib.suppress(FileNotFoundError):
            if zero:
                zero_file(ram)
            ram.unlink()
        self._state_path(name).unlink(missing_ok=True)


def zero_file(path: Path) -> None:
    """Overwrite a file with zeros in place (its blocks hold no guest data afterwards), then fsync it."""
    chunk = bytes(1 << 20)
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            off += os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def decide(record: VMRecord, register: LocationRegister, host_id: str) -> Recovery:
    """What a restarted agent does with ``record`` (blocking: it may ask the register; raises
    RegisterUnavailable when the register does not answer — the copy then stays paused)."""
    phase = record.phase
    if phase is VMPhase.RECEIVING:
        return Recovery.WIPE  # no vote was sent: the source cannot have committed
    if phase in IN_DOUBT_PHASES:
        if record.move is None:  # a copy, clone or template: only a confirmed one is kept (and it was not)
            return Recovery.WIPE if phase is VMPhase.PREPARED else Recovery.RESUME
        moved = register.resolve(record.move, host_id) is MoveOutcome.MOVED
        if phase is VMPhase.COMMITTING:
            return Recovery.WIPE if moved else Recovery.RESUME
        return Recovery.RESUME if moved else Recovery.WIPE
    if phase is VMPhase.STORED:
        return Recovery.KEEP_STORED
    # RUNNING, SENDING: ours unless the register has placed the VM anywhere else since.
    binding = record.binding
    if binding is not None:
        now = register.current(binding.vm_id)
        if now is not None and now != binding:
            return Recovery.WIPE
    return Recovery.RESUME
