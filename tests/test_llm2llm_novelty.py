"""LLM2LLM novelty checks (thresher.llm2llm.novelty): near-copies and held-out overlap, with rouge-score."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from thresher.llm2llm.novelty import HeldOutIndex, NoveltyIndex, normalize_question, rouge_l_f1


def _questions(shared_data, split, n):
    with open(shared_data / "gsm8k" / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f))["question"] for _ in range(n)]


def test_rouge_l_is_rouge_scores_own(shared_data):
    qs = _questions(shared_data, "train", 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    idx = NoveltyIndex(qs[:5])
    for q in qs:
        expected = [scorer.score(k, q)["rougeL"].fmeasure for k in qs[:5]]
        score, where = idx.most_similar(q)
        assert score == pytest.approx(max(expected)) and where == expected.index(max(expected))
        assert rouge_l_f1(q, qs[0]) == pytest.approx(expected[0])


def test_near_copies_are_rejected_against_seeds_and_accepted_augmentations(shared_data):
    seeds = _questions(shared_data, "train", 4)
    idx = NoveltyIndex(seeds)
    seed = seeds[0]
    assert not idx.check(seed).ok and idx.check(seed).reason == "near_copy"
    assert idx.check(seed).nearest == 0 and idx.check(seed).score == pytest.approx(1.0)
    # one word changed in a long question: still > 0.95 (a copy); names and numbers changed: novel
    copy = seed.replace("friends", "pals")
    assert rouge_l_f1(copy, seed) > 0.95 and not idx.check(copy).ok
    variant = ("Maria sold clips to 36 of her classmates in June, and then she sold a third as many "
               "clips in July. How many clips did Maria sell altogether in June and July?")
    v = idx.add_if_novel(variant)
    assert v.ok and v.score < 0.95 and len(idx) == 5
    # the accepted augmentation now counts: its near-copy is rejected, pointing at it
    again = idx.add_if_novel(variant.replace("36", "37"))
    assert not again.ok and again.nearest == 4 and len(idx) == 5
    # the threshold is strict (the reference's `> 0.95`) and bounded
    assert NoveltyIndex([seed], threshold=1.0).check(seed).ok
    assert NoveltyIndex().check(seed).ok and NoveltyIndex().check(seed).nearest is None
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        NoveltyIndex(threshold=95)


def test_held_out_overlap(shared_data):
    held = _questions(shared_data, "test", 5)
    idx = HeldOutIndex(held)
    janet = held[0]  # "Janet's ducks lay 16 eggs per day. ..."
    v = idx.check("  " + janet.upper().replace(".", " ") + "  ")
    assert not v.ok and v.reason == "held_out_exact" and v.nearest == 0
    assert normalize_question("It costs $1,200.") == normalize_question("it costs 1200") == "it costs 1200"
    assert normalize_question("16 eggs") != normalize_question("17 eggs")  # numbers are kept
    # the teacher's kind of variant of a held-out question: names and numbers changed
    variant = (janet.replace("Janet", "Maria").replace("16", "20").replace("three", "two")
               .replace("$2", "$3"))
    score = rouge_l_f1(variant, janet)
    assert 0.7 < score < 0.95  # missed by exact match and by the near-copy threshold
    v = idx.check(variant)
    assert not v.ok and v.reason == "held_out_overlap" and v.nearest == 0
    # other GSM8K questions are far from every held-out one
    for q in _questions(shared_data, "train", 10):
        assert idx.check(q).ok, q
