"""Byte sizes as people write them: `2GiB`, `512MiB`, `4M`, `1.5GB`."""

from __future__ import annotations

import re

from .errors import EngramError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(text: str, *, what: str = "size") -> int:
    """`2GiB` -> 2147483648, `500MB` -> 500000000, `4M` -> 4000000, `1024` -> 1024."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise EngramError(f"cannot read {what} {text!r}; write a byte size like 2GiB, 512MiB or 800MB")
    value, scale, binary = m.groups()
    amount = int(float(value) * (1024 if binary else 1000) ** _POWER[scale.lower()])
    if amount <= 0:
        raise EngramError(f"{what} {text!r} must be positive")
    return amount


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant figures."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            text = f"{n:.3g}"
            return f"{n:.0f} {unit}" if unit == "B" or "e" in text else f"{text} {unit}"  # 1,000-1,023 of a unit: no exponent
        n /= 1024
    raise AssertionError("unreachable")


def parse_int_list(text: str, *, what: str) -> list[int]:
    """`1,15` -> [1, 15]; a clear error for anything else."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise EngramError(f"cannot read {what} {text!r}; give comma-separated integers, e.g. 1,15") from None
    if not values:
        raise EngramError(f"{what} is empty; give comma-separated integers, e.g. 1,15")
    return values
