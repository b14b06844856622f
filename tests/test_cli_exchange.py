"""`engram export`, `engram import` and `engram eval --state-dict` through the CLI: --json
schemas (docs/exchange.md, docs/eval.md), reports on stdout, every refusal one line with exit 2."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_checks import SMALL_STORE_ARGS, build_small_store, one_error_line
from engram_cli.cli import app
from engram_cli.exchange import KEY

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-exchange")
    store = build_small_store(root)
    other = root / "bf16.zarr"  # same addressing, another dtype: another plan fingerprint
    r = runner.invoke(app, ["build-table", str(root / "corpus"), "-o", str(other), *SMALL_STORE_ARGS, "--dtype", "bfloat16", "--json"])
    assert r.exit_code == 0, r.output
    return {"store": store, "other": other, "corpus": root / "corpus"}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_export_json_schema_and_report(small, tmp_path):
    r = run("export", small["store"], "--format", "reference", "-o", tmp_path / "t.pt", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # alone on stdout
    assert set(out) == {"path", "format", "store", "plan_fingerprint", "dtype", "layers", "bytes", "seconds", "tensors"}
    assert out["format"] == "reference" and out["bytes"] == (tmp_path / "t.pt").stat().st_size
    assert all(set(t) == {"name", "dtype", "shape"} for t in out["tensors"])
    assert {t["name"] for t in out["tensors"]} >= {KEY.format(l) for l in out["layers"]}
    sd = torch.load(tmp_path / "t.pt", weights_only=True)
    assert {t["name"]: t["shape"] for t in out["tensors"]} == {k: list(v.shape) for k, v in sd.items()}
    r = run("export", small["store"], "-o", tmp_path / "t.safetensors")
    text = " ".join(r.stdout.split())
    assert r.exit_code == 0 and "t.safetensors (safetensors)" in text and KEY.format(out["layers"][0]) in text


def test_import_json_schema(small, tmp_path):
    assert run("export", small["store"], "-o", tmp_path / "t.safetensors").exit_code == 0
    r = run("import", tmp_path / "t.safetensors", "--plan-from", small["store"], "-o", tmp_path / "new.zarr", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"path", "source", "file_format", "plan_from", "plan_fingerprint", "dtype", "layers", "rows", "converted_layers", "fingerprint_checked"}
    assert out["fingerprint_checked"] and out["file_format"] == "safetensors" and out["converted_layers"] == []
    r = run("import", tmp_path / "t.safetensors", "--plan-from", small["store"], "-o", tmp_path / "new.zarr")
    assert "already exists" in one_error_line(r)
    r = run("import", tmp_path / "t.safetensors", "--plan-from", small["store"], "-o", tmp_path / "new.zarr", "--force")
    assert r.exit_code == 0 and "fingerprint checked" in " ".join(r.stdout.split())


class Opaque:
    pass


def test_refusals_are_one_line(small, tmp_path):
    f = tmp_path / "t.safetensors"
    assert run("export", small["store"], "-o", f).exit_code == 0
    assert "already exists; pass --force" in one_error_line(run("export", small["store"], "-o", f))
    assert "unknown --format 'onnx'" in one_error_line(run("export", small["store"], "--format", "onnx", "-o", tmp_path / "x"))
    assert "does not exist" in one_error_line(run("export", tmp_path / "none.zarr", "-o", tmp_path / "x.safetensors"))
    torch.save({"w": torch.zeros(2), "opaque": Opaque()}, tmp_path / "unsafe.pt")
    line = one_error_line(run("import", tmp_path / "unsafe.pt", "--plan-from", small["store"], "-o", tmp_path / "a.zarr"))
    assert "arbitrary objects" in line and "Opaque" in line
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1, 2]}))
    assert "arbitrary objects" in one_error_line(run("import", tmp_path / "plain.pkl", "--plan-from", small["store"], "-o", tmp_path / "a.zarr"))
    (tmp_path / "cut.safetensors").write_bytes(f.read_bytes()[:-64])
    assert "truncated or corrupt" in one_error_line(run("import", tmp_path / "cut.safetensors", "--plan-from", small["store"], "-o", tmp_path / "a.zarr"))
    assert "fingerprint" in one_error_line(run("import", f, "--plan-from", small["other"], "-o", tmp_path / "a.zarr"))
    assert "does not exist" in one_error_line(run("import", f, "--plan-from", tmp_path / "none.zarr", "-o", tmp_path / "a.zarr"))
    assert not (tmp_path / "a.zarr").exists()
    # the state-dict audit
    assert "drop the checkpoint" in one_error_line(run("eval", "model.ckpt", "--state-dict", f, "--tables", small["store"]))
    assert "does not exist" in one_error_line(run("eval", "--state-dict", f, "--tables", tmp_path / "none.zarr"))
    assert "fingerprint" in one_error_line(run("eval", "--state-dict", f, "--tables", small["other"]))
    plain = {k: v[:-1].clone() for k, v in torch.load(_export_pt(small, tmp_path), weights_only=True).items() if k.endswith("weight")}
    torch.save(plain, tmp_path / "short.pt")
    assert "has shape" in one_error_line(run("eval", "--state-dict", tmp_path / "short.pt", "--tables", small["store"]))


def _export_pt(small, tmp_path) -> Path:
    out = tmp_path / "export.pt"
    assert run("export", small["store"], "--format", "reference", "-o", out).exit_code == 0
    return out


def test_eval_state_dict_json_schema(small, tmp_path):
    f = _export_pt(small, tmp_path)
    r = run("eval", "--state-dict", f, "--tables", small["store"], "--corpus", small["corpus"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"state_dict", "file_format", "tables", "plan_fingerprint", "fingerprint_checked", "text", "parity_tokens", "layers", "layers_missing"}
    assert out["fingerprint_checked"] and out["text"]["source"] == "corpus" and out["layers_missing"] == []
    for lay in out["layers"].values():
        assert set(lay) == {"key", "rows", "head_dim", "dtype", "module", "row_norms", "rows_changed", "usage", "parity", "lookups"}
        assert lay["module"] is None and lay["rows_changed"] == 0  # the store's own rows, table only
        assert set(lay["row_norms"]) == {"min", "p10", "p50", "p90", "max", "mean", "zero_rows"}
        assert set(lay["usage"]) == {"lookups", "rows_touched", "rows_touched_share", "lookups_on_zero_rows", "lookups_on_unchanged_rows"}
        assert lay["usage"]["lookups_on_unchanged_rows"] == 1.0
        assert all(set(p) == {"bit_exact", "tokens_per_s"} and p["bit_exact"] for p in lay["parity"].values())
        assert set(lay["lookups"]) == {"backends", "cache_hit_rate"}
    st = tmp_path / "t.safetensors"  # the same audit of a safetensors file (tensors memory-mapped from it)
    assert run("export", small["store"], "-o", st).exit_code == 0
    r = run("eval", "--state-dict", st, "--tables", small["store"], "--corpus", small["corpus"], "--json")
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["file_format"] == "safetensors"
    for l, lay in again["layers"].items():
        assert lay["row_norms"] == out["layers"][l]["row_norms"] and lay["usage"] == out["layers"][l]["usage"] and lay["rows_changed"] == 0
    r = run("eval", "--state-dict", f, "--tables", small["store"])
    text = " ".join(r.stdout.split())  # long temp paths wrap the report's lines
    assert r.exit_code == 0 and "usage from the store's hit counts" in text and "bit-exact vs torch reference True" in text
