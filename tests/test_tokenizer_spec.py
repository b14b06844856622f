"""The tokenizer spec carried in the store: a store built with `--tokenizer FILE` trains and
evaluates from another directory after the file has moved; a changed copy is refused.

Also the library's ./vocab.npz rule (`vocab.resolve_vocab`).
"""

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from typer.testing import CliRunner

from cli_checks import FIXTURES, one_error_line

from engram_cli.cli import app
from engram_cli.errors import StoreError, VocabMismatch
from engram_cli.store import TableStore
from engram_cli.store.tokenizer import TOKENIZER_FILE, load_store_tokenizer
from engram_cli.vocab import CompressedVocab, compress_vocab, load_tokenizer, resolve_vocab

# 1 layer, 2 heads x orders 2..3 of 3,001 rows of 16 float32: the smallest plan test_eval's settings allow
TINY = ["--layers", "1", "--heads", "2", "--rows-per-head", "3001", "--dim", "32", "--shard-size", "16KiB", "--chunk-size", "4KiB", "--json"]
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer_path):
    """A store built with `--tokenizer tok/tiny.json` (relative, from root/build), whose tokenizer file then moved away."""
    root = tmp_path_factory.mktemp("tokspec")
    (root / "corpus").mkdir()
    (root / "corpus" / "faq.txt").write_text((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:20_000])
    (root / "build" / "tok").mkdir(parents=True)
    shutil.copy(tiny_tokenizer_path, root / "build" / "tok" / "tiny.json")
    original = (root / "build" / "tok" / "tiny.json").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "build")
        r = run("build-table", root / "corpus", "--tokenizer", "tok/tiny.json", "-o", root / "tables.zarr", *TINY)
    assert r.exit_code == 0, r.output
    (root / "build" / "tok" / "tiny.json").rename(root / "moved.json")  # the original is gone from where the build read it
    return root, original


def test_the_store_records_the_spec_and_holds_a_copy(built):
    root, original = built
    store = TableStore.open(root / "tables.zarr")
    sha = hashlib.sha256(original).hexdigest()
    recorded = dict(store.attrs["tokenizer"])
    identity = recorded.pop("identity")  # --tokenizer-engine auto: fastokens loads the tiny BPE, checked against tokenizers
    assert recorded == {
        "spec": "tok/tiny.json",
        "path": str(root / "build" / "tok" / "tiny.json"),
        "sha256": sha,
        "engine": "fastokens",
        "engine_version": importlib.metadata.version("fastokens"),
        "file": "tokenizer/tokenizer.json",
    }
    assert identity["mismatches"] == 0 and 0 < identity["texts_checked"] <= identity["texts"]
    assert (root / "tables.zarr" / TOKENIZER_FILE).read_bytes() == original
    assert store.attrs["tokenizer_sha256"] == store.vocab.tokenizer_sha256 == sha  # the existing digests are unchanged
    tok = load_store_tokenizer(store)
    assert tok.sha256 == sha and tok.name == "tok/tiny.json" and tok.vocab_size == store.vocab.vocab_size


def test_train_and_eval_use_the_stores_tokenizer_from_another_directory(built, tmp_path, monkeypatch):
    root, _ = built
    monkeypatch.chdir(tmp_path)  # neither the build's directory nor the tokenizer's
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", tmp_path / "mem.ckpt", "--steps", "3", "--split", "segment", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mem.tables.zarr" / TOKENIZER_FILE).is_file()  # the trained store carries the copy too
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", tmp_path / "base.ckpt", "--steps", "3", "--no-engram", "--split", "segment", "--json")
    assert r.exit_code == 0, r.output
    r = run("eval", tmp_path / "mem.ckpt", tmp_path / "base.ckpt", "--json")
    assert r.exit_code == 0, r.output
    reports = json.loads(r.stdout)["checkpoints"]
    assert [x["engram"] for x in reports] == [True, False]
    assert all(x["tokens"] > 0 for x in reports)


