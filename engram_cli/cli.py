"""The `engram` typer app: registers one module per subcommand from `engram_cli.commands`.

Library errors (`EngramError`) become one line on stderr and exit code 2, here and
nowhere else. `main()` imports only the module of the command it runs (`engram
build-table` never pays for torch's ~1 s import); `--help`, an unknown name and
`engram_cli.cli.app` (for tests and embedding) register them all.
"""

from __future__ import annotations

import difflib
import sys
from importlib import import_module

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from . import __version__
from .errors import EngramError

# Subcommand modules, in the order a user runs them.
COMMAND_MODULES = ("compress_vocab", "build_table", "collisions", "inspect", "train", "eval", "sweep", "export", "import_tables", "quantize", "prune")


def polish_help(command: click.Command, ctx: click.Context) -> click.Command:
    """Boolean flags shown as flags (no `<bool>`), help text taken literally (no rich markup).

    Help texts name extras such as `engram-cli[plot]`; rich would read `[plot]` as a style.
    Applied once per command object (click caches the parameters, the help option too).
    """
    if getattr(command, "_engram_polished", False):
        return command
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None  # typer would show `<bool>`
        if getattr(param, "help", None):
            param.help = escape(param.help)
    command._engram_polished = True
    return command


class EngramGroup(TyperGroup):
    """Keeps commands in registration order, polishes their help, turns `EngramError` into exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: click.Context, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        return polish_help(command, ctx) if command is not None else None

    def format_help(self, ctx: click.Context, formatter) -> None:
        polish_help(self, ctx)
        super().format_help(ctx, formatter)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and super().get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.5)
            hint = f"did you mean `engram {close[0]}`?" if close else "see `engram --help`"
            typer.echo(f"Error: no command {name!r}; {hint} (commands: {', '.join(self.list_commands(ctx))})", err=True)
            raise typer.Exit(2)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngramError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; nothing was left half-written.", err=True)
            raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"engram {__version__}")
        raise typer.Exit()


def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Build and audit the n-gram memory tables of DeepSeek's Engram architecture.

    Typical run, in a fresh directory with your text in corpus/:

        engram compress-vocab          # -> vocab.npz
        engram build-table corpus/     # -> tables.zarr (uses ./vocab.npz)
        engram collisions --heads 8    # audit tables.zarr
        engram inspect                 # look at tables.zarr
        engram train corpus/           # -> model.ckpt + model.tables.zarr
        engram eval model.ckpt

    Reports go to stdout (--json for scripts), progress and notices to stderr.
    """


def command_module(name: str) -> str | None:
    """The module in `COMMAND_MODULES` that registers command `name` (`build-table` -> `build_table`), or None."""
    module = "import_tables" if name == "import" else name.replace("-", "_")
    return module if module in COMMAND_MODULES else None


def make_app(modules: tuple[str, ...] = COMMAND_MODULES) -> typer.Typer:
    """The typer app with the commands of `modules` registered (all of them by default)."""
    app = typer.Typer(
        name="engram",
        cls=EngramGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"show_default": True},
    )
    app.callback()(main_callback)
    for name in modules:
        import_module(f"engram_cli.commands.{name}").register(app)
    return app


def __getattr__(name: str):
    """`engram_cli.cli.app`: the app with every command, built on first use."""
    if name == "app":
        globals()["app"] = make_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point: registers only the command named on the command line."""
    module = command_module(sys.argv[1]) if len(sys.argv) > 1 else None
    make_app((module,) if module else COMMAND_MODULES)()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
