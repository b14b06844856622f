"""Map shards read exactly like the whole corpus: same documents, same summary once merged."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import polars as pl
import pytest

from engram_cli.corpus import CorpusSummary, iter_documents
from engram_cli.errors import CorpusError
from engram_cli.corpus.shards import Shard, iter_shard_documents, merge_summaries, plan_shards

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def whole(paths, **kw):
    summary = CorpusSummary()
    docs = list(iter_documents(paths, summary=summary, **kw))
    return docs, summary


def sharded(paths, shard_bytes, **kw):
    first = CorpusSummary()
    shards = plan_shards(paths, shard_bytes=shard_bytes, summary=first, **kw)
    docs, parts = [], []
    for shard in shards:
        shard = pickle.loads(pickle.dumps(shard))  # what a worker receives
        s = CorpusSummary()
        docs.extend(iter_shard_documents(shard, summary=s))
        parts.append(s)
    return shards, docs, merge_summaries(first, parts)


def fixture_lines() -> list[str]:
    """Real text: the fixture corpus cut into paragraphs."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(FIXTURE.rglob("*")) if p.is_file())
    return [p for p in text.split("\n\n") if p.strip()][:600]


def write_jsonl(path: Path, paras: list[str], *, bad: bool = True, bom: bool = True) -> None:
    rng = random.Random(7)
    lines = []
    for i, p in enumerate(paras):
        lines.append(json.dumps({"text": p, "i": i}, ensure_ascii=rng.random() < 0.5))
        if bad and i % 97 == 5:
            lines.append("{not json")
        if bad and i % 89 == 3:
            lines.append(json.dumps({"other": p}))
        if bad and i % 83 == 1:
            lines.append(json.dumps({"text": 5}))
        if bad and i % 71 == 2:
            lines.append("   ")
    data = ("\n".join(lines) + "\n").encode()
    if bom:
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)


def test_fixture_corpus_shards_read_like_the_whole():
    docs, summary = whole([FIXTURE])
    shards, sdocs, ssum = sharded([FIXTURE], 4096)
    assert all(s.kind == "file" for s in shards)  # plain text is one document per file: never split
    assert sdocs == docs
    assert ssum.to_dict() == summary.to_dict()


@pytest.mark.parametrize("shard_bytes", [1, 700, 5000, 1 << 30])
def test_jsonl_byte_ranges_read_like_the_whole(tmp_path, shard_bytes):
    paras = fixture_lines()
    write_jsonl(tmp_path / "a.jsonl", paras)
    write_jsonl(tmp_path / "b.ndjson", paras[::-1][:50], bad=False, bom=False)
    docs, summary = whole([tmp_path])
    shards, sdocs, ssum = sharded([tmp_path], shard_bytes)
    if shard_bytes < 1 << 30:
        assert sum(s.path.endswith("a.jsonl") for s in shards) > 1
        assert {s.kind for s in shards} == {"lines"}
    assert sdocs == docs
    assert ssum.to_dict() == summary.to_dict()
    assert summary.skipped_other  # the bad lines were there to be counted
    for s in shards:  # ranges tile the file and start on line boundaries
        if s.kind == "lines" and s.start:
            data = Path(s.path).read_bytes()
            assert data[s.start - 1 : s.start] == b"\n"
    by_file = {}
    for s in shards:
        by_file.setdefault(s.path, []).append(s)
    for path, ss in by_file.items():
        if ss[0].kind == "lines":
            assert ss[0].start == 0 and ss[-1].stop == Path(path).stat().st_size
            assert all(a.stop == b.start for a, b in zip(ss, ss[1:]))


def test_skip_examples_name_the_global_line(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(200)] + ["{broken"] + [json.dumps({"text": "tail"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    _, summary = whole([tmp_path / "c.jsonl"])
    shards, _, ssum = sharded([tmp_path / "c.jsonl"], 300)
    assert len(shards) > 3
    assert ssum.skipped_examples == summary.skipped_examples
    assert summary.skipped_examples["JSON line that does not parse"].endswith(":201")


def test_parquet_row_ranges_read_like_the_whole(tmp_path):
    paras = fixture_lines()
    texts = [None if i % 50 == 7 else p for i, p in enumerate(paras * 8)]
    pl.DataFrame({"text": texts, "n": list(range(len(texts)))}).write_parquet(tmp_path / "d.parquet", row_group_size=500)
    docs, summary = whole([tmp_path])
    shards, sdocs, ssum = sharded([tmp_path], 2_000)
    assert [s.kind for s in shards].count("rows") > 1
    assert sdocs == docs
    assert ssum.to_dict() == summary.to_dict()


def test_binary_and_compressed_files_stay_whole(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\x00" * 20_000)
    write_jsonl(tmp_path / "ok.jsonl", fixture_lines()[:40])
    import gzip

    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress((tmp_path / "ok.jsonl").read_bytes()))
    docs, summary = whole([tmp_path])
    shards, sdocs, ssum = sharded([tmp_path], 1000)
    kinds = {Path(s.path).name: s.kind for s in shards}
    assert kinds["bin.jsonl"] == "file" and kinds["z.jsonl.gz"] == "file" and kinds["ok.jsonl"] == "lines"
    assert sdocs == docs and ssum.to_dict() == summary.to_dict()
    assert summary.skipped_binary == 1


def test_fingerprint_follows_the_input(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", fixture_lines()[:100])
    a = plan_shards([tmp_path], shard_bytes=2000)
    b = plan_shards([tmp_path], shard_bytes=2000)
    assert [s.fingerprint for s in a] == [s.fingerprint for s in b]
    assert len({s.fingerprint for s in a}) == len(a)
    assert plan_shards([tmp_path], shard_bytes=2000, text_field="body")[0].fingerprint != a[0].fingerprint
    with open(tmp_path / "a.jsonl", "ab") as f:
        f.write(b'{"text": "appended"}\n')
    c = plan_shards([tmp_path], shard_bytes=2000)
    assert c[0].fingerprint != a[0].fingerprint
    with pytest.raises(CorpusError, match="changed during the build"):
        list(iter_shard_documents(a[1]))


def test_missing_path_fails_before_planning(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        plan_shards([tmp_path / "nope"])
    assert isinstance(pickle.loads(pickle.dumps(Shard(0, "x", "file"))), Shard)


def test_groups_pack_small_files_in_corpus_order():
    from engram_cli.corpus.shards import group_shards

    shards = plan_shards([FIXTURE], shard_bytes=200_000)
    groups = group_shards(shards, 200_000)
    assert [s for g in groups for s in g] == shards  # nothing lost, order kept
    assert len(groups) < len(shards)
    assert all(sum(s.weight for s in g) <= 200_000 or len(g) == 1 for g in groups)
