"""vLLM's CPU build against the ``hf`` backend, on the same checkpoint, in the same run.

Run: ``python bench/vllm_cpu.py [--model embedded:smollm2-135m-instruct] [--threads 2] [--grape 20]``

Both backends are thresher's own (``backend: hf`` and ``backend: vllm``, float32), fed the
same token ids. Measured, each backend after a warm-up call:

1. **load**: seconds from the backend's constructor to a ready model (vLLM: import and
   engine build, eager, in-process, as a Dask worker does it).
2. **scoring**: ``continuation_logprobs`` of ``--pairs`` AlpacaEval (instruction, gpt4 answer)
   pairs under a ``--score-cap`` token cap (GRAPE's call): scored tokens/s, and the largest
   per-token difference between the two backends.
3. **n-per-call generation**: ``--gen-prompts`` instructions x ``n = --gen-n`` samples x up to
   ``--gen-tokens`` new tokens, temperature 1, seeded (Magpie's call): generated tokens/s.
4. with ``--grape N``: GRAPE on ``examples/grape.yaml``'s first N instructions (9 candidates each,
   its target ``embedded:gemma-3-270m`` and 512-token cap) on each backend: whether the kept
   rows are the same, and the largest score difference.

Prints a table and the ratios vLLM / hf, and writes ``--out`` (JSON) if given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_eval"


def config(name: str, backend: str, threads: int):
    from thresher.schemas.model_config import ModelConfig

    extra = {"max_model_len": 2048, "kv_cache_gb": 2.0} if backend == "vllm" else {}
    return ModelConfig(name=name, backend=backend, dtype="float32", threads=threads, **extra)


def load(name: str, backend: str, threads: int):
    from thresher.generators.registry import load_model

    started = time.perf_counter()
    model = load_model(config(name, backend, threads), cache=False)
    return model, time.perf_counter() - started


def pairs(n: int) -> list[tuple[str, str]]:
    rows = json.loads((DATA / "gpt4_1106_preview.json").read_text())[:n]
    return [(r["instruction"], r["output"]) for r in rows]


def scoring(model, prompts: list[str], answers: list[str], cap: int):
    model.continuation_logprobs(prompts[:2], answers[:2], cap)  # warm-up
    started = time.perf_counter()
    scores = model.continuation_logprobs(prompts, answers, cap)
    seconds = time.perf_counter() - started
    tokens = sum(s.n_tokens for s in scores)
    return scores, {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def generation(model, prompts: list[str], n: int, max_tokens: int):
    from thresher.generators.base import SamplingParams

    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=7)
    model.generate(prompts[:1], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=7))  # warm-up
    started = time.perf_counter()
    out = model.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for g in out for c in g.completions)
    return {"samples": sum(len(g.completions) for g in out), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def grape_agreement(n: int, threads: int) -> dict:
    from gpu_check import grape_run, read_candidates

    rows = read_candidates(DATA, n)
    runs = {}
    for backend in ("hf", "vllm"):
        joined, means, kept, _, tokens, seconds = grape_run(config("embedded:gemma-3-270m", backend, threads), rows, 512)
        runs[backend] = (means, kept, tokens, seconds)
        print(f"  GRAPE {backend}: {len(kept)} kept, {tokens} tokens in {seconds:.0f} s", flush=True)
        from thresher.generators.registry import clear_models

        clear_models()
    (m_hf, k_hf, t_hf, s_hf), (m_v, k_v, t_v, s_v) = runs["hf"], runs["vllm"]
    diffs = [abs(m_hf[r] - m_v[r]) for r in m_hf if m_hf[r] is not None and m_v.get(r) is not None]
    return {"instructions": n, "candidates": rows.num_rows, "same_kept_rows": k_hf == k_v,
            "kept_differing": sorted(set(k_hf) ^ set(k_v)), "max_abs_mean_diff": max(diffs),
            "hf_tokens_per_s": round(t_hf / s_hf, 1), "vllm_tokens_per_s": round(t_v / s_v, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--score-cap", type=int, default=256)
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-n", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--grape", type=int, default=0, help="GRAPE agreement on the first N instructions")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np

    from thresher.generators.registry import clear_models

    report: dict = {"model": args.model, "threads": args.threads}
    texts = pairs(args.pairs)
    results = {}
    for backend in ("hf", "vllm"):
        model, seconds = load(args.model, backend, args.threads)
        prompts = [model.apply_chat_template([{"role": "user", "content": q}]) for q, _ in texts]
        scores, score_fig = scoring(model, prompts, [a for _, a in texts], args.score_cap)
        gen_fig = generation(model, prompts[: args.gen_prompts], args.gen_n, args.gen_tokens)
        results[backend] = {"load_s": round(seconds, 1), "scoring": score_fig, "generation": gen_fig}
        results[backend]["_scores"] = scores
        print(f"{backend}: load {seconds:.1f} s, scoring {score_fig['tokens_per_s']} tok/s, "
              f"generation {gen_fig['tokens_per_s']} tok/s", flush=True)
        clear_models()  # closes the backend: one engine in memory at a time
    diffs = [float(np.max(np.abs(np.subtract(a.token_logprobs, b.token_logprobs))))
             for a, b in zip(results["hf"].pop("_scores"), results["vllm"].pop("_scores")) if a.n_tokens]
    report |= results
    report["max_abs_token_logprob_diff"] = max(diffs)
    report["ratios_vllm_over_hf"] = {
        "scoring": round(results["vllm"]["scoring"]["tokens_per_s"] / results["hf"]["scoring"]["tokens_per_s"], 2),
        "generation": round(results["vllm"]["generation"]["tokens_per_s"] / results["hf"]["generation"]["tokens_per_s"], 2),
        "load": round(results["vllm"]["load_s"] / max(results["hf"]["load_s"], 1e-3), 1),
    }
    if args.grape:
        report["grape"] = grape_agreement(args.grape, args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
