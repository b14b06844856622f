"""Finding a corpus's files: expand paths in a deterministic order, tell each file's format and compression, open it.

    directory            every file under it, recursively, in sorted path order;
                         hidden entries (a name starting with ".") are left out, and
                         so are Zarr stores and build staging directories (an earlier
                         `tables.zarr` or `tables.zarr.partial`; see `table_store_reason`)
    *.jsonl / *.ndjson   JSON lines             (`JSONL_SUFFIXES`)
    *.parquet            a parquet table        (`PARQUET_SUFFIXES`)
    anything else        plain UTF-8 text
    *.gz / *.zst         any of the above, decompressed while streaming (`open_binary`)

A path that does not exist, one that is not a regular file or directory (a FIFO or
device would block or never end), or an explicitly named table store raises
`CorpusError`.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

import zstandard

from engram_cli.corpus.summary import CorpusSummary
from engram_cli.errors import CorpusError

BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first this-many (decompressed) bytes: a binary file
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")  # Zarr v3 node metadata; v2 group/array
PARTIAL_SUFFIX = ".partial"  # a build stages its store in `<out>.partial` (engram_cli.store)
SKIP_TABLE_STORE = "Zarr table store or build staging directory (an output, not corpus)"


def base_suffix(path: Path) -> str:
    """The format suffix, under any compression suffix: `a.jsonl.gz` -> `.jsonl`."""
    name = path.name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return Path(name).suffix


def compression(path: Path) -> str | None:
    """The compression suffix (`.gz`, `.zst`) of `path`, or None for an uncompressed file."""
    name = path.name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if name.endswith(comp):
            return comp
    return None


def open_binary(path: Path) -> BinaryIO:
    """A binary stream of the file's (decompressed) content."""
    comp = compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def looks_binary(path: Path) -> bool:
    """Whether the file's first `BINARY_SNIFF_BYTES` (decompressed) bytes hold a NUL byte.

    Reads exactly that many bytes (not what one buffered `peek` happens to return,
    which is the file system's block size, often 4 KiB), so every reader of a file
    decides the same way.
    """
    with open_binary(path) as f:
        head = f.read(BINARY_SNIFF_BYTES)
    return b"\x00" in head


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
