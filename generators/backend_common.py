"""Logic shared by the model backends, so that every backend computes the same thing.

- :class:`PromptEncoder` — how prompts and continuations become token ids. The
  rules are the ``hf`` backend's (see :mod:`thresher.generators.hf`): a prompt is
  tokenized without special tokens and the tokenizer's default prefix (its BOS,
  if it adds one by default) is put in front unless the text already starts
  with the BOS string; a continuation is tokenized on its own with no special
  tokens and its ids are appended to the prompt's (GRAPE).
- :func:`resolve_single_tokens` — each candidate string's one token id, else
  :class:`~thresher.generators.base.NotSingleTokenError`.
- :func:`truncate_pair`, :func:`score_positions` — right-truncation of prompt +
  continuation and the turning of per-position log-prob entries (a vLLM
  ``dict[token_id, Logprob]``, a float, or ``None``) into a
  :class:`~thresher.generators.base.ContinuationScore`.
- :func:`trim_at_stop` (the one stop-string search), :class:`StopScanner` (stop
  strings in text that grows token by token), :func:`top_k_pairs`,
  :func:`logprob_value`.
- :class:`TokenStrings` — from the token *strings* an OpenAI-compatible server
  returns back to token ids, only where that is unambiguous.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from thresher.generators.base import ContinuationScore, ModelError, NotSingleTokenError

# --------------------------------------------------------------------------- tokenization


class PromptEncoder:
    """Token ids of prompts and continuations, with the ``hf`` backend's rules.

    ``encode_prompts`` = default prefix (BOS, if the tokenizer adds one by
    default) + the text's ids without special tokens; the prefix is not added
    when the text already starts with the BOS string (a chat template or a
    Magpie pre-query template that spells out ``<bos>``), so BOS is never
    doubled. Special-token strings inside the text (``<|im_start|>``) are
    parsed as special tokens, as transformers always does. No EOS is appended.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prefix_ids = self._default_prefix()
        bos = getattr(tokenizer, "bos_token", None)
        self.bos_text: str | None = bos if isinstance(bos, str) and bos else None
        bos_id = getattr(tokenizer, "bos_token_id", None)
        self.bos_id: int | None = int(bos_id) if isinstance(bos_id, int) else None

    def _default_prefix(self) -> list[int]:
        tok = self.tokenizer
        plain = tok("a", add_special_tokens=False)["input_ids"]
        full = tok("a")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return [int(x) for x in full[:start]]
        return []

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of raw prompts: default prefix + text, BOS never doubled."""
        if not texts:
            return []
        plain = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [
            [int(x) for x in ids]
            if self.bos_text and t.startswith(self.bos_text)
            else self.prefix_ids + [int(x) for x in ids]
            for t, ids in zip(texts, plain)
        ]

    def encode_continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of continuations: no special tokens added."""
        if not texts:
            return []
        return [[int(x) for x in ids] for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def start_ids(self) -> list[int]:
        """The context given to an empty prompt: the default prefix, else BOS, else EOS."""
        if self.prefix_ids:
            return list(self.prefix_ids)
        for t in (self.bos_id, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(t, int):
                return [int(t)]
        raise ModelError("an empty prompt needs a BOS or EOS token to condition on; this tokenizer has neither")

    def server_text(self, text: str) -> str:
        """The text to send a server that tokenizes for itself (no token-id prompts).

        When the tokenizer adds BOS by default, a server built from the same
        model does too, so a BOS string spelled out at the start of the text is
        removed to keep the server from doubling it.
        """
        if self.prefix_ids and self.bos_text and text.startswith(self.bos_text):
            return text[len(self.bos_text):]
        return text


def resolve_single_tokens(tokenizer: Any, candidates: Sequence[str], model_name: str = "the model") -> list[int]:
    """Each candidate string's one token id in ``tokenizer``.

    The string is encoded without special tokens; if that is not exactly one
    token but the string is itself a vocabulary entry that decodes to it
    (SentencePiece tokenizers add a word-start marker to ``"1"``), that entry is
    used. Otherwise :class:`NotSingleTokenError` names the string and its tokens.
    """
    out: list[int] = []
    for cand in candidates:
        ids = tokenizer(cand, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out.append(int(ids[0]))
            continue
        direct = tokenizer.convert_tokens_to_ids(cand)
        if isinstance(direct, int) and direct != tokenizer.unk_token_id and tokenizer.decode([direct]) == cand:
            out.append(direct)
            continue
        raise NotSingleTokenError(
            f"{cand!r} is not a single token for {model_name}: it encodes to "
            f"{len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)} (ids {list(ids)})"
        )
    return out


# --------------------------------------------------------------------------- scoring


def truncate_pair(prompt_ids: list[int], cont_ids: list[int], cap: int | None) -> tuple[list[int], list[int], bool]:
    """Cut prompt + continuation from the right to at most ``cap`` tokens.

    Returns ``(prompt_ids, cont_ids, truncated)``; ``cap=None`` means no limit.
    A prompt longer than ``cap`` is itself cut and the continuation dropped.
    """
    if cap is None or len(prompt_ids) + len(cont_ids) <= cap:
        return prompt_ids, cont_ids, False
    cap = max(0, int(cap))
    return prompt_ids[:cap], cont_ids[: max(0, cap - len(prompt_ids))], True


def logprob_value(entry: Any) -> float:
    """A log-probability from a float or an object with ``.logprob`` (vLLM's ``Logprob``)."""
    value = getattr(entry, "logprob", entry)
    if value is None:
        raise ModelError("the server or engine returned no log-probability (null) for a token")
    return float(value)


def score_positions(
    seq_ids: Sequence[int],
    start: int,
    entries: Sequence[Any],
    truncated: bool = False,
) -> ContinuationScore:
    """The :class:`ContinuationScore` of ``seq_ids[start:]`` from per-position entries.

    ``entries[i]`` describes the distribution that produced ``seq_ids[i]``
    (vLLM's ``prompt_logprobs`` layout: the first entry is ``None``). Each entry
    is a mapping ``token_id -> Logprob | float`` (the token must be in it) or a
    plain float / ``Logprob`` (the token's own log-prob). A missing or null
    value is an error, never a default.
    """
    if start < 1 and len(seq_ids) > start:
        raise ModelError("the first token of a sequence has no conditional log-probability; give it a prompt")
    if len(entries) < len(seq_ids):
        raise ModelError(
            f"got log-probs for {len(entries)} positions of a {len(seq_ids)}-token sequence: "
            "the backend did not return prompt log-probs for every position"
        )
    cont = [int(t) for t in seq_ids[start:]]
    values: list[float] = []
    for pos, tok in enumerate(cont, start=start):
        entry = entries[pos]
        if isinstance(entry, Mapping):
            if tok not in entry:
                raise ModelError(f"position {pos}: token {tok} missing from the returned log-probs {sorted(entry)[:8]}")
            entry = entry[tok]
        if entry is None:
            raise ModelError(f"position {pos}: no log-probability returned for token {tok}")
        values.append(logprob_value(entry))
    return ContinuationScore(token_ids=cont, token_logprobs=values, truncated=truncated)


def top_k_pairs(entry: Mapping[int, Any], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(token_id, logprob)`` of one position, most likely first.

    Servers return up to ``k + 1`` entries (the sampled token is added when it
    is not in the top k); the extra one is dropped so every backend gives k.
    Ties are broken by token id, so the order is deterministic.
    """
    pairs = [(int(t), logprob_value(v)) for t, v in entry.items()]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return pairs[:k]


def trim_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found.

    The one stop-string search of every backend (the ``hf`` decode loop's
    :class:`StopScanner` uses it on each new piece of text).
    """
    best = -1
    for s in stops:
        if s:
            k = text.find(s)
            if k != -1 and (best == -1 or k < best):
                best = k
    return (text, False) if best < 0 else (text[:best], True)


class StopScanner:
    """Watches the texts of a batch of growing token sequences for stop strings, cheaply.

    Re-decoding every row's whole output at every step is quadratic in its
    length. Instead, the text a new token adds is found by incremental
    detokenization (as TGI and vLLM do it): ``decode(ids[prefix:])`` minus
    ``decode(ids[prefix:read])``, where ``ids[prefix:read]`` are the last tokens
    already turned into text (they give the tokenizer the context it needs for
    spaces and merges); a text ending in U+FFFD is an incomplete multi-byte
    character and waits for the next token. Each step searches only the new text
    plus the last ``len(longest stop) - 1`` characters before it. Texts are
    decoded with ``skip_special_tokens=True``, like the completions' final text.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], rows: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.offsets = [(0, 0)] * rows  # (prefix, read) per row
        self.tails = [""] * rows

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, row: int, token: int) -> bool:
        """Append ``token`` to ``row``; whether the row's text now contains a stop string."""
        ids = self.ids[row]
        ids.append(int(token))
        prefix, read = self.offsets[row]
        before, after = self._decode(ids[prefix:read]), self._decode(ids[prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.offsets[row] = (read, len(ids))
        window = self.tails[row] + after[len(before):]
        self.tails[row] = window[-self.keep:] if self.keep else ""
        return trim_at_stop(window, self.stops)[1]


def finish_reason(raw: str | None, stopped_here: bool = False) -> str:
    """Normalize a finish reason to ``"stop"`` or ``"length"``."""
    return "length" if raw == "length" and not stopped_here else "stop"


# --------------------------------------------------------------------------- token strings

TOKEN_ID_PREFIX = "token_id:"


def parse_token_id(token: str) -> int | None:
    """``"token_id:123" -> 123`` (vLLM's ``return_tokens_as_token_ids``), else ``None``."""
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
        rest = token[len(TOKEN_ID_PREFIX):]
        if rest.isdigit():
            return int(rest)
    return None


def normalize_piece(text: str) -> str:
    """A token's decoded text with U+FFFD removed.

    A token that holds part of a multi-byte character decodes to U+FFFD in
    transformers but to ``""`` in servers that decode with ``errors="ignore"``
    (llama-cpp-python); removing U+FFFD makes the two comparable.
    """
    return text.replace("\ufffd", "")


class TokenStrings:
    """Maps the token strings a server returns back to this tokenizer's ids.

    OpenAI-compatible servers name tokens by their decoded text. A string maps
    to an id only when exactly one vocabulary entry decodes to it; strings that
    several ids share (partial UTF-8 bytes, look-alike special tokens) or that
    no id decodes to are *unmappable* and :meth:`lookup` returns ``None`` — the
    caller must then not guess. ``"token_id:N"`` strings (vLLM with
    ``return_tokens_as_token_ids``) always map exactly.
    """

    def __init__(self, tokenizer: Any) -> None:
        n = len(tokenizer)
        pieces = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        index: dict[str, int] = {}
        shared: set[str] = set()
        for i, piece in enumerate(pieces):
            if "\ufffd" in piece or piece == "":
                continue
            if piece in index:
                shared.add(piece)
            else:
                index[piece] = i
        for piece in shared:
            del index[piece]
        self.pieces = pieces
        self._index = index

    def lookup(self, token: str) -> int | None:
        tid = parse_token_id(token)
        if tid is not None:
            return tid
        return self._index.get(token)

    def is_unique(self, token_id: int) -> bool:
        """Whether the server's string for ``token_id`` identifies it exactly."""
        piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None
        return piece is not None and self._index.get(piece) == token_id


def candidate_row(found: Mapping[int, float], cand_ids: Sequence[int]) -> tuple[list[float], list[int]]:
    """Values of the candidates present in ``found`` (NaN elsewhere) and the missing indices.

    A candidate absent from a top-k list is *not* given a default: its
    log-prob is only known to be at most the k-th value, so the caller must
    score it exactly (or fail).
    """
    row = [math.nan] * len(cand_ids)
    missing: list[int] = []
    for j, t in enumerate(cand_ids):
        if t in found:
            row[j] = float(found[t])
        else:
            missing.append(j)
    return row, missing
