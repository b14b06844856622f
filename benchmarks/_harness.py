"""Shared benchmark harness: run providers side by side, report ratios, append results.

Each `bench_<stem>.py` builds its inputs (sizes from arguments), calls `measure` for a
baseline and for the engram path in the same process, and `record`s the rows. Figures
are ratios against the baseline; absolute times are kept for context only.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("results.jsonl")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def measure(fn, *, repeat: int = 3, warmup: int = 1) -> dict:
    """Best-of-`repeat` wall time of `fn()` (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "times_s": times}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def record(bench: str, rows: list[dict], **context) -> None:
    """Append one JSON line per row with machine, version, git sha and timestamp."""
    from engram_cli import __version__

    stamp = {
        "bench": bench,
        "engram": __version__,
        "git": git_sha(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **machine(),
        **context,
    }
    with open(RESULTS, "a") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
