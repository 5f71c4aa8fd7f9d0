"""LLM2LLM teacher prompt and parser (thresher.llm2llm.teacher_prompt, thresher.llm2llm.parse)."""

from __future__ import annotations

import pytest

from thresher.generators.base import SamplingParams
from thresher.llm2llm.graders import make_grader
from thresher.llm2llm.parse import REASONS, TeacherItem, parse_teacher_output
from thresher.llm2llm.teacher_prompt import EXAMPLE_ANSWER, EXAMPLE_RESPONSE, teacher_messages

SEED_Q = "Tom has 5 apples and buys 3 bags of 4 apples. How many apples does he have?"
SEED_A = "He buys 3 * 4 = <<3*4=12>>12 apples.\nHe has 5 + 12 = <<5+12=17>>17 apples.\n#### 17"


def test_teacher_messages_follow_the_reference_structure():
    msgs = teacher_messages(SEED_Q, SEED_A, m=3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    system = msgs[0]["content"]
    for rule in ("English", "under 100 words", "number", "calculation", "change the names and the numbers",
                 "1. Question: [QUESTION]\nAnswer: [CALCULATION]\n#### [ANSWER]"):
        assert rule in system, rule
    assert EXAMPLE_ANSWER in msgs[1]["content"] and "1 similar question," in msgs[1]["content"]
    last = msgs[3]["content"]
    assert SEED_Q in last and SEED_A in last and "3 similar questions" in last
    assert "student answered" not in last  # the reference never shows the wrong answer
    assert "#### 12" in teacher_messages(SEED_Q, SEED_A, student_answer="#### 12")[3]["content"]
    # the one-shot answer is itself well formed, and right
    (item,) = parse_teacher_output(EXAMPLE_RESPONSE).items
    assert item.final_answer == "27" and make_grader("gsm8k").correct(item.answer, "#### 27")
    with pytest.raises(ValueError, match="at least 1"):
        teacher_messages(SEED_Q, SEED_A, m=0)


GOOD = """Sure! Here are 2 similar questions:

1. Question: Ana has 7 pears and buys 2 boxes of 6 pears. How many pears does she have?
Answer: She buys 2 * 6 = 12 pears. She has 7 + 12 = 19 pears.
#### 19
Hope this helps.

2. **Question:** A shop had $1,200 and spent $1,450. What is its balance?
**Answer:** 1,200 - 1,450 = -250
#### -250
"""


def test_parse_well_formed_reply():
    res = parse_teacher_output(GOOD, max_items=2)
    assert res.failures == [] and res.preamble == "Sure! Here are 2 similar questions:"
    a, b = res.items
    assert a == TeacherItem(0, "Ana has 7 pears and buys 2 boxes of 6 pears. How many pears does she have?",
                            "She buys 2 * 6 = 12 pears. She has 7 + 12 = 19 pears.\n#### 19", "19")
    assert b.final_answer == "-250" and b.question.startswith("A shop had $1,200")
    assert a.messages() == [{"role": "user", "content": a.question}, {"role": "assistant", "content": a.answer}]


def test_every_failure_reason_is_data_never_an_exception():
    item = "Question: Q{i}?\nAnswer: 1 + 1 = 2\n#### 2\n"
    cases = {
        "empty": ("  \n", "stop"),
        "unparseable": ("I cannot help with that. Answer: 2\n#### 2", "stop"),
        "truncated": ("1. " + item.format(i=1) + "2. Question: Q2?\nAnswer: 3 +", "length"),
        "empty_question": ("1. Question: \nAnswer: 2\n#### 2", "stop"),
        "no_answer": ("1. Question: Q?\n2 + 2 = 4\n#### 4", "stop"),
        "multiple_answers": ("1. Question: Q?\nAnswer: 4\nAnswer: 5\n#### 5", "stop"),
        "no_final_answer": ("1. Question: Q?\nAnswer: 2 + 2 = 4", "stop"),
        "multiple_final_answers": ("1. Question: Q?\nAnswer: 4\n#### 4\n#### 5", "stop"),
        "non_numeric_answer": ("1. Question: Q?\nAnswer: it is blue\n#### blue", "stop"),
        "extra": ("1. " + item.format(i=1) + "2. " + item.format(i=2), "stop"),
    }
    assert set(cases) == set(REASONS)
    for reason, (text, finish) in cases.items():
        res = parse_teacher_output(text, finish_reason=finish, max_items=1)
        assert reason in res.reasons, (reason, res)
        for f in res.failures:
            assert f.reason in REASONS and f.detail
    # truncation drops only the last item: the first one survives
    res = parse_teacher_output(cases["truncated"][0], finish_reason="length")
    assert [i.question for i in res.items] == ["Q1?"] and res.reasons == ["truncated"]
    # a last item whose '####' line ended before the limit is whole: kept (the reference drops it)
    res = parse_teacher_output("1. Question: Q1?\nAnswer: 2 + 2 = 4\n#### 4\nPlease write 1 more", "length")
    assert [i.final_answer for i in res.items] == ["4"] and res.reasons == []
    # an empty final line is no final answer; a non-numeric one passes when numbers are not required
    assert parse_teacher_output("1. Question: Q?\nAnswer: x\n####\n7").reasons == ["no_final_answer"]
    assert parse_teacher_output(cases["non_numeric_answer"][0], require_number=False).items[0].final_answer == "blue"
    assert parse_teacher_output(None).reasons == ["empty"]  # a backend that returned nothing


def test_real_teacher_reply_parses_to_items_or_reasons(smollm2_backend):
    """One short sampled reply of the embedded SmolLM2 to the real prompt: items or typed reasons."""
    msgs = teacher_messages(SEED_Q, SEED_A, m=1)
    (gen,) = smollm2_backend.chat([msgs], SamplingParams(temperature=1.0, max_tokens=24, seed=1))
    (completion,) = gen.completions
    res = parse_teacher_output(completion.text, finish_reason=completion.finish_reason, max_items=1)
    assert res.items or res.failures
    assert all(f.reason in REASONS for f in res.failures)
    for item in res.items:
        assert item.question and "#### " in item.answer
