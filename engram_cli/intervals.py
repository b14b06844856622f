"""Bootstrap intervals over held-out windows: a loss, a paired difference, and a summary of seeds.

The resampling unit is the held-out window (the model's context: positions within a
window share their context, so they are not independent). Every interval is the
2.5th-97.5th percentile of BOOTSTRAP_RESAMPLES means of windows drawn with replacement,
with a fixed seed, so a report is reproducible. A paired interval draws the same windows
for both sides: it is the interval of the mean per-window difference.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def bootstrap_interval(per_window: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """[lo, hi]: the 95 % percentile bootstrap interval of the mean of `per_window`."""
    x = np.asarray(per_window, dtype=np.float64)
    if x.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(0, resamples, 100):  # 100 resamples at a time: memory 100 x windows
        k = min(100, resamples - i)
        means[i : i + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(1)
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def paired(base: np.ndarray, other: np.ndarray) -> dict:
    """`{loss, delta, interval}`: `other`'s mean loss, its mean difference to `base` over the same windows, and that difference's interval."""
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    d = other - base
    return {"loss": float(other.mean()), "delta": float(d.mean()), "interval": bootstrap_interval(d)}


def spread(values: list[float]) -> dict:
    """`{n, mean, std, min, max}` of one figure over checkpoints (std: sample standard deviation, null for one)."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


def compare(reports: list[dict], per_window: list[np.ndarray]) -> dict:
    """`paired` (each checkpoint after the first against the first, on the same windows) and `seed_groups`.

    A pair is compared only when both scored the same held-out windows (`windows_sha256`);
    otherwise its `delta` and `interval` are null. Checkpoints of the same configuration
    (`config_sha256`: model shape, steps, batch, split, --no-engram) scored on the same
    windows, with two or more different seeds, form a seed group: each figure as
    `{n, mean, std, min, max}` over its checkpoints.
    """
    pairs = []
    first = reports[0] if reports else None
    for r, w in zip(reports[1:], per_window[1:]):
        same = r["windows_sha256"] == first["windows_sha256"]
        p = paired(per_window[0], w) if same else {"delta": None, "interval": None}
        pairs.append({"a": first["checkpoint"], "b": r["checkpoint"], "same_windows": same, "delta": p["delta"], "interval": p["interval"]})
    groups: dict = {}
    for r in reports:
        groups.setdefault((r["config_sha256"], r["windows_sha256"]), []).append(r)
    seed_groups = []
    for members in groups.values():
        seeds = [m.get("seed") for m in members]
        if len(set(seeds)) < 2:
            continue
        g = {"checkpoints": [m["checkpoint"] for m in members], "seeds": seeds,
             "loss": spread([m["loss"] for m in members]), "memory_gain": spread([m["memory_gain"] for m in members])}
        if all(m["ablations"] for m in members):
            g["ablation_delta"] = {k: spread([m["ablations"][k]["delta"] for m in members]) for k in members[0]["ablations"]
                                   if all(m["ablations"].get(k) for m in members)}
        seed_groups.append(g)
    return {"paired": pairs, "seed_groups": seed_groups}
