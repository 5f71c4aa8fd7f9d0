"""GRAPE scoring: how well each candidate response fits the target model (arXiv 2502.04194).

"The Best Instruction-Tuning Data are Those That Fit" (Zhang et al., 2025) picks,
for every instruction ``x`` with candidate responses ``y_1..y_K`` (from several
LLMs, humans or data sets), the response the *base* model about to be
fine-tuned already finds most likely:

    s(x, y) = (1 / |y|) * sum_t log p(y_t | x, y_<t)        (response tokens only)

This module is the per-shard scoring stage ``grape``; the argmax per instruction
is the separate global stage ``grape_select`` (:mod:`thresher.selectors.grape_select`),
so changing the selection re-runs no model.

What ``grape`` computes for every row (one forward pass per candidate, batched):

- the prompt: the conversation before the final assistant turn, formatted as
  SFT will format it (parameter ``template``; see :mod:`thresher.selectors.grape_prompt`).
  Multi-turn rows: the final assistant turn is scored given the whole history.
- prompt and response tokenized separately, their ids concatenated (the paper's
  choice: a response's tokens never depend on its prompt), and the log-softmax of
  the target's logits gathered at the response ids; prompt tokens are not scored.
- ``max_tokens`` caps prompt + response tokens: a longer response is cut from the
  right and scored on its kept tokens, and ``grape_truncated`` is set; a prompt
  that alone fills the cap leaves no response token to score (``grape_n_tokens`` 0,
  mean null), and ``grape_select`` ranks such a row last. Never a crash.

Attribute table (keyed by ``row_id``): ``grape_logprob_mean`` (s, null when no
token was scored), ``grape_logprob_sum``, ``grape_n_tokens``, ``grape_truncated``,
``grape_model`` (the target's identity, weights digest included) and
``grape_template`` (the prompt format's label).

Rejected here: ``grape_no_response`` (the conversation does not end with an
assistant turn: nothing to score) and ``grape_prompt_error`` (the chat template
refused the history, e.g. a template that forbids system turns).

Identical (prompt, response) pairs are scored once, so identical candidates of one
instruction always get identical scores and ``grape_select``'s tie-break (first in
corpus order) decides between them, whatever the batching.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field, resource_knob
from thresher.generators.base import ContinuationScore
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import split_response
from thresher.selectors.chunked import call_in_chunks
from thresher.selectors.grape_prompt import (
    DEFAULT_SYSTEM_FORMAT, DEFAULT_TURN_SEPARATOR, check_template_param, check_text_template, resolve_format,
)

DEFAULT_TARGET = "embedded:gemma-3-270m"
REASON_NO_RESPONSE = "grape_no_response"
REASON_PROMPT_ERROR = "grape_prompt_error"

GRAPE_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("grape_logprob_mean", pa.float64()),
    ("grape_logprob_sum", pa.float64()),
    ("grape_n_tokens", pa.int64()),
    ("grape_truncated", pa.bool_()),
    ("grape_model", pa.string()),
    ("grape_template", pa.string()),
])


class GrapeParams(ModelStageParams):
    model: ModelConfig = model_field(DEFAULT_TARGET, "the target: the base model you are about to fine-tune")
    template: str = Field(
        "auto", description="prompt format: auto | chat | plain | a template string with {instruction}")
    turn_separator: str = Field(
        DEFAULT_TURN_SEPARATOR, description="plain/user templates: written after each earlier assistant turn")
    system_format: str = Field(
        DEFAULT_SYSTEM_FORMAT, description="plain/user templates: how a system turn is written ({system})")
    max_tokens: int | None = Field(
        2048, ge=2, description="cap on prompt + response tokens (match SFT's max length); null: the model's context")
    chunk_size: int = resource_knob(
        256, ge=1, description="candidates per backend call (the request cache is written after each)")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template_param(value)

    @field_validator("system_format")
    @classmethod
    def _system_format(cls, value: str) -> str:
        return check_text_template(value, "system")


def score_pairs(
    backend: Any, prompts: Sequence[str], responses: Sequence[str], max_tokens: int | None, chunk_size: int,
) -> list[ContinuationScore]:
    """``backend.continuation_logprobs`` over all pairs: identical pairs once, longest first, in chunks."""
    pairs = list(dict.fromkeys(zip(prompts, responses)))
    longest_first = sorted(pairs, key=lambda pair: -(len(pair[0]) + len(pair[1])))  # stable: ties in order

    def score(chunk: list[tuple[str, str]]) -> list[ContinuationScore]:
        return backend.continuation_logprobs([q for q, _ in chunk], [a for _, a in chunk], max_tokens)

    scores = dict(zip(longest_first, call_in_chunks(longest_first, score, chunk_size,
                                                    progress="grape: scored candidates")))
    return [scores[pair] for pair in zip(prompts, responses)]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class GrapeStage(Stage):
    """Per-shard GRAPE scoring under the target model (see the module docstring)."""

    name = "grape"
    version = "1"
    kind = "shard"
    Params = GrapeParams
    provides = tuple(GRAPE_SCHEMA.names[1:])

    def process(self, rows: pa.Table) -> StageOutput:
        p: GrapeParams = self.params
        backend = p.load()
        fmt = resolve_format(p.template, backend, p.turn_separator, p.system_format)
        row_ids = rows["row_id"].to_pylist()
        kept, prompts, responses, rejected = [], [], [], []
        for rid, messages in zip(row_ids, rows["messages"].to_pylist()):
            split = split_response(messages)
            if split is None:
                rejected.append({"row_id": rid, "reason": REASON_NO_RESPONSE,
                                 "detail": "the conversation does not end with an assistant turn to score"})
                continue
            history, response = split
            try:
                prompt = fmt.render(history)
            except Exception as err:  # a chat template raising on this history (jinja errors vary)
                rejected.append({"row_id": rid, "reason": REASON_PROMPT_ERROR,
                                 "detail": f"the prompt format {fmt.label!r} cannot render this history: {err}"})
                continue
            kept.append(rid)
            prompts.append(prompt)
            responses.append(response)
        scores = score_pairs(backend, prompts, responses, p.max_tokens, p.chunk_size)
        table = pa.table({
            "row_id": pa.array(kept, pa.string()),
            "grape_logprob_mean": pa.array([_finite(s.mean) for s in scores], pa.float64()),
            "grape_logprob_sum": pa.array([s.sum for s in scores], pa.float64()),
            "grape_n_tokens": pa.array([s.n_tokens for s in scores], pa.int64()),
            "grape_truncated": pa.array([bool(s.truncated) for s in scores], pa.bool_()),
            "grape_model": pa.array([backend.identity] * len(kept), pa.string()),
            "grape_template": pa.array([fmt.label] * len(kept), pa.string()),
        }, schema=GRAPE_SCHEMA)
        return StageOutput(attributes=table, rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        """The target, the prompt format and the cap; token figures of the output rows."""
        p: GrapeParams = self.params
        out: dict[str, Any] = {"target": p.model.name, "max_tokens": p.max_tokens}
        if "grape_model" in kept.column_names and kept.num_rows:
            out["target identity"] = ", ".join(sorted({m for m in kept["grape_model"].to_pylist() if m}))
            out["prompt template"] = ", ".join(repr(t) for t in sorted({t for t in kept["grape_template"].to_pylist() if t}))
            n_tokens = np.array([n or 0 for n in kept["grape_n_tokens"].to_pylist()])
            out["output rows truncated at max_tokens"] = int(sum(bool(t) for t in kept["grape_truncated"].to_pylist()))
            out["output rows with no scored token"] = int((n_tokens == 0).sum())
            out["response tokens scored per output row (mean)"] = round(float(n_tokens.mean()), 1)
        return out
