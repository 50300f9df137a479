"""``secmig cluster …`` and ``secmig audit …``: a cluster's identities and its audit log.

Every command works on a cluster directory (``--cluster DIR``, default ``$SECMIG_CLUSTER`` or
``./cluster``). Nothing here prints a private key: commands report paths and key fingerprints only.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from secmig.cli import app, console
from secmig.errors import AuditError, ConfigError, SecmigError
from secmig.model.units import parse_duration, parse_size
from secmig.security.audit import head_owner, read_records, verify_audit_log
from secmig.security.cluster import DEFAULT_GRANT_MEMORY_BYTES, Cluster, load_document, write_document
from secmig.security.credentials import LocationBinding
from secmig.security.grants import Grant
from secmig.security.keys import public_key_from_raw
from secmig.security.location import verify_location
from secmig.security.policy import AUTHORITY, parse_operation

cluster_app = typer.Typer(help="Create a cluster, issue hypervisors their Vsignature, revoke them.")
audit_app = typer.Typer(help="Inspect and verify the hash-chained audit log.")
app.add_typer(cluster_app, name="cluster")
app.add_typer(audit_app, name="audit")


def _default_cluster() -> Path:
    return Path(os.environ.get("SECMIG_CLUSTER", "cluster"))


ClusterOpt = Annotated[
    Path | None, typer.Option("--cluster", "-c", help="Cluster directory (default $SECMIG_CLUSTER or ./cluster).")
]


def _open(cluster: Path | None) -> Cluster:
    return Cluster(cluster or _default_cluster())


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _size(value: str, option: str) -> int:
    try:
        size = parse_size(value)
    except SecmigError as err:
        raise ConfigError(f"{option} {value!r}: {err}") from err
    if size <= 0:
        raise ConfigError(f"{option} {value!r}: must be positive")
    return size


def _duration(value: str, option: str) -> float:
    try:
        seconds = parse_duration(value)
    except SecmigError as err:
        raise ConfigError(f"{option} {value!r}: {err}") from err
    if seconds <= 0:
        raise ConfigError(f"{option} {value!r}: must be positive")
    return seconds


@cluster_app.command("init")
def cluster_init(
    directory: Annotated[Path, typer.Argument(help="New cluster directory (absent or empty).")],
    name: Annotated[str, typer.Option(help="A human name for the cluster.")] = "secmig",
    validity: Annotated[str, typer.Option(help="CA lifetime as a duration, e.g. 87600h (ten years).")] = "87600h",
) -> None:
    """Create a cluster: authority key, X.509 CA, cluster id, empty revocation list and policy."""
    cluster = Cluster.create(directory, name=name, validity_s=_duration(validity, "--validity"))
    console.print(f"cluster {cluster.cluster_id} ({name}) created in {directory}")
    console.print(f"  authority key  {directory / 'authority.key'} (0600)")
    console.print(f"  CA certificate {directory / 'ca.pem'}")


@cluster_app.command("join")
def cluster_join(
    host: Annotated[str, typer.Argument(help="Host id of the hypervisor.")],
    mac: Annotated[list[str] | None, typer.Option("--mac", help="A MAC address of the host (repeatable).")] = None,
    cluster: ClusterOpt = None,
    validity: Annotated[str, typer.Option(help="Lifetime of the credential, e.g. 8760h.")] = "8760h",
) -> None:
    """Issue HOST its key pair, TLS certificate and Vsignature."""
    c = _open(cluster)
    ident = c.join(host, mac or [], validity_s=_duration(validity, "--validity"))
    cred = ident.vsignature
    console.print(f"host {host} joined cluster {c.cluster_id}")
    console.print(f"  key            {c.root / 'hosts' / host / 'host.key'} (0600)")
    console.print(f"  certificate    {c.root / 'hosts' / host / 'host.pem'}")
    console.print(f"  Vsignature     {c.root / 'hosts' / host / 'vsignature.json'} (expires {_when(cred.expires_at)})")


@cluster_app.command("list")
def cluster_list(cluster: ClusterOpt = None) -> None:
    """List the cluster's members, their MACs, key fingerprints, expiry and revocation status."""
    c = _open(cluster)
    table = Table(title=f"cluster {c.cluster_id} ({c.name})")
    for col in ("host", "status", "MACs", "key", "expires"):
        table.add_column(col)
    for m in c.members():
        status = (
            "revoked" if m.revoked else ("expired" if m.expires_at <= dt.datetime.now(dt.UTC).timestamp() else "member")
        )
        table.add_row(m.host_id, status, ", ".join(m.macs) or "-", m.key_fingerprint, _when(m.expires_at))
    console.print(table)


