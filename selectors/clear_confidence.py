"""BSDetector confidence (arXiv 2308.16175), the score CLEAR (arXiv 2403.12776) curates with.

For a prompt x and its response y:

- **Observed consistency** O (Sec. 3.1): sample k answers y_1..y_k to x
  (temperature 1.0, one batched call with ``n=k``); for each
  ``o_i = alpha * sim(y, y_i) + (1 - alpha) * [y_i == y]`` with ``alpha = 0.8``
  (``sim``: see :mod:`thresher.selectors.clear_similarity`; ``==`` after
  :func:`normalize_answer`); ``O = mean_i o_i``.
- **Self-reflection** S (Sec. 3.2): the model rates y as (A) correct, (B) incorrect,
  (C) not sure; ``S = P(A) + 0.5 P(C)`` with the letter probabilities read from the
  next-token distribution and renormalized over the three letters, averaged over
  two prompts (:data:`~thresher.selectors.clear_prompts.REFLECTION_PROMPTS`).
- **Confidence** ``C = beta * O + (1 - beta) * S`` with ``beta = 0.7``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from thresher.generators.base import Message, ModelBackend, SamplingParams, restrict_logprobs
from thresher.schemas.records import split_response
from thresher.selectors.clear_prompts import (
    REFLECTION_LETTERS,
    REFLECTION_PREFILL,
    REFLECTION_VALUES,
    fill,
)

_PUNCT_OR_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalize_answer(text: str) -> str:
    """For BSDetector's exact-match term: NFKC, case-folded, punctuation and spaces folded."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_OR_SPACE.sub(" ", text).strip()


def split_row(messages: Sequence[Message]) -> tuple[list[Message], str] | None:
    """(prompt turns, final assistant response), or None when the row has no response, or no prompt, to score."""
    split = split_response(messages)
    if split is None or not split[0]:
        return None
    return [dict(m) for m in split[0]], split[1]


def question_text(prompt: Sequence[Message]) -> str:
    """The prompt as one question: the user's text, or ``role: text`` lines for several turns."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ------------------------------------------------------------------ observed consistency


def sample_answers(
    backend: ModelBackend, prompts: Sequence[Sequence[Message]], params: SamplingParams
) -> list[list[str]]:
    """``params.n`` sampled answers per prompt, all from one batched ``chat`` call.

    Equal prompts (several candidate responses to one instruction) are sampled once
    and share their samples, as BSDetector's samples depend on the prompt only.
    """
    keys = [json.dumps(list(p), sort_keys=True, ensure_ascii=False) for p in prompts]
    unique = list(dict.fromkeys(keys))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    texts = [g.texts for g in backend.chat([list(prompts[first[k]]) for k in unique], params)] if unique else []
    by_key = dict(zip(unique, texts))
    return [list(by_key[k]) for k in keys]


def truncate_tokens(backend: ModelBackend, text: str, max_tokens: int | None) -> str:
    """The first ``max_tokens`` tokens of ``text`` (all of it when None or short enough)."""
    if max_tokens is None:
        return text
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return backend.tokenizer.decode(ids[:max_tokens]) + " ..."


def observed_consistency(
    responses: Sequence[str], samples: Sequence[Sequence[str]], similarity, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(O per row, o_i per row and sample) from the given responses and their samples."""
    k = max((len(s) for s in samples), default=0)
    if any(len(s) != k for s in samples):
        raise ValueError("every row needs the same number of samples")
    flat_resp = [r for r, s in zip(responses, samples) for _ in s]
    flat_samp = [y for s in samples for y in s]
    sim = similarity.scores(flat_resp, flat_samp).reshape(len(responses), k)
    match = np.array([[normalize_answer(y) == normalize_answer(r) for y in s]
                      for r, s in zip(responses, samples)], dtype=np.float64).reshape(len(responses), k)
    per_sample = alpha * sim + (1.0 - alpha) * match
    return per_sample.mean(axis=1) if k else np.zeros(len(responses)), per_sample


# ------------------------------------------------------------------ self-reflection


def reflection_prompts(
    backend: ModelBackend, question: str, answer: str, templates: Sequence[str]
) -> list[str]:
    """One rendered chat prompt per template, ending where the letter is to be written."""
    return [
        backend.apply_chat_template([{"role": "user", "content": fill(t, question=question, answer=answer)}])
        + REFLECTION_PREFILL
        for t in templates
    ]


def self_reflection(
    backend: ModelBackend,
    questions: Sequence[str],
    answers: Sequence[str],
    templates: Sequence[str],
    max_answer_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(S per row, letter probabilities of shape [rows, templates, 3]) in one batched call.

    ``max_answer_tokens`` shows the model only the start of long answers (a CPU-cost
    knob; BSDetector shows the whole answer).
    """
    prompts = [p for q, a in zip(questions, answers)
               for p in reflection_prompts(backend, q, truncate_tokens(backend, a, max_answer_tokens), templates)]
    if not prompts:
        return np.zeros(0), np.zeros((0, len(templates), len(REFLECTION_LETTERS)))
    logprobs = backend.next_token_logprobs(prompts, list(REFLECTION_LETTERS))
    probs = np.exp(restrict_logprobs(logprobs)).reshape(len(questions), len(templates), len(REFLECTION_LETTERS))
    scores = probs @ np.asarray(REFLECTION_VALUES)
    return scores.mean(axis=1), probs


# ------------------------------------------------------------------ confidence


@dataclass
class Confidence:
    """BSDetector's components for a batch of rows."""

    consistency: np.ndarray
    reflection: np.ndarray
    confidence: np.ndarray
    samples: list[list[str]]
    reflection_probs: np.ndarray


def combine(consistency: np.ndarray, reflection: np.ndarray, beta: float) -> np.ndarray:
    """``C = beta * O + (1 - beta) * S``."""
    return beta * np.asarray(consistency) + (1.0 - beta) * np.asarray(reflection)


def bsdetector_confidence(
    backend: ModelBackend,
    similarity,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    sampling: SamplingParams,
    templates: Sequence[str],
    alpha: float,
    beta: float,
    max_answer_tokens: int | None = None,
) -> Confidence:
    """BSDetector's confidence of every (prompt, response) pair."""
    samples = sample_answers(backend, prompts, sampling)
    consistency, _ = observed_consistency(responses, samples, similarity, alpha)
    reflection, probs = self_reflection(backend, [question_text(p) for p in prompts], responses, templates,
                                        max_answer_tokens)
    return Confidence(consistency, reflection, combine(consistency, reflection, beta), samples, probs)
