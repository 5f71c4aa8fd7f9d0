"""Evaluate a trained student: answer each example's question, grade the answer against its gold.

LLM2LLM (Lee et al. 2024, arXiv:2403.15042) evaluates the student on the seeds to find the ones it
gets wrong; the reference samples (temperature 0.7, top_p 0.9, 100 new tokens) with an evaluation
prompt that differs from its training prompt. Here the student answers through the chat template
it was trained with (the conversation before the gold answer), greedy by default, the reference's
sampling as ``evaluation.mode: sampled``; the same runs on the optional held-out set.

The table it returns (:data:`EVAL_SCHEMA`) has, per example, the student's full answer
(``prediction``), the answers the grader extracted (``predicted_answer`` null when it found none)
and whether they match.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from thresher.generators.base import ModelBackend, SamplingParams
from thresher.llm2llm.config import EvaluationConfig
from thresher.llm2llm.examples import gold_answer, prompt, question
from thresher.llm2llm.graders import Grader

EVAL_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("split", pa.string()),  # "seeds" or "held_out"
    ("question", pa.string()),
    ("prediction", pa.string()),
    ("predicted_answer", pa.string()),
    ("gold_answer", pa.string()),
    ("correct", pa.bool_()),
    ("finish_reason", pa.string()),
])


def sampling(config: EvaluationConfig) -> SamplingParams:
    """Greedy, or the reference's sampling, for ``max_tokens`` new tokens."""
    if config.mode == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=config.max_tokens, seed=config.seed)
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                          seed=config.seed)


def evaluate(backend: ModelBackend, records: Sequence[dict[str, Any]], split: str, grader: Grader,
             config: EvaluationConfig) -> pa.Table:
    """The student's answer to every record, graded (see :data:`EVAL_SCHEMA`)."""
    if not records:
        return EVAL_SCHEMA.empty_table()
    generations = backend.chat([prompt(r) for r in records], sampling(config))
    rows = []
    for record, generation in zip(records, generations):
        completion = generation.completions[0]
        gold = grader.extract_gold(gold_answer(record))
        predicted = grader.extract(completion.text)
        rows.append({
            "row_id": record["row_id"], "split": split, "question": question(record),
            "prediction": completion.text, "predicted_answer": predicted, "gold_answer": gold,
            "correct": predicted is not None and grader.same(predicted, gold),
            "finish_reason": completion.finish_reason,
        })
    return pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)


def accuracy(table: pa.Table) -> float | None:
    """The share of correct answers; None for an empty table."""
    if table.num_rows == 0:
        return None
    return round(sum(table["correct"].to_pylist()) / table.num_rows, 4)
