"""Model checkpoints: plain dicts of config, non-table weights, tables path, plan fingerprint, held-out split.

Two file forms hold the same dict (docs/eval.md, "Checkpoint format"):

- a `torch.save` file (the default, `model.ckpt`): loads with `torch.load(weights_only=True)`;
- a safetensors file (a name ending in `.safetensors`, or any file whose bytes are one):
  every tensor under its dotted path (`weights.wte.weight`, `extra.token_ids`, ...), the
  rest of the dict as JSON in the metadata entry `engram`.

Loading never unpickles arbitrary objects: a file that needs it, a truncated file, a
missing one, a dict that breaks the schema (`checkpoint_schema`) are each a one-line
`CheckpointError`.

Writing goes through the output rules of stores (docs/train.md, "What is refused"):
`check_checkpoint_output` refuses a directory, a symlink, a file that is not an engram
checkpoint (`is_engram_checkpoint`), an existing checkpoint without `--force`; the file
is written to a temp name of this process (`.NAME.<pid>.partial`) and renamed into
place, with a disk-full or permission error one line. A checkpoint, its trained store
and its training statistics are one unit: the checkpoint, written last, records the
`generation` the other two carry, and `check_unit` refuses a mismatched pair.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from engram_cli.checkpoint_schema import (
    check_checkpoint_dict,
    check_declared_bytes,
    check_extra,
)
from engram_cli.errors import CheckpointError, OutputError
from engram_cli.integrity import check_zip_crc
from engram_cli.model import ModelConfig
from engram_cli.store.output import check_inputs_apart, check_output_name, remove_leftovers, shown
from engram_cli.store.staging import staged_file

FORMAT = "engram-checkpoint/1"
SAFETENSORS_SUFFIX = ".safetensors"
_TENSOR = "__tensor__"  # JSON placeholder of a tensor stored under that safetensors key


MARK = FORMAT.split("/")[0].encode()  # what a checkpoint's pickle or safetensors metadata holds
HEADER_LIMIT = 16 << 20  # bytes of a pickle (data.pkl) or safetensors header read to recognise a checkpoint


def new_generation() -> str:
    """A fresh id for one train's unit (checkpoint + trained store + statistics)."""
    return uuid.uuid4().hex


def is_engram_checkpoint(path) -> bool:
    """True when `path` is a regular file holding an engram checkpoint (torch zip or safetensors), recognised without loading it."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")), None)
                if pkl is None:
                    return False
                with z.open(pkl) as f:
                    return MARK in f.read(HEADER_LIMIT)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= HEADER_LIMIT:
                return False
            header = json.loads(f.read(n))
        meta = json.loads((header.get("__metadata__") or {}).get("engram", "{}"))
        return isinstance(meta, dict) and str(meta.get("format", "")).split("/")[0] == FORMAT.split("/")[0]
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError):
        return False


def check_checkpoint_output(out, force: bool, *, inputs=(), tables=None) -> Path:
    """`OutputError` unless a checkpoint may be written at `out` (cheap: call it before any work).

    Refused: a bad name; an output that is, holds or lies inside a corpus path (`inputs`)
    or the table store `tables`; a directory or a symlink; an existing file that is not
    an engram checkpoint (even with --force); an existing checkpoint without --force.
    """
    out = check_output_name(out)
    check_inputs_apart(out, inputs, what="checkpoint")
    if tables is not None:
        check_inputs_apart(out, [tables], what="checkpoint", source="table store")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or out.is_dir():
            kind = "a symlink" if out.is_symlink() else "a directory"
            raise OutputError(f"{shown(out)} is {kind}, not a checkpoint; -o names the checkpoint FILE to write, e.g. -o model.ckpt")
        if not is_engram_checkpoint(out):
            raise OutputError(f"{shown(out)} is a file but not an engram checkpoint; --force replaces only a checkpoint; move it away or choose another -o/--out")
        if not force:
            raise OutputError(f"checkpoint {shown(out)} already exists; pass --force to replace it (and its trained store)")
    return out


def temp_path(out) -> Path:
    """This process's temp name for `out` (two writers never share one)."""
    out = Path(out)
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def replace_path(src: Path, dst: Path) -> None:
    """Rename file or folder `src` onto `dst`; a folder `dst` is moved aside first and removed after (a folder cannot be renamed onto a non-empty one)."""
    if not dst.is_dir() or dst.is_symlink():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Remove file or folder `path` if it exists (a temp of ours)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(out) -> None:
    """Under `out`'s lock: remove the `.NAME.<pid>.partial` files (or statistics folders) and `.NAME.<pid>.old` folders a killed train left (ours by name), with a notice."""
    out = Path(out)
    remove_leftovers(out, re.compile(r"\." + re.escape(out.name) + r"\.\d+\.(partial|old)"), "train", folders=True)


def check_unit(path, ckpt: dict, *, store=None, stats=None) -> None:
    """`CheckpointError` when checkpoint `path` lacks what eval reads, or its trained store or statistics come from another train.

    Compares the checkpoint's `extra.generation` with the store's root attribute
    `generation` and the statistics' `generation` entry (a checkpoint from before
    generations, or a store passed with --tables that is not the checkpoint's own: not
    checked).
    """
    check_extra(path, ckpt["extra"], ModelConfig.from_dict(ckpt["config"]), complete=True)
    gen = ckpt["extra"].get("generation")
    if not gen:
        return
    if store is not None and ckpt.get("tables") and Path(store.path).resolve() == Path(ckpt["tables"]).resolve():
        got = store.attrs.get("generation")
        if got != gen:
            raise CheckpointError(f"checkpoint {shown(path)} (generation {gen[:12]}) and its table store {shown(store.path)} "
                                  f"(generation {str(got)[:12]}) come from different trains (one was replaced, or a train failed before "
                                  "its checkpoint was written); re-run `engram train`, or pass --tables")
    if stats is not None:
        got = stats.generation
        if got != gen:
            raise CheckpointError(f"checkpoint {shown(path)} (generation {gen[:12]}) and its training statistics (generation {str(got)[:12]}) "
                                  "come from different trains; re-run `engram train`")


