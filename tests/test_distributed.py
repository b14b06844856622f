"""Scale-out on Ray: a 2-worker local cluster builds the same store, byte for byte, as one process.

Real parts throughout: the DeepSeek tokenizer (loaded inside each Ray worker), the
fixture corpus plus a .jsonl made from its paragraphs (split into byte-range map
shards), real Zarr v3 stores. The reference is the single-process `build_tables`
run in the same test; nothing expected is hard-coded. A local cluster starts in ~3 s.
"""

from __future__ import annotations


import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from engram_cli.errors import ClusterError, CorpusError, ResumeError
from engram_cli.execution.ray import ClusterSpec, RayExecutor, connect, parse_cluster
from engram_cli.execution.work import atomic_dir, is_done
from engram_cli.pipeline.build import DistributedOptions, build_tables, plan_tables
from engram_cli.pipeline.count import radix_ranges

import cli_checks

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "corpus"
SMALL_FILES = ["debian-policy/ap-license.rst", "debian-policy/index.rst", "developers-reference/scope.rst"]
STORE = dict(init="normal", init_std=0.02, chunk_bytes=64 << 10, shard_bytes=256 << 10, compressor="lz4")
MAP_BYTES = 64 << 10  # small map shards: the .jsonl splits into several byte ranges


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One local cluster of 2 workers for the module (~3 s to start): `connect` reuses a running session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def deepseek():
    from engram_cli.vocab import compress_vocab, load_tokenizer

    tok = load_tokenizer()
    return tok, compress_vocab(tok)


def small_plan(vocab):
    return plan_tables(vocab, layer_ids=[1, 4], max_ngram_size=3, heads=4, rows_per_head=[3001, 5003], dim=64, seed=0, pad_id=2)


def add_jsonl(root: Path, source: Path) -> None:
    """A .jsonl of the source's paragraphs (one document each), so map shards are byte ranges too."""
    paras = []
    for p in sorted(source.rglob("*.rst"))[:6]:
        paras += [x for x in p.read_text(encoding="utf-8").split("\n\n") if x.strip()]
    (root / "paragraphs.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in paras))


def small_corpus(tmp: Path) -> Path:
    root = tmp / "corpus"
    for rel in SMALL_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((FIXTURE / rel).read_bytes())
    add_jsonl(root, FIXTURE / "debian-policy")
    return root


def single(paths, out, deepseek, plan):
    tok, vocab = deepseek
    return build_tables(paths, out, tokenizer=tok, vocab=vocab, plan=plan, workers=1, **STORE)



def normalized_attrs(raw: bytes) -> dict:
    doc = json.loads(raw)
    attrs = doc["attributes"]["engram"]
    attrs.pop("created", None)  # a timestamp
    attrs.get("extra", {}).pop("cluster", None)  # where it ran
    return doc



def assert_same_store(a: Path, b: Path) -> None:
    """Every file byte-identical, the root attributes after `normalized_attrs`."""
    cli_checks.assert_same_store(a, b, normalized_attrs)


# -- parsing and bootstrap --------------------------------------------------------------------
def test_parse_cluster():
    assert parse_cluster("local:3") == ClusterSpec("local", 3)
    assert parse_cluster("local").workers == (os.cpu_count() or 1)
    assert parse_cluster("auto") == ClusterSpec("address", address="auto")
    assert parse_cluster("ray://head:10001").address == "ray://head:10001"
    for bad in ("local:0", "local:x", "yarn", "ray:/x"):
        with pytest.raises(ClusterError, match="--cluster"):
            parse_cluster(bad)


def test_radix_ranges_cover_the_vocabulary():
    import numpy as np

    zipf = 1.0 / np.arange(1, 129281)
    for c, p, w in [(10, 3, None), (129280, 7, None), (5, 9, None), (129280, 7, zipf), (10, 4, np.array([0, 0, 50, 1, 1, 1, 1, 1, 0, 0]))]:
        r = radix_ranges(c, p, w)
        assert r[0][0] == 0 and r[-1][1] == c and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(r, r[1:])), r
        if w is not None:  # balanced: no range beyond its share, unless one heavy tok_0 is the range
            share = w.sum() / p
            assert all(w[a:b].sum() <= share + w[a:b].max() for a, b in r), r