def test_a_changed_or_missing_copy_is_refused_in_one_line(built, tmp_path):
    root, _ = built
    store = tmp_path / "copy.zarr"
    shutil.copytree(root / "tables.zarr", store)
    copy = store / TOKENIZER_FILE
    copy.write_bytes(copy.read_bytes() + b" ")  # still a valid tokenizer, another digest
    line = one_error_line(run("train", root / "corpus", "--tables", store, "-o", tmp_path / "m.ckpt", "--steps", "1"))
    assert TOKENIZER_FILE in line and "changed" in line and "build-table --tokenizer" in line
    copy.unlink()
    line = one_error_line(run("train", root / "corpus", "--tables", store, "-o", tmp_path / "m.ckpt", "--steps", "1"))
    assert "lacks tokenizer/tokenizer.json" in line and str(root / "build" / "tok" / "tiny.json") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr"]  # nothing written


def test_packaged_and_unrecorded_tokenizers_load_by_name(deepseek_tokenizer, tiny_tokenizer):
    """`deepseek` is recorded without a copy; a store from before the spec falls back to it, checked by digest."""
    ds = deepseek_tokenizer.sha256
    spec = {"spec": "deepseek", "path": None, "sha256": ds, "engine": "tokenizers", "file": None}
    fake = lambda attrs: SimpleNamespace(path=Path("t.zarr"), attrs=attrs)  # noqa: E731
    assert load_store_tokenizer(fake({"tokenizer_sha256": ds, "tokenizer": spec})).sha256 == ds
    assert load_store_tokenizer(fake({"tokenizer_sha256": ds})).sha256 == ds  # an old store
    with pytest.raises(StoreError, match="built with another tokenizer"):
        load_store_tokenizer(fake({"tokenizer_sha256": tiny_tokenizer.sha256}))
    # the recorded engine does not bind the reader (every engine gives the reference's ids); an unknown one is refused
    assert load_store_tokenizer(fake({"tokenizer_sha256": ds, "tokenizer": dict(spec, engine="fastokens")})).engine == "tokenizers"
    assert load_store_tokenizer(fake({"tokenizer_sha256": ds, "tokenizer": spec}), "fastokens").engine == "fastokens"
    with pytest.raises(StoreError, match="tokenization engine 'sentencepiece'"):
        load_store_tokenizer(fake({"tokenizer_sha256": ds, "tokenizer": dict(spec, engine="sentencepiece")}))
    with pytest.raises(StoreError, match="inconsistent"):
        load_store_tokenizer(fake({"tokenizer_sha256": tiny_tokenizer.sha256, "tokenizer": spec}))


def test_resolve_vocab_is_the_vocab_npz_rule(tmp_path, tiny_tokenizer):
    other_path = tmp_path / "other.json"
    Tokenizer(WordLevel({"<unk>": 0, "a": 1, "A": 2}, unk_token="<unk>")).save(str(other_path))
    other = load_tokenizer(other_path)
    notices = []
    default = tmp_path / "vocab.npz"
    vocab = resolve_vocab(tiny_tokenizer, default=default, notice=notices.append)
    assert vocab.tokenizer_sha256 == tiny_tokenizer.sha256 and not default.exists() and notices == []  # computed, nothing written
    compress_vocab(tiny_tokenizer).save(default)
    assert resolve_vocab(tiny_tokenizer, default=default, notice=notices.append).fingerprint == vocab.fingerprint
    assert notices == [f"Using {default} (matches {tiny_tokenizer.name})."]
    rebuilt = resolve_vocab(other, default=default, notice=notices.append)  # made from another tokenizer: rebuilt in place
    assert rebuilt.tokenizer_sha256 == other.sha256 == CompressedVocab.load(default).tokenizer_sha256 and rebuilt.compressed_size == 2
    assert f"does not match {other.name}" in notices[-1] and "rebuilt it" in notices[-1]
    with pytest.raises(VocabMismatch):
        resolve_vocab(tiny_tokenizer, default, notice=notices.append)  # an explicit --vocab must match
