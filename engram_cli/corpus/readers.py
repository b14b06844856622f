"""Corpus input: files and directories -> documents (str), with a `CorpusSummary`.

What is read (one *document* is what the n-gram windows never cross):

    directory            every file under it, recursively, in sorted path order;
                         hidden entries (a name starting with ".") are left out, and
                         so are Zarr stores and build staging directories (an earlier
                         `tables.zarr` or `tables.zarr.partial`; see `corpus_files`)
    *.jsonl / *.ndjson   one document per line: the string field `text_field`
    *.parquet            one document per row: the string column `text_field`,
                         read in batches (never the whole file)
    anything else        plain UTF-8 text; the whole file is one document
    *.gz / *.zst         any of the above, decompressed while streaming

Bounded memory whatever the document size: a plain-text file is read in pieces of
about `TEXT_PIECE_BYTES`, and a longer JSON/parquet text is split the same way. Each
piece after a document's first is a `ContinuedText` (a `str`): it continues the same
document, and the counting code carries the n-gram context across the cut, so the
windows are those of the whole document. Pieces are cut where the DeepSeek
pre-tokenizer starts a new pre-token (`safe_cut`: before a space that follows a
non-space, or after a newline followed by a non-space), so the tokens are the same as
tokenizing the document in one call; only a piece with no such point in it (e.g.
`TEXT_PIECE_BYTES` of CJK text with no space or newline) is cut at a character
boundary, where a token may split in two. A JSON line longer than
`MAX_JSON_LINE_BYTES` is skipped (read past in bounded blocks) and counted; a parquet
cell is held whole by polars, then split like any long text. A compressed text file
that turns out corrupt part-way keeps the pieces read before the error (and is counted
under the skip reason too): its text is no longer held whole before it is yielded.

Bad input is counted, not fatal: invalid UTF-8 is replaced (U+FFFD) and counted per
document; binary files (a NUL byte in the first 8 KiB) are skipped and counted; JSON
lines that do not parse, nest too deeply, or lack the field are skipped and counted by
reason. A path that does not exist, one that is not a regular file or directory (a
FIFO or device would block or never end), or a corpus with no document at all, raises
`CorpusError`.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import shutil
import stat
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .errors import CorpusError

Progress = Callable[..., None]  # progress(stage, done, total=None, detail="")

BINARY_SNIFF_BYTES = 8192
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
PARQUET_BATCH_ROWS = 4096  # rows per parquet batch: bounds memory on long documents
PROGRESS_EVERY_RECORDS = 2048
TEXT_PIECE_BYTES = 1 << 18  # a plain-text document is read and tokenized in pieces of about this size
MAX_JSON_LINE_BYTES = 64 << 20  # a longer JSON line is skipped, never held whole
_CUT_SEARCH_BYTES = 1 << 16  # how far back from a piece's end a safe cut is looked for


class ContinuedText(str):
    """A piece of text that continues the previous document (no document boundary before it)."""

    __slots__ = ()


@dataclass
class CorpusSummary:
    """What reading a corpus found. Filled in while the documents are read."""

    files: int = 0  # files read (skipped ones not included)
    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the documents' text (after decompression)
    skipped_binary: int = 0  # files skipped because they look binary
    skipped_other: dict[str, int] = field(default_factory=dict)  # reason -> records/files skipped
    skipped_examples: dict[str, str] = field(default_factory=dict)  # reason -> first path it happened in
    invalid_utf8: int = 0  # documents in which invalid UTF-8 was replaced by U+FFFD
    tokens: int = 0  # filled in by the tokenizing stage

    def skip(self, reason: str, path: Path | str) -> None:
        self.skipped_other[reason] = self.skipped_other.get(reason, 0) + 1
        self.skipped_examples.setdefault(reason, str(path))

    @property
    def skipped(self) -> int:
        return self.skipped_binary + sum(self.skipped_other.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CorpusSummary":
        """The inverse of `to_dict` (as stored in a stats summary.json under "corpus")."""
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()})

    def merge(self, other: "CorpusSummary | Iterable[CorpusSummary]") -> "CorpusSummary":
        """This summary followed by `other` (one or a list, in corpus order), as a new one.

        Equals the summary of reading the shards' files one after the other: figures
        add up, and each skip reason keeps the first path it happened in.
        """
        others = [other] if isinstance(other, CorpusSummary) else list(other)
        out = CorpusSummary.from_dict(self.to_dict())
        for o in others:
            out.files += o.files
            out.documents += o.documents
            out.bytes += o.bytes
            out.skipped_binary += o.skipped_binary
            out.invalid_utf8 += o.invalid_utf8
            out.tokens += o.tokens
            for reason, count in o.skipped_other.items():
                out.skipped_other[reason] = out.skipped_other.get(reason, 0) + count
            for reason, path in o.skipped_examples.items():
                out.skipped_examples.setdefault(reason, path)
        return out


# -- finding the files ---------------------------------------------------------------
def _base_suffix(path: Path) -> str:
    """The format suffix, under any compression suffix: `a.jsonl.gz` -> `.jsonl`."""
    name = path.name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return Path(name).suffix


def _compression(path: Path) -> str | None:
    name = path.name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if name.endswith(comp):
            return comp
    return None


ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")  # Zarr v3 node metadata; v2 group/array
PARTIAL_SUFFIX = ".partial"  # a build stages its store in `<out>.partial` (engram_cli.store)
SKIP_TABLE_STORE = "Zarr table store or build staging directory (an output, not corpus)"


def table_store_reason(path: Path) -> str | None:
    """Why directory `path` is an output of ours (or any Zarr store) rather than corpus.

    The rule (checked on the directory itself, not its contents below the top level):
    a directory holding `zarr.json` (a Zarr v3 store, group or array; also `.zgroup` /
    `.zarray`, Zarr v2) is a Zarr store, e.g. an earlier `tables.zarr` or a store moved
    aside as `tables.zarr.old-<pid>`; a directory whose name ends in `.zarr.partial`,
    or ends in `.partial` and holds a `stats` directory, is a build's staging
    directory (`<out>.partial`). Returns None for anything else.
    """
    if any((path / m).is_file() for m in ZARR_MARKERS):
        return "a Zarr store"
    name = path.name.lower()
    if name.endswith(".zarr" + PARTIAL_SUFFIX) or (name.endswith(PARTIAL_SUFFIX) and (path / "stats").is_dir()):
        return "a partial build of a table store"
    return None


def _inside_table_store(path: Path, cache: dict[Path, str | None]) -> tuple[Path, str] | None:
    """The table store (`path` itself or an ancestor directory) that holds `path`, if any."""
    try:
        resolved = path.resolve()
    except OSError:
        return None
    for d in [resolved, *resolved.parents] if resolved.is_dir() else resolved.parents:
        if d not in cache:
            cache[d] = table_store_reason(d)
        if cache[d] is not None:
            return d, cache[d]
    return None


def corpus_files(paths: Iterable[str | os.PathLike], summary: CorpusSummary | None = None) -> list[Path]:
    """Expand files and directories into the files to read, in a deterministic order.

    Explicit paths keep the order given; each directory contributes its files sorted
    by relative path. Hidden entries are left out, and so is every directory that is a
    table store or a build's staging directory (see `table_store_reason`): an earlier
    output in the corpus directory is not read as corpus. Each pruned directory is
    counted in `summary` (when given) under `SKIP_TABLE_STORE`. Raises `CorpusError`
    for a path that does not exist, and for an explicitly named path that is (or lies
    inside) a table store.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise CorpusError("no corpus path given; pass one or more files or directories")
    files: list[Path] = []
    cache: dict[Path, str | None] = {}  # directory -> table_store_reason, for explicit paths
    for path in paths:
        if not path.exists():
            raise CorpusError(f"corpus path {str(path)!r} does not exist; pass an existing file or directory")
        inside = _inside_table_store(path, cache)
        if inside is not None:
            store, reason = inside
            where = "is a table store" if store == path.resolve() else f"lies inside the table store {str(store)!r}"
            raise CorpusError(f"corpus path {str(path)!r} {where} ({reason}), not a corpus; pass the text files or directories the tables are built from")
        if not path.is_dir() and not _is_regular_file(path):
            raise CorpusError(f"corpus path {str(path)!r} is not a regular file or directory (a FIFO, socket or device would block or never end); pass text files or directories")
        if path.is_dir():
            found = []
            for root, dirs, names in os.walk(path):
                kept = []
                for d in sorted(dirs):
                    if d.startswith("."):
                        continue
                    if table_store_reason(Path(root, d)) is not None:
                        if summary is not None:
                            summary.skip(SKIP_TABLE_STORE, Path(root, d))
                        continue
                    kept.append(d)
                dirs[:] = kept
                found.extend(Path(root, n) for n in names if not n.startswith("."))
            found.sort(key=lambda p: p.relative_to(path).parts)
            files.extend(p for p in found if p.is_file())
        else:
            files.append(path)
    return files


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


