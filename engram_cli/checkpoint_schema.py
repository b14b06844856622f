"""The checkpoint schema: every key, type and range of a loaded checkpoint dict checked before a model is built from it.

`check_checkpoint_dict` runs on every `load_checkpoint`: the top-level keys (unknown
ones refused), the model config (every `ModelConfig` field, unknown keys refused; the
sizes bounded by `CONFIG_LIMITS`), `heldout` and `extra` (the keys eval reads, by type;
others are kept), and the weights against the shapes the config implies, computed on
the `meta` device (no memory), with the implied bytes checked against the available
RAM. `check_declared_bytes` bounds the tensors a file declares (safetensors header,
zip central directory) before any is read. Each problem is one `CheckpointError`
naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from engram_cli.errors import CheckpointError
from engram_cli.model import EngramGPT, ModelConfig

TOP_KEYS = ("format", "config", "weights", "tables", "plan_fingerprint", "heldout", "extra")
# (low, high) of each integer field of the model config; a field added to ModelConfig without an entry gets OTHER_INT
CONFIG_LIMITS = {
    "vocab_size": (1, 1 << 22), "n_layer": (1, 256), "n_head": (1, 1024), "d_model": (1, 1 << 16), "block_size": (1, 1 << 20),
    "mem_dim": (0, 1 << 20), "head_dim": (0, 1 << 16), "max_ngram_size": (1, 64), "conv_kernel": (1, 64), "mlp_hidden": (0, 1 << 20),
}
OTHER_INT = (0, 1 << 20)
MAX_TABLE_ROWS = 1 << 44  # a layer's rows (the plan allows 2**40 per head)
REQUIRED_CONFIG = ("vocab_size", "n_layer", "n_head", "d_model", "block_size", "engram_layers")
FIX = "re-run `engram train`"


def _fail(path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {what}; {FIX}")


def _int(path, where: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(path, f"{where} is {type(v).__name__} {str(v)[:40]!r}, not an integer")
    if not lo <= v <= hi:
        raise _fail(path, f"{where} = {v} is outside [{lo}, {hi}]")
    return v


def _keys(path, obj: dict, known, required, *, unknown: str, lacks: str) -> None:
    """No key outside `known`, every key of `required` there (`CheckpointError` naming the first five)."""
    extra = sorted(str(k) for k in obj if k not in known)
    if extra:
        raise _fail(path, f"{unknown} {', '.join(map(repr, extra[:5]))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _fail(path, f"{lacks} {', '.join(map(repr, missing))}")


def _typed(path, where: str, v, types, name: str):
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(path, f"{where} is bool, not {name}")
    if not isinstance(v, types):
        raise _fail(path, f"{where} is {type(v).__name__}, not {name}")
    return v


def check_config(path, cfg) -> ModelConfig:
    """The `ModelConfig` of a checkpoint's `config`, every field checked (`CheckpointError` naming the first bad one)."""
    _typed(path, "config", cfg, dict, "a dict")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    _keys(path, cfg, fields, REQUIRED_CONFIG, unknown="config has unknown key(s)", lacks="config lacks")
    for name, f in fields.items():
        if name not in cfg or name in ("engram_layers", "table_rows", "engram_blocks"):
            continue
        v, default = cfg[name], f.default
        if name in CONFIG_LIMITS or (isinstance(default, int) and not isinstance(default, bool)):
            _int(path, f"config.{name}", v, *CONFIG_LIMITS.get(name, OTHER_INT))
        elif isinstance(default, float):
            _typed(path, f"config.{name}", v, (int, float), "a number")
            if not (math.isfinite(v) and 0 < v < 1) and name == "eps":
                raise _fail(path, f"config.eps = {v} is not in (0, 1)")
            if not math.isfinite(v):
                raise _fail(path, f"config.{name} = {v} is not finite")
        elif isinstance(default, (bool, str)):
            _typed(path, f"config.{name}", v, type(default), type(default).__name__)
    n_layer, d_model, n_head = cfg["n_layer"], cfg["d_model"], cfg["n_head"]
    if d_model % n_head:
        raise _fail(path, f"config.d_model = {d_model} is not a multiple of n_head = {n_head}")
    layers = _typed(path, "config.engram_layers", cfg["engram_layers"], (list, tuple), "a list")
    blocks = _typed(path, "config.engram_blocks", cfg.get("engram_blocks", ()), (list, tuple), "a list")
    for l in layers:  # plan layer ids: placed into blocks by engram_blocks (model.place_layers), else the id is the block
        _int(path, "an entry of config.engram_layers", l, 0, CONFIG_LIMITS["n_layer"][1] if blocks else n_layer - 1)
    if len(set(layers)) != len(layers):
        raise _fail(path, f"config.engram_layers {list(layers)} repeats a layer")
    if blocks:
        if len(blocks) != len(layers):
            raise _fail(path, f"config.engram_blocks {list(blocks)[:8]} does not give one block per Engram layer {list(layers)}")
        for b in blocks:
            _int(path, "an entry of config.engram_blocks", b, 0, n_layer - 1)
        if len(set(blocks)) != len(blocks):
            raise _fail(path, f"config.engram_blocks {list(blocks)} repeats a block")
    rows = _typed(path, "config.table_rows", cfg.get("table_rows", {}), dict, "a dict")
    if sorted(map(str, rows)) != sorted(str(l) for l in layers):
        raise _fail(path, f"config.table_rows has layers {sorted(map(str, rows))}, config.engram_layers {sorted(str(l) for l in layers)}")
    for k, v in rows.items():
        _int(path, f"config.table_rows[{k!r}]", v, 1, MAX_TABLE_ROWS)
    if layers:
        for name in ("head_dim", "mem_dim"):
            _int(path, f"config.{name} (with Engram layers)", cfg.get(name, 0), 1, CONFIG_LIMITS[name][1])
    try:
        return ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise _fail(path, f"config is malformed ({type(e).__name__}: {str(e)[:80]})") from None


