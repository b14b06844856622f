"""Staged output: a store is written into `<out>.partial` under the output's lock and moved into place whole.

    with staged_output(out, force, inputs=corpus, need=planned_bytes) as staging:
        ...  # write into staging.partial (a new store, or `link_store(src, staging.partial)` and rewrite rows)
    staging.store  # the TableStore now at `out`

`staged_output` is the one sequence every writer of a store uses (build, train's saved
tables, import): `prepare_partial` (output checks, the lock, leftovers settled, free
space, the empty partial), the caller's writes, `finalize` (verified, moved into place,
an old store replaced only with force and restored on failure); on an error the partial
is removed (ours: `prepare_partial` made it) and a disk-full or permission error turned
into one line (`output.storage_error`); the lock is always released. `staged_file` is
the same for a single file (export): a temporary sibling renamed into place.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import OutputError
from ..ngrams import NgramStats
from ..plan import TablePlan
from ..vocab import CompressedVocab
from .format import partial_path
from .output import (
    ROOT_METADATA,
    check_free_space,
    check_no_readers,
    check_output,
    lock_output,
    no_readers,
    notice,
    old_path,
    release_output,
    remove_staging,
    settle_leftovers,
    shown,
    storage_error,
    storage_errors,
)
from .table_store import TableStore
from .writer import verify_layout, write_tables


# -- the steps --------------------------------------------------------------------------
def prepare_partial(out: str | os.PathLike, force: bool, *, inputs=(), need: int = 0) -> Path:
    """Lock `out`, settle leftovers, check it may be written, replace a stale partial of ours; return the empty partial.

    In order: `output.check_output` (cheap refusals first, no lock taken); the build
    lock (`output.lock_output`, `OutputBusy` naming the holder); `settle_leftovers`
    (a `<out>.old-<pid>` restored or removed, with a notice); `check_output` again
    under the lock; `check_no_readers` (a store a train or eval is reading is not
    replaced); `check_free_space(out, need)` (`need`: the bytes the build will
    write, `planned_write_bytes`); a stale `<out>.partial` removed only when ours.
    The lock is held from here until `finalize` (or `output.release_output(out)` after
    a failure: call it in a `finally`). `inputs` are the corpus paths the output must
    stay apart from.
    """
    out = check_output(out, force, inputs=inputs)
    lock = lock_output(out)
    try:
        settle_leftovers(out)
        check_output(out, force, inputs=inputs)
        check_no_readers(out)  # a store a train or eval reads is not replaced: refused now, not after the work
        partial = partial_path(out)
        remove_staging(partial)
        if need:
            check_free_space(out, need)
        try:
            partial.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {shown(partial)}: {e.strerror}; choose a writable -o/--out") from None
    except BaseException:
        lock.release()
        raise
    return partial


def link_store(src: str | os.PathLike, partial: str | os.PathLike) -> None:
    """Fill the staging directory `partial` with `src`'s files, hard-linked (copied across devices).

    Safe because zarr replaces every file it rewrites (temp file + rename): writing
    to the new store never changes `src`. The root `zarr.json` comes first, so a
    staging directory killed at any point of the copy is recognisably ours
    (`output.is_engram_staging`) and the next run removes it.
    """

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    src, partial = Path(src), Path(partial)
    link_or_copy(src / ROOT_METADATA, partial / ROOT_METADATA)
    shutil.copytree(src, partial, copy_function=link_or_copy, dirs_exist_ok=True,
                    ignore=lambda d, names: [ROOT_METADATA] if Path(d) == src else [])


def finalize(partial: str | os.PathLike, out: str | os.PathLike, force: bool) -> TableStore:
    """Move a complete partial store to `out` (replacing an existing engram store only with force).

    The old store is renamed aside (`<out>.old-<pid>`) before the new one moves in,
    the store is verified at its final path, and only then is the old one deleted: at
    every moment one complete store is on disk, and a failure puts the old one back.
    The renames happen under the store's read lock held exclusively (`output.no_readers`):
    refused while a train or eval reads the store. Releases the build lock taken by `prepare_partial`.
    """
    partial, out = Path(partial), Path(out)
    lock = lock_output(out)
    try:
        with storage_errors(out):
            TableStore.open(partial)  # refuses an incomplete build
            verify_layout(partial)
            check_output(out, force)
            with no_readers(out):  # no train or eval reads the store while it is replaced
                old = None
                if out.exists() or out.is_symlink():
                    old = old_path(out)
                    _move(out, old, "move the old store aside")
                try:
                    _move(partial, out, "move the new store into place")
                    try:
                        verify_layout(out)
                        store = TableStore.open(out)
                    except BaseException:
                        os.replace(out, partial)
                        raise
                except BaseException:
                    if old is not None:
                        os.replace(old, out)
                    raise
            if old is not None:
                try:
                    shutil.rmtree(old)
                except OSError as e:
                    notice(f"could not remove the old store {shown(old)} ({e.strerror}); remove it by hand (the new store is in place)")
            return store
    finally:
        lock.release()


def _move(src: Path, dst: Path, what: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise OutputError(f"cannot {what} ({shown(src)} -> {shown(dst)}): {e.strerror}; nothing was replaced; fix the permissions and rebuild") from None



# -- the contexts ----------------------------------------------------------------------
@dataclass
class Staging:
    """What `staged_output` gives the block: the partial to write into; the finished store after the block."""

    partial: Path
    out: Path
    store: TableStore | None = None  # set when the block succeeded and the store is in place


@contextmanager
def staged_output(out: str | os.PathLike, force: bool, *, inputs=(), need: int = 0, keep_failed: bool = False) -> Iterator[Staging]:
    """Write a store at `out` through `<out>.partial`: prepared and locked before the block, finalized after it.

    `inputs` are the paths the output must stay apart from (`output.check_inputs_apart`);
    `need` the bytes the block will write (checked against the free space; 0: checked
    later, e.g. by `create_layout` once a plan is made). On an error in the block or in
    `finalize`, the partial is removed (kept for inspection with `keep_failed`; the next
    build removes it) and a disk-full or permission error becomes a one-line
    `OutputError` naming `out`. The output's lock is released in every case.
    """
    out = Path(out)
    staging = Staging(prepare_partial(out, force, inputs=inputs, need=need), out)
    try:
        yield staging
        staging.store = finalize(staging.partial, out, force)
    except BaseException as e:
        if not keep_failed:
            shutil.rmtree(staging.partial, ignore_errors=True)  # ours: prepare_partial made it
        converted = storage_error(out, e)  # disk full or a permission error, while writing or finalizing
        if converted is not None:
            raise converted from None
        raise
    finally:
        release_output(out)


@contextmanager
def staged_file(out: str | os.PathLike, tmp: str | os.PathLike) -> Iterator[Path]:
    """Write one file at `out` through `tmp` (a temporary sibling), renamed into place after the block.

    `out` is either the old file or the whole new one; on an error `tmp` is removed and
    a disk-full or permission error becomes a one-line `OutputError` naming `out`.
    """
    tmp = Path(tmp)
    try:
        with storage_errors(out):
            yield tmp
            os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- a store in one call ----------------------------------------------------------------
def create_store(
    out: str | os.PathLike,
    plan: TablePlan,
    vocab: "CompressedVocab",
    *,
    stats_root: str | os.PathLike | None = None,
    force: bool = False,
    **write_kwargs,
) -> TableStore:
    """`write_tables` (statistics copied from `stats_root`) in a `staged_output`.

    On failure the incomplete `<out>.partial` stays for inspection (`keep_failed`); the
    next build removes it.
    """
    stats = NgramStats.open(stats_root) if stats_root is not None else None
    with staged_output(out, force, keep_failed=True) as staging:
        write_tables(staging.partial, plan, vocab, stats=stats, **write_kwargs)
    return staging.store


__all__ = ["Staging", "create_store", "finalize", "link_store", "prepare_partial", "staged_file", "staged_output"]