def test_range_of_bucket_inverts_bucket_range():
    import numpy as np

    from engram_cli.audit.partitioned import bucket_range, range_of_bucket

    for p in (2, 7, 10007, (1 << 33) + 17):
        for parts in (1, 3, 8):
            ranges = [bucket_range(p, r, parts) for r in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == p and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            for r, (lo, hi) in enumerate(ranges):
                edge = np.array([b for b in (lo, hi - 1) if lo <= b < hi], dtype=np.int64)
                assert (range_of_bucket(edge, p, parts) == r).all(), (p, parts, r)


def test_missing_ray_names_the_extra(tmp_path):
    """Ray made unimportable (a sys.modules shim): one line, exit 2, the pip command; no traceback."""
    corpus = small_corpus(tmp_path)
    shim = (
        "import sys; sys.modules['ray'] = None\n"
        "from engram_cli.cli import main\n"
        f"sys.argv = ['engram', 'build-table', {str(corpus)!r}, '-o', {str(tmp_path / 'o.zarr')!r}, '--cluster', 'local:2', '--heads', '4', '--dim', '64', '--rows-per-head', '3001']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'engram-cli[ray]'" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()


def test_no_cluster_never_imports_ray(tmp_path):
    probe = (
        "import sys\n"
        "from engram_cli.cli import main\n"
        "import engram_cli.execution.ray, engram_cli.pipeline.build, engram_cli.audit.partitioned, engram_cli.corpus.shards\n"
        f"sys.argv = ['engram', 'build-table', {str(FIXTURE)!r}, '--plan-only', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_atomic_dir_leaves_nothing_half_written(tmp_path):
    final = tmp_path / "part"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, "fp1") as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final, "fp1") as tmp:
        (tmp / "x").write_text("whole")
    assert is_done(final, "fp1") and not is_done(final, "fp2")


# -- the build -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_builds(tmp_path_factory, deepseek):
    """The fixture corpus (+ a .jsonl of its paragraphs) built once in one process, once on 2 Ray workers
    (2 radix partitions: each order's statistics file is joined from two reduce tasks' parts)."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus"
    corpus.mkdir()
    add_jsonl(corpus, FIXTURE)
    paths = [FIXTURE, corpus]
    plan = small_plan(deepseek[1])
    t0 = time.perf_counter()
    single(paths, tmp / "single.zarr", deepseek, plan)
    t1 = time.perf_counter()
    stages = []
    tok, vocab = deepseek
    result = build_tables(
        paths, tmp / "ray.zarr", cluster="local:2", tokenizer=tok, vocab=vocab, plan=plan,
        options=DistributedOptions(map_bytes=MAP_BYTES, partitions=2), progress=lambda s, *a: stages.append(s), **STORE,
    )
    t2 = time.perf_counter()
    return tmp, result, stages, (t1 - t0, t2 - t1)


def test_two_workers_build_the_same_store_byte_for_byte(fixture_builds):
    tmp, result, stages, _ = fixture_builds
    assert_same_store(tmp / "single.zarr", tmp / "ray.zarr")
    attrs = result.store.attrs
    assert attrs["extra"]["cluster"]["cluster"] == "local:2" and attrs["extra"]["cluster"]["cpus"] == 2
    assert {"map shards", "merge partitions", "hit counts", "writing"} <= set(stages)
    assert not (tmp / ".ray.zarr.work").exists()  # partials removed after success


def test_thread_executor_and_radix_partitions_build_the_same_store(tmp_path, deepseek):
    """Any Executor (a thread pool here) and 3 radix partitions, against one process whose small
    memory limit makes it spill and merge each order in several key ranges: byte-identical stores,
    statistics files included (their row groups depend on the rows only)."""
    corpus = small_corpus(tmp_path)
    plan = small_plan(deepseek[1])
    merging = []
    build_tables([corpus], tmp_path / "a.zarr", tokenizer=deepseek[0], vocab=deepseek[1], plan=plan, workers=1, memory_limit=256 << 10,
                 progress=lambda stage, done=None, total=None, *a: merging.append(total) if stage == "merging" else None, **STORE)
    assert max(t or 0 for t in merging) > 1  # the single process merged by key ranges
    with ThreadPoolExecutor(2) as ex:
        build_tables([corpus], tmp_path / "b.zarr", cluster="local:1", tokenizer=deepseek[0], vocab=deepseek[1], plan=plan,
                     options=DistributedOptions(map_bytes=4096, partitions=3, keep_work=True), memory_limit=256 << 10, executor=ex, **STORE)
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    # the radix partitions cut at the partials' tok_0 quantiles: far more even than equal id ranges
    from engram_cli.ngrams import NgramStats

    reduced = [NgramStats.open(d) for d in sorted((tmp_path / ".b.zarr.work" / "reduce").iterdir())]
    balanced = [sum(r.distinct(n) for n in r.orders) for r in reduced]
    merged = NgramStats.open(tmp_path / "b.zarr" / "stats")
    tok0 = pl.concat([merged.scan(n).select("tok_0").collect() for n in merged.orders]).get_column("tok_0").to_numpy()
    equal = [int(((tok0 >= a) & (tok0 < b)).sum()) for a, b in radix_ranges(deepseek[1].compressed_size, 3)]
    assert sum(balanced) == sum(equal) == tok0.size and len(balanced) == 3
    assert max(balanced) < 0.4 * tok0.size and max(equal) > 0.8 * tok0.size, (balanced, equal)  # measured: ~1/3 each vs 95% in one


def test_killed_worker_is_retried_and_the_build_is_identical(tmp_path, deepseek):
    """SIGKILL a Ray worker while it counts a shard: Ray re-runs the task, the store is the same."""
    corpus = small_corpus(tmp_path)
    plan = small_plan(deepseek[1])
    single([corpus], tmp_path / "a.zarr", deepseek, plan)
    work = tmp_path / "work"
    killed: list[int] = []  # pids killed while their task's temporary directory was still there (mid-task)
    stop = threading.Event()

    def killer():
        seen = set()
        while not stop.is_set() and not killed:
            for started in (work / "map").glob(".*.tmp-*/started.json") if (work / "map").exists() else []:
                try:
                    pid = json.loads(started.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid in seen:
                    continue
                seen.add(pid)
                os.kill(pid, signal.SIGKILL)
                if started.parent.exists():  # not renamed: the task was still running when it died
                    killed.append(pid)
                break
            time.sleep(0.001)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        build_tables([corpus], tmp_path / "b.zarr", cluster="local:2", tokenizer=deepseek[0], vocab=deepseek[1], plan=plan,
                     options=DistributedOptions(work_dir=work, map_bytes=32 << 10, keep_work=True), **STORE)
    finally:
        stop.set()
        t.join()
    assert killed, "no map task was killed mid-task"
    assert all(json.loads(d.read_text())["pid"] not in killed for d in (work / "map").glob("*/done.json"))  # redone elsewhere
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")


def test_resume_reuses_finished_partials(tmp_path, deepseek):
    corpus = small_corpus(tmp_path)
    plan = small_plan(deepseek[1])
    tok, vocab = deepseek
    work = tmp_path / "work"
    opts = dict(work_dir=work, map_bytes=8192, partitions=2)
    single([corpus], tmp_path / "a.zarr", deepseek, plan)
    with ThreadPoolExecutor(2) as ex:
        # A first run that fails in the materialize stage keeps its map and reduce partials.
        def fail_on_write(stage, *a):
            if stage == "writing":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_tables([corpus], tmp_path / "b.zarr", cluster="local:1", tokenizer=tok, vocab=vocab, plan=plan,
                         options=DistributedOptions(**opts), executor=ex, progress=fail_on_write, **STORE)
        assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.zarr.partial").exists()
        done = {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/*/done.json")}
        assert len(done) > 3
        # One partial lost (as if its task had died before the rename): only it is redone.
        lost = sorted(work.glob("map/*"))[1]
        import shutil

        shutil.rmtree(lost)
        build_tables([corpus], tmp_path / "b.zarr", cluster="local:1", tokenizer=tok, vocab=vocab, plan=plan,
                     options=DistributedOptions(resume=True, keep_work=True, **opts), executor=ex, **STORE)
    after = {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/*/done.json")}
    assert set(after) == set(done)
    assert {k for k in after if after[k] != done[k]} == {lost.name}  # map and reduce partials reused
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")


def test_resume_refuses_another_builds_work_dir(tmp_path, deepseek):
    corpus = small_corpus(tmp_path)
    tok, vocab = deepseek
    work = tmp_path / "work"
    work.mkdir()
    (work / "work.json").write_text(json.dumps({"format": "engram-work/1", "build": "someone-else"}))
    with ThreadPoolExecutor(1) as ex, pytest.raises(ResumeError, match="another build"):
        build_tables([corpus], tmp_path / "b.zarr", cluster="local:1", tokenizer=tok, vocab=vocab, plan=small_plan(vocab),
                     options=DistributedOptions(work_dir=work, resume=True), executor=ex, **STORE)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with ThreadPoolExecutor(1) as ex, pytest.raises(ResumeError, match="not an engram work directory"):
        build_tables([corpus], tmp_path / "c.zarr", cluster="local:1", tokenizer=tok, vocab=vocab, plan=small_plan(vocab),
                     options=DistributedOptions(work_dir=tmp_path / "stranger"), executor=ex, **STORE)
    assert (tmp_path / "stranger" / "notes.txt").read_text() == "mine"


def test_empty_corpus_is_a_corpus_error(tmp_path, deepseek):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blank.jsonl").write_text("\n\n")
    tok, vocab = deepseek
    with ThreadPoolExecutor(1) as ex, pytest.raises(CorpusError, match="no documents"):
        build_tables([tmp_path / "c"], tmp_path / "b.zarr", cluster="local:1", tokenizer=tok, vocab=vocab, plan=small_plan(vocab), executor=ex, **STORE)
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.zarr.partial").exists()


def test_ray_executor_unwraps_task_errors():
    """A library error raised inside a Ray task reaches the caller as itself (one line for the CLI)."""
    with connect("local:2"):
        ex = RayExecutor()
        with pytest.raises(ClusterError, match="is not a cluster"):
            ex.submit(parse_cluster, "bogus").result()
        assert ex.submit(pow, 3, 4).result() == 81
        ex.shutdown()


# -- the CLI ----------------------------------------------------------------------------------------
SMALL_PLAN_ARGS = ["--layers", "1,4", "--heads", "4", "--dim", "64", "--rows-per-head", "3001,5003", "--chunk-size", "64KiB", "--shard-size", "256KiB"]


def test_cli_cluster_build_equals_the_single_process_build(tmp_path):
    from typer.testing import CliRunner

    from engram_cli.cli import app

    corpus = small_corpus(tmp_path)
    runner = CliRunner()
    one = runner.invoke(app, ["build-table", str(corpus), "-o", str(tmp_path / "a.zarr"), *SMALL_PLAN_ARGS, "--json"])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, ["build-table", str(corpus), "-o", str(tmp_path / "b.zarr"), *SMALL_PLAN_ARGS, "--json", "--cluster", "local:2", "--work-dir", str(tmp_path / "w")])
    assert two.exit_code == 0, two.output
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["corpus"] == b["corpus"] and a["stats"] == b["stats"]
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    assert not (tmp_path / "w").exists()


def test_cli_auto_sized_cluster_build_equals_the_single_process_build(tmp_path):
    """`--rows-per-head auto --target` re-plans from the counted statistics on a cluster too:
    the same sizing, the same plan and the same store, byte for byte, as one process."""
    from typer.testing import CliRunner

    from engram_cli.cli import app

    corpus = small_corpus(tmp_path)
    auto = [a for a in SMALL_PLAN_ARGS if a != "3001,5003"]
    auto[auto.index("--rows-per-head") + 1:auto.index("--rows-per-head") + 1] = ["auto", "--target", "0.2"]
    runner = CliRunner()
    one = runner.invoke(app, ["build-table", str(corpus), "-o", str(tmp_path / "a.zarr"), *auto, "--json"])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, ["build-table", str(corpus), "-o", str(tmp_path / "b.zarr"), *auto, "--json", "--cluster", "local:2"])
    assert two.exit_code == 0, two.output
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["sizing"] is not None and a["sizing"] == b["sizing"] and a["plan"] == b["plan"]
    assert a["plan"]["rows_per_head"] != [3001, 5003]  # sized to the corpus, not the fixed plan
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--resume"], "--resume applies to distributed builds only"),
        (["--work-dir", "w"], "--work-dir applies to distributed builds only"),
        (["--cluster", "local:0"], "positive integer"),
        (["--cluster", "yarn"], "is not a cluster"),
    ],
)
def test_cli_cluster_option_errors(tmp_path, args, needle):
    from typer.testing import CliRunner

    from engram_cli.cli import app

    r = CliRunner().invoke(app, ["build-table", str(FIXTURE), "-o", str(tmp_path / "o.zarr"), *SMALL_PLAN_ARGS, *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "o.zarr").exists()


# -- collisions --------------------------------------------------------------------------------------
def test_distributed_audit_equals_the_single_process_audit(fixture_builds):
    """The fixture store's statistics audited by 2 Ray workers in 5 bucket ranges per head (more
    ranges than the plan's 2 layers), merged: the same report, JSON byte for byte, as auditing in
    one process (what-if plan, sizing, sweep, 2 families)."""
    from engram_cli.audit import audit_collisions, parse_sweep, what_if_plan
    from engram_cli.audit.partitioned import audit_collisions_distributed
    from engram_cli.store import TableStore

    tmp, _, _, _ = fixture_builds
    store = TableStore.open(tmp / "single.zarr")
    plan, _ = what_if_plan(store.plan, heads=2)
    assert len(plan.layer_ids) < 5
    spec = parse_sweep(["heads=1,2", "rows=0.5x,1x"], plan)
    kw = dict(families=("reference", "xxh3"), target=0.2, sweep=spec, top=3)
    one = audit_collisions(plan, store.stats, vocab_keys=store.vocab.keys, **kw)
    stages = set()
    many = audit_collisions_distributed(tmp / "single.zarr", plan, cluster="local:2", parts=5, progress=lambda stage, *a: stages.add(stage), **kw)
    assert json.dumps(many, sort_keys=True) == json.dumps(one, sort_keys=True)
    assert {"audit bucket ranges", "audit row ranges", "audit sizing"} <= stages
    assert not [p for p in tmp.iterdir() if ".audit-" in p.name]  # the join files are gone


@pytest.mark.parametrize("parts", [1, 5])
def test_bucket_range_audit_is_exact_on_crowded_heads(tmp_path, parts):
    """Small heads (loads ~1-8: s(x) takes every value 0..K, worst buckets are crowded) over
    random n-grams: the bucket-range audit on a thread pool equals the single-process audit."""
    import numpy as np

    from engram_cli.audit import audit_collisions, parse_sweep
    from engram_cli.audit.partitioned import audit_collisions_partitioned
    from engram_cli.ngrams import write_stats_from_arrays
    from engram_cli.plan import make_plan

    rng = np.random.default_rng(7)
    per_order = {}
    for n, m in ((2, 400), (3, 500)):
        ids = np.unique(rng.integers(0, 97, size=(m, n)), axis=0)
        per_order[n] = (ids, rng.zipf(1.7, size=len(ids)).astype(np.int64))
    stats = write_stats_from_arrays(tmp_path / "stats", per_order)
    plan = make_plan(compressed_vocab_size=97, compressed_pad_id=2, layer_ids=(1, 15), heads=3, dim=48, rows_per_head=(60, 700), seed=3)
    kw = dict(families=("reference", "xxh3"), target=0.3, sweep=parse_sweep(["heads=1,3", "rows=0.5x,2x"], plan), top=4, vocab_keys=[f"w{i} " for i in range(97)])
    one = audit_collisions(plan, stats, **kw)
    with ThreadPoolExecutor(2) as ex:
        many = audit_collisions_partitioned(plan, stats, executor=ex, work_dir=tmp_path / "work", parts=parts, batch_rows=128, **kw)
    assert json.dumps(many, sort_keys=True) == json.dumps(one, sort_keys=True)
    hist = [a["across"]["worst_partner_heads"]["distinct"] for a in one["audit"]]
    assert {k for h in hist for k, v in enumerate(h) if v} == {0, 1, 2, 3}, hist  # not a trivial audit


def test_bucket_range_audit_is_exact_on_huge_heads(tmp_path):
    """Heads of ~2^33 buckets (bucket ids past uint32; occupied buckets compacted), where two
    heads already pin the 64-bit mix (the reference family's shortcut): still the single-process report."""
    import numpy as np

    from engram_cli.audit import audit_collisions, identical_from
    from engram_cli.audit.partitioned import audit_collisions_partitioned
    from engram_cli.ngrams import write_stats_from_arrays
    from engram_cli.plan import make_plan

    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(0, 50000, size=(300_000, 2)), axis=0)
    stats = write_stats_from_arrays(tmp_path / "stats", {2: (ids, rng.zipf(1.5, size=len(ids)).astype(np.int64))})
    plan = make_plan(compressed_vocab_size=50000, compressed_pad_id=2, layer_ids=(1,), max_ngram_size=2, heads=2, dim=16, rows_per_head=(1 << 33,), seed=5)
    assert identical_from(plan.primes[1][0]) == 2
    one = audit_collisions(plan, stats, families=("reference", "xxh3"), top=3)
    with ThreadPoolExecutor(2) as ex:
        many = audit_collisions_partitioned(plan, stats, executor=ex, work_dir=tmp_path / "work", families=("reference", "xxh3"), top=3, parts=3)
    assert json.dumps(many, sort_keys=True) == json.dumps(one, sort_keys=True)
    assert all(a["heads"][0]["buckets_used"] < len(ids) for a in one["audit"])  # some buckets are shared


def test_audit_work_dir_that_cannot_be_made_is_an_output_error(fixture_builds, tmp_path):
    from engram_cli.audit.partitioned import audit_collisions_distributed
    from engram_cli.errors import OutputError
    from engram_cli.store import TableStore

    tmp, _, _, _ = fixture_builds
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with ThreadPoolExecutor(1) as ex, pytest.raises(OutputError, match="work directory"):
        audit_collisions_distributed(tmp / "single.zarr", TableStore.open(tmp / "single.zarr").plan, cluster="local:1", executor=ex, work_dir=blocker / "w")
    assert blocker.read_text() == "not a directory"


def test_cli_collisions_on_a_local_cluster(fixture_builds):
    from typer.testing import CliRunner

    from engram_cli.cli import app

    tmp, _, _, _ = fixture_builds
    runner = CliRunner()
    one = runner.invoke(app, ["collisions", str(tmp / "single.zarr"), "--json", "--top", "2"])
    two = runner.invoke(app, ["collisions", str(tmp / "single.zarr"), "--json", "--top", "2", "--cluster", "local:2"])
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert json.loads(one.stdout) == json.loads(two.stdout)
