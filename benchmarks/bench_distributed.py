"""Scale-out on Ray: 1 vs 2 workers, peak memory per worker, local-cluster overhead.

    python benchmarks/bench_distributed.py [--copies 4] [--repeat 2] [--map-bytes 262144]

Input: the fixture corpus (37 real text files, ~2.1 MB) repeated `--copies` times,
plus a .jsonl of its paragraphs per copy (split into byte-range map shards), built
with a small plan (2 layers x orders 2..3 x 4 heads x 10007 rows, rows of 16 float32)
so the corpus stages (tokenize, count, merge) dominate, as they do at scale.

Providers, all in this process:
  - single:   `pipeline.build.build_tables` (one process; the baseline)
  - ray-1:    `pipeline.build.build_tables(cluster=)` on `--cluster local:1`
  - ray-2:    the same on `--cluster local:2`

Figures: throughput ratio ray-2 / ray-1 (time ray-1 / time ray-2), overhead of ray-1
against single (time ray-1 / time single, with and without the cluster's start-up),
the map stage's rate per worker (corpus bytes and tokens per second per worker), and
the peak RSS of each Ray worker process (its own `ru_maxrss`, read by a task run on
it after the build) and of this driver process.

The collision audit of the built store (both hash families), the same way:
  - audit-single: `audit.audit_collisions` (one process; the baseline)
  - audit-ray-1 / audit-ray-2: `audit.partitioned.audit_collisions_distributed` on local:1 /
    local:2, bucket ranges per head = `--audit-parts` (the reports are checked equal)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import peak_rss_bytes, print_rows, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "corpus"
STORE = dict(init="normal", init_std=0.02, chunk_bytes=256 << 10, shard_bytes=1 << 20, compressor="lz4")


def make_corpus(root: Path, copies: int) -> Path:
    corpus = root / "corpus"
    for c in range(copies):
        shutil.copytree(FIXTURE, corpus / f"copy{c}")
        paras = []
        for p in sorted(FIXTURE.rglob("*")):
            if p.is_file():
                paras += [x for x in p.read_text(encoding="utf-8", errors="replace").split("\n\n") if x.strip()]
        (corpus / f"copy{c}" / "paragraphs.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in paras))
    return corpus


def worker_peak_rss(pause: float) -> tuple[int, int]:
    """(pid, peak RSS bytes) of the Ray worker process this runs on (defined in __main__: pickled by value)."""
    import os

    time.sleep(pause)  # hold the worker so the other task lands on another one
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stages:
    """First and last progress call per stage: stage wall times."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage, *args, **kwargs):
        now = time.perf_counter()
        self.first.setdefault(stage, now)
        self.last[stage] = now

    def span(self, stage: str) -> float:
        return self.last.get(stage, 0.0) - self.first.get(stage, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--map-bytes", type=int, default=256 << 10)
    ap.add_argument("--audit-parts", type=int, default=4)
    args = ap.parse_args()

    import ray

    from engram_cli.execution.ray import RayExecutor
    from engram_cli.pipeline.build import DistributedOptions, build_tables, plan_tables
    from engram_cli.ngrams import NgramStats
    from engram_cli.vocab import compress_vocab, load_tokenizer

    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    plan = plan_tables(vocab, layer_ids=[1, 15], max_ngram_size=3, heads=4, rows_per_head=[10007], dim=64, seed=0, pad_id=2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        corpus = make_corpus(tmp, args.copies)
        corpus_bytes = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
        times: dict[str, list[float]] = {"single": [], "ray-1": [], "ray-2": []}
        startup: dict[str, list[float]] = {"ray-1": [], "ray-2": []}
        map_span: dict[str, list[float]] = {"single": [], "ray-1": [], "ray-2": []}
        merge_span: dict[str, list[float]] = {"ray-1": [], "ray-2": []}
        partial_rows = partial_bytes = 0
        worker_rss: dict[str, list[int]] = {"ray-1": [], "ray-2": []}
        tokens = 0
        for r in range(args.repeat):
            out = tmp / f"single{r}.zarr"
            st = Stages()
            t0 = time.perf_counter()
            res = build_tables([corpus], out, tokenizer=tok, vocab=vocab, plan=plan, workers=1, progress=st, **STORE)
            times["single"].append(time.perf_counter() - t0)
            map_span["single"].append(st.span("tokenizing"))
            tokens = int(res.corpus["tokens"])
            if r == 0:
                audit_store = out.rename(tmp / "audit.zarr")
            else:
                shutil.rmtree(out)
            for n in (1, 2):
                name = f"ray-{n}"
                t0 = time.perf_counter()
                ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
                t1 = time.perf_counter()
                st = Stages()
                ex = RayExecutor()
                out = tmp / f"{name}-{r}.zarr"
                build_tables([corpus], out, cluster=f"local:{n}", tokenizer=tok, vocab=vocab, plan=plan, progress=st,
                             options=DistributedOptions(map_bytes=args.map_bytes, work_dir=tmp / "work", keep_work=True), executor=ex, **STORE)
                t2 = time.perf_counter()
                parts = [NgramStats.open(d) for d in sorted((tmp / "work" / "map").iterdir())]
                partial_rows = sum(p.distinct(k) for p in parts for k in p.orders)
                partial_bytes = sum(f.stat().st_size for p in parts for f in p.root.glob("*.parquet"))
                shutil.rmtree(tmp / "work")
                rss = [ex.submit(worker_peak_rss, 1.0) for _ in range(n)]
                worker_rss[name] += [r_.result()[1] for r_ in rss]
                ex.shutdown()
                ray.shutdown()
                times[name].append(t2 - t0)
                startup[name].append(t1 - t0)
                map_span[name].append(st.span("map shards"))
                merge_span[name].append(st.span("merge partitions"))
                shutil.rmtree(out)
        best = {k: min(v) for k, v in times.items()}
        start = {k: min(v) for k, v in startup.items()}
        maps = {k: min(v) for k, v in map_span.items()}
        rows = [
            {"provider": k, "best_s": best[k], "map_stage_s": maps[k], "startup_s": start.get(k, 0.0),
             "map_MB_per_s_per_worker": corpus_bytes / 1e6 / maps[k] / (2 if k == "ray-2" else 1) if maps[k] else 0.0,
             "map_Mtok_per_s_per_worker": tokens / 1e6 / maps[k] / (2 if k == "ray-2" else 1) if maps[k] else 0.0,
             "merge_stage_s": min(merge_span[k]) if k in merge_span else 0.0,
             "peak_worker_rss_MiB": max(worker_rss.get(k, [0])) / 2**20}
            for k in times
        ]
        ratios = [
            {"figure": "throughput ray-2 / ray-1 (time ratio)", "value": best["ray-1"] / best["ray-2"]},
            {"figure": "map stage ray-2 / ray-1 (time ratio)", "value": maps["ray-1"] / maps["ray-2"]},
            {"figure": "overhead ray-1 / single (whole build, start-up included)", "value": best["ray-1"] / best["single"]},
            {"figure": "overhead ray-1 / single (cluster start-up excluded)", "value": (best["ray-1"] - start["ray-1"]) / best["single"]},
        ]
        audit_rows, audit_ratios, audit_context = bench_audit(audit_store, args.repeat, args.audit_parts)
        rows += audit_rows
        ratios += audit_ratios
        context = dict(**audit_context, corpus_bytes=corpus_bytes, tokens=tokens, partial_rows=partial_rows, partial_bytes=partial_bytes, copies=args.copies, map_bytes=args.map_bytes, repeat=args.repeat,
                       driver_peak_rss_MiB=peak_rss_bytes() / 2**20, ray=ray.__version__)
        print_rows(f"Distributed build, {corpus_bytes / 1e6:.1f} MB, {tokens:,} tokens (best of {args.repeat})", rows)
        print_rows("Ratios", ratios)
        print(f"  driver peak RSS {context['driver_peak_rss_MiB']:.0f} MiB; partials: {partial_rows:,} rows in {partial_bytes:,} bytes "
              f"({partial_rows / tokens:.2f} rows per token, {partial_bytes / max(1, partial_rows):.2f} bytes per row)")
        record("distributed", rows + ratios, **context)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_audit(store_path: Path, repeat: int, parts: int) -> tuple[list[dict], list[dict], dict]:
    """The collision audit of `store_path` (both families): one process vs 1 and 2 Ray workers."""
    import ray

    from engram_cli.audit import audit_collisions
    from engram_cli.audit.partitioned import audit_collisions_distributed
    from engram_cli.execution.ray import RayExecutor
    from engram_cli.store import TableStore

    store = TableStore.open(store_path)
    families = ("reference", "xxh3")
    times: dict[str, list[float]] = {"audit-single": [], "audit-ray-1": [], "audit-ray-2": []}
    startup: dict[str, list[float]] = {"audit-ray-1": [], "audit-ray-2": []}
    worker_rss: dict[str, list[int]] = {"audit-ray-1": [], "audit-ray-2": []}
    single_rss = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        one = audit_collisions(store.plan, store.stats, families=families, vocab_keys=store.vocab.keys)
        times["audit-single"].append(time.perf_counter() - t0)
        for n in (1, 2):
            name = f"audit-ray-{n}"
            t0 = time.perf_counter()
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
            t1 = time.perf_counter()
            ex = RayExecutor()
            many = audit_collisions_distributed(store_path, store.plan, cluster=f"local:{n}", families=families, parts=parts, executor=ex)
            t2 = time.perf_counter()
            assert json.dumps(many, sort_keys=True) == json.dumps(one, sort_keys=True), "the distributed audit differs"
            rss = [ex.submit(worker_peak_rss, 1.0) for _ in range(n)]
            worker_rss[name] += [r_.result()[1] for r_ in rss]
            ex.shutdown()
            ray.shutdown()
            times[name].append(t2 - t0)
            startup[name].append(t1 - t0)
    single_rss = peak_rss_bytes()
    best = {k: min(v) for k, v in times.items()}
    start = {k: min(v) for k, v in startup.items()}
    rows = [{"provider": k, "best_s": best[k], "startup_s": start.get(k, 0.0), "peak_worker_rss_MiB": max(worker_rss.get(k, [0])) / 2**20} for k in times]
    ratios = [
        {"figure": "audit throughput ray-2 / ray-1 (time ratio)", "value": best["audit-ray-1"] / best["audit-ray-2"]},
        {"figure": "audit throughput ray-2 / ray-1, start-up excluded", "value": (best["audit-ray-1"] - start["audit-ray-1"]) / (best["audit-ray-2"] - start["audit-ray-2"])},
        {"figure": "audit overhead ray-1 / single (start-up included)", "value": best["audit-ray-1"] / best["audit-single"]},
        {"figure": "audit overhead ray-1 / single (start-up excluded)", "value": (best["audit-ray-1"] - start["audit-ray-1"]) / best["audit-single"]},
    ]
    distinct = {str(n): store.stats.distinct(n) for n in store.plan.orders}
    return rows, ratios, dict(audit_parts=parts, audit_distinct=distinct, audit_families=list(families), driver_peak_rss_after_audit_MiB=single_rss / 2**20)


if __name__ == "__main__":
    main()
