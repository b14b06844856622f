"""engram: build and audit the n-gram memory tables of DeepSeek's Engram architecture.

The library is the package; the `engram` command is a thin layer over it. The flow:

    tokenizer.json --vocab--> CompressedVocab
    corpus/ --corpus/encode/ngrams--> NgramStats
    params --plan--> TablePlan
    TablePlan + NgramStats --hashing/store--> TableStore (tables.zarr)
    TableStore --audit--> collision report

Public names are re-exported here lazily, so `import engram_cli` stays cheap.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # vocab: tokenizer compression (docs/spec.md, "Tokenizer compression")
    "CompressedVocab": "vocab",
    "LoadedTokenizer": "vocab",
    "load_tokenizer": "vocab",
    "compress_vocab": "vocab",
    "resolve_vocab": "vocab",
    # plan: primes, offsets, multipliers (docs/spec.md, "Table plan")
    "TablePlan": "plan",
    "make_plan": "plan",
    "fit_plan_to_budget": "plan",
    "parse_budget": "plan",
    "parse_bytes": "units",
    # kinds: the option enums every stage shares, parsed in one place
    "TableDtype": "kinds",
    "HashFamily": "kinds",
    "Backend": "kinds",
    # hashing (docs/spec.md, "Hash")
    "hash_positions": "hashing",
    "shift": "hashing",
    "ngram_row_ids": "hashing",
    # corpus reading, tokenization, n-gram counting
    "CorpusSummary": "corpus",
    "iter_documents": "corpus",
    "encode_documents": "encode",
    "count_corpus": "pipeline.count",
    "count_shard": "pipeline.count",
    "merge_stats": "ngrams",
    "concat_stats": "ngrams",
    "count_ngrams": "ngrams",
    "NgramStats": "ngrams",
    # the Zarr v3 store
    "TableStore": "store",
    "create_store": "store",
    "write_tables": "store",
    "init_chunk": "store",
    "hit_counts": "store",
    "load_store_tokenizer": "store.tokenizer",
    # the build-table pipeline
    "build_tables": "pipeline.build",
    "plan_tables": "pipeline.build",
    # collision audits
    "audit_collisions": "audit",
    "what_if_plan": "audit",
    # errors
    "EngramError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engram_cli' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
