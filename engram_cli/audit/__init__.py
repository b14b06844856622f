"""The collision audit: keys, figures, what-if plans, the partitioned audit, plots."""
