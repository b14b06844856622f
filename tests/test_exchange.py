"""export -> import round-trips a store's tables bit-exactly; bad files are refused."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.errors import CheckpointError
from engram_cli.exchange import KEY, export_tables, import_tables
from engram_cli.store import TableStore

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def test_export_import_round_trip(tmp_path):
    shutil.copytree(FIXTURES / "maint-guide", tmp_path / "corpus")
    r = CliRunner().invoke(app, ["build-table", str(tmp_path / "corpus"), "-o", str(tmp_path / "t.zarr"), "--layers", "1,3", "--heads", "2", "--rows-per-head", "300", "--dim", "32"])
    assert r.exit_code == 0, r.output
    f = export_tables(tmp_path / "t.zarr", tmp_path / "t.safetensors")
    # change the rows as another framework would, then import
    from safetensors.numpy import load_file

    t = load_file(str(f))
    t = {k: v * 2 + 1 for k, v in t.items()}
    save_file(t, str(tmp_path / "mod.safetensors"))
    import_tables(tmp_path / "mod.safetensors", tmp_path / "t.zarr", tmp_path / "new.zarr")
    new = TableStore.open(tmp_path / "new.zarr")
    for l in (1, 3):
        assert np.array_equal(new.table(l)[:], t[KEY.format(l)])
    export_tables(tmp_path / "new.zarr", tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert all(np.array_equal(again[k], t[k]) for k in t)
    bad = {k: v[:-1] for k, v in t.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        import_tables(tmp_path / "bad.safetensors", tmp_path / "t.zarr", tmp_path / "x.zarr")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="readable"):
        import_tables(tmp_path / "junk.safetensors", tmp_path / "t.zarr", tmp_path / "y.zarr")
