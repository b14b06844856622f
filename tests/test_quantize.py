"""`engram quantize`, `engram prune` and the gate `engram eval --variants`: formats, every backend bit-exact, refusals (one trained fixture)."""

from __future__ import annotations

import json
import os
import shutil

import torch

if not torch.cuda.is_available():  # the triton backend runs on CPU tensors: set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cli_checks import FIXTURES, one_error_line  # noqa: E402

import engram_cli.evaluate as evaluate  # noqa: E402
import engram_cli.variants as variants  # noqa: E402
from engram_cli.cli import app  # noqa: E402
from engram_cli.int_rows import IntRowError, dequantize_int_rows, int_rows_problem, quantize_int_rows  # noqa: E402
from engram_cli.kernels import EngramLookup, available_backends  # noqa: E402
from engram_cli.kernels.dequant import int_dequant_torch  # noqa: E402
from engram_cli.store import TableStore  # noqa: E402

runner = CliRunner()
# 2 heads of 32 values (int rows need multiples of 32), one layer, a 2 MiB table: 16 KiB chunks so shards and chunks are many
TINY = ["--budget", "2MiB", "--layers", "1", "--heads", "2", "--dim", "64", "--shard-size", "64KiB", "--chunk-size", "16KiB"]
DTYPES = ("bfloat16", "float8_e4m3", "int8", "int4")


def run(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, deepseek_vocab_file):
    """A tiny store trained 3 steps, and its quantized and pruned copies (each written once)."""
    root = tmp_path_factory.mktemp("quantize")
    (root / "corpus").mkdir()
    (root / "corpus" / "faq.txt").write_bytes((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_bytes()[:40000])
    r = run("build-table", root / "corpus", "-o", root / "tables.zarr", *TINY, "--vocab", deepseek_vocab_file)
    assert r.exit_code == 0, r.output
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "m.ckpt", "--steps", "3", "--split", "segment",
            "--heldout-fraction", "0.15", "--json")
    assert r.exit_code == 0, r.output
    out = {}
    for d in DTYPES:
        r = run("quantize", root / "m.tables.zarr", "--dtype", d, "-o", root / f"{d}.zarr", "--json")
        assert r.exit_code == 0, r.output
        out[d] = json.loads(r.stdout)
    r = run("prune", root / "m.tables.zarr", "--keep-top", "0.1", "--train-stats", root / "m.train-stats", "-o", root / "p10.zarr", "--json")
    assert r.exit_code == 0, r.output
    out["prune"] = json.loads(r.stdout)
    r = run("prune", root / "m.tables.zarr", "--keep-top", "0.5", "--by", "change", "--initial", root / "tables.zarr", "--dtype", "int4",
            "-o", root / "p50_int4.zarr", "--json")
    assert r.exit_code == 0, r.output
    out["prune_int4"] = json.loads(r.stdout)
    return root, out


# -- the int8 / int4 row format -------------------------------------------------------------
@pytest.mark.parametrize("kind, bound", [("int8", 1 / 254), ("int4", 1 / 14)])
def test_int_rows_error_bound_zero_blocks_and_torch_dequant(kind, bound):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 64)) * rng.choice([1e-6, 0.02, 3.0, 1e6], size=(64, 1))).astype(np.float32)
    x[3, :32] = 0  # an all-zero block: scale 0, reads back as zeros
    packed = quantize_int_rows(x, kind)
    assert packed.shape == (64, (64 if kind == "int8" else 32) + 4) and int_rows_problem(packed, 64, kind) is None
    back = dequantize_int_rows(packed, kind)
    amax = np.abs(x.reshape(64, 2, 32)).max(2, keepdims=True)
    assert (np.abs(back - x).reshape(64, 2, 32) <= amax * bound * (1 + 2**-7)).all()  # half a step of amax / QMAX, scale rounded up
    assert (back[3, :32] == 0).all()
    # any bytes with valid scales: torch's dequantization is the numpy one, bit for bit
    rand = rng.integers(0, 256, size=packed.shape, dtype=np.uint8)
    rand[:, -4:] = packed[:, -4:]
    want = dequantize_int_rows(rand, kind)
    got = int_dequant_torch(torch.from_numpy(rand), 64, kind).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_int_rows_refuse_what_a_store_must_not_hold():
    x = np.zeros((4, 32), np.float32)
    x[2, 7] = np.nan
    with pytest.raises(IntRowError, match="row 2 holds nan at column 7"):
        quantize_int_rows(x, "int4")
    packed = quantize_int_rows(np.ones((2, 32), np.float32), "int8")
    packed[1, -2:] = [0x80, 0x7F]  # scale word 0x7F80: inf
    assert "row 1 has scale word 0x7F80" in str(int_rows_problem(packed, 32, "int8"))


# -- stores: every backend reads every variant bit-exactly ------------------------------------
def reference_rows(store: TableStore, rows: torch.Tensor) -> torch.Tensor:
    """The numpy dequantization of the stored rows (TableStore.read_rows), float32 (N, head_dim)."""
    return torch.from_numpy(np.ascontiguousarray(store.read_rows(1, rows.reshape(-1).numpy()), dtype=np.float32))


