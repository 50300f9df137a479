"""``secmig demo|simulate|predict|validate``: the simulator's commands."""

from __future__ import annotations

from secmig.cli import app, console


@app.command()
def version() -> None:
    """Print secmig's version."""
    from secmig import __version__

    console.print(__version__)
