"""Named exceptions. The CLI turns each into one line on stderr and exit code 2.

Every message says what is wrong (with the values involved) and how to fix it.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class for every error a user can cause and fix."""


class TokenizerError(EngramError):
    """A tokenizer path or name that cannot be loaded."""


class VocabMismatch(EngramError):
    """A saved compressed vocabulary that belongs to another tokenizer or normalizer."""


class OutputError(EngramError):
    """An output path that cannot be written, or exists without --force."""


class CorpusError(EngramError):
    """A corpus path that is missing, empty or unreadable."""


class PlanError(EngramError):
    """Table-plan parameters that are inconsistent or out of range."""


class StoreError(EngramError):
    """A table store that is missing, incomplete, corrupt or of another version."""


# -- scale-out (engram_cli.execution) ---------------------------------------------------
class ClusterError(EngramError):
    """A --cluster value that cannot be parsed or joined, or Ray missing (the `ray` extra)."""


class ResumeError(EngramError):
    """A --work-dir whose partial results belong to another build (or cannot be reused)."""


class BackendError(EngramError):
    """A lookup backend that was asked for by name but cannot run here."""


class TokenIdError(EngramError):
    """Token ids at or past the tokenizer's vocabulary size (ids of another tokenizer), refused before a lookup."""


class CheckpointError(EngramError):
    """A model checkpoint that is missing, corrupt, unsafe to load or for other tables."""


class SplitError(CheckpointError):
    """A checkpoint's pinned held-out split that its corpus no longer gives (a held-out document gone or changed)."""


# -- hardening (issue 8) ------------------------------------------------------------------
class OutputBusy(OutputError):
    """An output that another build (named: pid, host, start time) is writing right now."""


class NoSpaceError(OutputError):
    """An output whose file system lacks the space a build needs (or ran out of it)."""
