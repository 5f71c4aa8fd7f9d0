"""deita scoring stages: complexity, quality, and their per-turn product.

Liu et al., "What Makes Good Data for Alignment?" (ICLR 2024), reference code
hkust-nlp/deita. Three per-shard stages, one model each at most:

- ``deita_complexity``: each turn's instruction alone, through the complexity
  scorer's prompt (:data:`~thresher.selectors.deita_scoring.COMPLEXITY_TEMPLATE`);
- ``deita_quality``: each turn's instruction and response, through the quality
  scorer's prompt;
- ``deita_score``: ``sum over turns of complexity_i * quality_i`` (the reference's
  ``Combined_Filter._sort`` with ``sort_key = "complexity_scores,quality_scores"``).

Each scorer writes, keyed by ``row_id``::

    deita_<kind>                  float64  mean of the per-turn scores (the score, for one turn); null on failure
    deita_<kind>_turns            list<float64>  per-turn scores (null for a turn that failed)
    deita_<kind>_failure          string   null, or truncated | not_single_token | backend_error | non_finite | no_turns
    deita_<kind>_failure_detail   string   which turn and why
    deita_<kind>_scorer           string   the scoring model's identity (name, weights digest, dtype)

and ``deita_score`` writes ``deita_score`` (null when any turn of either score
failed), ``deita_failure`` (``complexity:truncated``...) and ``deita_failure_detail``.
Scorers never reject rows: a failed row keeps a null score and its reason, and the
selection (``deita_filter``) decides what happens to it, so changing that policy
re-runs no model.

Scorer models are any :class:`~thresher.schemas.model_config.ModelConfig`: the
released ``hkust-nlp/deita-complexity-scorer`` / ``hkust-nlp/deita-quality-scorer``
from a local folder or the local Hugging Face cache, on any backend. The default,
``embedded:smollm2-135m-instruct``, is only a stand-in that runs anywhere: it was
never trained to score, so its numbers exercise the pipeline, not deita's judgement.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator
from thresher.flows.stage import ModelStageParams, Stage, StageOutput, StageParams, model_field, resource_knob
from thresher.schemas.model_config import ModelConfig
from thresher.selectors.deita_report import (
    column_values,
    count_codes,
    histogram_rows,
    quantile_rows,
)
from thresher.selectors.deita_scoring import (
    NO_TURNS,
    SCORE_TOKENS,
    PromptScorer,
    complexity_prompt,
    conversation_turns,
    quality_prompt,
)

DEFAULT_SCORER = "embedded:smollm2-135m-instruct"
SCORE_EDGES = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]


class DeitaScorerParams(ModelStageParams):
    model: ModelConfig = model_field(
        DEFAULT_SCORER, "the scorer: hkust-nlp/deita-{complexity,quality}-scorer (local) or a stand-in")
    max_tokens: int | None = Field(
        2048, ge=2,
        description="a prompt whose tokens + the score token exceed this (or the model's context) fails "
                    "as 'truncated' (2048: the LLaMA-1 scorers' context)",
    )
    score_tokens: list[str] = Field(
        default_factory=lambda: list(SCORE_TOKENS),
        description="the score tokens, worth 1, 2, ... in order (deita: '1'..'6'); each must be one token",
    )
    chunk_size: int = resource_knob(64, ge=1, description="prompts per backend call")

    @field_validator("score_tokens")
    @classmethod
    def _at_least_two(cls, value: list[str]) -> list[str]:
        if len(value) < 2 or len(set(value)) != len(value) or not all(value):
            raise ValueError("score_tokens needs at least two distinct, non-empty strings")
        return value


def _scorer_schema(prefix: str) -> pa.Schema:
    return pa.schema([
        ("row_id", pa.string()),
        (prefix, pa.float64()),
        (f"{prefix}_turns", pa.list_(pa.float64())),
        (f"{prefix}_failure", pa.string()),
        (f"{prefix}_failure_detail", pa.string()),
        (f"{prefix}_scorer", pa.string()),
    ])


class _DeitaScorerStage(Stage):
    """Scores every (instruction, response) turn of every row with one deita prompt."""

    kind = "shard"
    Params = DeitaScorerParams
    score_kind: ClassVar[str]

    @classmethod
    def prefix(cls) -> str:
        return f"deita_{cls.score_kind}"

    @abstractmethod
    def prompt(self, instruction: str, response: str) -> str:
        """The scorer's raw prompt for one turn."""

    def process(self, rows: pa.Table) -> StageOutput:
        p: DeitaScorerParams = self.params
        prefix = self.prefix()
        if not rows.num_rows:
            return StageOutput(attributes=_scorer_schema(prefix).empty_table())
        backend = p.load()
        scorer = PromptScorer(backend, p.score_tokens, p.max_tokens, p.chunk_size)
        row_turns = [conversation_turns(m) for m in rows["messages"].to_pylist()]
        prompts = [self.prompt(q, a) for turns in row_turns for q, a in turns]
        outcomes = iter(scorer.score(prompts))
        records = []
        for row_id, turns in zip(rows["row_id"].to_pylist(), row_turns):
            mine = [next(outcomes) for _ in turns]
            record = {"row_id": row_id, prefix: None, f"{prefix}_turns": [o.score for o in mine],
                      f"{prefix}_failure": None, f"{prefix}_failure_detail": None,
                      f"{prefix}_scorer": backend.identity}
            failed = [i for i, o in enumerate(mine) if o.score is None]
            if not turns:
                record[f"{prefix}_failure"] = NO_TURNS
                record[f"{prefix}_failure_detail"] = "the conversation has no user turn to score"
            elif failed:
                first = mine[failed[0]]
                more = f" ({len(failed) - 1} more turns failed)" if len(failed) > 1 else ""
                record[f"{prefix}_failure"] = first.failure
                record[f"{prefix}_failure_detail"] = f"turn {failed[0] + 1} of {len(turns)}: {first.detail}{more}"
            else:
                record[prefix] = float(np.mean([o.score for o in mine]))
            records.append(record)
        return StageOutput(attributes=pa.Table.from_pylist(records, schema=_scorer_schema(prefix)))

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        prefix = self.prefix()
        if prefix not in kept.column_names:
            return {}
        values = column_values(kept, prefix)
        turns = [t for ts in column_values(kept, f"{prefix}_turns") if ts for t in ts]
        return {
            "scorer": sorted({v for v in column_values(kept, f"{prefix}_scorer") if v}),
            "output rows scored": sum(v is not None for v in values),
            "output rows failed, by reason": count_codes(column_values(kept, f"{prefix}_failure")),
            f"{prefix} of output rows (per-row mean over turns, and per turn)":
                histogram_rows({"rows": values, "turns": turns}, SCORE_EDGES),
            f"{prefix} statistics": quantile_rows({"rows": values, "turns": turns}),
        }


