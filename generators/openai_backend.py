"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, llama.cpp).

It is built from four parts, each in its own module:

- :mod:`~thresher.generators.openai_transport` — HTTP: one client on a private
  event loop, bounded concurrency, timeouts, retries with backoff on transient
  errors (``Retry-After`` honoured), one clear error on a permanent one.
- :mod:`~thresher.generators.openai_server` — server discovery: the served
  model's name and ``max_model_len`` (``/v1/models``), whether it accepts
  token-id prompts, neutral sampler settings, ``base_url`` normalization.
- :mod:`~thresher.generators.openai_parsing` — the local tokenizer and the
  reading of responses (token strings back to ids, completions, top-k).
- :mod:`~thresher.generators.openai_echo` — continuation scores from ``echo``
  log-probs, and the calibration that refuses llama-cpp-python's shifted echo.

What each method does:

Tokenization
    Everything is tokenized locally with the model's Hugging Face tokenizer
    (``cfg.tokenizer``, else ``cfg.name``) by the ``hf`` backend's rules.
    Servers that accept token-id prompts get the ids, so scores use exactly the
    ``hf`` tokenization; servers that accept only text get text, and every
    score is then checked (see :mod:`~thresher.generators.openai_echo`).

``continuation_logprobs``
    ``echo`` log-probs of prompt + continuation, capped at context - 1 tokens.

``continuation_topk`` (KD labels)
    ``echo`` with ``logprobs: k`` on token-id prompts (``vllm serve``); a text-only server
    (llama.cpp) is refused with an error saying so.

