"""Near-duplicates and benchmark contamination on a corpus with both planted in it.

The corpus is real data: 600 CodeAlpaca rows and 200 GSM8K *train* problems (the same domain
as the benchmark, none of its questions) as clean rows; 60 near-duplicates of clean rows made
by word-level edits (insertions, deletions, substitutions) whose word 5-gram Jaccard with
their original is at least 0.8; and 60 GSM8K *test* questions (the benchmark) with a short
preface or suffix added, answered. The stages must find >= 95% of each and flag <= 1% of the
clean rows. (1 vs 2 workers and other shard sizes: tests/test_flow.py.)
"""

from __future__ import annotations

import json
import random

import pytest

from thresher.filters.decontaminate import DecontaminateStage
from thresher.filters.near_dedup import NearDedupStage
from thresher.filters.text_ngrams import normalized_words
from thresher.flows.registry import parse_config
from thresher.schemas.config import ConfigError
from thresher.schemas.records import make_record, records_table

PREFACES = ["Please solve the following problem.", "Here is a math question for you:", "Answer this:"]
SUFFIXES = ["Show your work.", "Explain step by step.", "Give only the final number."]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    wa, wb = normalized_words([a, b]).to_pylist()
    sa = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    sb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def _edit(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        op = rng.choice(["insert", "delete", "substitute"])
        if op == "insert":
            words.insert(i, rng.choice(["really", "also", "then", "now"]))
        elif op == "delete" and len(words) > 1:
            del words[i]
        else:
            words[i] = rng.choice(["thing", "value", "item", "part"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data):
    rng = random.Random(5)
    code = json.loads((shared_data / "codealpaca" / "code_alpaca_2k.json").read_text())
    train = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]]
    test = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    clean = [[{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
              {"role": "assistant", "content": r["output"]}] for r in code[:600]]
    clean += [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in train]
    near = []
    for original in rng.sample(clean, len(clean)):
        user = original[0]["content"] + "\n" + original[1]["content"]
        if len(user.split()) < 40:
            continue
        edited = _edit(original[1]["content"], rng)
        copy = [original[0], {"role": "assistant", "content": edited}]
        if _jaccard(user, original[0]["content"] + "\n" + edited) >= 0.8:
            near.append(copy)
        if len(near) == 60:
            break
    contaminated = [[{"role": "user", "content": f"{rng.choice(PREFACES)} {r['question']}" if i % 2 else
                      f"{r['question']} {rng.choice(SUFFIXES)}"},
                     {"role": "assistant", "content": "Let me think it through."}]
                    for i, r in enumerate(rng.sample(test, 60))]
    rows = [make_record(m, "clean.jsonl", i) for i, m in enumerate(clean)]
    rows += [make_record(m, "near.jsonl", i) for i, m in enumerate(near)]
    rows += [make_record(m, "contaminated.jsonl", i) for i, m in enumerate(contaminated)]
    assert len(near) == 60
    return records_table(rows)


def _by_source(table, ids):
    sources = dict(zip(table["row_id"].to_pylist(), table["source"].to_pylist()))
    out: dict[str, int] = {}
    for rid in ids:
        out[sources[rid]] = out.get(sources[rid], 0) + 1
    return out


def test_near_duplicates_are_found_and_clean_rows_kept(corpus):
    stage = NearDedupStage()
    half = corpus.num_rows // 2  # two shards' signatures, as the flow gives them
    mapped = [stage.map_shard(corpus.slice(0, half)), stage.map_shard(corpus.slice(half))]
    import pyarrow as pa

    output = stage.process(pa.concat_tables(mapped))
    found = _by_source(corpus, [r["row_id"] for r in output.rejected])
    assert found.get("near.jsonl", 0) >= 0.95 * 60
    assert found.get("clean.jsonl", 0) + found.get("contaminated.jsonl", 0) <= 0.01 * 860
    sources = dict(zip(corpus["row_id"].to_pylist(), corpus["source"].to_pylist()))
    for r in output.rejected:  # kept: the first in corpus order (clean.jsonl sorts before near.jsonl)
        assert r["reason"] == "near_duplicate" and 0 < r["value"] <= 1
        if sources[r["row_id"]] == "near.jsonl":
            assert sources[r["kept_row_id"]] == "clean.jsonl"


def test_contaminated_rows_are_found_with_the_benchmark_row_and_n_gram(corpus, shared_data, tmp_path):
    config = parse_config({"stages": [{"stage": "decontaminate", "benchmarks": [
        {"path": str(shared_data / "gsm8k" / "test.jsonl"), "fields": ["question", "answer"], "name": "gsm8k"}]}]})
    stage = DecontaminateStage(config.stages[0].params)
    output = stage.process(corpus)
    found = _by_source(corpus, [r["row_id"] for r in output.rejected])
    assert found.get("contaminated.jsonl", 0) >= 0.95 * 60
    assert found.get("clean.jsonl", 0) + found.get("near.jsonl", 0) <= 0.01 * 860
    test = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    for r in output.rejected:
        assert r["reason"] == "contaminated" and r["code"] == "gsm8k"
        words = normalized_words([test[int(r["value"])]["question"] + " " + test[int(r["value"])]["answer"]])
        assert r["evidence"] in " ".join(words.to_pylist()[0]) and len(r["evidence"].split()) == 13

    with pytest.raises(ConfigError, match="benchmark file .*nope.jsonl does not exist"):
        parse_config({"stages": [{"stage": "decontaminate", "benchmarks": [{"path": "nope.jsonl", "fields": ["q"]}]}]})
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    bad = parse_config({"stages": [{"stage": "decontaminate",
                                    "benchmarks": [{"path": str(tmp_path / "b.jsonl"), "fields": ["prompt"]}]}]})
    with pytest.raises(ValueError, match="no row has the field"):
        DecontaminateStage(bad.stages[0].params).process(corpus.slice(0, 2))


def test_semantic_duplicates_with_computed_or_reused_embeddings(corpus):
    import pyarrow as pa

    from thresher.filters.semantic_dedup import SemanticDedupStage

    near = corpus.filter(pa.compute.equal(corpus["source"], "near.jsonl")).slice(0, 10)
    prompts = {m[0]["content"] for m in near["messages"].to_pylist()}
    clean = corpus.filter(pa.compute.equal(corpus["source"], "clean.jsonl"))
    originals = [i for i, m in enumerate(clean["messages"].to_pylist()) if m[0]["content"] in prompts]
    others = [i for i in range(40) if i not in originals][:20]
    rows = pa.concat_tables([clean.take(sorted(originals + others)), near])  # the near rows' originals + 20 more
    stage = SemanticDedupStage(SemanticDedupStage.Params(request_cache=False))
    mapped = stage.map_shard(rows)  # no embedding column: MiniLM embeds the rows
    output = stage.process(mapped)
    found = _by_source(rows, [r["row_id"] for r in output.rejected])
    assert found.get("near.jsonl", 0) >= 9 and "clean.jsonl" not in found
    assert all(r["reason"] == "semantic_duplicate" and r["value"] > 0.95 for r in output.rejected)
    # an embedding column an earlier stage wrote is reused as it is (no model is loaded)
    reused = rows.append_column("deita_embedding", mapped["embedding"])
    again = SemanticDedupStage(SemanticDedupStage.Params(model="no/such-model")).process(
        SemanticDedupStage(SemanticDedupStage.Params(model="no/such-model")).map_shard(reused))
    assert again.rejected == output.rejected
