"""Lookup kernels (installed as `engram_cli.kernels`).

Per kernel one stem: a Triton version and a plain torch reference beside it; this
module will choose between them by device and by name. Empty until the lookup-kernel
issue lands.
"""
