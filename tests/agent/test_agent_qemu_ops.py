"""All five operations of Table 4.1 on QEMU VMs (the reference guest, TCG, a NIC on a host bridge when one
can be made): each works with its grant and has its own effect, each is refused without one (0 page
bytes, audited), and a manifest swapped by the source is refused. Three agents share one module."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from agent_helpers import MIB, audit_events, host_config, short_dir

from secmig.agent.daemon import Agent
from secmig.agent.drivers.qemu import QemuTemplate, QemuVM
from secmig.agent.manifest import Manifest, send_manifest
from secmig.agent.report import MigrationHandle
from secmig.agent.vmdef import definition_from_json
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import AuthorizationError, MigrationAborted, MigrationError, StateError
from secmig.security import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.events import MigrationRequest, Role
from secmig.security.grants import bind_manifest
from secmig.security.location import verify_location
from secmig.security.policy import AUTHORITY, Operation

pytestmark = pytest.mark.qemu
T = TypeVar("T")
BRIDGE = "smopsbr0"
MAC = "52:54:00:0a:00:01"


class Loop:
    """One event loop in a thread for the whole module: the agents and their QEMUs live across tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, coro: Coroutine[Any, Any, T], timeout_s: float = 180.0) -> T:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout_s), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _bridge() -> bool:
    if shutil.which("ip") is None:
        return False
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    ok = subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], capture_output=True).returncode == 0
    return ok and subprocess.run(["ip", "link", "set", BRIDGE, "up"], capture_output=True).returncode == 0


class Hosts:
    def __init__(self, loop: Loop, cluster: Cluster, agents: dict[str, Agent], nic: bool) -> None:
        self.run, self.cluster, self.agents, self.nic = loop, cluster, agents, nic

    def addr(self, host: str) -> tuple[str, int]:
        return self.agents[host].address

    def definition(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": name,
            "memory": "96MiB",
            "accel": "tcg",
            "boot": {"reference_guest": {"working_set": "8MiB", "rate": "2000pages/s", "pattern": "rand"}},
        }
        if self.nic:
            doc["nics"] = [{"mac": MAC, "bridge": BRIDGE, "rate": "1MB/s"}]
        return definition_from_json(doc).to_json()

    def start(self, host: str, name: str) -> QemuVM:
        a = self.agents[host]
        binding = self.cluster.issue_binding(name, MAC, host).to_json()
        self.run(a.start_vm(name, "qemu", {"definition": self.definition(name)}, binding))
        vm: QemuVM = a.vms[name].vm
        return vm

    def new_binding(self, name: str, to: str, mac: str) -> dict[str, Any]:
        return self.cluster.issue_binding(name, mac, to).to_json()

    def grant(self, src: str, name: str, to: str, op: str, **kw: Any) -> dict[str, Any]:
        """A grant for ``op`` that binds the manifest the source agent will send."""
        a = self.agents[src]
        manifest = a.manifest_for(name, to, op, address=self.addr(to), **kw)
        doc = a.binding_of(name)
        current = None if doc is None else LocationBinding.from_json(doc)
        g = self.cluster.issue_grant(Operation(op), name, src, to, current_binding=current)
        return bind_manifest(g, manifest.digest(), self.cluster.issuer_key(AUTHORITY)).to_json()

    def op(self, src: str, name: str, to: str, op: str, grant: Any = "bound", **kw: Any) -> Any:
        if grant == "bound":
            grant = self.grant(src, name, to, op, **kw)
        a = self.agents[src]
        report = self.run(a.migrate(name, to, op, grant, address=self.addr(to), data_plane="relay", **kw))
        print(
            f"\n{op}: total {report.total_time_s:.2f} s, downtime {report.downtime_s:.3f} s, "
            f"{report.payload_bytes / MIB:.1f} MiB stream"
        )
        return report


async def _writes(vm: QemuVM) -> int:
    return (await vm.machine.read_status()).writes


async def _advances(vm: QemuVM) -> bool:
    before = await _writes(vm)
    await asyncio.sleep(0.4)
    return await _writes(vm) > before


async def _nic_mac(vm: QemuVM) -> str:
    return str(await vm.machine.execute("qom-get", {"path": "/machine/peripheral/nic0", "property": "mac"}))


