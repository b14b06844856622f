"""Tokenization engines (`--tokenizer-engine`): fastokens gives the reference's ids, is checked, and leaves the same store.

Proof routes are independent of the engine under test: `tokenizers` (the reference)
encodes the same texts; stores are compared file by file; a forced mismatch is a patched
fast engine whose ids differ at one known text and position.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import engram_cli.vocab as vocab_module
from engram_cli import engines
from engram_cli.cli import app
from engram_cli.corpus import iter_documents
from engram_cli.encode import encode_documents
from engram_cli.engines import IdentityCheck, encode_flat, encode_reference
from engram_cli.errors import TokenizerError
from engram_cli.kinds import TokenizerEngine
from engram_cli.pipeline.build import DistributedOptions, build_tables, plan_tables
from engram_cli.store import TableStore
from engram_cli.store.tokenizer import load_store_tokenizer
from engram_cli.split import read_split
from engram_cli.vocab import compress_vocab, load_tokenizer

import cli_checks
from cli_checks import copy_fixtures, one_error_line, store_files

SMALL_FILES = ["debian-policy/ap-license.rst", "debian-policy/index.rst", "developers-reference/scope.rst"]
# 1 layer x orders 2..3 x 4 heads, rows of 16 float32
PLAN_ARGS = ["--layers", "1", "--heads", "4", "--dim", "64", "--rows-per-head", "3001,5003", "--chunk-size", "64KiB", "--shard-size", "256KiB"]
STORE = dict(init="normal", init_std=0.02, chunk_bytes=64 << 10, shard_bytes=256 << 10, compressor="lz4", workers=1)
FASTOKENS_VERSION = importlib.metadata.version("fastokens")

runner = CliRunner()

HARD_CASES = [
    "emoji 😀😃🏳️‍🌈 👩‍👩‍👧‍👦 and 🇩🇪 flags, skin tones 👍🏽👍🏿",
    "中文分词测试：我们在北京大学学习自然语言处理。日本語のテキスト、カタカナ、ひらがな。한국어 문장입니다.",
    "combining marks: e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321\u0322 \u0915\u094d\u0937 ﬁ ligature, Å vs A\u030a",
    "spaces:" + " " * 300 + "end" + " " * 7 + "\n" + "\t" * 40 + "tabs",
    "digits 1234567890" + "9" * 500 + " 3.14159265358979 1,000,000 0x1F 007",
    "control \x00\x01\x02\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\x85 done",
    "word" * 400 + " " + "a" * 5000 + " Supercalifragilisticexpialidocious" * 20,
    "mix \t\n\r\n \n\t \u00a0\u2003\u3000 x\r\ry\n\n\n\n   \t  z",
    "RTL: مرحبا بالعالم שלום עולם and math ∀x∈ℝ: x²≥0, ∑ᵢ aᵢ → ∞",
    "code:\n    def f(x):\n\treturn {'k': [1, 2, 3]}  # comment\n\n",
]


def invoke(*args):
    return runner.invoke(app, [*map(str, args)])


class Skewed:
    """A fast engine that changes token `pos` of every text containing `needle` (the forced mismatch)."""

    def __init__(self, fast, needle: str, pos: int = 2):
        self.fast, self.needle, self.pos = fast, needle, pos

    def encode_batch_flat(self, texts, add_special_tokens=False):
        ids, offsets = self.fast.encode_batch_flat(texts, add_special_tokens=add_special_tokens)
        ids = np.frombuffer(ids, dtype=np.uint32).copy()
        off = np.frombuffer(offsets, dtype=np.uint64)
        for i, text in enumerate(texts):
            if self.needle in text:
                ids[int(off[i]) + self.pos] += 1
        return ids, off


def skewed_loader(needle: str):
    real = engines.load_fast
    return lambda raw: Skewed(real(raw), needle)


@pytest.fixture(scope="module")
def deepseek(deepseek_tokenizer, deepseek_vocab):
    return deepseek_tokenizer, deepseek_vocab


@pytest.fixture(scope="module")
def built(tmp_path_factory, deepseek_vocab_file):
    """The fixture corpus built by the CLI with each engine (the same vocab file)."""
    root = tmp_path_factory.mktemp("engines")
    corpus = copy_fixtures(root / "corpus", SMALL_FILES)
    vocab_file = deepseek_vocab_file
    out = {}
    for engine in ("fastokens", "hf"):
        out[engine] = root / f"{engine}.zarr"
        result = invoke("build-table", corpus, "-o", out[engine], "--vocab", vocab_file, "--tokenizer-engine", engine, *PLAN_ARGS, "--json")
        assert result.exit_code == 0, result.output
    return {"corpus": corpus, "vocab": vocab_file, **out}



def build_information_removed(raw: bytes) -> dict:
    doc = json.loads(raw)
    attrs = doc["attributes"]["engram"]
    attrs.pop("created")
    for key in ("engine", "engine_version", "identity"):
        attrs["tokenizer"].pop(key)
    return doc



def assert_same_store(a: Path, b: Path) -> None:
    """Every file byte-identical, the root attributes after `build_information_removed`."""
    cli_checks.assert_same_store(a, b, build_information_removed)


# -- (b) byte-identical stores, (e) the record ------------------------------------------------
def test_fast_and_reference_engines_build_the_same_store(built):
    assert_same_store(built["fastokens"], built["hf"])


def test_store_records_the_engine_its_version_and_the_identity_check(built):
    fast = TableStore.open(built["fastokens"]).attrs["tokenizer"]
    assert fast["engine"] == "fastokens" and fast["engine_version"] == FASTOKENS_VERSION
    ident = fast["identity"]
    assert ident["mismatches"] == 0 and ident["texts"] > 0
    assert 0 < ident["texts_checked"] <= ident["texts"] and ident["tokens_checked"] > 0
    assert ident["reference"] == f"tokenizers {importlib.metadata.version('tokenizers')}"
    ref = TableStore.open(built["hf"]).attrs["tokenizer"]
    assert ref["engine"] == "tokenizers" and ref["engine_version"] == importlib.metadata.version("tokenizers") and ref["identity"] is None


def test_inspect_shows_the_engine_and_the_identity_check(built):
    result = invoke("inspect", built["fastokens"], "--json")
    assert result.exit_code == 0, result.output
    tok = json.loads(result.stdout)["built"]["tokenizer"]
    recorded = TableStore.open(built["fastokens"]).attrs["tokenizer"]
    assert tok == {k: recorded[k] for k in ("spec", "sha256", "engine", "engine_version", "identity")}
    text = invoke("inspect", built["fastokens"])
    assert text.exit_code == 0, text.output
    flat = " ".join(text.stdout.split())
    assert f"encoded by fastokens {FASTOKENS_VERSION}" in flat and "0 mismatches" in flat
    ref = " ".join(invoke("inspect", built["hf"]).stdout.split())
    assert "encoded by tokenizers" in ref and "reference engine" in ref


def test_store_tokenizer_loads_with_any_engine(built):
    """A store's recorded engine does not bind its readers: both engines load it, with the same ids."""
    store = TableStore.open(built["hf"])
    fast = load_store_tokenizer(store, "fastokens")
    ref = load_store_tokenizer(TableStore.open(built["fastokens"]), "hf")
    assert (fast.engine, fast.fast is not None) == ("fastokens", True)
    assert (ref.engine, ref.fast) == ("tokenizers", None)
    assert fast.sha256 == ref.sha256
    # read_split (train's batches, eval's split recovery) through either engine: the reference's per-document ids
    want = np.concatenate([ref.tokenizer.encode(d).ids for d in iter_documents([built["corpus"]])])
    for tok in (fast, ref):
        train, held = read_split(built["corpus"], tok, share=1.0, max_train=0, max_heldout=10**9)
        assert train.size == 0 and np.array_equal(held, want)
    capped = read_split(built["corpus"], fast, share=0.0, max_train=100, max_heldout=0)
    assert np.array_equal(capped[0], want[:100]) and capped[1].size == 0


