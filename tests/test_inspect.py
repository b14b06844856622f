"""engram_cli.inspect on a real small store built from fixtures/ by `engram build-table`.

Hit figures are checked against the whole hits arrays read with plain zarr (sorted,
split by the plan's primes), not against the streamed count-of-counts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from engram_cli.inspect import HitProfile, hit_profiles, inspect_store, verify_store
from engram_cli.errors import StoreError
from engram_cli.store import TableStore

import cli_checks
from cli_checks import build_small_store, flip_byte
from typer.testing import CliRunner

from engram_cli.cli import app

SMALL_FILES = cli_checks.SMALL_FILES


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_small_store(tmp_path_factory.mktemp("inspect"))


@pytest.fixture()
def copy(built, tmp_path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(built, dst)
    return dst


def test_hit_figures_match_the_whole_arrays(built):
    store = TableStore.open(built)
    profiles = hit_profiles(store)
    plan = store.plan
    assert [(p.layer_id, p.order) for p in profiles] == [(layer, n) for layer in plan.layer_ids for n in plan.orders]
    for p in profiles:
        whole = np.asarray(zarr.open_array(str(built / f"layer_{p.layer_id}" / "hits"), mode="r")[:])
        offsets = np.concatenate([[0], np.cumsum([sum(plan.primes[p.layer_id][n - 2]) for n in plan.orders])])
        h = whole[offsets[p.order - 2] : offsets[p.order - 1]]
        d = p.to_dict()
        assert d["rows"] == h.size and d["rows_hit"] == int((h > 0).sum()) and d["rows_never_hit"] == int((h == 0).sum())
        assert d["hits"] == int(h.sum()) and d["max_hits"] == int(h.max())
        desc = np.sort(h)[::-1].astype(np.float64)
        for key, frac in (("top1pct_share", 0.01), ("top10pct_share", 0.10)):
            k = max(1, int(np.ceil(frac * h.size)))
            assert d[key] == pytest.approx(desc[:k].sum() / desc.sum())
        ranks, hits = p.rank_frequency()
        nz = desc[desc > 0]
        assert ranks[-1] == nz.size and hits[0] == nz[0] and hits[-1] == nz[-1]
    # every window of the corpus lands on one row of every head: hits per order = windows x heads
    summary = store.stats.summary
    for p in profiles:
        assert p.total_hits == plan.heads * summary["tokens"]


def test_top_share_small_cases():
    p = HitProfile(1, 2, 0, 200, np.array([0, 1, 5], dtype=np.uint64), np.array([190, 8, 2], dtype=np.int64))
    assert p.total_hits == 18 and p.rows_hit == 10
    assert p.top_share(0.01) == pytest.approx(10 / 18)  # 2 rows of 5
    assert p.top_share(0.10) == pytest.approx(18 / 18)  # 20 rows: all hits


def test_report_carries_build_and_size(built):
    store = TableStore.open(built)
    report = inspect_store(store, hit_profiles(store))
    assert report["plan"]["fingerprint"] == store.plan.fingerprint
    assert report["size"]["in_memory"] == store.plan.total_rows * 16 * 4
    on_disk = sum(f.stat().st_size for f in built.rglob("*") if f.is_file())
    assert report["size"]["on_disk"] == on_disk
    assert report["built"]["corpus"]["files"] == len(SMALL_FILES)
    assert report["built"]["engram_version"] == store.attrs["toolkit_version"]
    assert report["modified"] == {"since_build": False, "records": [], "operations": []}


def test_verify_passes_an_intact_store(built):
    v = verify_store(TableStore.open(built))
    assert v["ok"] and v["checked"] == v["chunks"] and v["first_bad"] is None


def test_verify_finds_a_flipped_byte(copy):
    store = TableStore.open(copy)
    layer = store.layer_ids[-1]
    shard = 1  # the second shard of the last layer: its first chunk is chunk shard_rows // chunk_rows
    flip_byte(store.shard_path(layer, shard), 10)
    v = verify_store(TableStore.open(copy))
    assert not v["ok"]
    bad = v["first_bad"]
    assert (bad["layer_id"], bad["array"], bad["chunk"]) == (layer, "table", store.shard_rows // store.chunk_rows)
    assert bad["rows"][0] == store.shard_rows
    assert Path(copy / bad["shard_file"]) == store.shard_path(layer, shard)
    # every chunk before it was read and found intact: the vocabulary's (read first), then the tables' and hits'
    vocab = store.group["vocab"]
    n_vocab = sum(-(-vocab[a].shape[0] // vocab[a].chunks[0]) for a in ("lookup", "raw_key", "key_bytes", "key_offsets"))
    n_before = n_vocab + sum(-(-store.plan.layer_rows(x) // store.chunk_rows) + 1 for x in store.layer_ids[:-1]) + bad["chunk"]
    assert v["checked"] == n_before


def test_modification_shows(copy):
    store = TableStore.open(copy, mode="r+")
    layer = store.layer_ids[0]
    store.write_rows(layer, np.array([0, 5]), np.ones((2, store.plan.head_dim), dtype=np.float32), by="train")
    report = inspect_store(TableStore.open(copy))
    assert report["modified"]["since_build"] is True
    rec = report["modified"]["records"][-1]
    assert rec["by"] == "train" and rec["rows"] == 2 and rec["layers"] == [layer] and rec["complete"] is True


def test_verify_finds_a_bad_hits_chunk(copy):
    store = TableStore.open(copy)
    layer = store.layer_ids[0]
    hits_file = copy / f"layer_{layer}" / "hits" / "c" / "0"
    flip_byte(hits_file, 10)
    v = verify_store(TableStore.open(copy))
    assert not v["ok"]
    bad = v["first_bad"]
    assert (bad["layer_id"], bad["array"], bad["chunk"]) == (layer, "hits", 0)
    assert copy / bad["shard_file"] == hits_file
    with pytest.raises(StoreError, match="corrupt hits chunk"):
        hit_profiles(TableStore.open(copy))


def test_verify_hashes_the_statistics_files(copy):
    """The n-gram statistics carry no chunk checksum: --verify compares each order file with the size
    and XXH3-128 the build recorded, after every chunk, and names the file that differs."""
    store = TableStore.open(copy)
    intact = verify_store(store)
    assert intact["ok"] and intact["stats_files"] == len(store.stats.orders) >= 1
    victim = copy / "stats" / f"order_{store.stats.orders[-1]}.parquet"
    flip_byte(victim, victim.stat().st_size // 2)
    v = verify_store(TableStore.open(copy))
    bad = v["first_bad"]
    assert not v["ok"] and bad["layer_id"] is None and bad["array"] == f"stats/{victim.name}"
    assert copy / bad["shard_file"] == victim and v["checked"] == v["chunks"] - 1  # everything before it was read and intact


def test_verify_reads_a_pruned_store_and_its_kept_map(tmp_path, copy):
    """A pruned store holds only its kept rows (and a kept-row map): --verify reads those, not the plan's rows,
    and a corrupt map is found by name."""
    out = tmp_path / "pruned.zarr"
    r = CliRunner().invoke(app, ["prune", str(copy), "--keep-top", "0.3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    store = TableStore.open(out)
    v = verify_store(store)
    assert v["ok"] and v["first_bad"] is None, v
    layer = store.layer_ids[0]
    kept_file = out / f"layer_{layer}" / "kept" / "c" / "0"
    flip_byte(kept_file, 10)
    bad = verify_store(TableStore.open(out))["first_bad"]
    assert (bad["layer_id"], bad["array"]) == (layer, "kept") and out / bad["shard_file"] == kept_file
