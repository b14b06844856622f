"""Shared test oracles: independent routes that several test modules check against.

Each is the slow, obvious way to compute what the library computes fast (Python ints,
dicts, collections.Counter, unicodedata, xxhash called directly), kept in one place so
test modules never import each other.

- collisions: `brute_force` / `check_audit` / `close` (every figure of the collision audit);
- vocabulary: `normalize`, `byte_decoder`, `tokens_from_json`, `byte_level_text`,
  `independent_lookup`, `merge_classes` (tokenizer compression, docs/spec.md
  "Tokenizer compression", without `tokenizers`);
- store: a small `CompressedVocab` (`STORE_VOCAB`), `small_plan`, `make_docs` and
  `count_windows` (every left-padded window with a Counter).
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import xxhash

from engram_cli import audit
from engram_cli.plan import TablePlan, make_plan
from engram_cli.vocab import CompressedVocab


# -- collision audit: brute force ---------------------------------------------------
def ref_mix(ngram, multipliers) -> int:
    """docs/spec.md "Hash" with Python ints: XOR over k of token[n-1-k] * m_k, wrapped to int64."""
    acc = 0
    n = len(ngram)
    for k in range(n):
        acc ^= (int(ngram[n - 1 - k]) * int(multipliers[k])) % (1 << 64)
    return acc - (1 << 64) if acc >= 1 << 63 else acc


def bf_bucket(family, plan, layer, order, head, p, ngram) -> int:
    if family == "reference":
        return ref_mix(ngram, plan.multipliers[layer]) % p  # Python floor modulo
    seed = (((plan.seed * 65536 + layer) * 256 + order) * 256 + head) % (1 << 64)
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{order}I", *[int(t) for t in ngram]), seed) % p


def brute_force(family, plan, layer, order, ids, counts, primes=None, top=10):
    """Every figure of one (family, layer, order), the slow obvious way."""
    primes = list(plan.primes[layer][order - 2]) if primes is None else list(primes)
    K, m, W = len(primes), len(ids), int(sum(counts))
    B = [[bf_bucket(family, plan, layer, order, j, p, g) for j, p in enumerate(primes)] for g in ids]
    heads, worst = [], []
    for j, p in enumerate(primes):
        groups = defaultdict(list)
        for i in range(m):
            groups[B[i][j]].append(i)
        shared = [i for g in groups.values() if len(g) > 1 for i in g]
        heads.append(
            {
                "p": p,
                "shared_observed": len(shared) / m,
                "shared_ideal": 1 - (1 - 1 / p) ** (m - 1),
                "token_weighted": sum(counts[i] for i in shared) / W,
                "shadowed": sum(sum(counts[i] for i in g) - max(counts[i] for i in g) for g in groups.values()) / W,
                "max_occupancy": max(len(g) for g in groups.values()),
            }
        )
        for b, g in groups.items():
            if len(g) > 1:
                tot = sum(counts[i] for i in g)
                worst.append((-(tot - max(counts[i] for i in g)), -tot, j, b, sorted(g, key=lambda i: (-counts[i], i))))
    worst.sort(key=lambda t: t[:4])
    s = []
    for i in range(m):
        best = 0
        for k in range(m):
            if k != i:
                best = max(best, sum(B[i][j] == B[k][j] for j in range(K)))
        s.append(best)
    clean = [any(sum(B[k][j] == B[i][j] for k in range(m)) == 1 for j in range(K)) for i in range(m)]
    mixes = [ref_mix(g, plan.multipliers[layer]) for g in ids]
    mix_count = defaultdict(int)
    for x in mixes:
        mix_count[x] += 1
    return {
        "heads": heads,
        "s": s,
        "hist": [sum(1 for v in s if v == t) for t in range(K + 1)],
        "hist_w": [sum(counts[i] for i in range(m) if s[i] == t) for t in range(K + 1)],
        "indist": sum(1 for v in s if v == K) / m,
        "indist_w": sum(counts[i] for i in range(m) if s[i] == K) / W,
        "clean": sum(clean) / m,
        "clean_w": sum(counts[i] for i in range(m) if clean[i]) / W,
        "mix_dups": sum(1 for x in mixes if mix_count[x] > 1),
        "worst": [(j, b, -sh, -tot, [ids[i].tolist() for i in g][: audit.MAX_MEMBERS], [int(counts[i]) for i in g][: audit.MAX_MEMBERS]) for sh, tot, j, b, g in worst[:top]],
    }


def close(a, b, what):
    assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"{what}: audit {a!r} vs brute force {b!r}"


def check_audit(a, bf, ids, counts, keys=None):
    for h, e in zip(a["heads"], bf["heads"]):
        for k in ("p", "shared_observed", "shared_ideal", "token_weighted", "shadowed", "max_occupancy"):
            close(h[k], e[k], f"head {h['head']} {k}")
    x = a["across"]
    assert x["worst_partner_heads"]["distinct"] == bf["hist"]
    assert x["worst_partner_heads"]["weighted"] == bf["hist_w"]
    close(x["indistinguishable"]["distinct"], bf["indist"], "indistinguishable")
    close(x["indistinguishable"]["weighted"], bf["indist_w"], "indistinguishable weighted")
    close(x["clean_head"]["distinct"], bf["clean"], "clean head")
    close(x["clean_head"]["weighted"], bf["clean_w"], "clean head weighted")
    got = [(w["head"], w["bucket"], w["shadowed"], w["occurrences"], [mm["ids"] for mm in w["members"]], [mm["count"] for mm in w["members"]]) for w in a["worst_buckets"]]
    assert got == bf["worst"]
    if keys is not None:
        for w in a["worst_buckets"]:
            for mm in w["members"]:
                assert mm["text"] == [keys[i] for i in mm["ids"]]


# -- tokenizer compression: the independent route ---------------------------------------
WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))


MARKS = frozenset({"Mn", "Mc", "Me"})


def normalize(text: str, marks=MARKS) -> str:
    """docs/spec.md "Tokenizer compression", step 3 with unicodedata: NFKC, NFD, drop marks, lowercase, whitespace."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if unicodedata.category(c) not in marks)
    s = "".join(c.lower() for c in s)  # per character, like tokenizers' Lowercase
    s = re.sub(r"[ \t\r\n]+", " ", s)
    if s == " ":
        return s  # a token that is only whitespace stays one space
    i, j = 0, len(s)
    while i < j and s[i] in WHITE_SPACE:
        i += 1
    while j > i and s[j - 1] in WHITE_SPACE:
        j -= 1
    return s[i:j]


