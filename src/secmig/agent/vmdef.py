"""VM definitions a user writes: one YAML file per QEMU VM, validated with pydantic like scenarios.

A definition says what to run — memory, vCPUs, accelerator, how it boots (a kernel with its initrd and
command line, a disk image, or secmig's reference guest), its disks, its NICs (MAC, the host bridge that
is the vSwitch, the preset rate the traffic monitor judges the NIC by) and extra QEMU arguments::

    name: web1
    memory: 256MiB
    vcpus: 1
    accel: auto                   # auto, kvm or tcg
    boot:
      kernel: /srv/images/vmlinuz
      initrd: /srv/images/initrd.img
      append: console=ttyS0 quiet
    disks:
      - path: /srv/shared/web1.qcow2   # storage both hosts see
        format: qcow2                  # qcow2 or raw, on virtio-blk
    nics:
      - mac: "52:54:00:12:34:56"     # quoted: YAML reads bare colon pairs as a number
        bridge: br0                    # the vSwitch
        rate: 1MB/s                    # the monitor's preset for this NIC
        ip: 10.0.0.10                  # the guest's IPv4 address here: the monitor's RTT probes go to it
    extra_args: [-rtc, base=utc]

Any mistake is one :class:`~secmig.errors.ConfigError` naming the file, the field and the value, e.g.
``web1.yaml: memory: '12 parsecs': ...``. The same definition travels to the destination of a migration
inside its manifest (:mod:`.manifest`), whose digest the grant binds.

Parsing and validation only: it starts nothing. Paths are checked to exist by :meth:`VMDefinition.check_files`
on the host that is about to use them.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from secmig.errors import ConfigError
from secmig.model.units import PAGE_SIZE, parse_rate, parse_size
from secmig.security.credentials import check_id, normalize_mac
from secmig.yamlfile import parse_yaml, read_yaml, unit_validator, validation_error

_MIB = 1 << 20
RESERVED_ARGS = frozenset(
    {
        "-name", "-m", "-smp", "-accel", "-machine", "-M", "-kernel", "-initrd", "-append", "-incoming",
        "-qmp", "-mon", "-monitor", "-serial", "-daemonize", "-S", "-pidfile", "-runas", "-chroot",
        "-nodefaults", "-no-user-config", "-enable-kvm",
    }
)  # fmt: skip
"""Arguments the agent sets itself (or that would take QEMU out of its control): refused in extra_args."""
TAP_PREFIX = "smt"


def _mac(value: Any) -> Any:
    if isinstance(value, int):  # YAML 1.1 reads 52:54:00:12:34:56 as a base-60 number
        raise ValueError("YAML read this MAC as a number: quote it, e.g. '52:54:00:12:34:56'")
    if not isinstance(value, str):
        raise ValueError("expected a MAC address such as 52:54:00:12:34:56")
    try:
        return normalize_mac(value)
    except ConfigError as err:
        raise ValueError(str(err)) from None


Size = Annotated[int, unit_validator(parse_size)]
ByteRate = Annotated[float, unit_validator(lambda v: parse_rate(v).in_bytes_per_s())]
PageRate = Annotated[
    float, unit_validator(lambda v: float(v) if isinstance(v, int | float) else parse_rate(v).in_pages_per_s())
]
"""Page writes per second; a plain number is pages/s (so the JSON form reads back as itself)."""
Mac = Annotated[str, BeforeValidator(_mac)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReferenceGuest(_Model):
    """secmig's reference guest (a multiboot kernel built from ``guest/``) and its workload."""

    working_set: Size = 16 * _MIB
    rate: PageRate = 5000.0
    pattern: Literal["seq", "rand", "hot"] = "rand"
    seed: int = 1


class BootModel(_Model):
    """How the VM boots: a kernel (+ initrd, command line), or — with no kernel — its first disk."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    reference_guest: ReferenceGuest | None = None

    @model_validator(mode="after")
    def _one_way(self) -> BootModel:
        if self.reference_guest is not None and (self.kernel or self.initrd or self.append):
            raise ValueError("give either reference_guest or kernel/initrd/append, not both")
        if self.kernel is None and (self.initrd is not None or self.append):
            raise ValueError("initrd and append need a kernel")
        return self


class DiskModel(_Model):
    """A disk image on virtio-blk, on storage both hosts see."""

    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"


class NicModel(_Model):
    """A virtio-net NIC: a tap on the host bridge that is this VM's vSwitch."""

    mac: Mac
    bridge: str = Field(min_length=1, max_length=15)
    rate: ByteRate | None = None
    """The monitor's preset rate for this NIC (bytes/s); none: the host's preset."""
    model: Literal["virtio-net-pci", "e1000"] = "virtio-net-pci"
    ip: str | None = None
    """The guest's IPv4 address on this NIC (the guest sets it itself): the monitor probes its RTT there."""

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError("expected an IPv4 address such as 10.0.0.10 (no prefix length)") from None


