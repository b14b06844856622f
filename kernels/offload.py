"""The offload pipeline: rows of the next batches looked up ahead while one is consumed.

`OffloadPrefetcher(lookup, batches, depth=2)` iterates the rows of `batches` in order,
up to `depth` batches ahead:

- on CUDA with the offload backend's UVA path (kernels/registry.py `offload_uva`: the
  fused kernel reading the pinned host table): each batch's kernel is launched on a side
  stream, an event recorded after it, and the consumer's stream waits on that event
  before the rows are handed out (`record_stream` keeps the allocator from reusing them
  early); no host thread, no staging copy;
- otherwise (the host path, or no CUDA): a worker thread hashes and gathers the next
  batches (the numba and torch kernels release the GIL, so the work overlaps the
  consumer); with CUDA the rows land in pinned memory (torch's caching host allocator
  reuses those buffers) and are copied to the device with `non_blocking`; with no CUDA
  the same pipeline runs with the CPU as the device.

An exception in the worker is raised in the consumer, at the batch where it happened.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

import torch

from engram_cli.kernels.registry import offload_uva


class OffloadPrefetcher:
    """Rows of `batches`, the next `depth` computed ahead (a side stream on the UVA path, else a thread)."""

    _END = object()

    def __init__(self, lookup, batches, *, depth: int = 2, dtype=None):
        self.lookup, self.dtype, self.depth = lookup, dtype, max(1, depth)
        self.error = None
        self.streamed = lookup.device.type == "cuda" and offload_uva(lookup)
        if self.streamed:
            self.batches = iter(batches)
            return
        self.q = queue.Queue(maxsize=self.depth)
        self.thread = threading.Thread(target=self._run, args=(iter(batches),), daemon=True)
        self.thread.start()

    def _run(self, it):
        try:
            for b in it:
                self.q.put(self.lookup(b, dtype=self.dtype))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.error = e
        self.q.put(self._END)

    def _launch(self, side, batch):
        with torch.cuda.stream(side):
            rows = self.lookup(batch, dtype=self.dtype)
            done = torch.cuda.Event()
            done.record(side)
        return rows, done

    def _streamed(self):
        dev = self.lookup.device
        side = torch.cuda.Stream(device=dev)
        main = torch.cuda.current_stream(dev)
        pending = deque()
        for _ in range(self.depth):
            b = next(self.batches, None)
            if b is None:
                break
            pending.append(self._launch(side, b))
        while pending:
            rows, done = pending.popleft()
            main.wait_event(done)
            rows.record_stream(main)
            nxt = next(self.batches, None)
            if nxt is not None:
                pending.append(self._launch(side, nxt))
            yield rows

    def __iter__(self):
        if self.streamed:
            yield from self._streamed()
            return
        while True:
            item = self.q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item