@pytest.fixture(scope="module")
def hosts(cluster_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """hv-a, hv-b, hv-c running in one loop for the module; a bridge for the NICs when one can be made."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("gcc") is None:
        pytest.skip("needs qemu-system-x86_64 and gcc (apt-get install qemu-system-x86 gcc)")
    nic = _bridge()
    cache = tmp_path_factory.mktemp("guest")
    base = short_dir("sqo-")
    loop = Loop()
    agents: dict[str, Agent] = {}
    try:
        for h in ("hv-a", "hv-b", "hv-c"):
            # The monitor has its own tests; here it would judge three agents on one loopback as one host.
            cfg = host_config(
                cluster_dir, h, base, qemu={"guest_cache": str(cache), "accel": "tcg"}, monitor={"enabled": False}
            )
            agents[h] = Agent(cfg)
            loop(agents[h].start())
        yield Hosts(loop, Cluster(cluster_dir), agents, nic)
    finally:
        for a in agents.values():
            loop(a.stop())
        loop.close()
        shutil.rmtree(base, ignore_errors=True)
        if nic:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def test_migrate_live_with_auto_converge(hosts: Hosts) -> None:
    """migrate: live pre-copy (auto-converge on); the VM runs at the destination with epoch + 1, gone here."""
    hosts.start("hv-a", "m1")
    r = hosts.op("hv-a", "m1", "hv-b", "migrate", auto_converge=True)
    a, b = hosts.agents["hv-a"], hosts.agents["hv-b"]
    assert r.result.strategy == "qemu pre-copy" and "m1" not in a.vms
    vm: QemuVM = b.vms["m1"].vm
    assert hosts.run(_advances(vm)) and b.vms["m1"].binding is not None and b.vms["m1"].binding.epoch == 1
    caps = hosts.run(b.vms["m1"].vm.machine.execute("query-migrate-capabilities"))
    assert isinstance(caps, list)
    hosts.run(b.stop_vm("m1"))


def test_move_pauses_first_and_destroys_the_source(hosts: Hosts) -> None:
    """move: non-live (paused for the whole transfer: downtime ≈ total), runs at the destination, source gone."""
    hosts.start("hv-a", "v1")
    r = hosts.op("hv-a", "v1", "hv-b", "move")
    a, b = hosts.agents["hv-a"], hosts.agents["hv-b"]
    assert r.result.strategy == "qemu stop-and-copy" and r.downtime_s is not None
    assert r.downtime_s > 0.5 * (r.total_time_s - r.extra["handshake_and_setup_s"])
    assert "v1" not in a.vms and "vm.released:info" in audit_events(a)
    assert not b.vms["v1"].stored and hosts.run(_advances(b.vms["v1"].vm))
    hosts.run(b.stop_vm("v1"))


def test_copy_leaves_a_paused_copy_and_the_source_running(hosts: Hosts) -> None:
    """copy: the destination holds a paused copy (stored), the source keeps running with its binding."""
    vm = hosts.start("hv-a", "c1")
    hosts.op("hv-a", "c1", "hv-b", "copy")
    a, b = hosts.agents["hv-a"], hosts.agents["hv-b"]
    assert hosts.run(_advances(vm)) and a.vms["c1"].binding is not None and a.vms["c1"].binding.epoch == 0
    copy: QemuVM = b.vms["c1"].vm
    assert b.vms["c1"].stored and b.list_vms()[0]["state"] == "stored"
    status = hosts.run(copy.machine.execute("query-status"))
    assert status["running"] is False and not hosts.run(_advances(copy))
    hosts.run(b.stop_vm("c1"))


def test_clone_runs_with_a_new_id_mac_and_binding(hosts: Hosts) -> None:
    """clone: both run; the clone has a new VM id, a new MAC and a new binding that verifies on its host."""
    vm = hosts.start("hv-a", "k1")
    new_mac = "52:54:00:0b:00:02"
    nb = hosts.new_binding("k1-clone", "hv-c", new_mac)
    hosts.op("hv-a", "k1", "hv-c", "clone", clone_binding=nb)
    a, c = hosts.agents["hv-a"], hosts.agents["hv-c"]
    clone: QemuVM = c.vms["k1-clone"].vm
    assert "k1" not in c.vms and hosts.run(_advances(vm)) and hosts.run(_advances(clone))
    binding = c.vms["k1-clone"].binding
    assert binding is not None and binding.vm_mac == new_mac and binding.vm_id == "k1-clone"
    verdict = verify_location(binding, hosts.cluster.trust().roots(), vm_id="k1-clone", vm_mac=new_mac, host_id="hv-c")
    assert verdict.ok
    if hosts.nic:
        assert hosts.run(_nic_mac(clone)) == new_mac and hosts.run(_nic_mac(vm)) == MAC
    assert a.vms["k1"].binding is not None and a.vms["k1"].binding.vm_mac == MAC
    hosts.run(c.stop_vm("k1-clone"))
    hosts.run(a.stop_vm("k1"))


def test_template_cannot_start_and_is_cloned_from(hosts: Hosts) -> None:
    """template: a stored stream (no QEMU) that cannot be started; clone --from-template runs a new VM."""
    vm = hosts.start("hv-a", "t1")
    nb = hosts.new_binding("t1-tmpl", "hv-b", MAC)
    hosts.op("hv-a", "t1", "hv-b", "template", clone_binding=nb)
    a, b, c = (hosts.agents[h] for h in ("hv-a", "hv-b", "hv-c"))
    assert hosts.run(_advances(vm))
    tmpl = b.vms["t1-tmpl"].vm
    assert isinstance(tmpl, QemuTemplate) and tmpl.stream_path.is_file() and b.list_vms()[0]["state"] == "template"
    with pytest.raises(StateError, match="template"):
        hosts.run(b.start_vm("t1-tmpl", "qemu", {}, None))
    with pytest.raises(StateError, match="template"):
        hosts.run(b.migrate("t1-tmpl", "hv-c", "migrate", None, address=hosts.addr("hv-c")))
    new_mac = "52:54:00:0c:00:03"
    nb2 = hosts.new_binding("t1-from", "hv-c", new_mac)
    hosts.op("hv-b", "t1-tmpl", "hv-c", "clone", clone_binding=nb2, from_template=True)
    assert "t1-tmpl" in b.vms and tmpl.stream_path.is_file()
    clone: QemuVM = c.vms["t1-from"].vm
    assert hosts.run(_advances(clone)) and c.vms["t1-from"].binding is not None
    if hosts.nic:
        assert hosts.run(_nic_mac(clone)) == new_mac
    hosts.run(c.stop_vm("t1-from"))
    hosts.run(b.stop_vm("t1-tmpl"))
    assert not tmpl.stream_path.exists()
    hosts.run(a.stop_vm("t1"))


@pytest.mark.parametrize("op", ["migrate", "move", "copy", "clone", "template"])
def test_each_operation_is_refused_without_a_grant(hosts: Hosts, op: str) -> None:
    """No grant: refused in the handshake, not one stream byte received, audited on both ends; VM runs on."""
    name = f"r-{op}"
    vm = hosts.start("hv-a", name)
    a, b = hosts.agents["hv-a"], hosts.agents["hv-b"]
    before = b.stats["payload_bytes_received"]
    kw: dict[str, Any] = {}
    if op in ("clone", "template"):
        kw["clone_binding"] = hosts.new_binding(f"{name}-new", "hv-b", "52:54:00:0d:00:04")
    with pytest.raises(AuthorizationError):
        hosts.run(a.migrate(name, "hv-b", op, None, address=hosts.addr("hv-b"), **kw))
    assert b.stats["payload_bytes_received"] == before and not any(n.startswith(name) for n in b.vms)
    assert "migration.failed:refuse" in audit_events(a) and "grant.refused:refuse" in audit_events(b)
    info = hosts.run(vm.machine.execute("query-migrate"))
    assert not info and hosts.run(_advances(vm))
    hosts.run(a.stop_vm(name))


def test_a_manifest_swapped_by_the_source_is_refused(hosts: Hosts) -> None:
    """The grant binds one definition: a source announcing another is refused in the handshake, and one
    announcing the bound digest but sending another manifest in round 0 is refused before any page."""
    vm = hosts.start("hv-a", "s1")
    a, b = hosts.agents["hv-a"], hosts.agents["hv-b"]
    honest = a.manifest_for("s1", "hv-b", "migrate", address=hosts.addr("hv-b"))
    evil_def = {**honest.vm["definition"], "extra_args": ["-device", "pci-testdev"]}
    evil = Manifest(DriverKind.QEMU, DataPlane.RELAY, {**honest.vm, "definition": evil_def})
    before = b.stats["payload_bytes_received"]

    def grant() -> Any:
        g = hosts.cluster.issue_grant(Operation.MIGRATE, "s1", "hv-a", "hv-b", current_binding=a.vms["s1"].binding)
        return bind_manifest(g, honest.digest(), hosts.cluster.issuer_key(AUTHORITY))

    async def swap(announced: Manifest) -> None:
        entry = a.vms["s1"]
        page_size, page_count = entry.driver.geometry(entry.vm)
        req = MigrationRequest(
            Operation.MIGRATE, "s1", page_size, page_count, grant(), entry.binding, announced.digest()
        )
        handle = MigrationHandle("s1", Role.SOURCE, "hv-b")
        channel, _auth = await a.open_channel(req, "hv-b", hosts.addr("hv-b"), handle)
        try:
            await send_manifest(channel, evil, page_size)
            event = await channel.next_event(10.0)
            raise getattr(event, "as_error", lambda: MigrationError(f"not refused: {event}"))()
        finally:
            await channel.close()

    with pytest.raises(AuthorizationError, match="not the one the grant binds"):
        hosts.run(swap(evil))  # announces the evil digest: the grant refuses it in the handshake
    with pytest.raises((AuthorizationError, MigrationAborted), match="not the one the grant binds"):
        hosts.run(swap(honest))  # announces the bound digest, sends the evil manifest
    assert b.stats["payload_bytes_received"] == before and "s1" not in b.vms
    assert "migration.discarded:refuse" in audit_events(b)
    assert hosts.run(_advances(vm))
    hosts.run(a.stop_vm("s1"))
