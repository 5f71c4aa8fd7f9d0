"""GRAPE (arXiv 2502.04194): scoring stage ``grape`` and selection stage ``grape_select``.

Real models, no mocks. The reference scores are recomputed here with a plain
transformers model (one forward per candidate and a hand-written log-softmax
gather, plus a one-forward-per-prefix loop on a few candidates), with the prompt
rendered here from the documented plain template, independently of the stage.
Kept small for a 2-core CPU: 8 short AlpacaEval instructions x 9 candidates,
a 32-token cap on prompt + response.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from thresher.flows.curate import apply_overrides, execute
from thresher.flows.registry import load_config, parse_config
from thresher.schemas.config import ConfigError
from thresher.schemas.records import make_record, records_table
from thresher.selectors.grape_prompt import PLAIN_TEMPLATE, render_text
from thresher.selectors.grape_select import GrapeSelectParams, GrapeSelectStage

TARGET = "embedded:gemma-3-270m"
N_GROUPS = 8
CAP = 32
MODELS = [
    "Mistral-7B-Instruct-v0.2", "Mixtral-8x7B-Instruct-v0.1", "NullModel", "alpaca-7b", "claude-2",
    "falcon-7b-instruct", "gpt4_1106_preview", "llama-2-70b-chat-hf", "vicuna-7b",
]


# --------------------------------------------------------------------------- helpers


def plain_prompt(messages: list[dict]) -> str:
    """The documented plain template, written out by hand (multi-turn, system turn)."""
    text = ""
    for m in messages[:-1]:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "### Instruction:\n" + m["content"] + "\n\n### Response:\n"
        else:
            text += m["content"] + "\n\n"
    return text


class Reference:
    """A plain transformers causal LM: log p(response | prompt) by hand."""

    def __init__(self, name: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from thresher.generators.embedded import resolve_embedded

        path = resolve_embedded(name).path
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()

    def ids(self, prompt: str, response: str, cap: int) -> tuple[list[int], int]:
        p = self.tok(prompt)["input_ids"]  # the tokenizer's own BOS
        r = self.tok(response, add_special_tokens=False)["input_ids"]
        return (p + r)[:cap], len(p)

    def full_length(self, prompt: str, response: str) -> int:
        return len(self.ids(prompt, response, 10**9)[0])

    def one_forward(self, prompt: str, response: str, cap: int) -> list[float]:
        ids, n_prompt = self.ids(prompt, response, cap)
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        return [float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]

    def per_prefix(self, prompt: str, response: str, cap: int) -> list[float]:
        ids, n_prompt = self.ids(prompt, response, cap)
        out = []
        with torch.no_grad():
            for t in range(n_prompt, len(ids)):
                last = self.model(input_ids=torch.tensor([ids[:t]]), logits_to_keep=1).logits[0, -1].double()
                out.append(float(torch.log_softmax(last, -1)[ids[t]]))
        return out


def write_sample(folder: Path, shared_data: Path, n: int) -> list[Path]:
    """The first ``n`` short instructions (<= 70 characters, so that their prompts leave room
    for response tokens under the cap) with their rows of every AlpacaEval model file."""
    folder.mkdir(parents=True, exist_ok=True)
    first = json.loads((shared_data / "alpaca_eval/gpt4_1106_preview.json").read_text())
    chosen = [r["instruction"] for r in first if len(r["instruction"]) <= 70][:n]
    paths = []
    for name in MODELS:
        by_instruction = {r["instruction"]: r for r in json.loads((shared_data / f"alpaca_eval/{name}.json").read_text())}
        rows = [by_instruction[i] for i in chosen]
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows))
        paths.append(path)
    return paths


def grape_config(inputs, out: Path, workers: int, shard_rows: int, cache: Path):
    return parse_config({
        "name": "grape-test", "inputs": [str(p) for p in inputs], "out": str(out),
        "shard_rows": shard_rows, "execution": {"workers": workers},
        "stages": [
            {"stage": "validate"},
            {"stage": "grape", "model": TARGET, "max_tokens": CAP, "request_cache_path": str(cache)},
            {"stage": "grape_select"},
        ],
    })


def read(out: Path, folder: str) -> list[dict]:
    files = sorted((out / folder).glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def scores_by_row(out: Path) -> dict[str, float | None]:
    """Every candidate's grape_logprob_mean: kept rows' attributes + rejected rows' value."""
    scores = {r["row_id"]: r["grape_logprob_mean"] for r in read(out, "attributes")}
    scores.update({r["row_id"]: r["value"] for r in read(out, "rejected") if r["stage"] == "grape_select"})
    return scores


