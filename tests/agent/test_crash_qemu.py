"""kill -9 of a real agent in the middle of a QEMU migration, then a restart: exactly one running QEMU copy.

QEMU runs detached from its agent (its own session, no parent-death signal) and is recorded in the
agent's state folder (:mod:`secmig.agent.vmstate`): the restarted agent re-adopts it over QMP, or kills it
and scrubs its RAM, as the location register decides. The killed agent is a child process told where to
die by the test hook ``SECMIG_TEST_CRASH_AT``; its peer is a long-lived agent process (one per side, for
the whole module). Every case boots one small reference guest (32 MiB, TCG).

"Running" is read from the guest itself: its status block, in its RAM file (``/dev/shm``, shared with
QEMU), must show the write counter advancing on exactly one host; the other host has no QEMU process
for the VM and no RAM file left (killed and scrubbed), and the survivor's counter is at least the one the
guest had reached before the migration (it is the VM, not a fresh boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_helpers import MIB, free_port, run, short_dir

from secmig.agent.control import ControlClient
from secmig.agent.drivers.qemu import ram_file
from secmig.agent.qemu.guest import STATUS_ADDR, GuestState, GuestStatus
from secmig.agent.qemu.machine import kill_pid, owned_qemus, scrub_ram
from secmig.agent.vmstate import CRASH_ENV, VMStore
from secmig.errors import AgentUnavailable
from secmig.security import Cluster
from secmig.security.policy import Operation

pytestmark = pytest.mark.qemu

SOURCE_POINTS = {  # crash point → the host that must run the VM afterwards
    "source.handshake": "hv-a",
    "source.transfer": "hv-a",
    "source.commit": "hv-a",
    "source.prepared": "hv-a",
    "source.registered": "hv-b",
    "source.confirmed": "hv-b",
}
DESTINATION_POINTS = {
    "destination.transfer": "hv-a",
    "destination.commit": "hv-a",
    "destination.prepared": "hv-b",
    "destination.confirmed": "hv-b",
    "destination.registered": "hv-b",
    "destination.resumed": "hv-b",
}
QSPEC = {"ram_bytes": 32 * MIB, "working_set_bytes": 4 * MIB, "rate_pages_per_s": 2000, "pattern": "rand"}
MAC = "52:54:00:12:34:77"


@dataclass
class Host:
    """One agent's configuration, and its process when it runs."""

    host_id: str
    config: Path
    state_dir: Path
    sock: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def token(self) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            return (self.state_dir / "vms" / "owner").read_text().strip()
        return None


@dataclass
class Lab:
    base: Path
    cache: Path
    crash_a: Host
    """hv-a, the source that is killed (peer: peer_b)."""
    peer_b: Host
    crash_b: Host
    """hv-b, the destination that is killed (peer: peer_a)."""
    peer_a: Host

    def hosts(self) -> list[Host]:
        return [self.crash_a, self.peer_b, self.crash_b, self.peer_a]


def _host(lab_base: Path, cluster_dir: Path, cache: Path, host_id: str, tag: str, peers: dict[str, int]) -> Host:
    port = free_port()
    state = lab_base / tag
    sock = lab_base / f"{tag}.sock"
    doc = {
        "host_id": host_id,
        "cluster": str(cluster_dir),
        "listen": f"127.0.0.1:{port}",
        "control_socket": str(sock),
        "state_dir": str(state),
        "peers": {h: f"127.0.0.1:{p}" for h, p in peers.items()},
        "migration": {"max_bandwidth": "40MB/s", "idle_timeout": "1s", "handshake_timeout": "2s"},
        "qemu": {"guest_cache": str(cache), "accel": "tcg"},
        "monitor": {"enabled": False},
        "log_level": "debug",
    }
    cfg = lab_base / f"{tag}.yaml"
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return Host(host_id, cfg, state, sock, port)


