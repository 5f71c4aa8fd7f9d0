"""``deita_filter``: deita's score-first, diversity-aware selection as a global stage.

Liu et al., "What Makes Good Data for Alignment?" (ICLR 2024), Section 3 ("Repr
Filter"), reference ``Combined_Filter`` in hkust-nlp/deita: rows are walked by
descending ``deita_score`` (ties: corpus order, so the result is deterministic; the
reference's pandas sort leaves ties unspecified), a row is accepted iff its largest
cosine similarity to the rows already accepted is ``<= tau``, and the walk stops at
the budget. The walk itself is :func:`thresher.selectors.repr_filter.repr_filter`:
exactly the sequential rule, vectorized in blocks, memory independent of the
number of rows.

Rejected rows, each with the number that decided it:

- ``deita_too_similar``: ``value`` = the similarity to the accepted row that rules
  it out, that row in ``kept_row_id`` (its walk rank in ``detail``): the largest
  among the accepted rows the filter compared it with (nearly always the overall
  largest; exactly that with ``exact_similarity: true``). Always over ``tau``;
- ``deita_below_budget``: the budget was filled before the walk reached the row;
  ``value`` = its score;
- ``deita_score_failed`` (``on_failure: reject``, the default): a scorer could not
  score the row; ``code`` = its ``deita_failure`` (``complexity:truncated``,
  ``quality:backend_error``...; ``null_score`` when the score is null and no scorer
  said why), ``detail`` = the same with the scorer's words. With
  ``on_failure: rank_last`` such rows are walked after every scored row, in corpus
  order, and can fill a budget that the scored rows leave open; they keep their null
  score and failure columns in the output, and if rejected (too similar, below
  budget) carry that failure in ``code``.
- ``deita_embedding_failed``: no usable embedding (the rule cannot compare it).

Accepted rows get ``deita_rank`` (their walk position, 0 = best score) and
``deita_max_similarity`` (largest similarity to an earlier accepted row; null for the
first). Changing ``tau`` or ``budget`` re-runs this stage only, never a model.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from thresher.flows.stage import Stage, StageOutput, StageParams, resource_knob
from thresher.selectors.deita_embed import l2_normalize
from thresher.selectors.deita_report import column_values, count_codes, quantile_rows
from thresher.selectors.nullable import float_or_none, floats
from thresher.selectors.repr_filter import (
    ACCEPTED,
    BELOW_BUDGET,
    TOO_SIMILAR,
    repr_filter,
)

REASON_TOO_SIMILAR = "deita_too_similar"
REASON_BELOW_BUDGET = "deita_below_budget"
REASON_SCORE_FAILED = "deita_score_failed"
REASON_EMBEDDING_FAILED = "deita_embedding_failed"
#: ``code`` of a row whose score is null while no scorer said why
NULL_SCORE = "null_score"


class DeitaFilterParams(StageParams):
    tau: float = Field(0.9, ge=-1.0, le=1.0, description="accept a row iff its max cosine similarity to accepted rows <= tau")
    budget: int | None = Field(None, ge=0, description="stop after this many accepted rows (deita: 6000 or 10000)")
    order_by: str | None = Field(
        "deita_score", description="the score column walked in descending order; null: corpus order "
                                   "(a pure diversity filter, no scorer needed)")
    embedding: str = Field("deita_embedding", description="the embedding column (list<float>)")
    on_failure: Literal["reject", "rank_last"] = Field(
        "reject", description="rows whose score failed: reject (deita_score_failed), or walk them last",
    )
    exact_similarity: bool = Field(
        False, description="report every too-similar row's largest similarity (slower); by default the largest "
                           "among the accepted rows it was compared with. Selection is the same either way",
    )
    block_size: int = resource_knob(2048, ge=1, description="rows of the walk compared at once")
    chunk_size: int = resource_knob(8192, ge=1, description="accepted rows per similarity chunk")
    device: str = resource_knob("cpu", description="torch device for the similarity products")
    threads: int | None = resource_knob(1, ge=1, description="torch CPU threads (None: torch's setting)")


def embedding_matrix(column: pa.ChunkedArray | pa.Array, positions: np.ndarray, name: str) -> np.ndarray:
    """The rows ``positions`` of a list<float> column as an (k, d) float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    picked = arr.take(pa.array(positions, pa.int64()))
    lengths = pc.list_value_length(picked).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() != lengths.max():
        raise ValueError(f"deita_filter: column '{name}' holds embeddings of different sizes "
                         f"({int(lengths.min())} to {int(lengths.max())})")
    dim = int(lengths[0]) if len(lengths) else 0
    flat = pc.list_flatten(picked).to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(positions), dim)


