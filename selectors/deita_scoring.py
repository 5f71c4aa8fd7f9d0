"""deita's complexity and quality scores: the reference prompts, the score, and its failures.

Liu et al., "What Makes Good Data for Alignment? A Comprehensive Study of Automatic
Data Selection in Instruction Tuning" (ICLR 2024), reference code hkust-nlp/deita
(``src/deita/selection/scorer/{base,llama_scorer}.py``):

- The scorers (``hkust-nlp/deita-complexity-scorer``, ``hkust-nlp/deita-quality-scorer``,
  LLaMA-1-13B fine-tunes) read raw-text prompts, no chat template, exactly
  :data:`COMPLEXITY_TEMPLATE` and :data:`QUALITY_TEMPLATE` (note the double space
  before ``\\n##Complexity`` and the trailing spaces).
- The score is read at the first generated position: the logits of the six tokens
  "1".."6", a softmax over those six only, and ``score = sum_k k * p_k`` in [1, 6].
  The softmax over six logits equals the full-vocabulary log-probabilities
  renormalized over the six (:func:`thresher.generators.base.restrict_logprobs`),
  so one forward pass per batch (``next_token_logprobs``) gives it; the reference
  instead calls ``generate(max_new_tokens=2, output_scores=True)`` once per sample.
  The six token ids are resolved from the scorer's own tokenizer (the reference
  hard-codes LLaMA's and Mistral's ids).
- The reference returns 3.0 on any failure (its issue #36: every score 3.0). Here
  a failure is a value: :class:`Outcome` with ``score = None`` and a reason code
  (:data:`FAILURE_CODES`), which the stages write per row and count.
- Multi-turn (``score_pipeline.py``): each (user, assistant) turn is scored on its
  own, without history; a trailing user turn with no answer is scored with an
  empty response, as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from thresher.generators.base import (
    ModelBackend,
    NotSingleTokenError,
    restrict_logprobs,
)
from thresher.selectors.chunked import call_in_chunks

#: the reference complexity prompt, verbatim (``Llama_Scorer.complexity_template``)
COMPLEXITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
#: the reference quality prompt, verbatim (``Llama_Scorer.quality_template``)
QUALITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
#: the score tokens; the k-th (1-based) is worth k
SCORE_TOKENS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")

TRUNCATED = "truncated"
NOT_SINGLE_TOKEN = "not_single_token"
BACKEND_ERROR = "backend_error"
NON_FINITE = "non_finite"
NO_TURNS = "no_turns"
#: every reason a score can fail
FAILURE_CODES = (TRUNCATED, NOT_SINGLE_TOKEN, BACKEND_ERROR, NON_FINITE, NO_TURNS)


def complexity_prompt(instruction: str) -> str:
    """The complexity scorer's prompt for one instruction (reference ``infer_complexity``)."""
    return COMPLEXITY_TEMPLATE.format(instruction=instruction)


def quality_prompt(instruction: str, output: str) -> str:
    """The quality scorer's prompt for one instruction and response (reference ``infer_quality``)."""
    return QUALITY_TEMPLATE.format(instruction=instruction, output=output)


def conversation_turns(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (instruction, response) turns of a conversation, as deita scores them.

    System messages are not part of any turn. Each user message opens a turn whose
    response is the assistant message right after it, or ``""`` when none follows
    (the reference scores a trailing question with an empty response). An assistant
    message that answers no user message is not scored.
    """
    chat = [m for m in messages if m["role"] != "system"]
    turns: list[tuple[str, str]] = []
    i = 0
    while i < len(chat):
        if chat[i]["role"] != "user":
            i += 1
            continue
        if i + 1 < len(chat) and chat[i + 1]["role"] == "assistant":
            turns.append((chat[i]["content"], chat[i + 1]["content"]))
            i += 2
        else:
            turns.append((chat[i]["content"], ""))
            i += 1
    return turns


def expected_score(logprobs: np.ndarray) -> np.ndarray:
    """``sum_k k * softmax(logits over the score tokens)_k`` per row, k = 1..K.

    ``logprobs`` (N, K) are the score tokens' next-token log-probabilities (any
    normalization: only their differences matter).
    """
    probs = np.exp(restrict_logprobs(np.asarray(logprobs, dtype=np.float64)))
    return probs @ np.arange(1, probs.shape[-1] + 1, dtype=np.float64)


@dataclass(frozen=True)
class Outcome:
    """One prompt's score, or why there is none."""

    score: float | None
    failure: str | None = None  # one of FAILURE_CODES
    detail: str = ""


