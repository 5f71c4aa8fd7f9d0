"""Magpie's near-duplicate removal (``filters/magpie_dedup.py``) with the real all-MiniLM-L6-v2."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
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
def test_magpie_tag_gives_every_row_a_label_or_a_reason_for_every_tag():
    """SmolLM2-135M as the tagger (it mostly echoes the placeholders: a garbage-answering tagger) and
    lingua for the language: nothing crashes, no tag is null without a reason, the summary counts them."""
    from thresher.generators.magpie_tags import TASKS
    from thresher.selectors.magpie_tag import MagpieTagParams, MagpieTagStage

    rows = records_table(make_record([{"role": "user", "content": q}, {"role": "assistant", "content": "a"}],
                                     "m/magpie.jsonl", i) for i, q in enumerate(INSTRUCTIONS[i] for i in (0, 1, 5)))
    stage = MagpieTagStage(MagpieTagParams(max_tokens=24, request_cache=False))
    attrs = stage.process(rows).attributes.to_pylist()
    assert len(attrs) == 3
    for a in attrs:
        for tag in ("input_quality", "difficulty", "task_category"):
            assert (a[f"magpie_{tag}"] is None) != (a[f"magpie_{tag}_failure"] is None)
            assert a[f"magpie_{tag}"] in (None, *TASKS[tag].labels)
        assert a["magpie_tagger"].startswith("hf:embedded:smollm2-135m-instruct@")
    assert [(a["magpie_language"], a["magpie_language_failure"]) for a in attrs] == \
        [("en", None), ("en", None), (None, "language_undetected")]
    kept = rows.append_column("magpie_input_quality", pa.array([a["magpie_input_quality"] for a in attrs], pa.string()))
    kept = kept.append_column("magpie_input_quality_failure",
                              pa.array([a["magpie_input_quality_failure"] for a in attrs], pa.string()))
    summary = stage.summarize(kept, rows.slice(0, 0))
    assert sum(summary["input_quality, kept rows"].values()) + sum(summary["input_quality failures"].values()) == 3
    assert "no reward model" in summary["reward"]


def test_reward_from_a_local_sequence_classifier(tmp_path, smollm2_backend):
    """A real (small, randomly initialized) Llama reward head with SmolLM2's tokenizer and chat template,
    saved locally and loaded by path: the stage's rewards are the model's logit on each rendered
    conversation, batched and padded as one; a row with no response gets a reason, not a number."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from thresher.selectors.magpie_tag import MagpieTagParams, MagpieTagStage

    tok = smollm2_backend.tokenizer
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")

    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in ((INSTRUCTIONS[0], "Use reversed() or slicing: xs[::-1]."),
                                  (INSTRUCTIONS[1], "Red leaves drift down"))]
    rows = records_table(make_record(c, "m/rm.jsonl", i) for i, c in enumerate(
        [*conversations, [{"role": "user", "content": INSTRUCTIONS[4]}]]))
    stage = MagpieTagStage(MagpieTagParams(tags=["language"], reward_model=str(tmp_path / "rm"), request_cache=False))
    attrs = stage.process(rows).attributes.to_pylist()

    def direct(conversation):
        ids = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False,
                  return_tensors="pt")
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    np.testing.assert_allclose([a["magpie_reward"] for a in attrs[:2]], [direct(c) for c in conversations], atol=1e-5)
    assert attrs[0]["magpie_reward"] != attrs[1]["magpie_reward"]
    assert [a["magpie_reward_failure"] for a in attrs] == [None, None, "no_response"]
    assert attrs[0]["magpie_reward_model"] == "reward:rm" and attrs[2]["magpie_reward"] is None
    summary = stage.summarize(rows.append_column("magpie_reward", pa.array([a["magpie_reward"] for a in attrs])),
                              rows.slice(0, 0))
    assert "reward of the kept rows (min / median / max)" in summary
