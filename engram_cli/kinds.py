"""The kinds every stage shares (table dtype, hash family, lookup backend, store and export options), each parsed in one place.

Every kind is a `StrEnum`: a member is the string it stands for (it compares, hashes,
formats and serializes to JSON as that string), so stores, JSON reports and CLI options
read and print exactly what they did when these were plain strings. `Kind.parse(value)`
is the one place a string becomes a member; anything else is a one-line error of the
`EngramError` family naming the choices (what the CLI prints). `Kind.option_callback`
is that parse as a typer/click option callback: options are declared as plain strings
and converted there, so a bad value is this one-line error, not the parser's usage box.

    TableDtype  --dtype        bytes per value, numpy storage dtype, torch dtype
    InitKind    --init         initial values of a fresh table
    Compressor  --compressor   chunk compressor (a crc32c checksum follows every chunk)
    ParallelKind --parallel    threads or processes for shard tasks
    HashFamily  --hash         the reference multiply-XOR hash or xxh3 (aliases accepted)
    Backend     backend=       lookup backends (engram_cli.kernels.registry holds one implementation each)
    ExchangeFormat --format    file formats of `engram export`
    TokenizerEngine --tokenizer-engine  the library that turns text into token ids
"""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Sequence

import numpy as np

from engram_cli.errors import (
    BackendError,
    EngramError,
    OutputError,
    PlanError,
    StoreError,
    TokenizerError,
)


def _kind(option: str, error: type[EngramError]):
    """Class decorator: the option name a kind's error names, and the error type it raises."""

    def mark(cls):
        cls._option, cls._error = option, error  # set after creation: in the class body they would become members
        return cls

    return mark


class Kind(StrEnum):
    """A string-valued option kind; subclasses list the members (see the module docstring)."""

    @classmethod
    def parse(cls, value):
        """`value` (a member or its string) as a member; the kind's one-line error naming the choices otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value.value if isinstance(value, Enum) else value)
        except ValueError:
            raise cls._error(f"unknown {cls._option} {value!r}; choose one of {cls.choices()}") from None

    @classmethod
    def choices(cls) -> str:
        """The values, comma-separated (for help texts and messages)."""
        return ", ".join(m.value for m in cls)

    @classmethod
    def option_callback(cls, value):
        """typer/click option callback: the option's string as a member (None stays None)."""
        return None if value is None else cls.parse(value)


# -- table rows --------------------------------------------------------------------------------
@_kind("--dtype", PlanError)
class TableDtype(Kind):
    """Logical dtype of a table's rows (`--dtype`).

    float8_e4m3 rows are stored packed as uint8: head_dim e4m3 value bytes, then one ue8m0
    scale byte per 32 values (engram_cli.fp8, docs/spec.md "FP8 rows"); int8 and int4 rows
    too: int8 or two-per-byte int4 values, then one bfloat16 scale per 32 values
    (engram_cli.int_rows, docs/spec.md "Integer rows").
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3 = "float8_e4m3"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one value (float8_e4m3 rows also carry head_dim // 32 scale bytes, int8/int4 rows
        head_dim // 16; int4 counts a whole byte here: sizing by budget is conservative)."""
        return _BYTES_PER_VALUE[self]

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype the store's arrays hold: bfloat16 as uint16 words (zarr has no bfloat16), float8_e4m3 as uint8."""
        return np.dtype(_STORAGE[self])

    @property
    def torch_dtype(self):
        """The torch dtype of the values (float8_e4m3: torch.float8_e4m3fn, int8: torch.int8, int4: torch.uint8 (two
        values a byte); the scales are separate bytes).

        torch is imported here, not at module top: plan, hashing, store.format and the
        scale-out map tasks import this module, and none of them needs torch's ~1 s import.
        """
        import torch

        return getattr(torch, _TORCH[self])

    @property
    def fp8(self) -> bool:
        return self is TableDtype.FLOAT8_E4M3

    @property
    def integer(self) -> bool:
        """int8 or int4 rows (packed uint8 with bfloat16 block scales)."""
        return self in (TableDtype.INT8, TableDtype.INT4)

    @property
    def packed(self) -> bool:
        """Rows stored as packed uint8 bytes that a lookup dequantizes (float8_e4m3, int8, int4)."""
        return self.fp8 or self.integer


_BYTES_PER_VALUE = {TableDtype.FLOAT32: 4, TableDtype.FLOAT16: 2, TableDtype.BFLOAT16: 2, TableDtype.FLOAT8_E4M3: 1, TableDtype.INT8: 1, TableDtype.INT4: 1}
_STORAGE = {TableDtype.FLOAT32: "float32", TableDtype.FLOAT16: "float16", TableDtype.BFLOAT16: "uint16", TableDtype.FLOAT8_E4M3: "uint8",
            TableDtype.INT8: "uint8", TableDtype.INT4: "uint8"}
_TORCH = {TableDtype.FLOAT32: "float32", TableDtype.FLOAT16: "float16", TableDtype.BFLOAT16: "bfloat16", TableDtype.FLOAT8_E4M3: "float8_e4m3fn",
          TableDtype.INT8: "int8", TableDtype.INT4: "uint8"}


