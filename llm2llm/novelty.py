"""Reject a teacher's augmentation that copies a seed, an earlier augmentation, or a held-out question.

**Near-copies** (LLM2LLM, Lee et al. 2024, arXiv:2403.15042; SqueezeAILab/LLM2LLM
``GSM8K/generate_data.py``): a new question is dropped when its ROUGE-L F1 against any seed
question or any question generated so far is **> 0.95**; the reference scores with Google's
``rouge_score`` (``RougeScorer(["rougeL"], use_stemmer=False)``, its default tokenizer: lower
case, non-alphanumerics to spaces, digits kept), and so does :class:`NoveltyIndex`: the same
library, tokenizer and strict ``>``. Questions are tokenized once when added, and each check
scores the new question's tokens against every kept one with ``rouge_scorer._score_lcs``, the
very function ``RougeScorer.score`` calls (the reference does the same;
``tests/test_llm2llm_novelty.py`` checks it equals ``RougeScorer.score``).

Why ``rouge-score``: Google's reference implementation of ROUGE, what the LLM2LLM reference and
Stanford Alpaca's self-instruct code use, pure Python, with no dependency on torch or
transformers (``pip install --dry-run rouge-score`` adds absl-py, nltk, defusedxml only).

**Held-out overlap** (not in the reference, which never evaluates on data the teacher might
copy): :class:`HeldOutIndex` rejects an augmentation whose question

- equals a held-out question after normalization (:func:`normalize_question`: case folded,
  punctuation dropped, whitespace collapsed, **numbers kept**, since math variants differ by
  their numbers), or
- has ROUGE-L F1 **> 0.7** against one (``threshold``), the same scorer as above.

The 0.7 is set between what is unrelated and what is a variant: on GSM8K, the nearest of 1,500
train questions to each of 40 test questions scores 0.20-0.47 (seeded sample, rouge-score
0.1.2), while a test question with its names and a few numbers changed (what the teacher is
asked to do) scores well above 0.7 (0.92 for the first GSM8K test question with its name and
three numbers changed, ``tests/test_llm2llm_novelty.py``), and would be a leaked test item. Exact matching alone would
miss those; ROUGE-L alone at 0.95 would too.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Iterable, Sequence

from rouge_score import rouge_scorer, tokenizers

NEAR_COPY_THRESHOLD = 0.95  # the reference's rouge_score_threshold
HELD_OUT_THRESHOLD = 0.7


def _tokenizer() -> tokenizers.DefaultTokenizer:
    # RougeScorer(["rougeL"], use_stemmer=False)'s own tokenizer
    return tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric), as ``RougeScorer(["rougeL"]).score`` computes it."""
    tok = _tokenizer()
    return rouge_scorer._score_lcs(tok.tokenize(a), tok.tokenize(b)).fmeasure


@dataclass(frozen=True)
class Verdict:
    """Whether a question passed, and its most similar kept text."""

    ok: bool
    score: float  # the highest ROUGE-L F1 against the index (0.0 when empty)
    nearest: int | None  # index of the most similar text in the order added
    reason: str | None = None  # "near_copy", "held_out_exact", "held_out_overlap"


class NoveltyIndex:
    """Texts kept so far (seeds, accepted augmentations); a new one must not be a near-copy of any.

    ``check`` scores without adding; ``add_if_novel`` adds only a novel text, so two
    near-identical augmentations in one batch cannot both pass.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = NEAR_COPY_THRESHOLD):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a ROUGE-L F1 threshold is in [0, 1], got {threshold}")
        self.threshold = threshold
        self._tok = _tokenizer()
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._tokens.append(self._tok.tokenize(text))

    def most_similar(self, text: str) -> tuple[float, int | None]:
        """``(highest ROUGE-L F1, its index)`` against every kept text; ``(0.0, None)`` when empty."""
        tokens = self._tok.tokenize(text)
        best, where = 0.0, None
        for i, kept in enumerate(self._tokens):
            f = rouge_scorer._score_lcs(tokens, kept).fmeasure
            if where is None or f > best:
                best, where = f, i
        return best, where

    def check(self, text: str) -> Verdict:
        score, where = self.most_similar(text)
        if where is not None and score > self.threshold:
            return Verdict(False, score, where, "near_copy")
        return Verdict(True, score, where)

    def add_if_novel(self, text: str) -> Verdict:
        verdict = self.check(text)
        if verdict.ok:
            self.add(text)
        return verdict


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d]")


def normalize_question(text: str) -> str:
    """Case folded, punctuation removed (``1,200`` -> ``1200``), whitespace collapsed; numbers kept."""
    return " ".join(_PUNCT.sub("", text.casefold()).split())


class HeldOutIndex:
    """Held-out questions an augmentation must not reproduce: exact (normalized) or ROUGE-L > ``threshold``."""

    def __init__(self, questions: Sequence[str], threshold: float = HELD_OUT_THRESHOLD):
        self.questions = list(questions)
        self._exact = {normalize_question(q): i for i, q in enumerate(questions)}
        self._rouge = NoveltyIndex(questions, threshold=threshold)
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self._rouge)

    def check(self, question: str) -> Verdict:
        hit = self._exact.get(normalize_question(question))
        if hit is not None:
            return Verdict(False, 1.0, hit, "held_out_exact")
        v = self._rouge.check(question)
        return v if v.ok else Verdict(False, v.score, v.nearest, "held_out_overlap")
