"""deita: verbatim prompts, scores against a hand computation on real logits, failures
counted, embeddings, and the Repr Filter against a plain sequential implementation,
on real models and real rows (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_model_lifecycle import assert_loaded_once_released_in_turn
from thresher.flows.pipeline import _join_attributes
from thresher.schemas.readers import read_file
from thresher.schemas.records import make_record, records_table
from thresher.selectors.deita import (
    DeitaComplexityStage,
    DeitaQualityStage,
    DeitaScorerParams,
    DeitaScoreStage,
)
from thresher.selectors.deita_embed import (
    DeitaEmbedParams,
    DeitaEmbedStage,
    vicuna_prompt,
)
from thresher.selectors.deita_filter import DeitaFilterParams, DeitaFilterStage
from thresher.selectors.deita_scoring import (
    COMPLEXITY_TEMPLATE,
    QUALITY_TEMPLATE,
    complexity_prompt,
    conversation_turns,
    quality_prompt,
)
from thresher.selectors.repr_filter import (
    ACCEPTED,
    BELOW_BUDGET,
    TOO_SIMILAR,
    repr_filter,
)

SMOLLM2 = "embedded:smollm2-135m-instruct"
# one torch thread: on a shared CPU, threads that wait for a busy core make small forwards many times slower
SCORER = {"name": SMOLLM2, "threads": 1}
MINILM = {"name": "embedded:all-minilm-l6-v2", "threads": 1}

# The reference strings, typed out here (hkust-nlp/deita, scorer/llama_scorer.py): note the
# space before each "\n", the double space after {instruction}, the trailing spaces.
REFERENCE_COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the following "
                        "user query. \n##Query: {instruction}  \n##Complexity: ")
REFERENCE_QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response "
                     "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")


# --------------------------------------------------------------------------- helpers


def _rows(conversations: list[list[dict]]) -> pa.Table:
    return records_table(make_record(m, "t/t.json", i, occurrence=i) for i, m in enumerate(conversations))


def _real_rows(shared_data: Path, path: str, n: int) -> list[list[dict]]:
    return [r["messages"] for r in read_file(shared_data / path).records[:n]]


def _run(stages, rows: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Run stages in order as the pipeline does: join attributes, drop rejected rows."""
    rejected = []
    for stage in stages:
        stage.check_columns(rows)
        out = stage.process(rows)
        if out.rejected:
            gone = {r["row_id"] for r in out.rejected}
            rows = rows.filter(pa.array([r not in gone for r in rows["row_id"].to_pylist()]))
            rejected += out.rejected
        if out.attributes is not None:
            rows = _join_attributes(rows, out.attributes)
    return rows, rejected


def plain_repr_filter(emb: np.ndarray, scores: list[float], tau: float, budget: int | None) -> dict[int, str]:
    """The rule written plainly: by descending score (ties: corpus order), float64 dot products."""
    e = np.asarray(emb, dtype=np.float64)
    walk = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    accepted: list[int] = []
    status: dict[int, str] = {}
    for i in walk:
        if budget is not None and len(accepted) >= budget:
            status[i] = "below_budget"
        elif accepted and float(np.max(e[accepted] @ e[i])) > tau:
            status[i] = "too_similar"
        else:
            accepted.append(i)
            status[i] = "accepted"
    return status


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- prompts and turns


def test_prompts_are_the_reference_strings_verbatim():
    assert COMPLEXITY_TEMPLATE == REFERENCE_COMPLEXITY
    assert QUALITY_TEMPLATE == REFERENCE_QUALITY
    assert complexity_prompt("Sort a list {x}.") == (
        "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
        "##Query: Sort a list {x}.  \n##Complexity: ")
    assert quality_prompt("Q?", "A.") == (
        "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
        "Question. \n #Question#:\nQ?\n#Response#:\nA. \n##Quality: ")


def test_turns_are_scored_without_history():
    m = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    assert conversation_turns(m) == [("q1", "a1"), ("q2", "a2"), ("q3", "")]


