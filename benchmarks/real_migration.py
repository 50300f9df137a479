"""Real QEMU migrations side by side: plain TCP, QEMU's own TLS, secmig relay, secmig qemu-tls.

The same VM (the reference guest, TCG unless ``--accel``) and workload in every mode, on loopback,
bandwidth uncapped, each mode ``--repeat`` times (median shown):

- **plain**: two QEMU processes, ``migrate tcp:`` — no authentication at all (the baseline);
- **qemu-tls**: the same with QEMU's ``tls-creds-x509`` (cluster-CA certificates) and ``tls-authz``;
- **secmig relay**: two ``secmig agent run`` processes; QEMU's stream crosses the agents' TLS 1.3
  channel after mutual authentication and a grant;
- **secmig qemu-tls**: the agents authenticate and authorize, then QEMU carries its pages over its TLS.

Columns: QEMU's own total time and downtime, secmig's end-to-end time (handshake, grant check and
destination boot included) and downtime (guest paused on the source → running on the destination),
bytes QEMU transferred and the stream's rate. Targets of issue 6: relay ≤ 1.3 × plain, secmig
qemu-tls ≤ 1.05 × QEMU TLS, relay ≥ 1 GB/s on loopback.

    python benchmarks/real_migration.py [--ram 256MiB] [--working-set 160MiB] [--rate 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from secmig.agent.control import ControlClient
from secmig.agent.drivers.qemu import write_tls_dir
from secmig.agent.qemu.guest import GuestParams, build_guest
from secmig.agent.qemu.machine import MachineConfig, QemuMachine, choose_accel, find_qemu
from secmig.agent.qemu.migration import MigrationSettings, migrate
from secmig.errors import AgentUnavailable
from secmig.model.units import parse_size
from secmig.security import Cluster
from secmig.security.credentials import LocationBinding
from secmig.security.pki import certificate_pem
from secmig.security.policy import Operation
from secmig.yamlfile import read_yaml

MiB = 1 << 20
UNCAPPED = 100e9


@dataclass(frozen=True)
class Run:
    mode: str
    qemu_total_s: float
    qemu_downtime_s: float
    e2e_total_s: float | None
    e2e_downtime_s: float | None
    transferred_bytes: int

    @property
    def rate_bytes_per_s(self) -> float:
        return self.transferred_bytes / self.qemu_total_s if self.qemu_total_s > 0 else 0.0


async def _qemu_pair(args: argparse.Namespace, work: Path, tls: Cluster | None) -> Run:
    cfg = MachineConfig(args.elf, args.params.append_line(), args.ram, args.accel, args.qemu)
    async with (
        QemuMachine("src", cfg, work) as src,
        QemuMachine("dst", replace(cfg, incoming=True), work) as dst,
    ):
        await src.wait_guest_running()
        dirs: list[Path] = []
        if tls is not None:
            ca = certificate_pem(tls.trust().ca_certificate)
            for machine, host, endpoint in ((src, "hv-a", "client"), (dst, "hv-b", "server")):
                d = write_tls_dir(tls.host_identity(host), ca, endpoint)
                dirs.append(d)
                obj: dict[str, Any] = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(d), "endpoint": endpoint}
                if endpoint == "server":
                    obj["verify-peer"] = True
                await machine.execute("object-add", obj)
            await dst.execute("object-add", {"qom-type": "authz-simple", "id": "authz0", "identity": "CN=hv-a"})
            await dst.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "authz0"})
            await src.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "hv-b"})
        t0 = time.monotonic()
        m = await migrate(src, dst, MigrationSettings(UNCAPPED, args.downtime_limit, timeout_s=120), track_guest=False)
        wall = time.monotonic() - t0
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        if not m.converged or m.downtime_s is None:
            raise SystemExit(f"QEMU migration did not converge ({m.status})")
        return Run(
            "QEMU TLS" if tls else "plain QEMU TCP", m.total_time_s, m.downtime_s, wall, None, m.transferred_bytes
        )


async def _spawn(config: Path, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "secmig", "agent", "run", "--config", str(config), stdout=fh, stderr=fh
        )
    client = ControlClient(Path(read_yaml(config)["control_socket"]), timeout_s=5)
    for _ in range(400):
        try:
            await client.call("status")
            return proc
        except AgentUnavailable:
            await asyncio.sleep(0.05)
    raise SystemExit(f"agent did not start; see {log}")


async def _secmig_runs(args: argparse.Namespace, work: Path, cluster: Cluster, planes: list[str]) -> list[Run]:
    ports = {"hv-a": args.port, "hv-b": args.port + 10}
    procs = []
    clients = {}
    for host in ("hv-a", "hv-b"):
        doc = {
            "host_id": host,
            "cluster": str(cluster.root),
            "listen": f"127.0.0.1:{ports[host]}",
            "control_socket": str(work / f"{host}.sock"),
            "state_dir": str(work / host),
            "peers": {h: f"127.0.0.1:{p}" for h, p in ports.items() if h != host},
            "monitor": {"enabled": False},
            "qemu": {"accel": args.accel, "binary": args.qemu, "guest_cache": str(work / "guest")},
            "log_level": "warning",
        }
        (work / f"{host}.yaml").write_text(yaml.safe_dump(doc))
        procs.append(await _spawn(work / f"{host}.yaml", work / f"{host}.log"))
        clients[host] = ControlClient(work / f"{host}.sock")
    spec = {
        "ram_bytes": args.ram,
        "working_set_bytes": args.params.working_set_bytes,
        "rate_pages_per_s": args.params.rate_pages_per_s,
        "pattern": args.params.pattern,
    }
    runs: list[Run] = []
    try:
        n = 0
        for plane in planes:
            for _ in range(args.repeat):
                n += 1
                name = f"bench{n}"
                binding = cluster.issue_binding(name, "52:54:00:00:00:99", "hv-a")
                await clients["hv-a"].call("vm.start", name=name, driver="qemu", spec=spec, binding=binding.to_json())
                current = LocationBinding.from_json(await clients["hv-a"].call("vm.binding", name=name))
                grant = cluster.issue_grant(Operation.MIGRATE, name, "hv-a", "hv-b", current_binding=current)
                r = await clients["hv-a"].call(
                    "migrate",
                    name=name,
                    to="hv-b",
                    grant=grant.to_json(),
                    data_plane=plane,
                    downtime_limit_s=args.downtime_limit,
                )
                await clients["hv-b"].call("vm.stop", name=name)
                x = r["extra"]
                runs.append(
                    Run(
                        f"secmig {plane}",
                        x["qemu_total_time_s"],
                        x["qemu_downtime_s"],
                        r["total_time_s"],
                        r["downtime_s"],
                        x["qemu_transferred_bytes"],
                    )
                )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in procs))
    return runs


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt_s(v: float | None) -> str:
    return "—" if v is None else (f"{v:.3f} s" if v >= 1 else f"{v * 1e3:.0f} ms")


async def _main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="smb-"))
    try:
        cluster = Cluster.create(work / "cluster", name="bench")
        for host in ("hv-a", "hv-b"):
            cluster.join(host)
        runs: list[Run] = []
        for tls in (None, cluster):
            for _ in range(args.repeat):
                runs.append(await _qemu_pair(args, work, tls))
        runs += await _secmig_runs(args, work, cluster, ["relay", "qemu-tls"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    modes = ["plain QEMU TCP", "QEMU TLS", "secmig relay", "secmig qemu-tls"]
    print(
        f"\nreal migrations: {args.ram >> 20} MiB guest, working set {args.params.working_set_bytes >> 20} MiB, "
        f"{args.params.rate_pages_per_s} pages/s ({args.params.pattern}), {args.accel}, loopback, uncapped; "
        f"median of {args.repeat}"
    )
    head = f"{'mode':18} {'QEMU total':>11} {'QEMU downtime':>14} {'end-to-end':>11} {'e2e downtime':>13}"
    print(head + f" {'transferred':>12} {'rate':>10}")
    med: dict[str, float] = {}
    for mode in modes:
        rs = [r for r in runs if r.mode == mode]
        total = _median([r.qemu_total_s for r in rs])
        med[mode] = total or 0.0
        print(
            f"{mode:18} {_fmt_s(total):>11} {_fmt_s(_median([r.qemu_downtime_s for r in rs])):>14} "
            f"{_fmt_s(_median([r.e2e_total_s for r in rs])):>11} {_fmt_s(_median([r.e2e_downtime_s for r in rs])):>13} "
            f"{(_median([float(r.transferred_bytes) for r in rs]) or 0) / MiB:>8.1f} MiB "
            f"{(_median([r.rate_bytes_per_s for r in rs]) or 0) / 1e6:>6.0f} MB/s"
        )
    if med["plain QEMU TCP"] and med["QEMU TLS"]:
        print(
            f"\nrelay ÷ plain = {med['secmig relay'] / med['plain QEMU TCP']:.2f} (target ≤ 1.3); "
            f"secmig qemu-tls ÷ QEMU TLS = {med['secmig qemu-tls'] / med['QEMU TLS']:.2f} (target ≤ 1.05)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", default="256MiB")
    ap.add_argument("--working-set", default="160MiB")
    ap.add_argument("--rate", type=int, default=2000, help="guest page writes per second")
    ap.add_argument("--pattern", default="rand", choices=["seq", "rand", "hot"])
    ap.add_argument("--downtime-limit", type=float, default=0.3, help="seconds")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--port", type=int, default=17300 + os.getpid() % 1000)
    args = ap.parse_args(argv)
    args.ram = parse_size(args.ram)
    args.params = GuestParams(
        working_set_bytes=parse_size(args.working_set), rate_pages_per_s=args.rate, pattern=args.pattern
    )
    args.accel = choose_accel(args.accel)
    args.qemu = find_qemu()
    args.elf = build_guest()
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
