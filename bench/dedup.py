"""near_dedup at a million rows: MinHash signature speed and the end-to-end time, against datasketch.

    python bench/dedup.py [--rows 1000000] [--baseline-rows 1000000] [--workers 2]

The corpus is synthetic but made of real text: each row joins three random sentences
drawn from ``../shared/data`` (GSM8K, CodeAlpaca, self-instruct), so rows are distinct, and
2% of the rows are planted near-duplicates of an earlier row (one or two words inserted,
deleted or replaced). Measured in the same run, each side on the same rows:

1. MinHash signatures, rows/s (word 5-grams, 112 hashes): thresher's (pyarrow shingles +
   the numba kernel), datasketch's ``MinHash.update_batch`` and rensa's ``RMinHash``;
2. end to end, keep-first near-duplicate removal (14 bands x 8 rows): thresher's stage code
   (``map_shard`` per 50,000-row shard on ``--workers`` processes, as Dask workers run it,
   then the global LSH + union-find step) against datasketch's ``MinHash`` +
   ``MinHashLSH`` (query, then insert, row by row, in one process), with the planted
   duplicates each finds and the peak memory (max RSS) of every process;
3. ``decontaminate`` on the same rows against GSM8K test (per 50,000-row shard, ``--workers``
   processes) and ``semantic_dedup``'s global step on as many synthetic 384-d unit vectors
   (topics of ~50 rows, 2% planted near-copies): time, what they find, peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARD = 50_000


def sentences() -> list[str]:
    texts = [json.loads(line)["question"] for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    texts += [json.loads(line)["answer"] for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    texts += [r["output"] + " " + r["instruction"] for r in json.loads((DATA / "codealpaca" / "code_alpaca_2k.json").read_text())]
    out = [s.strip() for t in texts for s in re.split(r"(?<=[.?!])\s+|\n", t) if len(s.split()) >= 4]
    return list(dict.fromkeys(out))


def corpus(n: int, seed: int = 0) -> tuple[list[str], dict[int, int]]:
    """The rows, and each planted near-duplicate's original."""
    rng = random.Random(seed)
    pool = sentences()
    rows: list[str] = []
    planted: dict[int, int] = {}
    for i in range(n):
        if i > 100 and rng.random() < 0.02:
            original = rng.randrange(i - 100)
            words = rows[original].split()
            for _ in range(rng.randint(1, 2)):
                j = rng.randrange(len(words))
                words[j:j + 1] = rng.choice([[], ["also", words[j]], ["value"]])
            rows.append(" ".join(words))
            planted[i] = original
        else:
            rows.append(" ".join(rng.choice(pool) for _ in range(3)))
    return rows, planted


def jaccard(a: str, b: str, n: int = 5) -> float:
    from thresher.filters.text_ngrams import normalized_words

    wa, wb = normalized_words([a, b]).to_pylist()
    sa, sb = ({tuple(w[i:i + n]) for i in range(len(w) - n + 1)} for w in (wa, wb))
    return len(sa & sb) / max(1, len(sa | sb))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage():
    from thresher.filters.near_dedup import NearDedupStage

    return NearDedupStage()


def map_one(args: tuple[int, list[str]]) -> tuple[pa.Table, float]:
    start, texts = args
    from thresher.schemas.records import make_record, records_table

    rows = records_table([make_record([{"role": "user", "content": t}], "bench", start + i) for i, t in enumerate(texts)])
    return _stage().map_shard(rows), peak_mb()


def thresher_signatures(texts: list[str]) -> float:
    from thresher.filters.minhash import signatures
    from thresher.filters.text_ngrams import ngram_hashes

    signatures(*(lambda g: (g.hashes, g.offsets))(ngram_hashes(texts[:100], 5)), 112)  # compile once
    started = time.perf_counter()
    for a in range(0, len(texts), SHARD):
        grams = ngram_hashes(texts[a:a + SHARD], 5)
        signatures(grams.hashes, grams.offsets, 112)
    return len(texts) / (time.perf_counter() - started)


