"""Run Triton kernels on CPU tensors: TRITON_INTERPRET must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
