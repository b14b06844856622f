"""Every registered command has help with an example and a page docs/<command>.md
(STYLE.md: a test fails when a command lacks help or is missing from the docs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from engram_cli.cli import COMMAND_MODULES, app, command_module

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMMANDS = typer.main.get_command(app).commands  # name -> click command, as registered


def test_commands_are_registered():
    assert "compress-vocab" in COMMANDS
    assert all(name == name.lower() and " " not in name and "_" not in name for name in COMMANDS)  # kebab-case


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_with_example(name):
    command = COMMANDS[name]
    assert command.help and command.help.strip(), f"`engram {name}` has no help; give its function a docstring"
    assert "Example" in command.help and f"engram {name}" in command.help, f"`engram {name}` help has no example run"
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and f"engram {name}" in result.stdout
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"`engram {name}` option {param.opts} has no help"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_docs_page(name):
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"`engram {name}` has no docs page; write {page.relative_to(DOCS.parent)}"
    text = page.read_text(encoding="utf-8")
    assert f"engram {name}" in text, f"{page.name} shows no example run of `engram {name}`"
    for param in COMMANDS[name].params:
        if param.param_type_name == "option":
            assert any(opt in text for opt in param.opts), f"{page.name} does not document {param.opts}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_flags_as_flags_and_extras_literally(name):
    from typer.testing import CliRunner

    from engram_cli.cli import app

    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output  # boolean options read as flags
    if name == "collisions":
        assert "engram-cli[plot]" in result.output  # not swallowed as rich markup
        for option in ("--heads", "--layers", "--top", "--hash"):
            row = result.output.split(f"│ {option} ", 1)[1].split("│ --", 1)[0]  # the option's row, wrapped or not
            assert "[default:" in row, option


def test_top_level_help_shows_the_typical_run():
    from typer.testing import CliRunner

    from engram_cli.cli import app

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for line in ("engram compress-vocab", "engram build-table corpus/", "engram collisions --heads 8", "engram inspect", "engram train corpus/", "engram eval model.ckpt"):
        assert line in out, line



def test_every_command_name_maps_to_its_module():
    assert sorted(command_module(name) for name in COMMANDS) == sorted(COMMAND_MODULES)
    assert command_module("no-such-command") is None


def test_main_imports_only_the_command_it_runs():
    """`engram build-table` imports its own command module and not torch (~1 s of start-up)."""
    probe = (
        "import sys; from engram_cli.cli import main; sys.argv = ['engram', 'build-table', '--help']\n"
        "try: main()\nexcept SystemExit as e: assert e.code == 0, e.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('engram_cli.commands.') and '._' not in m), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['engram_cli.commands.build_table'] False"