def test_vicuna_format_is_fastchats_vicuna_v1_1():
    m = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert vicuna_prompt(m) == f"{system} USER: Hello! ASSISTANT: Hi!</s>USER: How are you? ASSISTANT: Fine.</s>"
    assert vicuna_prompt([{"role": "system", "content": "Be brief."}, *m[:2]], eos="<|im_end|>") == \
        "Be brief. USER: Hello! ASSISTANT: Hi!<|im_end|>"


# --------------------------------------------------------------------------- scores on real logits


@pytest.mark.slow
def test_scores_match_a_hand_computation_on_real_logits(shared_data):
    from thresher.generators.embedded import resolve_embedded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    single = _real_rows(shared_data, "codealpaca/code_alpaca_2k.json", 1)[0]
    multi = next(m for m in _real_rows(shared_data, "sharegpt/dummy_conversation.json", 10) if len(m) == 4)
    rows = _rows([single, multi])
    params = DeitaScorerParams(model=SCORER, request_cache=False)
    out, rejected = _run([DeitaComplexityStage(params), DeitaQualityStage(params), DeitaScoreStage()], rows)
    assert not rejected

    # independently: plain transformers, one unpadded forward per prompt, the six digit logits
    path = resolve_embedded(SMOLLM2).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    digits = [tok.convert_tokens_to_ids(d) for d in "123456"]

    def by_hand(prompt: str) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].double()
        p = torch.softmax(logits[digits], dim=0)
        return float((p * torch.arange(1, 7, dtype=torch.float64)).sum())

    for i, messages in enumerate([single, multi]):
        turns = [(messages[k]["content"], messages[k + 1]["content"]) for k in range(0, len(messages), 2)]
        c = [by_hand(REFERENCE_COMPLEXITY.format(instruction=q)) for q, _ in turns]
        q = [by_hand(REFERENCE_QUALITY.format(instruction=q, output=a)) for q, a in turns]
        np.testing.assert_allclose(out["deita_complexity_turns"][i].as_py(), c, atol=2e-4)
        np.testing.assert_allclose(out["deita_quality_turns"][i].as_py(), q, atol=2e-4)
        assert out["deita_complexity"][i].as_py() == pytest.approx(np.mean(c), abs=2e-4)
        assert out["deita_score"][i].as_py() == pytest.approx(sum(a * b for a, b in zip(c, q)), abs=2e-3)
        assert 1.0 <= min(c + q) and max(c + q) <= 6.0
    assert out["deita_failure"].null_count == 2
    assert out["deita_complexity_scorer"][0].as_py().startswith("hf:embedded:smollm2-135m-instruct@")


# --------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_too_long_rows_fail_as_truncated_and_are_counted(shared_data):
    short = _real_rows(shared_data, "codealpaca/code_alpaca_2k.json", 3)
    long = [{"role": "user", "content": " ".join(m[0]["content"] for m in short) * 4},
            {"role": "assistant", "content": "ok"}]
    rows = _rows([*short, long])
    scorer = DeitaScorerParams(model=SCORER, max_tokens=120, request_cache=False)
    out, _ = _run([DeitaComplexityStage(scorer), DeitaQualityStage(scorer), DeitaScoreStage(),
                   DeitaEmbedStage(DeitaEmbedParams(model=MINILM, request_cache=False))], rows)
    assert out["deita_complexity_failure"].to_pylist() == [None, None, None, "truncated"]
    assert out["deita_complexity"][3].as_py() is None and out["deita_score"][3].as_py() is None
    assert "over the scorer's 120-token limit" in out["deita_complexity_failure_detail"][3].as_py()
    assert out["deita_failure"][3].as_py() == "complexity:truncated"
    assert all(v is not None for v in out["deita_score"].to_pylist()[:3])

    # default policy: rejected with its reason, counted by the filter's summary
    f = DeitaFilterStage(DeitaFilterParams(tau=0.99))
    result = f.process(out)
    assert [(r["reason"], r["code"]) for r in result.rejected] == [("deita_score_failed", "complexity:truncated")]
    assert result.rejected[0]["detail"].startswith("complexity:truncated: turn 1 of 1")
    summary = f.summarize(out.filter(pa.array([True, True, True, False])),
                          result.rejected_table())
    assert summary["scoring failures, by reason (every row that reached the filter)"] == {"complexity:truncated": 1}

    # rank_last: walked after every scored row, so it fills a budget the scored rows leave open
    last = DeitaFilterStage(DeitaFilterParams(tau=0.99, on_failure="rank_last")).process(out)
    assert not last.rejected
    ranks = dict(zip(last.attributes["row_id"].to_pylist(), last.attributes["deita_rank"].to_pylist()))
    assert ranks[rows["row_id"][3].as_py()] == 3