class VMDefinition(_Model):
    """One QEMU VM as its owner wrote it."""

    name: str
    memory: Size
    vcpus: int = Field(default=1, ge=1, le=64)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    boot: BootModel = BootModel()
    disks: tuple[DiskModel, ...] = ()
    nics: tuple[NicModel, ...] = ()
    extra_args: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_id(value, "VM id")
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int) -> int:
        if value < 16 * _MIB or value % _MIB:
            raise ValueError(f"{value} bytes: give a whole number of MiB, at least 16MiB")
        return value

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            if arg in RESERVED_ARGS:
                raise ValueError(f"{arg!r} is set by the agent; it may not be given here")
        return value

    @model_validator(mode="after")
    def _bootable(self) -> VMDefinition:
        if self.boot.kernel is None and self.boot.reference_guest is None and not self.disks:
            raise ValueError("boot: give a kernel, a reference_guest or at least one disk to boot from")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("nics: two NICs have the same MAC")
        rg = self.boot.reference_guest
        if rg is not None:
            if rg.working_set < PAGE_SIZE or rg.working_set % PAGE_SIZE:
                raise ValueError("boot.reference_guest.working_set: not a whole number of pages")
            if self.memory < (4 << 20) + rg.working_set + (2 << 20):
                raise ValueError("memory: too small for the reference guest's working set (it starts at 4 MiB)")
        return self

    # -- what the agents use ----------------------------------------------------------------------------

    @property
    def mac(self) -> str | None:
        """The first NIC's MAC: the one the VM's location binding names."""
        return self.nics[0].mac if self.nics else None

    @property
    def builtin(self) -> bool:
        """The reference guest and nothing of the user's own (no NIC, disk or extra argument).

        Only such a definition may travel under a grant that does not bind the manifest: it runs no
        file and no argument a source could choose.
        """
        return self.boot.reference_guest is not None and not (self.disks or self.nics or self.extra_args)

    def to_json(self) -> dict[str, Any]:
        """The definition as JSON (sizes in bytes, rates per second); :func:`definition_from_json` reads it."""
        return self.model_dump(mode="json")

    def with_identity(self, name: str, mac: str | None) -> VMDefinition:
        """This definition for a clone: another name, and the first NIC's MAC replaced."""
        nics = self.nics
        if mac is not None and nics:
            nics = (nics[0].model_copy(update={"mac": normalize_mac(mac)}), *nics[1:])
        return self.model_copy(update={"name": check_id(name, "VM id"), "nics": nics})

    def with_disks(self, disks: tuple[DiskModel, ...]) -> VMDefinition:
        """This definition with other disk images (a copy's or clone's own)."""
        return self.model_copy(update={"disks": disks})

    def check_files(self, source: str) -> None:
        """ConfigError naming the field when a kernel, initrd or disk image is missing on this host."""
        fields: list[tuple[str, Path | None]] = [("boot.kernel", self.boot.kernel), ("boot.initrd", self.boot.initrd)]
        fields += [(f"disks[{i}].path", d.path) for i, d in enumerate(self.disks)]
        for name, path in fields:
            if path is not None and not path.is_file():
                raise ConfigError(f"{source}: {name}: {str(path)!r} is not a file on this host")

    def tap_name(self, host_id: str, index: int) -> str:
        """The tap of NIC ``index`` on ``host_id`` (15 bytes at most, unique per host, VM and NIC)."""
        h = hashlib.sha256(f"{host_id}\0{self.name}\0{index}".encode()).hexdigest()
        return f"{TAP_PREFIX}{h[:10]}{index}"[:15]






def parse_definition(data: Any, source: str) -> VMDefinition:
    """Validate already-loaded YAML (or JSON) data; ``source`` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return VMDefinition.model_validate(data)
    except ValidationError as exc:
        raise validation_error(source, exc) from None


def load_definition(path: str | Path) -> VMDefinition:
    """Read and validate a VM definition file."""
    p = Path(path)
    return parse_definition(read_yaml(p), p.name)


def definition_from_text(text: str, source: str) -> VMDefinition:
    """A definition from YAML text (tests, the control API)."""
    return parse_definition(parse_yaml(text, source), source)


def definition_from_json(doc: Any, source: str = "definition") -> VMDefinition:
    """Inverse of :meth:`VMDefinition.to_json` (a manifest's or the control API's copy)."""
    return parse_definition(doc, source)


def reference_definition(name: str, spec: dict[str, Any]) -> VMDefinition:
    """The definition of ``secmig vm start --driver qemu``'s reference guest spec (``ram_bytes``, …)."""
    try:
        guest = {
            "working_set": int(spec.get("working_set_bytes", 16 * _MIB)),
            "rate": float(spec.get("rate_pages_per_s", 5000)),
            "pattern": spec.get("pattern", "rand"),
            "seed": int(spec.get("seed", 1)),
        }
        doc = {"name": name, "memory": int(spec.get("ram_bytes", 128 * _MIB)), "boot": {"reference_guest": guest}}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"qemu VM spec: {err}") from err
    if spec.get("accel") is not None:
        doc["accel"] = spec["accel"]
    return parse_definition(doc, f"qemu VM {name}")
