"""GRAPE scoring throughput: the ``grape`` stage against a per-candidate loop, same run.

Run: ``python bench/grape.py [--groups 6] [--max-tokens 256] [--model embedded:gemma-3-270m]``

Input: the first ``--groups`` AlpacaEval instructions with their 9 candidate
responses each (``/work/shared/data/alpaca_eval``), scored under the target with
the plain template and a ``--max-tokens`` cap on prompt + response.

(a) the stage: ``GrapeStage.process`` on the canonical rows (prompt rendering,
    dedup of identical pairs, length-sorted batched ``continuation_logprobs``,
    LM head only on response positions), request cache off;
(b) the baseline: one candidate at a time, one plain ``model(ids).logits``
    forward over prompt + response, ``log_softmax``, gather at the response ids
    (what a straightforward GRAPE script does).

Both paths run with ``--threads`` torch threads (default 1: what a Dask worker
gets). Both count the same tokens (prompt + response after the cap; response tokens are
shown too). Speed-up = stage tokens/s / loop tokens/s. The two paths' scores are
compared (max |difference| of the means) as a sanity check. The machine's load
average is printed: on a shared machine, compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from thresher.generators.registry import load_model  # noqa: E402
from thresher.schemas.model_config import ModelConfig  # noqa: E402
from thresher.schemas.records import make_record, records_table  # noqa: E402
from thresher.selectors.grape import GrapeParams, GrapeStage  # noqa: E402
from thresher.selectors.grape_prompt import PLAIN_TEMPLATE  # noqa: E402
from thresher.selectors.nullable import floats  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"


def load_rows(groups: int):
    """Canonical rows: ``groups`` instructions x every model file's answer."""
    records = []
    for path in sorted(DATA.glob("*.json")):
        for i, r in enumerate(json.loads(path.read_text())[:groups]):
            messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            records.append(make_record(messages, f"alpaca_eval/{path.name}", i, candidate=r.get("generator")))
    return records_table(records)


def per_candidate_loop(backend, rows, cap: int) -> tuple[list[float], int, int]:
    """One plain forward per candidate; returns (means, tokens processed, response tokens)."""
    tok, model = backend.tokenizer, backend.model
    means, total, scored = [], 0, 0
    with torch.inference_mode():
        for messages in rows["messages"].to_pylist():
            prompt = PLAIN_TEMPLATE.format(instruction=messages[0]["content"])
            p = tok(prompt)["input_ids"]
            ids = (p + tok(messages[-1]["content"], add_special_tokens=False)["input_ids"])[:cap]
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(p) - 1:len(ids) - 1], dim=-1)
            picked = logp.gather(-1, torch.tensor(ids[len(p):])[:, None]).squeeze(-1).double()
            means.append(float(picked.mean()) if picked.numel() else float("nan"))
            total += len(ids)
            scored += len(ids) - len(p)
    return means, total, scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=6, help="AlpacaEval instructions (x 9 candidates)")
    ap.add_argument("--max-tokens", type=int, default=256, help="cap on prompt + response tokens")
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both paths (default 1, as in a Dask worker, whose nanny sets OMP_NUM_THREADS=1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_rows(args.groups)
    cfg = ModelConfig(name=args.model, batch_size=args.batch_size)
    backend = load_model(cfg, cache=False)
    stage = GrapeStage(GrapeParams(model=cfg, template="plain", max_tokens=args.max_tokens, request_cache=False))
    stage.process(rows.slice(0, 2))  # warm-up: model loaded, kernels ready

    t = time.perf_counter()
    out = stage.process(rows)
    stage_s = time.perf_counter() - t
    attrs = out.attributes
    n_scored = int(np.sum(attrs["grape_n_tokens"].to_numpy()))
    prompt_lens = [len(x) for x in backend.encode_prompts(
        [PLAIN_TEMPLATE.format(instruction=m[0]["content"]) for m in rows["messages"].to_pylist()])]
    n_total = n_scored + sum(prompt_lens)

    t = time.perf_counter()
    loop_means, loop_total, loop_scored = per_candidate_loop(backend, rows, args.max_tokens)
    loop_s = time.perf_counter() - t

    stage_means = floats(attrs["grape_logprob_mean"])
    diff = float(np.nanmax(np.abs(stage_means - np.array(loop_means))))
    result = {
        "model": backend.identity, "candidates": rows.num_rows, "groups": args.groups,
        "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "tokens": n_total, "response_tokens": n_scored,
        "stage_seconds": round(stage_s, 2), "loop_seconds": round(loop_s, 2),
        "stage_tokens_per_s": round(n_total / stage_s, 1), "loop_tokens_per_s": round(loop_total / loop_s, 1),
        "stage_response_tokens_per_s": round(n_scored / stage_s, 1),
        "loop_response_tokens_per_s": round(loop_scored / loop_s, 1),
        "speedup": round((n_total / stage_s) / (loop_total / loop_s), 2),
        "max_abs_diff_of_means": diff,
    }
    assert loop_total == n_total, (loop_total, n_total)
    print(f"GRAPE scoring, {result['model']}, {result['candidates']} candidates "
          f"({args.groups} instructions x 9), cap {args.max_tokens}, {result['torch_threads']} torch threads, "
          f"load average {result['load_average']}")
    print(f"  stage (batched):        {result['stage_tokens_per_s']:>8} tokens/s  "
          f"({result['stage_response_tokens_per_s']} response tokens/s, {result['stage_seconds']} s)")
    print(f"  per-candidate loop:     {result['loop_tokens_per_s']:>8} tokens/s  "
          f"({result['loop_response_tokens_per_s']} response tokens/s, {result['loop_seconds']} s)")
    print(f"  speed-up: {result['speedup']}x   max |mean difference|: {diff:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
