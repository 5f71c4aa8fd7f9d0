"""The LLM2LLM loop end to end, through ``thresher llm2llm``: killed while training, resumed.

The student is a very small, randomly initialised model of SmolLM2's architecture with SmolLM2's
real tokenizer (``tests/tiny_models.py``): it trains in seconds and gets every seed wrong, so
the teacher (the real embedded SmolLM2-135M-Instruct) is asked about both seeds. The teacher's replies
are parsed, checked and turned into rows or rejected rows for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from thresher.llm2llm.check import lineage_problems
from thresher.llm2llm.parse import REASONS
from tiny_models import tiny_smollm2

TEACHER_REASONS = set(REASONS) | {"near_copy", "held_out_exact", "held_out_overlap"}


def _config(tmp_path: Path, shared_data: Path) -> Path:
    student = tiny_smollm2(tmp_path / "student-base")
    config = tmp_path / "loop.yaml"
    config.write_text(f"""
name: loop-test
seeds: {{inputs: [{shared_data / 'gsm8k' / 'train.jsonl'}], limit: 2, sample_seed: 3}}
held_out: {{inputs: [{shared_data / 'gsm8k' / 'test.jsonl'}], limit: 3}}
student: {student}
teacher: {{model: embedded:smollm2-135m-instruct, max_tokens: 128, max_retries: 1, response_prefix: "1. Question:",
           stop: ["\\n\\n"]}}
iterations: 2
trainer: {{max_steps: 12, learning_rate: 1.0e-3, max_length: 192}}
evaluation: {{max_tokens: 8}}
""")
    return config


def _run(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "thresher.cli", "llm2llm", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_loop_killed_while_training_resumes_at_that_step(tmp_path, shared_data):
    config, out = _config(tmp_path, shared_data), tmp_path / "out"
    proc = _run(config, out)
    second = out / "iterations" / "02"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(second.glob(".student.tmp-*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the loop ended before its second training: " + proc.stderr.read().decode()[-1500:]
    os.killpg(proc.pid, signal.SIGKILL)  # while iteration 2's student trains
    proc.wait()
    assert not (second / "student").exists() and not (out / "manifest.json").exists()
    first_student = out / "iterations" / "01" / "student"
    made_before = first_student.stat().st_mtime_ns

    proc = _run(config, out)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "augmentations ->" in stdout.decode()
    manifest = json.loads((out / "manifest.json").read_text())

    # resumed at the step it was in: iteration 1 is reused whole, iteration 2 trains once
    steps = {(s["iteration"], s["step"]): s["status"] for s in manifest["steps"]}
    assert steps == {(1, "train"): "skipped", (1, "evaluate"): "reused", (1, "augment"): "reused",
                     (2, "train"): "ran", (2, "evaluate"): "ran", (2, "augment"): steps[(2, "augment")]}
    assert first_student.stat().st_mtime_ns == made_before
    assert not list(second.glob(".student.tmp-*")) and (second / "student" / "thresher_step.json").is_file()

    # every iteration's sets; the lineage holds (the loop checks it too, here it is checked again)
    assert lineage_problems(out) == []
    data = pq.read_table(out / "data").to_pylist()
    seeds = [r for r in data if r["iteration"] == 0]
    augmentations = [r for r in data if r["iteration"] > 0]
    assert len(seeds) == 2 and augmentations, "iteration 1 accepted at least one example (the second trained)"
    first_eval = pq.read_table(out / "iterations" / "01" / "eval.parquet")
    wrong_1 = set(first_eval.filter(pc.invert(first_eval["correct"]))["row_id"].to_pylist())
    for row in augmentations:
        assert row["parent_row_id"] in {s["row_id"] for s in seeds} and row["teacher"]
        assert row["parent_row_id"] not in {a["row_id"] for a in augmentations}
        if row["iteration"] == 1:
            assert row["parent_row_id"] in wrong_1
        origin = json.loads(row["origin"])
        assert origin["iteration"] == row["iteration"] and origin["sampling"]["temperature"] == 1.0
    train_2 = pq.read_table(second / "train.parquet")
    assert train_2.num_rows == 2 + sum(1 for a in augmentations if a["iteration"] == 1)
    assert set(first_eval["split"].to_pylist()) == {"seeds", "held_out"}

    # accuracy per iteration in the manifest and the report; counts reconcile
    assert [a["iteration"] for a in manifest["accuracy"]] == [1, 2]
    assert all(a["seeds"] is not None and a["held_out"] is not None for a in manifest["accuracy"])
    assert "| iteration | trained on | seeds accuracy | held-out accuracy |" in (out / "report.md").read_text()
    counts = manifest["counts"]
    assert counts["output"] == len(data) == 2 + counts["augmentations"]
    assert counts["seeds"]["read"] == counts["seeds"]["used"] + counts["seeds"]["not_sampled"] + counts["seeds"]["rejected"]

    # unusable teacher output is rejected rows with reasons, never a crash; retries capped and counted
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert len(rejected) == counts["rejected"]
    assert {r["reason"] for r in rejected} <= TEACHER_REASONS
    assert all(r["parent_row_id"] in {s["row_id"] for s in seeds} and r["raw"] is not None for r in rejected)
    for m in manifest["iterations"]:
        assert m["requests"] == m["seeds_wrong"] + m["retries"]  # a first request each, then the retries
        assert m["retries"] <= m["seeds_wrong"] * 1  # max_retries: 1
        assert m["seeds_short"] <= m["seeds_wrong"]