def _up(host: Host, crash_at: str | None = None) -> None:
    """Start ``host``'s agent (told to SIGKILL itself at ``crash_at``); returns once its control socket answers."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    with open(host.state_dir.parent / f"{host.sock.stem}.log", "ab") as log:
        host.proc = subprocess.Popen(
            [sys.executable, "-m", "secmig", "agent", "run", "--config", str(host.config)],
            stdout=log,
            stderr=log,
            env=env,
        )
    client = ControlClient(host.sock, timeout_s=5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert host.proc.poll() is None, f"agent {host.host_id} exited with {host.proc.returncode}"
        try:
            asyncio.run(client.call("status"))
            return
        except AgentUnavailable:
            time.sleep(0.05)
    raise AssertionError(f"agent {host.host_id} did not come up")


def _down(host: Host) -> None:
    if host.proc is not None and host.proc.poll() is None:
        host.proc.send_signal(signal.SIGTERM)
        try:
            host.proc.wait(20)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(5)
    host.proc = None


@pytest.fixture(scope="module")
def lab(cluster_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the reference guest cannot be built")
    base = short_dir("sq9-")
    cache = tmp_path_factory.mktemp("guest")
    peer_b = _host(base, cluster_dir, cache, "hv-b", "pb", {})
    crash_a = _host(base, cluster_dir, cache, "hv-a", "ca", {"hv-b": peer_b.port})
    crash_b = _host(base, cluster_dir, cache, "hv-b", "cb", {})
    peer_a = _host(base, cluster_dir, cache, "hv-a", "pa", {"hv-b": crash_b.port})
    lab = Lab(base, cache, crash_a, peer_b, crash_b, peer_a)
    try:
        _up(peer_b)
        _up(peer_a)
        yield lab
    finally:
        tokens = [t for h in lab.hosts() if (t := h.token())]
        for h in lab.hosts():
            _down(h)
        for token in tokens:  # nothing of ours may outlive the module
            for pid in owned_qemus(token):
                kill_pid(pid)
        for point in (*SOURCE_POINTS, *DESTINATION_POINTS):
            for host in ("hv-a", "hv-b"):
                path = ram_file(host, _vm_name(point))
                if path is not None:
                    scrub_ram(path)
        shutil.rmtree(base, ignore_errors=True)
        for workdir in Path(tempfile.gettempdir()).glob("sq-q9-*"):  # the work folders of QEMUs killed above
            shutil.rmtree(workdir, ignore_errors=True)


def _vm_name(point: str) -> str:
    return "q9-" + point.replace(".", "-")


def _writes(host_id: str, vm: str) -> int | None:
    """The guest's write counter read from its RAM file on ``host_id`` (None: no file, or not running yet)."""
    path = ram_file(host_id, vm)
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(STATUS_ADDR)
            raw = fh.read(8 * GuestStatus.WORDS)
    except FileNotFoundError:
        return None
    if len(raw) < 8 * GuestStatus.WORDS:
        return None
    try:
        status = GuestStatus.from_words(list(struct.unpack(f"<{GuestStatus.WORDS}Q", raw)))
    except ValueError:
        return None
    return status.writes if status.state == GuestState.RUNNING else None


def _qemu_hosts(lab: Lab, pair: tuple[Host, Host], vm: str) -> list[str]:
    """The hosts (of ``pair``) where a QEMU process of ``vm`` lives."""
    out = []
    for h in pair:
        token = h.token()
        if token is not None:
            out += [h.host_id for name in owned_qemus(token).values() if name == vm]
    return out


async def _running_copies(lab: Lab, pair: tuple[Host, Host], vm: str) -> list[str]:
    """Hosts where ``vm``'s guest really runs: its write counter advances in its RAM file."""
    before = {h.host_id: _writes(h.host_id, vm) for h in pair}
    await asyncio.sleep(0.4)
    return [
        h.host_id
        for h in pair
        if (w0 := before[h.host_id]) is not None and (w1 := _writes(h.host_id, vm)) is not None and w1 > w0
    ]