# -- cutting long text into pieces ----------------------------------------------------------
def _char_at(data: bytes, i: int) -> str:
    """The character starting at byte i ("" at the end or inside a broken sequence)."""
    return data[i : i + 4].decode("utf-8", "ignore")[:1]


def _char_before(data: bytes, i: int) -> str:
    """The character ending at byte i."""
    return data[max(0, i - 4) : i].decode("utf-8", "ignore")[-1:]


def safe_cut(data: bytes, lo: int = 0, hi: int | None = None) -> int | None:
    """The last byte offset in (lo, hi) where data[lo:hi] can be cut without changing its tokens.

    With the DeepSeek pre-tokenizer (docs/spec.md; a split on digits, on CJK runs, then
    the GPT-style regex) a new pre-token always starts at byte i when either
    - data[i] is a space and the character before it is not whitespace, or
    - data[i-1] is a newline and the character at i is not whitespace,
    so tokenizing data[lo:i] and data[i:hi] separately gives the tokens of data[lo:hi].
    Only the last `_CUT_SEARCH_BYTES` bytes are searched; None when there is no such point.
    """
    end = len(data) if hi is None else min(hi, len(data))
    floor = max(lo, end - _CUT_SEARCH_BYTES)
    i = data.rfind(b"\n", floor, end - 1)
    while i >= floor:  # after a newline followed by a non-space
        c = _char_at(data, i + 1)
        if c and not c.isspace():
            return i + 1
        i = data.rfind(b"\n", floor, i)
    i = data.rfind(b" ", floor + 1, end)
    while i > floor:  # before a space that follows a non-space
        c = _char_before(data, i)
        if c and not c.isspace():
            return i
        i = data.rfind(b" ", floor + 1, i)
    return None


