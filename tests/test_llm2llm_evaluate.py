"""The student's evaluation (thresher.llm2llm.evaluate) on the real embedded SmolLM2-135M-Instruct:
greedy by default, and the reference's sampled mode (T=0.7, top_p 0.9), seeded."""

from __future__ import annotations

import pytest

from thresher.generators.base import SamplingParams
from thresher.llm2llm.config import EvaluationConfig, ExamplesConfig
from thresher.llm2llm.evaluate import EVAL_SCHEMA, accuracy, evaluate, sampling
from thresher.llm2llm.examples import gold_answer, question, read_examples
from thresher.llm2llm.graders import make_grader


@pytest.mark.slow
def test_greedy_repeats_and_sampled_is_seeded(smollm2_backend, shared_data):
    grader = make_grader("gsm8k")
    examples = ExamplesConfig(inputs=[str(shared_data / "gsm8k" / "test.jsonl")], limit=3)
    records = read_examples(examples, "held_out", grader).records
    greedy = EvaluationConfig(max_tokens=12)

    first = evaluate(smollm2_backend, records, "held_out", grader, greedy)
    assert first.schema == EVAL_SCHEMA and first.num_rows == 3
    assert first.equals(evaluate(smollm2_backend, records, "held_out", grader, greedy))
    for row, record in zip(first.to_pylist(), records):
        assert row["row_id"] == record["row_id"] and row["split"] == "held_out"
        assert row["question"] == question(record) and row["gold_answer"] == grader.extract_gold(gold_answer(record))
        assert row["predicted_answer"] == grader.extract(row["prediction"])
        assert row["correct"] == (row["predicted_answer"] is not None and grader.same(row["predicted_answer"],
                                                                                      row["gold_answer"]))
        assert row["finish_reason"] in {"stop", "length"}
    assert accuracy(first) == round(sum(first["correct"].to_pylist()) / 3, 4)
    assert accuracy(EVAL_SCHEMA.empty_table()) is None and evaluate(smollm2_backend, [], "seeds", grader, greedy).num_rows == 0

    sampled = EvaluationConfig(mode="sampled", max_tokens=12, seed=1)
    assert sampling(sampled) == SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=1)
    assert sampling(greedy).temperature == 0.0
    a = evaluate(smollm2_backend, records, "held_out", grader, sampled)
    assert a.equals(evaluate(smollm2_backend, records, "held_out", grader, sampled))  # same seed, same answers
    other_seed = evaluate(smollm2_backend, records, "held_out", grader, sampled.model_copy(update={"seed": 2}))
    assert a["prediction"].to_pylist() != other_seed["prediction"].to_pylist()
    assert a["prediction"].to_pylist() != first["prediction"].to_pylist()
