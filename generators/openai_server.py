"""What the ``openai`` backend finds out about its server, once: model name, context, prompt form.

- ``base_url`` is the OpenAI SDK's: ``http://host:8000/v1`` (``/v1`` is added to
  a bare ``http://host:8000``), see :func:`normalize_base_url`.
- ``GET /v1/models`` names the served model (``model.served_model_name`` wins;
  else the only one served, else the one called ``model.name``) and, on vLLM,
  its ``max_model_len`` (``model.max_model_len`` wins).
- The prompt *mode*: ``"ids"`` when the server accepts a token-id prompt (vLLM,
  SGLang, llama.cpp's ``llama-server``), else ``"text"`` (llama-cpp-python's
  ``llama_cpp.server``), found with one probe request.
- :meth:`ServerInfo.neutral`: the sampler knobs sent with every request so
  that servers do not apply their own defaults (llama-cpp-python:
  ``top_k=40, repeat_penalty=1.1, min_p=0.05``; vLLM: the model's
  ``generation_config``), with top-k disabled in each server's own terms.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from thresher.generators.base import ModelError
from thresher.generators.openai_parsing import LocalVocab
from thresher.generators.openai_transport import ServerError, Transport

log = logging.getLogger(__name__)

#: sampler knobs sent with every request so servers do not apply their own defaults;
#: plus ``top_k``, which servers disable differently (see :meth:`ServerInfo.neutral`)
NEUTRAL_SAMPLING: dict[str, Any] = {
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,  # vLLM, SGLang
    "repeat_penalty": 1.0,  # llama.cpp
}

#: vLLM extensions: name tokens by id, return sampled ids
VLLM_TOKEN_IDS: dict[str, Any] = {"return_tokens_as_token_ids": True, "return_token_ids": True}


def normalize_base_url(url: str | None) -> str:
    """``http://h:8000`` -> ``http://h:8000/v1``; a URL with a path is kept; no trailing slash."""
    if not url:
        raise ModelError("the openai backend needs model.base_url, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


class ServerInfo:
    """The served model's name, its context length and the prompt mode, found once per server.

    ``vocab`` is the local tokenizer (the mode probe needs it; it raises
    :class:`ModelError` when there is none).
    """

    def __init__(
        self, transport: Transport, vocab: LocalVocab, name: str, served_model_name: str | None,
        max_model_len: int | None,
    ) -> None:
        self.transport = transport
        self.name = name
        self.model: str | None = served_model_name
        self.context: int | None = max_model_len
        self.mode: str | None = None  # "ids" or "text"
        self.vocab = vocab
        self.models_checked = False

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    async def setup(self, need_mode: bool | None = True) -> None:
        """Read ``/v1/models`` and probe the prompt mode, each once.

        ``need_mode``: True (needed), False (not needed), None (wanted when a
        local tokenizer is available).
        """
        async with self.transport.lock("setup"):
            if not self.models_checked:
                await self._read_models()
                self.models_checked = True
            if self.mode is None and need_mode:
                self.mode = await self._detect_mode()
            elif self.mode is None and need_mode is None:  # wanted, but a tokenizer is optional
                try:
                    self.vocab.encoder
                except ModelError:
                    return
                self.mode = await self._detect_mode()

    async def _read_models(self) -> None:
        try:
            body = await self.transport.request("GET", "/models")
        except ServerError as exc:
            if self.model is None:
                raise ModelError(f"cannot list the server's models to pick one; set model.served_model_name ({exc})") from exc
            return
        data = body.get("data", []) if isinstance(body, dict) else []
        ids = [str(d.get("id")) for d in data if isinstance(d, dict)]
        if self.model is None:
            if len(ids) == 1:
                self.model = ids[0]
            elif self.name in ids:
                self.model = self.name
            else:
                raise ModelError(f"the server serves {ids}; set model.served_model_name to one of them")
        for d in data:
            if isinstance(d, dict) and str(d.get("id")) == self.model and self.context is None:
                ctx = d.get("max_model_len")
                if isinstance(ctx, int) and ctx > 0:
                    self.context = ctx

    async def _detect_mode(self) -> str:
        """``"ids"`` when the server takes a token-id prompt, else ``"text"`` (one probe)."""
        ids = self.vocab.encoder.encode_prompts(["Hello"])[0]
        payload = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        try:
            body = await self.transport.post("/completions", payload, retry_server_errors=False)
        except ServerError as exc:
            if exc.status in (401, 403, 404):  # wrong key or URL: not about the prompt's form
                raise
            log.info("%s does not accept token-id prompts (%s); sending text", self.base_url, exc.message[:200])
            return "text"
        return "ids" if isinstance(body, dict) and body.get("choices") else "text"

    def neutral(self) -> dict[str, Any]:
        """:data:`NEUTRAL_SAMPLING` plus top-k disabled in the server's own terms.

        vLLM and SGLang disable top-k with -1 (SGLang rejects 0); llama-cpp-python
        rejects -1 and disables it with 0. Token-id servers get -1, text-only
        ones 0; when the mode is unknown (chat without a local tokenizer) top-k
        is not sent and the server's default applies.
        """
        top_k = {"ids": {"top_k": -1}, "text": {"top_k": 0}}.get(self.mode or "", {})
        return {**NEUTRAL_SAMPLING, **top_k}

    def prompt(self, text: str, ids: list[int]) -> Any:
        """The ``prompt`` field: token ids in ids mode, else the text as the server should see it."""
        return ids if self.mode == "ids" else self.vocab.encoder.server_text(text)

    def fit(self, ids: list[int], text: str) -> tuple[list[int], str]:
        """Keep the last ``context - 1`` tokens of a prompt (room for one generated token).

        The text is re-made from the kept ids only when cut (the hf backend keeps
        the last tokens too).
        """
        if self.context is not None and len(ids) > self.context - 1:
            ids = ids[-(self.context - 1):]
            text = self.vocab.decode(ids)
        return ids, text
