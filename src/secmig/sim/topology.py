"""Turns an :class:`~secmig.model.infra.Infrastructure` into links of a :class:`FluidNetwork` and paths.

Per host: ``HOST/nic-tx`` and ``HOST/nic-rx`` (a full-duplex NIC) and ``HOST/vswitch`` (the software
switch every VM's traffic crosses, where the monitor reads rates). Per datacenter: ``DC/core``. Per pair
of datacenters: ``wan/A->B`` and ``wan/B->A``. A flow between two hosts crosses source vSwitch, source NIC,
source core, the WAN if the datacenters differ, destination core, destination NIC, destination vSwitch.

Naming and routing only: no flows, no rates.
"""

from __future__ import annotations

from secmig.errors import ConfigError
from secmig.model.infra import Infrastructure
from secmig.sim.network import FluidNetwork, Link


class Topology:
    """Link indices and cached paths for one infrastructure on one network."""

    def __init__(self, infra: Infrastructure, net: FluidNetwork) -> None:
        self.infra = infra
        self.net = net
        self._host_dc: dict[str, str] = {}
        self._paths: dict[tuple[str, str], tuple[list[int], float]] = {}
        dcs = {dc.name: dc for dc in infra.datacenters}
        self.core: dict[str, int] = {}
        for dc in infra.datacenters:
            self.core[dc.name] = net.add_link(Link(f"{dc.name}/core", dc.core_bytes_per_s, dc.core_latency_s, "core"))
        self.nic_tx: dict[str, int] = {}
        self.nic_rx: dict[str, int] = {}
        self.vswitch: dict[str, int] = {}
        for h in infra.hosts:
            if h.datacenter not in dcs:
                raise ConfigError(f"host {h.name}: unknown datacenter {h.datacenter!r}")
            self._host_dc[h.name] = h.datacenter
            # Half a NIC's latency on the way out, half on the way in: two hosts of latency L are L apart.
            half = h.nic_latency_s / 2
            self.nic_tx[h.name] = net.add_link(Link(f"{h.name}/nic-tx", h.nic_bytes_per_s, half, "nic"))
            self.nic_rx[h.name] = net.add_link(Link(f"{h.name}/nic-rx", h.nic_bytes_per_s, half, "nic"))
            self.vswitch[h.name] = net.add_link(Link(f"{h.name}/vswitch", h.vswitch_bytes_per_s, 0.0, "vswitch"))
        self.wan: dict[tuple[str, str], int] = {}
        for w in infra.wan:
            for a, b in ((w.a, w.b), (w.b, w.a)):
                if a not in dcs:
                    raise ConfigError(f"wan link {w.a}-{w.b}: unknown datacenter {a!r}")
                self.wan[(a, b)] = net.add_link(Link(f"wan/{a}->{b}", w.bandwidth_bytes_per_s, w.latency_s, "wan"))

    def datacenter_of(self, host: str) -> str:
        try:
            return self._host_dc[host]
        except KeyError:
            raise ConfigError(f"unknown host {host!r}") from None

    def path(self, src: str, dst: str) -> tuple[list[int], float]:
        """The links from host ``src`` to host ``dst`` and the one-way latency along them."""
        key = (src, dst)
        cached = self._paths.get(key)
        if cached is not None:
            return cached
        if src == dst:
            links = [self.vswitch[src]]
        else:
            a, b = self.datacenter_of(src), self.datacenter_of(dst)
            links = [self.vswitch[src], self.nic_tx[src], self.core[a]]
            if a != b:
                if (a, b) not in self.wan:
                    raise ConfigError(f"no WAN link between datacenters {a} and {b} (hosts {src} → {dst})")
                links += [self.wan[(a, b)], self.core[b]]
            links += [self.nic_rx[dst], self.vswitch[dst]]
        out = (links, self.net.path_latency(links))
        self._paths[key] = out
        return out