@cluster_app.command("revoke")
def cluster_revoke(
    host: Annotated[str, typer.Argument(help="Host id to revoke.")],
    reason: Annotated[str, typer.Option(help="Why, for the list and the audit log.")] = "unspecified",
    cluster: ClusterOpt = None,
) -> None:
    """Add HOST to the signed revocation list; every later handshake refuses it."""
    rl = _open(cluster).revoke(host, reason=reason)
    console.print(f"host {host} revoked (revocation list #{rl.number}, {len(rl.revoked)} revoked)")


@cluster_app.command("operator")
def cluster_operator(
    name: Annotated[str, typer.Argument(help="Operator name.")],
    op: Annotated[
        list[str],
        typer.Option("--op", help="Operation it may grant (repeatable): migrate, copy, move, clone, template."),
    ],
    vm: Annotated[list[str] | None, typer.Option("--vm", help="VM id glob (repeatable, default *).")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="Host id glob (repeatable, default *).")] = None,
    cluster: ClusterOpt = None,
) -> None:
    """Create a delegated operator key and add its rule to policy.yaml."""
    c = _open(cluster)
    rule = c.add_operator(name, [parse_operation(o) for o in op], vm or ["*"], host or ["*"])
    ops = ", ".join(sorted(o.value for o in rule.operations))
    console.print(f"operator {name} may grant {ops}; key {c.root / 'operators' / (name + '.key')} (0600)")
    console.print(f"  policy.yaml signed by the authority, serial {c.policy().serial}")


@cluster_app.command("sign-policy")
def cluster_sign_policy(cluster: ClusterOpt = None) -> None:
    """Sign policy.yaml as it stands with the authority key (the next serial): for a file written before
    policies were signed. Review it first: hosts accept whatever it says once signed."""
    c = _open(cluster)
    policy = c.sign_policy()
    console.print(f"{c.root / 'policy.yaml'}: {len(policy.operators)} operator rule(s) signed, serial {policy.serial}")


@cluster_app.command("bind")
def cluster_bind(
    vm: Annotated[str, typer.Argument(help="VM id.")],
    mac: Annotated[str, typer.Option("--mac", help="The VM's MAC address.")],
    host: Annotated[str, typer.Option("--host", help="Host the VM runs on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the binding JSON.")],
    epoch: Annotated[int, typer.Option(help="Binding epoch.")] = 0,
    issuer: Annotated[str, typer.Option("--as", help="Sign as the authority or this operator.")] = AUTHORITY,
    cluster: ClusterOpt = None,
) -> None:
    """Sign a VM's location binding (VM id, MAC, host, epoch)."""
    binding = _open(cluster).issue_binding(vm, mac, host, epoch=epoch, issuer=issuer)
    write_document(out, binding)
    console.print(f"binding of {vm} to {host} (epoch {epoch}) written to {out}")


@cluster_app.command("grant")
def cluster_grant(
    operation: Annotated[str, typer.Argument(help="migrate, copy, move, clone or template.")],
    vm: Annotated[str, typer.Argument(help="VM id.")],
    source: Annotated[str, typer.Option("--from", help="Source host.")],
    destination: Annotated[str, typer.Option("--to", help="Destination host.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the grant JSON.")],
    binding: Annotated[Path | None, typer.Option("--binding", help="The VM's current binding (migrate, move).")] = None,
    new_mac: Annotated[str | None, typer.Option("--new-mac", help="The VM's MAC at the destination.")] = None,
    ttl: Annotated[str, typer.Option(help="Validity, e.g. 5min.")] = "5min",
    issuer: Annotated[str, typer.Option("--as", help="Sign as the authority or this operator.")] = AUTHORITY,
    memory: Annotated[
        str | None, typer.Option("--memory", help="The VM's memory size, e.g. 768MiB (a larger claim is refused).")
    ] = None,
    cluster: ClusterOpt = None,
) -> None:
    """Sign a single-use grant for one operation on one VM (of at most --memory) between two hosts."""
    current = None
    if binding is not None:
        doc = load_document(binding, LocationBinding)
        assert isinstance(doc, LocationBinding)
        current = doc
    grant = _open(cluster).issue_grant(
        parse_operation(operation),
        vm,
        source,
        destination,
        ttl_s=_duration(ttl, "--ttl"),
        issuer=issuer,
        current_binding=current,
        new_mac=new_mac,
        memory_bytes=DEFAULT_GRANT_MEMORY_BYTES if memory is None else _size(memory, "--memory"),
    )
    write_document(out, grant)
    console.print(
        f"grant {grant.operation.value} {vm} {source} → {destination} until {_when(grant.expires_at)} written to {out}"
    )


