"""Output safety of `engram build-table` (issue 8; docs/build-table.md, "Failure modes").

Real processes, real files, real Zarr stores: `--force` over what is not a store, outputs
and corpora nested in each other, a staging directory that is not ours, names that cannot
be a store, two builds at once (two processes), `kill -9`, a full disk (a small tmpfs in a
private mount namespace), permission errors at finalize and an immutable old store
(`chattr +i`, which binds root too), too little free space, and the `<out>.old-<pid>` a
crash between the two renames of a replacement leaves. Every failure must be exit 2, one
`Error: ` line on stderr, no traceback, and no store with `complete: true` that is not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from cli_checks import FIXTURES, SMALL_STORE_ARGS, copy_fixtures, one_error_line
from engram_cli.store import staging as staging_module
from engram_cli.cli import app
from engram_cli.store import TableStore, partial_path
from engram_cli.store.output import lock_path, old_path
from engram_cli.store.writer import verify_layout

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
PAGE = 4096  # tmpfs accounts whole pages


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, deepseek_vocab) -> Path:
    """The DeepSeek compressed vocabulary saved once, for --vocab (no recomputation per build)."""
    return deepseek_vocab.save(tmp_path_factory.mktemp("vocab") / "vocab.npz")


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return copy_fixtures(tmp_path / "corpus")


def build_args(corpus: Path, out, vocab_file: Path, *extra) -> list:
    return ["build-table", str(corpus), "-o", out if isinstance(out, bytes) else str(out), *SMALL_STORE_ARGS, "--vocab", str(vocab_file), "--json", *extra]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict:
    """Every path under `root` (itself included) with its bytes (None for a directory)."""
    root = Path(root)
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): (None if p.is_dir() else p.read_bytes()) for p in paths}


def siblings(path: Path) -> list[str]:
    """Names beside `path` that a build of it could have left: its partial, lock, leftovers."""
    return sorted(n.name for n in Path(path).parent.iterdir() if n.name.startswith((f"{path.name}.", f".{path.name}.")))


def engram_process(args, cwd, **kwargs) -> subprocess.Popen:
    """`engram ARGS` as a real process (this checkout's code), stdout and stderr captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "engram_cli.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def assert_one_error_line(rc: int, stderr: bytes) -> str:
    """A refusal of a real process: exit 2, no traceback, exactly one `Error: ` line on stderr."""
    text = stderr.decode()
    assert rc == 2, text
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    return lines[0]


def wait_for_lock(out: Path, proc: subprocess.Popen, *, partial: bool = False) -> dict:
    """Poll until `proc` holds the build lock of `out` (its pid recorded), and its partial exists if asked."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            info = json.loads(lock_path(out).read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid and (not partial or partial_path(out).is_dir()):
            return info
        time.sleep(0.02)
    raise AssertionError("the build never took its lock")


def assert_store_complete(out: Path) -> TableStore:
    """The store opens (complete flag, plan, shapes) and every array and shard is on disk."""
    store = TableStore.open(out)
    verify_layout(out)
    return store


# -- --force replaces only an engram store ------------------------------------------------------
def make_directory(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("the user's own file\n")


def make_file(path: Path) -> None:
    path.write_text("not a store\n")


def make_other_zarr(path: Path) -> None:
    group = zarr.create_group(store=str(path), zarr_format=3, attributes={"format": "someone-else/1"})
    group.create_array("x", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]


@pytest.mark.parametrize("make, kind", [(make_directory, "a directory"), (make_file, "a file"), (make_other_zarr, "a directory")])
def test_force_refuses_what_is_not_an_engram_store(tmp_path, corpus, vocab_file, make, kind):
    out = tmp_path / "t.zarr"
    make(out)
    before = snapshot(out)
    line = one_error_line(invoke(*build_args(corpus, out, vocab_file, "--force")))
    assert f"is {kind} but not an engram table store" in line and "--force replaces only a store" in line
    assert snapshot(out) == before
    assert siblings(out) == []


def test_force_refuses_the_corpus_itself(tmp_path, corpus, vocab_file):
    before = snapshot(corpus)
    line = one_error_line(invoke(*build_args(corpus, corpus, vocab_file, "--force")))
    assert "is the corpus path" in line
    assert snapshot(corpus) == before
    assert siblings(corpus) == []


def test_output_inside_the_corpus_and_corpus_inside_the_output(tmp_path, corpus, vocab_file):
    before = snapshot(corpus)
    for extra in ([], ["--force"]):
        line = one_error_line(invoke(*build_args(corpus, corpus / "debian-policy" / "t.zarr", vocab_file, *extra)))
        assert "lies inside the corpus path" in line
        line = one_error_line(invoke(*build_args(corpus / "debian-policy", corpus, vocab_file, *extra)))
        assert "lies inside the output" in line
    assert snapshot(corpus) == before
    assert siblings(corpus) == []


@pytest.mark.parametrize("content", ["a file", "a stats folder"])
def test_an_unrelated_partial_is_not_deleted(tmp_path, corpus, vocab_file, content):
    out = tmp_path / "t.zarr"
    partial = partial_path(out)
    partial.mkdir()
    if content == "a file":
        (partial / "draft.txt").write_text("keep me\n")
    else:  # named like a build's folder, holding what a build never writes
        (partial / "stats").mkdir()
        (partial / "stats" / "thesis.tex").write_text("keep me\n")
    before = snapshot(partial)
    line = one_error_line(invoke(*build_args(corpus, out, vocab_file)))
    assert "is not an engram staging directory" in line and str(partial) in line
    assert snapshot(partial) == before
    assert not out.exists() and not lock_path(out).exists()


@pytest.mark.parametrize("name", [".", "..", "sub/.."])
def test_dot_names_are_refused(tmp_path, corpus, vocab_file, monkeypatch, name):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "sub")
    line = one_error_line(invoke(*build_args(corpus, name, vocab_file, "--force")))
    assert "names a directory, not a store" in line
    assert snapshot(tmp_path / "sub") == before and sorted(os.listdir(tmp_path)) == ["corpus", "sub"]


def test_a_name_that_is_not_utf8_is_one_line(tmp_path, corpus, vocab_file):
    out = os.fsencode(tmp_path) + b"/t\xff\xfe.zarr"  # a real argv byte string, as a shell passes it
    proc = engram_process(build_args(corpus, out, vocab_file), cwd=tmp_path)
    _, err = proc.communicate(timeout=600)
    line = assert_one_error_line(proc.returncode, err)
    assert "is not valid UTF-8" in line and "\\udcff\\udcfe" in line
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


# -- exclusion: one build per output --------------------------------------------------------------
def test_a_second_build_fails_at_once_naming_the_holder(tmp_path, corpus, vocab_file):
    out = tmp_path / "t.zarr"
    first = engram_process(build_args(corpus, out, vocab_file), cwd=tmp_path)
    try:
        holder = wait_for_lock(out, first)
        first.send_signal(signal.SIGSTOP)  # a build in the middle of its work, for as long as the second one takes
        second = engram_process(build_args(corpus, out, vocab_file, "--force"), cwd=tmp_path)
        _, err = second.communicate(timeout=600)
        assert first.poll() is None  # the second did not wait for the first
    finally:
        first.send_signal(signal.SIGCONT)
    line = assert_one_error_line(second.returncode, err)
    assert f"another build is writing {str(out)!r} (pid {first.pid} on {holder['host']}, started {holder['started']})" in line
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    store = assert_store_complete(out)
    assert report["store"]["plan_fingerprint"] == store.plan.fingerprint
    assert siblings(out) == []  # no partial, no lock file, no leftover


def test_kill_9_leaves_nothing_to_clean_by_hand(tmp_path, corpus, vocab_file):
    out = tmp_path / "t.zarr"
    victim = engram_process(build_args(corpus, out, vocab_file), cwd=tmp_path)
    wait_for_lock(out, victim, partial=True)
    victim.kill()
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert lock_path(out).exists() and partial_path(out).is_dir()  # what the dead build left
    assert not out.exists()
    result = invoke(*build_args(corpus, out, vocab_file))  # the next build runs, no hand work
    assert result.exit_code == 0, result.output
    assert_store_complete(out)
    assert siblings(out) == []


# -- a full disk and too little space: a small tmpfs in a private mount namespace ------------------
TMPFS_SCRIPT = r"""
mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97
mnt=$2; logs=$3; shift 3
"$@" >"$logs/out" 2>"$logs/err"; echo $? >"$logs/rc"
cd "$mnt" && find . -mindepth 1 | sort >"$logs/left"
"""


def tmpfs_available() -> str | None:
    """None when an unprivileged tmpfs mount works here, else why not."""
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(probe)],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare cannot run here: {e}"
    return None if done.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {done.stderr.decode().strip()}"


needs_tmpfs = pytest.mark.skipif(tmpfs_available() is not None, reason=str(tmpfs_available()))


def build_in_tmpfs(tmp_path: Path, size: int, args: list[str]) -> tuple[int, bytes, bytes, list[str]]:
    """`engram ARGS` (paths under the mount given as `MNT/...`) with a fresh tmpfs of `size` bytes at MNT.

    Returns the exit code, stdout, stderr and what is left on the tmpfs afterwards.
    """
    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [a.replace("MNT", str(mnt)) for a in map(str, args)]
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", TMPFS_SCRIPT, "sh", str(size), str(mnt), str(logs),
                    sys.executable, "-m", "engram_cli.cli", *args], cwd=tmp_path, env=env, check=True, timeout=600)
    left = (logs / "left").read_text().split()
    return int((logs / "rc").read_text()), (logs / "out").read_bytes(), (logs / "err").read_bytes(), left


def pages(root: Path) -> int:
    """tmpfs pages the files under `root` take (whole pages per file)."""
    return sum(math.ceil(p.stat().st_size / PAGE) for p in Path(root).rglob("*") if p.is_file())


def plan_bytes(plan: dict) -> int:
    """Table bytes from the plan's primes: rows x head_dim x 4 (float32)."""
    return sum(sum(o["primes"]) for layer in plan["layers"] for o in layer["orders"]) * plan["head_dim"] * 4


@needs_tmpfs
def test_disk_full_while_writing_statistics(tmp_path, vocab_file):
    corpus = tmp_path / "policy"
    shutil.copytree(FIXTURES / "debian-policy", corpus)  # 24 files, ~100 k distinct n-grams
    tiny = ["--layers", "1", "--heads", "2", "--dim", "32", "--rows-per-head", "13"]  # tables of a few KiB, statistics far larger
    ref = tmp_path / "ref.zarr"
    made = invoke("build-table", corpus, "-o", ref, *tiny, "--vocab", vocab_file, "--json")
    assert made.exit_code == 0, made.output
    stats_pages = pages(ref / "stats")
    table_pages = math.ceil(plan_bytes(json.loads(made.stdout)["plan"]) / PAGE)
    room = 1 + max(table_pages + 1, stats_pages // 2)  # the lock file, and half the statistics (more than the tables)
    assert table_pages + 1 < stats_pages // 2  # so the free-space check passes and counting runs out of space
    rc, out, err, left = build_in_tmpfs(tmp_path, room * PAGE, ["build-table", corpus, "-o", "MNT/t.zarr", *tiny, "--vocab", vocab_file, "--json"])
    line = assert_one_error_line(rc, err)
    assert line.startswith("Error: no space left on the device while writing") and "nothing was replaced" in line
    assert out == b"" and left == []  # the partial removed, the lock released, no store


@needs_tmpfs
def test_disk_full_while_writing_shards(tmp_path, corpus, vocab_file):
    args = [*SMALL_STORE_ARGS, "--compressor", "none", "--workers", "1", "--vocab", vocab_file, "--json"]
    ref = tmp_path / "ref.zarr"
    made = invoke("build-table", corpus, "-o", ref, *args)
    assert made.exit_code == 0, made.output
    shards = sorted((p for p in (ref / "layer_15" / "table" / "c").rglob("*") if p.is_file()), key=lambda p: int(p.parent.name))
    last_shard = math.ceil(shards[-1].stat().st_size / PAGE)
    room = 1 + pages(ref) - last_shard // 2  # the lock file and everything, but half of the last shard written
    assert plan_bytes(json.loads(made.stdout)["plan"]) <= (room - 1) * PAGE  # the free-space check passes
    rc, out, err, left = build_in_tmpfs(tmp_path, room * PAGE, ["build-table", corpus, "-o", "MNT/t.zarr", *args])
    line = assert_one_error_line(rc, err)
    assert line.startswith("Error: no space left on the device while writing") and "nothing was replaced" in line
    assert out == b"" and left == []


@needs_tmpfs
def test_too_little_free_space_is_refused_with_the_figures_before_writing(tmp_path, corpus, vocab_file):
    planned = invoke("build-table", corpus, *SMALL_STORE_ARGS, "--vocab", vocab_file, "--plan-only", "--json")
    need = plan_bytes(json.loads(planned.stdout)["plan"])
    size = 64 * PAGE
    assert need > size
    rc, out, err, left = build_in_tmpfs(tmp_path, size, ["build-table", corpus, "-o", "MNT/t.zarr", *SMALL_STORE_ARGS, "--vocab", vocab_file, "--json"])
    line = assert_one_error_line(rc, err)
    assert f"the tables need {need / 2**20:.1f} MiB ({need} bytes)" in line
    assert f"has {(size - PAGE) / 2**10:.1f} KiB free" in line  # the tmpfs less the lock file's page
    assert out == b"" and left == []


# -- permissions at finalize and an immutable old store (chattr +i binds root too) ------------------
def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture()
def immutable_allowed(tmp_path) -> None:
    """Skip unless `chattr +i` works here (root on a file system with the flag)."""
    probe = tmp_path / "chattr-probe"
    probe.mkdir()
    done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not permitted here: {done.stderr.decode().strip() or done.returncode}")
    chattr("-i", probe)
    probe.rmdir()


def test_permission_error_at_finalize(tmp_path, corpus, vocab_file, monkeypatch, immutable_allowed):
    parent = tmp_path / "out"
    parent.mkdir()
    out = parent / "t.zarr"
    real_finalize = staging_module.finalize

    def finalize_in_a_read_only_folder(partial, out_, force):
        chattr("+i", parent)  # the folder turns immutable after the tables were written, before they move in
        return real_finalize(partial, out_, force)

    monkeypatch.setattr(staging_module, "finalize", finalize_in_a_read_only_folder)
    try:
        result = invoke(*build_args(corpus, out, vocab_file))
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=False)
    line = one_error_line(result)
    assert "cannot move the new store into place" in line and "Operation not permitted" in line and "nothing was replaced" in line
    assert not out.exists()
    # the staging folder could only be emptied in the immutable folder; it is ours: the next build removes it
    assert partial_path(out).is_dir() and not any(partial_path(out).iterdir())
    monkeypatch.undo()
    again = invoke(*build_args(corpus, out, vocab_file))
    assert again.exit_code == 0, again.output
    assert_store_complete(out)
    assert siblings(out) == []


def test_an_immutable_old_store_under_force(tmp_path, corpus, vocab_file, immutable_allowed):
    out = tmp_path / "t.zarr"
    assert invoke(*build_args(corpus, out, vocab_file)).exit_code == 0
    before = snapshot(out)
    chattr("+i", out)
    try:
        line = one_error_line(invoke(*build_args(corpus, out, vocab_file, "--force", "--seed", "7")))
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)
    assert "cannot move the old store aside" in line and "Operation not permitted" in line
    assert snapshot(out) == before
    assert TableStore.open(out).plan.seed == 0
    assert siblings(out) == []


