"""CLEAR's Auto-Correct (arXiv 2403.12776, Sec. 3.2), a global stage used instead of ``clear_filter``.

Rows with ``clear_confidence > gamma`` are kept as they are (action ``keep``). For
each other row:

1. the *corrector* (in the paper, the model fine-tuned on the kept rows; default the
   embedded chat model) writes a new response to the prompt (greedy, one batched call);
2. the *judge* (the base model, LLM-as-judge with confidence) compares the original
   and the new response. Its confidence that the new one is better is the
   probability of that response's letter in the next-token distribution,
   renormalized over ``A``/``B``; it is averaged over both presentation orders to
   cancel the judge's position bias (a choice made here; the paper does not say);
3. confidence > eta (0.8): action ``correct`` — the new response goes to
   ``clear_corrected_response`` and the original to ``clear_original_response``;
   else the row is rejected with reason ``clear_uncorrectable`` (value = the judge's
   confidence; action ``filter``).

Stages never rewrite rows: the writer swaps ``clear_corrected_response`` into the
final assistant turn of ``messages`` for rows whose ``clear_action == "correct"``,
with :func:`apply_corrections` (one call on the joined output table, through
:meth:`Stage.finalize_output`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field
from thresher.generators.base import ModelBackend, SamplingParams, restrict_logprobs
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import MESSAGES_TYPE, split_response
from thresher.selectors.clear import DEFAULT_MODEL
from thresher.selectors.clear_confidence import question_text, split_row, truncate_tokens
from thresher.selectors.clear_filter import confidences, gamma_of, resolve_gamma
from thresher.selectors.clear_prompts import JUDGE_LETTERS, JUDGE_PREFILL, JUDGE_PROMPT, fill
from thresher.selectors.nullable import nullable_floats


def apply_corrections(rows: pa.Table) -> pa.Table:
    """``rows`` with the final assistant turn of every corrected row replaced by its new response.

    For the output writer: rows whose ``clear_action`` is ``correct`` get
    ``clear_corrected_response`` as their last message's content; every other row,
    and a table without ``clear_action``, is returned as is. ``row_id`` and
    ``content_id`` stay those of the input row (provenance); the original response
    stays in ``clear_original_response``.
    """
    if "clear_action" not in rows.column_names or "messages" not in rows.column_names:
        return rows
    actions = rows["clear_action"].to_pylist()
    if "correct" not in actions:
        return rows
    messages = rows["messages"].to_pylist()
    for i, (action, new) in enumerate(zip(actions, rows["clear_corrected_response"].to_pylist())):
        if action == "correct" and new is not None:
            history, _ = split_response(messages[i])  # a corrected row always ends with its response
            messages[i] = [*history, {"role": "assistant", "content": new}]
    index = rows.column_names.index("messages")
    return rows.set_column(index, "messages", pa.array(messages, type=MESSAGES_TYPE))


def judge_prompts(judge: ModelBackend, question: str, first: str, second: str) -> str:
    """The judge's chat prompt for one ordering, ending where the letter is written."""
    text = fill(JUDGE_PROMPT, question=question, first=first, second=second)
    return judge.apply_chat_template([{"role": "user", "content": text}]) + JUDGE_PREFILL


def judge_new_better(
    judge: ModelBackend, questions: list[str], originals: list[str], candidates: list[str],
    max_answer_tokens: int | None = None,
) -> np.ndarray:
    """P(new response is better), averaged over both orders, one batched call."""
    if not questions:
        return np.zeros(0)
    cut = lambda t: truncate_tokens(judge, t, max_answer_tokens)  # noqa: E731
    prompts = []
    for q, old, new in zip(questions, originals, candidates):
        prompts.append(judge_prompts(judge, q, cut(old), cut(new)))  # new is (B)
        prompts.append(judge_prompts(judge, q, cut(new), cut(old)))  # new is (A)
    probs = np.exp(restrict_logprobs(judge.next_token_logprobs(prompts, list(JUDGE_LETTERS))))
    probs = probs.reshape(len(questions), 2, 2)
    return (probs[:, 0, 1] + probs[:, 1, 0]) / 2.0