async def _rows(host: Host, vm: str) -> list[dict[str, Any]]:
    return [r for r in await ControlClient(host.sock, timeout_s=5).call("vm.list") if r["name"] == vm]


async def _wait_proc(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError("the crash point was not reached")
        await asyncio.sleep(0.02)
    return proc.returncode


def _kill9_case(lab: Lab, cluster: Cluster, point: str, expected: str, crashing: Host, peer: Host) -> None:
    vm = _vm_name(point)
    source, dest = (crashing, peer) if point.startswith("source.") else (peer, crashing)
    pair = (source, dest)
    binding = cluster.issue_binding(vm, MAC, "hv-a")
    grant = cluster.issue_grant(Operation.MIGRATE, vm, "hv-a", "hv-b", current_binding=binding)
    _up(crashing, crash_at=point)

    async def body() -> None:
        await ControlClient(source.sock, timeout_s=60).call(
            "vm.start", name=vm, driver="qemu", spec=QSPEC, binding=binding.to_json()
        )
        w_before = 0
        for _ in range(100):
            w_before = _writes("hv-a", vm) or 0
            if w_before:
                break
            await asyncio.sleep(0.05)
        assert w_before > 0, "the guest does not run on the source"
        mig = asyncio.ensure_future(
            ControlClient(source.sock, timeout_s=60).call("migrate", name=vm, to="hv-b", grant=grant.to_json())
        )
        assert crashing.proc is not None
        assert await _wait_proc(crashing.proc, 30) == -signal.SIGKILL
        with contextlib.suppress(Exception):
            await mig
        await asyncio.to_thread(_up, crashing)  # the restart, without the crash point
        holder = source if expected == source.host_id else dest
        for _ in range(60):  # settle: the restarted agent asks the register, the peer finishes
            rows = await _rows(holder, vm)
            copies = await _running_copies(lab, pair, vm)
            if copies == [expected] and _qemu_hosts(lab, pair, vm) == [expected] and rows:
                break
        await asyncio.sleep(0.5)  # nothing starts later
        copies = await _running_copies(lab, pair, vm)
        assert copies == [expected], f"{point}: guest running on {copies}, expected on {expected} only"
        assert _qemu_hosts(lab, pair, vm) == [expected], f"QEMU processes of {vm}: {_qemu_hosts(lab, pair, vm)}"
        other = "hv-b" if expected == "hv-a" else "hv-a"
        other_ram = ram_file(other, vm)
        assert other_ram is not None and not other_ram.exists(), "the discarded copy's RAM was not scrubbed"
        survivor = _writes(expected, vm)
        assert survivor is not None and survivor >= w_before, "the survivor is not the VM (no copy may be lost)"
        rows = await _rows(holder, vm)
        assert [r["state"] for r in rows] == ["running"]
        assert rows[0]["binding_epoch"] == (0 if expected == "hv-a" else 1)
        other_host = dest if holder is source else source
        assert await _rows(other_host, vm) == []
        register = cluster.location_register()
        try:
            current = register.current(vm)
        finally:
            register.close()
        assert current is not None and current.host_id == expected
        await ControlClient(holder.sock, timeout_s=30).call("vm.stop", name=vm)

    try:
        run(body, 90)
    except BaseException:
        for h in (crashing, peer):  # the agents' own account, for the failure report
            log = h.state_dir.parent / f"{h.sock.stem}.log"
            print(f"--- {h.sock.stem}.log")
            print("".join(ln for ln in log.read_text().splitlines(True) if " DEBUG " not in ln)[-4000:])
        raise
    finally:
        _down(crashing)


@pytest.mark.parametrize("point", list(SOURCE_POINTS))
def test_kill9_source_agent_qemu(lab: Lab, cluster: Cluster, point: str) -> None:
    """The source agent SIGKILLs itself at ``point`` mid-migration of a QEMU VM; restarted, it re-adopts its
    QEMU (or discards it when the register moved the VM): the guest runs on exactly one host."""
    _kill9_case(lab, cluster, point, SOURCE_POINTS[point], lab.crash_a, lab.peer_b)


@pytest.mark.parametrize("point", list(DESTINATION_POINTS))
def test_kill9_destination_agent_qemu(lab: Lab, cluster: Cluster, point: str) -> None:
    """The destination agent SIGKILLs itself at ``point``; restarted, exactly one copy of the guest runs."""
    _kill9_case(lab, cluster, point, DESTINATION_POINTS[point], lab.crash_b, lab.peer_a)


def test_clean_stop_in_doubt_keeps_the_qemu_copy(
    cluster_dir: Path, cluster: Cluster, base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A source stopped cleanly while the register cannot answer leaves its paused QEMU running (recorded,
    in doubt) while every other QEMU is quit; restarted, it re-adopts the QEMU and the register keeps it."""
    from agent_helpers import addr, grant_for, host_config, running

    from secmig.agent.daemon import Agent
    from secmig.errors import RegisterUnavailable

    if shutil.which("qemu-system-x86_64") is None or shutil.which("gcc") is None:
        pytest.skip("QEMU and gcc are needed")
    q = {"qemu": {"guest_cache": str(tmp_path_factory.mktemp("guest")), "accel": "tcg"}}
    quick = {"migration": {"idle_timeout": "1s", "handshake_timeout": "2s", "max_bandwidth": "40MB/s"}}
    vm, other = "q9-doubt", "q9-bystander"

    class Down:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def current(self, vm_id: str) -> Any:
            return self.inner.current(vm_id)

        def commit(self, *args: Any) -> Any:
            raise RegisterUnavailable("register down (test)")

        resolve = commit

    async def body() -> None:
        async with running(host_config(cluster_dir, "hv-b", base, **q, **quick)) as b:
            cfg_a = host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **q, **quick)
            a = Agent(cfg_a)
            await a.start()
            token = VMStore(cfg_a.state_dir / "vms").owner()
            try:
                for name in (vm, other):
                    binding = cluster.issue_binding(name, MAC, "hv-a")
                    await a.start_vm(name, "qemu", QSPEC, binding.to_json())
                a._register = Down(a._register)
                mig = asyncio.ensure_future(a.migrate(vm, "hv-b", "migrate", grant_for(cluster, a, vm, "hv-b")))
                for _ in range(300):  # COMMIT is out, the vote in, the register silent: in doubt
                    if a.migrations and a.migrations[vm].paused_at and not b.migrations:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
            finally:
                await a.stop()
            with contextlib.suppress(Exception):
                await mig
            assert sorted(owned_qemus(token).values()) == [vm], "only the copy in doubt may outlive the stop"
            assert await _running_copies_of(vm) == []  # paused, not running, until the register answers
            async with running(host_config(cluster_dir, "hv-a", base, {"hv-b": addr(b)}, **q, **quick)) as a2:
                for _ in range(100):
                    if vm in a2.vms and not a2.vms[vm].vm.paused:
                        break
                    await asyncio.sleep(0.05)
                assert await _running_copies_of(vm) == ["hv-a"]
                assert a2.vms[vm].binding is not None and a2.vms[vm].binding.epoch == 0
                assert vm not in b.vms
            assert owned_qemus(token) == {}

    try:
        run(body, 90)
    finally:
        for name in (vm, other):
            for host in ("hv-a", "hv-b"):
                path = ram_file(host, name)
                if path is not None:
                    scrub_ram(path)


async def _running_copies_of(vm: str) -> list[str]:
    before = {h: _writes(h, vm) for h in ("hv-a", "hv-b")}
    await asyncio.sleep(0.4)
    return [h for h, w0 in before.items() if w0 is not None and (w1 := _writes(h, vm)) is not None and w1 > w0]
