"""Stand-ins for vLLM, computed exactly by a real model on the hf backend.

vLLM needs a CUDA GPU and cannot be installed here, so its two faces are
emulated, following its documented formats, on top of the real SmolLM2 model:

- :class:`FakeVLLMServer` — an ``httpx.MockTransport`` handler speaking the
  OpenAI API as ``vllm serve`` does: token-id prompts, ``echo`` with prompt
  log-probs (first entry null), ``return_tokens_as_token_ids``
  (``"token_id:N"``), ``return_token_ids``, ``max_model_len`` in ``/v1/models``.
- :func:`fake_vllm_module` — a ``vllm`` module whose ``LLM.generate`` returns
  ``RequestOutput``-shaped objects: ``prompt_logprobs`` (``None`` first, then
  ``dict[token_id, Logprob]``), ``outputs[i].logprobs``, ``token_ids``, ``text``.

Every log-prob is ``log_softmax`` of the real model's logits, so a backend
parsing these formats correctly must reproduce the hf backend's numbers.
Decoding is greedy only.
"""

from __future__ import annotations

import functools
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import torch


def position_logprobs(hf: Any, ids: list[int]) -> np.ndarray:
    """``out[t]`` = log-probs of the token after ``ids[:t + 1]``, float64, shape (len, vocab)."""
    return _position_logprobs(hf, tuple(int(t) for t in ids))


@functools.lru_cache(maxsize=64)
def _position_logprobs(hf: Any, ids: tuple[int, ...]) -> np.ndarray:
    with torch.inference_mode():
        logits = hf.model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def greedy(hf: Any, ids: list[int], max_tokens: int, eos: set[int]) -> tuple[list[int], np.ndarray, str]:
    """Greedy continuation ids, their distributions (one row per generated token), finish reason."""
    out: list[int] = []
    rows = []
    for _ in range(max_tokens):
        lp = position_logprobs(hf, ids + out)[-1]
        rows.append(lp)
        tok = int(lp.argmax())
        out.append(tok)
        if tok in eos:
            return out, np.array(rows), "stop"
    return out, np.array(rows), "length"


def _top(row: np.ndarray, k: int, chosen: int) -> dict[int, float]:
    idx = np.argsort(-row, kind="stable")[:k]
    d = {int(i): float(row[i]) for i in idx}
    d[chosen] = float(row[chosen])  # vLLM adds the chosen token when outside the top k
    return d


class FakeVLLMServer:
    """``vllm serve`` in miniature, as an ``httpx.MockTransport`` handler."""

    def __init__(self, hf: Any, name: str = "smol", max_model_len: int = 2048) -> None:
        self.hf, self.name, self.max_model_len = hf, name, max_model_len
        self.tok = hf.tokenizer
        self.eos = {int(self.tok.eos_token_id)}
        self.requests: list[tuple[str, Any]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.url.path, body))
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": self.name, "max_model_len": self.max_model_len}]})
        if request.url.path.endswith("/completions") and not request.url.path.endswith("chat/completions"):
            return self._completions(body)
        return httpx.Response(404, json={"error": {"message": f"no route {request.url.path}"}})

    def _name(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid])

    def _completions(self, body: dict[str, Any]) -> httpx.Response:
        if body.get("temperature", 1.0) != 0:
            return httpx.Response(400, json={"error": {"message": "the fake server decodes greedily only"}})
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.tok(prompt, add_special_tokens=False)["input_ids"]
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        k = body.get("logprobs")
        gen, rows, reason = greedy(self.hf, ids, int(body.get("max_tokens", 16)), self.eos)
        text = self.tok.decode([t for t in gen if t not in self.eos])
        tokens, values, tops = [], [], []
        if body.get("echo"):
            text = self.tok.decode(ids) + text
            if k is not None:
                plp = position_logprobs(self.hf, ids)
                tokens.append(self._name(ids[0], as_ids))
                values.append(None)
                tops.append(None)
                for t in range(1, len(ids)):
                    tokens.append(self._name(ids[t], as_ids))
                    values.append(float(plp[t - 1][ids[t]]))
                    tops.append({self._name(i, as_ids): v for i, v in _top(plp[t - 1], k, ids[t]).items()})
        if k is not None:
            for tid, row in zip(gen, rows):
                tokens.append(self._name(tid, as_ids))
                values.append(float(row[tid]))
                tops.append({self._name(i, as_ids): v for i, v in _top(row, k, tid).items()})
        choice = {"index": 0, "text": text, "finish_reason": reason,
                  "logprobs": {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops} if k is not None else None}
        if body.get("return_token_ids"):
            choice["token_ids"] = gen
        n = int(body.get("n", 1))
        return httpx.Response(200, json={
            "choices": [{**choice, "index": i} for i in range(n)],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen)},
        })


# --------------------------------------------------------------------------- in-process vLLM


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)


def fake_vllm_module(hf: Any, calls: list[dict[str, Any]]) -> types.ModuleType:
    """A ``vllm`` module (with ``vllm.inputs``) whose engine is the hf backend's model."""
    tok = hf.tokenizer
    eos = {int(tok.eos_token_id)}

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)
            self.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 2048)

        def generate(self, prompts: list[dict], params: Any, use_tqdm: bool = True) -> list[RequestOutput]:
            params = params if isinstance(params, list) else [params] * len(prompts)
            return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

        def _one(self, ids: list[int], sp: SamplingParams) -> RequestOutput:
            if sp.temperature != 0:
                raise ValueError("the fake engine decodes greedily only")
            plp = None
            if sp.prompt_logprobs is not None:
                rows = position_logprobs(hf, ids)
                plp = [None] + [{ids[t]: Logprob(float(rows[t - 1][ids[t]]))} for t in range(1, len(ids))]
            gen, rows, reason = greedy(hf, ids, int(sp.max_tokens or 16), eos | set(sp.stop_token_ids or []))
            lps = None
            if sp.logprobs is not None:
                lps = [{i: Logprob(v) for i, v in _top(r, sp.logprobs, t).items()} for t, r in zip(gen, rows)]
            text = tok.decode([t for t in gen if t not in eos])
            outs = [CompletionOutput(i, text, list(gen), lps, reason) for i in range(sp.n)]
            return RequestOutput(prompt_token_ids=list(ids), prompt_logprobs=plp, outputs=outs)

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    mod.inputs = inputs
    return mod


def install_fake_vllm(monkeypatch: Any, hf: Any) -> list[dict[str, Any]]:
    """Put the fake ``vllm`` in ``sys.modules``; returns the list of engine constructor kwargs."""
    calls: list[dict[str, Any]] = []
    mod = fake_vllm_module(hf, calls)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", mod.inputs)
    return calls
