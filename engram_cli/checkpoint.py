"""Model checkpoints: plain dicts of config, non-table weights, tables path, plan fingerprint, held-out split.

Two file forms hold the same dict (docs/eval.md, "Checkpoint format"):

- a `torch.save` file (the default, `model.ckpt`): loads with `torch.load(weights_only=True)`;
- a safetensors file (a name ending in `.safetensors`, or any file whose bytes are one):
  every tensor under its dotted path (`weights.wte.weight`, `extra.token_ids`, ...), the
  rest of the dict as JSON in the metadata entry `engram`.

Loading never unpickles arbitrary objects: a file that needs it, a truncated file, a
missing one are each a one-line `CheckpointError`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram_cli.errors import CheckpointError
from engram_cli.integrity import check_zip_crc

FORMAT = "engram-checkpoint/1"
SAFETENSORS_SUFFIX = ".safetensors"
_TENSOR = "__tensor__"  # JSON placeholder of a tensor stored under that safetensors key


def save_checkpoint(path, model, *, tables: str | None, plan_fingerprint: str | None, heldout: dict, extra: dict | None = None) -> Path:
    """Write the checkpoint atomically (temp file + rename); the tables stay in their store.

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
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == SAFETENSORS_SUFFIX:

        meta, tensors = _split(obj, "")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"engram": json.dumps(meta)})
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _join(json.loads(meta), tensors)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is one line
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); re-run `engram train`") from None


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely; `tables` comes back resolved against the checkpoint's folder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; make one with `engram train` (writes model.ckpt)")
    if _is_safetensors(path):
        obj = _load_safetensors(path)
    else:
        if zipfile.is_zipfile(path):  # torch.load never checks the records' CRC-32
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
    if obj.get("tables") is not None:
        obj["tables"] = str((path.resolve().parent / obj["tables"]))
    return obj
