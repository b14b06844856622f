"""The README's typical session runs as written, in a fresh directory, with defaults that chain.

Each command runs as a real subprocess with stdout redirected to a file, as a user's
`engram collisions > report.txt` would: the report must be in the file and not on
stderr (progress and notices only). Every figure the README quotes between
`<!-- figure -->` markers must appear in what the commands printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engram_cli.cli import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Part of the fixture corpus keeps the test fast: one long document (39k tokens), whose
# held-out segments (4,096 tokens) give eval text; eval's time grows with them.
CORPUS_PART = ROOT / "fixtures" / "corpus" / "maint-guide"
# What the test adds to the README's lines so that they run in seconds (one optimizer step
# shows that train writes what eval reads; one document needs the segment split, the
# default document split holds out whole documents: 5 of the whole corpus' 40).
SMALL = {"build-table": ["--budget", "16MiB"], "train": ["--steps", "1", "--split", "segment"]}
# ENGRAM_README_VERBATIM=1: the lines exactly as written, on the whole fixture corpus (the
# reference plan: a 4.4 GiB store, ~6 GiB of RAM while training, several minutes on 2 cores).
VERBATIM = os.environ.get("ENGRAM_README_VERBATIM") == "1"
if VERBATIM:
    CORPUS_PART, SMALL = ROOT / "fixtures" / "corpus", {}
# A line of each command's report (stdout), never on stderr.
REPORT_MARKS = {
    "compress-vocab": "compressed ids",
    "build-table": "N-gram statistics",
    "collisions": "summary (mean over heads)",
    "inspect": "tables.zarr",
    "train": "next: engram eval",
    "eval": "held-out cross-entropy",
}


def session_lines() -> list[list[str]]:
    block = README.split("<!-- typical-session -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split() for line in block.strip().splitlines()]


# Docs whose `<!-- figure -->` figures this session checks.
FIGURE_DOCS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")


def figures() -> list[str]:
    return [f for doc in FIGURE_DOCS for f in re.findall(r"<!-- figure -->`([^`]+)`<!-- /figure -->", doc.read_text(encoding="utf-8"))]


def run(cwd: Path, args: list[str], name: str) -> tuple[str, str]:
    out, err = cwd / f"{name}.out", cwd / f"{name}.err"
    with out.open("w") as o, err.open("w") as e:
        rc = subprocess.run([sys.executable, "-m", "engram_cli.cli", *args], cwd=cwd, stdout=o, stderr=e, timeout=600).returncode
    assert rc == 0, f"engram {' '.join(args)} exited {rc}: {err.read_text()}"
    return out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")


def test_readme_session_runs_with_defaults_that_chain(tmp_path):
    lines = session_lines()
    assert [line[:2] for line in lines] == [
        ["engram", "compress-vocab"], ["engram", "build-table"], ["engram", "collisions"], ["engram", "inspect"], ["engram", "train"], ["engram", "eval"],
    ]
    shutil.copytree(CORPUS_PART, tmp_path / "corpus" / CORPUS_PART.name)
    assert tmp_path.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # a fresh directory
    registered = {m.replace("_", "-") for m in COMMAND_MODULES}
    printed = []
    for line in lines:
        command = line[1]
        if command not in registered:  # `engram inspect` lands in parallel
            continue
        out, err = run(tmp_path, [*line[1:], *SMALL.get(command, [])], command)
        printed += [out, err]
        mark = REPORT_MARKS[command]
        assert mark in out, f"engram {command}: the report is not on stdout"
        assert mark not in err, f"engram {command}: the report is on stderr"
        if command == "compress-vocab":
            assert (tmp_path / "vocab.npz").is_file() and "Wrote vocab.npz" in err
        if command == "build-table":
            assert "Using ./vocab.npz (matches deepseek)." in err
            assert (tmp_path / "tables.zarr").is_dir()
            assert "\x1b[" not in err and "\r" not in err  # stderr is a file: no live frames
            assert re.search(r"^reading: done, [\d.]+ (KiB|MiB) ", err, re.M), err  # bytes in human units
        if command == "train":
            assert (tmp_path / "model.ckpt").exists() and (tmp_path / "model.tables.zarr").is_dir()
        if command == "eval":
            assert "loss, memory ablated" in out and "mean gate" in out and "hot-row cache hit rate" in out
    out, err = run(tmp_path, ["build-table", "corpus/", "--plan-only"], "plan")  # the reference plan's size
    printed += [out, err]
    text = " ".join(" ".join(printed).split())
    for figure in figures():
        assert " ".join(figure.split()) in text, f"README figure {figure!r} is not what the commands print"


def test_readme_cites_only_files_in_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        body = doc.read_text(encoding="utf-8")
        assert "shared/SPEC" not in body, doc.name
        for link in re.findall(r"\]\(([^)#]+)\)", body):
            if not link.startswith(("http://", "https://")):
                assert (doc.parent / link).exists(), f"{doc.name} links to {link}, not in the repository"


@pytest.mark.parametrize("args, closest", [(["colisions"], "collisions"), (["build-tabel", "corpus/"], "build-table")])
def test_unknown_command_names_the_closest(args, closest, tmp_path):
    r = subprocess.run([sys.executable, "-m", "engram_cli.cli", *args], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"did you mean `engram {closest}`?" in r.stderr
