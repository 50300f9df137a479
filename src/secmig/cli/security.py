"""``secmig cluster …`` and ``secmig audit …``: a cluster's identities and its audit log."""

from __future__ import annotations

import typer

from secmig.cli import app

cluster_app = typer.Typer(help="Create a cluster, issue hypervisors their Vsignature, revoke them.")
audit_app = typer.Typer(help="Inspect and verify the hash-chained audit log.")
app.add_typer(cluster_app, name="cluster")
app.add_typer(audit_app, name="audit")
