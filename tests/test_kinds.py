"""engram_cli.kinds: each kind parsed in one place, members that are their strings, the kernels' registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram_cli.errors import BackendError, OutputError, PlanError, StoreError
from engram_cli.kernels.registry import REGISTRY, available_backends, resolve_backend
from engram_cli.kinds import Backend, Compressor, ExchangeFormat, HashFamily, InitKind, ParallelKind, TableDtype
from engram_cli.plan import TablePlan


@pytest.mark.parametrize(
    "kind, bad, error, line",
    [
        (TableDtype, "int2", PlanError, "unknown --dtype 'int2'; choose one of float32, float16, bfloat16, float8_e4m3, int8, int4"),
        (InitKind, "bogus", StoreError, "unknown --init 'bogus'; choose one of normal, zeros"),
        (Compressor, "gzip", StoreError, "unknown --compressor 'gzip'; choose one of none, lz4, zstd"),
        (ParallelKind, "fibers", StoreError, "unknown --parallel 'fibers'; choose one of threads, processes"),
        (Backend, "cuda", BackendError, "unknown backend 'cuda'; choose one of auto, torch, cpu, triton, offload"),
        (ExchangeFormat, "onnx", OutputError, "unknown --format 'onnx'; choose one of safetensors, reference"),
        (HashFamily, " MD5 ", PlanError, "unknown hash family 'MD5'; use reference, xxh3, or reference,xxh3"),
    ],
)
def test_parse_errors_are_one_line(kind, bad, error, line):
    with pytest.raises(error) as e:
        kind.parse(bad)
    assert str(e.value) == line
    assert kind.option_callback(None) is None


@pytest.mark.parametrize("kind", [TableDtype, InitKind, Compressor, ParallelKind, Backend, ExchangeFormat, HashFamily])
def test_members_are_their_strings(kind):
    for m in kind:
        assert kind.parse(m.value) is m and kind.parse(m) is m and kind.option_callback(m.value) is m
        assert m == m.value and str(m) == m.value and f"{m}" == m.value and hash(m) == hash(m.value)
        assert json.dumps({m: [m]}) == json.dumps({m.value: [m.value]})


def test_table_dtype_properties():
    want = {"float32": (4, "float32", torch.float32), "float16": (2, "float16", torch.float16),
            "bfloat16": (2, "uint16", torch.bfloat16), "float8_e4m3": (1, "uint8", torch.float8_e4m3fn),
            "int8": (1, "uint8", torch.int8), "int4": (1, "uint8", torch.uint8)}
    assert [d.value for d in TableDtype] == list(want)
    for d in TableDtype:
        assert (d.bytes_per_value, d.storage_dtype, d.torch_dtype) == (want[d][0], np.dtype(want[d][1]), want[d][2])
        assert d.fp8 == (d is TableDtype.FLOAT8_E4M3)
        assert d.packed == (d in (TableDtype.FLOAT8_E4M3, TableDtype.INT8, TableDtype.INT4))


def test_hash_family_names_and_aliases():
    for name in ("reference", "multiply-xor", "multiply_xor", "REFERENCE "):
        assert HashFamily.parse(name) is HashFamily.REFERENCE
    for name in ("xxh3", "xxh3_64", "XXH3"):
        assert HashFamily.parse(name) is HashFamily.XXH3
    assert HashFamily.REFERENCE.plan_name == "multiply-xor" == TablePlan.__dataclass_fields__["hash_family"].default  # what stores hold
    assert HashFamily.parse_many("both") == ("reference", "xxh3")
    assert HashFamily.parse_many("xxh3, reference,xxh3") == (HashFamily.XXH3, HashFamily.REFERENCE)
    with pytest.raises(PlanError, match="unknown hash family ''"):
        HashFamily.parse_many("")  # "".split(",") == [""]: an empty name
    with pytest.raises(PlanError, match="no hash family given"):
        HashFamily.parse_many([])


def test_registry_covers_every_backend_and_resolves_auto(monkeypatch):
    assert set(REGISTRY) == set(Backend) - {Backend.AUTO}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends("cpu") == [Backend.TORCH, Backend.CPU, Backend.OFFLOAD]
    assert resolve_backend("auto", "cpu") is Backend.CPU and resolve_backend("offload", None) is Backend.OFFLOAD
    with pytest.raises(BackendError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if REGISTRY[Backend.TRITON].usable(torch.device("cpu")):  # triton installed
        assert available_backends("cpu") == [Backend.TORCH, Backend.CPU, Backend.TRITON, Backend.OFFLOAD]
