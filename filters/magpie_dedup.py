"""Magpie's near-duplicate removal of instructions: embeddings and exact nearest neighbours (global stage).

Magpie (Xu et al., ICLR 2025; magpie-align/magpie ``exp/gen_dis.py``): each instruction
(the row's first user turn) is embedded with a sentence-transformer (the reference:
all-mpnet-base-v2; here ``embedded:all-minilm-l6-v2`` by default), L2-normalized, and
compared with every other one by exact search. Two instructions are near-duplicates when
their cosine similarity is at least ``min_cosine`` (0.975: the reference's squared L2
distance below 0.05, since ``|a - b|^2 = 2 - 2 cos`` for unit vectors).

Writes, for every row:

- ``min_neighbor_distance``: the squared L2 distance to its nearest other instruction
  (null for a corpus of one row);
- ``repeat_count``: how many rows, itself included, lie within the threshold.

The first row in corpus order of each near-duplicate set is kept, as the reference keeps
the row whose smallest-index near-duplicate is itself: a row with an earlier
near-duplicate is rejected as ``magpie_near_duplicate``, its cosine to that row in
``value`` and that row in ``kept_row_id`` (deterministic; a chain a~b~c with a !~ c keeps
a and c only if c has no earlier near-duplicate, as in the reference).

The search is exact and blockwise (``block_bytes`` of similarities at a time): N^2
products, fine to a few hundred thousand rows on a GPU worker; approximate search for
more is the near-dedup stages' job.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import first_user_turn
from thresher.selectors.chunked import call_in_chunks

REASON = "magpie_near_duplicate"


class MagpieDedupParams(ModelStageParams):
    model: ModelConfig = model_field("embedded:all-minilm-l6-v2", "the sentence-transformer that embeds instructions")
    min_cosine: float = Field(0.975, gt=0, le=1, description="near-duplicates at this cosine similarity or above")
    chunk_size: int = resource_knob(512, ge=1, description="instructions per embedding call")
    block_bytes: int = resource_knob(1 << 26, ge=1 << 16, description="bytes of similarities computed at a time")


def near_duplicates(emb: np.ndarray, min_cosine: float, block_bytes: int = 1 << 26):
    """Per row of L2-normalized ``emb``: (best cosine to another row or NaN, rows within the
    threshold itself included, the first row within the threshold, which may be itself)."""
    n = emb.shape[0]
    best = np.full(n, np.nan)
    count = np.ones(n, dtype=np.int64)
    first = np.arange(n)
    step = max(1, block_bytes // (4 * max(n, 1)))
    for a in range(0, n, step):
        b = min(n, a + step)
        sims = emb[a:b] @ emb.T  # (b - a, n)
        rows = np.arange(b - a)
        sims[rows, a + rows] = -np.inf  # not one's own neighbour
        if n > 1:
            best[a:b] = sims.max(axis=1)
        close = sims >= min_cosine
        count[a:b] += close.sum(axis=1)
        close[rows, a + rows] = True  # itself, so argmax finds the first of the set
        first[a:b] = close.argmax(axis=1)
    return best, count, first


class MagpieDedupStage(Stage):
    """Near-duplicate instructions out, the first of each set kept (see the module docstring)."""

    name = "magpie_dedup"
    version = "1"
    kind = "global"
    reads = ("messages",)  # the first user turn, from each row's conversation
    Params = MagpieDedupParams
    provides = ("min_neighbor_distance", "repeat_count")

    def process(self, rows: pa.Table) -> StageOutput:
        p: MagpieDedupParams = self.params
        row_ids = rows["row_id"].to_pylist()
        texts = [first_user_turn(m) for m in rows["messages"].to_pylist()]
        backend = p.load()
        vectors = call_in_chunks(texts, lambda chunk: list(backend.embed(chunk)), p.chunk_size,
                                 progress="magpie_dedup: embedded")
        emb = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.where(norms > 0, norms, 1.0)
        best, count, first = near_duplicates(emb, p.min_cosine, p.block_bytes)
        distance = [None if np.isnan(c) else float(max(0.0, 2.0 - 2.0 * c)) for c in best]
        attributes = pa.table({
            "row_id": pa.array(row_ids, pa.string()),
            "min_neighbor_distance": pa.array(distance, pa.float64()),
            "repeat_count": pa.array(count.tolist(), pa.int64()),
        })
        rejected = []
        for i, j in enumerate(first.tolist()):
            if j != i:
                cosine = float(emb[i] @ emb[j])
                rejected.append({"row_id": row_ids[i], "reason": REASON, "kept_row_id": row_ids[j], "value": cosine,
                                 "detail": f"instruction at cosine {cosine:.4f} >= {p.min_cosine} to row {row_ids[j]}"})
        return StageOutput(attributes=attributes, rejected=rejected)