@pytest.mark.slow
def test_a_multi_token_score_candidate_fails_every_row_by_name(shared_data):
    rows = _rows(_real_rows(shared_data, "codealpaca/code_alpaca_2k.json", 2))
    params = DeitaScorerParams(model=SCORER, score_tokens=["1", "2", "3", "4", "5", "66"], request_cache=False)
    out = DeitaComplexityStage(params).process(rows).attributes
    assert out["deita_complexity_failure"].to_pylist() == ["not_single_token"] * 2
    assert "'66'" in out["deita_complexity_failure_detail"][0].as_py()
    assert out["deita_complexity"].null_count == 2
    summary = DeitaComplexityStage(params).summarize(_join_attributes(rows, out), pa.table({"reason": []}))
    assert summary["output rows failed, by reason"] == {"not_single_token": 2}


@pytest.mark.slow
def test_a_backend_error_is_a_counted_failure_not_a_crash(shared_data):
    rows = _rows(_real_rows(shared_data, "codealpaca/code_alpaca_2k.json", 2))
    unreachable = {"name": "deita-quality-scorer", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                   "tokenizer": SMOLLM2, "max_retries": 0, "timeout_s": 5}
    out = DeitaQualityStage(DeitaScorerParams(model=unreachable, request_cache=False)).process(rows).attributes
    assert out["deita_quality_failure"].to_pylist() == ["backend_error"] * 2
    assert "127.0.0.1:9" in out["deita_quality_failure_detail"][0].as_py()


# --------------------------------------------------------------------------- embeddings


@pytest.mark.slow
def test_causal_lm_embedding_is_the_last_token_hidden_state_of_the_vicuna_text(shared_data):
    from thresher.generators.embedded import resolve_embedded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversations = _real_rows(shared_data, "sharegpt/dummy_conversation.json", 2)
    out = DeitaEmbedStage(DeitaEmbedParams(model=SCORER, request_cache=False)).process(_rows(conversations))
    got = np.array(out.attributes["deita_embedding"].to_pylist(), dtype=np.float64)

    path = resolve_embedded(SMOLLM2).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, messages in enumerate(conversations):
        text = vicuna_prompt(messages, eos=tok.eos_token)
        assert text.endswith("<|im_end|>")
        with torch.no_grad():
            h = model(input_ids=torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states[-1][0, -1]
        want = (h / h.norm()).double().numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-4)
    assert out.attributes.schema.field("deita_embedding").type == pa.list_(pa.float32())


# --------------------------------------------------------------------------- the Repr Filter


