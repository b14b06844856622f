"""Tables that move (engram_cli.exchange) and the state-dict audit (engram_cli.statedict_audit).

Real stores built by `engram build-table` with the DeepSeek tokenizer, real files
(safetensors read back by safetensors.safe_open, torch files by torch.load with
weights_only=True), real torch modules. Expected values come from independent routes:
zarr's own reader, torch's float8 and bfloat16 casts, a plain re-implementation of the
reference module, numpy quantiles.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import zarr
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli_checks import copy_fixtures, flip_byte
from engram_cli.cli import app
from engram_cli.errors import CheckpointError, OutputError, StoreError
from engram_cli.exchange import KEY, OFFSETS, SCALE, WEIGHT, export_tables, import_tables, open_tensor_file, table_key
from engram_cli.fp8 import quantize_fp8_rows
from engram_cli.hashing import hash_positions
from engram_cli.store import TableStore

DTYPES = ["float32", "bfloat16", "float8_e4m3"]
FORMATS = ["safetensors", "reference"]
# 2 layers x orders 2..3 x 2 heads, rows of 32 (FP8 needs a multiple of 32); 512-row float32
# chunks and 4 chunks per shard, so export and import cross many chunk and shard borders
STORE_ARGS = ["--layers", "1,3", "--heads", "2", "--dim", "64", "--rows-per-head", "3001,5003", "--chunk-size", "64KiB", "--shard-size", "256KiB"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, deepseek_vocab_file) -> dict[str, Path]:
    """One store per dtype, same corpus and addressing (the plans differ only in dtype); the vocabulary saved once."""
    root = tmp_path_factory.mktemp("exchange")
    corpus = copy_fixtures(root / "corpus")
    out = {}
    for dtype in DTYPES:
        path = root / f"{dtype}.zarr"
        r = CliRunner().invoke(app, ["build-table", str(corpus), "-o", str(path), "--dtype", dtype, *STORE_ARGS, "--vocab", str(deepseek_vocab_file), "--json"])
        assert r.exit_code == 0, r.output
        out[dtype] = path
    out["corpus"], out["vocab"] = corpus, deepseek_vocab_file
    return out


def stored(path: Path, layer: int) -> np.ndarray:
    """A layer's stored rows read by zarr directly (not through TableStore)."""
    return zarr.open_array(str(path / f"layer_{layer}" / "table"), mode="r")[:]


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reference_weight(packed_or_words: np.ndarray, dtype: str, hd: int) -> torch.Tensor:
    """The rows as the reference module holds them, by torch's own casts: bfloat16 words
    reinterpreted, FP8 bytes cast from float8_e4m3fn and scaled by 2**(byte - 127)."""
    if dtype == "bfloat16":
        return torch.from_numpy(packed_or_words.view(np.int16)).view(torch.bfloat16)
    if dtype == "float8_e4m3":
        vals = torch.from_numpy(np.ascontiguousarray(packed_or_words[:, :hd])).view(torch.float8_e4m3fn).float()
        exp = torch.from_numpy(packed_or_words[:, hd:].astype(np.int32) - 127)
        return (vals.view(-1, hd // 32, 32) * torch.pow(2.0, exp.float())[..., None]).view(-1, hd)
    return torch.from_numpy(packed_or_words)


# -- export -> import ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_export_import_round_trips_bit_exactly(stores, tmp_path, dtype, fmt):
    src = stores[dtype]
    f = tmp_path / ("t.safetensors" if fmt == "safetensors" else "t.pt")
    export_tables(src, f, fmt)
    before = snapshot(src)
    result = import_tables(f, src, tmp_path / "new.zarr")
    assert snapshot(src) == before  # the plan's store is hard-linked from, never written
    assert result["fingerprint_checked"] and result["layers"] == [1, 3]
    for layer in (1, 3):
        a, b = stored(src, layer), stored(tmp_path / "new.zarr", layer)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"layer {layer}: first differing row {np.argwhere((a != b).any(axis=1))[:1]}"
        new = TableStore.open(tmp_path / "new.zarr")
        assert np.array_equal(new.hits(layer)[:], TableStore.open(src).hits(layer)[:])  # the plan's store's hit counts kept
    assert TableStore.open(tmp_path / "new.zarr").modified[-1]["by"] == "imported"


def test_fp8_reference_round_trip_needs_the_exported_scales(stores):
    """Requantizing the dequantized rows by the spec's quantizer alone changes some scale
    bytes (blocks whose maximum rounds to 224): the import keeps the exported ones."""
    packed = stored(stores["float8_e4m3"], 1)
    hd = packed.shape[1] * 32 // 33
    again = quantize_fp8_rows(reference_weight(packed, "float8_e4m3", hd).numpy())
    assert not np.array_equal(again, packed)  # so the round-trip test above can fail


def test_safetensors_file_has_the_documented_names(stores, tmp_path):
    for dtype, code in (("float32", "F32"), ("bfloat16", "BF16"), ("float8_e4m3", "F8_E4M3")):
        store = TableStore.open(stores[dtype])
        plan = store.plan
        f = export_tables(stores[dtype], tmp_path / f"{dtype}.safetensors", "safetensors").path
        with safe_open(f, framework="pt") as h:
            names = {table_key(l, n) for l in plan.layer_ids for n in (WEIGHT, OFFSETS)}
            if dtype == "float8_e4m3":
                names |= {table_key(l, SCALE) for l in plan.layer_ids}
            assert set(h.keys()) == names
            meta = h.metadata()
            assert meta["plan_fingerprint"] == plan.fingerprint and meta["format"] == "engram-tables/1" and meta["dtype"] == dtype
            assert json.loads(meta["plan"])["fingerprint"] == plan.fingerprint
            for l in plan.layer_ids:
                raw = stored(stores[dtype], l)
                w = h.get_slice(KEY.format(l))
                assert w.get_dtype() == code and tuple(w.get_shape()) == (plan.layer_rows(l), plan.head_dim)
                # offsets: each head's first row, an exclusive prefix sum of the primes
                primes = [p for order in plan.primes[l] for p in order]
                assert h.get_tensor(table_key(l, OFFSETS)).tolist() == [sum(primes[:i]) for i in range(len(primes))]
                weight = h.get_tensor(KEY.format(l))
                if dtype == "float8_e4m3":
                    assert np.array_equal(weight.view(torch.uint8).numpy(), raw[:, : plan.head_dim])
                    assert np.array_equal(h.get_tensor(table_key(l, SCALE)).numpy(), raw[:, plan.head_dim :])
                else:
                    assert torch.equal(weight, reference_weight(raw, dtype, plan.head_dim))
        # the header is what the format says: 8-byte little-endian length, JSON, then the data
        blob = Path(f).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + n])
        assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(blob) - 8 - n


