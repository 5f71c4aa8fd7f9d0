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
3. confidence > eta (0.8): action ``correct`` — a new row is created, the prompt with the
   new response, with the old row as its ``parent_row_id`` and the corrector and its
   sampling as its ``origin``; the old row is *replaced* (it goes to ``OUT/replaced/``).
   Else the row is rejected with reason ``clear_uncorrectable`` (value = the judge's
   confidence; action ``filter``).

Rows are immutable, so a corrected row's ``row_id`` and ``content_id`` are those of its new
content, and every later stage scores the new response. The new row's attributes say what
happened: ``clear_action = correct``, ``clear_original_response`` (the old response),
``clear_correction_confidence``; the rows kept as they are have ``clear_action = keep``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import ModelStageParams, Stage, StageOutput, model_field
from thresher.generators.base import ModelBackend, SamplingParams, restrict_logprobs
from thresher.schemas.model_config import ModelConfig
from thresher.schemas.records import RECORD_SCHEMA, make_created_record
from thresher.selectors.clear import DEFAULT_MODEL
from thresher.selectors.clear_confidence import question_text, split_row, truncate_tokens
from thresher.selectors.clear_filter import confidences, gamma_of, resolve_gamma
from thresher.selectors.clear_prompts import JUDGE_LETTERS, JUDGE_PREFILL, JUDGE_PROMPT, fill
from thresher.selectors.nullable import nullable_floats


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
    version = "2"  # 2: a corrected response is a new row that replaces the old one
    kind = "global"
    Params = ClearCorrectParams
    requires = ("clear_confidence",)
    provides = ("clear_action", "clear_original_response", "clear_correction_confidence", "clear_gamma",
                "clear_judge", "clear_corrector")

    def process(self, rows: pa.Table) -> StageOutput:
        p: ClearCorrectParams = self.params
        conf = confidences(rows)
        gamma = resolve_gamma(conf, p.gamma)
        row_ids = rows["row_id"].to_pylist()
        split = [split_row(m) for m in rows["messages"].to_pylist()]
        n = len(row_ids)
        action = ["keep" if c > gamma else "filter" for c in conf]
        low = [i for i in range(n) if action[i] == "filter" and split[i] is not None]
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
                    action[i] = "correct"
        fixed = [(i, text) for i, text in zip(low, new) if action[i] == "correct"] if low else []
        parents = rows.take(pa.array([i for i, _ in fixed], pa.int64())).select(RECORD_SCHEMA.names).to_pylist()
        sampling = {"temperature": 0.0, "max_tokens": p.max_tokens, "seed": p.seed}
        created = [make_created_record([*split[i][0], {"role": "assistant", "content": text}],
                                       self.origin(corrector_id, sampling, judge=judge_id), parent=parent,
                                       candidate=p.corrector.name)
                   for (i, text), parent in zip(fixed, parents)]
        new_id = {i: r["row_id"] for (i, _), r in zip(fixed, created)}
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
        # attributes of the rows that go on: kept ones under their own id, corrected ones under the new row's
        on = [i for i in range(n) if action[i] != "filter"]
        attributes = pa.table({
            "row_id": pa.array([new_id.get(i, row_ids[i]) for i in on], pa.string()),
            "clear_action": pa.array([action[i] for i in on], pa.string()),
            "clear_original_response": pa.array([split[i][1] if i in new_id else None for i in on], pa.string()),
            "clear_correction_confidence": nullable_floats(judged[on]),
            "clear_gamma": pa.array([gamma] * len(on), pa.float64()),
            "clear_judge": pa.array([judge_id if i in new_id else None for i in on], pa.string()),
            "clear_corrector": pa.array([corrector_id if i in new_id else None for i in on], pa.string()),
        }) if on else None
        return StageOutput(attributes=attributes, rejected=rejected, created=created,
                           replaced=[row_ids[i] for i in new_id])

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        actions = kept["clear_action"].to_pylist() if "clear_action" in kept.column_names else []
        return {"gamma": gamma_of(kept), "eta": self.params.eta,
                "rows kept as is": actions.count("keep"),
                "rows corrected (new rows; the old ones are in replaced/)": actions.count("correct"),
                "rows dropped (uncorrectable)": rejected.num_rows}
