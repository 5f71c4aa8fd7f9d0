"""The model lifecycle (generators/registry.py): loaded once, kept while its stage runs, released after.

The registry is per process, and the session's model fixtures live in this
one, so each check runs in a fresh Python process of its own on the real
embedded models: it prints JSON facts that the test asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MINILM = "embedded:all-minilm-l6-v2"
SMOLLM = "embedded:smollm2-135m-instruct"


def run_script(body: str, env: dict[str, str] | None = None) -> dict:
    """Run ``body`` in a fresh interpreter; it must print one JSON object last."""
    code = textwrap.dedent("""
        import gc, json, weakref
        from thresher.generators import registry
        from thresher.generators.registry import load_model, model_scope, release_models, memo_key, as_config
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_model_stays_while_its_stage_runs_and_is_gone_once_released():
    facts = run_script(f"""
        with model_scope():                       # one stage task
            first = load_model({MINILM!r}, cache=False)
            ref = weakref.ref(first)
            pinned = release_models()             # another stage ending elsewhere cannot take it
        with model_scope():                       # the next task of the same stage
            second = load_model({MINILM!r}, cache=True)
        loads = registry.load_counts()[memo_key(as_config({MINILM!r}))]
        del first, second
        released = release_models()               # the stage is over
        gc.collect()
        print(json.dumps({{"pinned": pinned, "loads": loads, "released": released,
                          "alive": ref() is not None,
                          "events": [(e["event"], e.get("reason")) for e in registry.lifecycle_events()]}}))
    """)
    assert facts["pinned"] == []
    assert facts["loads"] == 1
    assert facts["released"] == [MINILM]
    assert facts["alive"] is False
    assert facts["events"] == [["load", None], ["release", "stage_over"]]


@pytest.mark.slow
def test_a_model_that_needs_the_room_evicts_the_least_recently_used_unpinned_one():
    # measured at load here: all-MiniLM ~0.3 GB (its libraries load with it), SmolLM2-135M ~0.55 GB:
    # the first fits a 0.7 GB budget, both do not
    facts = run_script(f"""
        small = load_model({MINILM!r}, cache=False)
        ref = weakref.ref(small)
        del small
        with model_scope():
            big = load_model({SMOLLM!r}, cache=False)
            gc.collect()
            alive_after_big = ref() is not None
            ids = big.tokenizer("hello")["input_ids"]
        evicted = [(e["event"], e["model"], e.get("reason")) for e in registry.lifecycle_events()]
        loaded = [m.identity for m in registry.loaded_models()]
        with model_scope():                                # one task uses both: neither is evicted
            big = load_model({SMOLLM!r}, cache=False)
            small = load_model({MINILM!r}, cache=False)
            both = len(registry.loaded_models())
        after = release_models(keep=[memo_key(as_config({SMOLLM!r}))])  # the next stage uses SmolLM2
        print(json.dumps({{"alive": alive_after_big, "ids": len(ids), "evicted": evicted, "loaded": loaded,
                          "both": both, "after": after, "left": len(registry.loaded_models())}}))
    """, env={"THRESHER_MODEL_MEMORY_GB": "0.7"})
    assert facts["alive"] is False
    assert facts["ids"] >= 1
    assert facts["evicted"] == [["load", MINILM, None], ["load", SMOLLM, None], ["release", MINILM, "memory_budget"]]
    assert len(facts["loaded"]) == 1 and "smollm2" in facts["loaded"][0]
    assert (facts["both"], facts["after"], facts["left"]) == (2, [MINILM], 1)


def assert_loaded_once_released_in_turn(manifest: dict, models: list[str]) -> None:
    """A flow run's ``model_lifecycle``: on each worker, each model (in stage order) loaded once, then
    released when its stages were over, before the next one loaded."""
    events = manifest["model_lifecycle"]
    assert events, "no model was loaded"
    for worker in {e["worker"] for e in events}:
        mine = [[e["event"], e["model"], e.get("reason")] for e in events if e["worker"] == worker]
        expected = [step for model in models for step in (["load", model, None], ["release", model, "stage_over"])]
        assert mine == expected, mine
