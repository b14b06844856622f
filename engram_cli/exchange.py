"""Tables that move: export a store's tables in the reference module's names and import them back.

Two formats (docs/exchange.md), one tensor per layer named as DeepSeek's reference
`Engram` module names its table, under a layer prefix `layers.{id}.` (strip it and
`Engram(layer_id=id).load_state_dict(..., strict=False)` takes the rest):

- `safetensors`: `layers.{id}.multi_head_embedding.embedding.weight` (layer_rows,
  head_dim) in the store's dtype (F32, F16, BF16; FP8 stores: F8_E4M3 values plus
  `layers.{id}.multi_head_embedding.embedding.weight_scale_ue8m0` U8 (layer_rows,
  head_dim // 32), one ue8m0 scale byte per 32 values, docs/spec.md "FP8 rows"),
  `layers.{id}.multi_head_embedding.offsets` I64 (the reference module's buffer: each
  head's first row). `__metadata__`: format, plan fingerprint, plan, dtype.
- `reference`: a `torch.save` zip file of the same tensors, loadable with
  `torch.load(weights_only=True)`; the weight is what the reference module's
  `nn.Embedding` holds: the store's float dtype, FP8 rows dequantized to float32 (exact)
  with their scale bytes beside them. The metadata is a uint8 tensor `engram_metadata`
  (UTF-8 JSON).

Nothing holds a layer in memory. Export writes the header (safetensors) or a skeleton
archive (`torch.save` under `torch.serialization.skip_data`, storages mapped from a
sparse scratch file and never read), then fills each tensor's bytes chunk by chunk in
place (and, for the zip, each record's CRC-32); output goes to a temp file renamed over
FILE at the end. Import opens the file lazily (safetensors: positioned reads at its
header's offsets; torch: `mmap=True`), checks it against the plan (every layer,
shapes, dtypes, offsets, fingerprint), and writes a new store shard by shard through
the store's update API, with a build's output steps (lock, staging, finalize).
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from engram_cli.errors import CheckpointError, OutputError
from engram_cli.fp8 import FP8_BLOCK, FP8RowError, dequantize_fp8_rows, fp8_rows_problem, quantize_fp8_rows_keeping
from engram_cli.int_rows import INT_BLOCK, IntRowError, dequantize_int_rows, int_rows_problem, quantize_int_rows_keeping, unpack_scales, value_bytes
from engram_cli.integrity import check_zip_crc
from engram_cli.kinds import ExchangeFormat, TableDtype
from engram_cli.store import TableStore, to_storage
from engram_cli.store.output import (
    check_free_space,
    check_inputs_apart,
    check_output,
    check_output_name,
    lock_output,
    remove_leftovers,
    shown,
)
from engram_cli.store.staging import link_store, staged_file, staged_output

FORMAT_TAG = "engram-tables/1"
WEIGHT = "multi_head_embedding.embedding.weight"
OFFSETS = "multi_head_embedding.offsets"
SCALE = "multi_head_embedding.embedding.weight_scale_ue8m0"
SCALE_BF16 = "multi_head_embedding.embedding.weight_scale_bf16"  # int8/int4 rows: one bfloat16 scale per 32 values
LAYER_PREFIX = "layers.{}."
METADATA_TENSOR = "engram_metadata"  # reference format: the metadata as UTF-8 JSON in a uint8 tensor
KEY = LAYER_PREFIX + WEIGHT  # layers.{id}.multi_head_embedding.embedding.weight


# safetensors dtype names <-> torch dtypes (the ones tables use)
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
             "U8": torch.uint8, "I8": torch.int8, "I64": torch.int64}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
TABLE_TORCH_DTYPES = tuple(d.torch_dtype for d in TableDtype)  # what a file's table may hold


def weight_dtype(dtype: str, fmt: ExchangeFormat) -> torch.dtype:
    """The torch dtype of a store's rows in `fmt`: the store's (FP8: the e4m3 values; the scales are a
    separate U8 tensor), except FP8 rows in the reference format, which are dequantized to float32."""
    dtype = TableDtype.parse(dtype)
    return torch.float32 if dtype.packed and fmt == ExchangeFormat.REFERENCE else dtype.torch_dtype


def table_key(layer_id: int, name: str = WEIGHT) -> str:
    return LAYER_PREFIX.format(layer_id) + name


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an export: its name, torch dtype and shape; what it holds (`kind`) of which layer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    layer: int | None
    kind: str  # "weight" | "scale" | "offsets" | "metadata"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()


def export_specs(store, fmt: ExchangeFormat, metadata: dict) -> list[TensorSpec]:
    """The tensors of an export of `store` in `fmt`, in file order (per layer: offsets, weight, scales)."""
    plan, fp8 = store.plan, store.dtype == TableDtype.FLOAT8_E4M3
    specs = []
    for l in plan.layer_ids:
        rows = plan.layer_rows(l)
        specs.append(TensorSpec(table_key(l, OFFSETS), torch.int64, (plan.heads_per_layer,), l, "offsets"))
        packed4 = store.dtype == TableDtype.INT4 and fmt == ExchangeFormat.SAFETENSORS  # two int4 values a byte
        specs.append(TensorSpec(table_key(l, WEIGHT), weight_dtype(store.dtype, fmt), (rows, plan.head_dim // (2 if packed4 else 1)), l, "weight"))
        if fp8:
            specs.append(TensorSpec(table_key(l, SCALE), torch.uint8, (rows, plan.head_dim // FP8_BLOCK), l, "scale"))
        if TableDtype.parse(store.dtype).integer:
            specs.append(TensorSpec(table_key(l, SCALE_BF16), torch.bfloat16, (rows, plan.head_dim // INT_BLOCK), l, "scale"))
    if fmt == ExchangeFormat.REFERENCE:
        specs.append(TensorSpec(METADATA_TENSOR, torch.uint8, (len(_metadata_bytes(metadata)),), None, "metadata"))
    return specs


def _metadata_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True).encode()


def export_metadata(store, fmt: ExchangeFormat) -> dict:
    """str -> str metadata (safetensors' `__metadata__` takes strings only)."""
    plan = store.plan
    meta = {"format": FORMAT_TAG, "layout": str(fmt), "plan_fingerprint": plan.fingerprint, "dtype": store.dtype,
            "layers": ",".join(str(l) for l in plan.layer_ids), "head_dim": str(plan.head_dim), "key": KEY,
            "plan": json.dumps(plan.to_dict(), sort_keys=True)}
    if store.dtype == TableDtype.FLOAT8_E4M3:
        meta["scale"] = f"{SCALE}: one ue8m0 byte s per 32 values, scale 2**(s-127)"
    if TableDtype.parse(store.dtype).integer:
        meta["scale"] = f"{SCALE_BF16}: one bfloat16 scale per 32 values, value = q * scale (docs/spec.md, Integer rows)"
    if store.pruned is not None:
        meta["pruned"] = "the plan's whole table: rows the store dropped are zeros"
    return meta


# -- reading the store's rows in the export form -----------------------------------------
def _layer_blocks(store, layer_id: int, fmt: ExchangeFormat, block_rows: int):
    """(start, weight block as a numpy array of the export bytes, scale bytes or None), chunk by chunk."""
    hd = store.plan.head_dim
    dtype = TableDtype.parse(store.dtype)
    if store.pruned is not None:  # the plan's whole table (dropped rows: zeros), block by block
        n = store.plan.layer_rows(layer_id)
        blocks = ((a, store.read_rows(layer_id, np.arange(a, min(n, a + block_rows)), as_stored=True)) for a in range(0, n, block_rows))
    else:
        blocks = store.iter_row_blocks(layer_id, block_rows)
    for start, block in blocks:
        if dtype.integer:  # values (int8, or int4 two a byte) and bfloat16 scale words; reference: dequantized to float32
            words = np.ascontiguousarray(unpack_scales(block, hd, dtype.value))
            if fmt == ExchangeFormat.SAFETENSORS:
                yield start, np.ascontiguousarray(block[:, : value_bytes(hd, dtype.value)]), words
            else:
                yield start, dequantize_int_rows(block, dtype.value, hd), words
        elif store.dtype != TableDtype.FLOAT8_E4M3:
            yield start, block, None  # float32 / float16 / bfloat16 words: the bytes as stored
        elif fmt == ExchangeFormat.SAFETENSORS:
            yield start, np.ascontiguousarray(block[:, :hd]), np.ascontiguousarray(block[:, hd:])
        else:
            yield start, dequantize_fp8_rows(block, hd), np.ascontiguousarray(block[:, hd:])


def _fill(fh, positions: dict[str, int], specs: list[TensorSpec], store, fmt: ExchangeFormat, metadata: dict, progress=None) -> dict[str, int]:
    """Write every tensor's bytes at `positions[name]` (file offsets); returns each tensor's CRC-32."""
    crc = {s.name: 0 for s in specs}
    done, total = 0, sum(s.nbytes for s in specs)

    def put(name: str, offset: int, data: bytes | memoryview) -> None:
        nonlocal done
        os.pwrite(fh.fileno(), data, positions[name] + offset)
        crc[name] = zlib.crc32(data, crc[name])
        done += len(data)
        if progress is not None:
            progress("writing", done, total, "")

    for s in specs:
        if s.kind == "offsets":
            put(s.name, 0, store.plan.row_offsets(s.layer).astype("<i8").tobytes())
        elif s.kind == "metadata":
            put(s.name, 0, _metadata_bytes(metadata))
        elif s.kind == "weight":
            scale = next((t for t in specs if t.kind == "scale" and t.layer == s.layer), None)
            w_row = s.nbytes // s.shape[0]
            for start, values, scales in _layer_blocks(store, s.layer, fmt, store.chunk_rows):
                put(s.name, start * w_row, memoryview(np.ascontiguousarray(values)).cast("B"))
                if scale is not None:
                    put(scale.name, start * (scale.nbytes // max(scale.shape[0], 1)), memoryview(scales).cast("B"))
    return crc


# -- output safety -------------------------------------------------------------------------
def check_file_output(out, force: bool) -> Path:
    """`OutputError` unless a file may be written at `out`: a new name, or an existing FILE with --force."""
    out = check_output_name(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{shown(out)} already exists; pass --force to replace it")
        if out.is_dir() or out.is_symlink():
            raise OutputError(f"{shown(out)} is a {'directory' if out.is_dir() else 'symlink'}; --force replaces only a file; choose another -o/--out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {shown(out)}: directory {shown(parent)} does not exist; create it first")
    return out


def _temp_path(out: Path, tag: str = "partial") -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.{tag}")


def _remove_stale_temps(out: Path) -> None:
    """Under the export's lock: remove the temp files an interrupted export of `out` left (`.OUT.<pid>.partial`
    and its scratch `..OUT.<pid>.partial.<pid>.scratch`), with a notice; nothing else is touched."""
    mine = re.compile(r"\." + re.escape(out.name) + r"\.\d+\.partial" + r"|\.\." + re.escape(out.name) + r"\.\d+\.partial\.\d+\.scratch")
    remove_leftovers(out, mine, "export")


# -- export --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What `export_tables` wrote; usable as the file's path (`os.PathLike`), `as_dict()` for --json."""

    path: str
    format: str
    store: str
    plan_fingerprint: str
    dtype: str
    layers: list
    bytes: int
    seconds: float
    tensors: list

    def __fspath__(self) -> str:
        return self.path

    def as_dict(self) -> dict:
        return asdict(self)


def export_tables(store_path, out=None, fmt: ExchangeFormat | str = ExchangeFormat.SAFETENSORS, *, force: bool = False, progress=None) -> ExportResult:
    """Write every layer's table of the store at `store_path` to one file `out` in `fmt`.

    Streams chunk by chunk (memory: one store chunk); temp file + rename, so FILE is
    either the old file or the whole new one. Returns the file's path with the summary
    `engram export --json` prints (`ExportResult.as_dict()`, docs/exchange.md).
    """
    fmt = ExchangeFormat.parse(fmt)
    store = TableStore.open(store_path)
    out = Path(out) if out is not None else Path(store.path).with_suffix(fmt.suffix)
    check_inputs_apart(out, [store.path], source="table store")
    out = check_file_output(out, force)
    meta = export_metadata(store, fmt)
    specs = export_specs(store, fmt, meta)
    t0 = time.perf_counter()
    with lock_output(out):  # one export of FILE at a time; under the lock the temps of a killed one are ours to remove
        _remove_stale_temps(out)
        check_file_output(out, force)
        check_free_space(out, sum(s.nbytes for s in specs))
        with staged_file(out, _temp_path(out)) as tmp:
            if fmt == ExchangeFormat.SAFETENSORS:
                _write_safetensors(tmp, specs, store, fmt, meta, progress)
            else:
                _write_reference(tmp, specs, store, fmt, meta, progress)
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    return ExportResult(path=str(out), format=str(fmt), store=str(store.path), plan_fingerprint=store.plan.fingerprint,
                        dtype=store.dtype, layers=list(store.plan.layer_ids), bytes=size, seconds=seconds,
                        tensors=[{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)} for s in specs])


def _write_safetensors(tmp: Path, specs, store, fmt, meta, progress) -> None:
    header, pos = {"__metadata__": meta}, 0
    for s in specs:
        header[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    base = 8 + len(text)
    positions = {s.name: base + header[s.name]["data_offsets"][0] for s in specs}
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(base + pos)
        _fill(fh, positions, specs, store, fmt, meta, progress)
        fh.flush()
        os.fsync(fh.fileno())


def _write_reference(tmp: Path, specs, store, fmt, meta, progress) -> None:
    scratch = _temp_path(tmp, "scratch")
    try:
        with open(scratch, "wb") as fh:  # sparse: the skeleton's storages map it but skip_data never reads them
            fh.truncate(max(s.nbytes for s in specs) + 8)
        skeleton = {s.name: torch.from_file(str(scratch), shared=False, size=int(np.prod(s.shape)), dtype=s.dtype).view(s.shape) for s in specs}
        with torch.serialization.skip_data():
            torch.save(skeleton, tmp)
        del skeleton
    finally:
        scratch.unlink(missing_ok=True)
    records = _zip_records(tmp)
    if len(records) != len(specs) or any(r[2] != s.nbytes for r, s in zip(records, specs)):
        raise AssertionError(f"torch.save wrote {[(r[0], r[2]) for r in records]} for {[(s.name, s.nbytes) for s in specs]}")
    with open(tmp, "r+b") as fh:
        positions = {s.name: _record_data_offset(fh, r[1]) for s, r in zip(specs, records)}
        crc = _fill(fh, positions, specs, store, fmt, meta, progress)
        _patch_crcs(fh, {r[0]: crc[s.name] for s, r in zip(specs, records)})
        fh.flush()
        os.fsync(fh.fileno())


def _zip_records(path: Path) -> list[tuple[str, int, int]]:
    """(name, local header offset, size) of the storage records `archive/data/<i>`, by i."""
    with zipfile.ZipFile(path) as z:
        data = [(i.filename, i.header_offset, i.file_size) for i in z.infolist() if re.search(r"/data/\d+$", i.filename)]
    return sorted(data, key=lambda r: int(r[0].rsplit("/", 1)[1]))


def _record_data_offset(fh, header_offset: int) -> int:
    fh.seek(header_offset)
    h = fh.read(30)
    if h[:4] != b"PK\x03\x04":
        raise AssertionError(f"no zip local header at {header_offset}")
    name_len, extra_len = struct.unpack("<HH", h[26:30])
    return header_offset + 30 + name_len + extra_len


def _patch_crcs(fh, crcs: dict[str, int]) -> None:
    """Write each record's CRC-32 into its local header and its central directory entry."""
    with zipfile.ZipFile(fh) as z:
        infos = {i.filename: i for i in z.infolist()}
        start_dir = z.start_dir
    for name, value in crcs.items():
        fh.seek(infos[name].header_offset + 14)
        fh.write(struct.pack("<I", value))
    fh.seek(start_dir)
    left = dict(crcs)
    while left:
        h = fh.read(46)
        if h[:4] != b"PK\x01\x02":
            raise AssertionError("zip central directory ended before every record was found")
        name_len, extra_len, comment_len = struct.unpack("<HHH", h[28:34])
        name = fh.read(name_len).decode()
        here = fh.tell()
        if name in left:
            fh.seek(here - name_len - 46 + 16)
            fh.write(struct.pack("<I", left.pop(name)))
        fh.seek(here + extra_len + comment_len)


# -- reading files: safetensors or torch, lazily ----------------------------------------------
class TensorFile:
    """A safetensors file or a torch (zip) state dict, opened without loading its tensors.

    `open_tensor_file` refuses what cannot be read safely. `rows(name, a, b)` reads rows
    [a, b) of a tensor into a fresh buffer (safetensors: one positioned read at the
    offsets its header gives, so nothing stays mapped; torch: a slice of the
    memory-mapped file); `tensor` gives the whole tensor memory-mapped (pages are read
    as they are touched: for gathers).
    """

    def __init__(self, path: Path, kind: str, handle, metadata: dict, offsets: dict | None = None):
        self.path, self.kind, self._h, self.metadata = path, kind, handle, metadata
        self._mm: dict[str, torch.Tensor] = {}
        self._header: dict | None = None
        self._offsets = offsets or {}  # tensor name -> file offset of its first byte (contiguous tensors)
        if kind == "safetensors":
            with path.open("rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                self._header = json.loads(fh.read(n))  # safe_open validated it
            self._offsets = {k: 8 + n + v["data_offsets"][0] for k, v in self._header.items() if k != "__metadata__"}

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._h.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.kind == "torch":
            return tuple(self._h[name].shape)
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        if self.kind == "torch":
            return self._h[name].dtype
        code = self._header[name]["dtype"]
        if code not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code}, which engram tables do not use; export it as F32, BF16, F16 or F8_E4M3")
        return ST_DTYPES[code]

    def offset(self, name: str) -> int | None:
        """Where tensor `name`'s bytes start in the file (None: read through torch's mapping)."""
        return self._offsets.get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._offsets:  # a torch tensor whose place in the file is not known: slice the mapping
            return self._h[name][start:stop]
        shape, dtype = self.shape(name), self.dtype(name)
        row = int(np.prod(shape[1:], dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        buf = np.empty((stop - start) * row, dtype=np.uint8)
        with self.path.open("rb") as fh:
            fh.seek(self._offsets[name] + start * row)
            if fh.readinto(memoryview(buf)) != buf.size:
                raise CheckpointError(f"{self.path} ends inside tensor {name!r} (truncated); export it again")
        return torch.from_numpy(buf).view(dtype).view(stop - start, *shape[1:])

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, mapped from the file (nothing is read until it is indexed)."""
        if self.kind == "torch":
            return self._h[name]
        if name not in self._mm:
            a, b = self._header[name]["data_offsets"]
            shape, dtype = self.shape(name), self.dtype(name)
            if b > a:  # copy-on-write mapping: writable for torch, never written back
                raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._offsets[name], shape=(b - a,))
                self._mm[name] = torch.from_numpy(raw).view(dtype).view(shape)
            else:
                self._mm[name] = torch.zeros(shape, dtype=dtype)
        return self._mm[name]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def open_tensor_file(path) -> TensorFile:
    """Open a safetensors file or a torch zip state dict for reading; one-line `CheckpointError` otherwise.

    Refused: a missing path; a pickle that needs arbitrary objects (`torch.load` with
    `weights_only=True` only, so nothing foreign is ever unpickled); a truncated or
    corrupt file; a torch file that is not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{str(path)!r} {what}; pass a .safetensors or .pt file (make one with `engram export`)")
    with path.open("rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        return _open_torch(path)
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < size:
        try:
            h = safe_open(str(path), framework="pt")
            meta = h.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{str(path)!r} is a truncated or corrupt safetensors file ({_first_line(e)}); export it again") from None
        return TensorFile(path, "safetensors", h, dict(meta))
    if head[:1] == b"\x80":  # a pickle stream (plain pickle or legacy torch.save)
        raise CheckpointError(f"{str(path)!r} is a pickle stream: reading it would unpickle arbitrary objects, refused; "
                              "re-save it as safetensors or with torch.save of a dict of tensors")
    raise CheckpointError(f"{str(path)!r} is neither a safetensors file nor a torch zip file (truncated or corrupt?); export it again with `engram export`")


def _open_torch(path: Path) -> TensorFile:
    check_zip_crc(path, what="torch file")  # torch.load never checks the records' CRC-32
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every failure is one line
        text = str(e)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m or "Unsupported operand" in text or "weights_only" in text.lower() or "Weights only" in text:
            why = f"it holds {m.group(1)}" if m else "it holds objects other than tensors"
            raise CheckpointError(f"{str(path)!r} needs unpickling of arbitrary objects ({why}), refused; "
                                  "re-save it as a dict of tensors (torch.save(model.state_dict())) or as safetensors") from None
        raise CheckpointError(f"{str(path)!r} is a truncated or corrupt torch file ({_first_line(e)}); export it again") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{str(path)!r} is not a state dict (a dict of name -> tensor); save model.state_dict() or export with `engram export`")
    offsets = _torch_offsets(path, obj)
    meta = {}
    if METADATA_TENSOR in obj:
        try:
            meta = json.loads(obj.pop(METADATA_TENSOR).numpy().tobytes())
        except ValueError:
            raise CheckpointError(f"{str(path)!r}: its {METADATA_TENSOR!r} tensor is not JSON (corrupt?); export it again") from None
    return TensorFile(path, "torch", obj, meta, offsets)


def _torch_offsets(path: Path, obj: dict) -> dict:
    """File offset of each contiguous tensor of a state dict loaded with `mmap=True`.

    torch maps the whole file once and cuts each storage out of that mapping at its
    record's offset, so storage address - record data offset is one constant (the
    mapping's base) over all records in file order; when it is not (another torch),
    nothing is returned and rows are sliced from the mapping instead.
    """
    try:
        with path.open("rb") as fh:
            data = sorted(_record_data_offset(fh, r[1]) for r in _zip_records(path))
    except (AssertionError, OSError, zipfile.BadZipFile):
        return {}
    ptrs = {k: v.untyped_storage().data_ptr() for k, v in obj.items()}
    uniq = sorted(set(ptrs.values()))
    bases = {p - d for p, d in zip(uniq, data)}
    if len(uniq) != len(data) or len(bases) != 1:
        return {}
    base = bases.pop()
    return {k: ptrs[k] - base + v.storage_offset() * v.element_size() for k, v in obj.items() if v.is_contiguous()}


# -- finding the tables in a state dict ---------------------------------------------------------
def find_tables(keys, plan, source) -> dict[int, str]:
    """layer id -> key prefix of each `...multi_head_embedding.embedding.weight` in `keys`.

    The layer id is the last integer in the prefix (`layers.1.`, `blocks.1.engram.`,
    `model.layers.15.engram.`); a bare `multi_head_embedding.embedding.weight` (one
    module's state dict) is the plan's layer when the plan has one. Tables of layers
    the plan lacks, or two tables for one layer, are refused.
    """
    found: dict[int, str] = {}
    for key in keys:
        if not key.endswith(WEIGHT):
            continue
        prefix = key[: -len(WEIGHT)]
        ints = [p for p in prefix.split(".") if p.isdigit()]
        if ints:
            layer = int(ints[-1])
        elif len(plan.layer_ids) == 1:
            layer = plan.layer_ids[0]
        else:
            raise CheckpointError(f"{source}: {key!r} names no layer and the plan has layers {list(plan.layer_ids)}; prefix it `layers.<id>.`")
        if layer not in plan.layer_ids:
            raise CheckpointError(f"{source}: {key!r} is a table of layer {layer}, which the plan does not have (layers {list(plan.layer_ids)}); pass the matching --plan-from/--tables")
        if layer in found:
            raise CheckpointError(f"{source}: two tables for layer {layer} ({found[layer] + WEIGHT!r} and {key!r}); keep one")
        found[layer] = prefix
    return found


def check_table(tf: TensorFile, prefix: str, layer_id: int, plan, source) -> dict:
    """Shape, dtype and offsets of one layer's table against the plan; returns {weight, scale, dtype}."""
    key = prefix + WEIGHT
    want = (plan.layer_rows(layer_id), plan.head_dim)
    if plan.dtype == TableDtype.INT4 and tf.dtype(key) == torch.uint8:  # int4 values, two a byte
        want = (want[0], plan.head_dim // 2)
    if tf.shape(key) != want:
        raise CheckpointError(f"{source}: {key} has shape {tf.shape(key)}, the plan needs {want} for layer {layer_id}; "
                              "it was made for another plan: pass the matching --plan-from/--tables")
    dtype = tf.dtype(key)
    if dtype not in TABLE_TORCH_DTYPES:
        raise CheckpointError(f"{source}: {key} has dtype {str(dtype).removeprefix('torch.')}; tables are float32, bfloat16, float16 or float8_e4m3fn")
    scale = prefix + SCALE if (prefix + SCALE) in tf else None
    if TableDtype.parse(plan.dtype).integer:
        scale = prefix + SCALE_BF16 if (prefix + SCALE_BF16) in tf else None
        if dtype != torch.float32 and scale is None:
            raise CheckpointError(f"{source}: {key} holds {plan.dtype} values but the file has no {prefix + SCALE_BF16}; export the scales with it")
    if scale is not None and tf.shape(scale) != (want[0], plan.head_dim // FP8_BLOCK):
        raise CheckpointError(f"{source}: {scale} has shape {tf.shape(scale)}, the plan needs {(want[0], plan.head_dim // FP8_BLOCK)}")
    if dtype == torch.float8_e4m3fn and scale is None:
        raise CheckpointError(f"{source}: {key} holds float8_e4m3 values but the file has no {prefix + SCALE}; export the scales with it")
    off = prefix + OFFSETS
    if off in tf:
        if tf.shape(off) != plan.row_offsets(layer_id).shape:  # from the header, before a byte of it is read
            raise CheckpointError(f"{source}: {off} has shape {tf.shape(off)}, the plan has {plan.heads_per_layer} head offsets for layer {layer_id}; "
                                  "it was made for another plan: pass the matching --plan-from/--tables")
        got = tf.rows(off, 0, tf.shape(off)[0]).to(torch.int64).numpy()
        if got.shape != plan.row_offsets(layer_id).shape or not np.array_equal(got, plan.row_offsets(layer_id)):
            raise CheckpointError(f"{source}: {off} {got.tolist()[:4]}... differs from the plan's head offsets {plan.row_offsets(layer_id).tolist()[:4]}...; "
                                  "it was made for another plan: pass the matching --plan-from/--tables")
    return {"weight": key, "scale": scale, "dtype": dtype}


def check_fingerprint(tf: TensorFile, plan, source) -> None:
    fp = tf.metadata.get("plan_fingerprint")
    if fp and fp != plan.fingerprint:
        raise CheckpointError(f"{source} was exported from a plan with fingerprint {fp[:12]}, the tables' plan has {plan.fingerprint[:12]}; "
                              "pass the store it was exported from (or one built with the same plan)")


# -- import ----------------------------------------------------------------------------------
def _storage_block(values: torch.Tensor, scales: torch.Tensor | None, dtype: TableDtype) -> np.ndarray:
    """File rows -> the store's storage form (bit-exact when the file holds the store's dtype)."""
    if dtype.fp8:
        if values.dtype == torch.float8_e4m3fn:
            return np.concatenate([values.contiguous().view(torch.uint8).numpy(), scales.numpy()], axis=1)
        return quantize_fp8_rows_keeping(values.float().numpy(), None if scales is None else scales.numpy())
    if dtype.integer:  # int values + bfloat16 scale words, or float32 rows (keeping the file's scales where they reproduce them)
        words = None if scales is None else scales.contiguous().view(torch.int16).numpy().view(np.uint16)
        if values.dtype != torch.float32:
            return np.concatenate([values.contiguous().view(torch.uint8).numpy(), words.astype("<u2").view(np.uint8)], axis=1)
        return quantize_int_rows_keeping(values.numpy(), dtype.value, words)
    if values.dtype == dtype.torch_dtype:
        if dtype == TableDtype.BFLOAT16:
            return values.contiguous().view(torch.int16).numpy().view(np.uint16)
        return values.contiguous().numpy()
    return to_storage(values.float().numpy(), dtype)


def _checked_block(values: torch.Tensor, scales: torch.Tensor | None, dtype: TableDtype, head_dim: int, source: str, layer: int, s0: int) -> np.ndarray:
    """`_storage_block`, with FP8 rows the store must not hold refused by name: NaN/inf values, the e4m3 NaN byte,
    scale bytes 0 or 255 (docs/exchange.md, "Import": refused, not decoded)."""
    try:
        block = _storage_block(values, scales, dtype)
        problem = fp8_rows_problem(block, head_dim) if dtype.fp8 else (int_rows_problem(block, head_dim, dtype.value) if dtype.integer else None)
    except (FP8RowError, IntRowError) as e:
        problem = e
    if problem is not None:
        raise CheckpointError(f"{source}: layer {layer} row {s0 + problem.row} {problem.what}; fix or re-export the file") from None
    return block


def import_tables(file, plan_from, out, *, force: bool = False, progress=None) -> dict:
    """A new store at `out` with `plan_from`'s plan, vocabulary and hit counts and the file's rows.

    The file (safetensors or a torch state dict, `engram export` names) must hold every
    layer of the plan with the plan's shapes, in the plan's dtype or float32 (then
    converted as the store converts: bfloat16/float16 round to nearest even, FP8 by the
    spec's quantizer, keeping the file's scale bytes where they reproduce the values);
    head offsets and the plan fingerprint are checked when the file has them. Rows are
    read and written shard by shard (memory: one shard); `plan_from` is never modified.
    The output goes through the build's steps (`store.staged_output`: locked, staged in
    `<out>.partial`, an existing store replaced only with `force`).
    """
    store = TableStore.open(plan_from)
    plan, dtype = store.plan, TableDtype.parse(store.dtype)
    check_inputs_apart(out, [store.path], source="table store")
    check_inputs_apart(out, [file], source="input file")
    check_output(out, force)  # cheap refusals before reading the file; prepare_partial checks again under the lock
    tf = open_tensor_file(file)
    source = str(file)
    check_fingerprint(tf, plan, source)
    prefixes = find_tables(tf.keys(), plan, source)
    missing = [l for l in plan.layer_ids if l not in prefixes]
    if missing:
        raise CheckpointError(f"{source} has no table for layer(s) {missing} of the plan (expected {KEY.format(missing[0])!r}); export every layer")
    checked = {l: check_table(tf, prefixes[l], l, plan, source) for l in plan.layer_ids}
    for l, c in checked.items():
        if c["dtype"] not in (dtype.torch_dtype, torch.float32):
            raise CheckpointError(f"{source}: layer {l} rows are {str(c['dtype']).removeprefix('torch.')}, the plan of {plan_from} stores {store.dtype}; "
                                  f"export them as {store.dtype} or float32")
    total = sum(plan.layer_rows(l) for l in plan.layer_ids)
    done = 0
    converted = sorted(l for l, c in checked.items() if c["dtype"] != dtype.torch_dtype)
    out = Path(out)
    with staged_output(out, force) as staging:  # lock, leftovers settled, output checked; finalized after the block
        link_store(store.path, staging.partial)  # the plan's store, hard-linked
        new = TableStore.open(staging.partial, mode="r+")
        for l in plan.layer_ids:
            c, n = checked[l], plan.layer_rows(l)
            for s0 in range(0, n, new.shard_rows):  # each shard written once, whole
                s1 = min(n, s0 + new.shard_rows)
                vals = tf.rows(c["weight"], s0, s1)
                scales = tf.rows(c["scale"], s0, s1) if c["scale"] else None
                new.write_row_block(l, s0, _checked_block(vals, scales, dtype, plan.head_dim, source, l, s0), by="imported")
                del vals, scales  # freed before the next shard is read: one shard in memory
                done += s1 - s0
                if progress is not None:
                    progress("importing", done, total, f"layer {l}")
    return {"path": str(out), "source": source, "file_format": tf.kind, "plan_from": str(store.path), "plan_fingerprint": plan.fingerprint,
            "dtype": store.dtype, "layers": list(plan.layer_ids), "rows": total, "converted_layers": converted,
            "fingerprint_checked": bool(tf.metadata.get("plan_fingerprint"))}


__all__ = ["ExchangeFormat", "ExportResult", "KEY", "OFFSETS", "SCALE", "WEIGHT", "TensorFile", "check_table", "export_tables", "find_tables",
           "import_tables", "open_tensor_file", "table_key", "weight_dtype"]
