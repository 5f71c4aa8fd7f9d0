"""Magpie's tags (``generators/magpie_tags.py``): the parse of a tagger's answer.

Every answer gives a label or a failure reason, never neither. A real (garbage-answering) tagger
and lingua run in tests/test_magpie_dedup.py, through the ``magpie_tag`` stage.
"""

from __future__ import annotations

import pytest

from thresher.generators.magpie_tags import (
    FAIL_INVALID,
    FAIL_MISSING,
    FAIL_UNPARSABLE,
    TASKS,
    parse_tag,
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