class ClearCorrectParams(ModelStageParams):
    model: ModelConfig = model_field(DEFAULT_MODEL, "the judge (the base model in the paper)")
    corrector: ModelConfig = model_field(DEFAULT_MODEL, "writes new responses (the fine-tuned model in the paper)")
    gamma: float | Literal["median"] = Field("median", description="rows with confidence > gamma are kept as is")
    eta: float = Field(0.8, ge=0, le=1, description="replace when the judge's confidence exceeds eta")
    max_tokens: int = Field(256, ge=1, description="tokens of a new response")
    seed: int = 0
    max_answer_tokens: int | None = Field(512, ge=1, description="the judge sees this many tokens of each response")


class ClearCorrectStage(Stage):
    """CLEAR Auto-Correct: keep confident rows, replace or drop the others."""

    name = "clear_correct"
    version = "1"
    kind = "global"
    Params = ClearCorrectParams
    requires = ("clear_confidence",)
    provides = ("clear_action", "clear_corrected_response", "clear_original_response",
                "clear_correction_confidence", "clear_gamma", "clear_judge", "clear_corrector")

    def process(self, rows: pa.Table) -> StageOutput:
        p: ClearCorrectParams = self.params
        conf = confidences(rows)
        gamma = resolve_gamma(conf, p.gamma)
        row_ids = rows["row_id"].to_pylist()
        split = [split_row(m) for m in rows["messages"].to_pylist()]
        n = len(row_ids)
        action = ["keep" if c > gamma else "filter" for c in conf]
        low = [i for i in range(n) if action[i] == "filter" and split[i] is not None]
        corrected: list[str | None] = [None] * n
        original: list[str | None] = [None] * n
        judged = np.full(n, np.nan)
        judge_id = corrector_id = None
        if low:
            judge = p.load()
            corrector = p.load(p.corrector)
            judge_id, corrector_id = judge.identity, corrector.identity
            gens = corrector.chat([split[i][0] for i in low],
                                  SamplingParams(n=1, temperature=0.0, max_tokens=p.max_tokens, seed=p.seed))
            new = [g.texts[0].strip() for g in gens]
            judged[low] = judge_new_better(judge, [question_text(split[i][0]) for i in low],
                                           [split[i][1] for i in low], new, p.max_answer_tokens)
            for i, text in zip(low, new):
                if judged[i] > p.eta and text:
                    action[i], corrected[i], original[i] = "correct", text, split[i][1]
        rejected = []
        for i in range(n):
            if action[i] != "filter":
                continue
            if np.isnan(conf[i]) or split[i] is None:
                detail, value = "not scored (no assistant response)", None
            else:
                detail = (f"confidence {conf[i]:.4f} <= gamma {gamma:.4f}; judge prefers the new "
                          f"response with {judged[i]:.3f} <= eta {p.eta}")
                value = float(judged[i])
            rejected.append({"row_id": row_ids[i], "reason": "clear_uncorrectable", "detail": detail, "value": value})
        attributes = pa.table({
            "row_id": pa.array(row_ids, pa.string()),
            "clear_action": pa.array(action, pa.string()),
            "clear_corrected_response": pa.array(corrected, pa.string()),
            "clear_original_response": pa.array(original, pa.string()),
            "clear_correction_confidence": nullable_floats(judged),
            "clear_gamma": pa.array([gamma] * n, pa.float64()),
            "clear_judge": pa.array([judge_id if not np.isnan(v) else None for v in judged], pa.string()),
            "clear_corrector": pa.array([corrector_id if not np.isnan(v) else None for v in judged], pa.string()),
        })
        return StageOutput(attributes=attributes, rejected=rejected)

    def finalize_output(self, kept: pa.Table) -> pa.Table:
        return apply_corrections(kept)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        actions = kept["clear_action"].to_pylist() if "clear_action" in kept.column_names else []
        return {"gamma": gamma_of(kept), "eta": self.params.eta,
                "rows kept as is": actions.count("keep"), "rows corrected": actions.count("correct"),
                "rows dropped (uncorrectable)": rejected.num_rows}
