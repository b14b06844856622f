"""Map shards: split a corpus into picklable, fingerprinted pieces that read exactly like the whole.

A `Shard` names one piece of one corpus file; reading every shard of `plan_shards`
in order with `iter_shard_documents` yields exactly the documents (and fills exactly
the `CorpusSummary` figures, once merged in order) that `corpus.iter_documents` yields
for the same files. The kinds:

    file    a whole file (plain text, which is one document however large, and
            every compressed file, which cannot be entered in the middle)
    lines   a byte range [start, stop) of an uncompressed .jsonl/.ndjson file,
            both ends on line boundaries (start is 0 or just after a newline):
            the shard owns the lines that begin inside it
    rows    a row range [start, stop) of an uncompressed .parquet file, read with
            polars' slice push-down (row groups outside the range are skipped)

Only the first shard of a file counts the file (`files`, `skipped_binary`); the
others count only their own documents. A shard's `fingerprint` covers the file's
identity (resolved path, size, mtime), the kind, the range and the text field, so a
resumed build reuses a partial only for the very same input.

Planning reads at most a few KiB per boundary (to find the next newline) and the
parquet footer (row count and schema); it never reads a file through.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from . import corpus as _corpus
from .corpus import CorpusSummary, corpus_files
from .errors import CorpusError

ShardKind = Literal["file", "lines", "rows"]
SHARD_KINDS: tuple[str, ...] = ("file", "lines", "rows")

# A map task's input: big enough that the per-task cost (a process picks up the task,
# loads the tokenizer, about 0.3 s here) is small beside tokenizing it (~4 MB/s per
# core measured with the DeepSeek tokenizer), small enough to spread a corpus of a few
# GB over tens of workers and to retry cheaply.
DEFAULT_SHARD_BYTES = 64 << 20
PARQUET_MIN_ROWS = 1024  # never split a parquet file into row ranges smaller than this
_SCAN_BYTES = 1 << 16  # read step when looking for the next newline


@dataclass(frozen=True)
class Shard:
    """One map task's input: `kind` of `path` over [start, stop) (bytes for lines, rows for rows)."""

    index: int  # position in the corpus order (merges run in this order)
    path: str  # the file as `corpus_files` listed it
    kind: str  # one of SHARD_KINDS
    start: int = 0
    stop: int = 0  # exclusive; 0 with start 0 for a whole file
    first: bool = True  # the first shard of its file: counts the file itself
    size: int = 0  # the file's size in bytes when planned
    mtime_ns: int = 0  # the file's modification time when planned
    text_field: str = "text"

    @property
    def fingerprint(self) -> str:
        """sha256 of what the shard reads: file identity, kind, range, text field."""
        ident = {k: v for k, v in asdict(self).items() if k != "index"}
        ident["path"] = str(Path(self.path).resolve())
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    @property
    def weight(self) -> int:
        """Bytes the shard covers (approximate for parquet row ranges), for progress and balancing."""
        if self.kind == "lines":
            return self.stop - self.start
        if self.kind == "rows" and self.stop:
            return self.size * (self.stop - self.start) // max(1, self._rows_total)
        return self.size

    _rows_total: int = 0  # rows of the whole parquet file (rows shards only)

    def describe(self) -> str:
        if self.kind == "file":
            return self.path
        unit = "bytes" if self.kind == "lines" else "rows"
        return f"{self.path} [{unit} {self.start}:{self.stop}]"


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _next_line_start(f, pos: int, size: int) -> int:
    """The first offset >= pos that starts a line (0, or just after a newline); `size` at the end."""
    if pos <= 0:
        return 0
    f.seek(pos - 1)
    while True:
        block = f.read(_SCAN_BYTES)
        if not block:
            return size
        nl = block.find(b"\n")
        if nl >= 0:
            return f.tell() - len(block) + nl + 1
        # no newline yet: keep reading (a very long line stays in one shard)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_corpus.BINARY_SNIFF_BYTES)


