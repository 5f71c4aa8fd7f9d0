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