def shingles(text: str) -> list[str]:
    from thresher.filters.text_ngrams import normalized_words

    words = normalized_words([text]).to_pylist()[0]
    return [" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))]


def datasketch_signatures(texts: list[str]) -> float:
    from datasketch import MinHash

    started = time.perf_counter()
    for t in texts:
        m = MinHash(num_perm=112)
        m.update_batch([s.encode() for s in shingles(t)])
    return len(texts) / (time.perf_counter() - started)


def rensa_signatures(texts: list[str]) -> float:
    from rensa import RMinHash

    started = time.perf_counter()
    for t in texts:
        m = RMinHash(num_perm=112, seed=1)
        m.update(shingles(t))
        m.digest()
    return len(texts) / (time.perf_counter() - started)


def thresher_end_to_end(texts: list[str], workers: int) -> tuple[float, set[int], list[float]]:
    started = time.perf_counter()
    jobs = [(a, texts[a:a + SHARD]) for a in range(0, len(texts), SHARD)]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(map_one, jobs))
    mapped = pa.concat_tables([t for t, _ in results])
    output = _stage().process(mapped)
    seconds = time.perf_counter() - started
    position = {rid: row for rid, row in zip(mapped["row_id"].to_pylist(), mapped["source_row"].to_pylist())}
    return seconds, {position[r["row_id"]] for r in output.rejected}, [m for _, m in results]


def datasketch_end_to_end(texts: list[str]) -> tuple[float, set[int]]:
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    found = set()
    for i, t in enumerate(texts):
        m = MinHash(num_perm=112)
        m.update_batch([s.encode() for s in shingles(t)])
        if lsh.query(m):
            found.add(i)
        else:
            lsh.insert(i, m)
    return time.perf_counter() - started, found


def decontaminate_one(args: tuple[int, list[str]]) -> tuple[int, float]:
    start, texts = args
    from thresher.filters.decontaminate import DecontaminateStage
    from thresher.flows.registry import parse_config
    from thresher.schemas.records import make_record, records_table

    config = parse_config({"stages": [{"stage": "decontaminate", "benchmarks": [
        {"path": str(DATA / "gsm8k" / "test.jsonl"), "fields": ["question", "answer"], "name": "gsm8k-test"}]}]})
    rows = records_table([make_record([{"role": "user", "content": t}], "bench", start + i) for i, t in enumerate(texts)])
    return len(DecontaminateStage(config.stages[0].params).process(rows).rejected), peak_mb()


def decontaminate_end_to_end(texts: list[str], workers: int) -> None:
    decontaminate_one((0, texts[:10]))  # the index is built once, then every shard loads it
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(decontaminate_one, [(a, texts[a:a + SHARD]) for a in range(0, len(texts), SHARD)]))
    seconds = time.perf_counter() - started
    print(f"decontaminate against GSM8K test (question + answer; 13/8-grams): {seconds:.1f} s for {len(texts):,} "
          f"rows ({len(texts) / seconds:,.0f} rows/s, {workers} worker processes); {sum(n for n, _ in results):,} "
          f"rows share an n-gram with it; peak RSS of a worker {max(m for _, m in results):.0f} MB")


