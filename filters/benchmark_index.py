"""The n-gram index of a benchmark set, built once and kept by its content (decontamination).

A benchmark is a file (JSON list, JSONL or Parquet) and the names of its text fields; a
list-valued field (MT-bench's ``turns``) gives every element. Each text is normalized as
:mod:`thresher.filters.text_ngrams` does and indexed by its word n-grams: texts of at least
``ngram`` words by their ``ngram``-grams (13, NeMo Curator 0.x), shorter texts of at least
``short_ngram`` words by their ``short_ngram``-grams (8), shorter ones not at all (too
common to mean anything). The index is a sorted uint64 array of n-gram hashes with, for each,
the benchmark, the row and the field it came from; it is saved under
``$THRESHER_CACHE_DIR/decontamination/<digest>.npz``, the digest naming the files' bytes and
every setting, so every worker and every later run loads it instead of building it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc

from thresher.filters.text_ngrams import ngram_hashes
from thresher.flows.store import digest, file_digest
from thresher.generators.embedded import cache_dir


@dataclass
class BenchmarkIndex:
    """Sorted n-gram hashes and where each came from (parallel arrays)."""

    hashes: np.ndarray     # uint64, sorted
    benchmark: np.ndarray  # int32: position in ``names``
    row: np.ndarray        # int64: the benchmark file's row
    names: list[str]
    texts: int             # texts indexed

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the index entry equal to it, or -1."""
        if not len(self.hashes) or not len(hashes):
            return np.full(len(hashes), -1, np.int64)
        pos = np.searchsorted(self.hashes, hashes).clip(0, len(self.hashes) - 1)
        return np.where(self.hashes[pos] == hashes, pos, -1)


def read_benchmark(path: str | Path, fields: Sequence[str]) -> list[tuple[int, str]]:
    """``(row, text)`` for every text of the named fields (a list field gives each element)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(path, use_threads=False).to_pylist()
    else:
        raw = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(raw)
            rows = loaded if isinstance(loaded, list) else [loaded]
        except json.JSONDecodeError:
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    missing = [f for f in fields if rows and not any(f in r for r in rows)]
    if missing:
        raise ValueError(f"benchmark {path}: no row has the field(s) {missing}; its fields are {sorted(rows[0])}")
    out = []
    for i, r in enumerate(rows):
        for f in fields:
            value = r.get(f)
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and text.strip():
                    out.append((i, text))
    return out


def build_index(benchmarks: Sequence[dict[str, Any]], ngram: int, short_ngram: int, keep_digits: bool) -> BenchmarkIndex:
    hashes, bench, rows, names, texts = [], [], [], [], 0
    for b, spec in enumerate(benchmarks):
        names.append(spec["name"] or Path(spec["path"]).stem)
        items = read_benchmark(spec["path"], spec["fields"])
        texts += len(items)
        for n, keep in ((ngram, lambda w: w >= ngram), (short_ngram, lambda w: short_ngram <= w < ngram)):
            grams = ngram_hashes([t for _, t in items], n, keep_digits, short_texts=False)
            lengths = pc.list_value_length(grams.words).to_numpy(zero_copy_only=False)
            counts = np.diff(grams.offsets)
            take = np.repeat(np.asarray([keep(w) for w in lengths], bool), counts)
            hashes.append(grams.hashes[take])
            rows.append(np.repeat(np.asarray([r for r, _ in items], np.int64), counts)[take])
            bench.append(np.full(int(take.sum()), b, np.int32))
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.argsort(all_hashes, kind="stable")
    return BenchmarkIndex(all_hashes[order], np.concatenate(bench)[order] if bench else np.zeros(0, np.int32),
                          np.concatenate(rows)[order] if rows else np.zeros(0, np.int64), names, texts)


def index_key(benchmarks: Sequence[dict[str, Any]], ngram: int, short_ngram: int, keep_digits: bool) -> str:
    return digest({"version": 1, "ngram": ngram, "short_ngram": short_ngram, "keep_digits": keep_digits,
                   "benchmarks": [{**b, "path": None, "sha256": file_digest(Path(b["path"]))} for b in benchmarks]})


def load_index(benchmarks: Sequence[dict[str, Any]], ngram: int, short_ngram: int, keep_digits: bool) -> BenchmarkIndex:
    """The index of these benchmarks: loaded from the cache by content, or built and saved there."""
    path = cache_dir() / "decontamination" / f"{index_key(benchmarks, ngram, short_ngram, keep_digits)}.npz"
    if path.exists():
        with np.load(path) as z:
            return BenchmarkIndex(z["hashes"], z["benchmark"], z["row"], json.loads(str(z["names"])), int(z["texts"]))
    index = build_index(benchmarks, ngram, short_ngram, keep_digits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, hashes=index.hashes, benchmark=index.benchmark, row=index.row,
             names=np.asarray(json.dumps(index.names)), texts=np.asarray(index.texts))
    os.replace(tmp, path)
    return index