@pytest.mark.parametrize("name", [*DTYPES, "p10", "p50_int4"])
def test_every_backend_reads_every_variant_bit_exactly(trained, name):
    root, _ = trained
    store = TableStore.open(root / f"{name}.zarr")
    ids = torch.as_tensor(np.random.default_rng(1).integers(0, 5000, size=(2, 16)))
    want = None
    lookups = {b: EngramLookup.from_store(store, 1, backend=b) for b in available_backends("cpu")}
    lookups["chunk cache"] = EngramLookup.from_store(store, 1, backend="cpu", max_resident_bytes=1 << 15)
    lookups["hot cache"] = EngramLookup.from_store(store, 1, backend="cpu", cache_rows=500)
    assert "triton" in lookups or torch.cuda.is_available()
    for b, lk in lookups.items():
        got = lk(ids, dtype=torch.float32).cpu().reshape(-1, store.head_dim)
        if want is None:
            want = reference_rows(store, lk.row_ids(ids).cpu())
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), b
    if store.pruned:  # dropped rows read as +0.0; kept rows as in the source
        src = TableStore.open(root / "m.tables.zarr")
        kept = store.kept_rows(1)
        full = store.read_rows(1, np.arange(store.plan.layer_rows(1)))
        assert not np.delete(full, kept, 0).view(np.uint32).any()
        if store.dtype == src.dtype:
            assert np.array_equal(full[kept], src.read_rows(1, kept))


