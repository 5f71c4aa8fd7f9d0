"""Semantic near-duplicates: rows whose embeddings are closer than a cosine threshold (global stage).

SemDeDup (Abbas et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication") removes rows whose embedding is within a cosine threshold of a kept one; it
catches what shares meaning but few words (paraphrases, reworded instructions), which
MinHash misses. Here the walk is in corpus order (by ``source``, then ``source_row``): a row
is kept iff its largest cosine similarity to the rows kept before it is at most
``threshold``, else rejected as ``semantic_duplicate`` with that row in ``kept_row_id`` and
the similarity in ``value``. The walk is deita's Repr Filter
(:func:`thresher.selectors.repr_filter.repr_filter`: blocked, exact, memory independent of
the number of rows), without a budget.

Embeddings: the ``embedding`` column an earlier stage wrote (``deita_embed``'s
``deita_embedding``) is reused; otherwise each shard embeds its rows with ``model`` (default
all-MiniLM-L6-v2) in the per-shard step on the workers, and the global step holds only the
vectors. A row without an embedding is left alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import corpus_order, with_position
from thresher.selectors.chunked import call_in_chunks
from thresher.selectors.deita_embed import DEFAULT_EMBEDDER, l2_normalize, plain_text
from thresher.selectors.repr_filter import TOO_SIMILAR, repr_filter

REASON = "semantic_duplicate"


class SemanticDedupParams(ModelStageParams):
    model: ModelConfig = model_field(DEFAULT_EMBEDDER, "embeds the rows when no earlier stage wrote `embedding`")
    embedding: str = Field("deita_embedding", description="an embedding column an earlier stage wrote, reused")
    threshold: float = Field(0.95, ge=-1, le=1, description="reject a row whose cosine similarity to a kept "
                             "row is above this")
    chunk_size: int = resource_knob(256, ge=1, description="texts per embedding call")


class SemanticDedupStage(Stage):
    """Keep-first removal of rows above a cosine threshold (see the module docstring)."""

    name = "semantic_dedup"
    version = "1"
    kind = "global"
    maps_shards = True
    Params = SemanticDedupParams

    def map_shard(self, rows: pa.Table) -> pa.Table:
        p: SemanticDedupParams = self.params
        if p.embedding in rows.column_names:
            vectors = rows[p.embedding].combine_chunks().cast(pa.list_(pa.float32()))
        else:
            backend = p.load()
            texts = [plain_text(m) for m in rows["messages"].to_pylist()]
            emb = call_in_chunks(texts, lambda chunk: list(backend.embed(chunk)), p.chunk_size,
                                 progress="semantic_dedup: embedded")
            matrix = l2_normalize(np.asarray(emb, np.float32).reshape(len(texts), -1))
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()),
                                                        matrix.shape[1]).cast(pa.list_(pa.float32()))
        return with_position(rows, embedding=vectors)

    def process(self, rows: pa.Table) -> StageOutput:
        p: SemanticDedupParams = self.params
        column = rows["embedding"].combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        dim = int(lengths.max()) if len(lengths) else 0
        valid = (lengths == dim) & (dim > 0)
        if not valid.any():
            return StageOutput()
        emb = np.zeros((rows.num_rows, dim), np.float32)
        emb[valid] = l2_normalize(column.filter(pa.array(valid)).flatten().to_numpy().reshape(-1, dim))
        order = corpus_order(rows)
        result = repr_filter(emb, order[valid[order]], tau=p.threshold)
        ids = rows["row_id"].to_pylist()
        rejected = []
        for pos in np.flatnonzero(result.status == TOO_SIMILAR):
            row, kept = int(result.order[pos]), int(result.order[result.nearest[pos]])
            sim = float(result.max_similarity[pos])
            rejected.append({"row_id": ids[row], "reason": REASON, "kept_row_id": ids[kept], "value": sim,
                             "detail": f"cosine similarity {sim:.4f} > {p.threshold:g} to row {ids[kept]}"})
        return StageOutput(rejected=rejected)
