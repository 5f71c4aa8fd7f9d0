"""Magpie's near-duplicate removal (``filters/magpie_dedup.py``) with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from thresher.filters.magpie_dedup import MagpieDedupParams, MagpieDedupStage, near_duplicates
from thresher.schemas.records import make_record, records_table

INSTRUCTIONS = [
    "How do I reverse a list in Python?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python ?",      # a near-duplicate of row 0
    "how do i reverse a list in python?",       # another one (cosine 1 after the model's lowercasing)
    "What is the capital of Australia?",
    "12345 67890",                              # no language lingua can place
]


def test_near_duplicates_blockwise_equals_one_block():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb[10] = emb[3] + 1e-3
    emb[40] = emb[3]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    whole = near_duplicates(emb, 0.99, block_bytes=1 << 30)
    blocks = near_duplicates(emb, 0.99, block_bytes=4 * 50 * 3)  # three rows per block
    for a, b in zip(whole, blocks):
        np.testing.assert_allclose(a, b)
    best, count, first = whole
    assert first[10] == first[40] == 3 and first[3] == 3 and count[3] == count[10] == 3
    assert (first == np.arange(50)).sum() == 48 and np.isclose(best[40], 1.0, atol=1e-6)


@pytest.mark.slow
def test_near_duplicate_instructions_keep_the_first_in_corpus_order():
    rows = records_table(make_record([{"role": "user", "content": q}, {"role": "assistant", "content": "a"}],
                                     "m/magpie.jsonl", i) for i, q in enumerate(INSTRUCTIONS))
    out = MagpieDedupStage(MagpieDedupParams(request_cache=False)).process(rows)
    ids = rows["row_id"].to_pylist()
    rejected = {r["row_id"]: r for r in out.rejected}
    assert set(rejected) == {ids[2], ids[3]}
    assert all(r["reason"] == "magpie_near_duplicate" and r["kept_row_id"] == ids[0] and r["value"] >= 0.975
               for r in rejected.values())
    attrs = {r["row_id"]: r for r in out.attributes.to_pylist()}
    assert [attrs[i]["repeat_count"] for i in ids] == [3, 1, 3, 3, 1, 1]
    assert attrs[ids[0]]["min_neighbor_distance"] < 0.05 < attrs[ids[1]]["min_neighbor_distance"]


@pytest.mark.slow
def test_magpie_tag_and_dedup_in_a_flow(tmp_path):
    """validate -> magpie_tag -> magpie_dedup through the flow: every row tagged or given a tag-failure
    reason, near-duplicates out, counts reconciled, tag distributions in the report."""
    from thresher.flows.curate import execute
    from thresher.flows.registry import parse_config

    src = tmp_path / "instructions.jsonl"
    src.write_text("".join(json.dumps({"instruction": q, "output": "a"}) + "\n" for q in INSTRUCTIONS))
    out = tmp_path / "out"
    manifest = execute(parse_config({
        "name": "magpie-stages", "inputs": [str(src)], "out": str(out), "execution": {"workers": 1},
        "stages": [{"stage": "validate"},
                   {"stage": "magpie_tag", "tags": ["input_quality", "language"], "max_tokens": 24,
                    "request_cache": False},
                   {"stage": "magpie_dedup", "request_cache": False}],
    }), show_progress=False)
    c = manifest["counts"]
    assert c["input"] == 6 == c["output"] + c["rejected"] and c["rejected_by_reason"] == {"magpie_near_duplicate": 2}
    data = pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()
    assert [r["messages"][0]["content"] for r in data] == [INSTRUCTIONS[i] for i in (0, 1, 4, 5)]
    attrs = pq.read_table(sorted((out / "attributes").glob("*.parquet"))).to_pylist()
    assert len(attrs) == 4
    for a in attrs:
        assert (a["magpie_input_quality"] is None) != (a["magpie_input_quality_failure"] is None)
        assert a["repeat_count"] >= 1 and a["magpie_tagger"].startswith("hf:embedded:smollm2-135m-instruct@")
    languages = {a["row_id"]: (a["magpie_language"], a["magpie_language_failure"]) for a in attrs}
    assert sorted(languages.values(), key=str) == [("en", None)] * 3 + [(None, "language_undetected")]  # lingua
    summary = manifest["summaries"]["magpie_tag"]
    assert sum(summary["input_quality, kept rows"].values()) + sum(summary["input_quality failures"].values()) == 4
    assert "no reward model" in summary["reward"] and "input_quality failures" in (out / "report.md").read_text()