def _char_boundary(data: bytes, i: int, lo: int) -> int:
    """i moved back (at most 3 bytes, not to lo) to the start of a UTF-8 character."""
    j = i
    while j > max(lo, i - 3) and 0x80 <= data[j] < 0xC0:
        j -= 1
    return j if lo < j else i


def iter_pieces(blocks: Iterable[bytes], piece_bytes: int | None = None) -> Iterator[bytes]:
    """Re-cut a stream of byte blocks into pieces of at most `piece_bytes` (default
    `TEXT_PIECE_BYTES`), at `safe_cut` points.

    Holds the current block and at most one piece left over from the one before; the
    pieces joined give the blocks joined.
    """
    piece_bytes = piece_bytes or TEXT_PIECE_BYTES
    pending = b""
    for block in blocks:
        pending = pending + block if pending else block
        pos = 0
        while len(pending) - pos > piece_bytes:
            cut = safe_cut(pending, pos, pos + piece_bytes + 1)
            if cut is None:
                cut = _char_boundary(pending, pos + piece_bytes, pos)
            yield pending[pos:cut]
            pos = cut
        pending = pending[pos:]
    if pending:
        yield pending


def split_text(text: str, piece_bytes: int | None = None) -> Iterator[str]:
    """A long document as pieces: the first a plain `str`, the others `ContinuedText`."""
    piece_bytes = piece_bytes or TEXT_PIECE_BYTES
    if len(text) <= piece_bytes // 4:  # at most 4 UTF-8 bytes a character: surely one piece
        yield text
        return
    first = True
    data = text.encode("utf-8", "surrogatepass")
    for piece in iter_pieces([data], piece_bytes):
        s = piece.decode("utf-8", "surrogatepass")
        yield s if first else ContinuedText(s)
        first = False