@pytest.mark.parametrize("dim,n", [(3, 400), (8, 700), (32, 500)])
def test_blocked_filter_equals_the_plain_rule_on_random_embeddings(dim, n):
    rng = np.random.default_rng(dim)
    emb = _unit(rng, n, dim)
    emb[rng.integers(0, n, 20)] = emb[rng.integers(0, n, 20)]  # exact duplicates
    scores = rng.integers(0, 6, n).astype(float).tolist()  # many ties: corpus order decides
    order = np.array(sorted(range(n), key=lambda i: (-scores[i], i)))
    for tau in (0.2, 0.5, 0.9):
        for budget in (None, 1, 150):
            want = plain_repr_filter(emb, scores, tau, budget)
            for block, chunk, buckets in ((1, 4, 0), (13, 7, 8), (64, 50, 1), (2048, 8192, 64)):
                res = repr_filter(emb, order, tau, budget, block, chunk, witness_buckets=buckets)
                names = {ACCEPTED: "accepted", TOO_SIMILAR: "too_similar", BELOW_BUDGET: "below_budget"}
                got = {int(row): names[int(s)] for row, s in zip(order, res.status)}
                assert got == want, (tau, budget, block, chunk, buckets)
                rejected = res.status == TOO_SIMILAR
                assert (res.max_similarity[rejected] > tau).all()


def test_filter_stage_equals_the_plain_rule_and_explains_rejections():
    rng = np.random.default_rng(7)
    n, dim = 300, 6
    emb = _unit(rng, n, dim)
    scores = np.round(rng.uniform(1, 36, n), 1).tolist()
    rows = _rows([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(n)])
    rows = rows.append_column("deita_score", pa.array(scores, pa.float64()))
    rows = rows.append_column("deita_embedding", pa.array(emb.tolist(), pa.list_(pa.float32())))
    ids = rows["row_id"].to_pylist()
    for tau, budget in ((0.6, None), (0.8, 40), (0.9, 200)):
        for exact in (False, True):
            out = DeitaFilterStage(DeitaFilterParams(tau=tau, budget=budget, block_size=32, chunk_size=16,
                                                     exact_similarity=exact)).process(rows)
            want = plain_repr_filter(emb, scores, tau, budget)
            assert set(out.attributes["row_id"].to_pylist()) == {ids[i] for i, s in want.items() if s == "accepted"}
            reasons = {r["row_id"]: r for r in out.rejected}
            for i, s in want.items():
                if s == "too_similar":
                    r = reasons[ids[i]]
                    assert r["reason"] == "deita_too_similar" and r["value"] > tau
                    near = ids.index(r["kept_row_id"])
                    assert want[near] == "accepted"
                    assert float(emb[i].astype(float) @ emb[near].astype(float)) == pytest.approx(r["value"])
                    if exact:
                        others = [j for j, t in want.items() if t == "accepted" and
                                  (-scores[j], j) < (-scores[i], i)]
                        assert r["value"] == pytest.approx(max(emb[others].astype(float) @ emb[i].astype(float)))
                elif s == "below_budget":
                    assert reasons[ids[i]]["reason"] == "deita_below_budget"
                    assert reasons[ids[i]]["value"] == scores[i]


def test_filter_without_a_score_walks_in_corpus_order():
    """order_by: null is a pure diversity filter (no scorer): the plain rule with equal scores."""
    rng = np.random.default_rng(11)
    n, dim = 200, 5
    emb = _unit(rng, n, dim)
    rows = _rows([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(n)])
    rows = rows.append_column("deita_embedding", pa.array(emb.tolist(), pa.list_(pa.float32())))
    ids = rows["row_id"].to_pylist()
    stage = DeitaFilterStage(DeitaFilterParams(order_by=None, tau=0.7, budget=30, block_size=16))
    out = stage.process(rows)
    want = plain_repr_filter(emb, [0.0] * n, 0.7, 30)
    assert out.attributes["row_id"].to_pylist() == [ids[i] for i in range(n) if want[i] == "accepted"]
    below = [r for r in out.rejected if r["reason"] == "deita_below_budget"]
    assert len(below) == sum(s == "below_budget" for s in want.values()) > 0
    assert all(r["value"] is None and "corpus order" in r["detail"] for r in below)
    with pytest.raises(ValueError, match="deita_embedding"):
        stage.process(rows.drop(["deita_embedding"]))


