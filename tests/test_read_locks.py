"""Every command that reads a table store holds its read lock while it reads (engram_cli/store/output.py):
a `build-table --force` that would replace the store meanwhile is refused naming it, and succeeds after."""

from __future__ import annotations

import importlib

import pytest
from typer.testing import CliRunner

from cli_checks import SMALL_STORE_ARGS, build_small_store, copy_fixtures, one_error_line
from engram_cli.cli import app
from engram_cli.store.output import readers_path

runner = CliRunner()

# command -> (the library call it makes while reading, made inside the lock; its extra arguments)
READERS = {
    "inspect": ("hit_profiles", []),
    "collisions": ("audit_collisions", ["--heads", "2"]),
    "export": ("export_tables", ["-o", "{tmp}/t.safetensors"]),
    "quantize": ("quantize_store", ["--dtype", "bfloat16", "-o", "{tmp}/q.zarr"]),
    "prune": ("prune_store", ["--keep-top", "0.5", "-o", "{tmp}/p.zarr"]),
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_a_store_is_not_replaced_while_a_command_reads_it(command, tmp_path, monkeypatch):
    store = build_small_store(tmp_path / "built")
    corpus = copy_fixtures(tmp_path / "corpus")
    rebuild = ["build-table", str(corpus), "-o", str(store), *SMALL_STORE_ARGS, "--force"]
    module = importlib.import_module(f"engram_cli.commands.{command}")
    name, extra = READERS[command]
    original = getattr(module, name)
    during = []

    def reading_call(*args, **kwargs):  # runs while the command holds the store open
        during.append(runner.invoke(app, rebuild))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, reading_call)
    result = runner.invoke(app, [command, str(store), *[a.format(tmp=tmp_path) for a in extra]])
    assert result.exit_code == 0, result.output
    (refused,) = during
    line = one_error_line(refused)
    assert str(store.name) in line and "is being read" in line
    assert not readers_path(store).exists()  # released (and removed) when the command ended
    assert runner.invoke(app, rebuild).exit_code == 0  # and nothing holds it now