class DeitaComplexityStage(_DeitaScorerStage):
    """deita complexity: the instruction alone, per turn (reference ``infer_complexity``)."""

    name = "deita_complexity"
    version = "1"
    score_kind = "complexity"
    provides = tuple(_scorer_schema("deita_complexity").names[1:])

    def prompt(self, instruction: str, response: str) -> str:
        return complexity_prompt(instruction)


class DeitaQualityStage(_DeitaScorerStage):
    """deita quality: instruction and response, per turn (reference ``infer_quality``)."""

    name = "deita_quality"
    version = "1"
    score_kind = "quality"
    provides = tuple(_scorer_schema("deita_quality").names[1:])

    def prompt(self, instruction: str, response: str) -> str:
        return quality_prompt(instruction, response)


# --------------------------------------------------------------------------- the combined score


class DeitaScoreParams(StageParams):
    scores: list[Literal["complexity", "quality"]] = Field(
        default_factory=lambda: ["complexity", "quality"],
        description="the per-turn scores multiplied together (deita: complexity and quality)",
    )

    @field_validator("scores")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("scores must name complexity and/or quality, each once")
        return value


SCORE_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("deita_score", pa.float64()),
    ("deita_failure", pa.string()),
    ("deita_failure_detail", pa.string()),
])


def combine_turns(per_score: list[list[float | None]]) -> float | None:
    """``sum_i prod_k score_k[i]`` over turns; None when a turn is missing or the lengths differ."""
    if not per_score or any(len(s) != len(per_score[0]) for s in per_score):
        return None
    total = 0.0
    for values in zip(*per_score):
        if any(v is None for v in values):
            return None
        total += float(np.prod(values))
    return total


class DeitaScoreStage(Stage):
    """``deita_score = sum over turns of complexity_i * quality_i`` (model-free, per shard)."""

    name = "deita_score"
    version = "1"
    kind = "shard"
    Params = DeitaScoreParams
    provides = tuple(SCORE_SCHEMA.names[1:])

    def _needed(self) -> list[str]:
        return [f"deita_{k}{suffix}" for k in self.params.scores for suffix in ("_turns", "_failure", "_failure_detail")]

    def check_columns(self, rows: pa.Table) -> None:
        missing = [c for c in self._needed() if c not in rows.column_names]
        if missing:
            stages = ", ".join(f"deita_{k}" for k in self.params.scores)
            raise ValueError(f"stage 'deita_score' needs the columns {missing}; run {stages} before it")

    def process(self, rows: pa.Table) -> StageOutput:
        kinds = self.params.scores
        turns = {k: rows[f"deita_{k}_turns"].to_pylist() for k in kinds}
        failures = {k: rows[f"deita_{k}_failure"].to_pylist() for k in kinds}
        details = {k: rows[f"deita_{k}_failure_detail"].to_pylist() for k in kinds}
        records = []
        for i, row_id in enumerate(rows["row_id"].to_pylist()):
            record = {"row_id": row_id, "deita_score": None, "deita_failure": None, "deita_failure_detail": None}
            failed = [k for k in kinds if failures[k][i] is not None]
            if failed:
                record["deita_failure"] = f"{failed[0]}:{failures[failed[0]][i]}"
                record["deita_failure_detail"] = details[failed[0]][i]
            else:
                score = combine_turns([turns[k][i] or [] for k in kinds])
                if score is None:
                    record["deita_failure"] = "turn_mismatch"
                    record["deita_failure_detail"] = "per-turn scores " + ", ".join(
                        f"{k}: {turns[k][i]}" for k in kinds)
                record["deita_score"] = score
            records.append(record)
        return StageOutput(attributes=pa.Table.from_pylist(records, schema=SCORE_SCHEMA))

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        if "deita_score" not in kept.column_names:
            return {}
        values = column_values(kept, "deita_score")
        return {
            "formula": "sum over turns of " + " * ".join(self.params.scores),
            "output rows failed, by reason": count_codes(column_values(kept, "deita_failure")),
            "deita_score of output rows": quantile_rows({"deita_score": values}),
        }