def test_thread_executor_build_with_the_fast_engine_merges_the_checks(tmp_path, deepseek, built):
    """Scaled out, every map task checks its own texts; the driver's record adds them up; the store is the same."""
    tok = load_tokenizer("deepseek", "fastokens")
    vocab = deepseek[1]
    plan = plan_tables(vocab, layer_ids=[1], max_ngram_size=3, heads=4, rows_per_head=[3001, 5003], dim=64, seed=0, pad_id=2)
    one = build_tables([built["corpus"]], tmp_path / "one.zarr", tokenizer=tok, vocab=vocab, plan=plan, **STORE)
    with cf.ThreadPoolExecutor(2) as ex:
        many = build_tables([built["corpus"]], tmp_path / "many.zarr", tokenizer=tok, vocab=vocab, plan=plan, executor=ex,
                            options=DistributedOptions(work_dir=tmp_path / "work", map_bytes=16 << 10), **STORE)
    a, b = one.store.attrs["tokenizer"]["identity"], many.store.attrs["tokenizer"]["identity"]
    assert b["texts"] == a["texts"] > 0 and b["texts_checked"] >= a["texts_checked"] > 0 and b["mismatches"] == 0
    fa, fb = store_files(one.store.path), store_files(many.store.path)
    assert sorted(fa) == sorted(fb) and all(fa[k] == fb[k] for k in fa if k != "zarr.json")


