"""Reading documents: ONE reader per input format, over a whole file or a range of it.

One *document* is what the n-gram windows never cross:

    plain text           the whole file is one document (`read_text`)
    *.jsonl / *.ndjson   one document per line: the string field `text_field`
                         (`read_jsonl`, over an optional byte range)
    *.parquet            one document per row: the string column `text_field`, read
                         in batches, never the whole file (`read_parquet`, over an
                         optional row range)

`read_file` picks the reader by suffix (`files.base_suffix`) and turns read errors into
counted skips; `iter_documents` reads whole files with it, and `shards.iter_shard_documents`
reads a shard's range with the very same readers. A range [start, stop) owns the JSON
lines that *begin* inside it (a start inside a line moves to the next line start) or
the parquet rows inside it; only the range starting at 0 counts the file itself
(`files`, `skipped_binary`). So reading the ranges of a file one after the other
yields exactly the documents, and fills exactly the `CorpusSummary` figures once
merged in order, that reading the file whole does. A plain-text file has no range: it
is one document, and counting two halves apart would lose the n-grams across the cut.

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
document; binary files (a NUL byte in the first `files.BINARY_SNIFF_BYTES`) are
skipped and counted; JSON lines that do not parse, nest too deeply, or lack the field
are skipped and counted by reason. A corpus with no document at all raises
`CorpusError` (`iter_documents`), and so does a parquet file without a string column
`text_field`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import zstandard

from engram_cli.corpus.files import (
    BINARY_SNIFF_BYTES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    base_suffix,
    compression,
    corpus_files,
    looks_binary,
    open_binary,
)
from engram_cli.corpus.summary import CorpusSummary, empty_corpus_message
from engram_cli.defaults import DEFAULT_TEXT_FIELD
from engram_cli.errors import CorpusError

Progress = Callable[..., None]  # progress(stage, done, total=None, detail="")
Tick = Callable[[], None]  # a reader's "some progress was made" callback

PARQUET_BATCH_ROWS = 4096  # rows per parquet batch: bounds memory on long documents
PROGRESS_EVERY_RECORDS = 2048
TEXT_PIECE_BYTES = 1 << 18  # a plain-text document is read and tokenized in pieces of about this size
MAX_JSON_LINE_BYTES = 64 << 20  # a longer JSON line is skipped, never held whole
_CUT_SEARCH_BYTES = 1 << 16  # how far back from a piece's end a safe cut is looked for
_SCAN_BYTES = 1 << 16  # read step when looking for the next line start
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


class ContinuedText(str):
    """A piece of text that continues the previous document (no document boundary before it)."""

    __slots__ = ()


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


# -- helpers shared by the readers ---------------------------------------------------------
def _decode(data: bytes, summary: CorpusSummary) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        summary.invalid_utf8 += 1
    return text


def _no_tick() -> None:
    pass


def next_line_start(f: BinaryIO, pos: int) -> int:
    """The first offset >= pos of seekable `f` that starts a line (0, or just after a newline); the end offset when none.

    Reads from pos - 1 in `_SCAN_BYTES` blocks up to the next newline (a very long
    line is read through, never held).
    """
    if pos <= 0:
        return 0
    f.seek(pos - 1)
    while True:
        block = f.read(_SCAN_BYTES)
        if not block:
            return f.seek(0, os.SEEK_END)
        nl = block.find(b"\n")
        if nl >= 0:
            return f.tell() - len(block) + nl + 1


def _lines_before(path: Path, offset: int) -> int:
    """Newlines before byte `offset` of `path` (read only when a skip must name a line)."""
    count = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


# -- one reader per format ----------------------------------------------------------------
def read_text(path: Path, summary: CorpusSummary, piece_bytes: int | None = None) -> Iterator[str]:
    """One document per file, yielded in pieces (`iter_pieces`): never the whole file in memory."""
    piece_bytes = piece_bytes or TEXT_PIECE_BYTES
    with open_binary(path) as f:
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


def read_jsonl(path: Path, text_field: str, summary: CorpusSummary, tick: Tick = _no_tick, *, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The documents of the JSON lines that begin in bytes [start, stop) of `path` (None: to the end).

    A `start` inside a line moves on to the next line start; a line that begins
    before `stop` is read whole, past `stop`. Only `start == 0` counts the file
    (`files`, or `skipped_binary`) and strips a byte-order mark. A skip names the
    file's line number (`path:N`). A range other than from 0 needs an uncompressed file.
    """
    first = start == 0
    if looks_binary(path):
        if first:
            summary.skipped_binary += 1
        return
    if first:
        summary.files += 1
    with open_binary(path) as f:
        if not first:
            if compression(path) is not None:
                raise ValueError(f"a byte range of {str(path)!r} needs an uncompressed file; read a compressed file whole")
            start = next_line_start(f, start)
            f.seek(start)
        base_line: list[int] = []  # lines before `start`, counted on the first skip

        def where(lineno: int) -> str:
            if not base_line:
                base_line.append(_lines_before(path, start) if start else 0)
            return f"{path}:{base_line[0] + lineno}"

        pos = start
        lineno = 0
        while stop is None or pos < stop:
            raw = f.readline(MAX_JSON_LINE_BYTES + 1)
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            if len(raw) > MAX_JSON_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # read past the rest of the line, block by block
                    raw = f.readline(1 << 20)
                    pos += len(raw)
                summary.skip(f"JSON line longer than {MAX_JSON_LINE_BYTES} bytes", where(lineno))
                continue
            if not raw.strip():
                continue
            if start == 0 and lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            line = _decode(raw, summary)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                summary.skip("JSON line that does not parse", where(lineno))
                continue
            except RecursionError:  # e.g. [[[[...]]]] nested deeper than the interpreter's stack
                summary.skip("JSON line nested too deeply", where(lineno))
                continue
            if not isinstance(record, dict) or text_field not in record:
                summary.skip(f"JSON line without field {text_field!r}", where(lineno))
                continue
            text = record[text_field]
            if not isinstance(text, str):
                summary.skip(f"JSON line whose {text_field!r} is not a string", where(lineno))
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


