"""LLM2LLM graders (thresher.llm2llm.graders): GSM8K on the real test file, edge cases, the others."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from thresher.llm2llm.graders import GRADERS, Grader, GraderError, make_grader, parse_number, register_grader


def _gsm8k_rows(shared_data):
    with open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_gold_is_a_number_on_every_test_row(shared_data):
    g = make_grader("gsm8k")
    rows = _gsm8k_rows(shared_data)
    assert len(rows) == 1319
    negatives = 0
    for row in rows:
        gold = g.extract_gold(row["answer"])
        value = parse_number(gold)
        assert value is not None, row["answer"]
        # the reference answer is right by construction, and only its own #### line counts
        assert g.correct(row["answer"], row["answer"])
        assert g.correct(f"The student says...\n#### {gold}", row["answer"])
        assert not g.correct(f"#### {value + 1}", row["answer"])
        negatives += value < 0
    assert negatives == 2  # '-10' and '-3' in GSM8K test: the sign must survive


def test_gsm8k_edge_cases():
    g = make_grader("gsm8k")
    gold = "She has 2 - 7 = <<2-7=-5>>-5 apples.\n#### -5"
    assert g.correct("so\n#### -5", gold)
    assert not g.correct("so\n#### 5", gold)  # the reference's float(digits-only) says equal
    assert g.correct("#### -$5", gold) and g.correct("#### \u22125", gold)
    assert g.correct("#### 1,234", "#### 1234") and g.correct("#### $1,234.00", "#### 1234")
    assert g.correct("#### 3.50", "#### 3.5") and not g.correct("#### 3.51", "#### 3.5")
    assert g.correct("#### 18 dollars.", "#### 18") and g.correct("#### 18.", "#### 18")
    assert not g.correct("no final answer here, 18", "#### 18")  # no #### at all: wrong
    assert not g.correct("####   \nfoo", "#### 18")  # an empty #### answer is no answer
    assert g.extract("####\n#### 7") is None  # the first #### is the answer, even when empty
    # the first #### answer counts, not a later one; a Markdown heading is not an answer
    assert not g.correct("#### 4\n#### 18", "#### 18")
    assert g.correct("# Solution\n## Step 1\n2 * 9 = 18\n#### 18", "#### 18")
    # numbers joined: the reference reads '3 + 2 = 5' as 325; the first number is taken here
    assert parse_number("3 + 2 = 5") == Decimal(3)
    # not a number on either side: normalized text
    assert g.correct("#### Yes", "#### yes") and not g.correct("#### no", "#### yes")
    with pytest.raises(GraderError, match="no answer in the gold"):
        g.correct("#### 5", "the gold has no final line")


def test_exact_regex_label_graders():
    exact = make_grader({"name": "exact"})
    assert exact.correct("  Paris\n", "paris") and exact.correct("New   York", "new york")
    assert not exact.correct("Paris.", "Paris") and not exact.correct("", "Paris")
    assert not make_grader({"name": "exact", "case_sensitive": True}).correct("paris", "Paris")

    rx = make_grader({"name": "regex", "pattern": r"[Aa]nswer:\s*\(?([A-D])\)?"})
    assert rx.correct("I think... Answer: (B) because", "Answer: B")
    assert not rx.correct("Answer: C", "Answer: B") and not rx.correct("B", "Answer: B")
    with pytest.raises(GraderError, match="exactly one capturing group"):
        make_grader({"name": "regex", "pattern": r"(a)(b)"})
    with pytest.raises(GraderError, match="not a regular expression"):
        make_grader({"name": "regex", "pattern": r"(a"})
    with pytest.raises(GraderError, match="no answer in the gold"):
        rx.correct("Answer: B", "B")

    lab = make_grader({"name": "label", "labels": ["positive", "negative", "very negative"]})
    assert lab.correct("Sentiment: Positive. Not negative at all.", "positive")  # the earliest label
    assert lab.extract("it is very negative") == "very negative"  # the longer label at one place
    assert lab.extract("unpositive") is None  # whole words only
    assert not lab.correct("negative", "positive") and not lab.correct("no idea", "positive")
    with pytest.raises(GraderError, match="gold label 'neutral' is not one of"):
        lab.correct("positive", "neutral")
    with pytest.raises(GraderError, match="non-empty list"):
        make_grader({"name": "label", "labels": []})


def test_registry_and_a_user_grader():
    assert {"gsm8k", "exact", "regex", "label"} <= set(GRADERS)
    with pytest.raises(GraderError, match="unknown grader 'nope'; known:"):
        make_grader("nope")
    with pytest.raises(GraderError, match="bad options"):
        make_grader({"name": "exact", "typo": 1})

    @register_grader("test-last-word")
    class LastWord(Grader):
        def extract(self, text):
            words = text.split()
            return words[-1] if words else None

        def same(self, prediction, gold):
            return prediction == gold

    try:
        g = make_grader("test-last-word")
        assert g.correct("the answer is 42", "42") and not g.correct("42 is it", "42")
        assert g.params() == {"name": "test-last-word"}
    finally:
        GRADERS.pop("test-last-word")