def _jsonl_shards(path: Path, size: int, mtime: int, shard_bytes: int, text_field: str) -> list[Shard]:
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] < size:
            nxt = _next_line_start(f, bounds[-1] + shard_bytes, size)
            bounds.append(min(nxt, size))
    return [
        Shard(0, str(path), "lines", a, b, first=(i == 0), size=size, mtime_ns=mtime, text_field=text_field)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def _parquet_rows(path: Path, text_field: str) -> int | None:
    """Row count of a parquet file from its footer; None when polars cannot read it (the reader skips it)."""
    import polars as pl

    try:
        schema = pl.read_parquet_schema(path)
        rows = int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except Exception:  # polars raises its own ComputeError/OSError flavours
        return None
    if text_field not in schema:
        raise CorpusError(f"parquet file {str(path)!r} has no column {text_field!r} (columns: {', '.join(schema)}); pass --text-field NAME")
    return rows


def _parquet_shards(path: Path, size: int, mtime: int, shard_bytes: int, text_field: str) -> list[Shard] | None:
    rows = _parquet_rows(path, text_field)
    if rows is None or rows == 0:
        return None
    pieces = max(1, min(-(-size // shard_bytes), rows // PARQUET_MIN_ROWS or 1))
    if pieces == 1:
        return None
    step = -(-rows // pieces)
    return [
        Shard(0, str(path), "rows", a, min(rows, a + step), first=(a == 0), size=size, mtime_ns=mtime, text_field=text_field, _rows_total=rows)
        for a in range(0, rows, step)
    ]


def plan_shards(
    paths: Iterable[str | os.PathLike],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    text_field: str = "text",
    summary: CorpusSummary | None = None,
    expanded: bool = False,
) -> list[Shard]:
    """Split the corpus `paths` into map shards, in corpus order (see the module docstring).

    Uncompressed .jsonl/.ndjson files larger than `shard_bytes` split into byte ranges
    on line boundaries, uncompressed .parquet files into row ranges; everything else is
    one shard per file. `summary` receives what expanding the corpus skips (table
    stores); pass it to the merge first. `expanded=True`: `paths` is already the list
    `corpus_files` returned.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    files = [Path(p) for p in paths] if expanded else corpus_files(paths, summary)
    shards: list[Shard] = []
    for path in files:
        try:
            size, mtime = _identity(path)
        except OSError:
            size, mtime = 0, 0
        base = _corpus._base_suffix(path)
        pieces: list[Shard] | None = None
        if size > shard_bytes and _corpus._compression(path) is None:
            if base in _corpus.JSONL_SUFFIXES:
                try:
                    binary = _is_binary(path)
                except OSError:
                    binary = True  # unreadable: the whole-file reader reports it
                if not binary:
                    pieces = _jsonl_shards(path, size, mtime, shard_bytes, text_field)
            elif base in _corpus.PARQUET_SUFFIXES:
                pieces = _parquet_shards(path, size, mtime, shard_bytes, text_field)
        if not pieces:
            pieces = [Shard(0, str(path), "file", size=size, mtime_ns=mtime, text_field=text_field)]
        shards.extend(pieces)
    return [Shard(**{**_fields(s), "index": i}) for i, s in enumerate(shards)]


def group_shards(shards: list[Shard], shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[tuple[Shard, ...]]:
    """Pack consecutive shards into map tasks of about `shard_bytes` each, in corpus order.

    Small files travel together (a task per 2 KB file would cost more in scheduling
    and per-task output than in counting); a piece already about `shard_bytes` big is
    a task on its own. Reading a group's pieces one after the other is reading them
    in corpus order, so the merge of the groups is still the whole.
    """
    groups: list[list[Shard]] = []
    size = 0
    for s in shards:
        w = max(1, s.weight)
        if not groups or size + w > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += w
    return [tuple(g) for g in groups]


def _fields(s: Shard) -> dict:
    return {k: getattr(s, k) for k in Shard.__dataclass_fields__}


# -- reading -------------------------------------------------------------------------------
def _line_number(path: Path, offset: int) -> int:
    """Lines before byte `offset` (read only when a skip must name a line)."""
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


def _read_lines(shard: Shard, summary: CorpusSummary, tick: Callable[[], None]) -> Iterator[str]:
    """The documents of a `lines` shard, parsed exactly as `corpus._read_jsonl` parses a whole file."""
    path = Path(shard.path)
    text_field = shard.text_field
    if _is_binary(path):
        if shard.first:
            summary.skipped_binary += 1
        return
    if shard.first:
        summary.files += 1
    base_line: list[int] = []  # lines before the shard, counted on first need

    def where(local: int) -> str:
        if not base_line:
            base_line.append(_line_number(path, shard.start))
        return f"{path}:{base_line[0] + local}"

    with open(path, "rb") as f:
        f.seek(shard.start)
        pos = shard.start
        local = 0
        while pos < shard.stop:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            local += 1
            if not raw.strip():
                continue
            if shard.start == 0 and local == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            line = _corpus._decode(raw, summary)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                summary.skip("JSON line that does not parse", where(local))
                continue
            if not isinstance(record, dict) or text_field not in record:
                summary.skip(f"JSON line without field {text_field!r}", where(local))
                continue
            text = record[text_field]
            if not isinstance(text, str):
                summary.skip(f"JSON line whose {text_field!r} is not a string", where(local))
                continue
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escaped in the JSON (\ud800)
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                summary.invalid_utf8 += 1
                size = len(text.encode("utf-8"))
            summary.documents += 1
            summary.bytes += size
            if summary.documents % _corpus.PROGRESS_EVERY_RECORDS == 0:
                tick()
            yield text


def _read_rows(shard: Shard, summary: CorpusSummary, tick: Callable[[], None]) -> Iterator[str]:
    """The documents of a `rows` shard, as `corpus._read_parquet` reads those rows of the file."""
    import polars as pl

    path = Path(shard.path)
    text_field = shard.text_field
    schema = pl.read_parquet_schema(path)
    if schema[text_field] not in (pl.String, pl.Utf8):
        raise CorpusError(f"column {text_field!r} of {str(path)!r} is {schema[text_field]}, not text; pass --text-field with a string column")
    if shard.first:
        summary.files += 1
    frame = pl.scan_parquet(path).select(pl.col(text_field)).slice(shard.start, shard.stop - shard.start)
    for batch in frame.collect_batches(chunk_size=_corpus.PARQUET_BATCH_ROWS):
        texts = _corpus.parquet_texts(batch, text_field, path, summary)
        tick()
        yield from texts


def _read_file(shard: Shard, summary: CorpusSummary, tick: Callable[[], None], tmp_dir: Path | None) -> Iterator[str]:
    """A whole file, through the same readers and error handling as `corpus.iter_documents`."""
    path = Path(shard.path)
    base = _corpus._base_suffix(path)
    try:
        if base in _corpus.JSONL_SUFFIXES:
            yield from _corpus._read_jsonl(path, shard.text_field, summary, tick)
        elif base in _corpus.PARQUET_SUFFIXES:
            yield from _corpus._read_parquet(path, shard.text_field, summary, tick, tmp_dir)
        else:
            yield from _corpus._read_text(path, summary)
    except (*_corpus._DECOMPRESS_ERRORS, *_corpus._zstd_error()) as e:
        if _corpus._compression(path) is not None and not isinstance(e, PermissionError):
            summary.skip("corrupt or truncated compressed file", path)
        else:
            summary.skip(f"unreadable file ({getattr(e, 'strerror', None) or type(e).__name__})", path)


def check_unchanged(shard: Shard) -> None:
    """Raise `CorpusError` when the shard's file changed (size or mtime) since it was planned."""
    path = Path(shard.path)
    try:
        size, mtime = _identity(path)
    except OSError as e:
        raise CorpusError(f"corpus file {shard.path!r} vanished during the build ({e.strerror}); restore it and rerun with --resume") from None
    if (size, mtime) != (shard.size, shard.mtime_ns):
        raise CorpusError(f"corpus file {shard.path!r} changed during the build (size {shard.size} -> {size}); rerun once the corpus is final")


def iter_shard_documents(
    shard: Shard,
    *,
    summary: CorpusSummary | None = None,
    progress: Callable[..., None] | None = None,
    tmp_dir: Path | None = None,
) -> Iterator[str]:
    """Yield the documents of `shard`, filling `summary` with its share of the corpus figures.

    Never raises for an empty shard (a binary file, a range of blank lines): the
    driver checks the merged corpus. Raises `CorpusError` when the file changed since
    planning, or for a parquet column that is missing or not text.
    """
    summary = summary if summary is not None else CorpusSummary()
    if shard.kind not in SHARD_KINDS:
        raise ValueError(f"unknown shard kind {shard.kind!r}; expected one of {SHARD_KINDS}")
    if shard.kind != "file":
        check_unchanged(shard)

    def tick() -> None:
        if progress is not None:
            progress("reading", summary.bytes, None, shard.describe())

    if shard.kind == "lines":
        yield from _read_lines(shard, summary, tick)
    elif shard.kind == "rows":
        yield from _read_rows(shard, summary, tick)
    else:
        yield from _read_file(shard, summary, tick, tmp_dir)


def merge_summaries(first: CorpusSummary, parts: Iterable[CorpusSummary]) -> CorpusSummary:
    """`first` (what expanding the corpus skipped) followed by the shards' summaries, in order (`CorpusSummary.merge`)."""
    return first.merge(list(parts))


__all__ = ["DEFAULT_SHARD_BYTES", "group_shards", "merge_summaries", "SHARD_KINDS", "Shard", "ShardKind", "check_unchanged", "iter_shard_documents", "plan_shards"]
