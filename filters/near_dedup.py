"""Near-duplicate removal: MinHash over word n-grams, LSH, union-find (global stage).

Broder (1997) MinHash with LSH banding, as datatrove and NeMo Curator run it at corpus
scale. Each row's text (the whole conversation by default, or the prompt only) is
normalized (NFKC, lowercase, punctuation removed, whitespace folded; digits kept unless
``keep_digits: false``), cut into word ``ngram``-grams, and summarized by ``num_perm``
minima (:mod:`thresher.filters.minhash`). Signatures are computed per shard on the workers
(:meth:`NearDedupStage.map_shard`); the global step holds only ``row_id``, the corpus
position and the signatures, buckets them by band, and links rows that share a band
(connected components, i.e. union-find). Defaults as datatrove: 5-grams, 112 hashes in
14 bands x 8 rows: a pair with word 5-gram Jaccard 0.8 is caught with probability 98%,
0.72 with 50%, 0.5 with 1.5%. Candidate pairs are then checked on their signatures: a pair
whose estimated Jaccard is under ``min_similarity`` (0.5; the estimate's standard error at
112 hashes is under 0.05) is not linked. Without that check (datatrove's way, ``0``), pairs
that merely share one long sentence (Jaccard 0.2-0.5) get through now and then: on a
million rows that is thousands of rows (``bench/dedup.py``).

The first row of each cluster in corpus order (by ``source``, then ``source_row``, then
``row_id``: the same whatever the sharding) is kept; every other row is rejected as
``near_duplicate`` with the kept row in ``kept_row_id`` and the signatures' estimate of
their Jaccard similarity in ``value``. A cluster can chain (A~B, B~C): C is then rejected
against A with a lower estimate. Rows with no words are left alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from thresher.filters.minhash import EMPTY, clusters, signatures
from thresher.filters.text_ngrams import ngram_hashes
from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.schemas.records import corpus_order, prompt_messages, with_position

REASON = "near_duplicate"


class NearDedupParams(StageParams):
    ngram: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(112, ge=1, description="MinHash hash functions")
    bands: int = Field(14, ge=1, description="LSH bands")
    rows_per_band: int = Field(8, ge=1, description="signature entries per band")
    text: Literal["conversation", "prompt"] = Field("conversation", description="what is compared")
    keep_digits: bool = Field(True, description="false: every digit counts as 0 (datatrove's choice)")
    seed: int = Field(1, ge=0, description="seed of the hash functions")
    min_similarity: float = Field(0.5, ge=0, le=1, description="link an LSH candidate pair only when its "
                                  "signatures estimate a Jaccard of at least this (0: datatrove's no check)")

    @model_validator(mode="after")
    def _bands_fit(self) -> "NearDedupParams":
        if self.bands * self.rows_per_band > self.num_perm:
            raise ValueError(f"bands x rows_per_band = {self.bands * self.rows_per_band} is more than "
                             f"num_perm = {self.num_perm}")
        return self


def row_texts(messages: list, which: str) -> list[str]:
    """Each row's compared text: its turns' contents (or its prompt's) joined by newlines."""
    if which == "prompt":
        return ["\n".join(m["content"] for m in prompt_messages(ms)) for ms in messages]
    return ["\n".join(m["content"] for m in ms) for ms in messages]


class NearDedupStage(Stage):
    """Reject near-duplicates, keeping the first of each cluster (see the module docstring)."""

    name = "near_dedup"
    version = "1"
    kind = "global"
    maps_shards = True
    Params = NearDedupParams

    def map_shard(self, rows: pa.Table) -> pa.Table:
        p: NearDedupParams = self.params
        grams = ngram_hashes(row_texts(rows["messages"].to_pylist(), p.text), p.ngram, p.keep_digits)
        sigs = signatures(grams.hashes, grams.offsets, p.num_perm, p.seed)
        flat = pa.array(sigs.reshape(-1), pa.uint32())
        return with_position(rows, minhash=pa.FixedSizeListArray.from_arrays(flat, p.num_perm))

    def process(self, rows: pa.Table) -> StageOutput:
        p: NearDedupParams = self.params
        if rows.num_rows == 0:
            return StageOutput()
        order = corpus_order(rows)
        sigs = rows["minhash"].combine_chunks().flatten().to_numpy().reshape(rows.num_rows, p.num_perm)[order]
        valid = ~(sigs == EMPTY).all(axis=1)
        first = clusters(sigs, p.bands, p.rows_per_band, valid, p.min_similarity)
        dup = np.flatnonzero(first != np.arange(len(first)))
        ids = np.asarray(rows["row_id"].to_pylist(), dtype=object)[order]
        similarity = (sigs[dup] == sigs[first[dup]]).mean(axis=1) if len(dup) else np.zeros(0)
        rejected = [{"row_id": ids[i], "reason": REASON, "kept_row_id": ids[first[i]], "value": float(sim),
                     "detail": f"near-duplicate of row {ids[first[i]]} (estimated Jaccard {sim:.2f})"}
                    for i, sim in zip(dup.tolist(), similarity.tolist())]
        return StageOutput(rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        values = [v for v in rejected["value"].to_pylist() if v is not None]
        return {"near-duplicates rejected": rejected.num_rows,
                "clusters they belong to": len(set(rejected["kept_row_id"].to_pylist())),
                "estimated Jaccard to the kept row (min / mean)":
                    f"{min(values):.2f} / {sum(values) / len(values):.2f}" if values else "none"}