def checkpoint_bytes(path, model, *, tables: str | None, plan_fingerprint: str | None, heldout: dict, extra: dict | None = None):
    """The bytes of the checkpoint file `path` (torch zip, or safetensors for a `.safetensors` name), made in memory.

    `tables` is stored relative to the checkpoint's folder, so the pair moves together.
    """
    path = Path(path)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    rel = None if tables is None else os.path.relpath(Path(tables).resolve(), path.resolve().parent)
    obj = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "weights": weights,
        "tables": rel,
        "plan_fingerprint": plan_fingerprint,
        "heldout": heldout,
        "extra": extra or {},
    }
    if path.suffix == SAFETENSORS_SUFFIX:
        meta, tensors = _split(obj, "")
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        return safetensors_bytes(tensors, metadata={"engram": json.dumps(meta), DIGEST_KEY: tensors_digest(tensors)})
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


def write_temp(path, data) -> Path:
    """Write `data` to this process's temp file of `path` (`.NAME.<pid>.partial`), synced; returns the temp (the caller renames it).

    Written by Python, so a disk-full or file-size-limit error is an `OSError` (torch's own
    writer reports it as a RuntimeError); the temp is removed on failure.
    """
    tmp = temp_path(Path(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_checkpoint(path, model, *, tables: str | None, plan_fingerprint: str | None, heldout: dict, extra: dict | None = None) -> Path:
    """Write the checkpoint through a temp file of this process, renamed into place; the tables stay in their store.

    A disk-full or permission error is one line (`staging.staged_file`). `engram train`
    writes its checkpoint with the rest of its unit instead (`train.publish_unit`).
    """
    path = Path(path)
    data = checkpoint_bytes(path, model, tables=tables, plan_fingerprint=plan_fingerprint, heldout=heldout, extra=extra)
    with staged_file(path, temp_path(path)):
        write_temp(path, data)  # the temp staged_file renames into place
    return path


DIGEST_KEY = "engram_xxh3_128"  # safetensors metadata: XXH3-128 of every tensor's bytes, by sorted name (`tensors_digest`)


def tensors_digest(tensors: dict) -> str:
    """XXH3-128 over each tensor's name and raw bytes, in sorted name order (the safetensors form's checksum)."""
    h = xxhash.xxh3_128()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode() + b"\0")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _split(obj, prefix: str):
    """(JSON-able copy of `obj` with tensors replaced by placeholders, {dotted key: tensor})."""
    if isinstance(obj, torch.Tensor):
        return {_TENSOR: prefix}, {prefix: obj}
    if isinstance(obj, dict):
        meta, tensors = {}, {}
        for k, v in obj.items():
            meta[k], t = _split(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
        return meta, tensors
    return obj, {}


def _join(meta, tensors: dict):
    if isinstance(meta, dict):
        if set(meta) == {_TENSOR}:
            return tensors[meta[_TENSOR]]
        return {k: _join(v, tensors) for k, v in meta.items()}
    return meta


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def _load_safetensors(path: Path) -> dict:

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("engram")
            if meta is None:
                raise CheckpointError(f"{path} is a safetensors file without engram metadata (a bare state dict?); make a checkpoint with `engram train -o NAME.safetensors`")
            names = f.keys()
            shapes = {k: f.get_slice(k) for k in names}
            check_declared_bytes(path, {k: (s.get_shape(), s.get_dtype()) for k, s in shapes.items()})  # from the header, before reading
            tensors = {k: f.get_tensor(k) for k in names}
            want = (f.metadata() or {}).get(DIGEST_KEY)
        if want is not None and tensors_digest(tensors) != want:  # safetensors has no checksum of its own
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its tensors' XXH3-128 differs from the one recorded when it was written; re-run `engram train`")
        return _join(json.loads(meta), tensors)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is one line
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); re-run `engram train`") from None


def _zip_members(path: Path) -> dict:
    """{member: ((bytes,), "U8")} of a zip, from its central directory (nothing decompressed)."""
    try:
        with zipfile.ZipFile(path) as z:
            return {i.filename: ((i.file_size,), "U8") for i in z.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is a truncated or corrupt zip archive ({type(e).__name__}); re-run `engram train`") from None


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely; `tables` comes back resolved against the checkpoint's folder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; make one with `engram train` (writes model.ckpt)")
    if _is_safetensors(path):
        obj = _load_safetensors(path)
    else:
        if zipfile.is_zipfile(path):  # torch.load never checks the records' CRC-32
            check_declared_bytes(path, _zip_members(path))
            check_zip_crc(path, what="checkpoint", fix="re-run `engram train`")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - every failure is one line
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(f"{path} needs unpickling of arbitrary objects, refused ({msg[:120]}); re-save it as plain tensors") from None
            raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); re-run `engram train`") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an engram checkpoint (format {obj.get('format') if isinstance(obj, dict) else type(obj).__name__}); make one with `engram train`")
    check_checkpoint_dict(path, obj)
    if obj.get("tables") is not None:
        obj["tables"] = str((path.resolve().parent / obj["tables"]))
    return obj
