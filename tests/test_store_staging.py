"""Staged output of a store: completion only after the layout is verified, a failed replacement
puts the old store back, and the newest of several leftovers is the one restored.

Real stores on disk (the small plans of tests/test_store.py); failures are injected by
wrapping `os.replace` and `os.rename`, which every rename of the staging steps goes through.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from engram_cli.errors import OutputError, StoreError
from engram_cli.store import TableStore, create_store, finalize, partial_path, prepare_partial, write_tables
from engram_cli.store.output import leftover_stores, lock_path, old_path, settle_leftovers
from engram_cli.store.writer import create_layout, mark_complete, run_shard_task, shard_tasks

from oracles import STORE_SMALL as SMALL, STORE_VOCAB as VOCAB, small_plan


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    """What lies beside `out` apart from it (leftovers, partials, lock files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    """Two complete small stores told apart by their layer: {1: layer 1 only, 2: layer 2 only}."""
    root = tmp_path_factory.mktemp("staging-src")
    return {layer: create_store(root / f"l{layer}.zarr", small_plan(layer_ids=(layer,)), VOCAB, workers=1, **SMALL).path for layer in (1, 2)}


def _place(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _new_partial(out: Path) -> Path:
    """A complete replacement (layer 2) staged in `<out>.partial` under the build lock."""
    partial = prepare_partial(out, force=True)
    write_tables(partial, small_plan(layer_ids=(2,)), VOCAB, stats=None, workers=1, **SMALL)
    return partial


# -- mark_complete ------------------------------------------------------------------------------
def _laid_out(tmp_path: Path) -> Path:
    """A partial with every array and shard written, not yet marked complete."""
    partial = prepare_partial(tmp_path / "t.zarr", force=False)
    layout = create_layout(partial, small_plan(layer_ids=(1,)), VOCAB, stats=None, **SMALL)
    tasks = shard_tasks(layout)
    assert len(tasks) > 1
    for task in tasks:
        run_shard_task(task)
    return partial


@pytest.mark.parametrize("missing", ["layer_1/table/c/1/0", "layer_1/table/zarr.json", "vocab/zarr.json"])
def test_mark_complete_refuses_a_store_missing_a_shard_or_metadata(tmp_path, missing):
    partial = _laid_out(tmp_path)
    (partial / missing).unlink()
    with pytest.raises(StoreError, match="lacks") as e:
        mark_complete(partial)
    assert missing in str(e.value)
    with pytest.raises(StoreError, match="incomplete"):
        TableStore.open(partial)  # never marked complete


def test_mark_complete_marks_a_whole_layout(tmp_path):
    partial = _laid_out(tmp_path)
    mark_complete(partial)
    assert TableStore.open(partial).layer_ids == (1,)


# -- finalize: a failure puts the old store back -------------------------------------------------
def _on_renames(monkeypatch, hook) -> None:
    """Route os.replace and os.rename through `hook(real, src, dst)` (whichever the staging steps use)."""
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, *a, _real=real, **k: hook(_real, src, dst, *a, **k))


def test_finalize_restores_the_old_store_when_the_new_one_cannot_move_in(tmp_path, stores, monkeypatch):
    out = _place(stores[1], tmp_path / "t.zarr")
    before = snapshot(out)
    partial = _new_partial(out)

    def refuse_move_in(real, src, dst, *args, **kwargs):
        if Path(src) == partial:
            raise PermissionError(13, "Permission denied")
        return real(src, dst, *args, **kwargs)

    _on_renames(monkeypatch, refuse_move_in)
    with pytest.raises(OutputError, match="cannot move the new store into place"):
        finalize(partial, out, force=True)
    monkeypatch.undo()
    assert snapshot(out) == before  # the old store, back at its path byte for byte
    assert TableStore.open(out).layer_ids == (1,)
    assert leftover_stores(out) == [] and not lock_path(out).exists()
    assert TableStore.open(partial).layer_ids == (2,)  # the new store stays staged


def test_finalize_restores_the_old_store_when_the_moved_store_fails_verification(tmp_path, stores, monkeypatch):
    out = _place(stores[1], tmp_path / "t.zarr")
    before = snapshot(out)
    partial = _new_partial(out)
    lost = "layer_2/table/c/0/0"

    def lose_a_shard_on_the_way(real, src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if Path(src) == partial and Path(dst) == out:
            (out / lost).unlink()  # the store at its final path is not whole

    _on_renames(monkeypatch, lose_a_shard_on_the_way)
    with pytest.raises(StoreError, match=lost):
        finalize(partial, out, force=True)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert TableStore.open(out).layer_ids == (1,)
    assert leftover_stores(out) == [] and not lock_path(out).exists()
    assert (partial / "zarr.json").is_file() and not (partial / lost).exists()  # the new one went back to staging


def test_finalize_replaces_and_removes_the_old_store(tmp_path, stores):
    out = _place(stores[1], tmp_path / "t.zarr")
    partial = _new_partial(out)
    assert finalize(partial, out, force=True).layer_ids == (2,)
    assert TableStore.open(out).layer_ids == (2,)
    assert siblings(out) == []


# -- settle_leftovers: several <out>.old-<pid> -----------------------------------------------------
def _leftovers(tmp_path: Path, stores) -> tuple[Path, Path, Path]:
    """out (absent), an older leftover (layer 1) and a newer one (layer 2) whose name sorts first."""
    out = tmp_path / "t.zarr"
    older, newer = old_path(out, 999999), old_path(out, 1)
    os.rename(_place(stores[1], tmp_path / "a"), older)
    time.sleep(0.05)
    os.rename(_place(stores[2], tmp_path / "b"), newer)
    assert older.stat().st_ctime < newer.stat().st_ctime  # a rename sets ctime: the last moved aside is newest
    assert leftover_stores(out) == [older, newer]
    return out, older, newer


def test_settle_restores_the_newest_of_several_leftovers(tmp_path, stores, capsys):
    out, older, newer = _leftovers(tmp_path, stores)
    want = snapshot(newer)
    settle_leftovers(out)
    assert snapshot(out) == want and TableStore.open(out).layer_ids == (2,)
    assert siblings(out) == []  # the older leftover removed once the newest is back
    err = capsys.readouterr().err.splitlines()
    assert err == [f"engram: restored {str(out)!r} from {str(newer)!r}, left by an interrupted replacement",
                   f"engram: removed {str(older)!r}, left by an interrupted replacement ({str(out)!r} is in place)"]


def test_settle_removes_every_leftover_beside_a_store(tmp_path, stores):
    out, _, _ = _leftovers(tmp_path, stores)
    _place(stores[1], out)
    before = snapshot(out)
    settle_leftovers(out)
    assert snapshot(out) == before and siblings(out) == []


def test_the_next_build_restores_the_newest_leftover(tmp_path, stores):
    out, _, newer = _leftovers(tmp_path, stores)
    want = snapshot(newer)
    with pytest.raises(OutputError, match="already exists"):
        prepare_partial(out, force=False)  # restored under the lock, then refused like any existing store
    assert snapshot(out) == want
    assert siblings(out) == [] and not partial_path(out).exists()
