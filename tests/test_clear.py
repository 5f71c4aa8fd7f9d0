"""CLEAR (arXiv 2403.12776) with BSDetector confidence (arXiv 2308.16175), on the real embedded models.

Every component is checked against a direct computation on real model outputs; the
filter's rates are measured on AlpacaEval rows answered by gpt4_1106_preview mixed
with the same instructions answered by NullModel (adversarial garbage).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from thresher.generators.base import SamplingParams
from thresher.flows.registry import parse_config
from thresher.schemas.config import ConfigError
from thresher.schemas.records import content_id, make_record, records_table
from thresher.selectors.clear import ClearParams, ClearStage
from thresher.selectors.clear_confidence import (
    normalize_answer,
    observed_consistency,
    sample_answers,
    self_reflection,
)
from thresher.selectors.clear_correct import (
    ClearCorrectParams,
    ClearCorrectStage,
    judge_new_better,
)
from thresher.selectors.clear_filter import ClearFilterParams, ClearFilterStage
from thresher.selectors.clear_prompts import REFLECTION_PREFILL, REFLECTION_PROMPTS, fill
from thresher.selectors.clear_similarity import EmbeddingSimilarity, NLISimilarity


def _alpaca(shared_data: Path, model: str, n: int, start: int = 0) -> list[dict]:
    return json.loads((shared_data / f"alpaca_eval/{model}.json").read_text())[start:start + n]


def _rows(shared_data: Path, n: int = 2) -> pa.Table:
    """n instructions answered by gpt4_1106_preview, then the same n answered by NullModel."""
    records = []
    for model in ("gpt4_1106_preview", "NullModel"):
        for i, r in enumerate(_alpaca(shared_data, model, n)):
            messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            records.append(make_record(messages, f"alpaca_eval/{model}.json", i, candidate=model))
    return records_table(records)


def _direct_next_token_probs(backend, prompt: str, letters: list[str]) -> np.ndarray:
    """Letter probabilities straight from the transformers model (one prompt, no batching)."""
    ids = backend.encode_prompts([prompt])[0]
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0, -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs[[backend.tokenizer.convert_tokens_to_ids(t) for t in letters]]
    return torch.softmax(chosen, dim=-1).numpy()


# ------------------------------------------------------------------ components


def test_self_reflection_equals_direct_letter_probabilities(smollm2_backend, shared_data):
    rows = _alpaca(shared_data, "gpt4_1106_preview", 1) + _alpaca(shared_data, "NullModel", 1)
    questions = [r["instruction"] for r in rows]
    answers = [r["output"][:400] for r in rows]
    scores, probs = self_reflection(smollm2_backend, questions, answers, REFLECTION_PROMPTS)
    assert probs.shape == (2, 2, 3)
    for i, (q, a) in enumerate(zip(questions, answers)):
        direct = []
        for t, template in enumerate(REFLECTION_PROMPTS):
            prompt = smollm2_backend.apply_chat_template(
                [{"role": "user", "content": fill(template, question=q, answer=a)}]) + REFLECTION_PREFILL
            p = _direct_next_token_probs(smollm2_backend, prompt, ["A", "B", "C"])
            np.testing.assert_allclose(probs[i, t], p, atol=2e-4)
            direct.append(p[0] + 0.5 * p[2])
        assert scores[i] == pytest.approx(np.mean(direct), abs=2e-4)


def test_observed_consistency_equals_direct_computation(smollm2_backend, minilm_backend, shared_data):
    row = _alpaca(shared_data, "gpt4_1106_preview", 1)[0]
    prompt = [{"role": "user", "content": row["instruction"]}]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=7)
    samples = sample_answers(smollm2_backend, [prompt, prompt], params)
    direct_samples = smollm2_backend.chat([prompt], params)[0].texts
    assert samples == [direct_samples, direct_samples]  # one call, n=k, shared by equal prompts
    assert len(set(direct_samples)) == 3  # temperature 1.0: k different answers

    # the response equals one sample up to case and punctuation: the exact-match term counts
    response = direct_samples[1].upper() + "!"
    assert normalize_answer(response) == normalize_answer(direct_samples[1])
    sim = EmbeddingSimilarity(minilm_backend)
    score, per_sample = observed_consistency([response], [direct_samples], sim, alpha=0.8)

    emb = minilm_backend.embed([response, *direct_samples]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.clip(emb[1:] @ emb[0], 0, 1)
    match = np.array([0.0, 1.0, 0.0])
    expected = 0.8 * cos + 0.2 * match
    np.testing.assert_allclose(per_sample[0], expected, atol=1e-5)
    assert score[0] == pytest.approx(expected.mean(), abs=1e-5)


def test_nli_similarity_is_one_minus_contradiction_both_directions(tmp_path, minilm_backend):
    """A real (small, randomly initialized) BERT NLI head saved locally, loaded by path."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_backend.tokenizer
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3,
                        id2label={0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"},
                        label2id={"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "nli")
    tok.save_pretrained(tmp_path / "nli")

    params = ClearParams(nli_model=str(tmp_path / "nli"))
    sim = NLISimilarity(params.nli_model)
    a, b = ["Paris is the capital of France.", "Two plus two is four."], ["Lyon is the capital.", "It is four."]
    got = sim.scores(a, b)

    def p_contra(x, y):
        enc = tok([x], [y], return_tensors="pt")
        with torch.no_grad():
            return torch.softmax(model(**enc).logits[0], -1)[2].item()

    expected = [1 - (p_contra(x, y) + p_contra(y, x)) / 2 for x, y in zip(a, b)]
    np.testing.assert_allclose(got, expected, atol=1e-5)

    with pytest.raises(ValueError, match="not a local folder"):
        NLISimilarity(ClearParams(nli_model=str(tmp_path / "missing")).nli_model)


def test_clear_stage_combines_components_and_is_deterministic(smollm2_backend, minilm_backend, shared_data):
    rows = _rows(shared_data, n=1)
    params = ClearParams(k=3, max_tokens=16, max_answer_tokens=64, seed=3, request_cache=False)
    first = ClearStage(params).process(rows).attributes
    second = ClearStage(params).process(rows).attributes
    assert first.equals(second)  # same seed, same samples, same scores (no request cache)

    got = first.to_pylist()
    assert [g["row_id"] for g in got] == rows["row_id"].to_pylist()
    for g in got:
        assert g["clear_confidence"] == pytest.approx(0.7 * g["clear_consistency"] + 0.3 * g["clear_reflection"])
        assert g["clear_model"].startswith("hf:embedded:smollm2-135m-instruct@")
        assert g["clear_similarity"].startswith("cosine:")

    # consistency from the components, recomputed directly
    messages = rows["messages"].to_pylist()
    prompt = messages[0][:1]
    samples = smollm2_backend.chat([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=3))[0].texts
    responses = [m[-1]["content"] for m in messages]
    o, _ = observed_consistency(responses, [samples, samples], EmbeddingSimilarity(minilm_backend), 0.8)
    np.testing.assert_allclose([g["clear_consistency"] for g in got], o, atol=1e-5)
    # gpt4's answer agrees with the model's own samples far more than NullModel's garbage
    assert got[0]["clear_consistency"] > got[1]["clear_consistency"]

    other_seed = ClearStage(params.model_copy(update={"seed": 4})).process(rows).attributes
    assert not other_seed.equals(first)


# ------------------------------------------------------------------ filter and correct


def _scored(values: list[float | None]) -> pa.Table:
    records = [make_record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                           "x/y.json", i) for i in range(len(values))]
    return records_table(records).append_column("clear_confidence", pa.array(values, pa.float64()))


def test_filter_keeps_above_median_or_fixed_gamma():
    rows = _scored([0.1, 0.9, 0.5, 0.3, None, 0.7])
    out = ClearFilterStage(ClearFilterParams()).process(rows)
    ids = rows["row_id"].to_pylist()
    rejected = {r["row_id"]: r for r in out.rejected}
    assert set(rejected) == {ids[0], ids[2], ids[3], ids[4]}  # median 0.5: keep > 0.5
    assert {r["reason"] for r in out.rejected} == {"clear_low_confidence"}
    assert rejected[ids[0]]["value"] == 0.1 and rejected[ids[4]]["value"] is None
    assert out.attributes["clear_gamma"].to_pylist() == [0.5] * 6

    fixed = ClearFilterStage(ClearFilterParams(gamma=0.2)).process(rows)
    assert {r["row_id"] for r in fixed.rejected} == {ids[0], ids[4]}
    with pytest.raises(ValueError, match="put the 'clear' stage before it"):
        ClearFilterStage().process(rows.drop(["clear_confidence"]))


def test_auto_correct_replaces_or_drops_by_judge_confidence(smollm2_backend, shared_data):
    rows = _rows(shared_data, n=1)
    rows = rows.append_column("clear_confidence", pa.array([0.9, 0.1], pa.float64()))
    ids = rows["row_id"].to_pylist()
    base = dict(gamma=0.5, max_tokens=24, max_answer_tokens=64)

    out = ClearCorrectStage(ClearCorrectParams(eta=0.0, **base)).process(rows)
    assert out.rejected == []
    # the corrected row is a new row (fresh id, the old one its parent) that replaces the old one
    (new,) = out.created
    assert out.replaced == [ids[1]] and new["parent_row_id"] == ids[1] and new["row_id"] not in ids
    question = rows["messages"].to_pylist()[1][0]["content"]
    direct_new = smollm2_backend.chat([[{"role": "user", "content": question}]],
                                      SamplingParams(temperature=0.0, max_tokens=24))[0].texts[0].strip()
    assert new["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": direct_new}]
    assert new["content_id"] == content_id(new["messages"]) != rows["content_id"].to_pylist()[1]
    origin = json.loads(new["origin"])
    assert origin["stage"] == "clear_correct" and origin["model"] == smollm2_backend.identity
    assert origin["sampling"]["temperature"] == 0.0
    attrs = {a["row_id"]: a for a in out.attributes.to_pylist()}
    assert set(attrs) == {ids[0], new["row_id"]}
    assert attrs[ids[0]]["clear_action"] == "keep" and attrs[ids[0]]["clear_original_response"] is None
    fixed = attrs[new["row_id"]]
    null_answer = rows["messages"].to_pylist()[1][-1]["content"]
    assert fixed["clear_action"] == "correct" and fixed["clear_original_response"] == null_answer
    judged = judge_new_better(smollm2_backend, [question], [null_answer], [direct_new], 64)[0]
    assert fixed["clear_correction_confidence"] == pytest.approx(judged, abs=1e-6)

    strict = ClearCorrectStage(ClearCorrectParams(eta=1.0, **base)).process(rows)
    assert [(r["row_id"], r["reason"]) for r in strict.rejected] == [(ids[1], "clear_uncorrectable")]
    assert strict.rejected[0]["value"] == pytest.approx(judged, abs=1e-6)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(clear\)\.kk: unknown key"):
        parse_config({"stages": [{"stage": "clear", "kk": 3}]})
    with pytest.raises(ConfigError, match="placeholders"):
        parse_config({"stages": [{"stage": "clear", "reflection_prompts": ["no placeholders"]}]})
    with pytest.raises(ConfigError, match="gamma"):
        parse_config({"stages": [{"stage": "clear_filter", "gamma": "mean"}]})


