"""The ``secmig`` command: the only place that prints and turns errors into exit codes.

Each sub-module registers its commands on :data:`app`; :func:`main` runs it and turns any
:class:`~secmig.errors.SecmigError` into one line on stderr and a non-zero exit (2 for bad input).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from secmig.errors import ConfigError, SecmigError

app = typer.Typer(
    name="secmig",
    help="Secure, measurable live VM migration: simulate it, secure it, run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from secmig.cli import security, sim  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secmig`` script."""
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except SecmigError as err:
        code = 2 if isinstance(err, ConfigError) else 1
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return code
    except typer.Exit as ex:
        return int(ex.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as ex:  # click's usage errors
        import click

        if isinstance(ex, click.ClickException):
            ex.show()
            return ex.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())
