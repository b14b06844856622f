"""Output safety of a build: what may be written or replaced, the build lock, leftovers of a crash.

The rules (docs/build-table.md, "Failure modes"):

- `check_output(out, force=, inputs=)`: `--force` replaces only an engram table store
  (recognised by its own metadata: `zarr.json` whose attributes carry the engram
  format, `is_engram_store`); anything else at the output path is refused, and so is
  an output that is, holds or lies inside one of the `inputs` (the corpus). Names
  `.`/`..`, empty names and names that are not valid UTF-8 are refused.
- `<out>.partial` (the staging directory) is removed only when it is ours
  (`is_engram_staging`): empty, or holding nothing but what a build writes there.
- `OutputLock`: an exclusive `fcntl.flock` on a hidden lock file beside the output,
  held for the whole build; the OS drops it when the process dies (even `kill -9`),
  so nothing is left to clean by hand. A second build fails at once naming the holder.
- `<out>.old-<pid>`: where `finalize` moves the previous store while the new one moves
  in. A crash between the two renames leaves it; `leftover_stores` finds it, readers
  name it, and the next build restores it (no store at `out`) or removes it.
- `check_free_space`: planned bytes against the free space of the output's file
  system, refused with the figures; `storage_errors` turns a disk-full or permission
  error met while writing into a one-line `OutputError`.
- Read locks: every command that reads a store (`train`, `eval`, `inspect`, `collisions`,
  `export`, `quantize`, `prune`) holds a shared `fcntl.flock` on a hidden file beside it
  (`.<name>.readers`, `hold_read` inside a `read_locks()` block, or `reading(store)`); a writer that would replace the store (`finalize`, and
  `check_no_readers` before any work) needs that lock exclusively and is refused,
  naming the store, while a reader holds it. A store never changes under its reader.

Notices (what was restored or removed) go to stderr, one line each.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import NoSpaceError, OutputBusy, OutputError
from .format import FORMAT, PARTIAL_SUFFIX, ROOT_ATTR, STATS_DIR

OLD_INFIX = ".old-"
LOCK_SUFFIX = ".lock"
# What a build writes into its staging directory (and nothing else); `tokenizer/` holds the
# copy of a tokenizer file (store/tokenizer.py, TOKENIZER_FILE) and nothing else.
STAGING_ENTRIES = ("zarr.json", "vocab", STATS_DIR, "tokenizer")
ROOT_METADATA = "zarr.json"


def notice(message: str) -> None:
    """One line on stderr (progress and notices never go to stdout)."""
    print(f"engram: {message}", file=sys.stderr, flush=True)


def shown(path: str | os.PathLike) -> str:
    """A path for a message: quoted, with bytes that are not UTF-8 escaped (never raises)."""
    return repr(os.fsdecode(path))


def remove_leftovers(out: Path, names: re.Pattern, who: str, *, folders: bool = False) -> None:
    """Under `out`'s lock: remove the entries beside `out` whose names fully match `names` (temps an
    interrupted `who` left, ours by name: files, and folders when `folders`), each with a notice."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        found = [n for n in os.listdir(parent) if names.fullmatch(n)]
    except OSError:
        return
    for name in found:
        path = parent / name
        if path.is_symlink() or not (path.is_file() or (folders and path.is_dir())):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as e:
            raise OutputError(f"cannot remove {shown(path)}, left by an interrupted {who}: {e.strerror}; remove it by hand") from None
        notice(f"removed {shown(path)}, left by an interrupted {who}")


