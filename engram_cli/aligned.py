"""Page-aligned numpy arrays, for the tables the lookup kernels read.

numpy places a large array 16 bytes past a page start (the allocator's header), so a
128-byte table row spans three cache lines instead of two and each 64-byte load of it is
split across two lines. Measured on the 2-core development machine (docs/kernels.md): the
CPU gather of 128-byte rows moved 9.5 GB/s from such a table and 13.2 GB/s from an
aligned one, against a 13.9 GB/s copy. `TableStore.load_layer` allocates its tables here.
"""

from __future__ import annotations

import numpy as np

ALIGN = 4096  # a page: rows of any power-of-two width up to a page start on a line (and a page) boundary


def aligned_empty(shape, dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an `align`-byte boundary (numpy
    still backs it with huge pages where the system allows); it keeps its buffer alive."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)
