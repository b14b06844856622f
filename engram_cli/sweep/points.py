"""One sweep point: its spec and config hash, its initial store, train -> eval into its own directory, skipped when finished.

A point is one `engram train` run and its `engram eval` report (the library calls
`train.run_training` and `evaluate.evaluate_windows`, nothing else trains). Its
directory `DIR/points/<label>-seed<N>-<hash>/` holds the checkpoint, the trained store,
the training statistics and `point.json`, written last (temp file + rename): a
directory with a `point.json` of the same config hash is finished and is skipped on a
rerun; one without it (an interrupted run) is cleared and run again. The initial stores
are shared by the seeds of a size: `DIR/tables/<hash>.zarr`, built by
`pipeline.build.build_tables` once, with `DIR/tables/<hash>.json` beside it (plan size,
collision rate).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engram_cli import __version__
from engram_cli.checkpoint import load_checkpoint
from engram_cli.corpus import corpus_files
from engram_cli.evaluate import evaluate_windows
from engram_cli.kinds import TokenizerEngine
from engram_cli.model import EngramGPT, ModelConfig
from engram_cli.moe import activated_params
from engram_cli.pipeline.build import build_tables, plan_tables
from engram_cli.pipeline.sizing import reference_rates
from engram_cli.plan import DEFAULT_PAD_ID, DEFAULT_SEED, parse_budget
from engram_cli.store import TableStore
from engram_cli.train import run_training
from engram_cli.vocab import DEFAULT_TOKENIZER, load_tokenizer, resolve_vocab

POINT_FILE = "point.json"
CHECKPOINT = "model.ckpt"


@dataclass(frozen=True)
class TableSpec:
    """The initial store of a point: `engram build-table` options (rows per head or a budget)."""

    layer_ids: tuple[int, ...]
    heads: int
    dim: int
    max_ngram: int
    rows_per_head: int | None = None
    budget: str | None = None
    tokenizer: str = DEFAULT_TOKENIZER
    seed: int = DEFAULT_SEED

    def digest(self) -> str:
        return _digest(asdict(self))


@dataclass(frozen=True)
class PointSpec:
    """Everything that makes a point's result: its store, model, training and seed."""

    sweep: str  # "memory" or "allocation"
    label: str  # the group its seeds share ("rows 4,096", "no memory", "rho 0.8")
    table: TableSpec  # the store (without memory: where its tokenizer comes from)
    engram: bool
    seed: int
    steps: int
    d_model: int
    n_layer: int
    batch: int
    block: int
    lr: float
    split: str
    heldout_fraction: float
    param_matched: bool = False
    model_options: dict = field(default_factory=dict)  # ModelConfig fields (the MoE FFN)
    rho: float | None = None  # allocation: the experts' share of the sparse budget

    def digest(self, corpus_id: str) -> str:
        return _digest({"spec": asdict(self), "corpus": corpus_id})

    def dirname(self, corpus_id: str) -> str:
        slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.label).strip("-")
        return f"{slug}-seed{self.seed}-{self.digest(corpus_id)[:12]}"


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): a cost that, unlike wall time, a loaded machine barely changes."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _digest(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def corpus_id(corpus) -> str:
    """What identifies a corpus for the config hash: its resolved path, and each file's name and size."""
    files = corpus_files([Path(corpus)])
    return _digest({"path": str(Path(corpus).resolve()), "files": [[str(f), f.stat().st_size] for f in files]})


def write_json(path: Path, obj) -> None:
    """Write `obj` as JSON by temp file + rename (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_finished(point_dir: Path, digest: str) -> dict | None:
    """The point's record when it finished with this config hash, else None."""
    path = point_dir / POINT_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if rec.get("config_sha256") == digest else None