def _engram_attrs(path: Path) -> dict | None:
    """The root `engram` attributes of a Zarr v3 group at `path`, or None (not one of ours)."""
    try:
        meta = json.loads((path / ROOT_METADATA).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return None
    attrs = (meta.get("attributes") or {}).get(ROOT_ATTR)
    if isinstance(attrs, dict) and isinstance(attrs.get("format"), str) and attrs["format"].split("/")[0] == FORMAT.split("/")[0]:
        return attrs
    return None


def is_engram_store(path: str | os.PathLike) -> bool:
    """True when `path` is a directory (not a symlink) holding an engram table store's root metadata.

    Recognised by the store's own metadata (`zarr.json` with the engram format
    attribute), complete or not, of any version of the format.
    """
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and _engram_attrs(path) is not None


def is_engram_staging(path: str | os.PathLike) -> bool:
    """True when `path` is a build's staging directory: empty, or holding only what a build writes there.

    A build writes `stats/` first (while counting), then `zarr.json`, `vocab/`,
    `tokenizer/` and `layer_<id>/`; a hard-linked copy (`staging.link_store`) starts
    with `zarr.json`. Anything else (a file of the user's, a foreign `zarr.json`) makes it
    not ours.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        names = [e.name for e in os.scandir(path)]
    except OSError:
        return False
    for name in names:
        if name not in STAGING_ENTRIES and not (name.startswith("layer_") and name[6:].isdigit()):
            return False
    if STATS_DIR in names and not _is_stats_dir(path / STATS_DIR):
        return False
    if "tokenizer" in names and not _is_tokenizer_dir(path / "tokenizer"):
        return False
    if ROOT_METADATA in names:
        return _engram_attrs(path) is not None
    return all(n == STATS_DIR for n in names)


# What counting writes into `stats/`: order files, the summary (and its temp), spill and merge folders.
STATS_PREFIXES = ("order_", "summary.json", ".summary.json", ".engram-spill-", ".engram-merge-")


def _is_tokenizer_dir(path: Path) -> bool:
    """True when `path` is a directory holding nothing but a store's tokenizer copy (`tokenizer.json`)."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        return all(e.name == "tokenizer.json" for e in os.scandir(path))
    except OSError:
        return False


def _is_stats_dir(path: Path) -> bool:
    """True when `path` is a directory holding nothing but what n-gram counting writes."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        return all(e.name.startswith(STATS_PREFIXES) for e in os.scandir(path))
    except OSError:
        return False


def check_output_name(out: str | os.PathLike) -> Path:
    """`OutputError` for an output name that cannot be a store: empty, `.`, `..`, not valid UTF-8."""
    raw = os.fspath(out)
    text = os.fsdecode(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"output path {shown(raw)} is not valid UTF-8; choose a name in UTF-8") from None
    out = Path(text)
    if text.strip() == "" or out.name in ("", ".", "..") or text.rstrip("/").endswith(("/.", "/..")) or text.rstrip("/") in (".", ".."):
        raise OutputError(f"output path {shown(raw)} names a directory, not a store; give a new name, e.g. -o tables.zarr")
    return out


def check_inputs_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, what: str = "output", option: str = "-o/--out",
                       source: str = "corpus path") -> None:
    """`OutputError` when `out` is, holds or lies inside one of the `inputs` (corpus paths).

    `what`, `option` and `source` name the paths in the message (e.g. "work directory",
    "--work-dir"; "table store").
    """
    out = Path(out)
    try:
        target = out.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the writes will fail on their own, one line
        return
    for item in inputs:
        try:
            resolved = Path(item).resolve()
        except (OSError, RuntimeError):
            continue
        if target == resolved:
            raise OutputError(f"{what} {shown(out)} is the {source} {shown(item)}; choose another {option}")
        if resolved in target.parents:
            raise OutputError(f"{what} {shown(out)} lies inside the {source} {shown(item)}; choose an {option} outside it")
        if target in resolved.parents:
            raise OutputError(f"the {source} {shown(item)} lies inside the {what} {shown(out)}; choose another {option}")


def check_output(out: str | os.PathLike, force: bool = False, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise `OutputError` unless a store may be written at `out` (cheap: call it first).

    Refused: a bad name (`check_output_name`); an existing path without `force`; with
    `force`, anything that is not an engram table store (`is_engram_store`); an output
    that is, holds or lies inside one of `inputs`; a missing parent directory.
    """
    out = check_output_name(out)
    check_inputs_apart(out, inputs)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{shown(out)} already exists; pass --force to replace it")
        if not is_engram_store(out):
            kind = "a symlink" if out.is_symlink() else "a file" if out.is_file() else "a directory" if out.is_dir() else "something"
            raise OutputError(f"{shown(out)} is {kind} but not an engram table store; --force replaces only a store; move it away or choose another -o/--out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {shown(out)}: directory {shown(parent)} does not exist; create it first")
    return out


def remove_staging(partial: str | os.PathLike) -> None:
    """Remove a stale `<out>.partial` when it is ours (`is_engram_staging`); `OutputError` otherwise."""
    partial = Path(partial)
    if not (partial.exists() or partial.is_symlink()):
        return
    if not is_engram_staging(partial):
        raise OutputError(f"{shown(partial)} exists and is not an engram staging directory; move it away or choose another -o/--out")
    try:
        shutil.rmtree(partial)
    except OSError as e:
        raise OutputError(f"cannot remove the stale staging directory {shown(partial)}: {e.strerror}; remove it by hand") from None


# -- the build lock -------------------------------------------------------------------------------
def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of a build of `out`: hidden, beside it (`.<name>.lock`)."""
    out = Path(out)
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


class OutputLock:
    """An exclusive OS lock (fcntl.flock) on a build's output, held until `release` or process exit.

    The lock file holds the holder's pid, host and start time (JSON), for the message
    a second build gets. Use as a context manager or call `release`.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = lock_path(self.out)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"cannot create the lock file {shown(self.path)}: {e.strerror}; choose a writable -o/--out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputBusy(f"another build is writing {shown(self.out)} ({holder}); wait for it to finish or choose another -o/--out") from None
            try:  # the file we locked must still be the one at the path (a releaser unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "out": os.fsdecode(self.out)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        """Drop the lock and remove its file (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        _HELD.pop(_key(self.out), None)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not yet recorded"


_HELD: dict[str, OutputLock] = {}


def _key(out: Path) -> str:
    return os.path.abspath(os.fspath(out))


def lock_output(out: str | os.PathLike) -> OutputLock:
    """The lock on `out` for this process: the one it holds already, or a new one (`OutputBusy` if another holds it)."""
    held = _HELD.get(_key(Path(out)))
    if held is not None and held.fd is not None:
        return held
    lock = OutputLock(out)
    _HELD[_key(Path(out))] = lock
    return lock


def release_output(out: str | os.PathLike) -> None:
    """Release this process's lock on `out`, if it holds one (call when a build ends, failed or not)."""
    held = _HELD.get(_key(Path(out)))
    if held is not None:
        held.release()


# -- read locks -----------------------------------------------------------------------------------
READERS_SUFFIX = ".readers"
READ_WAIT_S = 10.0  # a reader waits this long for a replacement in progress (finalize's renames) to end
_READS: contextvars.ContextVar[list | None] = contextvars.ContextVar("engram_read_locks", default=None)


def readers_path(store: str | os.PathLike) -> Path:
    """The read-lock file of a store: hidden, beside it (`.<name>.readers`)."""
    store = Path(os.path.abspath(os.fspath(store)))
    return store.with_name(f".{store.name}{READERS_SUFFIX}")


def _flock_file(path: Path, mode: int) -> int | None:
    """An fd of the file at `path` (created) locked with `mode` (non-blocking), or None when another holds a conflicting lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file we locked must still be the one at the path (the last holder unlinks it)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _drop_flock(fd: int, path: Path, *, exclusive: bool) -> None:
    """Release a read-lock fd; the file is removed by the last holder (one that can take it exclusively)."""
    try:
        if not exclusive:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no other reader holds it
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_locks() -> Iterator[None]:
    """A block in which `hold_read(store)` takes a shared read lock on each store, all released at its end."""
    held: list[tuple[int, Path]] = []
    token = _READS.set(held)
    try:
        yield
    finally:
        _READS.reset(token)
        for fd, path in reversed(held):
            _drop_flock(fd, path, exclusive=False)


@contextlib.contextmanager
def reading(*stores: str | os.PathLike | None) -> Iterator[None]:
    """A block that reads `stores` (None: skipped) under shared read locks (`read_locks` + `hold_read`):
    no `build-table --force`, `import --force` or `train --force` replaces one of them meanwhile."""
    with read_locks():
        for store in stores:
            if store is not None:
                hold_read(store)
        yield


def hold_read(store: str | os.PathLike) -> None:
    """Inside `read_locks()`: a shared lock on `store` until the block ends, so no writer replaces it meanwhile (outside: nothing).

    Waits up to READ_WAIT_S for a replacement in progress to end, then `OutputBusy`.
    A store that cannot hold a lock file beside it (a read-only folder) is read unlocked.
    """
    held = _READS.get()
    if held is None:
        return
    path = readers_path(store)
    if any(p == path for _, p in held):
        return
    deadline = time.monotonic() + READ_WAIT_S
    while True:
        try:
            fd = _flock_file(path, fcntl.LOCK_SH)
        except OSError:
            return  # no lock file can be made there: nobody can replace the store through us either
        if fd is not None:
            held.append((fd, path))
            return
        if time.monotonic() > deadline:
            raise OutputBusy(f"table store {shown(store)} is being replaced by another engram process; wait for it to finish and run this again")
        time.sleep(0.05)


@contextlib.contextmanager
def no_readers(out: str | os.PathLike) -> Iterator[None]:
    """Hold the read lock of `out` exclusively for the block (a replacement): `OutputBusy` while a reader holds it."""
    path = readers_path(out)
    try:
        fd = _flock_file(path, fcntl.LOCK_EX)
    except OSError:
        yield  # a folder that cannot hold the lock file: no reader can have locked it
        return
    if fd is None:
        raise OutputBusy(f"{shown(out)} is being read by another engram process (its read lock: {shown(path)}); "
                         "wait for it to finish or choose another -o/--out; nothing was replaced")
    try:
        yield
    finally:
        _drop_flock(fd, path, exclusive=True)


def check_no_readers(out: str | os.PathLike) -> None:
    """`OutputBusy` now, before any work, when another process reads the store at `out` (`no_readers`)."""
    if out is not None and (Path(out).exists()):
        with no_readers(out):
            pass


# -- leftovers of an interrupted replacement ----------------------------------------------------
def old_path(out: str | os.PathLike, pid: int | None = None) -> Path:
    """Where `finalize` moves the previous store while the new one moves in: `<out>.old-<pid>`."""
    out = Path(out)
    return out.with_name(f"{out.name}{OLD_INFIX}{os.getpid() if pid is None else pid}")


def leftover_stores(out: str | os.PathLike) -> list[Path]:
    """The `<out>.old-<pid>` engram stores beside `out` that an interrupted replacement left, newest last."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    prefix = out.name + OLD_INFIX
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix) and n[len(prefix):].isdigit()]
    except OSError:
        return []
    olds = [parent / n for n in names if is_engram_store(parent / n)]
    return sorted(olds, key=lambda p: (_ctime(p), p.name))  # a rename sets ctime: the last moved aside is last


