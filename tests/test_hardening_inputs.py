"""Inputs that are refused (issue 8, items 2 and 4, the reader side): one line, exit 2, nothing written.

Every broken input here is made by damaging a real store or file built from fixtures/
(a store by `engram build-table`, a vocabulary by `engram compress-vocab`), then the
real CLI is run on it. Figures a message must name (the largest id in the statistics,
the escaped form of a path) are computed here by another route (polars, Python's own
`backslashreplace`), never copied from the code under test.

Checked elsewhere, not repeated here: a FIFO or device named as corpus, deeply nested
JSON lines (library level) and the --vocab header size check (tests/test_bounded_memory.py);
a missing or foreign root `zarr.json`, a wrong format, an incomplete flag, a tampered
plan fingerprint (tests/test_store.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.errors import StoreError
from engram_cli.ngrams import NgramStats, order_file, token_columns
from engram_cli.store.table_store import TableStore

from cli_checks import SMALL_STORE_ARGS, build_small_store, copy_fixtures, flip_byte, one_error_line

ENGRAM = [sys.executable, "-m", "engram_cli.cli"]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_small_store(tmp_path_factory.mktemp("hardening_inputs"))


@pytest.fixture(scope="module")
def vocab_npz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening_vocab") / "vocab.npz"
    assert invoke("compress-vocab", "-o", out).exit_code == 0
    return out


def copy_store(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(built, dst)
    return dst


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under root: a refused command must leave it as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def refused(store: Path, *commands: str) -> list[str]:
    """Run each read command on `store`: one error line each, the store untouched; returns the lines."""
    before = snapshot(store)
    lines = []
    for command in commands:
        lines.append(one_error_line(invoke(command, store, "--json")))
        assert snapshot(store) == before
    return lines


def root_attrs(store: Path) -> tuple[dict, dict]:
    meta = json.loads((store / "zarr.json").read_text())
    return meta, meta["attributes"]["engram"]


def write_plan(store: Path, plan) -> None:
    """Store `plan` (its fingerprint recomputed by to_dict) as the store's plan: a forged but self-signed plan."""
    meta, attrs = root_attrs(store)
    attrs["plan"] = plan.to_dict()
    (store / "zarr.json").write_text(json.dumps(meta))


