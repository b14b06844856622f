"""Shared helpers for the CLI tests: fixture copies, the one-error-line check, a small store.

A plain module (not a test module), so test modules share these without importing each other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from engram_cli.cli import app

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
SMALL_FILES = ["debian-policy/ap-license.rst", "debian-policy/index.rst", "developers-reference/scope.rst"]
# 2 layers x orders 2..3 x 4 heads, rows of 16 float32; 1024-row chunks, 4 chunks per shard
SMALL_STORE_ARGS = ["--heads", "4", "--dim", "64", "--rows-per-head", "3001,5003", "--chunk-size", "64KiB", "--shard-size", "256KiB"]


def copy_fixtures(root: Path, files=SMALL_FILES) -> Path:
    """Copy `files` (paths under fixtures/corpus) into `root`, keeping their folders; returns root."""
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / rel, root / rel)
    return root


def one_error_line(result) -> str:
    """The CLI's refusal: exit 2, no traceback, exactly one `Error: ` line on stderr (returned)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def build_small_store(root: Path) -> Path:
    """`engram build-table` of SMALL_FILES with SMALL_STORE_ARGS into root/tables.zarr."""
    corpus = copy_fixtures(root / "corpus")
    out = root / "tables.zarr"
    result = CliRunner().invoke(app, ["build-table", str(corpus), "-o", str(out), *SMALL_STORE_ARGS, "--json"])
    assert result.exit_code == 0, result.output
    return out


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store, by path relative to its root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path, normalized) -> None:
    """Every file of the two stores byte-identical; the root zarr.json equal after `normalized(raw) -> dict`."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if k != "zarr.json" and fa[k] != fb[k]]
    assert not differ, f"files differ: {differ[:5]}"
    assert normalized(fa["zarr.json"]) == normalized(fb["zarr.json"])

