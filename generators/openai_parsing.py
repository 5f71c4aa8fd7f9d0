"""Reading an OpenAI-compatible server's responses against the local tokenizer.

The ``openai`` backend tokenizes locally (:class:`LocalVocab`: ``model.tokenizer``,
else ``model.name``: an ``embedded:`` name, a folder or a cached hub id) by the
``hf`` backend's rules, and reads the server's answers back into token ids:

- vLLM is asked for ``return_tokens_as_token_ids`` (``"token_id:123"``) and
  ``return_token_ids``, which give exact ids. Other servers name tokens by
  their text; a text maps back to an id only when exactly one vocabulary entry
  decodes to it (:class:`~thresher.generators.backend_common.TokenStrings`).
- Unmappable top-k entries (partial UTF-8 bytes, strings several tokens share)
  are left out of that position's list (and counted, with a warning); sampled
  ``token_ids`` then come from re-tokenizing the returned text.
- :func:`check_token`: the server's token at a position must be the local one,
  else the tokenizers differ and a :class:`ModelError` says so.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from thresher.generators.backend_common import (
    PromptEncoder,
    TokenStrings,
    finish_reason,
    normalize_piece,
    parse_token_id,
    trim_at_stop,
)
from thresher.generators.base import Completion, ModelError, SamplingParams, TopK
from thresher.generators.model_files import load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


class LocalVocab:
    """The served model's tokenizer, loaded here on first use (thread-safe, picklable).

    ``source`` names it (an ``embedded:`` name, a folder or a cached hub id);
    :attr:`identity` resolves its files only, without loading transformers.
    """

    def __init__(self, source: str, revision: str | None = None) -> None:
        self.source = source
        self.revision = revision
        self._lock = threading.Lock()
        self._resolved: tuple[Any, str, str] | None = None
        self._tok: Any = None
        self._encoder: PromptEncoder | None = None
        self._strings: TokenStrings | None = None

    def _fail(self, exc: Exception) -> ModelError:
        return ModelError(
            f"the openai backend tokenizes locally and could not load a tokenizer from {self.source!r} "
            f"(set model.tokenizer to an embedded name or a local folder): {exc}"
        )

    def resolve(self) -> tuple[Any, str, str]:
        """``(folder, file kind, identity)`` of the tokenizer's model files."""
        if self._resolved is None:
            try:
                self._resolved = resolve_model_path(self.source, self.revision)
            except Exception as exc:
                raise self._fail(exc) from exc
        return self._resolved

    @property
    def identity(self) -> str:
        return self.resolve()[2]

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                path = self.resolve()[0]
                try:
                    tok = load_tokenizer(path)
                except Exception as exc:
                    raise self._fail(exc) from exc
                self._encoder, self._tok = PromptEncoder(tok), tok
            return self._tok

    @property
    def encoder(self) -> PromptEncoder:
        self.tokenizer
        assert self._encoder is not None
        return self._encoder

    @property
    def strings(self) -> TokenStrings:
        if self._strings is None:
            self._strings = TokenStrings(self.tokenizer)
        return self._strings

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# --------------------------------------------------------------------------- completions responses


def logprobs_of(resp: dict[str, Any]) -> dict[str, Any]:
    """The ``logprobs`` object of the first choice of a completions response."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices:
        raise ModelError(f"the server returned no choices: {str(resp)[:500]}")
    lp = choices[0].get("logprobs")
    if not isinstance(lp, dict):
        raise ModelError("the server returned no logprobs (is it started with logits for all positions, "
                         "e.g. llama_cpp.server --logits_all true?)")
    return lp


def generated_count(resp: dict[str, Any], n_prompt: int) -> int:
    """How many generated-token entries follow the echoed prompt (0 or 1 at ``max_tokens: 1``).

    ``usage.completion_tokens`` counts them (an EOS is not counted and has no
    entry); a server that omits ``usage`` is assumed to echo exactly the prompt
    plus what it generated, whose count is then read from the entries.
    """
    n = (resp.get("usage") or {}).get("completion_tokens")
    if isinstance(n, int) and n >= 0:
        return n
    entries = len(logprobs_of(resp).get("token_logprobs") or [])
    return max(0, entries - n_prompt)


def check_token(vocab: LocalVocab, server_token: str | None, tid: int, pos: int) -> None:
    """The server's token at ``pos`` must be ``tid`` (by id, or by its decoded text)."""
    if server_token is None:
        return
    sid = parse_token_id(server_token)
    ok = sid == tid if sid is not None else (
        normalize_piece(server_token) == normalize_piece(vocab.strings.pieces[tid])
        or (tid in vocab.tokenizer.all_special_ids and server_token == "")
    )
    if not ok:
        raise ModelError(
            f"token mismatch at position {pos}: the server has {server_token!r}, the local tokenizer "
            f"{vocab.strings.pieces[tid]!r} (id {tid}); model.tokenizer must be the served model's tokenizer"
        )


def top_entries(vocab: LocalVocab, entry: dict[str, float]) -> tuple[dict[int, float], list[str]]:
    """A server's ``{token string: logprob}`` as ``{token id: logprob}``, and the strings that map to no id."""
    found: dict[int, float] = {}
    unmapped: list[str] = []
    for tok, lp in entry.items():
        tid = vocab.strings.lookup(tok)
        if tid is None:
            unmapped.append(tok)
        else:
            found[tid] = float(lp)
    return found, unmapped


class CompletionReader:
    """Turns ``choices`` of ``/completions`` and ``/chat/completions`` into :class:`Completion` s.

    ``unmapped`` counts the top-k entries left out because their string maps to no unique id.
    """

    def __init__(self, vocab: LocalVocab) -> None:
        self.vocab = vocab
        self.unmapped = 0

    def read(self, choice: dict[str, Any], params: SamplingParams, chat: bool = False) -> Completion:
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            content = (choice.get("logprobs") or {}).get("content") or []
            sampled = [e.get("token", "") for e in content]
            tops = [{t["token"]: t["logprob"] for t in (e.get("top_logprobs") or [])} for e in content]
        else:
            text = choice.get("text") or ""
            lp = choice.get("logprobs") or {}
            sampled = list(lp.get("tokens") or [])
            tops = [d or {} for d in (lp.get("top_logprobs") or [])]
        text, cut = trim_at_stop(text, params.stop)  # a server that ignored a stop string
        token_ids = choice.get("token_ids")
        try:
            if not token_ids and sampled and not cut:
                mapped = [self.vocab.strings.lookup(s) for s in sampled]
                token_ids = mapped if all(m is not None for m in mapped) else None
            if not token_ids:  # re-tokenized text: may differ from the sampled ids in rare cases
                token_ids = self.vocab.encoder.encode_continuations([text])[0]
        except ModelError:  # no local tokenizer (chat with a served model only)
            token_ids = []
        top = None
        if params.top_logprobs:
            top = TopK.from_pairs([self._top(d, params.top_logprobs) for d in tops], params.top_logprobs)
        return Completion(text=text, token_ids=[int(t) for t in token_ids],
                          finish_reason=finish_reason(choice.get("finish_reason"), cut), top_logprobs=top)

    def _top(self, entry: dict[str, float], k: int) -> list[tuple[int, float]]:
        found, unmapped = top_entries(self.vocab, entry)
        for tok in unmapped:
            log.warning("top_logprobs: token string %r maps to no unique id; left out", tok)
        self.unmapped += len(unmapped)
        return sorted(found.items(), key=lambda p: (-p[1], p[0]))[:k]