# -- item 2: readers check the layout they rely on ---------------------------------------------------
def array_metadata(store: Path) -> list[str]:
    """Every array's and group's zarr.json below the root, found on disk (not from the code's list)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("zarr.json") if p.parent != store)


# The groups and arrays of a store with hits, below the root (docs/store.md).
ARRAY_METADATA = [
    *(f"vocab/{a}/zarr.json" for a in ("key_bytes", "key_offsets", "lookup", "raw_key")),
    "vocab/zarr.json",
    *(f"layer_{n}/{a}zarr.json" for n in (1, 15) for a in ("hits/", "table/", "")),
]


def test_the_store_has_the_arrays_this_file_damages(built):
    assert sorted(array_metadata(built)) == sorted(ARRAY_METADATA)


@pytest.mark.parametrize("rel", ARRAY_METADATA)
def test_missing_zarr_json_of_any_array_is_one_line_naming_it(built, tmp_path, rel):
    store = copy_store(built, tmp_path)
    (store / rel).unlink()
    for line in refused(store, "collisions", "inspect"):
        assert rel in line and "rebuild" in line


def test_missing_shard_or_statistics_file_is_one_line(built, tmp_path):
    store = copy_store(built, tmp_path)
    shard = store / "layer_15" / "table" / "c" / "0" / "0"
    assert shard.is_file()
    shard.unlink()
    for line in refused(store, "collisions", "inspect"):
        assert "layer_15/table/c/0/0" in line
    store = copy_store(built, tmp_path / "b")
    (store / "stats" / "order_3.parquet").unlink()
    for line in refused(store, "collisions", "inspect"):
        assert "stats/order_3.parquet" in line


def test_train_and_eval_paths_refuse_a_store_missing_an_array(built, tmp_path):
    store = copy_store(built, tmp_path)
    (store / "vocab" / "lookup" / "zarr.json").unlink()
    corpus = copy_fixtures(tmp_path / "corpus")
    ckpt = tmp_path / "model.ckpt"
    line = one_error_line(invoke("train", corpus, "--tables", store, "-o", ckpt, "--steps", "1"))
    assert "vocab/lookup/zarr.json" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr", "corpus"]  # no checkpoint, no tables, no staging
    with pytest.raises(StoreError, match="vocab/lookup/zarr.json"):
        TableStore.open(store)  # what eval and the kernels open a checkpoint's tables with


def test_table_shape_other_than_the_plan_is_one_line(built, tmp_path):
    store = copy_store(built, tmp_path)
    meta_path = store / "layer_1" / "table" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    rows = meta["shape"][0]
    meta["shape"][0] = rows - 1
    meta_path.write_text(json.dumps(meta))
    for line in refused(store, "collisions", "inspect"):
        assert f"layer_1/table of shape ({rows - 1}," in line and f"needs ({rows}," in line


# -- item 4: plan attributes that contradict each other ------------------------------------------------
def is_composite(n: int) -> bool:
    return any(n % d == 0 for d in range(2, int(n**0.5) + 1))


def test_a_prime_that_is_not_a_prime(built, tmp_path):
    store = copy_store(built, tmp_path)
    plan = TableStore.open(store).plan
    primes = {k: [list(o) for o in v] for k, v in plan.primes.items()}
    p = primes[1][0][2]
    primes[1][0][2] = p + 2 if is_composite(p + 2) else p + 4  # p is odd: p + 2 or p + 4 is composite for p > 3
    assert is_composite(primes[1][0][2])
    write_plan(store, dataclasses.replace(plan, primes={k: tuple(tuple(o) for o in v) for k, v in primes.items()}))
    for line in refused(store, "collisions", "inspect"):
        assert "primes of layer 1 order 2 head 2" in line and f"{primes[1][0][2]} is not a prime" in line


def test_primes_that_are_not_distinct(built, tmp_path):
    store = copy_store(built, tmp_path)
    plan = TableStore.open(store).plan
    primes = {k: [list(o) for o in v] for k, v in plan.primes.items()}
    primes[15][1][3] = primes[1][1][3]  # another layer's prime: the reference keeps one `seen` set for all
    write_plan(store, dataclasses.replace(plan, primes={k: tuple(tuple(o) for o in v) for k, v in primes.items()}))
    for line in refused(store, "collisions", "inspect"):
        assert "primes of layer 15 order 3 head 3" in line and "not distinct" in line


def test_pad_ids_outside_their_vocabularies(built, tmp_path):
    store = copy_store(built, tmp_path)
    plan = TableStore.open(store).plan
    write_plan(store, dataclasses.replace(plan, compressed_pad_id=plan.compressed_vocab_size))
    for line in refused(store, "collisions", "inspect"):
        assert "compressed_pad_id" in line and f"[0, {plan.compressed_vocab_size})" in line
    vocab_size = json.loads((built / "vocab" / "zarr.json").read_text())["attributes"]["vocab_size"]
    store = copy_store(built, tmp_path / "b")
    write_plan(store, dataclasses.replace(plan, pad_id=vocab_size))
    for line in refused(store, "collisions", "inspect"):
        assert "pad_id" in line and f"{vocab_size} ids" in line


def test_compressed_vocabulary_smaller_than_its_own_vocabulary_or_the_statistics(built, tmp_path):
    store = copy_store(built, tmp_path)
    plan = TableStore.open(store).plan
    write_plan(store, dataclasses.replace(plan, compressed_vocab_size=plan.compressed_vocab_size - 1))
    for line in refused(store, "collisions", "inspect"):
        assert "compressed_vocab_size" in line and f"{plan.compressed_vocab_size} compressed ids" in line
    # The largest id the statistics hold, read by polars from the data pages.
    top = max(
        pl.read_parquet(order_file(built / "stats", n)).select(pl.max_horizontal([pl.col(c).max() for c in token_columns(n)])).item()
        for n in plan.orders
    )
    assert top >= plan.compressed_pad_id  # the forged size below must still hold the pad id
    store = copy_store(built, tmp_path / "b")
    vmeta_path = store / "vocab" / "zarr.json"
    vmeta = json.loads(vmeta_path.read_text())
    vmeta["attributes"]["compressed_size"] = top  # agree with the forged plan: the statistics alone give it away
    vmeta_path.write_text(json.dumps(vmeta))
    write_plan(store, dataclasses.replace(plan, compressed_vocab_size=top))
    for line in refused(store, "collisions", "inspect"):
        assert "compressed_vocab_size" in line and f"is {top}, smaller than compressed id {top}" in line


# -- item 4: statistics parquet truncated, empty, corrupt --------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "footer", "not parquet"])
def test_damaged_statistics_file_is_one_line(built, tmp_path, damage):
    store = copy_store(built, tmp_path)
    path = store / "stats" / "order_2.parquet"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "footer":  # the footer length points before the file's start
        path.write_bytes(data[:-8] + (len(data) * 2).to_bytes(4, "little") + b"PAR1")
    else:
        path.write_text("order,tok_0,tok_1,count\n2,1,2,3\n")
    for line in refused(store, "collisions", "inspect"):
        assert "order_2.parquet" in line and "truncated, empty or corrupt" in line


@pytest.mark.parametrize(
    "summary",
    [[], {"format": "engram-ngram-stats/1"}, {"format": "engram-ngram-stats/1", "orders": [2, 3], "per_order": {"2": {}}}, "{not json"],
)
def test_malformed_statistics_summary_is_one_line(built, tmp_path, summary):
    store = copy_store(built, tmp_path)
    (store / "stats" / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    for line in refused(store, "collisions", "inspect"):
        assert "summary.json" in line


def test_statistics_whose_rows_differ_from_the_summary(built, tmp_path):
    store = copy_store(built, tmp_path)
    path = store / "stats" / "summary.json"
    summary = json.loads(path.read_text())
    summary["per_order"]["3"]["distinct"] += 1
    path.write_text(json.dumps(summary))
    for line in refused(store, "collisions", "inspect"):
        assert "order_3.parquet" in line and "does not match its summary" in line


def test_corrupt_data_page_is_a_store_error_or_reads(built, tmp_path):
    """A flipped byte anywhere in an order file: NgramStats opens and streams it, or says StoreError; nothing else escapes.

    Parquet pages carry no checksum (polars writes none), so some flips change values
    unseen; those that break decoding must be one StoreError, and the CLI one line.
    """
    stats = tmp_path / "stats"
    shutil.copytree(built / "stats", stats)
    path = order_file(stats, 2)
    original = path.read_bytes()
    failed_at = []
    for offset in range(4, len(original) - 8, 37):
        flip_byte(path, offset)
        try:
            s = NgramStats.open(stats)
            for _ in s.iter_batches(2):
                pass
            s.max_id(2)
        except StoreError:
            failed_at.append(offset)
        path.write_bytes(original)
    assert failed_at, "no flipped byte was detected: the sweep tests nothing"
    store = copy_store(built, tmp_path)
    flip_byte(store / "stats" / "order_2.parquet", failed_at[0])
    line = one_error_line(invoke("collisions", store, "--json"))
    assert "order_2.parquet" in line


# -- item 4: the vocabulary -------------------------------------------------------------------------
def tiny_corpus(tmp_path: Path) -> Path:
    return copy_fixtures(tmp_path / "corpus", ["debian-policy/index.rst"])


def build_refused(tmp_path: Path, vocab: Path) -> str:
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke("build-table", tiny_corpus(tmp_path), "-o", out, "--vocab", vocab, *SMALL_STORE_ARGS))
    assert not out.exists() and not (tmp_path / "t.zarr.partial").exists()
    return line


def member_range(npz: Path, name: str) -> tuple[int, int]:
    """Byte range of a member's data in the zip (after its local header)."""
    with zipfile.ZipFile(npz) as z:
        info = z.getinfo(name)
    with open(npz, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + n + m
    return start, start + info.compress_size


@pytest.mark.parametrize("deflated", [False, True])
def test_flipped_byte_in_a_vocab_member_is_one_line(vocab_npz, tmp_path, deflated):
    src = vocab_npz
    if deflated:  # the same arrays, each member deflated (np.savez_compressed)
        src = tmp_path / "deflated.npz"
        with np.load(vocab_npz) as z:
            np.savez_compressed(src, **{k: z[k] for k in z.files})
    start, stop = member_range(src, "lookup.npy")
    # Not the member's last bytes: a flip in deflate's end-of-block code may only add bytes
    # past the member's size, which zipfile cuts off: the content, and its CRC, stay whole.
    for i, offset in enumerate(np.linspace(start, stop - 16, 6).astype(int)):
        bad = tmp_path / f"bad{i}.npz"
        shutil.copy(src, bad)
        flip_byte(bad, int(offset))
        line = build_refused(tmp_path / f"run{i}", bad)
        assert "bad" in line and ("corrupt" in line or "not an engram compressed vocabulary" in line)


def test_truncated_vocab_is_one_line(vocab_npz, tmp_path):
    bad = tmp_path / "cut.npz"
    bad.write_bytes(vocab_npz.read_bytes()[: vocab_npz.stat().st_size // 2])
    assert "cut.npz" in build_refused(tmp_path, bad)


def forged_vocab(vocab_npz: Path, out: Path, change) -> tuple[Path, int]:
    """A copy whose lookup is changed by `change` and whose fingerprint is recomputed (docs/compress-vocab.md recipe)."""
    with np.load(vocab_npz) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["metadata"]))
    lookup = arrays["lookup"].copy()
    change(lookup, meta["compressed_size"])
    h = hashlib.sha256(meta["normalizer"].encode())
    h.update(lookup.astype("<i8").tobytes())
    meta["fingerprint"] = h.hexdigest()
    arrays.update(lookup=lookup, metadata=np.array(json.dumps(meta)))
    np.savez(out, **arrays)
    return out, meta["compressed_size"]


@pytest.mark.parametrize("bad_id", ["size", "negative", "huge"])
def test_out_of_range_ids_in_a_vocab_are_one_line(vocab_npz, tmp_path, bad_id):
    def change(lookup, size):
        lookup[7] = {"size": size, "negative": -1, "huge": 1 << 40}[bad_id]

    bad, size = forged_vocab(vocab_npz, tmp_path / "forged.npz", change)
    line = build_refused(tmp_path, bad)
    assert f"outside [0, {size})" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_or_device_as_vocab_or_tokenizer_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    corpus = tiny_corpus(tmp_path)
    runs = [
        ["build-table", corpus, "-o", tmp_path / "t.zarr", "--vocab", fifo],
        ["compress-vocab", fifo, "-o", tmp_path / "v.npz"],
        ["compress-vocab", "/dev/zero", "-o", tmp_path / "v.npz"],  # would be read without end
    ]
    for args in runs:
        r = subprocess.run([*ENGRAM, *map(str, args)], capture_output=True, text=True, timeout=60)  # a hang fails here
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "not a regular file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "pipe.npz"]


def test_corrupt_vocab_chunk_in_a_store_is_one_line(built, tmp_path):
    """`train` needs the stored vocabulary (collisions only decodes n-grams with it, and shows ids without)."""
    store = copy_store(built, tmp_path)
    chunk = store / "vocab" / "lookup" / "c" / "0"
    assert chunk.is_file()
    flip_byte(chunk, chunk.stat().st_size // 2)
    with pytest.raises(StoreError, match="vocabulary"):
        TableStore.open(store).vocab
    corpus = copy_fixtures(tmp_path / "corpus")
    line = one_error_line(invoke("train", corpus, "--tables", store, "-o", tmp_path / "model.ckpt", "--steps", "1"))
    assert "vocabulary" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr", "corpus"]


def test_deeply_nested_json_line_is_skipped_and_counted_by_the_cli(tmp_path):
    corpus = tiny_corpus(tmp_path)
    (corpus / "records.jsonl").write_text('{"text": "kept"}\n' + "[" * 200_000 + "]" * 200_000 + '\n{"text": "also kept"}\n')
    r = invoke("build-table", corpus, "-o", tmp_path / "t.zarr", *SMALL_STORE_ARGS, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["corpus"]
    assert report["skipped_other"] == {"JSON line nested too deeply": 1}
    assert report["documents"] == 3  # index.rst and the two records


# -- item 4: paths that are not valid UTF-8 in the output ---------------------------------------------
def run_bytes(*args: bytes | str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", **(env_extra or {}))  # a strict stdout: nothing unencodable may reach it
    return subprocess.run([*ENGRAM, *args], capture_output=True, env=env, timeout=300)


def test_non_utf8_paths_in_json_and_rich_output(built, vocab_npz, tmp_path):
    base = os.fsencode(tmp_path)
    odd = os.path.join(base, b"caf\xe9-\xff")  # Latin-1 bytes: not UTF-8
    os.mkdir(odd)
    store = os.path.join(odd, b"tables.zarr")
    shutil.copytree(built, os.fsdecode(store))
    expected = store.decode("utf-8", "backslashreplace")  # Python's own rendering of the bad bytes: \xe9, \xff

    r = run_bytes("inspect", store, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # valid UTF-8 and valid JSON
    assert report["path"] == expected

    r = run_bytes("inspect", store)
    assert r.returncode == 0 and "Traceback" not in r.stderr.decode("utf-8", "replace"), r.stderr
    assert expected in r.stdout.decode("utf-8")

    # A corpus folder with such a name: its bad line is reported with the path, escaped.
    corpus = os.path.join(odd, b"corpus")
    copy_fixtures(Path(os.fsdecode(corpus)), ["debian-policy/index.rst"])
    with open(os.path.join(corpus, b"notes.jsonl"), "wb") as f:
        f.write(b'{"text": "fine"}\nnot json\n')
    r = run_bytes("build-table", corpus, "-o", os.path.join(base, b"t.zarr"), *SMALL_STORE_ARGS, "--vocab", vocab_npz, "--json")
    assert r.returncode == 0, r.stderr
    where = json.loads(r.stdout)["corpus"]["skipped_examples"]["JSON line that does not parse"]
    assert where == os.path.join(corpus, b"notes.jsonl").decode("utf-8", "backslashreplace") + ":2"

    # collisions needs polars, which opens only UTF-8 paths: refused with the reason, not "corrupt".
    r = run_bytes("collisions", store, "--json")
    err = r.stderr.decode("utf-8").strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("Error: ") and "not valid UTF-8" in err[0], err