class MultiHeadEmbedding(nn.Module):
    """The reference demo's MultiHeadEmbedding, written out plainly (list_of_N = head primes)."""

    def __init__(self, list_of_N, D):
        super().__init__()
        offsets = [0]
        for n in list_of_N[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.embedding = nn.Embedding(num_embeddings=sum(list_of_N), embedding_dim=D)

    def forward(self, input_ids):
        return self.embedding(input_ids + self.offsets)


class EngramTable(nn.Module):
    """The table part of the reference `Engram` module (same attribute names)."""

    def __init__(self, list_of_N, D):
        super().__init__()
        self.multi_head_embedding = MultiHeadEmbedding(list_of_N, D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_file_loads_into_the_reference_module(stores, tmp_path, dtype, deepseek_tokenizer):
    store = TableStore.open(stores[dtype])
    plan, vocab = store.plan, store.vocab
    f = export_tables(stores[dtype], tmp_path / "t.pt", "reference").path
    assert zipfile.ZipFile(f).testzip() is None  # every record's CRC-32 matches its bytes
    sd = torch.load(f, weights_only=True)
    assert json.loads(sd.pop("engram_metadata").numpy().tobytes())["plan_fingerprint"] == plan.fingerprint
    tf = open_tensor_file(f)  # the import reads rows at their offsets in the zip, not through a mapping
    blob = Path(f).read_bytes()
    for name, t in sd.items():
        raw = blob[tf.offset(name) : tf.offset(name) + t.numel() * t.element_size()]
        assert raw == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() and torch.equal(tf.rows(name, 0, t.shape[0]), t)
    text = (stores["corpus"] / "debian-policy" / "index.rst").read_text()[:2000]
    ids = np.asarray(deepseek_tokenizer.tokenizer.encode(text).ids, dtype=np.int64)[None]
    for l in plan.layer_ids:
        primes = [p for order in plan.primes[l] for p in order]
        part = {k.removeprefix(f"layers.{l}."): v for k, v in sd.items() if k.startswith(f"layers.{l}.") and not k.endswith(SCALE)}
        module = EngramTable(primes, plan.head_dim).to(part[WEIGHT].dtype)
        module.load_state_dict(part, strict=True)
        hashes = torch.from_numpy(hash_positions(plan, l, vocab.lookup[ids]))  # per-head hashes, as the reference feeds them
        got = module.multi_head_embedding(hashes)  # (1, T, heads, head_dim)
        want = reference_weight(stored(stores[dtype], l), dtype, plan.head_dim)[hashes + torch.tensor(plan.row_offsets(l))]
        assert torch.equal(got, want)
        if dtype == "float8_e4m3":
            assert got.dtype == torch.float32 and np.array_equal(sd[table_key(l, SCALE)].numpy(), stored(stores[dtype], l)[:, plan.head_dim :])


def test_import_of_rows_trained_elsewhere(stores, tmp_path):
    """A plain state dict (no metadata, our model's key names) of changed rows comes in as is;
    float32 rows into a bfloat16 plan are rounded as the store rounds (torch's cast)."""
    plan = TableStore.open(stores["float32"]).plan
    rows = {l: reference_weight(stored(stores["float32"], l), "float32", plan.head_dim) * 2 + 1 for l in plan.layer_ids}
    save_file({f"blocks.{l}.engram.{WEIGHT}": w for l, w in rows.items()}, str(tmp_path / "mod.safetensors"))
    r = import_tables(tmp_path / "mod.safetensors", stores["float32"], tmp_path / "a.zarr")
    assert not r["fingerprint_checked"] and r["converted_layers"] == []
    r = import_tables(tmp_path / "mod.safetensors", stores["bfloat16"], tmp_path / "b.zarr")
    assert r["converted_layers"] == [1, 3]
    for l, w in rows.items():
        assert np.array_equal(stored(tmp_path / "a.zarr", l), w.numpy())
        assert np.array_equal(stored(tmp_path / "b.zarr", l), w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


# -- refusals ---------------------------------------------------------------------------------
class Unsafe:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""


def bad_files(stores, tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the one-line refusal must hold), against the float32 store."""
    plan = TableStore.open(stores["float32"]).plan
    good = export_tables(stores["float32"], tmp_path / "good.safetensors", "safetensors").path
    good_pt = export_tables(stores["float32"], tmp_path / "good.pt", "reference").path
    w = {l: torch.zeros(plan.layer_rows(l), plan.head_dim) for l in plan.layer_ids}
    out = {}
    torch.save({KEY.format(1): w[1], "step": Unsafe()}, tmp_path / "unsafe.pt")
    out["unsafe"] = (tmp_path / "unsafe.pt", "arbitrary objects")
    import pickle

    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": Unsafe()}, protocol=2))
    out["pickle"] = (tmp_path / "raw.pkl", "arbitrary objects")
    blob = Path(good).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(blob[: len(blob) - 100])
    out["truncated safetensors"] = (tmp_path / "trunc.safetensors", "truncated or corrupt")
    blob = Path(good_pt).read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    out["truncated pt"] = (tmp_path / "trunc.pt", "truncated or corrupt")
    (tmp_path / "corrupt.safetensors").write_bytes(Path(good).read_bytes())
    flip_byte(tmp_path / "corrupt.safetensors", 20)  # inside the JSON header
    out["corrupt header"] = (tmp_path / "corrupt.safetensors", "corrupt")
    (tmp_path / "junk.bin").write_bytes(b"not a tensor file at all")
    out["junk"] = (tmp_path / "junk.bin", "neither a safetensors file nor a torch zip file")
    save_file({KEY.format(1): w[1]}, str(tmp_path / "one_layer.safetensors"))
    out["missing layer"] = (tmp_path / "one_layer.safetensors", "no table for layer(s) [3]")
    save_file({KEY.format(l): t[:-1].contiguous() for l, t in w.items()}, str(tmp_path / "short.safetensors"))
    out["shape"] = (tmp_path / "short.safetensors", "has shape")
    save_file({**{KEY.format(l): t for l, t in w.items()}, table_key(1, OFFSETS): torch.arange(4)}, str(tmp_path / "offsets.safetensors"))
    out["offsets"] = (tmp_path / "offsets.safetensors", "head offsets")
    save_file({KEY.format(l): t.half() for l, t in w.items()}, str(tmp_path / "f16.safetensors"))
    out["dtype"] = (tmp_path / "f16.safetensors", "rows are float16")
    save_file({**{KEY.format(l): t for l, t in w.items()}, KEY.format(7): w[1].clone()}, str(tmp_path / "extra.safetensors"))
    out["extra layer"] = (tmp_path / "extra.safetensors", "layer 7")
    out["fingerprint"] = (export_tables(stores["bfloat16"], tmp_path / "bf16.safetensors", "safetensors").path, "fingerprint")
    out["missing file"] = (tmp_path / "nothing.safetensors", "does not exist")
    return out


def test_import_refusals(stores, tmp_path):
    for name, (f, words) in bad_files(stores, tmp_path).items():
        with pytest.raises(CheckpointError, match=re.escape(words)):
            import_tables(f, stores["float32"], tmp_path / f"{name}.zarr")
        assert not (tmp_path / f"{name}.zarr").exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]  # no staging, no lock left


def test_output_refusals(stores, tmp_path):
    f = export_tables(stores["float32"], tmp_path / "t.safetensors").path
    with pytest.raises(OutputError, match="already exists"):
        export_tables(stores["float32"], f)
    export_tables(stores["float32"], f, force=True)
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("not a store")
    with pytest.raises(OutputError, match="not an engram table store"):
        import_tables(f, stores["float32"], tmp_path / "mine.zarr", force=True)
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "not a store"
    (tmp_path / "new.zarr.partial").mkdir()  # a staging directory that is not ours
    (tmp_path / "new.zarr.partial" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not an engram staging directory"):
        import_tables(f, stores["float32"], tmp_path / "new.zarr")
    assert (tmp_path / "new.zarr.partial" / "keep.txt").read_text() == "mine" and not (tmp_path / "new.zarr").exists()
    with pytest.raises(OutputError, match="is the table store"):  # the plan's store itself
        import_tables(f, stores["float32"], stores["float32"], force=True)
    with pytest.raises(OutputError, match="lies inside the table store"):
        export_tables(stores["float32"], stores["float32"] / "t.safetensors")
    with pytest.raises(StoreError, match="does not exist"):
        export_tables(tmp_path / "missing.zarr", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# -- the state-dict audit -----------------------------------------------------------------------
def test_norm_histogram_quantiles_match_numpy():
    from engram_cli.statedict_audit import HIST_BINS_PER_DECADE, NormHistogram

    rng = np.random.default_rng(3)
    norms = np.concatenate([np.zeros(50), rng.lognormal(-2, 1.5, 20_000)])
    h = NormHistogram()
    for part in np.array_split(rng.permutation(norms), 7):
        h.add(part)
    s = h.summary()
    tol = 10 ** (1 / HIST_BINS_PER_DECADE)
    for q, key in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
        exact = np.quantile(norms, q, method="lower")
        assert exact / tol <= s[key] <= exact * tol, (key, s[key], exact)
    assert s["zero_rows"] == 50 and s["min"] == 0 and s["max"] == norms.max() and np.isclose(s["mean"], norms.mean())


def model_state_dict(store: TableStore, changes) -> tuple[dict, dict]:
    """Our reference model's Engram modules (real torch modules) and the store's rows, some changed;
    returns the state dict (prefix blocks.<layer>.engram.) and each layer's changed rows."""
    from engram_cli.model import EngramGPT, ModelConfig

    model = EngramGPT(ModelConfig.for_plan(store.plan, d_model=32, n_layer=4, n_head=4, vocab_size=64, block_size=64))
    sd, changed = {}, {}
    for i, engram in model.engrams().items():  # i: the plan's layer id (the block it sits in follows the depth)
        w = reference_weight(stored(store.path, i), store.dtype, store.head_dim).clone()
        zero, bump = changes(w.shape[0])
        w[zero] = 0
        w[bump] += 1
        sd.update({f"blocks.{i}.engram.{k}": v for k, v in engram.state_dict().items()})
        sd[f"blocks.{i}.engram.{WEIGHT}"] = w  # the table is not a parameter of our module: the reference names it so
        changed[i] = (np.asarray(zero), np.asarray(bump))
    return sd, changed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_audit_against_its_store(stores, tmp_path, dtype, deepseek_tokenizer):
    from engram_cli.kernels import EngramLookup
    from engram_cli.statedict_audit import audit_state_dict
    from engram_cli.split import read_split

    store = TableStore.open(stores[dtype])
    plan = store.plan
    sd, changed = model_state_dict(store, lambda n: (np.arange(0, n, 97), np.setdiff1d(np.arange(5, n, 89), np.arange(0, n, 97))))
    torch.save(sd, tmp_path / "sd.pt")
    report = audit_state_dict(tmp_path / "sd.pt", stores[dtype], corpus=stores["corpus"])
    assert report["text"]["source"] == "corpus" and report["layers_missing"] == []
    _, held = read_split(stores["corpus"], deepseek_tokenizer, share=1.0, max_train=0, max_heldout=report["text"]["tokens"])
    for l in plan.layer_ids:
        lay = report["layers"][str(l)]
        zero, bump = changed[l]
        w = sd[f"blocks.{l}.engram.{WEIGHT}"].float()
        norms = w.norm(dim=1).numpy()
        assert lay["rows_changed"] == len(np.union1d(zero, bump))
        assert lay["row_norms"]["zero_rows"] == int((norms == 0).sum()) == len(zero)
        assert lay["module"] == {"hidden_size": 32, "hc_mult": 1, "conv_kernel": 4, "tensors": len([k for k in sd if k.startswith(f"blocks.{l}.")])}
        # usage, by the torch reference hash (not the cpu path the audit uses)
        rows = EngramLookup(plan, store.vocab, l, backend="torch").row_ids(torch.as_tensor(held[None])).numpy().ravel()
        u = lay["usage"]
        assert u["lookups"] == rows.size and u["rows_touched"] == np.unique(rows).size
        assert u["lookups_on_zero_rows"] == pytest.approx(np.isin(rows, zero).mean())
        assert u["lookups_on_unchanged_rows"] == pytest.approx(1 - np.isin(rows, np.union1d(zero, bump)).mean())
        assert all(p["bit_exact"] for p in lay["parity"].values()) and {"torch", "cpu", "offload"} <= set(lay["parity"])
        assert all(b["bit_exact"] for b in lay["lookups"]["backends"].values())
    # without --corpus: the store's hit counts are the text
    report = audit_state_dict(tmp_path / "sd.pt", stores[dtype])
    for l in plan.layer_ids:
        hits = np.asarray(store.hits(l)[:], dtype=np.int64)
        zero, bump = changed[l]
        u = report["layers"][str(l)]["usage"]
        assert u["lookups"] == hits.sum() and u["rows_touched"] == (hits > 0).sum()
        assert u["lookups_on_zero_rows"] == pytest.approx(hits[zero].sum() / hits.sum())


def test_state_dict_audit_refusals(stores, tmp_path):
    from engram_cli.statedict_audit import audit_state_dict

    store = TableStore.open(stores["float32"])
    sd, _ = model_state_dict(store, lambda n: ([], []))
    bad = dict(sd)
    bad["blocks.1.engram.value_proj.weight"] = torch.zeros(32, 7)
    torch.save(bad, tmp_path / "proj.pt")
    with pytest.raises(CheckpointError, match="value_proj.weight has shape"):
        audit_state_dict(tmp_path / "proj.pt", stores["float32"])
    torch.save({k: v for k, v in sd.items() if WEIGHT not in k}, tmp_path / "notable.pt")
    with pytest.raises(CheckpointError, match="holds no Engram table"):
        audit_state_dict(tmp_path / "notable.pt", stores["float32"])
    f8 = export_tables(stores["float8_e4m3"], tmp_path / "f8.safetensors").path
    with pytest.raises(CheckpointError, match="float8_e4m3"):
        audit_state_dict(f8, stores["float8_e4m3"])
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="has shape"):  # a state dict for another plan
        audit_state_dict(tmp_path / "sd.pt", _other_plan_store(stores, tmp_path))
    with pytest.raises(StoreError, match="does not exist"):
        audit_state_dict(tmp_path / "sd.pt", tmp_path / "missing.zarr")


def _other_plan_store(stores, tmp_path) -> Path:
    """A store of the same layers with other head sizes (another plan)."""
    out = tmp_path / "other.zarr"
    args = [a if a != "3001,5003" else "2003,4001" for a in STORE_ARGS]
    r = CliRunner().invoke(app, ["build-table", str(stores["corpus"]), "-o", str(out), *args, "--vocab", str(stores["vocab"]), "--json"])
    assert r.exit_code == 0, r.output
    return out