# ------------------------------------------------------------------ the NullModel mix, end to end

MIX_ROWS = 20  # instructions: 20 answered by gpt4_1106_preview + the same 20 by NullModel
# (the full-size figure, 100 + 100 rows: `python bench/clear_mix.py`, quoted in the README)
MIX_STAGE = {"stage": "clear", "k": 5, "max_tokens": 48, "max_answer_tokens": 128}


@pytest.mark.slow
def test_auto_filter_on_nullmodel_mix_through_the_flow(tmp_path, shared_data):
    """40 rows through the real Prefect + Dask flow: NullModel's garbage goes, gpt4's answers stay."""
    from thresher.flows.curate import execute

    inputs = []
    for model in ("gpt4_1106_preview", "NullModel"):
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps(_alpaca(shared_data, model, MIX_ROWS)))
        inputs.append(str(path))
    config = parse_config({
        "name": "mix", "inputs": inputs, "out": str(tmp_path / "out"), "shard_rows": 1000,
        "execution": {"workers": 1},
        "stages": [{"stage": "validate"}, MIX_STAGE, {"stage": "clear_filter"}],
    })
    manifest = execute(config, show_progress=False)

    kept = pq.read_table(sorted((tmp_path / "out/data").glob("*.parquet"))).to_pylist()
    rejected = pq.read_table(sorted((tmp_path / "out/rejected").glob("*.parquet"))).to_pylist()
    low = [r for r in rejected if r["reason"] == "clear_low_confidence"]
    null_rejected = sum(r["source"].endswith("NullModel.json") for r in low)
    gpt4_kept = sum(r["candidate"] == "gpt4_1106_preview" for r in kept)
    rates = {"null_rejected": null_rejected / MIX_ROWS, "gpt4_kept": gpt4_kept / MIX_ROWS}
    print("CLEAR filter rates on the NullModel mix:", rates)
    assert manifest["counts"]["input"] == 2 * MIX_ROWS
    assert len(kept) + len(rejected) == 2 * MIX_ROWS
    assert rates["null_rejected"] >= 0.9, rates
    assert rates["gpt4_kept"] >= 0.8, rates

    summary = manifest["summaries"]["clear_filter"]
    hist = {(h["source"], h["rows"]): h for h in summary["confidence histogram per source"]}
    assert sum(h["n"] for h in hist.values()) == 2 * MIX_ROWS
    report = (tmp_path / "out/report.md").read_text()
    assert "confidence histogram per source" in report and "0.0-0.1" in report