# -- store options -----------------------------------------------------------------------------
@_kind("--init", StoreError)
class InitKind(Kind):
    """Initial values of a fresh table (`--init`)."""

    NORMAL = "normal"
    ZEROS = "zeros"


@_kind("--compressor", StoreError)
class Compressor(Kind):
    """Chunk compressor (`--compressor`); a crc32c checksum follows every chunk regardless."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"


@_kind("--parallel", StoreError)
class ParallelKind(Kind):
    """How `write_tables` runs shard tasks when it makes its own executor (`--parallel`)."""

    THREADS = "threads"
    PROCESSES = "processes"


# -- hashing -----------------------------------------------------------------------------------
@_kind("hash family", PlanError)
class HashFamily(Kind):
    """An n-gram hash family: the reference multiply-XOR hash (docs/spec.md "Hash") or xxh3.

    The value is the name `engram collisions --hash` takes and its reports print; a
    table plan (and so every store and checkpoint) records the reference family as
    `multiply-xor` (`plan_name`). `parse` takes either name and the aliases below.
    """

    REFERENCE = "reference"
    XXH3 = "xxh3"

    @property
    def plan_name(self) -> str:
        """The name a `TablePlan` records (its `hash_family`, part of the plan fingerprint)."""
        return _PLAN_NAMES[self]

    @classmethod
    def parse(cls, value) -> HashFamily:
        """One family by any of its names (case and surrounding blanks ignored); PlanError otherwise."""
        if isinstance(value, cls):
            return value
        name = str(value).strip().lower()
        if name not in _FAMILY_ALIASES:
            raise PlanError(f"unknown hash family {str(value).strip()!r}; use reference, xxh3, or reference,xxh3")
        return _FAMILY_ALIASES[name]

    @classmethod
    def parse_many(cls, text: str | Sequence[str]) -> tuple[HashFamily, ...]:
        """`reference`, `xxh3` or `reference,xxh3` (also `both`, or a sequence) -> families, each once, in order."""
        items = text.split(",") if isinstance(text, str) else list(text)
        out: list[HashFamily] = []
        for item in items:
            names = list(cls) if str(item).strip().lower() == "both" else [cls.parse(item)]
            out += [n for n in names if n not in out]
        if not out:
            raise PlanError("no hash family given; use --hash reference, xxh3 or reference,xxh3")
        return tuple(out)


_PLAN_NAMES = {HashFamily.REFERENCE: "multiply-xor", HashFamily.XXH3: "xxh3"}
_FAMILY_ALIASES = {"reference": HashFamily.REFERENCE, "multiply-xor": HashFamily.REFERENCE, "multiply_xor": HashFamily.REFERENCE,
                   "xxh3": HashFamily.XXH3, "xxh3_64": HashFamily.XXH3}


# -- lookups -----------------------------------------------------------------------------------
@_kind("backend", BackendError)
class Backend(Kind):
    """A lookup backend of `engram_cli.kernels.EngramLookup` (docs/kernels.md).

    `auto` is triton on CUDA, else cpu, quietly (`engram_cli.kernels.registry.resolve_backend`);
    the others name one implementation each in `engram_cli.kernels.registry.REGISTRY`.
    """

    AUTO = "auto"
    TORCH = "torch"
    CPU = "cpu"
    TRITON = "triton"
    OFFLOAD = "offload"


# -- tokenization ------------------------------------------------------------------------------
@_kind("--tokenizer-engine", TokenizerError)
class TokenizerEngine(Kind):
    """The library that encodes text with a tokenizer.json (`--tokenizer-engine`, docs/build-table.md).

    `hf` is Hugging Face `tokenizers`, the reference; `fastokens` an exact engine about
    15x cheaper on the DeepSeek tokenizer, checked against the reference on a sample of
    every build; `auto` is fastokens where it loads the tokenizer, else `hf`. `library`
    is the name recorded in a store (`tokenizers` or `fastokens`); `parse` also reads it.
    """

    AUTO = "auto"
    FASTOKENS = "fastokens"
    HF = "hf"

    @classmethod
    def parse(cls, value):
        return cls.HF if value == "tokenizers" else super().parse(value)

    @property
    def library(self) -> str:
        """The Python package that encodes (what a store records)."""
        return "tokenizers" if self is TokenizerEngine.HF else str(self)


# -- exchange ----------------------------------------------------------------------------------
@_kind("--format", OutputError)
class ExchangeFormat(Kind):
    """File formats of `engram export` (`--format`, docs/exchange.md)."""

    SAFETENSORS = "safetensors"
    REFERENCE = "reference"

    @property
    def suffix(self) -> str:
        """The file suffix an export gets when no -o is given."""
        return ".safetensors" if self is ExchangeFormat.SAFETENSORS else ".pt"


__all__ = ["Backend", "Compressor", "ExchangeFormat", "HashFamily", "InitKind", "Kind", "ParallelKind", "TableDtype", "TokenizerEngine"]