# -- a leftover <out>.old-<pid> ------------------------------------------------------------------
def test_a_leftover_is_named_and_the_next_build_restores_it(tmp_path, corpus, vocab_file):
    out = tmp_path / "t.zarr"
    assert invoke(*build_args(corpus, out, vocab_file)).exit_code == 0
    before = snapshot(out)
    old = old_path(out, 424242)
    os.rename(out, old)  # what a crash between the two renames of a replacement leaves: no store, the old one aside
    for command in (["inspect", out], ["collisions", out]):
        line = one_error_line(invoke(*command))
        assert f"{str(old)!r} holds the store an interrupted replacement moved aside" in line and f"`mv {old} {out}`" in line
    result = invoke(*build_args(corpus, out, vocab_file))  # no --force: restored, then refused like any existing store
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"engram: restored {str(out)!r} from {str(old)!r}, left by an interrupted replacement",
                                          f"Error: {str(out)!r} already exists; pass --force to replace it"]
    assert snapshot(out) == before  # the old store, byte for byte
    assert siblings(out) == []


def test_a_leftover_beside_a_store_is_named_and_the_next_build_removes_it(tmp_path, corpus, vocab_file):
    out = tmp_path / "t.zarr"
    assert invoke(*build_args(corpus, out, vocab_file)).exit_code == 0
    old = old_path(out, 424242)
    shutil.copytree(out, old)  # a crash after the new store moved in, before the old one was deleted
    shown = invoke("inspect", out, "--json")
    assert shown.exit_code == 0, shown.output
    assert f"{str(old)!r} holds the store an interrupted replacement moved aside" in shown.stderr  # a notice, not a failure
    json.loads(shown.stdout)
    rebuilt = invoke(*build_args(corpus, out, vocab_file, "--force", "--seed", "7"))
    assert rebuilt.exit_code == 0, rebuilt.output
    assert f"engram: removed {str(old)!r}, left by an interrupted replacement ({str(out)!r} is in place)" in rebuilt.stderr.splitlines()
    assert assert_store_complete(out).plan.seed == 7
    assert siblings(out) == []