def _parquet_texts(batch, text_field: str, path: Path, summary: CorpusSummary) -> list[str]:
    """A parquet batch's text column as documents; null rows are skipped and counted, bytes and documents added to `summary`."""
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


def read_parquet(
    path: Path, text_field: str, summary: CorpusSummary, tick: Tick = _no_tick, tmp_dir: Path | None = None, *, start: int = 0, stop: int | None = None,
) -> Iterator[str]:
    """The documents of rows [start, stop) of parquet file `path` (None: to the end), `PARQUET_BATCH_ROWS` at a time.

    Row groups outside the range are skipped (polars' slice push-down). Only
    `start == 0` counts the file (`files`, or its skip when unreadable). A compressed
    file is decompressed to a temporary file in `tmp_dir` first (parquet needs to seek).
    Raises `CorpusError` when the column `text_field` is missing or not text.
    """
    import polars as pl  # ~0.1 s to import: only a corpus with parquet files pays it

    first = start == 0
    tmp: Path | None = None
    source = path
    if compression(path) is not None:  # parquet needs a seekable file: decompress to a temporary one
        fd, name = tempfile.mkstemp(suffix=".parquet", dir=tmp_dir)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out, open_binary(path) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        source = tmp
    try:
        try:
            schema = pl.read_parquet_schema(source)
        except Exception:  # polars raises its own ComputeError/OSError flavours
            if first:
                summary.skip("unreadable parquet file", path)
            return
        if text_field not in schema:
            raise CorpusError(f"parquet file {str(path)!r} has no column {text_field!r} (columns: {', '.join(schema)}); pass --text-field NAME")
        if schema[text_field] not in (pl.String, pl.Utf8):
            raise CorpusError(f"column {text_field!r} of {str(path)!r} is {schema[text_field]}, not text; pass --text-field with a string column")
        if first:
            summary.files += 1
        frame = pl.scan_parquet(source).select(pl.col(text_field))
        if start or stop is not None:
            frame = frame.slice(start, None if stop is None else max(0, stop - start))
        batches = frame.collect_batches(chunk_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except pl.exceptions.PolarsError:  # e.g. a corrupt page mid-file: keep what was read
                summary.skip("unreadable parquet file (stopped mid-file)", path)
                break
            texts = _parquet_texts(batch, text_field, path, summary)
            tick()
            for text in texts:
                yield from split_text(text)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_file(
    path: Path,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    summary: CorpusSummary,
    tick: Tick = _no_tick,
    tmp_dir: Path | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[str]:
    """The documents of `path` by its format, over [start, stop): bytes of a JSON lines file, rows of a parquet file.

    The whole file by default; a plain-text file is always read whole. A file that
    cannot be read or decompressed is skipped and counted by reason (what was yielded
    before the error stays yielded).
    """
    path = Path(path)
    base = base_suffix(path)
    try:
        if base in JSONL_SUFFIXES:
            yield from read_jsonl(path, text_field, summary, tick, start=start, stop=stop)
        elif base in PARQUET_SUFFIXES:
            yield from read_parquet(path, text_field, summary, tick, tmp_dir, start=start, stop=stop)
        elif start or stop is not None:
            raise ValueError(f"{str(path)!r} is plain text, one document: it has no byte range; read it whole")
        else:
            yield from read_text(path, summary)
    except _DECOMPRESS_ERRORS as e:
        if compression(path) is not None and not isinstance(e, PermissionError):
            summary.skip("corrupt or truncated compressed file", path)
        else:
            summary.skip(f"unreadable file ({getattr(e, 'strerror', None) or type(e).__name__})", path)


def iter_documents(
    paths: Iterable[str | os.PathLike],
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    summary: CorpusSummary | None = None,
    progress: Progress | None = None,
    tmp_dir: Path | None = None,
    expanded: bool = False,
) -> Iterator[str]:
    """Yield the documents of a corpus, file after file, each read whole (`read_file`), filling `summary` as it goes.

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

    def tick(detail: str = "") -> None:
        if progress is not None:
            progress("reading", done, total, detail)

    for path, size in zip(files, sizes):
        yield from read_file(path, text_field=text_field, summary=summary, tick=lambda p=path: tick(str(p)), tmp_dir=tmp_dir)
        done += size
        tick(str(path))
    if summary.documents == 0:
        raise CorpusError(empty_corpus_message(files, summary, text_field))
