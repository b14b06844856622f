"""Tokenizer compression (docs/spec.md, "Tokenizer compression"), checked against an independent route.

The independent route reads the tokenizer's JSON itself, decodes byte-level tokens with
the GPT-2 byte table, and normalizes with Python's `unicodedata` and `re`, never with
`tokenizers`. Two findings about `tokenizers`' normalizers shape it:
- `StripAccents` removes every combining mark (general category M: Mn, Mc and Me), not
  only nonspacing marks (Mn). With Mn only, 709 decoded DeepSeek tokens normalize
  differently (Bengali/Devanagari vowel signs such as U+09BE are Mc), 944 ids land in
  other classes and the compressed size would be 99,510 instead of 99,092.
- `Lowercase` lowercases character by character, so a word-final capital sigma becomes
  σ, where Python's `str.lower()` gives ς (Final_Sigma). No DeepSeek token is affected.
- `Strip` strips Unicode White_Space, which excludes U+001C..U+001F that Python's
  `str.strip()` also removes.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from conftest import loaded, train_tiny_tokenizer, wordlevel_tokenizer
from oracles import MARKS, WHITE_SPACE, byte_decoder, byte_level_text, independent_lookup, merge_classes, normalize, tokens_from_json  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_cli.errors import TokenizerError, VocabMismatch
from engram_cli.vocab import CompressedVocab, compress_vocab, load_tokenizer, reference_normalizer

# -- the independent route ---------------------------------------------------------
# Unicode White_Space (what Rust's char::is_whitespace and so `Strip` use).


def assert_same_lookup(got: np.ndarray, want: np.ndarray, texts) -> None:
    assert got.shape == want.shape
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} ids differ; first {bad[:5].tolist()}: got {got[bad[:5]].tolist()}, want {want[bad[:5]].tolist()}, texts {[texts[i] for i in bad[:5]]}"


# -- docs/spec.md "Tokenizer compression" facts on the DeepSeek tokenizer -----------------------------------
def test_deepseek_size_and_reduction(deepseek_tokenizer, deepseek_vocab):
    assert deepseek_vocab.vocab_size == deepseek_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True) == 129_280
    assert deepseek_vocab.compress([0, 1, 2]).tolist() == [0, 1, 2]
    assert [deepseek_tokenizer.tokenizer.id_to_token(t) for t in (0, 1, 2)] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert 0.20 < deepseek_vocab.reduction < 0.26
    assert deepseek_vocab.reduction == 1 - len(np.unique(deepseek_vocab.lookup)) / 129_280


def test_deepseek_matches_independent_route(deepseek_tokenizer, deepseek_vocab):
    tokens = tokens_from_json(deepseek_tokenizer.path)
    assert len(tokens) == deepseek_vocab.vocab_size
    table = byte_decoder()
    texts = [byte_level_text(t, table) for t in tokens]
    assert_same_lookup(deepseek_vocab.lookup, independent_lookup(tokens, texts), texts)
    assert deepseek_vocab.fffd_tokens == sum("\ufffd" in t for t in texts)


def test_deepseek_mn_only_differs(deepseek_tokenizer, deepseek_vocab):
    """Removing only Mn (not Mc/Me) is NOT what the reference does: it changes classes."""
    tokens = tokens_from_json(deepseek_tokenizer.path)
    table = byte_decoder()
    texts = [byte_level_text(t, table) for t in tokens]
    mn_only = independent_lookup(tokens, texts, marks={"Mn"})
    assert mn_only.max() + 1 > deepseek_vocab.compressed_size
    assert unicodedata.category("\u09be") == "Mc" and reference_normalizer().normalize_str("\u09be") == ""


def test_normalizer_differences_from_python_str():
    norm = reference_normalizer().normalize_str
    assert norm("ΟΔΟΣ") == "οδοσ" != "ΟΔΟΣ".lower()  # no Final_Sigma
    assert norm("\x1cab\x1c") == "\x1cab\x1c" != "\x1cab\x1c".strip()  # U+001C is not White_Space
    assert norm(" \t\n ") == " " and norm("  A\u00e9\u3000") == "ae"


# -- the tiny trained tokenizer -------------------------------------------------------
def test_tiny_tokenizer_matches_independent_route(tiny_tokenizer):
    vocab = compress_vocab(tiny_tokenizer)
    tokens = tokens_from_json(tiny_tokenizer.path)
    table = byte_decoder()
    texts = [byte_level_text(t, table) for t in tokens]
    # the independent decoder agrees with tokenizers' decoder (up to how many U+FFFD)
    tok = tiny_tokenizer.tokenizer
    for t, text in enumerate(texts):
        theirs = tok.decode([t], skip_special_tokens=False)
        assert ("\ufffd" in theirs) == ("\ufffd" in text) and ("\ufffd" in text or theirs == text), (t, text, theirs)
    want = independent_lookup(tokens, texts)
    assert_same_lookup(vocab.lookup, want, texts)
    assert merge_classes(vocab.lookup) == merge_classes(want)
    # the corpus was chosen so that real classes form: case, accents, fullwidth, whitespace
    id_of_text = {text: t for t, text in enumerate(texts)}
    for variants in ([" café", "Café", " CAFE"], [" full", "Ｆｕｌｌ"], ["\t", "\n", " ", "\u3000", "\xa0"], [" file", "ﬁle"], [" ΑΘΗΝΑΙ", " Ἀθῆναι"]):
        assert len({int(vocab.lookup[id_of_text[v]]) for v in variants}) == 1, variants
    assert vocab.fffd_tokens == sum("\ufffd" in text for text in texts) > 0
    assert len(merge_classes(vocab.lookup)) >= 20


def test_tiny_tokenizer_mn_only_differs_on_spacing_marks(tiny_tokenizer):
    tokens = tokens_from_json(tiny_tokenizer.path)
    table = byte_decoder()
    texts = [byte_level_text(t, table) for t in tokens]
    differ = [text for text in texts if "\ufffd" not in text and normalize(text) != normalize(text, {"Mn"})]
    assert differ and all(any(unicodedata.category(c) in ("Mc", "Me") for c in unicodedata.normalize("NFD", x)) for x in differ)


# -- properties on generated vocabularies ----------------------------------------------
# Characters from blocks that have been stable since long before the Unicode versions of
# both Python's unicodedata and tokenizers' normalization tables.
_BLOCKS = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x400, 0x44F), (0x905, 0x94D), (0x985, 0x9CD),
           (0xE01, 0xE3A), (0x1100, 0x1112), (0x2000, 0x200A), (0x2070, 0x2079), (0x2160, 0x216F), (0x2460, 0x2473),
           (0xAC00, 0xAC20), (0xFB00, 0xFB06), (0xFF01, 0xFF5E)]
ALPHABET = [chr(c) for a, b in _BLOCKS for c in range(a, b + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")] + ["\t", "\n", "\r", "\ufffd"]
token_text = st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=6)
vocabularies = st.lists(token_text, min_size=1, max_size=60, unique=True)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(vocabularies)
def test_lookup_is_dense_first_appearance_and_matches_route(tokens):
    vocab = compress_vocab(loaded(wordlevel_tokenizer(tokens)))
    lookup = vocab.lookup.tolist()
    seen = -1
    for c in lookup:  # every id is either an earlier one or exactly the next new one
        assert c <= seen + 1
        seen = max(seen, c)
    assert sorted(set(lookup)) == list(range(vocab.compressed_size))
    assert_same_lookup(vocab.lookup, independent_lookup(tokens, tokens), tokens)
    assert all(vocab.keys[c] == (t if "\ufffd" in t else normalize(t) or t) for t, c in zip(tokens, lookup))


@FAST
@given(st.lists(token_text.map(normalize).filter(lambda s: s and "\ufffd" not in s), min_size=1, max_size=40, unique=True), st.data())
def test_normalized_vocab_compresses_only_true_duplicates(words, data):
    words = [w for w in words if normalize(w) == w]  # fixed points of the normalizer
    if not words:
        return
    assert compress_vocab(loaded(wordlevel_tokenizer(words))).lookup.tolist() == list(range(len(words)))
    # add variants that normalize to one of the words: exactly those merge
    variants = []
    for w in words:
        v = data.draw(st.sampled_from([w.upper(), f" {w} ", f"\t{w}\n", unicodedata.normalize("NFD", w)]))
        if normalize(v) == w and v not in words and v not in variants:
            variants.append(v)
    vocab = compress_vocab(loaded(wordlevel_tokenizer(words + variants)))
    assert vocab.compressed_size == len(words)
    assert vocab.lookup[len(words):].tolist() == [words.index(normalize(v)) for v in variants]


@given(st.lists(st.integers(-5, 59), max_size=30))
@settings(deadline=None)
def test_compress_passes_negative_ids_through(ids):
    vocab = CompressedVocab(lookup=np.arange(60, dtype=np.int64)[::-1].copy(), keys=tuple(map(str, range(60))), raw_key=np.zeros(60, bool), tokenizer_sha256="x")
    assert vocab.compress(ids).tolist() == [i if i < 0 else 59 - i for i in ids]
    assert vocab.compress(np.array(ids, dtype=np.int32).reshape(-1, 1)).shape == (len(ids), 1)


# -- save / load -------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, deepseek_tokenizer, deepseek_vocab):
    path = deepseek_vocab.save(tmp_path / "vocab.npz")
    back = CompressedVocab.load(path)
    assert np.array_equal(back.lookup, deepseek_vocab.lookup) and back.lookup.dtype == np.int64
    assert back.keys == deepseek_vocab.keys  # including the key "\x00" (numpy unicode arrays drop trailing NULs)
    assert "\x00" in back.keys
    assert np.array_equal(back.raw_key, deepseek_vocab.raw_key)
    assert (back.tokenizer_sha256, back.fingerprint) == (deepseek_tokenizer.sha256, deepseek_vocab.fingerprint)
    back.check_tokenizer(deepseek_tokenizer)
    with np.load(path) as z:
        meta = json.loads(str(z["metadata"]))
        assert z["lookup"].shape == (deepseek_tokenizer.vocab_size,)
    assert meta["vocab_size"] == 129_280 and meta["compressed_size"] == len(set(deepseek_vocab.lookup.tolist()))
    assert meta["normalizer"] and meta["normalizer_version"] and meta["tokenizer_sha256"] == deepseek_tokenizer.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.npz"]  # no partial file left


def test_fingerprint_mismatch(tmp_path, tiny_tokenizer, deepseek_tokenizer):
    vocab = compress_vocab(tiny_tokenizer)
    path = vocab.save(tmp_path / "tiny.npz")
    with pytest.raises(VocabMismatch, match="rebuild it with `engram compress-vocab deepseek"):
        CompressedVocab.load(path).check_tokenizer(deepseek_tokenizer)
    # an edited lookup no longer matches the stored fingerprint
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["lookup"] = arrays["lookup"].copy()
    arrays["lookup"][[3, 4]] = arrays["lookup"][[4, 3]]
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(VocabMismatch, match="corrupt"):
        CompressedVocab.load(tmp_path / "edited.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VocabMismatch, match="not an engram compressed vocabulary"):
        CompressedVocab.load(tmp_path / "junk.npz")
    with pytest.raises(VocabMismatch, match="does not exist"):
        CompressedVocab.load(tmp_path / "missing.npz")


def test_load_tokenizer_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "other.json").write_text('{"model": 1}')
    (tmp_path / "empty").mkdir()
    for spec, msg in [(tmp_path / "missing.json", "does not exist"), (tmp_path / "empty", "holds no tokenizer.json"),
                      (tmp_path / "bad.json", "is not valid JSON"), (tmp_path / "other.json", "not a tokenizer")]:
        with pytest.raises(TokenizerError, match=msg):
            load_tokenizer(spec)


def test_load_tokenizer_from_directory(tiny_tokenizer_path, tiny_tokenizer):
    from_dir = load_tokenizer(tiny_tokenizer_path.parent)
    assert from_dir.path == tiny_tokenizer_path and from_dir.sha256 == tiny_tokenizer.sha256


def test_training_is_deterministic():
    assert train_tiny_tokenizer().to_str() == train_tiny_tokenizer().to_str()