# -- initial stores ------------------------------------------------------------------------
def ensure_store(spec: TableSpec, corpus, out_dir: Path, *, tokenizer_engine=TokenizerEngine.HF, progress=None, notice=None) -> dict:
    """Build the store of `spec` under `out_dir/tables/` unless it is there; its record (path, plan size, collision rate)."""
    tables = out_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    digest = spec.digest()
    path, info = tables / f"{digest[:12]}.zarr", tables / f"{digest[:12]}.json"
    if info.is_file() and path.exists():
        return json.loads(info.read_text(encoding="utf-8"))
    tok = load_tokenizer(spec.tokenizer, tokenizer_engine)
    vocab_file = out_dir / "vocab.npz"  # computed once per sweep folder, then reused (`resolve_vocab` checks it matches)
    vocab = resolve_vocab(tok, None, default=vocab_file, notice=notice)
    if not vocab_file.exists():
        vocab.save(vocab_file)
    budget = parse_budget(spec.budget) if spec.budget else None
    plan = plan_tables(vocab, layer_ids=spec.layer_ids, max_ngram_size=spec.max_ngram, heads=spec.heads, rows_per_head=spec.rows_per_head or 2,
                       dim=spec.dim, seed=spec.seed, pad_id=DEFAULT_PAD_ID, budget=budget)
    t0, c0 = time.perf_counter(), cpu_seconds()
    build_tables([Path(corpus)], path, tokenizer=tok, vocab=vocab, plan=plan, force=True, progress=progress, workers=1)
    store = TableStore.open(path)
    rates = reference_rates(store.plan, store.stats)
    rec = {"path": str(path), "spec": asdict(spec), "rows_per_head": list(store.plan.rows_per_head), "table_rows": int(store.plan.total_rows),
           "table_params": int(store.plan.total_params), "table_bytes": int(store.plan.total_bytes),
           "collision_rate": {str(n): r for n, r in rates.items()}, "collision_rate_mean": sum(rates.values()) / max(len(rates), 1),
           "build_seconds": time.perf_counter() - t0, "build_cpu_seconds": cpu_seconds() - c0}
    write_json(info, rec)
    return rec


# -- one point -----------------------------------------------------------------------------
def model_params(ckpt_path: Path) -> dict:
    """Dense parameters of a checkpoint's model, and those one token activates (MoE: top-k of the routed experts)."""
    model = EngramGPT(ModelConfig.from_dict(load_checkpoint(ckpt_path)["config"]))
    return {"dense_params": sum(p.numel() for p in model.parameters()), "activated_params": activated_params(model)}


