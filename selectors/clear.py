"""CLEAR's confidence scoring (arXiv 2403.12776) with BSDetector's confidence (arXiv 2308.16175).

Three stages, one job each, so that changing a threshold re-runs no model:

- ``clear`` (per shard, model): BSDetector's confidence of every (prompt, response)
  row — attributes ``clear_consistency`` (observed consistency O),
  ``clear_reflection`` (self-reflection S), ``clear_confidence``
  (C = beta O + (1 - beta) S), ``clear_model`` and ``clear_similarity`` (the
  identities that produced them). See :mod:`thresher.selectors.clear_confidence`.
- ``clear_filter`` (global, no model): CLEAR's Auto-Filter, keep C > gamma (the
  corpus median by default); see :mod:`thresher.selectors.clear_filter`.
- ``clear_correct`` (global, models): CLEAR's Auto-Correct, used instead of
  ``clear_filter``; see :mod:`thresher.selectors.clear_correct`.

A row whose conversation does not end in an assistant turn has nothing to score: its
attributes are null and ``clear_filter`` rejects it (``clear_low_confidence``, "not scored").
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field
from thresher.generators.base import SamplingParams
from thresher.schemas.model_config import ModelConfig
from thresher.selectors.clear_confidence import bsdetector_confidence, split_row
from thresher.selectors.nullable import nullable_floats
from thresher.selectors.clear_prompts import REFLECTION_PROMPTS, check_template
from thresher.selectors.clear_similarity import EmbeddingSimilarity, NLISimilarity

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_EMBEDDER = "embedded:all-minilm-l6-v2"

CLEAR_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("clear_consistency", pa.float64()),
    ("clear_reflection", pa.float64()),
    ("clear_confidence", pa.float64()),
    ("clear_model", pa.string()),
    ("clear_similarity", pa.string()),
])


class ClearParams(ModelStageParams):
    model: ModelConfig = model_field(DEFAULT_MODEL, "the LLM whose samples and self-reflection give the confidence")
    nli_model: ModelConfig | None = Field(
        None, description="a local NLI cross-encoder folder (BSDetector's similarity); none: embeddings")
    embedding_model: ModelConfig = model_field(
        DEFAULT_EMBEDDER, "sentence embeddings for the similarity when no nli_model")
    k: int = Field(5, ge=1, description="sampled answers per prompt (BSDetector: 5)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (BSDetector: 1.0)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="tokens per sampled answer")
    seed: int = Field(0, description="sampling seed: same seed, same samples")
    alpha: float = Field(0.8, ge=0, le=1, description="weight of similarity vs exact match in o_i")
    beta: float = Field(0.7, ge=0, le=1, description="weight of consistency vs self-reflection")
    reflection_prompts: list[str] = Field(default_factory=lambda: list(REFLECTION_PROMPTS),
                                          description="templates with {question} and {answer}")
    max_answer_tokens: int | None = Field(
        512, ge=1, description="self-reflection sees this many tokens of the answer (null: all)")

    @field_validator("reflection_prompts")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one reflection prompt")
        return [check_template(t, ("question", "answer")) for t in value]


def make_similarity(p: ClearParams):
    """BSDetector's NLI similarity when an NLI model is configured, else embedding cosine."""
    if p.nli_model is not None:
        return NLISimilarity(p.nli_model)
    return EmbeddingSimilarity(p.load(p.embedding_model))


class ClearStage(Stage):
    """BSDetector confidence of every (prompt, response) row (CLEAR's scorer)."""

    name = "clear"
    version = "1"
    kind = "shard"
    Params = ClearParams
    provides = tuple(CLEAR_SCHEMA.names[1:])

    def process(self, rows: pa.Table) -> StageOutput:
        p: ClearParams = self.params
        row_ids = rows["row_id"].to_pylist()
        split = [split_row(m) for m in rows["messages"].to_pylist()]
        todo = [i for i, s in enumerate(split) if s is not None]
        n = len(row_ids)
        cons, refl, conf = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        model_id = similarity_id = None
        if todo:
            backend = p.load()
            similarity = make_similarity(p)
            model_id, similarity_id = backend.identity, similarity.identity
            sampling = SamplingParams(n=p.k, temperature=p.temperature, top_p=p.top_p,
                                      max_tokens=p.max_tokens, seed=p.seed)
            result = bsdetector_confidence(
                backend, similarity, [split[i][0] for i in todo], [split[i][1] for i in todo],
                sampling, p.reflection_prompts, p.alpha, p.beta, p.max_answer_tokens)
            cons[todo], refl[todo], conf[todo] = result.consistency, result.reflection, result.confidence

        scored = np.zeros(n, dtype=bool)
        scored[todo] = True
        table = pa.table({
            "row_id": pa.array(row_ids, pa.string()),
            "clear_consistency": nullable_floats(cons), "clear_reflection": nullable_floats(refl),
            "clear_confidence": nullable_floats(conf),
            "clear_model": pa.array([model_id if s else None for s in scored], pa.string()),
            "clear_similarity": pa.array([similarity_id if s else None for s in scored], pa.string()),
        }, schema=CLEAR_SCHEMA)
        return StageOutput(attributes=table)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        if "clear_confidence" not in kept.column_names or not kept.num_rows:
            return {}
        values = np.array([v for v in kept["clear_confidence"].to_pylist() if v is not None], dtype=float)
        if not values.size:
            return {}
        return {"output rows scored": int(values.size),
                "confidence of the output (min / median / max)":
                    f"{values.min():.3f} / {np.median(values):.3f} / {values.max():.3f}"}
