"""Scheduling: the resumable work directory of partial results (`work`) and the Ray adapter (`ray`)."""
