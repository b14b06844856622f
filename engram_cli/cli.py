"""The `engram` typer app: registers one module per subcommand from `engram_cli.commands`.

Library errors (`EngramError`) become one line on stderr and exit code 2, here and
nowhere else.
"""

from __future__ import annotations

import sys
from importlib import import_module

import click
import typer
from typer.core import TyperGroup

from . import __version__
from .errors import EngramError

# Subcommand modules, in the order a user runs them.
COMMAND_MODULES = ("compress_vocab", "build_table", "collisions", "inspect", "train", "eval")


class EngramGroup(TyperGroup):
    """Keeps commands in registration order and turns `EngramError` into exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngramError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; nothing was left half-written.", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    name="engram",
    cls=EngramGroup,
    help="Build and audit the n-gram memory tables of DeepSeek's Engram architecture.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"engram {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Build and audit Engram n-gram memory tables.

    Typical run, in a fresh directory:

        engram compress-vocab
        engram build-table corpus/
        engram collisions --heads 8
    """


for _name in COMMAND_MODULES:
    import_module(f"engram_cli.commands.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