def test_failure_codes_are_typed_and_counted_without_reading_detail():
    """Failed scores carry their scorer code in ``code`` (rejected, or walked last and then rejected);
    the filter's summary counts them from that column alone."""
    rng = np.random.default_rng(3)
    n = 8
    emb = _unit(rng, n, 4)
    emb[7] = emb[6]  # row 7 repeats row 6: too similar once row 6 is kept
    rows = _rows([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(n)])
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, None, None, None]
    failures = [None] * 5 + ["quality:backend_error", None, "complexity:truncated"]
    details = [None] * 5 + ["turn 1 of 1: boom", None, "turn 1 of 1: too long"]
    rows = rows.append_column("deita_score", pa.array(scores, pa.float64()))
    rows = rows.append_column("deita_failure", pa.array(failures, pa.string()))
    rows = rows.append_column("deita_failure_detail", pa.array(details, pa.string()))
    rows = rows.append_column("deita_embedding", pa.array(emb.tolist(), pa.list_(pa.float32())))
    ids = rows["row_id"].to_pylist()

    def blank(table: pa.Table) -> pa.Table:
        return table.set_column(table.column_names.index("detail"), "detail", pa.array([""] * table.num_rows))

    stage = DeitaFilterStage(DeitaFilterParams(tau=0.999))
    out = stage.process(rows)
    assert {r["row_id"]: r["code"] for r in out.rejected} == {
        ids[5]: "quality:backend_error", ids[6]: "null_score", ids[7]: "complexity:truncated"}
    assert "deita_score is null" in next(r["detail"] for r in out.rejected if r["row_id"] == ids[6])
    summary = stage.summarize(rows.take([0, 1, 2, 3, 4]), blank(out.rejected_table()))
    assert summary["scoring failures, by reason (every row that reached the filter)"] == {
        "quality:backend_error": 1, "null_score": 1, "complexity:truncated": 1}

    last = DeitaFilterStage(DeitaFilterParams(tau=0.999, budget=7, on_failure="rank_last"))
    out = last.process(rows)
    by_id = {r["row_id"]: r for r in out.rejected}
    assert by_id[ids[7]]["reason"] == "deita_below_budget" and by_id[ids[7]]["code"] == "complexity:truncated"
    out = DeitaFilterStage(DeitaFilterParams(tau=0.999, on_failure="rank_last")).process(rows)
    (too_similar,) = out.rejected
    assert too_similar["row_id"] == ids[7] and too_similar["kept_row_id"] == ids[6]
    assert too_similar["code"] == "complexity:truncated" and too_similar["value"] == pytest.approx(1.0)
    kept = _join_attributes(rows, out.attributes).filter(pa.array([i != 7 for i in range(n)]))
    summary = last.summarize(kept, blank(out.rejected_table()))
    assert summary["scoring failures, by reason (every row that reached the filter)"] == {
        "complexity:truncated": 1, "quality:backend_error": 1}


def test_a_similarity_equal_to_tau_is_accepted():
    tau = np.float32(0.6)
    emb = np.array([[1, 0], [tau, np.sqrt(1 - np.float64(tau) ** 2)], [1, 0]], dtype=np.float32)
    res = repr_filter(emb, np.arange(3), float(tau))
    assert res.status.tolist() == [ACCEPTED, ACCEPTED, TOO_SIMILAR]


@pytest.mark.slow
def test_blocked_filter_equals_the_plain_rule_on_real_embeddings(shared_data):
    conversations = (_real_rows(shared_data, "codealpaca/code_alpaca_2k.json", 120)
                     + _real_rows(shared_data, "sharegpt/dummy_conversation.json", 120))
    rows = _rows(conversations)
    emb_out = DeitaEmbedStage(DeitaEmbedParams(model=MINILM, request_cache=False)).process(rows).attributes
    emb = np.array(emb_out["deita_embedding"].to_pylist(), dtype=np.float32)
    assert emb.shape == (240, 384)
    rng = np.random.default_rng(0)
    scores = rng.integers(1, 8, len(conversations)).astype(float).tolist()
    rows = rows.append_column("deita_score", pa.array(scores, pa.float64()))
    rows = _join_attributes(rows, emb_out)
    ids = rows["row_id"].to_pylist()
    seen_rejections = 0
    for tau in (0.5, 0.7, 0.8, 0.9):
        for budget in (None, 10, 60):
            want = plain_repr_filter(emb, scores, tau, budget)
            for block in (16, 2048):
                out = DeitaFilterStage(DeitaFilterParams(tau=tau, budget=budget, block_size=block)).process(rows)
                assert set(out.attributes["row_id"].to_pylist()) == {ids[i] for i, s in want.items() if s == "accepted"}
                got = {r["row_id"]: r["reason"] for r in out.rejected}
                assert got == {ids[i]: f"deita_{s}" for i, s in want.items() if s != "accepted"}
                seen_rejections += sum(s == "too_similar" for s in want.values())
    assert seen_rejections > 100  # real near-duplicates were there to reject


