"""A sweep's figures: points grouped over seeds (mean and spread), the power-law fit, and the plot (matplotlib, imported lazily).

matplotlib is the optional `plot` extra (as for `engram collisions --plot`): it is
imported inside `plot_sweep`, and a sweep without it writes its JSON and says the
image was skipped.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from engram_cli.ablations import ABLATIONS
from engram_cli.intervals import spread
from engram_cli.sweep.points import write_json

MIN_FIT_POINTS = 3  # a slope through two points is a line, not a fit


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def group_points(points: list[dict]) -> list[dict]:
    """One entry per label (a size, a rho, the control), in first-seen order: the figures' mean and spread over its seeds."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["label"], []).append(p)
    out = []
    for label, ps in groups.items():
        first = ps[0]
        g = {
            "label": label, "engram": first["engram"], "rho": first.get("rho"), "seeds": [p["seed"] for p in ps],
            "table_params": first["table_params"], "table_bytes": first["table_bytes"], "rows_per_head": first["rows_per_head"],
            "dense_params": first["dense_params"], "activated_params": first["activated_params"],
            "loss": spread([p["loss"] for p in ps]),
            "loss_memory_ablated": spread([p["loss_memory_ablated"] for p in ps]),
            "ablation_delta": {k: _mean(p["ablations"][k]["delta"] if p["ablations"].get(k) else None for p in ps) for k in ABLATIONS} if first["engram"] else {},
            "hit_rate": _mean(p["hit_rate"] for p in ps),
            "collision_rate": first["collision_rate"],
            "seconds": _mean(p["seconds"] for p in ps),
            "cpu_seconds": _mean(p.get("cpu_seconds") for p in ps),
        }
        for key in ("experts", "routed_params", "inactive_expert_params", "sparse_params"):
            if key in first:
                g[key] = first[key]
        out.append(g)
    return out


def power_law(groups: list[dict]) -> dict | None:
    """Least-squares slope of log(loss) against log(table parameters) over the groups with memory.

    loss ~ C * params**slope: a negative slope is loss falling as the table grows. Fitted
    to the seed means, and per seed where every size has that seed; None with fewer than
    MIN_FIT_POINTS sizes.
    """
    mem = [g for g in groups if g["engram"] and g["table_params"] > 0]
    if len({g["table_params"] for g in mem}) < MIN_FIT_POINTS:
        return None
    x = np.log([g["table_params"] for g in mem])
    y = np.log([g["loss"]["mean"] for g in mem])
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (slope * x + icpt)
    r2 = 1.0 - float((resid**2).sum()) / float(((y - y.mean()) ** 2).sum()) if len(y) > 1 and np.ptp(y) > 0 else None
    return {"slope": float(slope), "intercept": float(icpt), "r2": r2, "points": len(mem),
            "what": "log(held-out loss) = slope * log(table params) + intercept, over the seed means"}


def per_seed_slopes(points: list[dict]) -> list[dict]:
    """`power_law` fitted to each seed's points alone (the spread of the slope)."""
    out = []
    for seed in sorted({p["seed"] for p in points}):
        fit = power_law(group_points([p for p in points if p["seed"] == seed]))
        if fit is not None:
            out.append({"seed": seed, "slope": fit["slope"]})
    return out


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _err(g: dict) -> tuple[float, float]:
    """Error bar below and above the mean: to the seeds' min and max."""
    s = g["loss"]
    return s["mean"] - s["min"], s["max"] - s["mean"]


def plot_sweep(groups: list[dict], path: Path, *, x_key: str, x_label: str, log_x: bool, title: str) -> None:
    """Loss against `x_key` with the seeds' range as error bars, the no-memory groups as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = [g for g in groups if g.get(x_key) is not None and (g["engram"] or x_key == "rho") and (not log_x or g[x_key] > 0)]
    pts.sort(key=lambda g: g[x_key])
    if pts:
        err = np.array([_err(g) for g in pts]).T
        ax.errorbar([g[x_key] for g in pts], [g["loss"]["mean"] for g in pts], yerr=err, marker="o", capsize=4, label="held-out loss (seed mean, range)")
    for g in groups:
        if not g["engram"] and x_key != "rho":
            ax.axhline(g["loss"]["mean"], color="grey", linestyle="--", label=f"{g['label']} ({g['loss']['mean']:.3f})")
            if g["loss"]["n"] > 1:
                ax.axhspan(g["loss"]["min"], g["loss"]["max"], color="grey", alpha=0.15)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    e = math.floor(math.log10(abs(n)) / 3)
    e = max(0, min(e, 3))
    return f"{n / 10 ** (3 * e):.3g}{['', 'k', 'M', 'G'][e]}"


def publish_sweep(result: dict, out_dir: Path, stem: str, *, plot: bool, **plot_args) -> dict:
    """A sweep's last step: its plot `stem`.png (when asked and matplotlib is there; `plot_sweep`'s
    arguments) recorded in `result["plot"]`, then `stem`.json written whole; returns `result`."""
    out_dir = Path(out_dir)
    if plot and plot_available():
        result["plot"] = str(out_dir / f"{stem}.png")
        plot_sweep(result["groups"], out_dir / f"{stem}.png", **plot_args)
    write_json(out_dir / f"{stem}.json", result)
    return result