# -- opening ---------------------------------------------------------------------------
def _open_binary(path: Path) -> BinaryIO:
    """A binary stream of the file's (decompressed) content."""
    comp = _compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def parquet_texts(batch, text_field: str, path, summary: CorpusSummary) -> list[str]:
    """A parquet batch's text column as documents; null rows are skipped and counted, and the
    bytes and documents added to `summary` (the single-process and the sharded reader share it)."""
    col = batch.get_column(text_field)
    nulls = col.null_count()
    if nulls:
        for _ in range(nulls):
            summary.skip(f"parquet row whose {text_field!r} is null", path)
        col = col.drop_nulls()
    summary.bytes += int(col.str.len_bytes().sum() or 0)
    texts = col.to_list()
    summary.documents += len(texts)
    return texts


def _decode(data: bytes, summary: CorpusSummary) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        summary.invalid_utf8 += 1
    return text


_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error)


def _zstd_error() -> tuple[type[BaseException], ...]:
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        return ()


# -- readers per format ------------------------------------------------------------------
def _read_text(path: Path, summary: CorpusSummary, piece_bytes: int | None = None) -> Iterator[str]:
    """One document per file, yielded in pieces (`iter_pieces`): never the whole file in memory."""
    piece_bytes = piece_bytes or TEXT_PIECE_BYTES
    with _open_binary(path) as f:
        head = f.read(BINARY_SNIFF_BYTES)
        if b"\x00" in head:
            summary.skipped_binary += 1
            return
        summary.files += 1
        summary.documents += 1
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        blocks = itertools.chain([head], iter(lambda: f.read(piece_bytes), b""))
        invalid = False
        first = True
        for piece in iter_pieces(blocks, piece_bytes):
            summary.bytes += len(piece)
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                text = piece.decode("utf-8", errors="replace")
                if not invalid:  # counted once per document
                    summary.invalid_utf8 += 1
                    invalid = True
            yield text if first else ContinuedText(text)
            first = False
        if first:  # an empty file: one empty document
            yield ""


def _read_jsonl(path: Path, text_field: str, summary: CorpusSummary, tick: Callable[[], None]) -> Iterator[str]:
    with _open_binary(path) as f:
        head = f.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if hasattr(f, "peek") else b""
        if b"\x00" in head:
            summary.skipped_binary += 1
            return
        summary.files += 1
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_JSON_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_JSON_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # read past the rest of the line, block by block
                    raw = f.readline(1 << 20)
                summary.skip(f"JSON line longer than {MAX_JSON_LINE_BYTES} bytes", f"{path}:{lineno}")
                continue
            if not raw.strip():
                continue
            line = _decode(raw, summary) if lineno > 1 else _decode(raw.removeprefix(b"\xef\xbb\xbf"), summary)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                summary.skip("JSON line that does not parse", f"{path}:{lineno}")
                continue
            except RecursionError:  # e.g. [[[[...]]]] nested deeper than the interpreter's stack
                summary.skip("JSON line nested too deeply", f"{path}:{lineno}")
                continue
            if not isinstance(record, dict) or text_field not in record:
                summary.skip(f"JSON line without field {text_field!r}", f"{path}:{lineno}")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                summary.skip(f"JSON line whose {text_field!r} is not a string", f"{path}:{lineno}")
                continue
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escaped in the JSON (\ud800)
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                summary.invalid_utf8 += 1
                size = len(text.encode("utf-8"))
            summary.documents += 1
            summary.bytes += size
            if summary.documents % PROGRESS_EVERY_RECORDS == 0:
                tick()
            yield from split_text(text)


