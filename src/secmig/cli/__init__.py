"""The ``secmig`` command: the only place that prints and turns errors into exit codes.

Each sub-module registers its commands on :data:`app`; :func:`main` runs it and turns any
:class:`~secmig.errors.SecmigError` into one line on stderr and a non-zero exit (2 for bad input).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from secmig.errors import ConfigError, SecmigError, UnitError

app = typer.Typer(
    name="secmig",
    help="Secure, measurable live VM migration: simulate it, secure it, run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output has no terminal width; 140 columns keep the tables on one line each.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


T = TypeVar("T")


def option_value(option: str, parser: Callable[[str], T], value: str) -> T:
    """Parse a CLI option's value; a bad one becomes a ConfigError naming the option."""
    try:
        return parser(value)
    except UnitError as err:
        raise ConfigError(f"{option}: {err}") from None


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from secmig.cli import agent, attack, calibrate, consolidate, experiment, guest, report, security, sim  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secmig`` script."""
    _register()
    try:
        app(args=argv, prog_name="secmig")
    except SystemExit as ex:  # typer's own exits: --help, usage errors (2), typer.Exit
        return ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except SecmigError as err:
        code = 2 if isinstance(err, ConfigError) else 1
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())