@pytest.mark.slow
def test_auto_correct_through_the_flow_writes_the_corrected_messages(tmp_path, shared_data):
    """clear -> clear_correct in the real flow: data/ carries the new response, attributes the old."""
    from thresher.flows.curate import execute

    inputs = []
    for model in ("gpt4_1106_preview", "NullModel"):
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps(_alpaca(shared_data, model, 2, start=10)))
        inputs.append(str(path))
    config = parse_config({
        "name": "correct", "inputs": inputs, "out": str(tmp_path / "out"), "shard_rows": 100,
        "execution": {"workers": 1},
        "stages": [
            {"stage": "clear", "k": 2, "max_tokens": 16, "max_answer_tokens": 64},
            {"stage": "clear_correct", "gamma": "median", "eta": 0.0, "max_tokens": 16,
             "max_answer_tokens": 64},
        ],
    })
    manifest = execute(config, show_progress=False)
    c = manifest["counts"]
    # below the median of four: two rows, all corrected at eta 0 (new rows that replace the old)
    assert (c["input"], c["created"], c["output"], c["rejected"], c["replaced"]) == (4, 2, 4, 0, 2)
    assert manifest["stages"][1] == {**manifest["stages"][1], "in": 4, "created": 2, "replaced": 2, "out": 4}

    data = {r["row_id"]: r for r in pq.read_table(tmp_path / "out/data").to_pylist()}
    attrs = {r["row_id"]: r for r in pq.read_table(tmp_path / "out/attributes").to_pylist()}
    old = {r["row_id"]: r for r in pq.read_table(tmp_path / "out/replaced").to_pylist()}
    assert {r["replaced_by"] for r in old.values()} == {"clear_correct"}
    for row_id, a in attrs.items():
        row = data[row_id]
        if a["clear_action"] == "correct":
            parent = old[row["parent_row_id"]]
            assert parent["messages"][-1]["content"] == a["clear_original_response"] != row["messages"][-1]["content"]
            assert parent["messages"][:-1] == row["messages"][:-1] and row_id != parent["row_id"]
            assert json.loads(row["origin"])["stage"] == "clear_correct"
        else:
            assert a["clear_action"] == "keep" and row["parent_row_id"] is None and row["origin"] is None
    assert sum(a["clear_action"] == "correct" for a in attrs.values()) == 2
