"""`engram compress-vocab`: compress a tokenizer vocabulary and show what merged."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engram_cli.vocab import DEFAULT_TOKENIZER, CompressedVocab, compress_vocab, load_tokenizer

from ._output import console, json_option, print_json, visible

TOP_CLASSES = 10
MAX_MEMBERS_SHOWN = 12


def vocab_report(vocab: CompressedVocab, tokenizer) -> dict:
    """The `--json` object (schema in docs/compress-vocab.md)."""
    tok = tokenizer.tokenizer
    classes = []
    for compressed_id, members in vocab.merge_classes()[:TOP_CLASSES]:
        classes.append(
            {
                "compressed_id": compressed_id,
                "key": vocab.keys[compressed_id],
                "size": len(members),
                "members": [{"id": t, "token": tok.id_to_token(t)} for t in members],
            }
        )
    return {
        "tokenizer": tokenizer.name,
        "tokenizer_path": str(tokenizer.path),
        "tokenizer_sha256": vocab.tokenizer_sha256,
        "normalizer": vocab.normalizer,
        "normalizer_version": vocab.normalizer_version,
        "vocab_size": vocab.vocab_size,
        "compressed_size": vocab.compressed_size,
        "reduction": vocab.reduction,
        "fffd_tokens": vocab.fffd_tokens,
        "merged_classes": len(vocab.merge_classes()),
        "fingerprint": vocab.fingerprint,
        "largest_classes": classes,
    }


def render(report: dict, out: Optional[Path]) -> None:
    console.print(
        f"[bold]{report['tokenizer']}[/]  {report['vocab_size']:,} ids -> {report['compressed_size']:,} "
        f"compressed ids ([bold green]{report['reduction']:.2%}[/] fewer)"
    )
    console.print(
        f"{report['fffd_tokens']:,} byte-fallback tokens (U+FFFD) kept raw; "
        f"{report['merged_classes']:,} classes merge 2+ ids; tokenizer sha256 {report['tokenizer_sha256'][:12]}"
    )
    table = Table(title=f"{TOP_CLASSES} largest merge classes", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("key")
    table.add_column("size", justify="right")
    table.add_column("members (tokenizer id: decoded token)")
    for cls in report["largest_classes"]:
        shown = cls["members"][:MAX_MEMBERS_SHOWN]
        members = "  ".join(f"{m['id']}:{visible(m['token'])}" for m in shown)
        if len(cls["members"]) > len(shown):
            members += f"  … +{len(cls['members']) - len(shown)}"
        table.add_row(str(cls["compressed_id"]), visible(cls["key"]), str(cls["size"]), members)
    console.print(table)
    if out is not None:
        console.print(f"Wrote [bold]{out}[/] (lookup array + metadata).")


def compress_vocab_command(
    tokenizer: str = typer.Argument(
        DEFAULT_TOKENIZER,
        help="A tokenizer.json, a directory holding one, or `deepseek` (the DeepSeek V3/V4 tokenizer).",
    ),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the mapping to FILE.npz (`lookup` + metadata).", dir_okay=False),
    as_json: bool = json_option(),
) -> None:
    """Compress a tokenizer vocabulary (NFKC, accents stripped, lowercase) and show what merged.

    Example:

        engram compress-vocab                       # the DeepSeek V3/V4 tokenizer
        engram compress-vocab path/to/tokenizer.json -o vocab.npz --json
    """
    loaded = load_tokenizer(tokenizer)
    vocab = compress_vocab(loaded)
    if out is not None:
        vocab.save(out)
    report = vocab_report(vocab, loaded)
    if as_json:
        print_json(report)
    else:
        render(report, out)


def register(app: typer.Typer) -> None:
    app.command("compress-vocab")(compress_vocab_command)