def _ctime(path: Path) -> float:
    try:
        return path.stat().st_ctime
    except OSError:
        return 0.0


def leftover_hint(out: str | os.PathLike) -> str:
    """A sentence naming the leftovers of `out` and how to restore one ("" when there are none)."""
    olds = leftover_stores(out)
    if not olds:
        return ""
    more = f" (and {len(olds) - 1} older)" if len(olds) > 1 else ""
    return (f"{shown(olds[-1])}{more} holds the store an interrupted replacement moved aside; restore it with "
            f"`mv {os.fsdecode(olds[-1])} {os.fsdecode(out)}` (or let the next build of {shown(out)} settle it)")


def leftover_notice(path: str | os.PathLike) -> None:
    """For readers opening `path`: a notice naming a leftover `<path>.old-<pid>` beside it.

    Silent while this process holds the build lock of `path` (its own `finalize` has
    the old store aside for a moment).
    """
    if _HELD.get(_key(Path(path))) is not None:
        return
    hint = leftover_hint(path)
    if hint:
        notice(f"note: {hint}")


def settle_leftovers(out: str | os.PathLike) -> None:
    """Under the build lock: settle each `<out>.old-<pid>` an interrupted replacement left.

    No store at `out`: the newest leftover is restored there. An engram store at `out`
    (the replacement finished moving in): the leftovers are removed. Anything else at
    `out` (not ours): the leftovers stay, named. Never silent: each case is a notice on stderr.
    """
    out = Path(out)
    for old in reversed(leftover_stores(out)):
        if not (out.exists() or out.is_symlink()):
            try:
                os.replace(old, out)
            except OSError as e:
                raise OutputError(f"cannot restore {shown(old)} to {shown(out)}: {e.strerror}; restore it by hand") from None
            notice(f"restored {shown(out)} from {shown(old)}, left by an interrupted replacement")
        elif is_engram_store(out):
            try:
                shutil.rmtree(old)
            except OSError as e:
                raise OutputError(f"cannot remove {shown(old)}, left by an interrupted replacement: {e.strerror}; remove it by hand") from None
            notice(f"removed {shown(old)}, left by an interrupted replacement ({shown(out)} is in place)")
        else:
            notice(f"left {shown(old)} alone: {shown(out)} is not an engram store; restore or remove it by hand")


