"""`engram sweep`: the MoE FFN against dense equivalents, the allocation budget, and one tiny memory sweep (resume, determinism)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from cli_checks import FIXTURES, one_error_line
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.model import EngramGPT, ModelConfig
from engram_cli.moe import MoEFFN, activated_params, dense_ffn, load_balance_loss
from engram_cli.sweep import (
    SweepOptions,
    allocation_sizes,
    run_allocation_sweep,
    run_memory_sweep,
)
from engram_cli.sweep.points import POINT_FILE

# tiny everything: 2 blocks of width 16, 2 heads of 8-wide rows, 16-token windows, 2 steps
TINY = SweepOptions(steps=2, seeds=1, d_model=16, n_layer=2, heads=2, table_dim=16, batch=2, block=16, heldout_fraction=0.3)
PARTS = 10


def write_corpus(folder):
    """Ten small documents cut from the Debian FAQ (held out: 30 %, so a few whole documents)."""
    text = (FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:30_000]
    folder.mkdir()
    size = len(text) // PARTS
    for k in range(PARTS):
        (folder / f"part{k:02d}.txt").write_text(text[k * size : (k + 1) * size])


def _copy_weights(dst: torch.nn.Sequential, src: torch.nn.Sequential) -> None:
    dst.load_state_dict(src.state_dict())


def test_moe_one_expert_top1_is_the_dense_ffn():
    torch.manual_seed(0)
    moe, dense = MoEFFN(8, 24, experts=1, top_k=1), dense_ffn(8, 24)
    _copy_weights(moe.experts[0], dense)
    x = torch.randn(3, 5, 8)
    assert torch.equal(moe(x), dense(x))
    assert moe.aux_loss.item() == pytest.approx(1.0)  # one expert takes all the load: E * f * P = 1


def test_moe_identical_experts_and_shared_expert_equal_dense_sums():
    torch.manual_seed(1)
    moe, dense, shared = MoEFFN(8, 16, experts=4, top_k=2, shared_hidden=12), dense_ffn(8, 16), dense_ffn(8, 12)
    for e in moe.experts:
        _copy_weights(e, dense)
    _copy_weights(moe.shared, shared)
    x = torch.randn(2, 7, 8)
    # the top-k weights are renormalised to sum to 1, so identical experts give the dense output
    torch.testing.assert_close(moe(x), dense(x) + shared(x), rtol=1e-5, atol=1e-6)


def test_moe_model_counts_activated_params_and_adds_the_balance_loss_in_training_only():
    cfg = ModelConfig(vocab_size=50, n_layer=2, d_model=16, block_size=8, moe_experts=4, moe_top_k=1, moe_hidden=8)
    torch.manual_seed(0)
    model = EngramGPT(cfg)
    per_expert = 2 * 16 * 8 + 8 + 16
    assert sum(p.numel() for p in model.parameters()) - activated_params(model) == 2 * 3 * per_expert
    x = torch.randint(0, 50, (2, 8))
    model.train()
    _, loss_train = model(x, targets=x)
    aux = load_balance_loss(model)
    model.eval()
    _, loss_eval = model(x, targets=x)
    assert loss_train.item() == pytest.approx(loss_eval.item() + aux.item(), rel=1e-5)


def test_allocation_holds_the_sparse_budget_and_the_activated_params():
    opts = SweepOptions(d_model=16, n_layer=2, heads=2, table_dim=16)
    sizes = [allocation_sizes(r, opts, experts=8, top_k=2, expert_hidden=16, shared_hidden=16) for r in (0.0, 0.5, 1.0)]
    assert len({s["sparse_params"] for s in sizes}) == 1
    for s in sizes:  # experts' share + the table's = the budget, exactly (before the primes' rounding)
        assert s["inactive_expert_params"] + s["table_budget_params"] == s["sparse_params"]
    assert [s["experts"] for s in sizes] == [2, 5, 8] and sizes[-1]["rows_per_head"] is None
    # activated: the Engram branch at rho < 1, its parameters in the shared expert at rho = 1 (within half a unit per block, plus the router)
    head_dim = opts.table_dim // opts.heads
    with_mem = ModelConfig(vocab_size=50, n_layer=2, d_model=16, engram_layers=(1,), head_dim=head_dim, mem_dim=2 * opts.heads * head_dim,
                           table_rows={"1": 2}, **{k: v for k, v in sizes[1]["model_options"].items()})
    without = ModelConfig(vocab_size=50, n_layer=2, d_model=16, **sizes[-1]["model_options"])
    a, b = activated_params(EngramGPT(with_mem)), activated_params(EngramGPT(without))
    router_diff = 2 * 16 * (sizes[-1]["experts"] - sizes[1]["experts"])
    assert abs(b - router_diff - a) <= 2 * (2 * 16 + 1) // 2 + 1, (a, b)


@pytest.fixture(scope="module")
def memory_sweep(tmp_path_factory, deepseek_vocab_file):
    """One tiny memory sweep (2 points: one size and the no-memory control, 1 seed), then a rerun after one point's record is removed."""
    root = tmp_path_factory.mktemp("sweep")
    write_corpus(root / "corpus")
    out = root / "sweep"
    out.mkdir()
    shutil.copy(deepseek_vocab_file, out / "vocab.npz")
    first = run_memory_sweep(root / "corpus", out, rows_per_head=[64], opts=TINY)
    again = next(p for p in first["points"] if not p["engram"])  # the cheapest point to train again
    (out / "points" / again["dir"].split("/")[-1] / POINT_FILE).unlink()
    said = []
    second = run_memory_sweep(root / "corpus", out, rows_per_head=[64], opts=TINY, notice=said.append)
    return root, first, second, said