# -- (c) hard cases -----------------------------------------------------------------------------
@pytest.fixture()
def hard_corpus(tmp_path):
    root = tmp_path / "hard"
    root.mkdir()
    lines = [json.dumps({"text": t}) for t in HARD_CASES]
    lines.append('{"text": "lone surrogates \\ud800 and \\udfff, a pair \\ud83d\\ude00 intact"}')  # the reader replaces the lone ones
    (root / "cases.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "plain.txt").write_bytes("\n\n".join(HARD_CASES).encode() + b"\xed\xa0\x80 invalid utf-8 \xff\xfe tail\n")
    return root


@pytest.mark.parametrize("name", ["deepseek", "tiny"])
def test_hard_cases_encode_to_the_reference_ids(hard_corpus, name, tiny_tokenizer_path):
    spec = "deepseek" if name == "deepseek" else tiny_tokenizer_path
    fast, ref = load_tokenizer(spec, "fastokens"), load_tokenizer(spec, "hf")
    docs = list(iter_documents([hard_corpus]))
    assert any("\ufffd" in d for d in docs)  # the lone surrogates and invalid bytes were replaced
    for special in (False, True):
        check = IdentityCheck()
        got = list(encode_documents(docs, tokenizer=fast, vocab=None, add_special_tokens=special, check=check, batch_size=4))
        want = list(encode_documents(docs, tokenizer=ref, vocab=None, add_special_tokens=special))
        assert len(got) == len(want) == len(docs)
        for g, w, d in zip(got, want, docs):
            assert np.array_equal(g, w), d[:40]
        assert check.texts == len(docs) and check.texts_checked >= 4 and check.to_dict()["mismatches"] == 0
        # the flat buffers, straight
        ids, off = encode_flat(fast, docs, add_special_tokens=special)
        rids, roff = encode_reference(ref, docs, add_special_tokens=special)
        assert np.array_equal(off, roff) and np.array_equal(ids.astype(np.int64), rids)


# -- (a) a forced mismatch ----------------------------------------------------------------------
@pytest.fixture()
def needle_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs = ["the first document, quite ordinary text", "a second one with the NEEDLE word in its middle", "and a third"]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def test_a_mismatch_stops_the_build_and_writes_nothing(tmp_path, needle_corpus, deepseek, monkeypatch):
    monkeypatch.setattr(vocab_module, "load_fast", skewed_loader("NEEDLE"))
    tok = load_tokenizer("deepseek", "fastokens")
    assert isinstance(tok.fast, Skewed)
    vocab = deepseek[1]
    plan = plan_tables(vocab, layer_ids=[1], max_ngram_size=3, heads=4, rows_per_head=[3001, 5003], dim=64, seed=0, pad_id=2)
    out = tmp_path / "t.zarr"
    with pytest.raises(TokenizerError) as e:
        build_tables([needle_corpus], out, tokenizer=tok, vocab=vocab, plan=plan, **STORE)
    msg = str(e.value)
    assert "\n" not in msg
    assert "text 1 " in msg and "a second one with the NEEDLE" in msg and "at token 2 " in msg and "--tokenizer-engine hf" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no store, no .partial, no lock


def test_a_mismatch_far_into_the_corpus_is_found_by_the_sample(tmp_path, deepseek, monkeypatch):
    """Beyond the first batch, the sampled text (index 50 mod 100) is checked; its difference is refused by index."""
    monkeypatch.setattr(vocab_module, "load_fast", skewed_loader("NEEDLE"))
    tok = load_tokenizer("deepseek", "fastokens")
    docs = [f"document number {i} of many" + (" NEEDLE here" if i == 350 else "") for i in range(400)]
    with pytest.raises(TokenizerError, match=r"text 350 .*at token 2 "):
        list(encode_documents(docs, tokenizer=tok, vocab=None, batch_size=64, check=IdentityCheck()))
    docs[350], docs[351] = docs[350].replace(" NEEDLE here", ""), docs[351] + " NEEDLE"  # text 351 is not in the sample: passed unchecked
    check = IdentityCheck()
    list(encode_documents(docs, tokenizer=tok, vocab=None, batch_size=64, check=check))
    assert check.texts == 400 and check.texts_checked == 64 + 3  # the first batch, then texts 150, 250, 350


def test_cli_mismatch_is_one_line_and_no_store(tmp_path, needle_corpus, deepseek_vocab_file, monkeypatch):
    monkeypatch.setattr(vocab_module, "load_fast", skewed_loader("NEEDLE"))
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke("build-table", needle_corpus, "-o", out, "--vocab", deepseek_vocab_file, *PLAN_ARGS, "--json"))  # auto: the (skewed) fast engine
    assert "--tokenizer-engine hf" in line and "text 1 " in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    ok = invoke("build-table", needle_corpus, "-o", out, "--vocab", deepseek_vocab_file, *PLAN_ARGS, "--tokenizer-engine", "hf", "--json")  # the fix the line names
    assert ok.exit_code == 0, ok.output


