"""Throughput of CLEAR's observed-consistency sampling: k samples in one call vs k calls.

Run: ``python bench/clear.py [--rows 16] [--k 5] [--max-tokens 48] [--repeats 1]``

BSDetector (arXiv 2308.16175) samples k answers per prompt. The ``clear`` stage asks
for them in one batched ``chat`` call with ``SamplingParams(n=k)``; the baseline makes
k separate ``n=1`` calls (seeds ``seed..seed+k-1``), each over the same batch of
prompts; a second baseline batches nothing: one call per prompt and sample (what a
plain BSDetector script does). Both run on real AlpacaEval instructions with the embedded
SmolLM2-135M-Instruct on the ``hf`` backend, without the request cache, and print
rows (prompts) per second. A third line times the full ``clear`` stage (sampling +
similarity + self-reflection) on the same rows, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from thresher.generators.base import SamplingParams  # noqa: E402
from thresher.generators.registry import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4_1106_preview.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stage", action="store_true", help="also time the whole clear stage")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    rows = json.loads(DATA.read_text())[: args.rows]
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    lm = load_model("embedded:smollm2-135m-instruct", cache=False)
    lm.chat(prompts[:1], SamplingParams(n=1, max_tokens=2))  # warm up

    def batched() -> None:
        lm.chat(prompts, SamplingParams(n=args.k, temperature=1.0, max_tokens=args.max_tokens, seed=0))

    def separate() -> None:
        for i in range(args.k):
            lm.chat(prompts, SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, seed=i))

    def unbatched() -> None:
        for prompt in prompts:
            for i in range(args.k):
                lm.chat([prompt], SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, seed=i))

    print(f"{args.rows} prompts, k={args.k}, max_tokens={args.max_tokens}, torch threads={_threads()}", flush=True)
    results = {}
    paths = (("one call, n=k", batched), ("k calls, n=1", separate), ("rows x k calls", unbatched))
    for name, fn in paths:
        best = min(_time(fn) for _ in range(args.repeats))
        results[name] = args.rows / best
        print(f"  {name:<14} {best:7.2f} s  {args.rows / best:7.3f} rows/s", flush=True)
    one = results["one call, n=k"]
    print(f"  speed-up of one call: {one / results['k calls, n=1']:.2f}x over k calls, "
          f"{one / results['rows x k calls']:.2f}x over one call per prompt and sample")

    if args.stage:
        from thresher.schemas.records import make_record, records_table
        from thresher.selectors.clear import ClearParams, ClearStage

        table = records_table([make_record([*p, {"role": "assistant", "content": r["output"]}], "b/x.json", i)
                               for i, (p, r) in enumerate(zip(prompts, rows))])
        stage = ClearStage(ClearParams(k=args.k, max_tokens=args.max_tokens, max_answer_tokens=128,
                                       request_cache=False))
        seconds = _time(lambda: stage.process(table))
        print(f"  clear stage    {seconds:7.2f} s  {args.rows / seconds:7.3f} rows/s (sampling + similarity + reflection)")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
