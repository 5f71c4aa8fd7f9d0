"""Magpie's instruction sampling (``generators/magpie.py``) on the real SmolLM2 (hf backend).

The vllm and openai (llama.cpp server) paths run in tests/test_vllm_backend.py and
tests/test_openai_backend.py, beside their engines.
"""

from __future__ import annotations

import pytest

from thresher.generators.base import Completion
from thresher.generators.magpie import (
    REASON_EMPTY,
    REASON_ROLE_LEAK,
    REASON_TRUNCATED,
    judge,
    sample_instructions,
)
from thresher.generators.magpie_template import pre_query_template

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def test_degenerate_samples_get_a_reason():
    assert judge(Completion(text="  \n"), SPECIALS) == REASON_EMPTY
    assert judge(Completion(text="Write a poem about", finish_reason="length"), SPECIALS) == REASON_TRUNCATED
    assert judge(Completion(text="Hi<|im_start|>assistant"), SPECIALS) == REASON_ROLE_LEAK
    assert judge(Completion(text="assistant: Sure, here is"), SPECIALS) == REASON_ROLE_LEAK
    assert judge(Completion(text="How do I sort a list in Python?"), SPECIALS) is None


@pytest.fixture(scope="module")
def smol():
    from thresher.generators.registry import load_model

    return load_model("embedded:smollm2-135m-instruct", cache=False)


@pytest.mark.slow
def test_instructions_from_the_pre_query_alone_are_seeded_and_single_line(smol):
    pre = pre_query_template(smol.tokenizer)
    first = sample_instructions(smol, pre, 4, 2, seed=11, max_tokens=40)
    assert [s.seed for s in first] == [11, 11, 13, 13] and [s.index for s in first] == [0, 1] * 2
    assert first == sample_instructions(smol, pre, 4, 2, seed=11, max_tokens=40)  # the same run twice
    other = sample_instructions(smol, pre, 2, 2, seed=99, max_tokens=40)
    assert [s.text for s in other] != [s.text for s in first[:2]]
    usable = [s for s in first if s.reason is None]
    assert len(usable) >= 2 and len({s.text for s in usable}) == len(usable)  # distinct draws of one prompt
    assert all("\n" not in s.text and s.text == s.text.strip() for s in first)
    assert all(s.reason in (None, REASON_EMPTY, REASON_TRUNCATED, REASON_ROLE_LEAK) for s in first)


@pytest.mark.slow
def test_source_stage_rows_carry_their_system_prompt_seed_and_origin(smol):
    """The `magpie` stage on one task: a weighted system prompt per call (kept in the row), one seed per
    call from the task's range, every sample a created row (degenerate ones rejected by id), the same twice."""
    import json

    from thresher.flows.stage import SourceTask
    from thresher.generators.magpie_source import MagpieParams, MagpieStage

    stage = MagpieStage(MagpieParams(count=4, n_per_call=2, max_tokens=24, seed=5, request_cache=False,
                                     system_prompts=[{"text": "You are a chef.", "weight": 1},
                                                     {"text": "You are a Python tutor.", "weight": 3}]))
    task = SourceTask(index=1, first=4, count=4)  # this task's rows draw with seeds 9 .. 12
    out = stage.create(task)
    assert len(out.created) == 4 and out.attributes is None and out.replaced == []
    origins = [json.loads(r["origin"]) for r in out.created]
    assert [(o["seed"], o["sample"]) for o in origins] == [(9, 0), (9, 1), (11, 0), (11, 1)]
    assert all(o["stage"] == "magpie" and o["model"] == smol.identity and o["sampling"]["temperature"] == 1.0
               for o in origins)
    for row, origin in zip(out.created, origins):
        system, user = row["messages"]
        assert system == {"role": "system", "content": stage.system_prompt_for(origin["seed"])}
        assert user["role"] == "user" and row["parent_row_id"] is None and row["source"] == "magpie"
    assert {r["row_id"] for r in out.rejected} <= {r["row_id"] for r in out.created}
    assert len({r["row_id"] for r in out.created}) == 4
    assert stage.create(task).created == out.created
    draws = [stage.system_prompt_for(seed) for seed in range(400)]
    assert 0.65 < draws.count("You are a Python tutor.") / 400 < 0.85  # weight 3 of 4


def test_a_hosted_chat_api_cannot_do_magpie():
    from thresher.flows.stage import SourceTask
    from thresher.generators.magpie_source import MagpieParams, MagpieStage

    stage = MagpieStage(MagpieParams(count=1, request_cache=False, model={
        "name": "gpt-4o-mini", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}))
    with pytest.raises(ValueError, match="hosted chat APIs cannot do Magpie"):
        stage.create(SourceTask(index=0, first=0, count=1))
