"""``secmig agent run``, ``secmig vm define|list|start|stop`` and ``secmig migrate``: the real agents.

``vm define FILE`` validates a VM definition (:mod:`secmig.agent.vmdef`) and stores it on the agent;
``vm start NAME`` boots it. ``migrate --op clone|template`` signs the new VM's binding (``--new-name``,
``--new-mac``), and every grant signed here binds the manifest the agent will send (its digest).

``agent run`` is the daemon; the other commands talk to it over its control socket (``--config
host.yaml`` names it, or ``--socket PATH``, or ``$SECMIG_AGENT_SOCKET``). ``vm start`` and ``migrate``
obtain the VM's binding and the operation's grant from the cluster directory (``--cluster``, default
``$SECMIG_CLUSTER`` or the one in host.yaml) signed by the authority or ``--as OPERATOR``, unless a file
is given with ``--binding``/``--grant``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from secmig.agent.config import HostConfig, load_config
from secmig.agent.control import ControlClient
from secmig.agent.vocab import DriverKind, parse_data_plane, parse_driver
from secmig.cli import app, console, option_value
from secmig.errors import ConfigError
from secmig.model.units import format_bytes, format_duration, parse_duration, parse_rate, parse_size
from secmig.security.cluster import Cluster, load_document
from secmig.security.credentials import LocationBinding
from secmig.security.grants import Grant, bind_manifest
from secmig.security.policy import AUTHORITY, Operation, parse_operation

agent_app = typer.Typer(help="The per-host daemon that migrates VMs securely.")
vm_app = typer.Typer(help="VMs of the local agent: define, list, start, stop.")
app.add_typer(agent_app, name="agent")
app.add_typer(vm_app, name="vm")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="The agent's host.yaml (names its socket).")]
SocketOpt = Annotated[Path | None, typer.Option("--socket", help="The agent's control socket.")]
ClusterOpt = Annotated[
    Path | None, typer.Option("--cluster", "-c", help="Cluster directory to sign bindings and grants with.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
DEFAULT_MAC = "52:54:00:00:00:01"


class _JsonFormatter(logging.Formatter):
    """One JSON object per log line (structured logs for a log shipper)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