@cluster_app.command("check-binding")
def cluster_check_binding(
    binding: Annotated[Path, typer.Argument(help="Binding JSON file.")],
    vm: Annotated[str, typer.Option("--vm", help="VM id observed.")],
    mac: Annotated[str, typer.Option("--mac", help="MAC address the VM announces.")],
    host: Annotated[str, typer.Option("--host", help="Host the VM was found on.")],
    cluster: ClusterOpt = None,
) -> None:
    """The verification module: may this VM run on this host with this MAC? Exit 1 with DESTROY if not."""
    doc = load_document(binding, LocationBinding)
    assert isinstance(doc, LocationBinding)
    verdict = verify_location(doc, _open(cluster).trust().roots(), vm_id=vm, vm_mac=mac, host_id=host)
    console.print(f"{verdict.action.value.upper()}: {verdict.reason}")
    if not verdict.ok:
        raise typer.Exit(1)


def _db(db: Path | None, cluster: Path | None) -> Path:
    return db or (cluster or _default_cluster()) / "audit.db"


@audit_app.command("verify")
def audit_verify(
    db: Annotated[Path | None, typer.Option("--db", help="Audit database (default: the cluster's audit.db).")] = None,
    owner: Annotated[
        str | None,
        typer.Option(
            "--owner",
            help="Whose log it must be: 'authority' or a host id (default: the cluster's "
            "own log is the authority's; another log names its owner in its head).",
        ),
    ] = None,
    cluster: ClusterOpt = None,
) -> None:
    """Check the hash chain and the signed head; fail on any edited, inserted or deleted row, and on a head
    not signed by the log owner's own, unrevoked key."""
    path = _db(db, cluster)
    root = cluster or _default_cluster()
    trusted = None
    bound = None
    if (root / "cluster.json").exists():
        c = Cluster(root)
        # The head must be signed by the authority or a current member: a log re-signed with a fresh key is refused.
        trusted = [c.authority_public] + [
            public_key_from_raw(c.host_identity_public(m.host_id)) for m in c.members() if not m.revoked
        ]
        name = owner or (AUTHORITY if db is None else head_owner(path) or AUTHORITY)
        bound = c.audit_owner(name)
    elif owner is not None:
        raise ConfigError(f"--owner {owner}: needs the cluster directory to find the owner's key")
    report = verify_audit_log(path, trusted, owner=bound)
    if not report.ok:
        raise AuditError(f"{path}: audit log fails verification: " + "; ".join(report.problems))
    anchor = (
        f"the key of its owner {bound.name}"
        if bound is not None
        else "the key stored in the log (no cluster directory to anchor it)"
    )
    console.print(f"{path}: {report.rows} rows intact; head signed by {report.signer}, {anchor}")


@audit_app.command("show")
def audit_show(
    db: Annotated[Path | None, typer.Option("--db", help="Audit database (default: the cluster's audit.db).")] = None,
    cluster: ClusterOpt = None,
    limit: Annotated[int, typer.Option(help="Show the last N rows.")] = 50,
) -> None:
    """Print the newest rows of the audit log (run `audit verify` to check them)."""
    rows = read_records(_db(db, cluster))[-limit:]
    table = Table()
    for col in ("#", "time", "event", "decision", "actor", "subject", "detail"):
        table.add_column(col)
    for r in rows:
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
        table.add_row(str(r.seq), _when(r.ts), r.event, r.decision, r.actor, r.subject, detail)
    console.print(table)


__all__ = ["Grant", "audit_app", "cluster_app"]