def test_memory_sweep_writes_points_groups_and_plot(memory_sweep):
    root, _, _, _ = memory_sweep
    data = json.loads((root / "sweep" / "sweep.json").read_text())
    assert [p["label"] for p in data["points"]] == ["rows 64", "no memory (param-matched)"]
    for p in data["points"]:
        for key in ("loss", "loss_interval", "loss_memory_ablated", "table_params", "table_bytes", "hit_rate", "collision_rate", "seconds", "seed", "config_sha256"):
            assert key in p, key
        assert (root / "sweep" / "points" / p["dir"].split("/")[-1] / "model.ckpt").is_file()
    mem = [p for p in data["points"] if p["engram"]]
    assert mem[0]["table_params"] >= 2 * 2 * 64 * (TINY.table_dim // TINY.heads) and 0 <= mem[0]["hit_rate"] <= 1
    assert set(mem[0]["ablations"]) == {"branch_skipped", "initial_rows", "shuffled_rows", "mean_row"}
    control = data["points"][-1]
    assert control["table_params"] == 0 and control["hit_rate"] is None
    assert abs(control["dense_params"] - mem[0]["dense_params"]) <= 2 * (2 * TINY.d_model + 1)  # parameter-matched, within half a unit per block
    assert data["power_law"] is None  # one size: no fit
    if data["plot"]:
        assert (root / "sweep" / "sweep.png").stat().st_size > 0


def test_rerun_skips_finished_points_and_retrains_one_to_the_last_digit(memory_sweep):
    _, first, second, said = memory_sweep
    assert sum(m.startswith("skipped ") for m in said) == 1 and any("no memory" in m and "point 1/1" in m for m in said)
    a, b = first["points"][-1], second["points"][-1]
    assert a["config_sha256"] == b["config_sha256"] and a["dir"] == b["dir"]
    assert a["train_losses"] == b["train_losses"] and a["loss"] == b["loss"] and a["loss_interval"] == b["loss_interval"]  # deterministic on the CPU
    for x, y in zip(first["points"], second["points"]):
        if x["engram"]:
            assert x == y  # read back, not retrained


def test_allocation_sweep_tiny(memory_sweep):
    """One rho with both experts and memory (rho = 1, no memory, is `allocation_sizes` above and the memory sweep's control path)."""
    root, _, _, _ = memory_sweep
    out = root / "alloc"
    out.mkdir()
    shutil.copy(root / "sweep" / "vocab.npz", out / "vocab.npz")
    opts = replace(TINY, steps=1)
    r = run_allocation_sweep(root / "corpus", out, rhos=(0.5,), opts=opts, experts=4, top_k=1, expert_hidden=16, shared_hidden=0)
    data = json.loads((out / "allocation.json").read_text())
    want = allocation_sizes(0.5, opts, experts=4, top_k=1, expert_hidden=16, shared_hidden=0)
    (p,) = data["points"]
    assert p["rho"] == 0.5 and p["engram"] and r["groups"][0]["experts"] == want["experts"] == 3
    assert p["rows_per_head"] == [want["rows_per_head"]] * 2  # requested; the primes add a few
    assert p["spec"]["model_options"] == want["model_options"] and p["activated_params"] < p["dense_params"]
    assert p["sparse_params_actual"] >= p["sparse_params"] == want["sparse_params"]


def test_cli_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    line = one_error_line(runner.invoke(app, ["sweep", "memory", str(tmp_path), "--rows-per-head", "12x"]))
    assert "--rows-per-head" in line
    line = one_error_line(runner.invoke(app, ["sweep", "memory", str(tmp_path), "--rows-per-head", "1k", "--budget", "1MiB", "-o", str(tmp_path / "s")]))
    assert "not both" in line
    line = one_error_line(runner.invoke(app, ["sweep", "allocation", str(tmp_path), "--rho", "1.5", "-o", str(tmp_path / "s")]))
    assert "--rho 1.5" in line


def test_jobs_run_points_in_processes_with_the_serial_results(memory_sweep):
    """`--jobs 2` runs the points in two spawned processes (one torch thread each): the same points, the same
    records, losses equal to the serial sweep's up to the threads' summation order."""
    root, first, _, _ = memory_sweep
    out = root / "sweep_jobs"
    out.mkdir()
    shutil.copy(root / "sweep" / "vocab.npz", out / "vocab.npz")
    said = []
    par = run_memory_sweep(root / "corpus", out, rows_per_head=[64], opts=TINY, jobs=2, notice=said.append)
    assert sum(m.startswith("point ") for m in said) == 2 and not any(m.startswith("skipped ") for m in said)
    assert [p["label"] for p in par["points"]] == [p["label"] for p in first["points"]]
    for a, b in zip(first["points"], par["points"]):
        assert a["config_sha256"] == b["config_sha256"] and a["table_params"] == b["table_params"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-5)
        assert (out / "points" / b["dir"].split("/")[-1] / "model.ckpt").is_file()
