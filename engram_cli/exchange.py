"""Export a store's tables to safetensors in the reference module's names, and import them back.

Key per layer: `layers.{id}.multi_head_embedding.embedding.weight`, shape (layer_rows,
head_dim), float32 (bfloat16/float16 rows widen exactly); metadata carries the plan
fingerprint. FP8 stores and the `reference` (.pt state dict) format are not done yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engram_cli.errors import CheckpointError

KEY = "layers.{}.multi_head_embedding.embedding.weight"


def export_tables(store_path, out) -> Path:
    """Write every layer's table to one safetensors file (temp file + rename)."""
    import os

    from safetensors.numpy import save_file

    from engram_cli.store import TableStore
    from engram_cli.train import load_layer_table

    store = TableStore.open(store_path)
    if store.dtype.startswith("fp8"):
        raise CheckpointError(f"{store_path}: exporting fp8 stores is not supported yet; export a float32/bfloat16 store")
    tensors = {KEY.format(l): load_layer_table(store, l) for l in store.layer_ids}
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata={"plan_fingerprint": store.plan.fingerprint, "format": "engram-tables/1"})
    os.replace(tmp, out)
    return out


def import_tables(file, plan_from, out) -> Path:
    """A new store at `out`: `plan_from`'s plan and vocab with the file's rows, shapes checked."""
    from safetensors import safe_open

    from engram_cli.store import TableStore
    from engram_cli.train import save_trained_store

    store = TableStore.open(plan_from)
    plan = store.plan
    try:
        with safe_open(str(file), framework="numpy") as f:
            keys = set(f.keys())
            rows = {}
            for l in plan.layer_ids:
                k = KEY.format(l)
                if k not in keys:
                    raise CheckpointError(f"{file} has no tensor {k!r} for layer {l} of the plan; export it with `engram export`")
                t = f.get_tensor(k)
                want = (plan.layer_rows(l), plan.head_dim)
                if t.shape != want:
                    raise CheckpointError(f"{file}: {k} has shape {tuple(t.shape)}, the plan of {plan_from} needs {want}")
                rows[l] = (np.arange(want[0], dtype=np.int64), np.asarray(t, dtype=np.float32))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable file: one line
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(e).__name__}); export it with `engram export`") from None
    return save_trained_store(store.path, Path(out), rows)