# -- space and write errors ---------------------------------------------------------------------
def _figure(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_free_space(out: str | os.PathLike, need: int) -> None:
    """`NoSpaceError` with the figures when the file system of `out` has less than `need` bytes free."""
    out = Path(out)
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise NoSpaceError(f"the tables need {_figure(need)} ({need} bytes) but {shown(where)} has {_figure(free)} free; "
                           "free space, choose another -o/--out, or plan smaller tables")


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def storage_error(out: str | os.PathLike, e: BaseException) -> OutputError | None:
    """The one-line `OutputError` for a disk-full or permission error met while writing `out`, or None.

    Recognises an `OSError` and the errors of libraries that carry the OS error in
    their message (polars: "... No space left on device (os error 28)").
    """
    if isinstance(e, OutputError):
        return None
    code, name = None, None
    if isinstance(e, OSError):
        code, name = e.errno, e.filename
        if name and not _beside(out, name):
            return None  # not a write of ours (e.g. an unreadable corpus file): its own error
    elif type(e).__module__.split(".")[0] == "polars":
        m = _OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
    if code in SPACE_ERRNOS:
        return NoSpaceError(f"no space left on the device while writing {shown(out)} ({os.strerror(code)}); nothing was replaced; "
                            "free space or choose another -o/--out")
    if code in ACCESS_ERRNOS:
        where = f" ({shown(name)})" if name else ""
        return OutputError(f"cannot write {shown(out)}: {os.strerror(code)}{where}; nothing was replaced; "
                           "fix the permissions (or `chattr -i`) or choose another -o/--out")
    return None


def _beside(out: str | os.PathLike, name) -> bool:
    """True when the file `name` lies in the folder of `out` (where the partial, the lock and the store live)."""
    try:
        folder = os.path.abspath(os.path.dirname(os.path.abspath(os.fsdecode(out))))
        return os.path.commonpath([folder, os.path.abspath(os.fsdecode(name))]) == folder
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def storage_errors(out: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full or permission error met while writing `out` into a one-line `OutputError` (`storage_error`)."""
    try:
        yield
    except Exception as e:
        converted = storage_error(out, e)
        if converted is None:
            raise
        raise converted from None


__all__ = [
    "ACCESS_ERRNOS", "LOCK_SUFFIX", "OLD_INFIX", "PARTIAL_SUFFIX", "SPACE_ERRNOS", "OutputLock", "check_free_space",
    "check_inputs_apart", "check_no_readers", "check_output", "check_output_name", "hold_read", "is_engram_staging", "is_engram_store", "leftover_hint", "leftover_notice", "leftover_stores",
    "lock_output", "lock_path", "no_readers", "notice", "old_path", "read_locks", "readers_path", "release_output", "remove_staging", "settle_leftovers", "shown",
    "storage_error", "storage_errors",
]
