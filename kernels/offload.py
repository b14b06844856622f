"""The offload pipeline: rows of the next batches looked up on a background thread while one is consumed.

`OffloadPrefetcher(lookup, batches, depth=2)` iterates the rows of `batches` in order; a
worker thread hashes and gathers up to `depth` batches ahead (torch releases the GIL in
its kernels, so the work overlaps the consumer). With the `offload` backend on CUDA the
rows are gathered on the host into pinned memory (torch's caching host allocator reuses
those buffers across batches once their copies are done) and copied to the device with
`non_blocking`; with no CUDA the same pipeline runs with the CPU as the device.

An exception in the worker is raised in the consumer, at the batch where it happened.
"""

from __future__ import annotations

import queue
import threading


class OffloadPrefetcher:
    """Background thread computing row ids + gather for the next `depth` batches."""

    _END = object()

    def __init__(self, lookup, batches, *, depth: int = 2, dtype=None):
        self.lookup, self.q = lookup, queue.Queue(maxsize=max(1, depth))
        self.dtype = dtype
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(iter(batches),), daemon=True)
        self.thread.start()

    def _run(self, it):
        try:
            for b in it:
                self.q.put(self.lookup(b, dtype=self.dtype))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.error = e
        self.q.put(self._END)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item
