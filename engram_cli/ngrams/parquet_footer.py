"""Column maxima from a parquet file's footer, without reading a data page.

A parquet file ends with its `FileMetaData` (Thrift compact protocol), a 4-byte
little-endian length and `PAR1`. Every row group's column chunk may carry `Statistics`
with the column's min and max. `column_max` reads only that footer (a few KiB per
thousand row groups) and returns the largest max of an unsigned integer column over all
row groups, or None when a row group lacks the statistic (the caller then knows nothing
and must not guess). polars writes these statistics by default; polars itself exposes
only the footer's key-value metadata, and pyarrow is not a dependency, hence this
reader of the few fields needed (parquet-format's parquet.thrift):

    FileMetaData   4: row_groups list<RowGroup>
    RowGroup       1: columns list<ColumnChunk>,  3: num_rows i64
    ColumnChunk    3: meta_data ColumnMetaData
    ColumnMetaData 1: type i32 (1 INT32, 2 INT64),  3: path_in_schema list<binary>,
                   12: statistics Statistics
    Statistics     5: max_value binary (the deprecated 1: max may sort signed: unused)

Anything malformed raises `FooterError` (a ValueError).
"""

from __future__ import annotations

import os
import struct

MAGIC = b"PAR1"
MAX_FOOTER_BYTES = 1 << 28  # 256 MiB: far above any footer of ours (about 100 bytes per column chunk)
_MAX_DEPTH = 16  # the footer's structs nest 4 deep; deeper is not a parquet footer

# Thrift compact types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)
_INT32, _INT64 = 1, 2  # parquet physical types


class FooterError(ValueError):
    """A parquet footer that cannot be read."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("footer ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise FooterError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def binary(self) -> bytes:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise FooterError("binary field runs past the footer")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def value(self, kind: int, depth: int):
        if depth > _MAX_DEPTH:
            raise FooterError("structs nested too deeply")
        if kind in (_TRUE, _FALSE):
            return kind == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.pos += 8
            return None
        if kind == _BINARY:
            return self.binary()
        if kind in (_LIST, _SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if elem in (_TRUE, _FALSE):  # booleans in a list take one byte each
                return [self.byte() == 1 for _ in range(size)]
            return [self.value(elem, depth + 1) for _ in range(size)]
        if kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.value(types >> 4, depth + 1)
                    self.value(types & 0x0F, depth + 1)
            return None
        if kind == _STRUCT:
            return self.struct(depth + 1)
        raise FooterError(f"unknown Thrift type {kind}")

    def struct(self, depth: int = 0) -> dict[int, object]:
        fields: dict[int, object] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == _STOP:
                return fields
            delta = head >> 4
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind, depth)


def read_footer(path: str | os.PathLike) -> dict[int, object]:
    """The file's `FileMetaData` as nested {field id: value} dicts (lists as lists)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise FooterError(f"{size} bytes: too short for a parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != MAGIC:
            raise FooterError("no PAR1 at the end: truncated or not parquet")
        n = struct.unpack("<I", tail[:4])[0]
        if n > min(MAX_FOOTER_BYTES, size - 12):
            raise FooterError(f"footer length {n} does not fit the file ({size} bytes)")
        f.seek(size - 8 - n)
        data = f.read(n)
    return _Reader(data).struct()


def column_maxima(path: str | os.PathLike, columns) -> dict[str, int | None]:
    """{column: its largest value over all row groups} for unsigned integer columns, from the footer alone.

    A column's value is None when the file holds no row, or when any row group lacks
    its max statistic (unknown, not zero). One pass over the footer for all columns.
    `FooterError` when the footer is malformed.
    """
    meta = read_footer(path)
    names = {c.encode(): c for c in columns}
    top: dict[str, int | None] = dict.fromkeys(names.values())
    unknown: set[str] = set()
    for group in meta.get(4) or []:
        if not isinstance(group, dict):
            raise FooterError("a row group is not a struct")
        if not group.get(3):  # an empty row group holds no value
            continue
        seen = set()
        for chunk in group.get(1) or []:
            cmeta = chunk.get(3) if isinstance(chunk, dict) else None
            path_in_schema = cmeta.get(3) if isinstance(cmeta, dict) else None
            if not isinstance(path_in_schema, list) or len(path_in_schema) != 1 or path_in_schema[0] not in names:
                continue
            name = names[path_in_schema[0]]
            seen.add(name)
            stats = cmeta.get(12)
            raw = stats.get(5) if isinstance(stats, dict) else None  # max_value; the deprecated `max` may sort signed
            fmt = {_INT32: "<I", _INT64: "<Q"}.get(cmeta.get(1))
            if raw is None or fmt is None or len(raw) != struct.calcsize(fmt):
                unknown.add(name)
                continue
            value = struct.unpack(fmt, raw)[0]
            top[name] = value if top[name] is None else max(top[name], value)
        unknown.update(set(names.values()) - seen)  # a column absent from a row group
    return {c: (None if c in unknown else v) for c, v in top.items()}


def column_max(path: str | os.PathLike, column: str) -> int | None:
    """`column_maxima` of one column."""
    return column_maxima(path, [column])[column]
