"""Shard planning: split a corpus into picklable, fingerprinted map shards that read exactly like the whole.

A `Shard` names one piece of one corpus file; reading every shard of `plan_shards`
in order with `iter_shard_documents` yields exactly the documents (and fills exactly
the `CorpusSummary` figures, once merged in order) that `readers.iter_documents`
yields for the same files, because both read through the same reader per format
(`readers.read_file`, here over the shard's range). The kinds:

    file    a whole file (plain text, which is one document however large, and
            every compressed file, which cannot be entered in the middle)
    lines   a byte range [start, stop) of an uncompressed .jsonl/.ndjson file,
            both ends on line boundaries (start is 0 or just after a newline):
            the shard owns the lines that begin inside it (`readers.read_jsonl`)
    rows    a row range [start, stop) of an uncompressed .parquet file, read with
            polars' slice push-down (row groups outside the range are skipped)

Only the first shard of a file (`first`: its range starts at 0) counts the file
(`files`, `skipped_binary`); the others count only their own documents. A shard's `fingerprint` covers the file's
identity (resolved path, size, mtime), a sampled hash of the bytes it reads (`sample`),
the kind, the range and the text field, so a resumed build reuses a partial only for the
very same input, even when a file was changed at the same size and its mtime restored.

The sample (`sampled_digest`) is XXH3-128 of the shard's bytes when they are at most
3 x 64 KiB, else of its first, middle and last 64 KiB (plus the range): planning reads
at most 192 KiB per shard (a 64 MiB piece: 0.3% of it, about 0.1 ms from the page cache
with xxhash at ~10 GB/s, one or three seeks from disk). An edit of a large shard outside
the sampled windows that keeps the size and restores the mtime is not seen.

Planning reads at most a few KiB per boundary (to find the next newline), the sampled
windows and the parquet footer (row count and schema); it never reads a file through.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import xxhash

from engram_cli.corpus.files import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    base_suffix,
    compression,
    corpus_files,
    looks_binary,
)
from engram_cli.corpus.readers import Progress, next_line_start, read_file
from engram_cli.corpus.summary import CorpusSummary
from engram_cli.defaults import DEFAULT_TEXT_FIELD
from engram_cli.errors import CorpusError

ShardKind = Literal["file", "lines", "rows"]
SHARD_KINDS: tuple[str, ...] = ("file", "lines", "rows")

# A map task's input: big enough that the per-task cost (a process picks up the task,
# loads the tokenizer, about 0.3 s here) is small beside tokenizing it (~4 MB/s per
# core measured with the DeepSeek tokenizer), small enough to spread a corpus of a few
# GB over tens of workers and to retry cheaply.
DEFAULT_SHARD_BYTES = 64 << 20
PARQUET_MIN_ROWS = 1024  # never split a parquet file into row ranges smaller than this


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
    text_field: str = DEFAULT_TEXT_FIELD
    sample: str = ""  # `sampled_digest` of the bytes the shard reads, when planned

    @property
    def fingerprint(self) -> str:
        """sha256 of what the shard reads: file identity, sampled content hash, kind, range, text field."""
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


SAMPLE_BYTES = 64 << 10  # each sampled window of `sampled_digest`


def sampled_digest(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> str:
    """XXH3-128 (hex) of bytes [start, stop) of a file: all of them up to 3 x 64 KiB, else the first,
    middle and last 64 KiB; "" when the file cannot be read (its reader reports that)."""
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            if stop is None:
                stop = os.fstat(f.fileno()).st_size
            n = max(0, stop - start)
            h.update(f"{start}:{stop}:".encode())
            if n <= 3 * SAMPLE_BYTES:
                windows = [(start, n)]
            else:
                windows = [(start, SAMPLE_BYTES), (start + (n - SAMPLE_BYTES) // 2, SAMPLE_BYTES), (stop - SAMPLE_BYTES, SAMPLE_BYTES)]
            for at, size in windows:
                f.seek(at)
                h.update(f.read(size))
    except OSError:
        return ""
    return h.hexdigest()


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _jsonl_shards(path: Path, size: int, mtime: int, shard_bytes: int, text_field: str) -> list[Shard]:
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] < size:
            nxt = next_line_start(f, bounds[-1] + shard_bytes)
            bounds.append(min(nxt, size))
    return [
        Shard(0, str(path), "lines", a, b, first=(i == 0), size=size, mtime_ns=mtime, text_field=text_field)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def _parquet_rows(path: Path, text_field: str) -> int | None:
    """Row count of a parquet file from its footer; None when polars cannot read it (the reader skips it)."""
    import polars as pl  # ~0.1 s to import: only a corpus with parquet files pays it

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
    text_field: str = DEFAULT_TEXT_FIELD,
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
        base = base_suffix(path)
        pieces: list[Shard] | None = None
        if size > shard_bytes and compression(path) is None:
            if base in JSONL_SUFFIXES:
                try:
                    binary = looks_binary(path)
                except OSError:
                    binary = True  # unreadable: the whole-file reader reports it
                if not binary:
                    pieces = _jsonl_shards(path, size, mtime, shard_bytes, text_field)
            elif base in PARQUET_SUFFIXES:
                pieces = _parquet_shards(path, size, mtime, shard_bytes, text_field)
        if not pieces:
            pieces = [Shard(0, str(path), "file", size=size, mtime_ns=mtime, text_field=text_field)]
        whole = None
        for piece in pieces:
            if piece.kind == "lines":
                shards.append(Shard(**{**_fields(piece), "sample": sampled_digest(path, piece.start, piece.stop)}))
            else:  # a whole file, or parquet rows (not a byte range): the file's sample
                whole = sampled_digest(path) if whole is None else whole
                shards.append(Shard(**{**_fields(piece), "sample": whole}))
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


# -- reading ---------------------------------------------------------------------------------
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
    progress: Progress | None = None,
    tmp_dir: Path | None = None,
) -> Iterator[str]:
    """Yield the documents of `shard`, filling `summary` with its share of the corpus figures.

    The file's reader (`readers.read_file`) over the shard's range: bytes for `lines`,
    rows for `rows`, the whole file for `file`. Never raises for an empty shard (a
    binary file, a range of blank lines): the driver checks the merged corpus. Raises
    `CorpusError` when the file changed since planning, or for a parquet column that
    is missing or not text.
    """
    summary = summary if summary is not None else CorpusSummary()
    if shard.kind not in SHARD_KINDS:
        raise ValueError(f"unknown shard kind {shard.kind!r}; expected one of {SHARD_KINDS}")
    if shard.kind != "file":
        check_unchanged(shard)

    def tick() -> None:
        if progress is not None:
            progress("reading", summary.bytes, None, shard.describe())

    start, stop = (0, None) if shard.kind == "file" else (shard.start, shard.stop)
    yield from read_file(Path(shard.path), text_field=shard.text_field, summary=summary, tick=tick, tmp_dir=tmp_dir, start=start, stop=stop)


def merge_summaries(first: CorpusSummary, parts: Iterable[CorpusSummary]) -> CorpusSummary:
    """`first` (what expanding the corpus skipped) followed by the shards' summaries, in order (`CorpusSummary.merge`)."""
    return first.merge(list(parts))


__all__ = ["DEFAULT_SHARD_BYTES", "group_shards", "merge_summaries", "SHARD_KINDS", "Shard", "ShardKind", "check_unchanged", "iter_shard_documents", "plan_shards"]
