"""Integrity of zip archives read back: every member's CRC-32 checked before torch loads a `.pt` or checkpoint.

`torch.save` writes a zip archive whose records are stored (not compressed) with their
CRC-32, but `torch.load` never checks them: a flipped byte in a weight loads as a wrong
value. `check_zip_crc` reads every member once, in 1 MiB pieces (zipfile's own CRC
check at each member's end), so memory stays flat whatever the member's size; the cost
is one sequential read of the file before it is loaded (about 1-2 s per GB from the
page cache).
"""

from __future__ import annotations

import os
import zipfile

from engram_cli.errors import CheckpointError

PIECE = 1 << 20


def check_zip_crc(path: str | os.PathLike, *, what: str = "file", fix: str = "export it again") -> None:
    """`CheckpointError` (one line naming the member) unless every member of the zip at `path` matches its CRC-32."""
    shown = repr(os.fsdecode(path))
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                try:
                    with z.open(info, "r") as f:
                        while f.read(PIECE):  # zipfile checks the CRC-32 when the member's last byte is read
                            pass
                except zipfile.BadZipFile as e:
                    if "CRC" not in str(e):
                        raise
                    raise CheckpointError(f"{what} {shown} is corrupt: zip member {info.filename!r} fails its CRC-32 check; {fix}") from None
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{what} {shown} is a truncated or corrupt zip archive ({type(e).__name__}: {str(e)[:120]}); {fix}") from None

__all__ = ["check_zip_crc"]