@agent_app.command("run")
def agent_run(
    config: Annotated[Path, typer.Option("--config", help="host.yaml of this host.")],
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning (default: host.yaml's).")] = None,
) -> None:
    """Run the agent until SIGTERM: migrations over TLS 1.3, the control socket, the monitor."""
    from secmig.agent.daemon import Agent

    cfg = load_config(config)
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format {log_format!r}: give text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("secmig")
    root.addHandler(handler)
    root.setLevel((log_level or cfg.log_level).upper())
    asyncio.run(Agent(cfg).run())


def _client(config: Path | None, socket: Path | None) -> ControlClient:
    if socket is None and config is not None:
        socket = load_config(config).control_socket
    if socket is None and os.environ.get("SECMIG_AGENT_SOCKET"):
        socket = Path(os.environ["SECMIG_AGENT_SOCKET"])
    if socket is None:
        raise ConfigError("which agent? give --config host.yaml or --socket PATH (or set SECMIG_AGENT_SOCKET)")
    return ControlClient(socket)


def _cluster(cluster: Path | None, config: Path | None) -> Cluster:
    if cluster is None and os.environ.get("SECMIG_CLUSTER"):
        cluster = Path(os.environ["SECMIG_CLUSTER"])
    if cluster is None and config is not None:
        cfg: HostConfig = load_config(config)
        cluster = cfg.cluster
    return Cluster(cluster or Path("cluster"))


@vm_app.command("list")
def vm_list(config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """The VMs on this host, their state and location binding."""
    client = _client(config, socket)
    status = client.call_sync("status")
    rows = client.call_sync("vm.list")
    if as_json:
        console.print_json(json.dumps({"host": status, "vms": rows}))
        return
    table = Table(title=f"VMs on {status['host_id']} ({status['listen']})")
    for col in ("name", "driver", "state", "RAM", "binding", "MAC"):
        table.add_column(col)
    for r in rows:
        epoch = "—" if r.get("binding_epoch") is None else f"epoch {r['binding_epoch']}"
        table.add_row(r["name"], r["driver"], r["state"], format_bytes(r["ram_bytes"]), epoch, r.get("mac") or "—")
    running = {r["name"] for r in rows}
    for d in client.call_sync("vm.definitions"):
        if d["name"] not in running:
            mac = d["nics"][0]["mac"] if d.get("nics") else "—"
            table.add_row(d["name"], "qemu", "defined", format_bytes(d["memory"]), "—", mac)
    console.print(table)


@vm_app.command("define")
def vm_define(
    file: Annotated[Path, typer.Argument(help="A VM definition (YAML); see examples/vm/linux-guest.yaml.")],
    config: ConfigOpt = None,
    socket: SocketOpt = None,
) -> None:
    """Validate a QEMU VM definition and store it on the local agent (``vm start NAME`` boots it)."""
    from secmig.agent.vmdef import load_definition

    defn = load_definition(file)
    doc = _client(config, socket).call_sync("vm.define", definition=defn.to_json(), source=file.name)
    nics = ", ".join(f"{n['mac']} on {n['bridge']}" for n in doc["nics"]) or "no NIC"
    console.print(f"VM {doc['name']} defined ({format_bytes(doc['memory'])}, {doc['vcpus']} vCPU, {nics})")


@vm_app.command("start")
def vm_start(
    name: Annotated[str, typer.Argument(help="VM id.")],
    driver: Annotated[str, typer.Option(help="memory (embedded) or qemu (the reference guest).")] = "memory",
    ram: Annotated[str, typer.Option(help="RAM, e.g. 256MiB.")] = "256MiB",
    used: Annotated[str | None, typer.Option(help="memory: data at boot (default half the RAM).")] = None,
    working_set: Annotated[str, typer.Option(help="Memory the guest keeps dirtying.")] = "32MiB",
    dirty_rate: Annotated[str, typer.Option(help="Page writes per second, e.g. 5000pages/s.")] = "5000pages/s",
    mac: Annotated[
        str | None, typer.Option(help="The VM's MAC (in its binding; default: its definition's first NIC's).")
    ] = None,
    binding: Annotated[Path | None, typer.Option(help="A binding file (else one is signed here).")] = None,
    no_binding: Annotated[bool, typer.Option("--no-binding", help="Run without a binding (cannot migrate).")] = False,
    issuer: Annotated[
        str, typer.Option("--as", help="Sign the binding as the authority or this operator.")
    ] = AUTHORITY,
    cluster: ClusterOpt = None,
    config: ConfigOpt = None,
    socket: SocketOpt = None,
) -> None:
    """Start a VM on the local agent, bound to this host."""
    client = _client(config, socket)
    defined = client.call_sync("vm.definition", name=name)
    if defined is not None:  # a definition stored with ``vm define``: boot it
        driver = DriverKind.QEMU.value
        if mac is None and defined.get("nics"):
            mac = defined["nics"][0]["mac"]
    ram_b = option_value("--ram", parse_size, ram)
    ws_b = option_value("--working-set", parse_size, working_set)
    rate = option_value("--dirty-rate", parse_rate, dirty_rate).in_pages_per_s()
    kind = parse_driver(driver)
    if kind is DriverKind.MEMORY:
        spec: dict[str, Any] = {
            "ram_bytes": ram_b,
            "used_bytes": option_value("--used", parse_size, used) if used else ram_b // 2,
            "working_set_bytes": ws_b,
            "dirty_rate_pages_per_s": rate,
        }
    elif defined is not None:
        spec = {}
    else:
        spec = {"ram_bytes": ram_b, "working_set_bytes": ws_b, "rate_pages_per_s": int(rate)}
    doc: dict[str, Any] | None = None
    if binding is not None:
        b = load_document(binding, LocationBinding)
        doc = b.to_json()
    elif not no_binding:
        host = client.call_sync("status")["host_id"]
        doc = _cluster(cluster, config).issue_binding(name, mac or DEFAULT_MAC, host, issuer=issuer).to_json()
    row = client.call_sync("vm.start", name=name, driver=kind.value, spec=spec, binding=doc)
    console.print(f"VM {row['name']} ({row['driver']}, {format_bytes(row['ram_bytes'])}) {row['state']}")


@vm_app.command("stop")
def vm_stop(
    name: Annotated[str, typer.Argument(help="VM id.")], config: ConfigOpt = None, socket: SocketOpt = None
) -> None:
    """Stop a VM and wipe its memory."""
    _client(config, socket).call_sync("vm.stop", name=name)
    console.print(f"VM {name} stopped")


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


@app.command("migrate")
def migrate_cmd(
    vm: Annotated[str, typer.Argument(help="VM id on the local agent.")],
    to: Annotated[str, typer.Option("--to", help="Destination host id (in the agent's peers).")],
    op: Annotated[str, typer.Option("--op", help="migrate, copy, move, clone or template.")] = "migrate",
    grant: Annotated[Path | None, typer.Option(help="A grant file (else one is signed here).")] = None,
    issuer: Annotated[str, typer.Option("--as", help="Sign the grant as the authority or this operator.")] = AUTHORITY,
    ttl: Annotated[str, typer.Option(help="Grant validity.")] = "5min",
    address: Annotated[str | None, typer.Option(help="The destination agent's host:port (else peers).")] = None,
    data_plane: Annotated[str, typer.Option(help="QEMU VMs: relay or qemu-tls.")] = "relay",
    downtime_limit: Annotated[str | None, typer.Option(help="e.g. 300ms (default: host.yaml's).")] = None,
    new_name: Annotated[str | None, typer.Option(help="clone, template: the new VM's id.")] = None,
    new_mac: Annotated[str | None, typer.Option(help="clone: the new VM's MAC (default: a random one).")] = None,
    new_binding: Annotated[Path | None, typer.Option(help="clone, template: the new VM's binding file.")] = None,
    from_template: Annotated[bool, typer.Option("--from-template", help="clone a template stored here.")] = False,
    auto_converge: Annotated[bool, typer.Option("--auto-converge", help="QEMU's auto-converge.")] = False,
    postcopy: Annotated[bool, typer.Option("--postcopy", help="migrate over qemu-tls: switch to post-copy.")] = False,
    cluster: ClusterOpt = None,
    config: ConfigOpt = None,
    socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate VM to another host over the authenticated channel, presenting a single-use grant."""
    client = _client(config, socket)
    operation = parse_operation(op)
    plane = parse_data_plane(data_plane)
    limit = option_value("--downtime-limit", parse_duration, downtime_limit) if downtime_limit else None
    clone_doc: dict[str, Any] | None = None
    if new_binding is not None:
        clone_doc = load_document(new_binding, LocationBinding).to_json()
    elif operation in (Operation.CLONE, Operation.TEMPLATE) and grant is None:
        suffix = "template" if operation is Operation.TEMPLATE else "clone"
        name = new_name or f"{vm[:50]}-{suffix}-{os.urandom(2).hex()}"
        mac = new_mac or _random_mac()
        if operation is Operation.TEMPLATE and new_mac is None:
            bdoc = client.call_sync("vm.binding", name=vm)
            mac = LocationBinding.from_json(bdoc).vm_mac if bdoc else mac
        clone_doc = _cluster(cluster, config).issue_binding(name, mac, to, issuer=issuer).to_json()
    options: dict[str, Any] = {
        "address": address,
        "data_plane": plane.value,
        "clone_binding": clone_doc,
        "from_template": from_template,
        "auto_converge": auto_converge,
        "postcopy": postcopy,
    }
    if grant is not None:
        g = load_document(grant, Grant)
        grant_doc = g.to_json()
    else:
        host = client.call_sync("status")["host_id"]
        bdoc = client.call_sync("vm.binding", name=vm)
        current = LocationBinding.from_json(bdoc) if bdoc else None
        ttl_s = option_value("--ttl", parse_duration, ttl)
        signer = _cluster(cluster, config)
        unbound = signer.issue_grant(operation, vm, host, to, ttl_s=ttl_s, issuer=issuer, current_binding=current)
        # The grant binds exactly the manifest (driver, VM definition, new identity) the agent will send.
        digest = bytes.fromhex(
            client.call_sync("vm.manifest", name=vm, to=to, operation=operation.value, **options)["digest"]
        )
        grant_doc = bind_manifest(unbound, digest, signer.issuer_key(issuer)).to_json()
    report = client.call_sync(
        "migrate",
        name=vm,
        to=to,
        operation=operation.value,
        grant=grant_doc,
        downtime_limit_s=limit,
        **options,
    )
    if as_json:
        console.print_json(json.dumps(report))
        return
    down = "—" if report["downtime_s"] is None else format_duration(report["downtime_s"])
    console.print(
        f"{report['operation']} {report['vm']} {report['source']} → {report['destination']}: {report['outcome']} "
        f"in {format_duration(report['total_time_s'])}, downtime {down}, {report['rounds']} rounds, "
        f"{format_bytes(report['wire_bytes'])} on the wire ({report['driver']}, {report['data_plane']})"
    )
    for key, value in sorted(report.get("extra", {}).items()):
        console.print(f"  {key}: {value}")