# --------------------------------------------------------------------------- no model


def test_plain_template_renders_multi_turn_history_and_system():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi {there}"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    assert render_text(history, PLAIN_TEMPLATE, "\n\n", "{system}\n\n") == (
        "Be brief.\n\n### Instruction:\nHi {there}\n\n### Response:\nHello.\n\n"
        "### Instruction:\n2+2?\n\n### Response:\n"
    )
    assert render_text(history, "Q: {instruction}\nA:", "\n", "[{system}] ") == (
        "[Be brief.] Q: Hi {there}\nA:Hello.\nQ: 2+2?\nA:")


@pytest.mark.parametrize("bad, message", [
    ({"template": "no field here"}, "format string"),
    ({"template": "{prompt} then"}, "instruction"),
    ({"template": "{instruction} and {instruction}"}, "exactly once"),
    ({"template": "{instruction"}, "valid format string"),
    ({"system_format": "no system"}, "system"),
    ({"max_tokens": 1}, "greater than or equal"),
    ({"temperature": 1}, "unknown key"),
])
def test_bad_grape_params_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"stages": [{"stage": "grape", **bad}]})


def _table(rows: list[tuple]) -> pa.Table:
    """(instruction, response, candidate, score, meta) -> canonical rows with grape_logprob_mean."""
    records = [
        make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "t/x.json", i,
                    candidate=c, meta=meta)
        for i, (q, a, c, _, meta) in enumerate(rows)
    ]
    table = records_table(records)
    return table.append_column("grape_logprob_mean", pa.array([r[3] for r in rows], pa.float64()))


def test_select_argmax_ties_unscored_and_correctness():
    rows = _table([
        ("q1", "a", "m1", -2.0, {}),
        ("q1", "b", "m2", -1.0, {}),   # q1's best
        ("q1", "c", "m3", -1.0, {}),   # ties with b: b comes first
        ("q2", "d", "m1", None, {}),   # unscored: never beats a scored row
        ("q2", "e", "m2", -9.0, {}),   # q2's best
        ("q3", "f", "m1", None, {}),   # no score in the whole group
        ("q3", "g", "m2", None, {}),
    ])
    out = GrapeSelectStage().process(rows)
    ids = rows["row_id"].to_pylist()
    by_id = {r["row_id"]: r for r in out.rejected}
    assert set(ids) - set(by_id) == {ids[1], ids[4]}
    assert {by_id[ids[i]]["reason"] for i in (0, 2, 3)} == {"grape_not_best"}
    assert {by_id[ids[i]]["reason"] for i in (5, 6)} == {"grape_unscored"}
    assert by_id[ids[0]]["value"] == -2.0 and by_id[ids[3]]["value"] is None
    assert by_id[ids[0]]["kept_row_id"] == by_id[ids[2]]["kept_row_id"] == ids[1]
    assert by_id[ids[3]]["kept_row_id"] == ids[4]
    assert by_id[ids[5]].get("kept_row_id") is None and by_id[ids[6]].get("kept_row_id") is None
    assert ids[1] in by_id[ids[0]]["detail"] and "-1.000000" in by_id[ids[0]]["detail"]
    assert "tie" in by_id[ids[2]]["detail"]


def test_select_summary_reads_models_from_canonical_columns_not_detail():
    rows = _table([
        ("q1", "a", "m1", -2.0, {}),
        ("q1", "b", "m2", -1.0, {}),
        ("q2", "c", "m1", -0.5, {}),
        ("q2", "d", "m2", -3.0, {}),
        ("q2", "e", None, -4.0, {}),   # no candidate name: the model is its source
    ])
    stage = GrapeSelectStage()
    out = stage.process(rows).rejected_table()
    lost = rows.take(pa.array([rows["row_id"].to_pylist().index(r) for r in out["row_id"].to_pylist()]))
    # the rejected rows as OUT/rejected holds them, with every detail blanked: the summary must not need it
    rejected = out.set_column(out.column_names.index("detail"), "detail", pa.array([""] * out.num_rows))
    rejected = rejected.append_column("source", lost["source"]).append_column("candidate", lost["candidate"])
    kept = rows.filter(pa.array([r not in set(out["row_id"].to_pylist()) for r in rows["row_id"].to_pylist()]))
    table = stage.summarize(kept, rejected)["wins and grape_logprob_mean per model"]
    got = {r["model"]: (r["rows"], r["wins"], r["mean"]) for r in table}
    assert got == {"m1": (2, 1, -1.25), "m2": (2, 1, -2.0), "t/x.json": (1, 0, -4.0)}


