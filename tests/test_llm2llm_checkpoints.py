"""``keep_checkpoints: false``: each iteration's student is deleted once evaluated, and a rerun of
the finished loop still reuses every step (an evaluation is keyed by the checkpoint's train key and
stored apart from it, so nothing is retrained). In-process, one seed, one iteration: the tiny
SmolLM2-architecture student of ``tests/tiny_models.py`` and the real SmolLM2-135M teacher, which
this session already holds: the loop borrows it and leaves it loaded, and releases only the
student it loaded itself."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from thresher.flows.llm2llm import execute_llm2llm
from thresher.generators.base import SamplingParams
from thresher.generators.registry import lifecycle_events
from thresher.llm2llm.check import lineage_problems
from thresher.llm2llm.config import validate_llm2llm_config
from tiny_models import tiny_smollm2


@pytest.mark.slow
def test_without_checkpoints_the_student_is_gone_and_a_rerun_reuses_every_step(tmp_path: Path, shared_data,
                                                                                smollm2_backend):
    config = validate_llm2llm_config({
        "name": "no-checkpoints", "out": str(tmp_path / "out"),
        "seeds": {"inputs": [str(shared_data / "gsm8k" / "train.jsonl")], "limit": 1},
        "student": str(tiny_smollm2(tmp_path / "student-base")),
        "teacher": {"model": "embedded:smollm2-135m-instruct", "max_tokens": 24, "max_retries": 0},
        "iterations": 1, "keep_checkpoints": False,
        "trainer": {"max_steps": 2, "max_length": 192}, "evaluation": {"max_tokens": 4},
    })
    events_before = len(lifecycle_events())
    first = execute_llm2llm(config, show_progress=False)
    released = [e["model"] for e in lifecycle_events()[events_before:] if e["event"] == "release"]
    assert released == [str(tmp_path / "out" / "iterations" / "01" / "student")]  # the student only
    (reply,) = smollm2_backend.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=2))
    assert reply.completions[0].text  # the session's teacher is still loaded and answers
    iteration = tmp_path / "out" / "iterations" / "01"
    assert (iteration / "eval.parquet").is_file() and not (iteration / "student").exists()
    assert not list(iteration.glob(".student.tmp-*"))
    assert {s["step"]: s["status"] for s in first["steps"]} == {"train": "ran", "evaluate": "ran", "augment": "ran"}
    assert pq.read_table(iteration / "eval.parquet").num_rows == 1 and lineage_problems(tmp_path / "out") == []

    again = execute_llm2llm(config, show_progress=False)
    assert {s["step"]: s["status"] for s in again["steps"]} == {"train": "skipped", "evaluate": "reused",
                                                                 "augment": "reused"}
    assert not (iteration / "student").exists() and again["counts"] == first["counts"]