# -- the other writers of a store: train's trained store --------------------------------------------
def test_the_trained_store_goes_through_the_same_output_checks(tmp_path, corpus, vocab_file):
    import numpy as np

    from engram_cli.errors import OutputError
    from engram_cli.train import save_trained_store

    src = tmp_path / "t.zarr"
    assert invoke(*build_args(corpus, src, vocab_file)).exit_code == 0
    head_dim = TableStore.open(src).plan.head_dim
    trained = {1: (np.array([0, 5], dtype=np.int64), np.full((2, head_dim), 0.5, dtype=np.float32))}
    src_before = snapshot(src)

    mine = tmp_path / "mine"
    make_directory(mine)
    foreign_partial = partial_path(tmp_path / "new.zarr")
    make_directory(foreign_partial)
    before = snapshot(mine), snapshot(foreign_partial)
    for out, force, fragment in [
        (mine, True, "is a directory but not an engram table store"),
        (src, True, "is the table store"),
        (src / "layer_1", True, "lies inside the table store"),
        (tmp_path / "new.zarr", False, "is not an engram staging directory"),
    ]:
        with pytest.raises(OutputError, match=fragment):
            save_trained_store(src, out, trained, force=force)
    assert (snapshot(mine), snapshot(foreign_partial)) == before
    assert snapshot(src) == src_before

    other = tmp_path / "other.zarr"
    save_trained_store(src, other, trained, force=False)
    with pytest.raises(OutputError, match="already exists; pass --force"):
        save_trained_store(src, other, trained, force=False)
    save_trained_store(src, other, trained)  # train's default: replaces an engram store (only)
    store = assert_store_complete(other)
    assert store.read_rows(1, np.array([0, 5])).tolist() == trained[1][1].tolist()
    assert siblings(other) == [] and snapshot(src) == src_before