def test_correctness_prefilter_from_input_field_or_attribute():
    rows = _table([
        ("q1", "a", "m1", -0.5, {"correct": False}),  # best score, but wrong
        ("q1", "b", "m2", -1.0, {"correct": "yes"}),
        ("q1", "c", "m3", -3.0, {}),                   # unknown: kept as a candidate
        ("q2", "d", "m1", -1.0, {"correct": 0}),       # every candidate wrong: none kept
    ])
    out = GrapeSelectStage(GrapeSelectParams(correct_column="correct")).process(rows)
    ids = rows["row_id"].to_pylist()
    reasons = {r["row_id"]: r["reason"] for r in out.rejected}
    assert reasons == {ids[0]: "grape_incorrect", ids[2]: "grape_not_best", ids[3]: "grape_incorrect"}
    as_attribute = rows.append_column("is_ok", pa.array([True, False, True, True]))
    out = GrapeSelectStage(GrapeSelectParams(correct_column="is_ok")).process(as_attribute)
    assert {r["row_id"]: r["reason"] for r in out.rejected} == {ids[1]: "grape_incorrect", ids[2]: "grape_not_best"}
    with pytest.raises(ValueError, match="is neither an attribute column"):
        GrapeSelectStage(GrapeSelectParams(correct_column="missing")).process(rows)
    bad = _table([("q1", "a", "m1", -1.0, {"correct": "maybe"})])
    with pytest.raises(ValueError, match="not a correctness value"):
        GrapeSelectStage(GrapeSelectParams(correct_column="correct")).process(bad)


def test_example_config_reads_the_nine_alpaca_eval_files(repo_root):
    from thresher.schemas.readers import discover_inputs

    config = load_config(repo_root / "examples/grape.yaml")
    assert [s.stage for s in config.stages] == ["validate", "grape", "grape_select"]
    grape = config.stages[1].params
    assert grape.model.name == TARGET and grape.max_tokens == 512 and grape.template == "auto"
    assert sorted(p.stem for p in discover_inputs(config.inputs)) == sorted(MODELS)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process models use one thread, as each of two local Dask workers on 2 cores does:
    on a busy 2-core machine two spinning threads are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference():
    return Reference(TARGET)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, shared_data):
    return write_sample(tmp_path_factory.mktemp("alpaca_sample"), shared_data, N_GROUPS)


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory, sample):
    """The sample through validate -> grape -> grape_select: one worker, one shard."""
    root = tmp_path_factory.mktemp("grape_run")
    manifest = execute(grape_config(sample, root / "one", 1, 10_000, root / "requests.sqlite"), show_progress=False)
    return root, manifest


@pytest.mark.slow
def test_one_row_per_instruction_each_the_argmax(one_worker_run):
    root, manifest = one_worker_run
    out = root / "one"
    c = manifest["counts"]
    assert c["input"] == N_GROUPS * len(MODELS) == c["output"] + c["rejected"]
    assert c["output"] == c["groups_output"] == N_GROUPS
    assert c["rejected_by_reason"] == {"grape_not_best": N_GROUPS * (len(MODELS) - 1)}
    data, attributes = read(out, "data"), {r["row_id"]: r for r in read(out, "attributes")}
    scores = scores_by_row(out)
    groups: dict[str, list[str]] = {}
    kept_by: dict[str, str] = {}
    for r in read(out, "rejected"):
        groups.setdefault(json.dumps(json.loads(r["raw"])[:-1]), []).append(r["row_id"])
        kept_by[r["row_id"]] = r["kept_row_id"]
    for row in data:
        a = attributes[row["row_id"]]
        assert a["grape_model"].startswith("hf:embedded:gemma-3-270m@")
        assert a["grape_template"] == PLAIN_TEMPLATE  # gemma-3-270m is a base model: no chat template
        assert a["grape_n_tokens"] > 0 and math.isclose(a["grape_logprob_sum"] / a["grape_n_tokens"],
                                                         a["grape_logprob_mean"], abs_tol=1e-9)
        losers = groups[json.dumps(row["messages"][:-1])]
        assert len(losers) == len(MODELS) - 1
        assert {kept_by[r] for r in losers} == {row["row_id"]}  # each loser names its group's winner
        assert all(scores[r] < a["grape_logprob_mean"] for r in losers)
    summary = manifest["summaries"]["grape_select"]
    table = summary["wins and grape_logprob_mean per model"]
    assert sum(r["wins"] for r in table) == N_GROUPS and sum(r["rows"] for r in table) == N_GROUPS * len(MODELS)
    assert sorted(r["source"].split("/")[-1] for r in table) == sorted(f"{m}.json" for m in MODELS)
    report = (out / "report.md").read_text()
    assert "wins and grape_logprob_mean per model" in report and "| model | source |" in report


