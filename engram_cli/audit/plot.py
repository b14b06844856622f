"""Plots of an audit: the --sweep grid as an image, and the shared figure writer (matplotlib, imported lazily).

matplotlib is the optional `plot` extra, so it is imported inside the functions that
draw; `check_plot_support` fails before any work when it is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import EngramError, OutputError

MATPLOTLIB_MISSING = "--plot needs matplotlib, which is not installed; run `pip install 'engram-cli[plot]'` (or pip install matplotlib)"


def check_plot_support(path=None) -> None:
    """Raise a clear error now (before any work) when --plot cannot be honoured: the
    image's folder (when `path` is given) first, then matplotlib."""
    if path is not None:
        check_plot_path(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise EngramError(MATPLOTLIB_MISSING)


def check_plot_path(path) -> None:
    """The --plot image's folder must exist (and be a folder): checked before any work."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise OutputError(f"--plot {str(path)!r} is a directory; give an image file name such as sweep.png")
    if not parent.exists():
        raise OutputError(f"--plot {str(path)!r}: directory {str(parent)!r} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise OutputError(f"--plot {str(path)!r}: {str(parent)!r} is not a directory")


PLOT_FLOOR = 1e-9  # where a rate of 0 is drawn on the log axes (labelled "0" on the plot)


def plot_sweep(sweep: dict, path) -> None:
    """Draw the sweep grid (rates vs bytes, one line per head count) to an image file."""
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngramError(MATPLOTLIB_MISSING) from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "token_weighted", "token-weighted collision rate"), (axes[1], "all_heads_weighted", "all-heads (indistinguishable) share of tokens")):
        floored = False
        for fam in dict.fromkeys(c["family"] for c in sweep["grid"]):
            for K in sweep["heads"]:
                pts = sorted((c["bytes"], c[key]) for c in sweep["grid"] if c["family"] == fam and c["heads"] == K)
                floored = floored or any(p[1] <= 0 for p in pts)
                ax.plot([p[0] for p in pts], [max(p[1], PLOT_FLOOR) for p in pts], marker="o", label=f"{fam} K={K}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if floored:  # a log axis has no 0: zeros sit on a labelled floor line
            ax.axhline(PLOT_FLOOR, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"0 (drawn at {PLOT_FLOOR:g})", (0.01, PLOT_FLOOR), xycoords=("axes fraction", "data"), fontsize=8, color="grey", va="bottom")
        ax.set_xlabel("table bytes")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure to `path` (120 dpi) and close it; a failed write is one OutputError line."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise OutputError(f"cannot write the --plot image {str(path)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