def semantic_end_to_end(rows: int, dim: int = 384, seed: int = 0) -> None:
    """The global step of semantic_dedup on ``rows`` unit vectors, 2% of them planted near-copies."""
    import numpy as np

    from thresher.filters.semantic_dedup import SemanticDedupStage
    from thresher.schemas.records import with_position

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((rows // 50, dim)).astype(np.float32)  # topics: 50 rows around each
    emb = np.empty((rows, dim), np.float32)  # made a chunk at a time: the peak below is the stage's, not this
    for a in range(0, rows, 100_000):
        b = min(rows, a + 100_000)
        emb[a:b] = centers[rng.integers(0, len(centers), b - a)] + 0.9 * rng.standard_normal((b - a, dim))
    copies = rng.choice(np.arange(1000, rows), rows // 50, replace=False)
    sources = np.setdiff1d(np.arange(rows), copies)  # originals are never copies themselves
    originals = sources[np.minimum(np.searchsorted(sources, copies) - 1,
                                   (np.searchsorted(sources, copies) * rng.random(len(copies))).astype(np.int64))]
    emb[copies] = emb[originals] + 0.05 * rng.standard_normal((len(copies), dim)).astype(np.float32)
    for a in range(0, rows, 100_000):
        emb[a:a + 100_000] /= np.linalg.norm(emb[a:a + 100_000], axis=1, keepdims=True)
    cosine = (emb[copies] * emb[originals]).sum(axis=1)
    ids = pa.array([f"r{i:07d}" for i in range(rows)])
    table = with_position(pa.table({"row_id": ids, "source": pa.array(["bench"] * rows),
                                    "source_row": pa.array(np.arange(rows))}),
                          embedding=pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
                          .cast(pa.list_(pa.float32())))
    started = time.perf_counter()
    del emb  # the stage gets the Arrow table only, as the flow gives it
    output = SemanticDedupStage().process(table)
    seconds = time.perf_counter() - started
    found = {int(r["row_id"][1:]) for r in output.rejected}
    print(f"semantic_dedup's global step: {seconds:.1f} s for {rows:,} vectors of {dim} (k-means partitions of "
          f"~1,000 rows above 50,000); {len(found & set(copies.tolist())):,} of {len(copies):,} planted near-copies "
          f"(cosine {cosine.min():.3f} or more to their original) found, {len(found - set(copies.tolist())):,} other "
          f"rows rejected; "
          f"peak RSS {peak_mb():.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=1_000_000, help="rows datasketch's end-to-end run gets")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-datasketch", action="store_true", help="leave out datasketch's end-to-end run (7 min)")
    args = ap.parse_args()
    started = time.perf_counter()
    texts, planted_from = corpus(args.rows)
    planted = set(planted_from)
    close = {i for i, o in planted_from.items() if jaccard(texts[i], texts[o]) >= 0.8}
    words = sum(len(t.split()) for t in texts[:10_000]) / min(len(texts), 10_000)
    print(f"# {len(texts):,} rows ({words:.0f} words each on average), {len(planted):,} planted near-duplicates "
          f"({len(close):,} of them at word 5-gram Jaccard >= 0.8 with their original); "
          f"made in {time.perf_counter() - started:.1f} s")

    print("\n# MinHash signatures (word 5-grams, 112 hashes), rows/s, one process")
    ours = thresher_signatures(texts[:200_000])
    ds = datasketch_signatures(texts[:20_000])
    rs = rensa_signatures(texts[:100_000])
    print(f"thresher (numba)  {ours:10,.0f}   on 200,000 rows")
    print(f"datasketch        {ds:10,.0f}   on 20,000 rows   thresher {ours / ds:.1f}x")
    print(f"rensa (Rust)      {rs:10,.0f}   on 100,000 rows  thresher {ours / rs:.1f}x")

    print("\n# end to end, keep-first near_dedup, 14 bands x 8 rows")
    seconds, found, worker_mb = thresher_end_to_end(texts, args.workers)
    print(f"thresher: {seconds:.1f} s for {len(texts):,} rows ({args.workers} worker processes, {SHARD:,}-row shards); "
          f"planted found: {len(found & close):,} of {len(close):,} at Jaccard >= 0.8, {len(found & planted):,} of "
          f"{len(planted):,} in all; {len(found - planted):,} other rows rejected; "
          f"peak RSS: main {peak_mb():.0f} MB, workers {max(worker_mb):.0f} MB")
    print("\n# the other two stages at the same scale")
    decontaminate_end_to_end(texts, args.workers)
    semantic_end_to_end(len(texts))
    if args.skip_datasketch:
        return
    print("\n# datasketch, end to end")
    base = texts[:args.baseline_rows]
    base_planted = {i for i in planted if i < len(base)}
    base_close = {i for i in close if i < len(base)}
    ds_seconds, ds_found = datasketch_end_to_end(base)
    print(f"datasketch MinHash + MinHashLSH: {ds_seconds:.1f} s for {len(base):,} rows (1 process); "
          f"planted found: {len(ds_found & base_close):,} of {len(base_close):,} at Jaccard >= 0.8, "
          f"{len(ds_found & base_planted):,} of {len(base_planted):,} in all; "
          f"{len(ds_found - base_planted):,} other rows rejected; peak RSS {peak_mb():.0f} MB (this process, all of it)")
    per_row = (seconds / len(texts)) / (ds_seconds / len(base))
    print(f"thresher's time per row is {per_row:.3f}x datasketch's ({1 / per_row:.0f}x faster)")


if __name__ == "__main__":
    sys.exit(main())
