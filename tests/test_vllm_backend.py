"""The ``vllm`` backend's glue, on a fake in-process vLLM whose numbers are the real model's.

vLLM needs CUDA and is not installable here. ``tests/model_fakes.py`` provides
a ``vllm`` module following vLLM's documented output structures
(``RequestOutput.prompt_logprobs`` with ``None`` first and
``dict[token_id, Logprob]`` after, ``CompletionOutput.logprobs`` with the top-k
plus the sampled token), computed by the real SmolLM2 on the hf backend. The
backend parsing them correctly must reproduce the hf backend's numbers.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from model_fakes import install_fake_vllm
from thresher.generators.base import ModelError, SamplingParams
from thresher.schemas.model_config import ModelConfig

MODEL = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def hf():
    from thresher.generators.registry import load_model

    return load_model(MODEL, cache=False)


@pytest.fixture()
def vb(monkeypatch, hf):
    import thresher.generators.vllm_backend as vmod

    monkeypatch.setattr(vmod, "_ENGINES", {})
    calls = install_fake_vllm(monkeypatch, hf)
    backend = vmod.VLLMBackend(ModelConfig(name=MODEL, backend="vllm", max_model_len=512))
    return backend, calls


def test_missing_vllm_is_a_clear_error(monkeypatch):
    from thresher.generators.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ModelError, match="needs vLLM"):
        VLLMBackend(ModelConfig(name=MODEL, backend="vllm"))


def test_engine_is_built_once_with_prefix_caching(vb, hf):
    import thresher.generators.vllm_backend as vmod

    backend, calls = vb
    again = vmod.VLLMBackend(ModelConfig(name=MODEL, backend="vllm", max_model_len=512))
    assert again.llm is backend.llm and len(calls) == 1  # one engine per process
    kw = calls[0]
    assert kw["enable_prefix_caching"] is True and kw["max_logprobs"] == vmod.MAX_LOGPROBS
    assert kw["max_model_len"] == 512 and backend.context == 512
    assert backend.identity.startswith("vllm:embedded:smollm2-135m-instruct@")


def test_continuation_logprobs_match_hf(vb, hf):
    backend, _ = vb
    prompt = hf.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    prompts, conts = [prompt, "The capital of France is", "", prompt], [" 4.", " Paris.", "Hi", ""]
    got, ref = backend.continuation_logprobs(prompts, conts), hf.continuation_logprobs(prompts, conts)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and np.allclose(g.token_logprobs, r.token_logprobs, atol=1e-4)
    (cut,) = backend.continuation_logprobs([prompt], [" The answer is four."], max_tokens=len(hf.encode_prompts([prompt])[0]) + 2)
    assert cut.truncated and cut.n_tokens == 2


def test_next_token_logprobs_match_hf_including_outside_top_k(vb, hf):
    backend, _ = vb
    prompts = ["Question: what is 2+2? Answer:", hf.apply_chat_template([{"role": "user", "content": "Hi"}])]
    cands = ["4", "Hello", " zebra"]  # " zebra" is far outside the top-20: exact prompt_logprobs path
    got = backend.next_token_logprobs(prompts, cands)
    assert np.allclose(got, hf.next_token_logprobs(prompts, cands), atol=1e-4)


def test_generate_greedy_with_top_logprobs_matches_hf(vb, hf):
    backend, _ = vb
    prompt = hf.apply_chat_template([{"role": "user", "content": "Name a primary color."}])
    params = SamplingParams(max_tokens=6, temperature=0.0, n=2, top_logprobs=3)
    (g,), (r,) = backend.generate([prompt], params), hf.generate([prompt], params)
    assert len(g.completions) == 2 and g.texts == r.texts
    c, rc = g.completions[0], r.completions[0]
    assert c.token_ids == rc.token_ids and c.finish_reason == rc.finish_reason
    assert [len(p) for p in c.top_logprobs] == [3] * len(c.token_ids)  # the extra sampled entry dropped
    assert [[t for t, _ in p] for p in c.top_logprobs] == [[t for t, _ in p] for p in rc.top_logprobs]
    with pytest.raises(ModelError, match="exceeds the engine's max_logprobs"):
        backend.generate([prompt], SamplingParams(max_tokens=1, top_logprobs=1000))


def test_embed_on_a_generation_engine_is_a_clear_error(vb):
    backend, _ = vb
    with pytest.raises(ModelError, match="cannot pool hidden states"):
        backend.embed(["hello"])


def test_close_shuts_the_shared_engine_down_with_its_last_user(vb, hf):
    import thresher.generators.vllm_backend as vmod

    backend, calls = vb
    shutdowns = []
    backend.llm.shutdown = lambda: shutdowns.append(1)
    other = vmod.VLLMBackend(ModelConfig(name=MODEL, backend="vllm", max_model_len=512, batch_size=3))
    assert other.llm is backend.llm and len(calls) == 1
    assert backend.kind == "causal-lm" and backend.context_length == 512
    texts = ["Hi", hf.apply_chat_template([{"role": "user", "content": "Hi"}])]
    assert backend.count_tokens(texts) == hf.count_tokens(texts)
    backend.close()
    backend.close()  # twice is harmless
    assert not shutdowns and other.generate(["Hi"], SamplingParams(max_tokens=1))  # still shared
    with pytest.raises(ModelError, match="was closed"):
        backend.generate(["Hi"], SamplingParams(max_tokens=1))
    other.close()
    assert shutdowns == [1] and vmod._ENGINES == {}
