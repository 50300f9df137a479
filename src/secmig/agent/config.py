"""``host.yaml``: one hypervisor host's agent configuration, validated with pydantic.

::

    host_id: hv-a                      # this host's id in the cluster (its folder in DIR/hosts/)
    cluster: /etc/secmig/cluster       # the cluster directory (trust material and hosts/hv-a/)
    listen: 127.0.0.1:7300             # TCP address for incoming migrations
    control_socket: /run/secmig/hv-a.sock
    state_dir: /var/lib/secmig/hv-a    # audit.db (hash-chained), state.db (grant nonces, binding epochs)
    peers:                             # other hosts: "address:port" of their agents
      hv-b: 10.0.0.2:7300
    migration: {policy: qemu, downtime_limit: 300ms, max_time: 60s, max_bandwidth: null, batch_pages: 512}
    monitor: {enabled: true, rules: null, preset_rate: 2GB/s, vswitch: vs0, interval: 100ms,
              nic_monitor: false, vswitch_capacity: {br0: 1Gbit/s}}
    qemu: {binary: qemu-system-x86_64, accel: tcg, tls_port: null}

A mistake is one line naming the file, the field and the value (a :class:`~secmig.errors.ConfigError`).
Sizes, rates and durations take units as everywhere in secmig. This module reads files, nothing else.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from secmig.errors import ConfigError
from secmig.model.units import parse_bandwidth, parse_duration
from secmig.yamlfile import read_yaml, unit_validator, validation_error

DEFAULT_PORT = 7300


Duration = Annotated[float, unit_validator(parse_duration)]
Bandwidth = Annotated[float, unit_validator(parse_bandwidth)]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port`` (or ``host``, or ``[v6]:port``) → (host, port); ValueError when malformed."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") or str(default_port)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        try:
            host, port_text = str(ipaddress.IPv6Address(text)), str(default_port)
        except ValueError:
            raise ValueError(f"{text!r} is not host:port (write IPv6 as [addr]:port)") from None
    else:
        host, port_text = text, str(default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port_text)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MigrationSection(_Section):
    """How this host migrates in-memory VMs (QEMU migrates with its own pre-copy)."""

    policy: Literal["qemu", "xen", "paper"] = "qemu"
    downtime_limit: Duration = Field(default=0.3, gt=0)
    max_time: Duration = Field(default=120.0, gt=0)
    max_bandwidth: Bandwidth | None = None
    """Cap on the page rate of outgoing migrations (None: as fast as the channel goes)."""
    batch_pages: int = Field(default=512, ge=1, le=2000)
    handshake_timeout: Duration = Field(default=10.0, gt=0)
    idle_timeout: Duration = Field(default=30.0, gt=0)
    """A peer that sends nothing for this long mid-migration is dropped."""
    verify_memory: bool = False
    """Also hash the real memory at the switchover on both ends (costs downtime; for tests and audits)."""


class MonitorSection(_Section):
    """The traffic monitor fed from this agent's byte counters."""

    enabled: bool = True
    rules: Path | None = None
    """A rule file (see secmig/data/rules.yaml); None for the paper's defaults."""
    preset_rate: Bandwidth = 2e9
    """A VM's preset transfer rate, the monitor's reference for LOW/MEDIUM/HIGH."""
    vswitch: str = "vs0"
    interval: Duration = Field(default=0.1, gt=0)
    nic_monitor: bool = False
    """Also judge every QEMU VM's NICs (taps on their bridges): counters, ICMP RTT, each NIC's preset."""
    vswitch_capacity: dict[str, Bandwidth] = Field(default_factory=dict)
    """Each bridge's (vSwitch's) capacity, for the NIC monitor's vSwitch rule; a bridge not listed has none."""


class QemuSection(_Section):
    """QEMU VMs on this host."""

    binary: str = "qemu-system-x86_64"
    accel: Literal["auto", "kvm", "tcg"] = "tcg"
    tls_port: int | None = Field(default=None, ge=1, le=65535)
    """Port the destination QEMU listens on for ``qemu-tls`` migrations (default: the agent's port + 1)."""
    guest_cache: Path | None = None
    """Where the reference guest is built (default ~/.cache/secmig)."""


class HostConfig(_Section):
    """One host's agent."""

    host_id: str
    cluster: Path
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    control_socket: Path
    state_dir: Path
    peers: dict[str, str] = Field(default_factory=dict)
    migration: MigrationSection = MigrationSection()
    monitor: MonitorSection = MonitorSection()
    qemu: QemuSection = QemuSection()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: dict[str, str]) -> dict[str, str]:
        for host, addr in v.items():
            try:
                parse_address(addr)
            except ValueError as err:
                raise ValueError(f"{host}: {err}") from None
        return v

    @field_validator("control_socket")
    @classmethod
    def _socket(cls, v: Path) -> Path:
        if len(str(v).encode()) > 100:
            raise ValueError(f"{v}: a UNIX socket path must be under 100 bytes")
        return v

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen)

    def peer_address(self, host_id: str) -> tuple[str, int]:
        """Where ``host_id``'s agent listens; ConfigError when it is not in ``peers``."""
        try:
            return parse_address(self.peers[host_id])
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none"
            raise ConfigError(f"host {host_id!r} is not in peers of {self.host_id} (known: {known})") from None

    def qemu_tls_port(self, listen_port: int | None = None) -> int:
        """Where this host's QEMU listens for ``qemu-tls`` migrations: ``qemu.tls_port``, else the agent's
        migration port + 1 (``listen_port``: the port actually bound, when ``listen`` says 0)."""
        return self.qemu.tls_port or (listen_port or self.listen_address[1]) + 1




def parse_config(data: Any, source: str, base: Path | None = None) -> HostConfig:
    """Validate a parsed YAML document; relative paths are taken from ``base`` (the file's folder)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping (host_id, cluster, …)")
    try:
        cfg = HostConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(source, exc) from None
    if base is not None:
        cfg = cfg.model_copy(
            update={
                "cluster": base / cfg.cluster,
                "control_socket": base / cfg.control_socket,
                "state_dir": base / cfg.state_dir,
            }
        )
    return cfg


def load_config(path: str | Path) -> HostConfig:
    """Read and validate ``host.yaml``."""
    p = Path(path)
    return parse_config(read_yaml(p), p.name, p.parent)
