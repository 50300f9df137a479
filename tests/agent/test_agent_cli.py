"""The CLI in front of the agents: host.yaml errors, and vm start/list and migrate against live daemons."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import free_port, run, spawn_agent, write_host_yaml

from secmig.agent.config import load_config
from secmig.cli import main
from secmig.errors import ConfigError


def test_bad_host_yaml_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong field is reported on one line naming the file, the field and the value; exit code 2."""
    bad = tmp_path / "host.yaml"
    bad.write_text(
        "host_id: a\ncluster: c\ncontrol_socket: a.sock\nstate_dir: s\nmigration: {downtime_limit: 3 parsecs}\n"
    )
    assert main(["agent", "run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "host.yaml" in err and "migration.downtime_limit" in err and "parsecs" in err
    bad.write_text("host_id: a\ncluster: c\ncontrol_socket: a.sock\nstate_dir: s\nlisten: nowhere:port\n")
    with pytest.raises(ConfigError, match="listen"):
        load_config(bad)
    bad.write_text("host_id: a\nclusterr: c\n")
    with pytest.raises(ConfigError, match="clusterr: unknown field"):
        load_config(bad)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "secmig", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_cli_starts_lists_and_migrates(cluster_dir: Path, base: Path) -> None:
    """secmig vm start, vm list --json and migrate drive two daemons; the grant is signed by the CLI."""

    async def body() -> None:
        pa, pb = free_port(), free_port()
        cfg_a = write_host_yaml(base / "a.yaml", cluster_dir, "hv-a", base, pa, {"hv-b": f"127.0.0.1:{pb}"})
        cfg_b = write_host_yaml(base / "b.yaml", cluster_dir, "hv-b", base, pb, {})
        procs = [await spawn_agent(cfg_a, base / "a.log"), await spawn_agent(cfg_b, base / "b.log")]
        env = {**os.environ, "SECMIG_CLUSTER": str(cluster_dir)}
        try:

            def steps() -> None:
                r = _cli(
                    "vm", "start", "web", "--ram", "32MiB", "--working-set", "4MiB", "--config", str(cfg_a), env=env
                )
                assert r.returncode == 0, r.stderr
                r = _cli("migrate", "web", "--to", "hv-b", "--config", str(cfg_a), "--json", env=env)
                assert r.returncode == 0, r.stderr
                report = json.loads(r.stdout)
                assert report["outcome"] == "completed" and report["downtime_s"] > 0
                r = _cli("vm", "list", "--json", "--config", str(cfg_b), env=env)
                assert r.returncode == 0, r.stderr
                vms = json.loads(r.stdout)["vms"]
                assert [(v["name"], v["state"], v["binding_epoch"]) for v in vms] == [("web", "running", 1)]
                r = _cli("migrate", "web", "--to", "hv-b", "--config", str(cfg_a), env=env)
                assert r.returncode == 1 and "no VM 'web'" in r.stderr

            await asyncio.to_thread(steps)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(p.wait(), 10) for p in procs]
            assert codes == [0, 0]

    run(body)