``next_token_logprobs``
    One ``max_tokens: 1, logprobs: 20`` request per prompt (the top-20 of the
    full next-token distribution; vLLM's default ``--max-logprobs`` is 20).
    A candidate found there gets its exact value. A candidate missing from the
    top-20 is *not* given a default (its log-prob is only known to be at most
    the 20th value, so -inf would be wrong): it is scored exactly as a
    one-token continuation instead, and if the server cannot do that either,
    a :class:`ModelError` is raised. No ``logit_bias`` is used: servers differ
    on whether the reported log-probs are taken before or after the bias.

``generate`` / ``chat``
    ``/v1/completions`` (local tokenization, the prompt's last context - 1
    tokens) / ``/v1/chat/completions`` (the *server's* chat template). Greedy
    ``n > 1`` asks once and repeats the completion; a server that returns fewer
    than ``n`` choices (llama-cpp-python ignores ``n``) is asked again with
    ``seed + i``. ``stop_token_ids`` is sent as vLLM/SGLang's extension; servers
    without it stop at EOS and at stop strings only. ``top_logprobs`` (KD) are
    mapped back to token ids where that is unambiguous; the entries left out
    are counted in :attr:`OpenAIBackend.unmapped_top_logprobs`.

``embed``
    ``/v1/embeddings``: whatever pooling the server is configured for.

``kind`` is that of the local model files (``embedding`` for a
sentence-transformer folder), else ``causal-lm``; ``context_length`` is
``model.max_model_len``, else what ``/v1/models`` reports (vLLM), else unknown.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Coroutine, Sequence, TypeVar

import httpx
import numpy as np

from thresher.generators.backend_common import candidate_row, resolve_single_tokens, truncate_pair
from thresher.generators.base import (
    BackendKind,
    ContinuationScore,
    ContinuationTopK,
    Generation,
    Message,
    ModelBackend,
    ModelError,
    SamplingParams,
    TopK,
)
from thresher.generators.model_files import backend_kind
from thresher.generators.openai_echo import EchoScorer
from thresher.generators.openai_parsing import CompletionReader, LocalVocab, logprobs_of, top_entries
from thresher.generators.openai_server import VLLM_TOKEN_IDS, ServerInfo, normalize_base_url
from thresher.generators.openai_transport import ServerError, Transport
from thresher.schemas.model_config import ModelConfig

__all__ = ["OpenAIBackend", "ServerError", "normalize_base_url"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class OpenAIBackend(ModelBackend):
    """A model behind an OpenAI-compatible HTTP server (see the module docstring)."""

    #: top-k asked for in next-token probes (vLLM's default --max-logprobs is 20)
    probe_logprobs: int = 20

    def __init__(self, cfg: ModelConfig | str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
        if self.cfg.backend != "openai":
            raise ModelError(f"OpenAIBackend got a config for backend {self.cfg.backend!r}")
        self.transport = Transport(
            normalize_base_url(self.cfg.base_url), api_key_env=self.cfg.api_key_env, timeout_s=self.cfg.timeout_s,
            max_concurrency=self.cfg.max_concurrency, max_retries=self.cfg.max_retries, transport=transport,
        )
        self.vocab = LocalVocab(self.cfg.tokenizer or self.cfg.name, None if self.cfg.tokenizer else self.cfg.revision)
        self.server = ServerInfo(self.transport, self.vocab, self.cfg.name, self.cfg.served_model_name,
                                 self.cfg.max_model_len)
        self.echo = EchoScorer(self.server, self.vocab)
        self.reader = CompletionReader(self.vocab)

    # ------------------------------------------------------------------ what the model is

    @property
    def identity(self) -> str:  # type: ignore[override]
        """``openai:<served model>[@revision][|tokenizer:<identity>][|ctx=N]`` (the server's weights are not visible)."""
        name = self.cfg.served_model_name or self.cfg.name
        ident = f"openai:{name}" + (f"@{self.cfg.revision}" if self.cfg.revision else "")
        if self.vocab.source.startswith("embedded:") or self.cfg.tokenizer:
            ident += f"|tokenizer:{self.vocab.identity}"
        if self.cfg.max_model_len:  # changes where long inputs are cut
            ident += f"|ctx={self.cfg.max_model_len}"
        return ident

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    @property
    def tokenizer(self) -> Any:
        return self.vocab.tokenizer

    @property
    def kind(self) -> BackendKind:  # type: ignore[override]
        try:
            return backend_kind(self.vocab.resolve()[1])  # type: ignore[return-value]
        except ModelError:  # no local files: a completions server
            return "causal-lm"

    @property
    def context_length(self) -> int | None:
        """``model.max_model_len``, else the server's (asked once); ``None`` when unknown or unreachable.

        An unreachable server is not an error here: the next real call reports it.
        """
        if self.server.context is None and not self.server.models_checked:
            try:
                self._run(self.server.setup(need_mode=False))
            except ModelError as exc:
                log.info("%s: context length unknown (%s)", self.base_url, exc)
        return self.server.context

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.vocab.encoder.encode_prompts(list(texts))]

    @property
    def unmapped_top_logprobs(self) -> int:
        """Top-k entries left out because their token string maps to no unique id."""
        return self.reader.unmapped

    # ------------------------------------------------------------------ plumbing

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.transport.run(coro)

    async def _gather(self, coros: Sequence[Coroutine[Any, Any, T]], need_mode: bool | None = True) -> list[T]:
        """Set the server up, then run the coroutines concurrently (closed unstarted if setup fails)."""
        try:
            await self.server.setup(need_mode)
        except BaseException:
            for c in coros:
                c.close()
            raise
        return list(await asyncio.gather(*coros))

    def close(self) -> None:
        """Close the HTTP client and stop the private loop (safe to call twice)."""
        self.transport.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """``params.n`` completions of each raw prompt via ``/v1/completions``."""
        if not prompts:
            return []
        return self._run(self._gather([self._generate_one(p, params) for p in prompts]))

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingParams) -> list[Generation]:
        """The assistant's next turn via ``/v1/chat/completions`` (the server's chat template)."""
        if not conversations:
            return []
        return self._run(self._gather([self._chat_one(list(c), params) for c in conversations], need_mode=None))

    def _sampling_payload(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.server.model,
            "n": params.n,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            **self.server.neutral(),
            **VLLM_TOKEN_IDS,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            body["seed"] = int(params.seed)
        return body

    async def _n_choices(self, path: str, body: dict[str, Any], params: SamplingParams) -> list[dict[str, Any]]:
        """``n`` choices: once for greedy (repeated), topped up with ``seed + i`` if the server returns fewer."""
        want = max(1, params.n)
        greedy = params.temperature <= 0
        resp = await self.transport.post(path, {**body, "n": 1 if greedy else want})
        choices = sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))
        if not choices:
            raise ModelError(f"{self.base_url}{path} returned no choices: {str(resp)[:500]}")
        if greedy:
            return [choices[0]] * want

        async def one_more(extra: int) -> dict[str, Any]:
            seed = None if params.seed is None else params.seed + extra
            more = await self.transport.post(path, {**body, "n": 1, **({} if seed is None else {"seed": seed})})
            if not more.get("choices"):
                raise ModelError(f"{self.base_url}{path} returned no choices when asked for more samples")
            return more["choices"][0]

        # the top-ups go out together (the transport bounds them to max_concurrency), in seed order
        choices += await asyncio.gather(*(one_more(extra) for extra in range(len(choices), want)))
        return choices[:want]

    async def _generate_one(self, prompt: str, params: SamplingParams) -> Generation:
        ids, text = self.server.fit(self.vocab.encoder.encode_prompts([prompt])[0], prompt)
        max_tokens = params.max_tokens
        if self.server.context is not None:  # stop at the context, as the hf backend does
            max_tokens = max(1, min(max_tokens, self.server.context - len(ids)))
        body = self._sampling_payload(params)
        body.update(prompt=self.server.prompt(text, ids), max_tokens=max_tokens)
        if params.top_logprobs:
            body["logprobs"] = int(params.top_logprobs)
        choices = await self._n_choices("/completions", body, params)
        return Generation(prompt=prompt, completions=[self.reader.read(c, params) for c in choices])

    async def _chat_one(self, messages: list[Message], params: SamplingParams) -> Generation:
        body = self._sampling_payload(params)
        body.update(messages=messages, max_tokens=params.max_tokens)
        if params.top_logprobs:
            body.update(logprobs=True, top_logprobs=int(params.top_logprobs))
        choices = await self._n_choices("/chat/completions", body, params)
        try:
            prompt = self.apply_chat_template(messages)  # the local rendering, for the record
        except Exception:  # no local tokenizer or template: the server's template was used anyway
            prompt = json.dumps(messages, ensure_ascii=False)
        return Generation(prompt=prompt, completions=[self.reader.read(c, params, chat=True) for c in choices])

    # ------------------------------------------------------------------ scoring

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int | None = None
    ) -> list[ContinuationScore]:
        """Per-token log p(c_t | prompt, c_<t) from ``echo`` log-probs (see :mod:`~thresher.generators.openai_echo`)."""
        if not prompts and not continuations:
            return []
        p_ids, c_ids = self._forced_ids(prompts, continuations)

        async def run() -> list[ContinuationScore]:
            await self.server.setup()
            cap = self._forced_cap(max_tokens)
            jobs = []
            for p, c, prompt, cont in zip(p_ids, c_ids, prompts, continuations):
                p2, c2, cut = truncate_pair(p, c, cap)
                jobs.append(self._score(prompt, cont if not cut else None, p2, c2, cut))
            return list(await asyncio.gather(*jobs))

        return self._run(run())

    def _forced_ids(self, prompts: Sequence[str], continuations: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids (an empty prompt gets the start token) and continuation ids, for teacher forcing."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        enc = self.vocab.encoder
        return ([p if p else enc.start_ids() for p in enc.encode_prompts(prompts)],
                enc.encode_continuations(continuations))

    def _forced_cap(self, max_tokens: int | None) -> int | None:
        """Most prompt + continuation tokens: context - 1 (the server generates one), and ``max_tokens``."""
        cap = self.server.context - 1 if self.server.context else None
        if max_tokens is not None:
            cap = max(0, int(max_tokens)) if cap is None else min(cap, max(0, int(max_tokens)))
        return cap

    async def _score(
        self, prompt: str, cont: str | None, p_ids: list[int], c_ids: list[int], truncated: bool
    ) -> ContinuationScore:
        if not c_ids:
            return ContinuationScore(token_ids=[], token_logprobs=[], truncated=truncated)
        if cont is None:  # truncated: the kept continuation tokens as text (checked in text mode)
            cont = self.vocab.decode(c_ids)
        if not prompt:  # an empty prompt is given the start token (BOS), spelled out
            prompt = self.vocab.decode(p_ids)
        values = await self.echo.score(prompt, cont, p_ids, c_ids)
        return ContinuationScore(token_ids=list(c_ids), token_logprobs=values, truncated=truncated)

    def continuation_topk(
        self, prompts: Sequence[str], continuations: Sequence[str], k: int, max_tokens: int | None = None,
    ) -> list[ContinuationTopK]:
        """Teacher-forced top-k from ``echo`` with ``logprobs: k`` on token-id prompts (``vllm serve``).

        A server that takes only text prompts (llama.cpp) is refused: its echoed top-k could not
        be tied to the ids a student trains on. A server that echoes fewer entries is refused too.
        """
        if not prompts and not continuations:
            return []
        p_ids, c_ids = self._forced_ids(prompts, continuations)

        async def run() -> list[ContinuationTopK]:
            await self.server.setup()
            if self.server.mode != "ids":
                raise ModelError(
                    f"{self.base_url} takes only text prompts, so its echoed top-k cannot be tied to token ids: "
                    "teacher-forced KD labels need a server that takes token-id prompts (vllm serve), or "
                    "backend: hf / vllm")
            cap = self._forced_cap(max_tokens)
            return list(await asyncio.gather(*(self._topk_one(*truncate_pair(p, c, cap), int(k))
                                               for p, c in zip(p_ids, c_ids))))

        return self._run(run())

    async def _topk_one(self, p_ids: list[int], c_ids: list[int], cut: bool, k: int) -> ContinuationTopK:
        top = TopK.empty(k)
        if c_ids:
            seq = p_ids + c_ids
            resp = await self.transport.post("/completions", {**self.echo.body(seq), "logprobs": k})
            entries = logprobs_of(resp).get("top_logprobs") or []
            if len(entries) < len(seq) or any(not entries[pos] for pos in range(len(p_ids), len(seq))):
                raise ModelError(f"{self.base_url} echoed top-k log-probs for {len(entries)} of {len(seq)} "
                                 "prompt positions: it cannot give teacher-forced KD labels")
            top = TopK.from_pairs([top_entries(self.vocab, entries[pos])[0].items()
                                   for pos in range(len(p_ids), len(seq))], k)
        return ContinuationTopK(prompt_ids=np.asarray(p_ids, np.int32), token_ids=np.asarray(c_ids, np.int32),
                                topk=top, truncated=cut)

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Full-vocabulary log p(candidate | prompt), shape ``(P, C)`` (see the module docstring)."""
        cand_ids = resolve_single_tokens(self.tokenizer, candidates, self.cfg.name)
        if not prompts or not cand_ids:
            return np.zeros((len(prompts), len(cand_ids)), dtype=np.float64)
        enc = self.vocab.encoder.encode_prompts(prompts)
        if any(not p for p in enc):
            raise ModelError("an empty prompt has no next-token distribution for a tokenizer without BOS")
        rows = self._run(self._gather([self._next_one(t, p, cand_ids) for t, p in zip(prompts, enc)]))
        return np.asarray(rows, dtype=np.float64).reshape(len(prompts), len(cand_ids))

    async def _next_one(self, prompt: str, ids: list[int], cand_ids: list[int]) -> list[float]:
        ids, prompt = self.server.fit(ids, prompt)
        body = {"model": self.server.model, "prompt": self.server.prompt(prompt, ids), "max_tokens": 1,
                "temperature": 0.0, "logprobs": self.probe_logprobs, **self.server.neutral(), **VLLM_TOKEN_IDS}
        tops = logprobs_of(await self.transport.post("/completions", body)).get("top_logprobs") or [{}]
        row, missing = candidate_row(top_entries(self.vocab, tops[0] or {})[0], cand_ids)
        for j in missing:  # outside the top-k: score the candidate exactly as a one-token continuation
            c = cand_ids[j]
            row[j] = (await self.echo.score(prompt, self.vocab.decode([c]), ids, [c]))[0]
        return row

    # ------------------------------------------------------------------ embeddings

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``/v1/embeddings`` in batches of ``cfg.batch_size``; float32 ``(len(texts), dim)``."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)

        async def one(batch: list[str]) -> list[list[float]]:
            resp = await self.transport.post(
                "/embeddings", {"model": self.server.model, "input": batch, "encoding_format": "float"})
            data = sorted(resp.get("data", []), key=lambda d: d.get("index", 0))
            if len(data) != len(batch):
                raise ModelError(f"{self.base_url}/embeddings returned {len(data)} embeddings for {len(batch)} inputs")
            return [d["embedding"] for d in data]

        bs = self.cfg.batch_size
        parts = self._run(self._gather([one(texts[i:i + bs]) for i in range(0, len(texts), bs)], need_mode=False))
        return np.asarray([row for part in parts for row in part], dtype=np.float32)
