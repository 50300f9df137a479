"""Crash safety of QEMU processes (issue 12): an agent's QEMU outlives the agent's kill -9 and is re-adopted
from state on disk; a QEMU of the agent that nothing records is killed and scrubbed at start-up; a
standalone QEMU (no agent: calibration, the lab) still dies with the process that started it.

(This module used to pin that an agent's QEMU dies with its agent, ``PR_SET_PDEATHSIG``; the agents now
re-adopt their QEMUs instead — the end-to-end kill -9 matrix is ``test_crash_qemu.py``.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_helpers import host_config, run, running

from secmig.agent.qemu.machine import OWNER_ENV, die_with_parent, kill_pid, owned_qemus, pid_alive
from secmig.agent.vmstate import VMStore
from secmig.security import Cluster

_STANDALONE = """
import subprocess, sys, time
from secmig.agent.qemu.machine import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(60)
"""

_AGENT_LIKE = """
import asyncio, sys, time
from pathlib import Path
from secmig.agent.qemu.machine import MachineConfig, QemuMachine

async def main():
    cfg = MachineConfig(None, "", 16 << 20, "tcg", "qemu-system-x86_64", extra_args=("-S",))
    m = QemuMachine("adoptme", cfg, Path(sys.argv[1]), owner=sys.argv[2])
    await m.start()
    print(m.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 missing")


def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_standalone_child_dies_with_its_killed_parent() -> None:
    """A child started as a standalone QemuMachine starts QEMU (no owner) is gone with its kill -9'd parent."""
    parent = subprocess.Popen([sys.executable, "-c", _STANDALONE], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        _wait_gone(child)
        assert not pid_alive(child), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait(5)
    assert die_with_parent is not None


@needs_qemu
def test_agents_qemu_survives_kill9_and_is_adopted(tmp_path: Path) -> None:
    """kill -9 of the process that started QEMU the way an agent does: QEMU lives on (its own session, the
    agent's token in its environment), and a new process re-adopts it over QMP; another token cannot."""
    from secmig.agent.qemu.machine import MachineConfig, QemuMachine
    from secmig.errors import QemuError

    token = os.urandom(16).hex()
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT_LIKE, str(tmp_path), token], stdout=subprocess.PIPE, text=True
    )
    pid = 0
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(5)
        time.sleep(0.3)
        assert pid_alive(pid), "the agent's QEMU died with its agent"
        assert owned_qemus(token) == {pid: "adoptme"}
        assert os.getsid(pid) == pid  # its own session: no signal to the agent's group reaches it

        async def adopt() -> None:
            cfg = MachineConfig(None, "", 16 << 20, "tcg", "qemu-system-x86_64", extra_args=("-S",))
            with pytest.raises(QemuError):
                await QemuMachine.adopt("adoptme", cfg, tmp_path, pid, "0" * 32)
            machine = await QemuMachine.adopt("adoptme", cfg, tmp_path, pid, token)
            status = await machine.execute("query-status")
            assert status["status"] == "prelaunch" and not status["running"]
            await machine.kill()
            assert not machine.running

        run(adopt, 30)
        _wait_gone(pid)
        assert not pid_alive(pid)
    finally:
        agent.kill()
        agent.wait(5)
        if pid and pid_alive(pid):
            kill_pid(pid)


@needs_qemu
def test_unrecorded_qemu_of_the_agent_is_killed_and_scrubbed_at_start(
    cluster_dir: Path, cluster: Cluster, base: Path
) -> None:
    """Start-up: a QEMU carrying this agent's token that no state file records is killed, its RAM file
    scrubbed; a QEMU with another token (another agent's) is left alone."""
    cfg = host_config(cluster_dir, "hv-a", base)
    token = VMStore(cfg.state_dir / "vms").owner()
    ram = Path(f"/dev/shm/secmig-test-orphan-{os.getpid()}.ram")
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    backing = ["-object", f"memory-backend-file,id=m,size=1M,mem-path={ram},share=on"]
    orphan = subprocess.Popen(
        [*argv, "-name", "orphan", *backing], env={**os.environ, OWNER_ENV: token}, start_new_session=True
    )
    foreign = subprocess.Popen([*argv, "-name", "foreign"], env={**os.environ, OWNER_ENV: "f" * 32})
    try:
        deadline = time.monotonic() + 10
        while not (owned_qemus(token) and ram.exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert owned_qemus(token) == {orphan.pid: "orphan"}

        async def body() -> None:
            async with running(cfg):
                assert owned_qemus(token) == {}

        run(body, 30)
        orphan.wait(5)
        assert not ram.exists(), "the orphan's RAM file was not scrubbed"
        assert foreign.poll() is None, "another agent's QEMU was killed"
    finally:
        for p in (orphan, foreign):
            p.kill()
            p.wait(5)
        ram.unlink(missing_ok=True)
