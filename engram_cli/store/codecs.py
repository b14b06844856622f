"""Bounded chunk decoders: a zstd or blosc frame that declares more bytes than its chunk holds is refused before decoding.

zarr's own codecs hand a chunk to numcodecs, which allocates whatever the frame header
declares (a forged hits chunk declaring 3 GiB costs 3 GiB before it fails). The codecs
here are zarr's `zstd` and `blosc` codecs (same names, same metadata, same bytes
written) with one check first: the size the frame declares (zstd: the frame content
size, required; blosc: `nbytes` of its 16-byte header) is at most the chunk's decoded
size, `prod(chunk shape) x itemsize`, from the array's metadata. Importing
`engram_cli.store` registers them for zarr (`zarr.config` `codecs.zstd` /
`codecs.blosc`), so every store read in the process goes through them.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs.blosc import BloscCodec
from zarr.codecs.zstd import ZstdCodec
from zarr.registry import register_codec

ZSTD_MAGIC = 0xFD2FB528


class ChunkSizeError(ValueError):
    """A compressed chunk declares more decoded bytes than its chunk can hold (or none at all)."""


def chunk_nbytes(chunk_spec) -> int:
    """Decoded bytes of one chunk: prod(shape) x itemsize, from the array's metadata."""
    dtype = chunk_spec.dtype
    itemsize = (dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else np.dtype(dtype)).itemsize
    return int(np.prod(chunk_spec.shape, dtype=np.int64)) * int(itemsize)


def zstd_content_size(data: bytes | memoryview) -> int | None:
    """The frame content size a zstd frame header declares (None: not declared; ChunkSizeError: not a zstd frame)."""
    head = bytes(memoryview(data)[:18])
    if len(head) < 6 or int.from_bytes(head[:4], "little") != ZSTD_MAGIC:
        raise ChunkSizeError("the chunk is not a zstd frame")
    fhd = head[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(head) < pos + size:
        raise ChunkSizeError("the zstd frame header is truncated")
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _check(declared: int | None, chunk_spec, codec: str) -> None:
    limit = chunk_nbytes(chunk_spec)
    if declared is None:
        raise ChunkSizeError(f"the {codec} frame does not declare its decoded size (a chunk holds {limit} bytes)")
    if declared > limit:
        raise ChunkSizeError(f"the {codec} frame declares {declared} decoded bytes, a chunk holds {limit}")


class BoundedZstdCodec(ZstdCodec):
    """zarr's `zstd` codec, refusing a frame that declares more than its chunk's bytes before decoding it."""

    def _decode_sync(self, chunk_bytes, chunk_spec):
        _check(zstd_content_size(chunk_bytes.as_numpy_array()), chunk_spec, "zstd")
        return super()._decode_sync(chunk_bytes, chunk_spec)


class BoundedBloscCodec(BloscCodec):
    """zarr's `blosc` codec, refusing a frame whose header declares more than its chunk's bytes before decoding it."""

    @staticmethod
    def _declared(chunk_bytes) -> int:
        head = chunk_bytes.as_numpy_array()[:16].tobytes()
        if len(head) < 16:
            raise ChunkSizeError("the blosc frame header is truncated")
        return int.from_bytes(head[4:8], "little")

    def _decode_sync(self, chunk_bytes, chunk_spec):
        _check(self._declared(chunk_bytes), chunk_spec, "blosc")
        return super()._decode_sync(chunk_bytes, chunk_spec)


def register() -> None:
    """Make zarr decode every `zstd` and `blosc` chunk of this process through the bounded codecs."""
    for key, cls in (("zstd", BoundedZstdCodec), ("blosc", BoundedBloscCodec)):
        register_codec(key, cls)
        zarr.config.set({f"codecs.{key}": f"{cls.__module__}.{cls.__qualname__}"})


register()

__all__ = ["BoundedBloscCodec", "BoundedZstdCodec", "ChunkSizeError", "chunk_nbytes", "register", "zstd_content_size"]