@pytest.mark.slow
def test_null_model_garbage_is_never_selected(one_worker_run):
    root, manifest = one_worker_run
    winners = read(root / "one", "data")
    assert len(winners) == N_GROUPS
    assert not any(r["source"].endswith("/NullModel.json") for r in winners)
    table = manifest["summaries"]["grape_select"]["wins and grape_logprob_mean per model"]
    null = next(r for r in table if r["source"].endswith("/NullModel.json"))
    assert null["model"] == "example" and null["wins"] == 0 and null["rows"] == N_GROUPS
    best_other_p10 = max(r["p10"] for r in table if r is not null)
    assert null["p90"] < best_other_p10  # the garbage scores far below every real model


@pytest.mark.slow
def test_scores_match_an_independent_slow_reference(one_worker_run, reference):
    root, _ = one_worker_run
    out = root / "one"
    scores = scores_by_row(out)
    attributes = {r["row_id"]: r for r in read(out, "attributes")}
    kept = {r["row_id"] for r in read(out, "data")}
    candidates = read(out, "data") + [
        {"row_id": r["row_id"], "messages": json.loads(r["raw"])} for r in read(out, "rejected")]
    by_group: dict[str, list[dict]] = {}
    for r in candidates:
        by_group.setdefault(r["messages"][0]["content"], []).append(r)
    sampled = sorted(by_group)[:3]
    for instruction in sampled:
        group = by_group[instruction]
        ref = {}
        for r in group:
            prompt, response = plain_prompt(r["messages"]), r["messages"][-1]["content"]
            logps = reference.one_forward(prompt, response, CAP)
            ref[r["row_id"]] = sum(logps) / len(logps)
            assert scores[r["row_id"]] == pytest.approx(ref[r["row_id"]], abs=1e-4)
            if r["row_id"] in attributes:
                a = attributes[r["row_id"]]
                assert a["grape_n_tokens"] == len(logps)
                assert a["grape_truncated"] == (reference.full_length(prompt, response) > CAP)
                assert a["grape_logprob_sum"] == pytest.approx(sum(logps), abs=1e-3)
        best = max(ref, key=ref.get)
        assert best in kept
        runner_up = sorted(ref.values())[-2]
        assert ref[best] - runner_up > 2e-4  # the argmax is not decided by float noise
    # the gather itself against one forward per prefix, on one group's winner
    for r in [g for g in by_group[sampled[0]] if g["row_id"] in kept]:
        prompt, response = plain_prompt(r["messages"]), r["messages"][-1]["content"]
        np.testing.assert_allclose(reference.per_prefix(prompt, response, CAP),
                                   reference.one_forward(prompt, response, CAP), atol=1e-4)