def run_point(spec: PointSpec, corpus, point_dir: Path, store: dict, cid: str, *, tokenizer_engine=TokenizerEngine.HF, progress=None) -> dict:
    """Train and evaluate one point into `point_dir` (cleared first); its record, also written to point.json."""
    if point_dir.exists():
        shutil.rmtree(point_dir)
    point_dir.mkdir(parents=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    ckpt = point_dir / CHECKPOINT
    train = run_training(corpus, store["path"], ckpt, steps=spec.steps, no_engram=not spec.engram, param_matched=spec.param_matched, batch=spec.batch,
                         block=spec.block, d_model=spec.d_model, depth=spec.n_layer, lr=spec.lr, seed=spec.seed, split=spec.split,
                         heldout_fraction=spec.heldout_fraction, tokenizer_engine=tokenizer_engine, progress=progress,
                         model_options={**spec.model_options, **({"engram_blocks": spec.table.layer_ids} if spec.engram else {})})  # the sweep's layer ids are blocks
    report = evaluate_windows(ckpt, tokenizer_engine=tokenizer_engine, progress=progress)[0]
    usage = [lay["usage"] for lay in report["layers"].values()]
    lookups = sum(u["lookups"] for u in usage)
    rec = {
        "config_sha256": spec.digest(cid),
        "engram_version": __version__,
        "sweep": spec.sweep, "label": spec.label, "seed": spec.seed, "engram": spec.engram, "rho": spec.rho,
        "spec": asdict(spec),
        "dir": str(point_dir), "checkpoint": str(ckpt),
        "table_params": store["table_params"] if spec.engram else 0,
        "table_bytes": store["table_bytes"] if spec.engram else 0,
        "table_rows": store["table_rows"] if spec.engram else 0,
        "rows_per_head": store["rows_per_head"] if spec.engram else None,
        **model_params(ckpt),
        "first_loss": train["first_loss"], "last_loss": train["last_loss"],
        "loss": report["loss"], "loss_interval": report["loss_interval"],
        "loss_memory_ablated": report["loss_memory_ablated"], "memory_gain": report["memory_gain"],
        "ablations": {k: (None if a is None else {"loss": a["loss"], "delta": a["delta"], "interval": a["interval"]}) for k, a in report["ablations"].items()},
        # share of held-out lookups (all Engram layers, all heads) landing on a row training updated
        "hit_rate": (sum(u["lookups"] * (1 - u["lookups_on_untrained_rows"]) for u in usage) / lookups) if lookups else None,
        "collision_rate": store["collision_rate_mean"] if spec.engram else None,
        "heldout_tokens": report["tokens"], "windows_sha256": report["windows_sha256"],
        "train_seconds": train["seconds"], "eval_seconds": report["seconds"], "seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - c0, "tokens_per_s": train["tokens_per_s"], "device": train["device"],
    }
    rec["train_losses"] = [float(x) for x in load_checkpoint(ckpt)["extra"]["losses"]]  # every step: reruns compare them to the last digit
    write_json(point_dir / POINT_FILE, rec)
    return json.loads((point_dir / POINT_FILE).read_text(encoding="utf-8"))  # as a rerun reads it back


def _run_in_worker(args) -> dict:
    spec, corpus, point_dir, store, cid, engine, threads = args
    torch.set_num_threads(threads)
    return run_point(spec, corpus, point_dir, store, cid, tokenizer_engine=engine)


def _eta(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_points(specs: list[PointSpec], corpus, out_dir: Path, stores: dict, *, jobs: int = 1, tokenizer_engine=TokenizerEngine.HF,
               progress=None, notice=None) -> list[dict]:
    """Every point's record, in the order of `specs`: finished ones read back (and said so), the rest run.

    `stores`: TableSpec digest -> its record (`ensure_store`). `jobs` > 1 runs the points
    in that many local processes (spawned, each with its share of the CPU threads).
    """
    cid = corpus_id(corpus)
    say = notice or (lambda _m: None)
    records: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        d = out_dir / "points" / spec.dirname(cid)
        rec = read_finished(d, spec.digest(cid))
        if rec is not None:
            say(f"skipped {spec.label} seed {spec.seed}: finished in {d} (config {rec['config_sha256'][:12]})")
            records[i] = rec
        else:
            todo.append((i, spec, d))
    t0, done = time.perf_counter(), 0

    def report(i, spec):
        nonlocal done
        done += 1
        left = (time.perf_counter() - t0) / done * (len(todo) - done)
        if progress is not None:
            progress("sweep points", done, len(todo), f"{spec.label} seed {spec.seed} done; about {_eta(left)} left")
        say(f"point {done}/{len(todo)} {spec.label} seed {spec.seed}: loss {records[i]['loss']:.4f} ({records[i]['seconds']:.0f} s); about {_eta(left)} left")

    if jobs > 1 and len(todo) > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futs = {pool.submit(_run_in_worker, (spec, corpus, d, stores[spec.table.digest()], cid, tokenizer_engine, threads)): (i, spec) for i, spec, d in todo}
            for fut in cf.as_completed(futs):
                i, spec = futs[fut]
                records[i] = fut.result()
                report(i, spec)
    else:
        for n, (i, spec, d) in enumerate(todo):
            if progress is not None:
                progress("sweep points", n, len(todo), f"running {spec.label} seed {spec.seed}")
            records[i] = run_point(spec, corpus, d, stores[spec.table.digest()], cid, tokenizer_engine=tokenizer_engine, progress=progress)
            report(i, spec)
    return [records[i] for i in range(len(specs))]