def test_the_distributed_build_goes_through_the_same_output_checks(tmp_path, corpus, deepseek_tokenizer, deepseek_vocab):
    from concurrent.futures import ThreadPoolExecutor

    from engram_cli.pipeline.build import DistributedOptions, build_tables, plan_tables
    from engram_cli.errors import OutputError

    plan = plan_tables(deepseek_vocab, layer_ids=[1], max_ngram_size=3, heads=2, rows_per_head=[101, 103], dim=32, seed=0, pad_id=2)
    mine = tmp_path / "mine"
    make_directory(mine)
    before = snapshot(corpus), snapshot(mine)
    cases = [
        (corpus, {}, "is the corpus path"),
        (corpus / "debian-policy" / "t.zarr", {}, "lies inside the corpus path"),
        (mine, {}, "is a directory but not an engram table store"),
        (tmp_path / "t.zarr", {"work_dir": tmp_path}, "lies inside the work directory"),  # its partials are dropped: never the corpus
    ]
    with ThreadPoolExecutor(1) as ex:
        for out, options, fragment in cases:
            with pytest.raises(OutputError, match=fragment):
                build_tables([corpus], out, cluster="local:1", tokenizer=deepseek_tokenizer, vocab=deepseek_vocab, plan=plan,
                             options=DistributedOptions(**options), force=True, executor=ex)
    assert (snapshot(corpus), snapshot(mine)) == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "mine"]