@pytest.mark.slow
def test_example_config_runs_on_other_candidate_sets(tmp_path, repo_root, reference):
    """`thresher run examples/grape.yaml --input <files>`: multi-candidate rows and multi-turn candidates."""
    cands = [
        {"instruction": "Name the capital of France.", "candidates": [
            {"model": "m1", "response": "The capital of France is Paris."},
            {"model": "m2", "response": "Paris."},
            {"model": "m3", "response": "zq xv } } ]] banana Paris?"}]},
        {"instruction": "What is 12 times 3?", "candidates": [
            {"model": "m1", "response": "12 times 3 is 36."},
            {"model": "m2", "response": "36"},
            {"model": "m3", "response": "It is 38, probably."}]},
    ]
    history = [{"role": "system", "content": "You are a concise assistant."},
               {"role": "user", "content": "Give me a fruit."},
               {"role": "assistant", "content": "An apple."},
               {"role": "user", "content": "Now a vegetable."}]
    turns = [{"messages": history + [{"role": "assistant", "content": a}]}
             for a in ("A carrot.", "Carrots are root vegetables; a carrot.", "Blue the seven.")]
    (tmp_path / "cands.jsonl").write_text("\n".join(json.dumps(r) for r in cands) + "\n")
    (tmp_path / "turns.jsonl").write_text("\n".join(json.dumps(r) for r in turns) + "\n")
    config = apply_overrides(load_config(repo_root / "examples/grape.yaml"),
                             inputs=[str(tmp_path / "cands.jsonl"), str(tmp_path / "turns.jsonl")],
                             out=str(tmp_path / "out"), workers=1)
    manifest = execute(config, show_progress=False)
    assert manifest["counts"]["output"] == 3 and manifest["counts"]["rejected"] == 6
    out = tmp_path / "out"
    scores = scores_by_row(out)
    kept = {r["row_id"]: r for r in read(out, "data")}
    rows = list(kept.values()) + [
        {"row_id": r["row_id"], "messages": json.loads(r["raw"])} for r in read(out, "rejected")]
    by_prompt: dict[str, dict[str, float]] = {}
    for r in rows:
        logps = reference.one_forward(plain_prompt(r["messages"]), r["messages"][-1]["content"], 512)
        ref = sum(logps) / len(logps)
        assert scores[r["row_id"]] == pytest.approx(ref, abs=1e-4)
        by_prompt.setdefault(json.dumps(r["messages"][:-1]), {})[r["row_id"]] = ref
    assert len(by_prompt) == 3
    for group in by_prompt.values():
        assert max(group, key=group.get) in kept
    table = manifest["summaries"]["grape_select"]["wins and grape_logprob_mean per model"]
    assert {r["model"] for r in table} >= {"m1", "m2", "m3"}


@pytest.mark.slow
def test_truncation_is_recorded_and_edge_rows_never_crash(gemma_backend):
    from thresher.selectors.grape import GrapeParams, GrapeStage

    long = " ".join(["word"] * 300)
    rows = records_table([
        make_record([{"role": "user", "content": "Repeat a word."}, {"role": "assistant", "content": long}], "t/a", 0),
        make_record([{"role": "user", "content": "too long a prompt " * 40},
                     {"role": "assistant", "content": "ok"}], "t/a", 1),
        make_record([{"role": "user", "content": "Is anyone there?"}], "t/a", 2),
    ])
    stage = GrapeStage(GrapeParams(max_tokens=32, request_cache=False))
    out = stage.process(rows)
    attrs = {r["row_id"]: r for r in out.attributes.to_pylist()}
    ids = rows["row_id"].to_pylist()
    n_prompt = len(gemma_backend.encode_prompts([PLAIN_TEMPLATE.format(instruction="Repeat a word.")])[0])
    assert attrs[ids[0]]["grape_truncated"] and attrs[ids[0]]["grape_n_tokens"] == 32 - n_prompt
    assert attrs[ids[1]]["grape_truncated"] and attrs[ids[1]]["grape_n_tokens"] == 0
    assert attrs[ids[1]]["grape_logprob_mean"] is None
    assert [(r["row_id"], r["reason"]) for r in out.rejected] == [(ids[2], "grape_no_response")]
    uncapped = GrapeStage(GrapeParams(max_tokens=None, request_cache=False)).process(rows.slice(0, 1))
    assert not uncapped.attributes["grape_truncated"][0].as_py()
    assert uncapped.attributes["grape_n_tokens"][0].as_py() == len(gemma_backend.encode_continuations([long])[0])


@pytest.mark.slow
def test_prompt_format_follows_the_target(smollm2_backend, gemma_backend):
    from thresher.selectors.grape_prompt import resolve_format

    history = [{"role": "user", "content": "Hi"}]
    chat = resolve_format("auto", smollm2_backend)
    assert chat.label.startswith("chat_template@")
    assert chat.render(history) == smollm2_backend.apply_chat_template(history, add_generation_prompt=True)
    assert resolve_format("auto", gemma_backend).label == PLAIN_TEMPLATE
    assert resolve_format("plain", smollm2_backend).render(history) == "### Instruction:\nHi\n\n### Response:\n"
    with pytest.raises(ValueError, match="has none"):
        resolve_format("chat", gemma_backend)
    custom = resolve_format("<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n", gemma_backend)
    assert custom.render(history).startswith("<start_of_turn>user\nHi<end_of_turn>")
