"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, llama.cpp).

Transport
    ``httpx.AsyncClient`` on a private event loop in a daemon thread, at most
    ``cfg.max_concurrency`` requests in flight (``asyncio.Semaphore``), each
    with ``cfg.timeout_s``. Connect/read errors, 429 and 5xx are retried
    ``cfg.max_retries`` times with exponential backoff (0.5 s, 1 s, 2 s, ... up
    to 20 s, ``Retry-After`` honoured); other 4xx fail at once with a
    :class:`ServerError` that carries the server's own message. The blocking
    methods work from any thread, a Prefect/Dask worker thread or one whose
    event loop is running, because the I/O never runs on the caller's loop.
    ``base_url`` is the OpenAI SDK's: ``http://host:8000/v1`` (``/v1`` is added
    to a bare ``http://host:8000``).

Tokenization
    Everything is tokenized locally with the model's Hugging Face tokenizer
    (``cfg.tokenizer``, else ``cfg.name``: an ``embedded:`` name, a folder or a
    cached hub id) by the ``hf`` backend's rules
    (:class:`~thresher.generators.backend_common.PromptEncoder`). Servers that
    accept token-id prompts (vLLM, SGLang, llama.cpp's ``llama-server``) get the
    ids, so scores use exactly the ``hf`` tokenization (prompt and continuation
    tokenized separately, ids concatenated). Servers that accept only text
    (llama-cpp-python's ``llama_cpp.server``) get text, and every score is then
    checked: the local joint tokenization must equal the separate one, the
    server's prompt-token count must equal the local one and the server's
    token strings over the continuation must equal the local tokens', else a
    :class:`ModelError` says why.

``continuation_logprobs``
    ``/v1/completions`` with ``echo: true, logprobs: 0|1, max_tokens: 1`` on
    prompt + continuation; the continuation's entries are located by token
    position (ids mode) or from the end of the echo (text mode, see above).
    Text-mode servers are calibrated once per kind of prompt (starting with BOS
    or not): the echo entry of a token must carry the same distribution a plain
    completion of its prefix reports. llama-cpp-python (through at least 0.3.x)
    fails this for prompts that do not start with BOS: its echo log-probs are
    off by one position (abetlen/llama-cpp-python#1983, #1276), so scoring such
    prompts raises a :class:`ModelError` instead of returning wrong numbers.
    Chat-templated prompts of models whose BOS opens the template
    (SmolLM2's ``<|im_start|>``) and models that always add BOS (Gemma, Llama)
    are scored correctly. A server that returns no prompt log-probs with
    ``echo`` (llama.cpp's ``llama-server``) gives a clear error too. One token
    is generated and discarded (``max_tokens: 0`` is not accepted everywhere),
    so prompt + continuation is capped at context - 1 tokens.

``next_token_logprobs``
    One ``max_tokens: 1, logprobs: 20`` request per prompt (the top-20 of the
    full next-token distribution; vLLM's default ``--max-logprobs`` is 20).
    A candidate found there gets its exact value. A candidate missing from the
    top-20 is *not* given a default (its log-prob is only known to be at most
    the 20th value, so -inf would be wrong): it is scored exactly as a
    one-token continuation instead, and if the server cannot do that either,
    a :class:`ModelError` is raised. No ``logit_bias`` is used: servers differ
    on whether the reported log-probs are taken before or after the bias.

Token strings -> ids (``top_logprobs`` for KD, sampled ``token_ids``)
    vLLM is asked for ``return_tokens_as_token_ids`` (``"token_id:123"``) and
    ``return_token_ids``, which give exact ids. Other servers name tokens by
    their text; a text maps back to an id only when exactly one vocabulary
    entry decodes to it (:class:`~thresher.generators.backend_common.TokenStrings`).
    Unmappable top-k entries (partial UTF-8 bytes, strings several tokens
    share) are left out of that position's list and counted in
    :attr:`OpenAIBackend.unmapped_top_logprobs` (with a warning); sampled
    ``token_ids`` then come from re-tokenizing the returned text.

Sampling
    Requests carry neutral values for the sampler knobs servers default
    differently (llama-cpp-python: ``top_k=40, repeat_penalty=1.1,
    min_p=0.05``; vLLM: the model's ``generation_config``) so every backend
    samples from the same distribution. Greedy ``n > 1`` asks once and repeats
    the completion; a server that returns fewer than ``n`` choices
    (llama-cpp-python ignores ``n``) is asked again with ``seed + i``.
    ``stop_token_ids`` is sent as vLLM/SGLang's extension; servers without it
    stop at EOS and at stop strings only. ``chat`` uses
    ``/v1/chat/completions``, i.e. the *server's* chat template.

``embed``
    ``/v1/embeddings``: whatever pooling the server is configured for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from concurrent.futures import Future
from typing import Any, Coroutine, Sequence, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np

from thresher.generators.backend_common import (
    PromptEncoder,
    TokenStrings,
    candidate_row,
    finish_reason,
    normalize_piece,
    parse_token_id,
    resolve_single_tokens,
    trim_at_stop,
    truncate_pair,
)
from thresher.generators.base import (
    Completion,
    ContinuationScore,
    Generation,
    Message,
    ModelBackend,
    ModelError,
    SamplingParams,
)
from thresher.schemas.model_config import ModelConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: sampler knobs sent with every request so servers do not apply their own defaults;
#: plus ``top_k``, which servers disable differently (see :meth:`OpenAIBackend._neutral`)
NEUTRAL_SAMPLING: dict[str, Any] = {
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,  # vLLM, SGLang
    "repeat_penalty": 1.0,  # llama.cpp
}

#: vLLM extensions: name tokens by id, return sampled ids
VLLM_TOKEN_IDS: dict[str, Any] = {"return_tokens_as_token_ids": True, "return_token_ids": True}

#: the sentence the echo calibration scores (short, plain words, one token per word)
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog"


class ServerError(ModelError):
    """The server answered with an HTTP error status; ``status`` and ``message`` are its own."""

    def __init__(self, status: int, message: str, url: str) -> None:
        self.status = status
        self.message = message
        self.url = url
        kind = "transient, retries exhausted" if status == 429 or status >= 500 else "permanent"
        super().__init__(f"{url} answered HTTP {status} ({kind}): {message}")


def normalize_base_url(url: str | None) -> str:
    """``http://h:8000`` -> ``http://h:8000/v1``; a URL with a path is kept; no trailing slash."""
    if not url:
        raise ModelError("the openai backend needs model.base_url, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def server_message(resp: httpx.Response) -> str:
    """The error text a server put in its response (OpenAI, FastAPI or plain)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:2000] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg:
                return str(msg)[:2000]
        elif isinstance(err, str):
            return err[:2000]
        if "detail" in body:
            return str(body["detail"])[:2000]
    return str(body)[:2000]


class _LoopThread:
    """A private asyncio loop in a daemon thread; blocking callers submit coroutines to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking backend method was called from the backend's own event loop")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class OpenAIBackend(ModelBackend):
    """A model behind an OpenAI-compatible HTTP server (see the module docstring)."""

    #: top-k asked for in next-token probes (vLLM's default --max-logprobs is 20)
    probe_logprobs: int = 20
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0

    def __init__(self, cfg: ModelConfig | str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
        if self.cfg.backend != "openai":
            raise ModelError(f"OpenAIBackend got a config for backend {self.cfg.backend!r}")
        self.base_url = normalize_base_url(self.cfg.base_url)
        self._transport = transport
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: _LoopThread | None = None
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._tok: Any = None
        self._tok_identity: str | None = None
        self._encoder: PromptEncoder | None = None
        self._strings: TokenStrings | None = None
        self._model: str | None = self.cfg.served_model_name
        self._context: int | None = self.cfg.max_model_len
        self._models_checked = False
        self._mode: str | None = None  # "ids" or "text"
        self._shifts: dict[bool, int] = {}  # echo calibration per kind of prompt (BOS-first or not)
        self._setup_lock: asyncio.Lock | None = None
        self._calib_lock: asyncio.Lock | None = None
        #: top-k entries left out because their token string maps to no unique id
        self.unmapped_top_logprobs = 0

    # ------------------------------------------------------------------ identity, tokenizer

    @property
    def identity(self) -> str:  # type: ignore[override]
        """``openai:<served model>[@revision][|tokenizer:<identity>][|ctx=N]`` (the server's weights are not visible)."""
        name = self.cfg.served_model_name or self.cfg.name
        ident = f"openai:{name}" + (f"@{self.cfg.revision}" if self.cfg.revision else "")
        src = self.cfg.tokenizer or self.cfg.name
        if src.startswith("embedded:") or self.cfg.tokenizer:
            self._load_tokenizer()
            ident += f"|tokenizer:{self._tok_identity}"
        if self.cfg.max_model_len:  # changes where long inputs are cut
            ident += f"|ctx={self.cfg.max_model_len}"
        return ident

    def _load_tokenizer(self) -> None:
        with self._lock:
            if self._tok is not None:
                return
            from transformers import AutoTokenizer

            from thresher.generators.hf import resolve_model_path

            src = self.cfg.tokenizer or self.cfg.name
            try:
                path, _, ident = resolve_model_path(src, None if self.cfg.tokenizer else self.cfg.revision)
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:
                raise ModelError(
                    f"the openai backend tokenizes locally and could not load a tokenizer from {src!r} "
                    f"(set model.tokenizer to an embedded name or a local folder): {exc}"
                ) from exc
            self._tok, self._tok_identity = tok, ident
            self._encoder = PromptEncoder(tok)

    @property
    def tokenizer(self) -> Any:
        self._load_tokenizer()
        return self._tok

    @property
    def encoder(self) -> PromptEncoder:
        self._load_tokenizer()
        assert self._encoder is not None
        return self._encoder

    @property
    def strings(self) -> TokenStrings:
        if self._strings is None:
            self._strings = TokenStrings(self.tokenizer)
        return self._strings

    # ------------------------------------------------------------------ event loop and HTTP

    def _runner(self) -> _LoopThread:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # first use, or a forked child
                self._loop = _LoopThread(f"thresher-openai-{id(self):x}")
                self._client, self._sem, self._pid = None, None, os.getpid()
                self._setup_lock = self._calib_lock = None
            return self._loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner().run(coro)

    def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The client and semaphore, created on (and bound to) the private loop."""
        if self._client is None or self._sem is None:
            headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
            n = self.cfg.max_concurrency
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s)),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                transport=self._transport,
            )
            self._sem = asyncio.Semaphore(n)
        return self._client, self._sem

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max_s)
            except ValueError:
                pass
        delay = min(self.backoff_base_s * (2**attempt), self.backoff_max_s)
        return delay * (1.0 + 0.1 * random.random())

    async def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, *, retries: int | None = None,
        retry_server_errors: bool = True,
    ) -> Any:
        """One JSON request with retries on transient failures; the parsed JSON body."""
        client, sem = self._http()
        retries = self.cfg.max_retries if retries is None else retries
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(retries + 1):
            retry_after = None
            try:
                async with sem:
                    resp = await client.request(method, path, json=payload)
            except httpx.TransportError as exc:  # connect, read/write, timeouts, protocol
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise ModelError(f"{url} returned a non-JSON body: {resp.text[:500]!r}") from exc
                transient = resp.status_code == 429 or resp.status_code >= 500
                if not transient or not retry_server_errors:
                    raise ServerError(resp.status_code, server_message(resp), url)
                last = f"HTTP {resp.status_code}: {server_message(resp)}"
                retry_after = resp.headers.get("retry-after")
            if attempt < retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        raise ModelError(f"{method} {url} failed after {retries + 1} attempts (max_retries={retries}); last error: {last}")

    async def _post(self, path: str, payload: dict[str, Any], **kw: Any) -> Any:
        return await self._request("POST", path, payload, **kw)

    def close(self) -> None:
        """Close the HTTP client and stop the private loop."""
        with self._lock:
            loop, client = self._loop, self._client
            self._loop, self._client, self._sem = None, None, None
        if loop is not None and self._pid == os.getpid():
            if client is not None:
                loop.run(client.aclose())
            loop.close()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. shipped to a Dask worker): the loop, client and locks are rebuilt there."""
        state = dict(self.__dict__)
        state.update(_loop=None, _client=None, _sem=None, _setup_lock=None, _calib_lock=None, _pid=-1, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ server facts

    async def _setup(self, need_mode: bool | None = True) -> None:
        """Served model name and context length, and the prompt mode, found once.

        ``need_mode``: True (needed), False (not needed), None (wanted when a
        local tokenizer is available).
        """
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if not self._models_checked:
                await self._read_models()
                self._models_checked = True
            if self._mode is None and need_mode:
                self._mode = await self._detect_mode()
            elif self._mode is None and need_mode is None:  # wanted, but a tokenizer is optional
                try:
                    self.encoder
                except ModelError:
                    return
                self._mode = await self._detect_mode()

    async def _read_models(self) -> None:
        try:
            body = await self._request("GET", "/models")
        except ServerError as exc:
            if self._model is None:
                raise ModelError(f"cannot list the server's models to pick one; set model.served_model_name ({exc})") from exc
            return
        data = body.get("data", []) if isinstance(body, dict) else []
        ids = [str(d.get("id")) for d in data if isinstance(d, dict)]
        if self._model is None:
            if len(ids) == 1:
                self._model = ids[0]
            elif self.cfg.name in ids:
                self._model = self.cfg.name
            else:
                raise ModelError(f"the server serves {ids}; set model.served_model_name to one of them")
        for d in data:
            if isinstance(d, dict) and str(d.get("id")) == self._model and self._context is None:
                ctx = d.get("max_model_len")
                if isinstance(ctx, int) and ctx > 0:
                    self._context = ctx

    async def _detect_mode(self) -> str:
        """``"ids"`` when the server takes a token-id prompt, else ``"text"`` (one probe)."""
        ids = self.encoder.encode_prompts(["Hello"])[0]
        payload = {"model": self._model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        try:
            body = await self._post("/completions", payload, retry_server_errors=False)
        except ServerError as exc:
            if exc.status in (401, 403, 404):  # wrong key or URL: not about the prompt's form
                raise
            log.info("%s does not accept token-id prompts (%s); sending text", self.base_url, exc.message[:200])
            return "text"
        return "ids" if isinstance(body, dict) and body.get("choices") else "text"

    def _neutral(self) -> dict[str, Any]:
        """:data:`NEUTRAL_SAMPLING` plus top-k disabled in the server's own terms.

        vLLM and SGLang disable top-k with -1 (SGLang rejects 0); llama-cpp-python
        rejects -1 and disables it with 0. Token-id servers get -1, text-only
        ones 0; when the mode is unknown (chat without a local tokenizer) top-k
        is not sent and the server's default applies.
        """
        top_k = {"ids": {"top_k": -1}, "text": {"top_k": 0}}.get(self._mode or "", {})
        return {**NEUTRAL_SAMPLING, **top_k}

    def _prompt_payload(self, text: str, ids: list[int]) -> Any:
        return ids if self._mode == "ids" else self.encoder.server_text(text)

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

    async def _gather(self, coros: Sequence[Coroutine[Any, Any, T]], need_mode: bool | None = True) -> list[T]:
        try:
            await self._setup(need_mode)
        except BaseException:
            for c in coros:  # never started: close them quietly
                c.close()
            raise
        return list(await asyncio.gather(*coros))

    def _sampling_payload(self, params: SamplingParams, n: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "n": n,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            **self._neutral(),
            **VLLM_TOKEN_IDS,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if seed is not None:
            body["seed"] = int(seed)
        return body

    async def _n_choices(self, path: str, body: dict[str, Any], params: SamplingParams) -> list[dict[str, Any]]:
        """``n`` choices: once for greedy (repeated), topped up with ``seed + i`` if the server returns fewer."""
        want = max(1, params.n)
        greedy = params.temperature <= 0
        ask = 1 if greedy else want
        resp = await self._post(path, {**body, "n": ask})
        choices = sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))
        if not choices:
            raise ModelError(f"{self.base_url}{path} returned no choices: {str(resp)[:500]}")
        if greedy:
            return [choices[0]] * want
        extra = 1
        while len(choices) < want:
            seed = None if params.seed is None else params.seed + extra
            more = (await self._post(path, {**body, "n": 1, **({} if seed is None else {"seed": seed})})).get("choices")
            if not more:
                raise ModelError(f"{self.base_url}{path} returned no choices when asked for more samples")
            choices.append(more[0])
            extra += 1
        return choices[:want]

    async def _generate_one(self, prompt: str, params: SamplingParams) -> Generation:
        ids = self.encoder.encode_prompts([prompt])[0]
        max_tokens, text = params.max_tokens, prompt
        if self._context is not None:
            if len(ids) > self._context - 1:  # keep the last context - 1 tokens, as the hf backend does
                ids = ids[-(self._context - 1):]
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            max_tokens = max(1, min(max_tokens, self._context - len(ids)))
        body = self._sampling_payload(params, params.n, params.seed)
        body.update(prompt=self._prompt_payload(text, ids), max_tokens=max_tokens)
        if params.top_logprobs:
            body["logprobs"] = int(params.top_logprobs)
        choices = await self._n_choices("/completions", body, params)
        return Generation(prompt=prompt, completions=[self._completion(c, params) for c in choices])

    async def _chat_one(self, messages: list[Message], params: SamplingParams) -> Generation:
        body = self._sampling_payload(params, params.n, params.seed)
        body.update(messages=messages, max_tokens=params.max_tokens)
        if params.top_logprobs:
            body.update(logprobs=True, top_logprobs=int(params.top_logprobs))
        choices = await self._n_choices("/chat/completions", body, params)
        try:
            prompt = self.apply_chat_template(messages)  # the local rendering, for the record
        except Exception:  # no local tokenizer or template: the server's template was used anyway
            prompt = json.dumps(messages, ensure_ascii=False)
        return Generation(prompt=prompt, completions=[self._completion(c, params, chat=True) for c in choices])

    def _completion(self, choice: dict[str, Any], params: SamplingParams, chat: bool = False) -> Completion:
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
                mapped = [self.strings.lookup(s) for s in sampled]
                token_ids = mapped if all(m is not None for m in mapped) else None
            if not token_ids:  # re-tokenized text: may differ from the sampled ids in rare cases
                token_ids = self.encoder.encode_continuations([text])[0]
        except ModelError:  # no local tokenizer (chat with a served model only)
            token_ids = []
        top = None
        if params.top_logprobs:
            top = [self._map_top(d, params.top_logprobs) for d in tops]
        return Completion(text=text, token_ids=[int(t) for t in token_ids],
                          finish_reason=finish_reason(choice.get("finish_reason"), cut), top_logprobs=top)

    def _map_top(self, entry: dict[str, float], k: int) -> list[tuple[int, float]]:
        pairs: list[tuple[int, float]] = []
        for tok, lp in entry.items():
            tid = self.strings.lookup(tok)
            if tid is None:
                self.unmapped_top_logprobs += 1
                log.warning("top_logprobs: token string %r maps to no unique id; left out", tok)
                continue
            pairs.append((tid, float(lp)))
        pairs.sort(key=lambda p: (-p[1], p[0]))
        return pairs[:k]

    # ------------------------------------------------------------------ scoring

    def continuation_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[str], max_tokens: int | None = None
    ) -> list[ContinuationScore]:
        """Per-token log p(c_t | prompt, c_<t) from ``echo`` log-probs (see the module docstring)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if not prompts:
            return []
        enc = self.encoder
        p_ids = [p if p else enc.start_ids() for p in enc.encode_prompts(prompts)]
        c_ids = enc.encode_continuations(continuations)

        async def run() -> list[ContinuationScore]:
            await self._setup()
            cap = self._context - 1 if self._context else None
            if max_tokens is not None:
                cap = max(0, int(max_tokens)) if cap is None else min(cap, max(0, int(max_tokens)))
            jobs = []
            for p, c, prompt, cont in zip(p_ids, c_ids, prompts, continuations):
                p2, c2, cut = truncate_pair(p, c, cap)
                jobs.append(self._score(prompt, cont if not cut else None, p2, c2, cut))
            return list(await asyncio.gather(*jobs))

        return self._run(run())

    async def _score(
        self, prompt: str, cont: str | None, p_ids: list[int], c_ids: list[int], truncated: bool
    ) -> ContinuationScore:
        if not c_ids:
            return ContinuationScore(token_ids=[], token_logprobs=[], truncated=truncated)
        if self._mode == "ids":
            values = await self._echo_ids(p_ids, c_ids)
        else:
            if cont is None:  # truncated: the kept continuation tokens as text (checked below)
                cont = self.tokenizer.decode(c_ids, skip_special_tokens=False)
            if not prompt:  # an empty prompt is given the start token (BOS), spelled out
                prompt = self.tokenizer.decode(p_ids, skip_special_tokens=False)
            values = await self._echo_text(prompt, cont, p_ids, c_ids)
        return ContinuationScore(token_ids=list(c_ids), token_logprobs=values, truncated=truncated)

    def _echo_body(self, prompt: Any) -> dict[str, Any]:
        return {"model": self._model, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0.0, **self._neutral(), **VLLM_TOKEN_IDS}

    async def _echo_ids(self, p_ids: list[int], c_ids: list[int]) -> list[float]:
        seq = p_ids + c_ids
        resp = await self._post("/completions", self._echo_body(seq))
        lp = _logprobs(resp)
        values, tokens = lp.get("token_logprobs") or [], lp.get("tokens") or []
        if len(values) < len(seq):
            raise ModelError(
                f"{self.base_url} returned log-probs for {len(values)} positions of a {len(seq)}-token "
                "echoed prompt: it does not return prompt log-probs with echo (llama.cpp's llama-server "
                "does not), so it cannot score continuations; use vLLM or SGLang"
            )
        out = []
        for pos in range(len(p_ids), len(seq)):
            self._check_token(tokens[pos] if pos < len(tokens) else None, seq[pos], pos)
            if values[pos] is None:
                raise ModelError(f"{self.base_url} returned a null log-prob at prompt position {pos}")
            out.append(float(values[pos]))
        return out

    def _check_token(self, server_token: str | None, tid: int, pos: int) -> None:
        """The server's token at ``pos`` must be ``tid`` (by id, or by its decoded text)."""
        if server_token is None:
            return
        sid = parse_token_id(server_token)
        ok = sid == tid if sid is not None else (
            normalize_piece(server_token) == normalize_piece(self.strings.pieces[tid])
            or (tid in self.tokenizer.all_special_ids and server_token == "")
        )
        if not ok:
            raise ModelError(
                f"token mismatch at position {pos}: the server has {server_token!r}, the local tokenizer "
                f"{self.strings.pieces[tid]!r} (id {tid}); model.tokenizer must be the served model's tokenizer"
            )

    async def _echo_text(self, prompt: str, cont: str, p_ids: list[int], c_ids: list[int]) -> list[float]:
        seq = p_ids + c_ids
        text = prompt + cont
        joint = self.encoder.encode_prompts([text])[0]
        if joint != seq:
            raise ModelError(
                f"{self.base_url} accepts only text prompts, and the prompt + continuation text tokenizes "
                f"differently as one string than as two (a token crosses the boundary near "
                f"{prompt[-20:]!r} | {cont[:20]!r}); such a pair can be scored only by a server that accepts "
                "token-id prompts (vLLM, SGLang)"
            )
        await self._check_echo(self._bos_first(seq))
        resp = await self._post("/completions", self._echo_body(self.encoder.server_text(text)))
        self._check_prompt_count(resp, len(seq))
        lp = _logprobs(resp)
        values, tokens = lp.get("token_logprobs") or [], lp.get("tokens") or []
        m, g = len(c_ids), _generated(resp, len(seq))
        start = len(values) - g - m
        if start < 0 or len(tokens) != len(values):
            raise ModelError(f"{self.base_url} returned {len(values)} echo entries for {len(seq)} tokens")
        out = []
        for j in range(m):
            self._check_token(tokens[start + j], c_ids[j], len(p_ids) + j)
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
        bos = self.encoder.bos_id
        return bool(ids) and bos is not None and ids[0] == bos

    async def _check_echo(self, bos_first: bool) -> None:
        """Calibrate (once per kind of prompt) a text-only server's echo log-probs; refuse shifted ones.

        A plain completion of ``"... the lazy"`` reports the distribution of the
        token after it; the echo of ``"... the lazy dog"`` must carry that same
        distribution on the entry of ``" dog"`` (shift 0). A server whose echo
        carries it one entry earlier (shift 1) would give every continuation
        token the log-prob of the wrong position, so it is refused.
        """
        if self._calib_lock is None:
            self._calib_lock = asyncio.Lock()
        async with self._calib_lock:
            if bos_first not in self._shifts:
                self._shifts[bos_first] = await self._calibrate(bos_first)
        if self._shifts[bos_first]:
            kind = "that start with BOS" if bos_first else "that do not start with BOS"
            raise ModelError(
                f"{self.base_url}'s echo log-probs are off by one position for prompts {kind} (a known "
                "llama-cpp-python bug, abetlen/llama-cpp-python#1983): continuation scores from it would be "
                "wrong. Use a server that accepts token-id prompts (vLLM, SGLang), or prompts that start "
                "with BOS (chat-templated prompts for models whose template opens with it)"
            )

    async def _calibrate(self, bos_first: bool) -> int:
        """Two requests: a plain completion of the calibration text minus its last word, and its echo."""
        enc = self.encoder
        text = CALIBRATION_TEXT
        if bos_first and not enc.prefix_ids:
            if not enc.bos_text:
                raise ModelError("cannot calibrate BOS-first prompts: the tokenizer has no BOS string")
            text = enc.bos_text + text
        head = text[: text.rindex(" ")]
        ids, head_ids = enc.encode_prompts([text, head])
        if head_ids != ids[:-1] or self._bos_first(ids) != bos_first:
            raise ModelError(f"echo calibration: {text!r} does not tokenize as expected with this tokenizer")
        plain = await self._post("/completions", {
            "model": self._model, "prompt": enc.server_text(head), "max_tokens": 1,
            "temperature": 0.0, "logprobs": 5, **self._neutral()})
        sent = enc.server_text(text)
        echo = await self._post("/completions", {**self._echo_body(sent), "logprobs": 5})
        return self._read_shift(plain, echo, len(ids), ids[-1], bos_first)

    def _read_shift(self, plain: dict[str, Any], echo: dict[str, Any], n: int, last_id: int, bos_first: bool) -> int:
        want = (_logprobs(plain).get("top_logprobs") or [None])[0] or {}
        lp = _logprobs(echo)
        tokens = [normalize_piece(t) for t in lp.get("tokens") or []]
        tops = lp.get("top_logprobs") or []
        last = normalize_piece(self.strings.pieces[last_id])
        # the entry of the text's last token: before the generated entries, or last when the
        # server dropped them (llama-cpp-python does when the prompt does not start with BOS)
        places = [d for d in (len(tokens) - 1 - _generated(echo, n), len(tokens) - 1) if d >= 1 and tokens[d] == last]
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

    # ------------------------------------------------------------------ next token

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Full-vocabulary log p(candidate | prompt), shape ``(P, C)`` (see the module docstring)."""
        cand_ids = resolve_single_tokens(self.tokenizer, candidates, self.cfg.name)
        if not prompts or not cand_ids:
            return np.zeros((len(prompts), len(cand_ids)), dtype=np.float64)
        enc = self.encoder.encode_prompts(prompts)
        if any(not p for p in enc):
            raise ModelError("an empty prompt has no next-token distribution for a tokenizer without BOS")

        async def run() -> list[list[float]]:
            await self._setup()
            return list(await asyncio.gather(*[self._next_one(t, p, cand_ids) for t, p in zip(prompts, enc)]))

        return np.asarray(self._run(run()), dtype=np.float64).reshape(len(prompts), len(cand_ids))

    async def _next_one(self, prompt: str, ids: list[int], cand_ids: list[int]) -> list[float]:
        if self._context is not None and len(ids) > self._context - 1:
            ids = ids[-(self._context - 1):]
            if self._mode == "text":
                prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        body = {"model": self._model, "prompt": self._prompt_payload(prompt, ids), "max_tokens": 1,
                "temperature": 0.0, "logprobs": self.probe_logprobs, **self._neutral(), **VLLM_TOKEN_IDS}
        tops = _logprobs(await self._post("/completions", body)).get("top_logprobs") or [{}]
        found: dict[int, float] = {}
        for tok, lp in (tops[0] or {}).items():
            tid = self.strings.lookup(tok)
            if tid is not None and (parse_token_id(tok) is not None or self.strings.is_unique(tid)):
                found[tid] = float(lp)
        row, missing = candidate_row(found, cand_ids)
        for j in missing:  # outside the top-k: score the candidate exactly as a one-token continuation
            c = cand_ids[j]
            if self._mode == "ids":
                row[j] = (await self._echo_ids(ids, [c]))[0]
            else:
                piece = self.tokenizer.decode([c], skip_special_tokens=False)
                row[j] = (await self._echo_text(prompt, piece, ids, [c]))[0]
        return row

    # ------------------------------------------------------------------ embeddings

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``/v1/embeddings`` in batches of ``cfg.batch_size``; float32 ``(len(texts), dim)``."""
        texts = list(texts)

        async def one(batch: list[str]) -> list[list[float]]:
            resp = await self._post("/embeddings", {"model": self._model, "input": batch, "encoding_format": "float"})
            data = sorted(resp.get("data", []), key=lambda d: d.get("index", 0))
            if len(data) != len(batch):
                raise ModelError(f"{self.base_url}/embeddings returned {len(data)} embeddings for {len(batch)} inputs")
            return [d["embedding"] for d in data]

        async def run() -> list[list[float]]:
            await self._setup(need_mode=False)
            bs = self.cfg.batch_size
            parts = await asyncio.gather(*[one(texts[i:i + bs]) for i in range(0, len(texts), bs)])
            return [row for part in parts for row in part]

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray(self._run(run()), dtype=np.float32)


def _generated(resp: dict[str, Any], n_prompt: int) -> int:
    """How many generated-token entries follow the echoed prompt (0 or 1 at ``max_tokens: 1``).

    ``usage.completion_tokens`` counts them (an EOS is not counted and has no
    entry); a server that omits ``usage`` is assumed to echo exactly the prompt
    plus what it generated, whose count is then read from the entries.
    """
    n = (resp.get("usage") or {}).get("completion_tokens")
    if isinstance(n, int) and n >= 0:
        return n
    entries = len(_logprobs(resp).get("token_logprobs") or [])
    return max(0, entries - n_prompt)


def _logprobs(resp: dict[str, Any]) -> dict[str, Any]:
    """The ``logprobs`` object of the first choice of a completions response."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not choices:
        raise ModelError(f"the server returned no choices: {str(resp)[:500]}")
    lp = choices[0].get("logprobs")
    if not isinstance(lp, dict):
        raise ModelError("the server returned no logprobs (is it started with logits for all positions, "
                         "e.g. llama_cpp.server --logits_all true?)")
    return lp
