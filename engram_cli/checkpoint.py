"""Model checkpoints: plain dicts of config, non-table weights, tables path, plan fingerprint, held-out split.

Loads with `torch.load(weights_only=True)` only; a file that needs unpickling of arbitrary
objects, a truncated file, or a missing one is a one-line `CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engram_cli.errors import CheckpointError

FORMAT = "engram-checkpoint/1"


def save_checkpoint(path, model, *, tables: str | None, plan_fingerprint: str | None, heldout: dict, extra: dict | None = None) -> Path:
    """Write the checkpoint atomically (temp file + rename); table weights are left out."""
    path = Path(path)
    table_ids = {id(p) for p in model.table_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in table_ids}
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in names}
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
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely; `tables` comes back resolved against the checkpoint's folder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; make one with `engram train` (writes model.ckpt)")
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
