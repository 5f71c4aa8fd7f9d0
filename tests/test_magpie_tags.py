"""Magpie's tags (``generators/magpie_tags.py``): the parse of a tagger's answer, and a real tagger.

Every answer gives a label or a failure reason, never neither: a tagger that answers garbage
gives each row a reason, and nothing crashes.
"""

from __future__ import annotations

import pytest

from thresher.generators.magpie_tags import (
    FAIL_INVALID,
    FAIL_MISSING,
    FAIL_UNPARSABLE,
    TASKS,
    parse_tag,
    tag_instructions,
)


@pytest.mark.parametrize("answer, label, failure", [
    ('\n  "explanation": "clear",\n  "input_quality": "good"\n', "good", None),  # stopped at "}"
    ('"explanation": "x", "input_quality": "  Very   Poor "}', "very poor", None),  # canonical spelling
    ('"explanation": "x", "input_quality": "great"}', None, FAIL_INVALID),
    ('"explanation": "only this"}', None, FAIL_MISSING),
    ("I think this query is good.", None, FAIL_UNPARSABLE),
    ("", None, FAIL_UNPARSABLE),
    ('"input_quality": "good"} trailing words', "good", None),  # cut after the last "}"
    ('"input_quality": "good"} or {"input_quality": "poor"}', None, FAIL_UNPARSABLE),  # two objects
])
def test_input_quality_answers(answer, label, failure):
    result = parse_tag(TASKS["input_quality"], answer)
    assert (result.label, result.failure) == (label, failure) and result.raw == answer


def test_difficulty_and_task_category_answers():
    d = parse_tag(TASKS["difficulty"], '"intent": "a", "knowledge": "b", "difficulty": "Medium"}')
    assert d.label == "medium" and d.fields["intent"] == "a"
    c = parse_tag(TASKS["task_category"], '"primary_tag": "math", "other_tags": ["reasoning"]}')
    assert c.label == "Math" and c.fields["other_tags"] == ["Reasoning"]
    bad = parse_tag(TASKS["task_category"], '"primary_tag": "Math", "other_tags": ["Cooking"]}')
    assert bad.failure == FAIL_INVALID and bad.label is None
    assert parse_tag(TASKS["task_category"], '"primary_tag": "Poetry"}').failure == FAIL_INVALID


@pytest.mark.slow
def test_a_real_small_tagger_gives_a_label_or_a_reason_for_every_row():
    """SmolLM2-135M as the tagger (it mostly echoes the placeholders): difficulty and task_category here,
    input_quality and language through the flow (tests/test_magpie_dedup.py)."""
    from thresher.generators.registry import load_model

    tagger = load_model("embedded:smollm2-135m-instruct", cache=False)
    for task in ("difficulty", "task_category"):
        results = tag_instructions(tagger, task, ["How do I reverse a list in Python?", "asdf qwer zxcv"], max_tokens=64)
        assert len(results) == 2
        for r in results:
            assert (r.label is None) != (r.failure is None)
            assert r.label is None or r.label in TASKS[task].labels
            assert r.failure in (None, FAIL_UNPARSABLE, FAIL_MISSING, FAIL_INVALID)