def _read_parquet(path: Path, text_field: str, summary: CorpusSummary, tick: Callable[[], None], tmp_dir: Path | None) -> Iterator[str]:
    import polars as pl

    tmp: Path | None = None
    source = path
    if _compression(path) is not None:  # parquet needs a seekable file: decompress to a temporary one
        fd, name = tempfile.mkstemp(suffix=".parquet", dir=tmp_dir)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out, _open_binary(path) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        source = tmp
    try:
        try:
            schema = pl.read_parquet_schema(source)
        except Exception:  # polars raises its own ComputeError/OSError flavours
            summary.skip("unreadable parquet file", path)
            return
        if text_field not in schema:
            raise CorpusError(f"parquet file {str(path)!r} has no column {text_field!r} (columns: {', '.join(schema)}); pass --text-field NAME")
        if schema[text_field] not in (pl.String, pl.Utf8):
            raise CorpusError(f"column {text_field!r} of {str(path)!r} is {schema[text_field]}, not text; pass --text-field with a string column")
        summary.files += 1
        batches = pl.scan_parquet(source).select(pl.col(text_field)).collect_batches(chunk_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except pl.exceptions.PolarsError:  # e.g. a corrupt page mid-file: keep what was read
                summary.skip("unreadable parquet file (stopped mid-file)", path)
                break
            texts = parquet_texts(batch, text_field, path, summary)
            tick()
            for text in texts:
                yield from split_text(text)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def iter_documents(
    paths: Iterable[str | os.PathLike],
    *,
    text_field: str = "text",
    summary: CorpusSummary | None = None,
    progress: Progress | None = None,
    tmp_dir: Path | None = None,
    expanded: bool = False,
) -> Iterator[str]:
    """Yield the documents of a corpus, filling `summary` as it goes.

    `expanded=True`: `paths` is already the file list `corpus_files` returned (the
    pipeline expands the corpus once and passes the list along), read as given.
    Raises `CorpusError` for a missing path (before yielding anything) and, once the
    files are exhausted, when no document was found.
    """
    summary = summary if summary is not None else CorpusSummary()
    files = [Path(p) for p in paths] if expanded else corpus_files(paths, summary)
    sizes = []
    for p in files:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(0)
    total = float(sum(sizes))
    done = 0.0
    zstd_errors = _zstd_error()

    def tick(detail: str = "") -> None:
        if progress is not None:
            progress("reading", done, total, detail)

    for path, size in zip(files, sizes):
        base = _base_suffix(path)
        try:
            if base in JSONL_SUFFIXES:
                yield from _read_jsonl(path, text_field, summary, lambda: tick(str(path)))
            elif base in PARQUET_SUFFIXES:
                yield from _read_parquet(path, text_field, summary, lambda: tick(str(path)), tmp_dir)
            else:
                yield from _read_text(path, summary)
        except (*_DECOMPRESS_ERRORS, *zstd_errors) as e:
            if _compression(path) is not None and not isinstance(e, PermissionError):
                summary.skip("corrupt or truncated compressed file", path)
            else:
                summary.skip(f"unreadable file ({getattr(e, 'strerror', None) or type(e).__name__})", path)
        done += size
        tick(str(path))
    if summary.documents == 0:
        raise CorpusError(empty_corpus_message(files, summary, text_field))


def empty_corpus_message(files: list[Path], summary: CorpusSummary, text_field: str = "text") -> str:
    """One line: why a corpus gave no document (or no token), and what to do."""
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files"
    if not files:
        return "the corpus has no files (directories are empty or hold only hidden files); pass files with text"
    reasons = []
    if summary.skipped_binary:
        reasons.append(f"{summary.skipped_binary} binary files skipped")
    reasons.extend(f"{n} x {reason} (first: {summary.skipped_examples[reason]})" for reason, n in summary.skipped_other.items())
    if summary.documents and not summary.tokens:
        what = f"the corpus ({where}, {summary.documents} documents) has no tokens: every document is empty"
    else:
        what = f"the corpus ({where}) has no documents"
    why = f": {'; '.join(reasons)}" if reasons else ""
    return f"{what}{why}; pass text files, or .jsonl/.parquet with a {text_field!r} field (or set --text-field)"
