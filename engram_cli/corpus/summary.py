"""What reading a corpus found: `CorpusSummary`, and the one-line message for a corpus without documents.

A summary is filled in while the documents are read (by `readers`), stored with the
n-gram statistics (under "corpus" in summary.json) and merged in corpus order when a
corpus was read in shards (`CorpusSummary.merge`): the merge equals the summary of
reading the whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from engram_cli.defaults import DEFAULT_TEXT_FIELD


@dataclass
class CorpusSummary:
    """What reading a corpus found. Filled in while the documents are read."""

    files: int = 0  # files read (skipped ones not included)
    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the documents' text (after decompression)
    skipped_binary: int = 0  # files skipped because they look binary
    skipped_other: dict[str, int] = field(default_factory=dict)  # reason -> records/files skipped
    skipped_examples: dict[str, str] = field(default_factory=dict)  # reason -> first path it happened in
    invalid_utf8: int = 0  # documents in which invalid UTF-8 was replaced by U+FFFD
    tokens: int = 0  # filled in by the tokenizing stage

    def skip(self, reason: str, path: Path | str) -> None:
        self.skipped_other[reason] = self.skipped_other.get(reason, 0) + 1
        self.skipped_examples.setdefault(reason, str(path))

    @property
    def skipped(self) -> int:
        return self.skipped_binary + sum(self.skipped_other.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CorpusSummary":
        """The inverse of `to_dict` (as stored in a stats summary.json under "corpus")."""
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()})

    def merge(self, other: "CorpusSummary | Iterable[CorpusSummary]") -> "CorpusSummary":
        """This summary followed by `other` (one or a list, in corpus order), as a new one.

        Equals the summary of reading the shards' files one after the other: figures
        add up, and each skip reason keeps the first path it happened in.
        """
        others = [other] if isinstance(other, CorpusSummary) else list(other)
        out = CorpusSummary.from_dict(self.to_dict())
        for o in others:
            out.files += o.files
            out.documents += o.documents
            out.bytes += o.bytes
            out.skipped_binary += o.skipped_binary
            out.invalid_utf8 += o.invalid_utf8
            out.tokens += o.tokens
            for reason, count in o.skipped_other.items():
                out.skipped_other[reason] = out.skipped_other.get(reason, 0) + count
            for reason, path in o.skipped_examples.items():
                out.skipped_examples.setdefault(reason, path)
        return out


def empty_corpus_message(files: list[Path], summary: CorpusSummary, text_field: str = DEFAULT_TEXT_FIELD) -> str:
    """One line: why a corpus gave no document (or no token), and what to do."""
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files"
    if not files:
        return "the corpus has no files (directories are empty or hold only hidden files); pass files with text"
    reasons = []
    if summary.skipped_binary:
        reasons.append(f"{summary.skipped_binary} binary files skipped")
    reasons.extend(f"{n} x {reason} (first: {summary.skipped_examples[reason]})" for reason, n in summary.skipped_other.items())
    if summary.documents and not summary.tokens:
        what = f"the corpus ({where}, {summary.documents} documents) has no tokens: every document is empty"
    else:
        what = f"the corpus ({where}) has no documents"
    why = f": {'; '.join(reasons)}" if reasons else ""
    return f"{what}{why}; pass text files, or .jsonl/.parquet with a {text_field!r} field (or set --text-field)"
