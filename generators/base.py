"""The one small interface every model backend implements.

Selectors and generators call models only through :class:`ModelBackend`, so the
same stage runs on the ``hf`` (transformers), ``openai`` (any OpenAI-compatible
server) and ``vllm`` (in-process engine) backends. Every method takes a batch.

What each method is for:

- :meth:`ModelBackend.generate` — raw prompts, no template (Magpie's pre-query
  prompts, deita-style raw prompts).
- :meth:`ModelBackend.chat` — chat messages through the model's chat template.
- :meth:`ModelBackend.continuation_logprobs` — per-token log-probabilities of
  given continuations, prompt tokens excluded (GRAPE).
- :meth:`ModelBackend.next_token_logprobs` — the next-token log-probabilities of a
  given set of single-token strings ("1".."6" for deita, "A","B","C" for CLEAR's
  self-reflection).
- top-k log-probs per generated position — ``SamplingParams.top_logprobs`` (KD), as
  :class:`TopK` arrays.
- :meth:`ModelBackend.continuation_topk` — the top-k log-probs at every token of
  given continuations, teacher-forced (KD labelling of existing responses).
- :meth:`ModelBackend.embed` — sentence embeddings, or a causal LM's last-layer
  hidden state at the last token (deita's representation).

What stages may ask a backend about its model, and nothing else:
:attr:`ModelBackend.identity` (enters cache keys), :attr:`ModelBackend.kind`
(``"causal-lm"`` or ``"embedding"``), :attr:`ModelBackend.context_length`,
:meth:`ModelBackend.count_tokens`, :attr:`ModelBackend.tokenizer`, and
:meth:`ModelBackend.close` to release the model's memory and connections.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

Message = dict[str, str]  # {"role": ..., "content": ...}

#: ``"causal-lm"``: generates and scores, ``embed`` is its last-token hidden state;
#: ``"embedding"``: a sentence-embedding model, ``embed`` only
BackendKind = Literal["causal-lm", "embedding"]


class ModelError(RuntimeError):
    """A model call failed permanently (bad request, missing model, not a single token...)."""


class NotSingleTokenError(ModelError):
    """A string asked for in :meth:`ModelBackend.next_token_logprobs` is not one token."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters shared by every backend.

    ``temperature == 0`` means greedy decoding. ``seed`` makes sampling
    reproducible: the same seed, prompt and parameters give the same samples.
    ``top_logprobs`` (k) asks for the top-k (token_id, logprob) pairs at every
    generated position (logit-level KD).
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = 0
    top_logprobs: int | None = None

    def cache_fields(self) -> dict[str, Any]:
        """The fields that change results (all of them): used in request-cache keys."""
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "seed": self.seed,
            "top_logprobs": self.top_logprobs,
        }


@dataclass(eq=False)
class TopK:
    """The k most likely tokens at each of T positions, as two ``(T, k)`` arrays.

    ``ids`` (int32) and ``logprobs`` (float32), most likely first (ties by id). A
    position where a server returned fewer than k entries is padded with id -1 and
    log-prob -inf. Arrays rather than Python pairs: 100k rows x 512 tokens x k=20
    would be a billion tuples. ``top[t]`` gives position t as ``[(id, logprob), ...]``
    without the padding, for reading and tests.
    """

    ids: np.ndarray
    logprobs: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.ids.ndim != 2 or self.ids.shape != self.logprobs.shape:
            raise ValueError(f"TopK needs two (T, k) arrays, got {self.ids.shape} and {self.logprobs.shape}")

    @classmethod
    def empty(cls, k: int) -> "TopK":
        return cls(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))

    @classmethod
    def from_pairs(cls, positions: Sequence[Sequence[tuple[int, float]]], k: int) -> "TopK":
        """From per-position ``(id, logprob)`` lists: sorted, cut to k, padded to k."""
        ids = np.full((len(positions), k), -1, np.int32)
        lps = np.full((len(positions), k), -np.inf, np.float32)
        for t, pairs in enumerate(positions):
            best = sorted(((int(i), float(lp)) for i, lp in pairs), key=lambda p: (-p[1], p[0]))[:k]
            if best:
                ids[t, :len(best)] = [i for i, _ in best]
                lps[t, :len(best)] = [lp for _, lp in best]
        return cls(ids, lps)

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, t: int) -> list[tuple[int, float]]:
        return [(int(i), float(lp)) for i, lp in zip(self.ids[t], self.logprobs[t]) if i >= 0]

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TopK) and np.array_equal(self.ids, other.ids)
                and np.array_equal(self.logprobs, other.logprobs))

    def copy(self) -> "TopK":
        return TopK(self.ids.copy(), self.logprobs.copy())