def backend_context(backend: ModelBackend) -> int | None:
    """The backend's context length in tokens, when it knows one."""
    value = backend.context_length
    return value if isinstance(value, int) and value > 0 else None


class PromptScorer:
    """Scores raw prompts with a deita scorer, batched, every failure named.

    - A prompt that does not fit (its tokens plus the one score token over
      ``min(max_tokens, the backend's context)``) is not sent: ``truncated``. The
      backends would silently keep its last tokens instead.
    - A score token that is not one token in the scorer's tokenizer:
      ``not_single_token`` for every prompt (the backend raises it for all).
    - A batch that raises is retried one prompt at a time; the prompts that still
      raise are ``backend_error`` with the message.
    - Non-finite log-probabilities: ``non_finite``.

    Identical prompts are scored once.
    """

    def __init__(
        self,
        backend: ModelBackend,
        tokens: Sequence[str] = SCORE_TOKENS,
        max_tokens: int | None = None,
        chunk_size: int = 64,
    ) -> None:
        self.backend = backend
        self.tokens = list(tokens)
        context = backend_context(backend)
        caps = [c for c in (max_tokens, context) if c]
        self.cap = min(caps) if caps else None
        self.chunk_size = max(1, chunk_size)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt as the backend encodes it (BOS included)."""
        return self.backend.count_tokens(list(prompts))

    def score(self, prompts: Sequence[str]) -> list[Outcome]:
        """One :class:`Outcome` per prompt, in order."""
        unique = list(dict.fromkeys(prompts))
        found: dict[str, Outcome] = {}
        sendable = unique
        if self.cap is not None and unique:
            sendable = []
            for prompt, n in zip(unique, self.token_counts(unique)):
                if n + 1 > self.cap:
                    found[prompt] = Outcome(None, TRUNCATED, f"the prompt is {n} tokens; with the score token "
                                                             f"that is over the scorer's {self.cap}-token limit")
                else:
                    sendable.append(prompt)
        not_single: list[Outcome] = []  # a score token that is not one token fails every prompt after it

        def score_chunk(chunk: list[str]) -> list[Outcome]:
            if not not_single:
                try:
                    return self._outcomes(self.backend.next_token_logprobs(chunk, self.tokens))
                except NotSingleTokenError as exc:
                    not_single.append(Outcome(None, NOT_SINGLE_TOKEN, str(exc)))
            return not_single * len(chunk)

        found.update(zip(sendable, call_in_chunks(sendable, score_chunk, self.chunk_size, one=self._score_one)))
        return [found[p] for p in prompts]

    def _score_one(self, prompt: str) -> Outcome:
        try:
            return self._outcomes(self.backend.next_token_logprobs([prompt], self.tokens))[0]
        except NotSingleTokenError as exc:
            return Outcome(None, NOT_SINGLE_TOKEN, str(exc))
        except Exception as exc:  # noqa: BLE001 - a backend failure is a counted outcome, not a crash
            return Outcome(None, BACKEND_ERROR, f"{type(exc).__name__}: {str(exc)[:500]}")

    @staticmethod
    def _outcomes(logprobs: np.ndarray) -> list[Outcome]:
        logprobs = np.asarray(logprobs, dtype=np.float64)
        # -inf for some tokens is a probability of 0; NaN, +inf or all -inf leave no distribution
        ok = ~(np.isnan(logprobs).any(axis=1) | np.isposinf(logprobs).any(axis=1) | np.isneginf(logprobs).all(axis=1))
        scores = expected_score(np.where(ok[:, None], logprobs, 0.0))
        return [
            Outcome(float(s)) if good else Outcome(None, NON_FINITE, f"score-token log-probabilities {row.tolist()}")
            for s, good, row in zip(scores, ok, logprobs)
        ]