def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokens_from_json(path: Path) -> list[str]:
    """id -> token string from tokenizer.json (added tokens override the model's vocab)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    id_to_token = {i: t for t, i in doc["model"]["vocab"].items()}
    id_to_token.update({a["id"]: a["content"] for a in doc["added_tokens"]})
    assert sorted(id_to_token) == list(range(len(id_to_token))), "ids have gaps"
    return [id_to_token[i] for i in range(len(id_to_token))]


def byte_level_text(token: str, table: dict[str, int]) -> str:
    """What the ByteLevel decoder makes of one token (raw UTF-8 when a char is not a byte stand-in)."""
    if all(c in table for c in token):
        return bytes(table[c] for c in token).decode("utf-8", errors="replace")
    return token


def independent_lookup(tokens: list[str], texts: list[str], marks=MARKS) -> np.ndarray:
    """docs/spec.md "Tokenizer compression", steps 2-4 from decoded texts, with dense first-appearance ids."""
    ids: dict[str, int] = {}
    out = []
    for token, text in zip(tokens, texts):
        if "\ufffd" in text:
            key = token
        else:
            key = normalize(text, marks) or text
        out.append(ids.setdefault(key, len(ids)))
    return np.array(out, dtype=np.int64)


def merge_classes(lookup: np.ndarray) -> set[tuple[int, ...]]:
    classes: dict[int, list[int]] = {}
    for t, c in enumerate(lookup.tolist()):
        classes.setdefault(c, []).append(t)
    return {tuple(m) for m in classes.values() if len(m) > 1}


# -- store: a small vocabulary, plan and documents -----------------------------------------
STORE_C = 1000  # compressed vocabulary size


STORE_V = 1300  # tokenizer ids; 300 of them merge into earlier classes


STORE_PAD = 2


STORE_CHUNK_BYTES = 16 * 1024  # 256 rows of 16 float32


STORE_SHARD_BYTES = 64 * 1024  # 4 chunks per shard


STORE_SMALL = dict(chunk_bytes=STORE_CHUNK_BYTES, shard_bytes=STORE_SHARD_BYTES)


def make_vocab() -> CompressedVocab:
    lookup = np.concatenate([np.arange(STORE_C), np.arange(STORE_V - STORE_C) * 3]).astype(np.int64)
    keys = tuple(f"tök{i}" if i % 7 else f" ﬁ {i}\u00e9" for i in range(STORE_C))  # non-ASCII on purpose
    raw_key = np.zeros(STORE_V, dtype=bool)
    raw_key[STORE_C + 5 : STORE_C + 9] = True
    return CompressedVocab(lookup=lookup, keys=keys, raw_key=raw_key, tokenizer_sha256="ab" * 32)


STORE_VOCAB = make_vocab()


def small_plan(dtype: str = "float32", layer_ids=(1, 4)) -> TablePlan:
    return make_plan(
        compressed_vocab_size=STORE_C,
        compressed_pad_id=STORE_PAD,
        rows_per_head=5000,
        heads=4,
        dim=64,
        layer_ids=layer_ids,
        dtype=dtype,
        tokenizer_sha256=STORE_VOCAB.tokenizer_sha256,
        vocab_fingerprint=STORE_VOCAB.fingerprint,
    )


def make_docs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(60):
        T = int(rng.integers(1, 90))
        # Zipf-like ids so that n-grams repeat
        docs.append(np.minimum(rng.zipf(1.3, size=T) - 1, STORE_C - 1).astype(np.int64))
    return docs


def count_windows(docs, max_n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every window of every position, left-padded, with collections.Counter."""
    per_order = {}
    for n in range(2, max_n + 1):
        counter: Counter = Counter()
        for doc in docs:
            padded = [STORE_PAD] * (n - 1) + doc.tolist()
            for t in range(len(doc)):
                counter[tuple(padded[t : t + n])] += 1
        keys = sorted(counter)
        per_order[n] = (np.array(keys, dtype=np.int64).reshape(-1, n), np.array([counter[k] for k in keys], dtype=np.int64))
    return per_order