# -- (d) an engine that cannot load the tokenizer -------------------------------------------------
@pytest.fixture()
def wordlevel_path(tmp_path):
    """A WordLevel tokenizer: fastokens 0.3.5 cannot load it (checked below)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["[UNK]", "the", "<pad>", "a", "of", "and", "to", "is", "in", "package", "debian"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wordlevel.json"
    tok.save(str(path))
    assert engines.load_fast(path.read_text()) is None
    return path


def test_fastokens_that_cannot_load_is_one_line_and_auto_falls_back(tmp_path, needle_corpus, wordlevel_path):
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke("build-table", needle_corpus, "-o", out, "--tokenizer", wordlevel_path, "--tokenizer-engine", "fastokens", *PLAN_ARGS))
    assert "fastokens cannot load" in line and "--tokenizer-engine hf" in line
    assert not out.exists()
    compress_vocab(load_tokenizer(wordlevel_path)).save(tmp_path / "wl.npz")
    ok = invoke("build-table", needle_corpus, "-o", out, "--tokenizer", wordlevel_path, "--vocab", tmp_path / "wl.npz", *PLAN_ARGS, "--json")
    assert ok.exit_code == 0, ok.output
    spec = TableStore.open(out).attrs["tokenizer"]
    assert spec["engine"] == "tokenizers" and spec["identity"] is None
    with pytest.raises(TokenizerError, match="fastokens cannot load"):
        load_store_tokenizer(TableStore.open(out), "fastokens")
    assert load_store_tokenizer(TableStore.open(out), "auto").engine == "tokenizers"


def test_fastokens_refused_by_monkeypatch_too(tmp_path, needle_corpus, deepseek_vocab_file, monkeypatch):
    monkeypatch.setattr(vocab_module, "load_fast", lambda raw: None)
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke("build-table", needle_corpus, "-o", out, "--tokenizer-engine", "fastokens", *PLAN_ARGS))
    assert "fastokens cannot load" in line
    ok = invoke("build-table", needle_corpus, "-o", out, "--vocab", deepseek_vocab_file, "--tokenizer-engine", "auto", *PLAN_ARGS, "--json")
    assert ok.exit_code == 0, ok.output
    assert TableStore.open(out).attrs["tokenizer"]["engine"] == "tokenizers"


def test_bad_engine_name_is_one_line(tmp_path, needle_corpus):
    for command in (["build-table", needle_corpus, "-o", tmp_path / "t.zarr"], ["train", needle_corpus], ["eval"]):
        line = one_error_line(invoke(*command, "--tokenizer-engine", "spacy"))
        assert "--tokenizer-engine" in line and "spacy" in line


def test_engine_names():
    assert TokenizerEngine.parse("tokenizers") is TokenizerEngine.HF
    assert TokenizerEngine.HF.library == "tokenizers" and TokenizerEngine.FASTOKENS.library == "fastokens"
    assert IdentityCheck.merged([None, {"texts": 2, "texts_checked": 1, "tokens_checked": 5, "skipped_for_time": 0, "mismatches": 0},
                                 {"texts": 3, "texts_checked": 2, "tokens_checked": 7, "skipped_for_time": 1, "mismatches": 0}])["texts"] == 5
