"""`engram compress-vocab`: compress a tokenizer vocabulary and show what merged."""

from __future__ import annotations

from pathlib import Path

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    notice,
    print_json,
    visible,
)
from rich.markup import escape
from rich.table import Table

from engram_cli.defaults import DEFAULT_VOCAB
from engram_cli.vocab import (
    DEFAULT_TOKENIZER,
    REPLACEMENT_CHAR,
    CompressedVocab,
    LoadedTokenizer,
    check_output_path,
    compress_vocab,
    load_tokenizer,
)

TOP_CLASSES = 10
MAX_MEMBERS_SHOWN = 12


def vocab_report(vocab: CompressedVocab, tokenizer: LoadedTokenizer) -> dict:
    """The `--json` object (schema in docs/compress-vocab.md)."""
    tok = tokenizer.tokenizer
    merged = vocab.merge_classes()
    classes = []
    for compressed_id, members in merged[:TOP_CLASSES]:
        texts = tok.decode_batch([[t] for t in members], skip_special_tokens=False)
        classes.append(
            {
                "compressed_id": compressed_id,
                "key": vocab.keys[compressed_id],
                "size": len(members),
                "members": [{"id": t, "token": tok.id_to_token(t), "text": text} for t, text in zip(members, texts)],
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
        "merged_classes": len(merged),
        "fingerprint": vocab.fingerprint,
        "largest_classes": classes,
    }


def member_label(member: dict) -> str:
    """`id:text` with the decoded text made visible; the raw token when decoding gives U+FFFD."""
    shown = member["token"] if REPLACEMENT_CHAR in member["text"] else member["text"]
    return f"{member['id']}:{visible(shown)}"


def render(report: dict) -> None:
    console.print(
        f"[bold]{escape(report['tokenizer'])}[/]  {report['vocab_size']:,} ids -> {report['compressed_size']:,} "
        f"compressed ids ([bold green]{report['reduction']:.2%}[/] fewer)"
    )
    console.print(
        f"{report['fffd_tokens']:,} byte-fallback tokens (U+FFFD) kept raw; "
        f"{report['merged_classes']:,} classes merge 2+ ids; tokenizer sha256 {report['tokenizer_sha256'][:12]}"
    )
    table = Table(title=f"{TOP_CLASSES} largest merge classes (␣ = space)", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("key")
    table.add_column("size", justify="right")
    table.add_column("members (tokenizer id:decoded text)")
    for cls in report["largest_classes"]:
        shown = cls["members"][:MAX_MEMBERS_SHOWN]
        members = "  ".join(member_label(m) for m in shown)
        if len(cls["members"]) > len(shown):
            members += f"  … +{len(cls['members']) - len(shown)}"
        table.add_row(str(cls["compressed_id"]), escape(visible(cls["key"])), str(cls["size"]), escape(members))
    console.print(table)


def compress_vocab_command(
    tokenizer: str = typer.Argument(
        DEFAULT_TOKENIZER,
        help="A tokenizer.json, a directory holding one, or `deepseek` (the DeepSeek V3/V4 tokenizer).",
    ),
    out: Path = typer.Option(Path(DEFAULT_VOCAB), "-o", "--out", help="Write the mapping to FILE.npz (`lookup` + metadata); `engram build-table` reads ./vocab.npz."),
    no_save: bool = typer.Option(False, "--no-save", help="Write no file; only show the report."),
    as_json: bool = json_option(),
) -> None:
    """Compress a tokenizer vocabulary (NFKC, accents stripped, lowercase) and show what merged.

    Example:

        engram compress-vocab                       # the DeepSeek V3/V4 tokenizer -> vocab.npz
        engram compress-vocab path/to/tokenizer.json -o other.npz --json
        engram compress-vocab --no-save             # the report only
    """
    if no_save:
        out = None
    if out is not None:
        check_output_path(out)  # fail before the work, not after it
    loaded = load_tokenizer(tokenizer)
    vocab = compress_vocab(loaded)
    if out is not None:
        vocab.save(out)
    if out is not None and not as_json:
        notice(f"Wrote {out} (lookup array + metadata); engram build-table reads it from ./{DEFAULT_VOCAB}.")
    report = vocab_report(vocab, loaded)
    if as_json:
        print_json(report)
    else:
        render(report)


def register(app: typer.Typer) -> None:
    app.command("compress-vocab")(compress_vocab_command)
