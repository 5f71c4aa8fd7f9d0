"""Magpie's instruction sampling: user turns written by the model from the pre-query template alone.

Magpie (Xu et al., ICLR 2025; magpie-align/magpie ``exp/gen_ins.py``): the prompt is only the
pre-query template (:mod:`thresher.generators.magpie_template`); the model continues it with
a user turn. One prompt, ``n`` completions per call (so the prefix is computed once:
prefix caching on vLLM, one prompt encoding on ``hf``), temperature 1.0 and top_p 1.0 by
default, stopping at the template's end of turn and, by default, at the first newline
(single-line instructions, as the reference does).

Call ``k`` draws with seed ``seed + k * n``: vLLM seeds the n samples of one request with
``seed, seed + 1, ...`` (consecutive seeds per call would draw the same samples again: 5
distinct of 8 in a test), so calls never share a stream. The same settings give the same
instructions on every run, and a resumed task redraws exactly what it would have drawn.

A sample is rejected, with a reason, when it is:

- ``magpie_empty``: nothing but whitespace;
- ``magpie_truncated``: cut at ``max_tokens`` before its turn ended;
- ``magpie_role_leak``: it carries the template's turn markup (a special token such as
  ``<|im_start|>``, or a line opening with a role name such as ``assistant``): the model
  wrote past the user turn instead of ending it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from thresher.generators.base import Completion, SamplingParams
from thresher.generators.magpie_template import PreQuery

REASON_EMPTY = "magpie_empty"
REASON_TRUNCATED = "magpie_truncated"
REASON_ROLE_LEAK = "magpie_role_leak"
_ROLE_LINE = re.compile(r"^\s*(assistant|user|system|model)\s*[:\n]", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class InstructionSample:
    """One sampled user turn: its text (stripped), or the reason it is rejected."""

    text: str
    reason: str | None  # None: a usable instruction
    seed: int  # the seed of the call that drew it
    index: int  # its place among that call's n samples
    n_tokens: int


def sampling_params(pre: PreQuery, n: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                    max_tokens: int = 256, stop_at_newline: bool = True) -> SamplingParams:
    """Magpie's sampling: n per call, stop at the end of turn (and the first newline by default)."""
    stop = tuple(s for s in (pre.end_of_turn, "\n" if stop_at_newline else "") if s)
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                          stop_token_ids=pre.end_of_turn_ids, seed=seed)


def judge(completion: Completion, special_tokens: list[str]) -> str | None:
    """The rejection reason of one sampled user turn, or None when it is usable."""
    text = completion.text.strip()
    if not text:
        return REASON_EMPTY
    if completion.finish_reason == "length":
        return REASON_TRUNCATED
    if any(tok and tok in text for tok in special_tokens) or _ROLE_LINE.search(text):
        return REASON_ROLE_LEAK
    return None


def sample_instructions(backend: Any, pre: PreQuery, count: int, n_per_call: int, seed: int,
                        **sampling: Any) -> list[InstructionSample]:
    """``count`` user turns, ``n_per_call`` per call of the pre-query prompt (call k: seed + k * n_per_call)."""
    specials = [t for t in getattr(backend.tokenizer, "all_special_tokens", []) if len(t) > 1]
    samples: list[InstructionSample] = []
    call = 0
    while len(samples) < count:
        n = min(n_per_call, count - len(samples))
        call_seed = seed + call * n_per_call
        params = sampling_params(pre, n, call_seed, **sampling)
        (generation,) = backend.generate([pre.text], params)
        for index, completion in enumerate(generation.completions):
            samples.append(InstructionSample(text=completion.text.strip(), reason=judge(completion, specials),
                                             seed=call_seed, index=index, n_tokens=len(completion.token_ids)))
        call += 1
    return samples
