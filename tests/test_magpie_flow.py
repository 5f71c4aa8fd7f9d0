"""Magpie end to end in the real flow: rows made from nothing, answered, deduplicated, selected.

A real `thresher run` (Prefect + a local Dask cluster + the embedded SmolLM2) is killed while
the `magpie` source stage generates, resumed on two Dask workers, and compared with a clean
run of the same config in another folder on one worker: the same rows and the same KD labels
(the pipeline ends with `kd_logprobs`), no finished task made twice, the ledger reconciled
with the created and replaced rows counted. (The request cache is off, so the clean run
draws every row again. The tags and the near-duplicate stage are tested in
tests/test_magpie_dedup.py; the example config runs them all.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from thresher.flows.curate import apply_overrides, execute
from thresher.flows.registry import load_config

TASKS = 4
CONFIG = f"""\
name: magpie-test
execution: {{workers: 1}}
stages:
  - {{stage: magpie, count: {TASKS * 2}, rows_per_task: 2, n_per_call: 2, max_tokens: 20, seed: 7,
      request_cache: false}}
  - {{stage: magpie_response, max_tokens: 6, request_cache: false}}
  - {{stage: select, where: ["magpie_instruction_ends_with_colon == 0"], order_by: magpie_response_tokens, budget: 100}}
  - {{stage: kd_logprobs, k: 4, request_cache: false}}
"""


def _run(config: Path, out: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "thresher.cli", "run", str(config), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)


def _finished(folder: Path) -> int:
    return sum(1 for d in folder.glob("*/result.json")) if folder.is_dir() else 0


def _workers(out: Path, *stages: str) -> set[str]:
    """The Dask workers that computed these stages' results."""
    return {json.loads(f.read_text())["worker"] for stage in stages
            for f in (out / ".thresher" / stage).glob("*/result.json")}


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(sorted((out / name).glob("*.parquet"))).to_pylist()


@pytest.mark.slow
def test_magpie_killed_during_generation_resumes_and_equals_a_clean_run(tmp_path):
    config = tmp_path / "magpie.yaml"
    config.write_text(CONFIG)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run(config, killed)
    made = killed / ".thresher" / "magpie"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _finished(made) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read().decode()[-800:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before_kill = _finished(made)
    assert 2 <= finished_before_kill < TASKS and not (killed / "manifest.json").exists()

    # resume on two warm Dask workers, then a clean run in another folder on one: in this process
    # (the CLI's code), on a cluster given by address (its imports are paid once)
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run = lambda out: execute(apply_overrides(load_config(config), out=str(out),  # noqa: E731
                                                  dask_address=cluster.scheduler_address), show_progress=False)
        manifest = run(killed)
        magpie = manifest["stages"][0]
        assert magpie["cached"] == finished_before_kill and magpie["computed"] == TASKS - finished_before_kill
        assert len(_workers(killed, "magpie_response", "kd_logprobs")) == 2
        cluster.scale(1)
        while len(cluster.scheduler_info["workers"]) != 1:
            time.sleep(0.05)
        assert run(clean)["counts"] == manifest["counts"]
        assert len(_workers(clean, "magpie_response", "kd_logprobs")) == 1
    # the same config twice, on 2 workers and on 1: the same rows, the same ids, the same KD labels
    data = _table(killed, "data")
    assert data == _table(clean, "data") and _table(killed, "rejected") == _table(clean, "rejected")
    assert _table(killed, "attributes") == _table(clean, "attributes")

    c = manifest["counts"]
    assert c["input"] == 0 and c["created_by_stage"]["magpie"] == 2 * TASKS
    assert c["input"] + c["created"] == c["output"] + c["rejected"] + c["replaced"]
    assert c["replaced"] == c["created_by_stage"]["magpie_response"] == c["replaced_by_stage"]["magpie_response"]
    for s in manifest["stages"]:
        assert s["in"] + s["created"] == s["out"] + s["rejected"] + s["replaced"]
    assert set(c["rejected_by_reason"]) <= {"magpie_truncated", "magpie_empty", "magpie_role_leak",
                                            "magpie_empty_response", "select_where"}

    # every output row: a user turn the model wrote, its answer, its lineage back to nothing
    replaced = {r["row_id"]: r for r in _table(killed, "replaced")}
    attributes = {r["row_id"]: r for r in _table(killed, "attributes")}
    assert len(data) == c["output"] > 0
    for row in data:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["messages"][0]["content"]
        origin = json.loads(row["origin"])
        assert origin["stage"] == "magpie_response" and origin["sampling"]["temperature"] == 0.0
        parent = replaced[row["parent_row_id"]]
        assert parent["parent_row_id"] is None and parent["messages"] == row["messages"][:1]
        made_by = json.loads(parent["origin"])
        assert made_by["stage"] == "magpie" and made_by["model"].startswith("hf:embedded:smollm2-135m-instruct@")
        assert made_by["sampling"]["temperature"] == 1.0 and made_by["seed"] >= 7
        a = attributes[row["row_id"]]
        assert a["magpie_response_tokens"] >= 1
        assert len(a["kd_token_ids"]) == len(a["kd_topk_ids"]) > 0 and len(a["kd_topk_ids"][0]) == 4
    assert f"0 rows read + {c['created']} created = " in (killed / "report.md").read_text()
