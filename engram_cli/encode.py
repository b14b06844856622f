"""Tokenization: documents (str) -> compressed ids, one np.ndarray per document.

Documents are tokenized in batches by the tokenizer's engine (`engines.encode_flat`:
`fastokens`' flat buffers, or `tokenizers`' `encode_batch_fast`; both release the GIL),
then mapped to compressed ids with one vectorized `CompressedVocab.lookup` gather per
batch. With a fast engine, an `engines.IdentityCheck` re-encodes a sample of the texts
with the reference and refuses the first difference. `encode_documents(..., background=True)` runs reading and tokenizing in two
worker threads feeding a bounded queue, so counting in the caller's thread overlaps
with them and the tokenizer's threads stay busy across batch boundaries.

No process is forked here: a rayon pool used before a fork leaves the child
single-threaded (shared/NOTES.md). Work that needs processes should load the
tokenizer after the fork, in each worker.

The pipeline driver `count_corpus` (corpus paths -> `CorpusSummary` + `NgramStats`) lives
in `engram_cli.pipeline.count`.
"""

from __future__ import annotations

import itertools
import queue
import time
import threading
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from .corpus import ContinuedText
from .engines import IdentityCheck, encode_flat
from .ngrams import ContinuedIds
from .vocab import CompressedVocab, LoadedTokenizer

DEFAULT_BATCH_SIZE = 256  # documents per encode_batch call: enough work for every rayon thread
DEFAULT_BATCH_CHARS = 1 << 22  # ... and a cap on the characters of one batch (memory)
TOKENIZER_BYTES_PER_CHAR = 48  # measured peak of encode_batch_fast + id lists, per input character (~30), with margin
MIN_BATCH_CHARS = 1 << 16


def batch_chars_for(memory_bytes: int, workers: int = 2) -> int:
    """Characters per tokenizer batch so that `workers` batches in flight fit `memory_bytes`."""
    return int(min(DEFAULT_BATCH_CHARS, max(MIN_BATCH_CHARS, memory_bytes // (max(1, workers) * TOKENIZER_BYTES_PER_CHAR))))
_DONE = object()


def _batches(documents: Iterable[str], batch_size: int, batch_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the batch's first text, texts) of at most `batch_size` texts and about `batch_chars` characters."""
    batch: list[str] = []
    chars = first = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_size or chars >= batch_chars:
            yield first, batch
            first += len(batch)
            batch, chars = [], 0
    if batch:
        yield first, batch


def encode_batch(
    texts: list[str],
    tokenizer: LoadedTokenizer | Tokenizer,
    vocab: CompressedVocab | None = None,
    *,
    add_special_tokens: bool = False,
    check: IdentityCheck | None = None,
    first: int = 0,
) -> list[np.ndarray]:
    """Tokenize `texts` in one parallel call; return per text its (compressed) ids, int64.

    The ids of a `ContinuedText` piece come back as `ContinuedIds` (same document).
    `check` (with a fast engine): the batch's sample is re-encoded by the reference and
    compared (`first` = the index of texts[0] in the whole stream).
    """
    t0 = time.perf_counter()
    flat, offsets = encode_flat(tokenizer, texts, add_special_tokens=add_special_tokens)  # (L,), (n+1,)
    if check is not None and getattr(tokenizer, "fast", None) is not None:
        check.check(tokenizer, texts, first, flat, offsets, add_special_tokens=add_special_tokens, fast_seconds=time.perf_counter() - t0)
    flat = vocab.lookup[flat] if vocab is not None else flat.astype(np.int64, copy=False)  # token ids are >= 0: the gather is `compress`
    out = np.split(flat, offsets[1:-1])
    for i, text in enumerate(texts):
        if isinstance(text, ContinuedText):  # a piece of the document before: say so to the counter
            out[i] = out[i].view(ContinuedIds)
    return out


def map_in_threads(batches: Iterator, encode: Callable, workers: int, prefetch: int) -> Iterator:
    """`map(encode, batches)` run in `workers` threads, results in order; errors re-raise in the consumer.

    Each worker takes the next batch (the iterator is advanced here, under a lock:
    reading happens in the workers) and runs `encode` on it. For work that releases
    the GIL: `encode_batch` (two calls in flight keep the rayon pool busy across batch
    boundaries, a batch's longest document no longer idles the other threads), numpy,
    polars. At most `workers + prefetch` batches are held.
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    take = threading.Lock()
    stop = threading.Event()
    seq = itertools.count()
    slots = threading.Semaphore(max(1, workers) + max(1, prefetch))

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            while not stop.is_set():
                if not slots.acquire(timeout=0.1):  # bounds batches taken but not yet consumed
                    continue
                with take:
                    batch = next(batches, None)
                    i = next(seq)
                if batch is None:
                    slots.release()
                    break
                if not put((i, encode(batch), None)):
                    return
            put((None, _DONE, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((None, _DONE, e))

    threads = [threading.Thread(target=work, name=f"engram-encode-{k}", daemon=True) for k in range(max(1, workers))]
    for t in threads:
        t.start()
    try:
        held: dict[int, list[np.ndarray]] = {}
        want = 0
        done = 0
        while done < len(threads):
            i, item, error = out.get()
            if error is not None:
                raise error
            if item is _DONE:
                done += 1
                continue
            held[i] = item
            while want in held:
                yield held.pop(want)
                slots.release()
                want += 1
    finally:
        stop.set()
        for t in threads:
            t.join()


def locked_progress(progress: Callable[..., None] | None) -> Callable[..., None] | None:
    """Serialize progress calls that now come from two threads."""
    if progress is None:
        return None
    lock = threading.Lock()

    def call(*args, **kwargs):
        with lock:
            progress(*args, **kwargs)

    return call


def encode_documents(
    documents: Iterable[str],
    *,
    tokenizer: LoadedTokenizer | Tokenizer,
    vocab: CompressedVocab | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    add_special_tokens: bool = False,
    progress: Callable[..., None] | None = None,
    background: bool = True,
    workers: int = 2,
    prefetch: int = 2,
    check: IdentityCheck | None = None,
) -> Iterator[np.ndarray]:
    """Yield one int64 array of compressed ids per document (tokenizer ids if `vocab` is None), in order.

    With `background`, reading `documents` and tokenizing run in `workers` threads,
    `prefetch` batches ahead of the consumer; `progress` may then be called from them.
    `check` (an `engines.IdentityCheck`): with a fast engine, its sample of the texts is
    re-encoded by the reference as they go; a difference raises `TokenizerError`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    docs = tokens = 0
    batches = _batches(documents, batch_size, batch_chars)

    def encode(item: tuple[int, list[str]]) -> list[np.ndarray]:
        first, batch = item
        return encode_batch(batch, tokenizer, vocab, add_special_tokens=add_special_tokens, check=check, first=first)

    encoded = map_in_threads(batches, encode, workers, prefetch) if background else map(encode, batches)
    for ids in encoded:
        docs += sum(not isinstance(a, ContinuedIds) for a in ids)
        tokens += sum(a.size for a in ids)
        if progress is not None:
            progress("tokenizing", tokens, None, f"{docs} documents")
        yield from ids

