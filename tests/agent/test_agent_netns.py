"""Three hosts in their own network namespaces, joined by veth pairs to a bridge: a VM hops a → b → c."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from agent_helpers import MIB, VM_MAC, run, spec

from secmig.agent.control import ControlClient
from secmig.errors import AgentUnavailable
from secmig.security import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.policy import Operation

HOSTS = {"hv-a": "10.77.0.1", "hv-b": "10.77.0.2", "hv-c": "10.77.0.3"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """One namespace per host plus a switch namespace with a bridge; skipped where they cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:4]
    sw = f"smsw{tag}"
    names = {h: f"sm{h[-1]}{tag}" for h in HOSTS}
    made: list[str] = []
    try:
        _ip("netns", "add", sw)
        made.append(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for host, ns in names.items():
            _ip("netns", "add", ns)
            made.append(ns)
            port = f"p{host[-1]}{tag}"
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", sw)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{HOSTS[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as err:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        detail = err.stderr.decode().strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        pytest.skip(f"cannot create network namespaces here: {detail}")
    yield names
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_vm_hops_across_three_namespaced_hosts(
    cluster_dir: Path, cluster: Cluster, base: Path, namespaces: dict[str, str]
) -> None:
    """Agents in three namespaces: the VM migrates a → b → c over veth; its binding reaches epoch 2 on c."""

    async def body() -> None:
        procs: list[asyncio.subprocess.Process] = []
        clients: dict[str, ControlClient] = {}
        try:
            for host, ns in namespaces.items():
                doc = {
                    "host_id": host,
                    "cluster": str(cluster_dir),
                    "listen": f"{HOSTS[host]}:7300",
                    "control_socket": str(base / f"{host}.sock"),
                    "state_dir": str(base / host),
                    "peers": {h: f"{ip}:7300" for h, ip in HOSTS.items() if h != host},
                }
                cfg = base / f"{host}.yaml"
                cfg.write_text(yaml.safe_dump(doc))
                with open(base / f"{host}.log", "wb") as log:
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            sys.executable,
                            "-m",
                            "secmig",
                            "agent",
                            "run",
                            "--config",
                            str(cfg),
                            stdout=log,
                            stderr=log,
                        )
                    )
                clients[host] = ControlClient(base / f"{host}.sock")
            for client in clients.values():
                for _ in range(200):
                    try:
                        await client.call("status")
                        break
                    except AgentUnavailable:
                        await asyncio.sleep(0.05)
            binding = cluster.issue_binding("vm1", VM_MAC, "hv-a").to_json()
            await clients["hv-a"].call("vm.start", name="vm1", spec=spec(32 * MIB, 16 * MIB), binding=binding)
            for src, dst in (("hv-a", "hv-b"), ("hv-b", "hv-c")):
                current = LocationBinding.from_json(await clients[src].call("vm.binding", name="vm1"))
                grant = cluster.issue_grant(Operation.MIGRATE, "vm1", src, dst, current_binding=current).to_json()
                report = await clients[src].call("migrate", name="vm1", to=dst, grant=grant)
                assert report["outcome"] == "completed" and report["destination"] == dst
                assert await clients[src].call("vm.list") == []
            [row] = await clients["hv-c"].call("vm.list")
            assert row["state"] == "running" and row["binding_epoch"] == 2
        finally:
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            await asyncio.gather(*(asyncio.wait_for(p.wait(), 10) for p in procs), return_exceptions=True)

    run(body, 60)