class DeitaFilterStage(Stage):
    """deita's Repr Filter with a budget (global: it sees the whole scored corpus)."""

    name = "deita_filter"
    version = "2"  # 2: failure codes in code, the most similar accepted row in kept_row_id
    kind = "global"
    Params = DeitaFilterParams
    provides = ("deita_rank", "deita_max_similarity")

    @property
    def reads(self) -> tuple[str, ...]:
        """The embedding and score columns, and the scorers' and embedder's failure columns."""
        p: DeitaFilterParams = self.params
        return tuple(c for c in (p.embedding, p.order_by, "deita_failure", "deita_failure_detail",
                                 "deita_embedding_failure") if c)

    def check_columns(self, rows: pa.Table) -> None:
        p: DeitaFilterParams = self.params
        for column, stage in ((p.order_by, "deita_score"), (p.embedding, "deita_embed")):
            if column is not None and column not in rows.column_names:
                raise ValueError(f"stage 'deita_filter' needs the column '{column}'; run {stage} "
                                 f"before it (columns: {', '.join(rows.column_names)})")

    def process(self, rows: pa.Table) -> StageOutput:
        p: DeitaFilterParams = self.params
        self.check_columns(rows)
        n = rows.num_rows
        row_ids = rows["row_id"].to_pylist()
        scores = floats(rows[p.order_by]) if p.order_by else np.zeros(n)
        code, failure = self._failures(rows)
        emb_failure = self._embedding_failures(rows)

        rejected: list[dict[str, Any]] = []
        usable = np.array([f is None for f in emb_failure], dtype=bool)
        for i in np.flatnonzero(~usable):
            rejected.append({"row_id": row_ids[i], "reason": REASON_EMBEDDING_FAILED, "detail": emb_failure[i]})
        scored = usable & np.isfinite(scores)
        unscored = usable & ~np.isfinite(scores)
        if p.on_failure == "reject":
            for i in np.flatnonzero(unscored):
                rejected.append({"row_id": row_ids[i], "reason": REASON_SCORE_FAILED, "code": code[i],
                                 "detail": failure[i]})
        walk = np.flatnonzero(scored)
        walk = walk[np.argsort(-scores[walk], kind="stable")]
        if p.on_failure == "rank_last":
            walk = np.concatenate([walk, np.flatnonzero(unscored)])

        local = np.full(n, -1, dtype=np.int64)
        local[walk] = np.arange(len(walk))
        emb = l2_normalize(embedding_matrix(rows[p.embedding], walk, p.embedding)) if len(walk) else np.zeros((0, 1), np.float32)
        result = repr_filter(emb, np.arange(len(walk)), p.tau, p.budget, p.block_size, p.chunk_size, p.device,
                             witness_buckets=0 if p.exact_similarity else 64, threads=p.threads)

        ranks, sims, kept_ids = [], [], []
        for pos, row in enumerate(walk):
            status = result.status[pos]
            score_text = self._score_text(scores[row], failure[row])
            ranked_last = code[row] if not np.isfinite(scores[row]) else None  # on_failure: rank_last
            if status == ACCEPTED:
                kept_ids.append(row_ids[row])
                ranks.append(pos)
                sims.append(float_or_none(result.max_similarity[pos]))
            elif status == TOO_SIMILAR:
                near = walk[result.nearest[pos]]
                rejected.append({
                    "row_id": row_ids[row], "reason": REASON_TOO_SIMILAR, "value": float(result.max_similarity[pos]),
                    "kept_row_id": row_ids[near], "code": ranked_last,
                    "detail": f"cosine similarity {result.max_similarity[pos]:.4f} > tau {p.tau:g} to accepted row "
                              f"{row_ids[near]} (walk rank {result.nearest[pos]}); {score_text}",
                })
            elif status == BELOW_BUDGET:
                rejected.append({
                    "row_id": row_ids[row], "reason": REASON_BELOW_BUDGET, "code": ranked_last,
                    "value": float(scores[row]) if p.order_by and np.isfinite(scores[row]) else None,
                    "detail": f"the budget of {p.budget} rows was filled before walk rank {pos}; {score_text}",
                })
        attributes = pa.table({
            "row_id": pa.array(kept_ids, pa.string()),
            "deita_rank": pa.array(ranks, pa.int64()),
            "deita_max_similarity": pa.array(sims, pa.float64()),
        })
        return StageOutput(attributes=attributes, rejected=rejected)

    def _score_text(self, score: float, failure: str) -> str:
        order_by = self.params.order_by
        if order_by is None:
            return "walked in corpus order"
        return f"{order_by} {score:.4f}" if np.isfinite(score) else f"score failed: {failure}"

    def _failures(self, rows: pa.Table) -> tuple[list[str], list[str]]:
        """Why each row would have no score: its failure code (``<scorer>:<reason>``, else
        :data:`NULL_SCORE`) and the same in words (``<code>: <the scorer's detail>``)."""
        p: DeitaFilterParams = self.params
        codes = column_values(rows, "deita_failure") or [None] * rows.num_rows
        details = column_values(rows, "deita_failure_detail") or [None] * rows.num_rows
        texts = [(f"{c}: {d}" if d else c) if c else f"{p.order_by} is null" for c, d in zip(codes, details)]
        return [c or NULL_SCORE for c in codes], texts

    def _embedding_failures(self, rows: pa.Table) -> list[str | None]:
        p: DeitaFilterParams = self.params
        vectors = rows[p.embedding]
        nulls = pc.is_null(vectors).to_pylist()
        why = column_values(rows, "deita_embedding_failure") if p.embedding == "deita_embedding" else []
        why = why or [None] * rows.num_rows
        out: list[str | None] = []
        for is_null, reason in zip(nulls, why):
            if reason:
                out.append(reason)
            else:
                out.append("no embedding" if is_null else None)
        return out

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        p: DeitaFilterParams = self.params
        reasons = rejected["reason"].to_pylist()
        values = rejected["value"].to_pylist()
        walked = (REASON_SCORE_FAILED, REASON_TOO_SIMILAR, REASON_BELOW_BUDGET)
        failures = count_codes(c for r, c in zip(reasons, rejected["code"].to_pylist()) if r in walked)
        for code in column_values(kept, "deita_failure"):
            if code:
                failures[code] = failures.get(code, 0) + 1
        summary = {
            "tau": p.tau,
            "budget": p.budget,
            "order_by": p.order_by or "corpus order",
            "on_failure": p.on_failure,
            "selected": kept.num_rows,
            "rejected, by reason": count_codes(reasons),
            "scoring failures, by reason (every row that reached the filter)": failures,
        }
        if p.order_by:
            summary[f"{p.order_by}: selected vs below budget"] = quantile_rows({
                "selected": column_values(kept, p.order_by),
                "below budget": [v for r, v in zip(reasons, values) if r == REASON_BELOW_BUDGET],
            })
        return summary | {
            "cosine similarity to the nearest accepted row": quantile_rows({
                "selected (to earlier selected)": column_values(kept, "deita_max_similarity"),
                "too similar": [v for r, v in zip(reasons, values) if r == REASON_TOO_SIMILAR],
            }),
        }
