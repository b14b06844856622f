"""Tokenization engines: texts -> one flat buffer of token ids, by `tokenizers` (the reference) or `fastokens`, and the check that they agree.

`tokenizers` (Hugging Face, `--tokenizer-engine hf`) is the reference: every id engram
has ever counted came from it. `fastokens` loads the same `tokenizer.json` and returns
a batch as two buffers (uint32 ids, uint64 offsets) with no per-token Python object,
at about 1/15 of the CPU time on the DeepSeek tokenizer (shared/NOTES.md). It is used
only where it loads the tokenizer (`auto`), and never trusted blindly:
`IdentityCheck` re-encodes a deterministic sample of every build's texts with the
reference (the whole first batch, then one text in `CHECK_EVERY`, within a time budget)
and stops the build at the first differing id, before anything is published.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import threading
import time
from dataclasses import dataclass, field

import fastokens
import numpy as np

from .errors import TokenizerError
from .kinds import TokenizerEngine

CHECK_EVERY = 100  # beyond the first batch, one text in this many is re-encoded by the reference (about 1%)
CHECK_BUDGET = 0.25  # ... while checking has cost at most this share of the fast engine's time
CHECK_MIN_SECONDS = 2.0  # ... or this many seconds, whichever is more
SNIPPET_CHARS = 40  # of a text whose ids differ, shown in the error


def library_version(engine: TokenizerEngine) -> str:
    """The installed version of the engine's package (`tokenizers` or `fastokens`)."""
    return importlib.metadata.version(TokenizerEngine.parse(engine).library)


def load_fast(raw_json: str) -> fastokens.Tokenizer | None:
    """A fastokens tokenizer for this tokenizer.json, or None where fastokens cannot load it."""
    try:
        return fastokens.Tokenizer.from_json_str(raw_json)
    except Exception:  # fastokens raises plain exceptions for models it does not support
        return None


def encode_reference(tokenizer, texts: list[str], *, add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`texts` by `tokenizers` (the reference): (ids (L,) int64, offsets (n+1,) int64)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a LoadedTokenizer or a tokenizers.Tokenizer
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    id_lists = [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
    offsets = np.zeros(len(id_lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def encode_flat(tokenizer, texts: list[str], *, add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`texts` by the tokenizer's engine: (ids (L,) uint32 or int64, offsets (n+1,) int64); text i is ids[offsets[i]:offsets[i+1]]."""
    fast = getattr(tokenizer, "fast", None)
    if fast is None:
        return encode_reference(tokenizer, texts, add_special_tokens=add_special_tokens)
    ids, offsets = fast.encode_batch_flat(texts, add_special_tokens=add_special_tokens)
    return np.frombuffer(ids, dtype=np.uint32), np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)


@dataclass
class IdentityCheck:
    """Re-encodes a sample of the texts a fast engine encoded with the reference, and compares the ids.

    `check` is called with each batch in corpus order (`first` = the index of its
    first text); it may run in several threads. The whole first batch is checked, then
    every text whose index is `CHECK_EVERY // 2` modulo `CHECK_EVERY`, as long as the
    checking time stays within `CHECK_BUDGET` of the fast engine's time (or
    `CHECK_MIN_SECONDS`); texts passed over for time are counted in `skipped`. A
    differing id raises `TokenizerError` naming the text, the position and the flag.
    """

    engine: str = TokenizerEngine.FASTOKENS.library
    texts: int = 0  # texts the engine encoded
    texts_checked: int = 0
    tokens_checked: int = 0
    skipped: int = 0
    fast_seconds: float = 0.0
    check_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def sample(self, first: int, n: int) -> list[int]:
        """Indexes (within a batch of `n` texts starting at text `first`) to re-encode."""
        if first == 0:
            return list(range(n))
        start = (CHECK_EVERY // 2 - first) % CHECK_EVERY
        return list(range(start, n, CHECK_EVERY))

    def check(self, tokenizer, texts: list[str], first: int, ids: np.ndarray, offsets: np.ndarray, *, add_special_tokens: bool, fast_seconds: float) -> None:
        picked = self.sample(first, len(texts))
        with self._lock:
            self.texts += len(texts)
            self.fast_seconds += fast_seconds
            over = first > 0 and self.check_seconds > max(CHECK_MIN_SECONDS, CHECK_BUDGET * self.fast_seconds)
            if over:
                self.skipped += len(picked)
                return
        if not picked:
            return
        t0 = time.perf_counter()
        ref, ref_offsets = encode_reference(tokenizer, [texts[i] for i in picked], add_special_tokens=add_special_tokens)
        for k, i in enumerate(picked):
            got = ids[offsets[i]:offsets[i + 1]]
            want = ref[ref_offsets[k]:ref_offsets[k + 1]]
            if got.size != want.size or not np.array_equal(got, want):
                self._refuse(texts[i], first + i, got, want)
        with self._lock:
            self.texts_checked += len(picked)
            self.tokens_checked += int(ref.size)
            self.check_seconds += time.perf_counter() - t0

    def _refuse(self, text: str, index: int, got: np.ndarray, want: np.ndarray) -> None:
        n = min(got.size, want.size)
        diff = np.flatnonzero(got[:n] != want[:n])
        pos = int(diff[0]) if diff.size else n
        a = int(got[pos]) if pos < got.size else "end"
        b = int(want[pos]) if pos < want.size else "end"
        snippet = text[:SNIPPET_CHARS]
        raise TokenizerError(
            f"tokenizer engine {self.engine} disagrees with tokenizers on text {index:,} of the corpus ({snippet!r}...) "
            f"at token {pos:,} (id {a} vs {b}); nothing was written: rerun with --tokenizer-engine hf"
        )

    def to_dict(self) -> dict:
        """What the store records (its `tokenizer` attribute's `identity`)."""
        return {
            "reference": f"tokenizers {library_version(TokenizerEngine.HF)}",
            "sample": f"the first batch and 1 text in {CHECK_EVERY}, within {CHECK_BUDGET:.0%} of the encoding time",
            "texts": self.texts,
            "texts_checked": self.texts_checked,
            "tokens_checked": self.tokens_checked,
            "skipped_for_time": self.skipped,
            "mismatches": 0,
        }

    def add(self, record: dict | None) -> None:
        """Fold in another check's record (`to_dict`; e.g. a map task's): its counts are added to these."""
        if not record:
            return
        with self._lock:
            self.texts += int(record.get("texts", 0))
            self.texts_checked += int(record.get("texts_checked", 0))
            self.tokens_checked += int(record.get("tokens_checked", 0))
            self.skipped += int(record.get("skipped_for_time", 0))

    @staticmethod
    def merged(parts: list[dict]) -> dict | None:
        """The records of several map tasks as one (counts summed)."""
        parts = [p for p in parts if p]
        if not parts:
            return None
        out = dict(parts[0])
        for key in ("texts", "texts_checked", "tokens_checked", "skipped_for_time", "mismatches"):
            out[key] = sum(int(p.get(key, 0)) for p in parts)
        return out


__all__ = ["CHECK_EVERY", "IdentityCheck", "encode_flat", "encode_reference", "library_version", "load_fast"]