# --------------------------------------------------------------------------- the flow


@pytest.mark.slow
def test_deita_pipeline_writes_the_budgeted_selection_with_attributes_and_report(tmp_path, shared_data):
    from thresher.flows.curate import execute
    from thresher.flows.registry import parse_config

    code = json.loads((shared_data / "codealpaca/code_alpaca_2k.json").read_text())[:6]
    chats = json.loads((shared_data / "sharegpt/dummy_conversation.json").read_text())[:4]
    code.append({"instruction": " ".join(r["output"] for r in code) * 3, "input": "", "output": "ok"})
    (tmp_path / "code.json").write_text(json.dumps(code))
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    scorer = {"model": SCORER, "max_tokens": 256, "request_cache": False}
    config = parse_config({
        "name": "deita-test", "inputs": [str(tmp_path / "code.json"), str(tmp_path / "chats.json")],
        "out": str(tmp_path / "out"), "shard_rows": 6, "execution": {"workers": 1},
        "output": {"keep_columns": ["deita_embedding"]},  # an intermediate column, kept on request
        "stages": [
            {"stage": "validate"},
            {"stage": "deita_complexity", **scorer},
            {"stage": "deita_quality", **scorer},
            {"stage": "deita_score"},
            {"stage": "deita_embed", "model": MINILM, "request_cache": False},
            {"stage": "deita_filter", "tau": 0.9, "budget": 5},
        ],
    })
    manifest = execute(config, show_progress=False)
    out = tmp_path / "out"
    # the model lifecycle: SmolLM2 loaded once for four tasks (two stages x two shards) and released
    # when deita_quality was over, before all-MiniLM loaded for deita_embed
    assert_loaded_once_released_in_turn(manifest, [SCORER["name"], MINILM["name"]])
    c = manifest["counts"]
    assert c["input"] == 11 and c["output"] == 5
    assert c["rejected_by_reason"]["deita_score_failed"] == 1
    assert c["rejected_by_reason"].get("deita_below_budget", 0) + c["rejected_by_reason"].get("deita_too_similar", 0) == 5
    data = pq.read_table(out / "data")
    attributes = pq.read_table(out / "attributes")
    assert data.num_rows == attributes.num_rows == 5
    assert attributes.schema.field("deita_embedding").type == pa.list_(pa.float32())
    scores = attributes["deita_score"].to_pylist()
    assert all(s is not None for s in scores)
    filt = manifest["summaries"]["deita_filter"]
    assert filt["scoring failures, by reason (every row that reached the filter)"] == {"complexity:truncated": 1}
    assert manifest["summaries"]["deita_complexity"]["output rows scored"] == 5
    report = (out / "report.md").read_text()
    assert "### deita_filter" in report and "deita_complexity statistics" in report
    rejected = pq.read_table(out / "rejected").to_pylist()
    failed = [r for r in rejected if r["reason"] == "deita_score_failed"]
    assert failed[0]["code"] == "complexity:truncated"
    assert failed[0]["detail"].startswith("complexity:truncated: turn 1 of 1: the prompt is")
    assert all(r["kept_row_id"] for r in rejected if r["reason"] == "deita_too_similar")