def test_sizes_and_what_the_stores_record(trained):
    root, out = trained
    src = out["int8"]["source"]
    assert src["bytes_per_row"] == 128  # float32, head_dim 32
    assert {d: out[d]["output"]["bytes_per_row"] for d in DTYPES} == {"bfloat16": 64, "float8_e4m3": 33, "int8": 34, "int4": 18}
    p = out["prune"]["output"]
    rows = src["rows"]
    assert p["rows_stored"] == -(-rows // 10) and p["table_bytes"] == p["rows_stored"] * (128 + 8)
    assert p["table_bytes_on_disk"] < 0.2 * src["table_bytes_on_disk"]
    assert out["prune_int4"]["output"]["rows_stored"] == -(-rows // 2) and out["prune_int4"]["output"]["bytes_per_row"] == 18
    source = TableStore.open(root / "m.tables.zarr")  # hard-linked into every copy, never modified
    assert source.dtype == "float32" and "derived" not in source.attrs and source.pruned is None
    s = TableStore.open(root / "p10.zarr")
    assert s.attrs["derived"]["from_plan_fingerprint"] == source.plan.fingerprint and s.plan.fingerprint == source.plan.fingerprint
    assert s.attrs["format"] == "engram-tables/2" and s.pruned["kept_by"] == "training-split hits" and s.pruned["fallback"] == "zeros"
    assert TableStore.open(root / "bfloat16.zarr").attrs["format"] == "engram-tables/1"
    # kept by training-split hits: every kept row was hit in training at least as often as any dropped row
    with np.load(root / "m.train-stats" / "rows.npz") as z:
        hits = np.zeros(rows, np.int64)
        hits[z["rows_1"]] = z["hits_1"]
    kept = s.kept_rows(1)
    assert hits[kept].min() >= np.delete(hits, kept).max()
    with pytest.raises(Exception, match="is pruned"):
        TableStore.open(root / "p10.zarr", mode="r+").write_rows(1, [kept[0]], np.zeros((1, 32), np.float32))


def test_non_finite_rows_are_refused_with_the_row_named(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "m.tables.zarr", tmp_path / "nan.zarr")
    bad = np.full((1, 32), 0.5, np.float32)
    bad[0, 3] = np.inf
    TableStore.open(tmp_path / "nan.zarr", mode="r+").write_rows(1, [123], bad)  # float32 stores hold what they are given
    for d in ("int4", "bfloat16"):
        r = run("quantize", tmp_path / "nan.zarr", "--dtype", d, "-o", tmp_path / "out.zarr")
        assert r.exit_code == 2 and "layer 1 row 123" in one_error_line(r) and "holds inf at column 3" in one_error_line(r)
        assert not (tmp_path / "out.zarr").exists()
    with pytest.raises(Exception, match="layer 1 row 77 .* holds nan"):
        TableStore.open(root / "int8.zarr", mode="r+").write_rows(1, [77], np.full((1, 32), np.nan, np.float32))
    for args, want in [(["--dtype", "int3"], "unknown --dtype 'int3'"), (["--dtype", "int8", "-o", root / "int8.zarr"], "exists")]:
        r = run("quantize", root / "m.tables.zarr", *args, *([] if "-o" in args else ["-o", tmp_path / "x.zarr"]))
        assert r.exit_code == 2 and want in one_error_line(r), r.output
    r = run("prune", root / "m.tables.zarr", "--keep-top", "0.5", "--min-hits", "2", "-o", tmp_path / "y.zarr")
    assert r.exit_code == 2 and "exactly one of --keep-top F and --min-hits N" in one_error_line(r)
    r = run("prune", root / "m.tables.zarr", "--keep-top", "0.5", "--by", "change", "-o", tmp_path / "y.zarr")
    assert r.exit_code == 2 and "--initial" in one_error_line(r)


# -- the gate -----------------------------------------------------------------------------------
def test_gate_table_and_eval_with_smaller_tables(trained, monkeypatch, tmp_path):
    root, _ = trained
    monkeypatch.setattr(variants, "LOOKUP_BENCH_WINDOWS", 1)  # one held-out window per timed lookup (the interpreter is slow)
    monkeypatch.setattr(evaluate, "LOOKUP_REPS", 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton's parity is checked above; interpreted it would take most of this test
    plot = tmp_path / "gate.png"
    r = run("eval", root / "m.ckpt", "--variants", "fp32,int4,prune:0.1", "--json", "--plot", plot)
    assert r.exit_code == 0, r.output
    g = json.loads(r.stdout)
    rows = {v["variant"]: v for v in g["variants"]}
    assert list(rows) == ["trained", "fp32", "int4", "prune:0.1"] and g["prune_by"] == "training-split hits"
    assert rows["fp32"]["loss_change"] == 0 and rows["fp32"]["loss_change_interval"] == [0, 0]  # the trained store itself
    for v in rows.values():
        assert v["lookups"]["torch_matches_reference"] and all(b["bit_exact"] for b in v["lookups"]["backends"].values())
        assert v["loss_interval"][0] <= v["loss"] <= v["loss_interval"][1]
    assert rows["int4"]["table_bytes"] * 6 < rows["trained"]["table_bytes"] and rows["prune:0.1"]["rows_stored"] * 9 < rows["trained"]["rows_stored"]
    assert plot.stat().st_size > 0 or not r.output
    # eval --tables takes a quantized or pruned copy (same plan but for its dtype) in place of the trained store
    ckpt = evaluate.load_checkpoint(root / "m.ckpt")
    for name in ("int4", "p10"):
        _, store, *_ = evaluate.load_model(ckpt, str(root / f"{name}.zarr"))
        assert store.path == root / f"{name}.zarr"
    norms = evaluate.row_norms(TableStore.open(root / "p10.zarr"), 1, np.asarray(ckpt["extra"]["touched_rows"]["1"], dtype=np.int64))
    assert norms["trained"]["rows"] + (norms["untouched"] or {"rows": 0})["rows"] == TableStore.open(root / "p10.zarr").stored_rows(1)
    r = run("eval", root / "m.ckpt", "--variants", "int5")
    assert r.exit_code == 2 and "unknown variant 'int5'" in one_error_line(r)


@pytest.mark.parametrize("name", ["int8", "int4", "p10"])
def test_export_import_carry_int_rows_and_pruned_tables(trained, tmp_path, name):
    """int rows round-trip bit-exactly in both formats (the reference format's float32 rows keep their scales);
    a pruned store exports the plan's whole table, dropped rows zero."""
    root, _ = trained
    src = TableStore.open(root / f"{name}.zarr")
    rows = np.arange(src.plan.layer_rows(1))
    for fmt in ("safetensors", "reference"):
        r = run("export", root / f"{name}.zarr", "--format", fmt, "-o", tmp_path / f"t.{fmt}", "--json")
        assert r.exit_code == 0, r.output
        plan_from = root / (f"{name}.zarr" if src.pruned is None else "m.tables.zarr")
        r = run("import", tmp_path / f"t.{fmt}", "--plan-from", plan_from, "-o", tmp_path / f"{fmt}.zarr", "--json")
        assert r.exit_code == 0, r.output
        new = TableStore.open(tmp_path / f"{fmt}.zarr")
        a, b = src.read_rows(1, rows, as_stored=src.pruned is None), new.read_rows(1, rows, as_stored=src.pruned is None)
        assert new.dtype == src.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), fmt


def test_inspect_names_derivation_and_pruning(trained):
    """`engram inspect` of a pruned copy says where it came from and what it keeps (people and --json);
    a built store says neither."""
    root, out = trained
    r = run("inspect", root / "p10.zarr", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    src = TableStore.open(root / "m.tables.zarr")
    assert rep["derived"]["from"] == str((root / "m.tables.zarr").resolve()) and rep["derived"]["from_dtype"] == "float32"
    (layer,) = rep["pruned"]["layers"]
    assert layer["kept_rows"] == out["prune"]["output"]["rows_stored"] and layer["rows"] == src.plan.layer_rows(1)
    assert rep["pruned"]["fallback"] == "zeros" and rep["pruned"]["kept_by"] == "training-split hits" and rep["pruned"]["keep_top"] == 0.1
    r = run("inspect", root / "p10.zarr")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert f"layer 1 {layer['kept_rows']:,} of {layer['rows']:,}" in text and "every other row reads +0.0" in text and "Derived from" in text
    built = json.loads(run("inspect", root / "tables.zarr", "--json").stdout)
    assert built["derived"] is None and built["pruned"] is None
