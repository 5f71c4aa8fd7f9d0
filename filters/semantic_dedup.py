"""Semantic near-duplicates: rows whose embeddings are closer than a cosine threshold (global stage).

SemDeDup (Abbas et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication") removes rows whose embedding is within a cosine threshold of a kept one; it
catches what shares meaning but few words (paraphrases, reworded instructions), which
MinHash misses. Here the walk is in corpus order (by ``source``, then ``source_row``): a row
is kept iff its largest cosine similarity to the rows kept before it is at most
``threshold``, else rejected as ``semantic_duplicate`` with that row in ``kept_row_id`` and
the similarity in ``value``. The walk is deita's Repr Filter
(:func:`thresher.selectors.repr_filter.repr_filter`: blocked, exact, memory independent of
the number of rows), without a budget. That walk compares each row with every row kept before
it, so above ``exact_up_to`` rows (50,000) the vectors are first split by k-means into
partitions of about ``rows_per_cluster`` rows (SemDeDup's clustering step) and each partition
is walked alone: a duplicate pair split across two partitions is missed (``bench/dedup.py``
measures how many).

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
#: rows k-means is fitted on (a sample), and rows labelled per step: bounds its memory
KMEANS_SAMPLE = 100_000


def normalized(vectors: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64 norms, float32 result), a chunk at a time: no full-size
    float64 copy of a million-row matrix."""
    out = np.empty(vectors.shape, np.float32)
    for a in range(0, len(vectors), chunk):
        out[a:a + chunk] = l2_normalize(vectors[a:a + chunk])
    return out


class SemanticDedupParams(ModelStageParams):
    model: ModelConfig = model_field(DEFAULT_EMBEDDER, "embeds the rows when no earlier stage wrote `embedding`")
    embedding: str = Field("deita_embedding", description="an embedding column an earlier stage wrote, reused")
    threshold: float = Field(0.95, ge=-1, le=1, description="reject a row whose cosine similarity to a kept "
                             "row is above this")
    exact_up_to: int = Field(50_000, ge=1, description="up to this many rows, one exact walk over all of them")
    rows_per_cluster: int = Field(1_000, ge=2, description="above exact_up_to: k-means partitions of about "
                                  "this many rows, each walked alone (SemDeDup)")
    seed: int = Field(0, ge=0, description="k-means seed")
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
        if valid.all():  # the usual case: the Arrow buffer is read in place, no copy
            emb = normalized(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
        else:
            emb = np.zeros((rows.num_rows, dim), np.float32)
            emb[valid] = normalized(column.filter(pa.array(valid)).flatten().to_numpy().reshape(-1, dim))
        order = corpus_order(rows)
        order = order[valid[order]]
        ids = rows["row_id"].to_pylist()
        rejected = []
        for members in partitions(emb, order, p.exact_up_to, p.rows_per_cluster, p.seed):
            result = repr_filter(emb, members, tau=p.threshold)
            for pos in np.flatnonzero(result.status == TOO_SIMILAR):
                row, kept = int(result.order[pos]), int(result.order[result.nearest[pos]])
                sim = float(result.max_similarity[pos])
                rejected.append({"row_id": ids[row], "reason": REASON, "kept_row_id": ids[kept], "value": sim,
                                 "detail": f"cosine similarity {sim:.4f} > {p.threshold:g} to row {ids[kept]}"})
        return StageOutput(rejected=rejected)


def partitions(emb: np.ndarray, order: np.ndarray, exact_up_to: int, rows_per_cluster: int,
               seed: int) -> list[np.ndarray]:
    """The walks: one over every row when there are at most ``exact_up_to``; else one per k-means
    cluster of about ``rows_per_cluster`` rows (SemDeDup's partition), each in corpus order."""
    if len(order) <= exact_up_to:
        return [order]
    from sklearn.cluster import MiniBatchKMeans

    k = max(2, len(order) // rows_per_cluster)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(order, min(len(order), max(KMEANS_SAMPLE, 20 * k)), replace=False))
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=1,
                             max_no_improvement=10).fit(emb[sample])
    labels = np.concatenate([kmeans.predict(emb[order[a:a + KMEANS_SAMPLE]])
                             for a in range(0, len(order), KMEANS_SAMPLE)])
    by_label = np.argsort(labels, kind="stable")  # stable: corpus order within each cluster
    bounds = np.flatnonzero(np.diff(labels[by_label])) + 1
    return [order[part] for part in np.split(by_label, bounds)]
