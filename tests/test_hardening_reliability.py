"""Reliability of the store's readers and writers, import/export and --resume (issue 23, the store side).

In the style of tests/test_hardening.py: real stores built by `engram build-table`, real
files damaged on disk, the real CLI; every refusal is one `Error: ...` line, exit 2,
nothing half-written. Values a test compares against (ue8m0 scales, e4m3 values, zip
CRCs) are computed here by another route, never by the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.errors import StoreError
from engram_cli.fp8 import dequantize_fp8_rows
from engram_cli.store.table_store import TableStore

from cli_checks import copy_fixtures, one_error_line

ENGRAM = [sys.executable, "-m", "engram_cli.cli"]
runner = CliRunner()
SMALL = ["--layers", "1", "--heads", "2", "--dim", "64", "--rows-per-head", "101", "--chunk-size", "1KiB", "--shard-size", "4KiB"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def corpus(root) -> Path:
    return copy_fixtures(root / "corpus")


@pytest.fixture(scope="module")
def fp8_store(root, corpus) -> Path:
    out = root / "fp8.zarr"
    ok("build-table", corpus, "-o", out, *SMALL, "--dtype", "float8_e4m3", "--json")
    return out


@pytest.fixture(scope="module")
def f32_store(root, corpus) -> Path:
    out = root / "f32.zarr"
    ok("build-table", corpus, "-o", out, *SMALL, "--json")
    return out


def copy_store(src: Path, tmp_path: Path, name: str = "copy.zarr") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def safetensors_header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), 8 + n


# -- item 7: FP8 ---------------------------------------------------------------------------------
def e4m3_independent(byte: int) -> float:
    """e4m3fn from its bits (1 sign, 4 exponent bits biased 7, 3 mantissa bits; S.1111.111 is NaN)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * math.ldexp(man / 8, -6)
    return sign * math.ldexp(1 + man / 8, exp - 7)


def ue8m0_independent(byte: int) -> float:
    """The OCP MX ue8m0 scale: 2**(byte - 127), byte 255 is NaN (byte 0 is 2**-127)."""
    return math.nan if byte == 255 else math.ldexp(1.0, byte - 127)


def test_fp8_rows_in_a_store_decode_as_ue8m0_says(fp8_store):
    store = TableStore.open(fp8_store)
    packed = store.load_layer(1)
    hd = store.head_dim
    scales = packed[:, hd:]
    assert scales.min() >= 1 and scales.max() <= 254  # the bytes whose bit-cast and ue8m0 agree
    want = np.array([[e4m3_independent(int(v)) * ue8m0_independent(int(s)) for v, s in zip(row[:hd], np.repeat(row[hd:], 32))] for row in packed[:64]])
    got = dequantize_fp8_rows(packed[:64], hd)
    assert np.array_equal(got.astype(np.float64), want)


def test_fp8_write_refuses_a_non_finite_row_naming_layer_and_row(fp8_store, tmp_path):
    store_path = copy_store(fp8_store, tmp_path)
    before = snapshot(store_path / "layer_1")
    store = TableStore.open(store_path, mode="r+")
    values = np.full((3, store.head_dim), 0.01, dtype=np.float32)
    values[1, 7] = np.nan
    with pytest.raises(StoreError, match=r"layer 1 row 40 .*nan at column 7.*must be finite"):
        store.write_rows(1, [12, 40, 13], values)
    values[1, 7] = np.inf
    with pytest.raises(StoreError, match=r"layer 1 row 41 .*inf"):
        store.write_row_block(1, 40, values)
    assert snapshot(store_path / "layer_1") == before


def test_fp8_import_refuses_inf_and_scale_bytes_0_and_255(fp8_store, tmp_path):
    exported = tmp_path / "t.safetensors"
    ok("export", fp8_store, "-o", exported)
    header, base = safetensors_header(exported)
    scale = header["layers.1.multi_head_embedding.embedding.weight_scale_ue8m0"]
    weight = header["layers.1.multi_head_embedding.embedding.weight"]
    for byte, row, expect in ((0, 5, "scale byte 0"), (255, 9, "scale byte 255")):
        bad = tmp_path / f"scale{byte}.safetensors"
        data = bytearray(exported.read_bytes())
        data[base + scale["data_offsets"][0] + row * scale["shape"][1]] = byte
        bad.write_bytes(bytes(data))
        line = one_error_line(invoke("import", bad, "--plan-from", fp8_store, "-o", tmp_path / "out.zarr"))
        assert f"layer 1 row {row} " in line and expect in line
    bad = tmp_path / "nanbyte.safetensors"
    data = bytearray(exported.read_bytes())
    data[base + weight["data_offsets"][0] + 3 * 32 + 4] = 0x7F  # e4m3 NaN
    bad.write_bytes(bytes(data))
    line = one_error_line(invoke("import", bad, "--plan-from", fp8_store, "-o", tmp_path / "out.zarr"))
    assert "layer 1 row 3 " in line and "NaN" in line
    # float32 rows with an inf, converted by the importer
    ref = tmp_path / "t.pt"
    ok("export", fp8_store, "--format", "reference", "-o", ref)
    import torch

    sd = torch.load(ref, weights_only=True)
    sd["layers.1.multi_head_embedding.embedding.weight"][17, 2] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")
    line = one_error_line(invoke("import", tmp_path / "inf.pt", "--plan-from", fp8_store, "-o", tmp_path / "out.zarr"))
    assert "layer 1 row 17 " in line and "inf" in line
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