def _tensor_1d(path, where: str, v, lo: int, hi: int) -> np.ndarray:
    _typed(path, where, v, torch.Tensor, "a tensor")
    if v.dim() != 1 or v.dtype not in (torch.int64, torch.int32):
        raise _fail(path, f"{where} is a {v.dtype} tensor of shape {tuple(v.shape)}, not a 1-D integer tensor")
    a = v.numpy()
    if a.size and (a.min() < lo or a.max() > hi):
        raise _fail(path, f"{where} has values outside [{lo}, {hi}]")
    return a


def check_heldout(path, h) -> None:
    """The keys of `heldout` that eval reads, by type (others are kept)."""
    _typed(path, "heldout", h, dict, "a dict")
    if "corpus" in h and h["corpus"] is not None:
        _typed(path, "heldout.corpus", h["corpus"], str, "a path")
    if "share" in h:
        _typed(path, "heldout.share", h["share"], (int, float), "a number")
        if not 0 < h["share"] <= 1:
            raise _fail(path, f"heldout.share = {h['share']} is not in (0, 1]")
    for k in ("split", "sha256", "key", "hash"):
        if k in h:
            _typed(path, f"heldout.{k}", h[k], str, "a string")
    for k in ("tokens", "max_heldout_tokens", "segment_tokens", "version"):
        if k in h:
            _int(path, f"heldout.{k}", h[k], 0, 1 << 48)
    if "documents" in h:
        docs = _typed(path, "heldout.documents", h["documents"], list, "a list")
        for i, e in enumerate(docs):
            where = f"heldout.documents[{i}]"
            _typed(path, where, e, dict, "a dict")
            for k, types, name in (("file", str, "a path"), ("sha256", str, "a string")):
                if k not in e:
                    raise _fail(path, f"{where} lacks {k!r}")
                _typed(path, f"{where}.{k}", e[k], types, name)
            for k in ("document", "tokens"):
                if k not in e:
                    raise _fail(path, f"{where} lacks {k!r}")
                _int(path, f"{where}.{k}", e[k], 0, 1 << 48)
            if e.get("segment") is not None:
                _int(path, f"{where}.segment", e["segment"], 0, 1 << 48)
        for k in ("tokens", "sha256"):
            if k not in h:
                raise _fail(path, f"heldout lists documents but lacks {k!r}")


