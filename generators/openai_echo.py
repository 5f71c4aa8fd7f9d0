"""Continuation scores from a server's ``echo`` log-probs, and the calibration of llama.cpp's echo.

``/v1/completions`` with ``echo: true, logprobs: 1, max_tokens: 1`` on prompt +
continuation returns a log-prob for every prompt token; the continuation's
entries are the scores. One token is generated and discarded
(``max_tokens: 0`` is not accepted everywhere), so prompt + continuation is
capped at context - 1 tokens by the caller.

- **ids mode** (vLLM, SGLang): the prompt is sent as token ids, tokenized by
  the ``hf`` backend's rules, so the scores use exactly its tokenization; the
  continuation's entries are located by position.
- **text mode** (llama-cpp-python): the server tokenizes the text itself, so
  every score is checked: the local joint tokenization of prompt +
  continuation must equal the separate one, the server's prompt-token count
  must equal the local one and the server's token strings over the
  continuation must equal the local tokens'; entries are located from the end
  of the echo. Else a :class:`ModelError` says why.
- **Calibration** (text mode, once per kind of prompt: starting with BOS or
  not): the echo entry of a token must carry the same distribution a plain
  completion of its prefix reports. llama-cpp-python (through at least 0.3.x)
  fails this for prompts that do not start with BOS: its echo log-probs are off
  by one position (abetlen/llama-cpp-python#1983, #1276), so scoring such
  prompts raises a :class:`ModelError` instead of returning wrong numbers.
  Chat-templated prompts of models whose BOS opens the template (SmolLM2's
  ``<|im_start|>``) and models that always add BOS (Gemma, Llama) are scored
  correctly.
- A server that returns no prompt log-probs with ``echo`` (llama.cpp's
  ``llama-server``) gives a clear error.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from thresher.generators.backend_common import normalize_piece
from thresher.generators.base import ModelError
from thresher.generators.openai_parsing import LocalVocab, check_token, generated_count, logprobs_of
from thresher.generators.openai_server import VLLM_TOKEN_IDS, ServerInfo

log = logging.getLogger(__name__)

#: the sentence the echo calibration scores (short, plain words, one token per word)
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog"


class EchoScorer:
    """Per-token log-probs of continuations from ``echo`` (see the module docstring)."""

    def __init__(self, server: ServerInfo, vocab: LocalVocab) -> None:
        self.server = server
        self.vocab = vocab
        #: echo calibration per kind of prompt (BOS-first or not): 0 (right) or 1 (shifted)
        self.shifts: dict[bool, int] = {}

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def body(self, prompt: Any) -> dict[str, Any]:
        """An echo request for ``prompt`` (ids or text)."""
        return {"model": self.server.model, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0.0, **self.server.neutral(), **VLLM_TOKEN_IDS}

    async def score(self, prompt: str, cont: str, p_ids: list[int], c_ids: list[int]) -> list[float]:
        """Log-probs of ``c_ids`` after ``p_ids``; ``prompt`` and ``cont`` are their texts (text mode)."""
        if self.server.mode == "ids":
            return await self.score_ids(p_ids, c_ids)
        return await self.score_text(prompt, cont, p_ids, c_ids)

    async def score_ids(self, p_ids: list[int], c_ids: list[int]) -> list[float]:
        seq = p_ids + c_ids
        resp = await self.server.transport.post("/completions", self.body(seq))
        lp = logprobs_of(resp)
        values, tokens = lp.get("token_logprobs") or [], lp.get("tokens") or []
        if len(values) < len(seq):
            raise ModelError(
                f"{self.base_url} returned log-probs for {len(values)} positions of a {len(seq)}-token "
                "echoed prompt: it does not return prompt log-probs with echo (llama.cpp's llama-server "
                "does not), so it cannot score continuations; use vLLM or SGLang"
            )
        out = []
        for pos in range(len(p_ids), len(seq)):
            check_token(self.vocab, tokens[pos] if pos < len(tokens) else None, seq[pos], pos)
            if values[pos] is None:
                raise ModelError(f"{self.base_url} returned a null log-prob at prompt position {pos}")
            out.append(float(values[pos]))
        return out

    async def score_text(self, prompt: str, cont: str, p_ids: list[int], c_ids: list[int]) -> list[float]:
        enc = self.vocab.encoder
        seq = p_ids + c_ids
        text = prompt + cont
        if enc.encode_prompts([text])[0] != seq:
            raise ModelError(
                f"{self.base_url} accepts only text prompts, and the prompt + continuation text tokenizes "
                f"differently as one string than as two (a token crosses the boundary near "
                f"{prompt[-20:]!r} | {cont[:20]!r}); such a pair can be scored only by a server that accepts "
                "token-id prompts (vLLM, SGLang)"
            )
        await self._check_echo(self._bos_first(seq))
        resp = await self.server.transport.post("/completions", self.body(enc.server_text(text)))
        self._check_prompt_count(resp, len(seq))
        lp = logprobs_of(resp)
        values, tokens = lp.get("token_logprobs") or [], lp.get("tokens") or []
        m, g = len(c_ids), generated_count(resp, len(seq))
        start = len(values) - g - m
        if start < 0 or len(tokens) != len(values):
            raise ModelError(f"{self.base_url} returned {len(values)} echo entries for {len(seq)} tokens")
        out = []
        for j in range(m):
            check_token(self.vocab, tokens[start + j], c_ids[j], len(p_ids) + j)
            if values[start + j] is None:  # llama-cpp-python nulls the first echoed entry it lists
                raise ModelError(
                    f"{self.base_url} returned a null log-prob for continuation token {j} (the server "
                    "reports none for the first token it echoes; give the prompt more than a BOS token)"
                )
            out.append(float(values[start + j]))
        return out

    def _check_prompt_count(self, resp: dict[str, Any], n_local: int) -> None:
        n_server = (resp.get("usage") or {}).get("prompt_tokens")
        if isinstance(n_server, int) and n_server != n_local:
            raise ModelError(
                f"{self.base_url} tokenized the text into {n_server} tokens, the local tokenizer into "
                f"{n_local}: model.tokenizer must be the served model's tokenizer"
            )

    def _bos_first(self, ids: Sequence[int]) -> bool:
        bos = self.vocab.encoder.bos_id
        return bool(ids) and bos is not None and ids[0] == bos

    # ------------------------------------------------------------------ calibration (text mode)

    async def _check_echo(self, bos_first: bool) -> None:
        """Calibrate (once per kind of prompt) a text-only server's echo log-probs; refuse shifted ones.

        A plain completion of ``"... the lazy"`` reports the distribution of the
        token after it; the echo of ``"... the lazy dog"`` must carry that same
        distribution on the entry of ``" dog"`` (shift 0). A server whose echo
        carries it one entry earlier (shift 1) would give every continuation
        token the log-prob of the wrong position, so it is refused.
        """
        async with self.server.transport.lock("calibration"):
            if bos_first not in self.shifts:
                self.shifts[bos_first] = await self._calibrate(bos_first)
        if self.shifts[bos_first]:
            kind = "that start with BOS" if bos_first else "that do not start with BOS"
            raise ModelError(
                f"{self.base_url}'s echo log-probs are off by one position for prompts {kind} (a known "
                "llama-cpp-python bug, abetlen/llama-cpp-python#1983): continuation scores from it would be "
                "wrong. Use a server that accepts token-id prompts (vLLM, SGLang), or prompts that start "
                "with BOS (chat-templated prompts for models whose template opens with it)"
            )

    async def _calibrate(self, bos_first: bool) -> int:
        """Two requests: a plain completion of the calibration text minus its last word, and its echo."""
        enc = self.vocab.encoder
        text = CALIBRATION_TEXT
        if bos_first and not enc.prefix_ids:
            if not enc.bos_text:
                raise ModelError("cannot calibrate BOS-first prompts: the tokenizer has no BOS string")
            text = enc.bos_text + text
        head = text[: text.rindex(" ")]
        ids, head_ids = enc.encode_prompts([text, head])
        if head_ids != ids[:-1] or self._bos_first(ids) != bos_first:
            raise ModelError(f"echo calibration: {text!r} does not tokenize as expected with this tokenizer")
        post = self.server.transport.post
        plain = await post("/completions", {
            "model": self.server.model, "prompt": enc.server_text(head), "max_tokens": 1,
            "temperature": 0.0, "logprobs": 5, **self.server.neutral()})
        echo = await post("/completions", {**self.body(enc.server_text(text)), "logprobs": 5})
        return self._read_shift(plain, echo, len(ids), ids[-1], bos_first)

    def _read_shift(self, plain: dict[str, Any], echo: dict[str, Any], n: int, last_id: int, bos_first: bool) -> int:
        want = (logprobs_of(plain).get("top_logprobs") or [None])[0] or {}
        lp = logprobs_of(echo)
        tokens = [normalize_piece(t) for t in lp.get("tokens") or []]
        tops = lp.get("top_logprobs") or []
        last = normalize_piece(self.vocab.strings.pieces[last_id])
        # the entry of the text's last token: before the generated entries, or last when the
        # server dropped them (llama-cpp-python does when the prompt does not start with BOS)
        places = [d for d in (len(tokens) - 1 - generated_count(echo, n), len(tokens) - 1)
                  if d >= 1 and tokens[d] == last]
        if not places:
            raise ModelError(f"echo calibration: {last!r} is not where expected in the echo {tokens[-4:]}")
        d = places[0]

        def same(entry: Any) -> bool:
            return bool(want) and isinstance(entry, dict) and all(
                k in entry and abs(float(entry[k]) - float(v)) <= 0.05 for k, v in want.items())

        if same(tops[d]):
            return 0
        if same(tops[d - 1]):
            log.warning("%s: echo log-probs are shifted by one for %sBOS-first prompts",
                        self.base_url, "" if bos_first else "non-")
            return 1
        raise ModelError(
            f"{self.base_url}'s echo log-probs do not match its own completion log-probs "
            f"(expected {want}, echo entries {tops[d - 1:d + 1]}); it cannot score continuations"
        )