@dataclass
class Completion:
    """One sampled continuation."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" or "length"
    #: the top-k at each generated position (one row per token id), when asked for
    top_logprobs: TopK | None = None


@dataclass
class Generation:
    """The ``n`` completions of one prompt."""

    prompt: str
    completions: list[Completion]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass
class ContinuationScore:
    """Log-probabilities of a given continuation's tokens, prompt excluded.

    ``truncated`` is true when prompt + continuation did not fit the model's
    context (or the caller's cap) and the continuation was cut from the right;
    the scores then cover the kept tokens only.
    """

    token_ids: list[int]
    token_logprobs: list[float]
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def sum(self) -> float:
        return float(math.fsum(self.token_logprobs))

    @property
    def mean(self) -> float:
        return self.sum / self.n_tokens if self.token_logprobs else float("nan")


@dataclass
class ContinuationTopK:
    """The teacher's top-k at every token of a continuation, teacher-forced (KD labelling).

    ``prompt_ids`` and ``token_ids`` are the token ids as the model saw them (int32);
    ``topk`` row t is the distribution that predicted ``token_ids[t]`` given the prompt
    and ``token_ids[:t]``. ``truncated``: prompt + continuation did not fit and the
    continuation was cut from the right (the arrays cover the kept tokens).
    """

    prompt_ids: np.ndarray
    token_ids: np.ndarray
    topk: TopK
    truncated: bool = False


def restrict_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """Renormalize log-probabilities over the given candidates only (last axis).

    ``softmax`` over a subset of logits equals this renormalization of the
    full-vocabulary log-probabilities, so deita's "softmax over the six digit
    logits" is ``np.exp(restrict_logprobs(x))``.
    """
    x = np.asarray(logprobs, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


class ModelBackend(ABC):
    """A loaded model behind one batched interface."""

    #: e.g. ``"hf:embedded:smollm2-135m-instruct@<sha256[:12]>"``; enters cache keys.
    identity: str
    #: what the model is (see :data:`BackendKind`)
    kind: BackendKind = "causal-lm"

    @property
    @abstractmethod
    def context_length(self) -> int | None:
        """The most tokens (prompt + generated) the model takes; ``None`` when unknown."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each text is as a prompt to this model (BOS included, as sent)."""

    def close(self) -> None:
        """Release the model's memory and connections; safe to call twice. The default does nothing.

        A closed backend must not be called again (load a new one).
        """

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (chat template included)."""

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str:
        """Render messages with the model's chat template, as a string."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Sample ``params.n`` continuations of each raw prompt (no template applied)."""

    def chat(
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams
    ) -> list[Generation]:
        """Generate the assistant's next turn for each conversation."""
        return self.generate([self.apply_chat_template(c) for c in conversations], params)

    @abstractmethod
    def continuation_logprobs(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        max_tokens: int | None = None,
    ) -> list[ContinuationScore]:
        """Per-token log p(continuation_t | prompt, continuation_<t), prompt tokens excluded.

        Prompt and continuation are tokenized separately and their ids
        concatenated, so the continuation's tokens are the same whatever the
        prompt. ``max_tokens`` caps prompt + continuation length (default: the
        model's context); longer inputs are truncated from the right and flagged.
        """

    def continuation_topk(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        k: int,
        max_tokens: int | None = None,
    ) -> list[ContinuationTopK]:
        """The top-k of the raw full-vocabulary log-probs at every continuation token.

        Teacher-forced like :meth:`continuation_logprobs` (same tokenization, same
        truncation): temperature 1, before top-p, float32. A backend that cannot
        raises :class:`ModelError` saying so.
        """
        raise ModelError(f"the {type(self).__name__} cannot give teacher-forced top-k log-probs")

    @abstractmethod
    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[str]
    ) -> np.ndarray:
        """Full-vocabulary log-probabilities of each candidate string as the next token.

        Returns an array of shape ``(len(prompts), len(candidates))``. Each
        candidate must be exactly one token in this model's tokenizer, else
        :class:`NotSingleTokenError`. Use :func:`restrict_logprobs` to
        renormalize over the candidates.
        """

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of shape ``(len(texts), dim)``, float32.

        Sentence-transformer models: their own pooling, L2-normalized. Causal
        LMs: the last layer's hidden state at the last token (deita), not
        normalized.
        """