def check_extra(path, ex, cfg: ModelConfig, *, complete: bool = False) -> None:
    """The keys of `extra` that eval reads, by type; `complete`: present, token ids one per output id but 0, touched rows within the tables."""
    _typed(path, "extra", ex, dict, "a dict")
    if "token_ids" not in ex:
        if complete:
            raise _fail(path, "extra lacks 'token_ids'")
    else:
        ids = _tensor_1d(path, "extra.token_ids", ex["token_ids"], 0, (1 << 31) - 1)
        if complete and ids.size + 1 != cfg.vocab_size:
            raise _fail(path, f"extra.token_ids has {ids.size} ids, config.vocab_size {cfg.vocab_size} needs {cfg.vocab_size - 1}")
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise _fail(path, "extra.token_ids is not sorted and unique")
    touched = _typed(path, "extra.touched_rows", ex.get("touched_rows", {}), dict, "a dict")
    for k, v in touched.items():
        if complete and str(k) not in cfg.table_rows:
            raise _fail(path, f"extra.touched_rows names layer {k!r}, not an Engram layer of the config")
        _tensor_1d(path, f"extra.touched_rows[{k!r}]", v, 0, cfg.table_rows.get(str(k), 1 << 62) - 1)
    for k in ("initial_tables", "generation"):
        if ex.get(k) is not None:
            _typed(path, f"extra.{k}", ex[k], str, "a string")
    for k in ("steps", "batch", "seed"):
        if ex.get(k) is not None:
            _int(path, f"extra.{k}", ex[k], 0, 1 << 62)
    for k in ("no_engram", "param_matched"):
        if k in ex:
            _typed(path, f"extra.{k}", ex[k], bool, "a bool")
    if "losses" in ex:
        _typed(path, "extra.losses", ex["losses"], list, "a list")


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable; free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_weights(path, weights, cfg: ModelConfig) -> None:
    """Every weight the config implies, with its shape (computed on the meta device), and the implied bytes within the RAM."""
    _typed(path, "weights", weights, dict, "a dict")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in EngramGPT(cfg).state_dict().items()}
    need = 4 * sum(math.prod(s) for s in want.values())
    if need > available_ram():
        raise _fail(path, f"its config implies {_gib(need)} of weights, more than the {_gib(available_ram())} of RAM available")
    for k, v in weights.items():
        if k not in want:
            raise _fail(path, f"weights do not match its config: weights has {str(k)[:60]!r}, which the config does not have")
        _typed(path, f"weights[{k!r}]", v, torch.Tensor, "a tensor")
        if tuple(v.shape) != want[k]:
            raise _fail(path, f"weights do not match its config: weights[{k!r}] has shape {tuple(v.shape)}, the config implies {want[k]}")
        if not v.is_floating_point():
            raise _fail(path, f"weights[{k!r}] is {v.dtype}, not a floating-point tensor")
    missing = [k for k in want if k not in weights]
    if missing:
        raise _fail(path, f"weights do not match its config: weights lacks {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def check_checkpoint_dict(path, obj: dict, *, complete: bool = False) -> None:
    """`CheckpointError` (one line, naming the key) unless `obj` is a well-formed checkpoint dict.

    `complete` (eval): also what a checkpoint of `engram train` always has, the token
    ids of its output layer and touched rows of its own Engram layers.
    """
    _keys(path, obj, TOP_KEYS, TOP_KEYS, unknown="unknown top-level key(s)", lacks="lacks")
    for k in ("tables", "plan_fingerprint"):
        if obj[k] is not None:
            _typed(path, k, obj[k], str, "a string")
    cfg = check_config(path, obj["config"])
    if cfg.engram_layers and not obj["plan_fingerprint"]:
        raise _fail(path, "has Engram layers but no plan_fingerprint")
    check_heldout(path, obj["heldout"])
    check_extra(path, obj["extra"], cfg, complete=complete)
    check_weights(path, obj["weights"], cfg)


def check_declared_bytes(path, tensors: dict) -> None:
    """`CheckpointError` when the tensors a file declares ({name: (shape, dtype)}, from its header) exceed the file or the RAM."""
    total = 0
    for shape, dtype in tensors.values():
        total += math.prod(shape) * _WIDTH.get(dtype, 8)
    size = Path(path).stat().st_size
    if total > available_ram():
        raise _fail(path, f"its tensors declare {_gib(total)}, more than the {_gib(available_ram())} of RAM available")
    if total > size + (1 << 20) and not any(d == "U8" for _, d in tensors.values()):
        raise _fail(path, f"its tensors declare {total} bytes, more than the file's {size}")


_WIDTH = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}  # bytes per element of each safetensors dtype (zip members are given as U8)

__all__ = ["CONFIG_LIMITS", "available_ram", "check_checkpoint_dict", "check_config", "check_declared_bytes", "check_extra", "check_heldout", "check_weights"]
