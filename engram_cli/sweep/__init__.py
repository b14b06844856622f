"""`engram sweep`: the Engram paper's two headline experiments at small scale, built from `engram train` and `engram eval` runs.

- `points`: one point (spec, config hash, its directory, train -> eval, skipped when finished);
- `memory`: held-out loss against table size, with the parameter-matched no-memory control;
- `allocation`: held-out loss against rho, the experts' share of a fixed sparse budget;
- `summary`: seed groups, the power-law fit, the plot.
"""

from engram_cli.sweep.allocation import allocation_sizes, run_allocation_sweep
from engram_cli.sweep.memory import SweepOptions, run_memory_sweep
from engram_cli.sweep.points import PointSpec, TableSpec

__all__ = ["PointSpec", "SweepOptions", "TableSpec", "allocation_sizes", "run_allocation_sweep", "run_memory_sweep"]