# -- item 3: zip CRC-32 ---------------------------------------------------------------------------
def data_member_offset(path: Path, member_suffix: str) -> tuple[int, int]:
    """(file offset of the first data byte, size) of the zip member whose name ends with member_suffix."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        h = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", h[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_flipped_byte_in_a_reference_export_is_one_line(f32_store, tmp_path):
    ref = tmp_path / "t.pt"
    ok("export", f32_store, "--format", "reference", "-o", ref)
    with zipfile.ZipFile(ref) as z:
        weight = max(z.infolist(), key=lambda i: i.file_size)  # the weight is the largest record
    start, size = data_member_offset(ref, weight.filename)
    data = bytearray(ref.read_bytes())
    data[start + size // 2 + 2] ^= 0x40  # one exponent bit of a float32 in the middle of the table
    ref.write_bytes(bytes(data))
    line = one_error_line(invoke("import", ref, "--plan-from", f32_store, "-o", tmp_path / "out.zarr"))
    assert weight.filename in line and "CRC-32" in line
    assert not (tmp_path / "out.zarr").exists()
    line = one_error_line(invoke("eval", "--state-dict", ref, "--tables", f32_store, "--json"))
    assert "CRC-32" in line


def test_an_offsets_tensor_declaring_2_31_elements_is_refused_from_the_header(f32_store, tmp_path):
    exported = tmp_path / "t.safetensors"
    ok("export", f32_store, "-o", exported)
    header, base = safetensors_header(exported)
    body = exported.read_bytes()[base:]
    key = "layers.1.multi_head_embedding.offsets"
    n = 1 << 31
    # the other tensors packed first, then the offsets tensor: 2**31 int64 elements (a 16 GiB sparse hole)
    data, end = b"", 0
    for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if k in ("__metadata__", key):
            continue
        a, b = v["data_offsets"]
        data += body[a:b]
        v["data_offsets"] = [end, end + b - a]
        end += b - a
    header[key] = {"dtype": "I64", "shape": [n], "data_offsets": [end, end + 8 * n]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    big = tmp_path / "big.safetensors"
    with big.open("wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data)
        fh.truncate(8 + len(text) + end + 8 * n)
    t0 = time.perf_counter()
    proc = subprocess.run([*ENGRAM, "import", str(big), "--plan-from", str(f32_store), "-o", str(tmp_path / "out.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert key in proc.stderr and "(2147483648,)" in proc.stderr
    assert time.perf_counter() - t0 < 60
    big.unlink()


def test_a_flipped_weight_byte_in_model_ckpt_is_one_line(tmp_path):
    import torch

    ckpt = tmp_path / "model.ckpt"
    torch.save({"format": "engram-checkpoint/1", "config": {}, "weights": {"wte.weight": torch.full((64, 16), 0.0385)},
                "tables": None, "plan_fingerprint": None, "heldout": {}, "extra": {}}, ckpt)
    start, size = data_member_offset(ckpt, "/data/0")
    data = bytearray(ckpt.read_bytes())
    data[start + size // 2 + 3] ^= 0x40
    ckpt.write_bytes(bytes(data))
    line = one_error_line(invoke("eval", ckpt, "--json"))
    assert "model.ckpt" in line and "data/0" in line and "CRC-32" in line


# -- item 5: --resume fingerprints shards by content ----------------------------------------------
def rewrite_keeping_size_and_mtime(path: Path, offset: int) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] = ord("X") if data[offset] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_resume_fingerprint_sees_a_same_size_edit_with_the_mtime_restored(tmp_path):
    from engram_cli.corpus.shards import plan_shards

    small = tmp_path / "small.txt"
    small.write_text("a few words of text\n" * 200)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"line {i} " + "word " * 40}) + "\n" for i in range(4000)))
    before = plan_shards([small, big], shard_bytes=200 << 10)
    assert sum(s.path == str(big) for s in before) >= 3  # the big file is split into line ranges
    rewrite_keeping_size_and_mtime(small, 1234)
    mid = before[2]  # a line range of the big file: its first sampled window
    rewrite_keeping_size_and_mtime(big, mid.start + 10)
    after = plan_shards([small, big], shard_bytes=200 << 10)
    changed = [a.fingerprint != b.fingerprint for a, b in zip(before, after)]
    assert changed[0] and changed[2]  # the small file and the edited range are recounted
    assert not changed[1] and not any(changed[3:])  # the other ranges of the big file keep their partials


# -- item 4: plan values bounded on open, work proportional to the shards that exist --------------
def forge_prime(store: Path, prime: int) -> None:
    """Give layer 1 order 2 head 0 the prime `prime` (the plan's fingerprint recomputed: a self-signed forgery)."""
    import dataclasses

    plan = TableStore.open(store).plan
    primes = {k: [list(o) for o in v] for k, v in plan.primes.items()}
    primes[1][0][0] = prime
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["engram"]["plan"] = dataclasses.replace(plan, primes={k: tuple(tuple(o) for o in v) for k, v in primes.items()}).to_dict()
    (store / "zarr.json").write_text(json.dumps(meta))


def next_prime(n: int) -> int:
    from engram_cli.plan import is_prime  # exact Miller-Rabin; the test only needs a prime, not the check under test

    while not is_prime(n):
        n += 1
    return n


@pytest.mark.parametrize("prime, expect", [(next_prime(10**15), "outside [2, 2,199,023,255,552]"), (next_prime((1 << 41) - 10**6), "more; it is not complete")])
def test_a_plan_with_huge_primes_is_refused_in_time_bounded_by_the_files(f32_store, tmp_path, prime, expect):
    store = copy_store(f32_store, tmp_path)
    forge_prime(store, prime)
    t0 = time.perf_counter()
    for command in ("inspect", "collisions"):
        line = one_error_line(invoke(command, store, "--json"))
        assert expect in line
    assert time.perf_counter() - t0 < 20


# -- item 6: --work-dir inside the output, leftovers of a killed export ----------------------------
@pytest.mark.parametrize("inside", ["OUT", "OUT/work", "OUT.partial/work", "."])  # ".": the work dir holds OUT
def test_work_dir_inside_the_output_is_refused_before_work(corpus, tmp_path, inside):
    out = tmp_path / "tables.zarr"
    work = Path(str(tmp_path / inside).replace("OUT", "tables.zarr"))
    t0 = time.perf_counter()
    line = one_error_line(invoke("build-table", corpus, "-o", out, *SMALL, "--cluster", "local:1", "--work-dir", work))
    assert "work directory" in line and "--work-dir" in line
    assert time.perf_counter() - t0 < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing started, nothing left to block -o


def test_temps_of_a_killed_export_are_removed_by_the_next_export(f32_store, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid = dead.pid  # a process that has exited: what `kill -9` leaves behind
    out = tmp_path / "t.pt"
    temp = tmp_path / f".t.pt.{pid}.partial"
    scratch = tmp_path / f"..t.pt.{pid}.partial.{pid}.scratch"
    temp.write_bytes(b"PK\x03\x04" + bytes(1 << 16))  # a full-size, half-written archive
    scratch.write_bytes(bytes(1 << 16))
    other = tmp_path / ".t.pt.notes"  # not a name an export writes: left alone
    other.write_text("mine")
    result = invoke("export", f32_store, "--format", "reference", "-o", out)
    assert result.exit_code == 0, result.output
    assert "interrupted export" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.pt.notes", "t.pt"]
    assert other.read_text() == "mine"


# -- item 3: inspect --verify covers the vocabulary; corrupt chunks read by eval/--state-dict --------
def test_inspect_verify_finds_a_corrupt_vocab_lookup_chunk(f32_store, tmp_path):
    store = copy_store(f32_store, tmp_path)
    chunk = store / "vocab" / "lookup" / "c" / "0"
    size = chunk.stat().st_size
    data = bytearray(chunk.read_bytes())
    data[size // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    result = invoke("inspect", store, "--verify", "--json")
    line = one_error_line(result)
    assert "vocab" in line and "corrupt chunk" in line
    assert json.loads(result.stdout)["verify"]["first_bad"]["array"].startswith("vocab")
    result = invoke("inspect", f32_store, "--verify", "--json")  # the intact store: every array counted
    assert result.exit_code == 0, result.output
    v = json.loads(result.stdout)["verify"]
    assert v["ok"] and v["checked"] == v["chunks"]


@pytest.mark.parametrize("array", ["table/c/0/0", "hits/c/0"])
def test_a_corrupt_table_or_hits_chunk_read_by_state_dict_audit_is_one_line_naming_it(f32_store, tmp_path, array):
    exported = tmp_path / "t.safetensors"
    ok("export", f32_store, "-o", exported)
    store = copy_store(f32_store, tmp_path)
    path = store / "layer_1" / array
    data = bytearray(path.read_bytes())
    data[20] ^= 0x40  # inside the first chunk's bytes: its crc32c no longer matches
    path.write_bytes(bytes(data))
    line = one_error_line(invoke("eval", "--state-dict", exported, "--tables", store, "--json"))
    assert "corrupt" in line and "chunk 0 " in line and f"layer_1/{array}" in line


def test_a_hits_chunk_declaring_3_gib_is_refused_before_decoding(f32_store, tmp_path):

    import google_crc32c

    store = copy_store(f32_store, tmp_path)
    shard = store / "layer_1" / "hits" / "c" / "0"
    raw = shard.read_bytes()
    n = int(TableStore.open(store).hits(1).shards[0]) // int(TableStore.open(store).hits(1).chunks[0])
    index = np.frombuffer(raw[-(16 * n + 4) : -4], dtype="<u8").reshape(n, 2).copy()
    off, size = (int(v) for v in index[0])
    frame = raw[off : off + size - 4]
    assert int.from_bytes(frame[:4], "little") == 0xFD2FB528
    fhd = frame[4]
    pos = 5 + (0 if (fhd >> 5) & 1 else 1) + (0, 1, 2, 4)[fhd & 3]
    fcs = (1 if (fhd >> 5) & 1 else 0, 2, 4, 8)[fhd >> 6]
    forged = frame[:4] + bytes([0xE0]) + (3 << 30).to_bytes(8, "little") + frame[pos + fcs :]  # single segment, 8-byte size: 3 GiB
    chunk = forged + np.array([google_crc32c.value(forged)], dtype="<u4").tobytes()  # its crc32c valid
    body = bytearray(raw[:off] + chunk + raw[off + size : -(16 * n + 4)])
    shift = len(chunk) - size
    index[0, 1] = len(chunk)
    later = (index[:, 0] > off) & (index[:, 0] != np.iinfo(np.uint64).max)
    index[later, 0] += shift
    ib = index.astype("<u8").tobytes()
    shard.write_bytes(bytes(body) + ib + np.array([google_crc32c.value(ib)], dtype="<u4").tobytes())
    # the peak of that one command: a fresh parent whose only child it is (this test process's
    # RUSAGE_CHILDREN would count every child it ever waited for, a training among them)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *ENGRAM, "inspect", str(store), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "declares 3221225472 decoded bytes" in lines[0] and "layer_1/hits/c/0" in lines[0]
    assert int(proc.stdout.split()[-1]) < 2 << 20  # KiB: the command never came near 3 GiB


def test_kill_9_while_a_store_is_linked_into_staging_leaves_nothing_a_rerun_refuses(f32_store, tmp_path):
    exported = tmp_path / "t.safetensors"
    ok("export", f32_store, "-o", exported)
    out = tmp_path / "new.zarr"
    script = (
        "import os, signal\n"
        "real, n = os.link, [0]\n"
        "def link(s, d):\n"
        "    n[0] += 1\n"
        "    if n[0] == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(s, d)\n"
        "os.link = link\n"
        "from engram_cli.exchange import import_tables\n"
        f"import_tables({str(exported)!r}, {str(f32_store)!r}, {str(out)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    partial = tmp_path / "new.zarr.partial"
    assert partial.is_dir() and not out.exists()  # killed in the middle of the copy
    result = invoke("import", exported, "--plan-from", f32_store, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert not partial.exists() and TableStore.open(out).plan == TableStore.open(f32_store).plan


def test_a_corrupt_data_page_in_the_statistics_is_one_line_naming_the_file(f32_store, tmp_path):
    store = copy_store(f32_store, tmp_path)
    summary = json.loads((store / "stats" / "summary.json").read_text())
    path = store / "stats" / "order_2.parquet"
    assert summary["checksums"]["order_2.parquet"]["bytes"] == path.stat().st_size  # recorded at build time
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40  # a data page; the footer (schema, row count) still reads
    path.write_bytes(bytes(data))
    TableStore.open(store)  # opening reads footers only
    line = one_error_line(invoke("collisions", store, "--json"))
    assert "stats/order_2.parquet" in line and "is corrupt" in line
    with pytest.raises(StoreError, match="order_2.parquet.* is corrupt"):
        TableStore.open(store).stats.scan(2)  # eval's read of the counts
    assert len(list(TableStore.open(f32_store).stats.iter_batches(2))) >= 1  # the intact store reads
