"""LM head + log-normalizer on CPU: thresher's reused buffer against a fresh tensor, same run.

Run: ``python bench/lm_head.py [--model embedded:gemma-3-270m] [--positions 256] [--repeats 3]``

Scoring a response token under a 262k-vocabulary model is mostly this step: the
LM-head GEMM (hidden x vocab) and ``log sum exp`` over the vocabulary. Both paths
take the same real hidden states (the model's last layer over AlpacaEval answers)
in chunks of ``--positions`` rows:

(a) thresher: ``HFBackend._head`` writing into one reused float32 buffer, then
    ``log_normalizer_`` in place (max, subtract, exp, sum, log);
(b) baseline: the head into a fresh tensor, then ``torch.logsumexp`` (what the
    backend did before; every chunk page-faults a new ``positions x vocab x 4``
    bytes and the reduction makes a full-size temporary).

Prints positions/s, user and system CPU seconds of each path, the ratio, and the
max |difference| of the log-normalizers (a float64 reference is the judge).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from thresher.generators.hf import log_normalizer_  # noqa: E402
from thresher.generators.registry import load_model  # noqa: E402
from thresher.schemas.model_config import ModelConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4_1106_preview.json"


def hidden_states(backend, positions: int) -> torch.Tensor:
    """``positions`` real last-layer hidden states (one per token of AlpacaEval answers)."""
    texts = [r["output"] for r in json.loads(DATA.read_text())[:40]]
    rows, have = [], 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([backend.encode_prompts([text])[0][:512]])
            rows.append(backend.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0])
            have += rows[-1].shape[0]
            if have >= positions:
                break
    return torch.cat(rows)[:positions].contiguous()


def timed(fn, repeats: int) -> tuple[float, float, float, torch.Tensor]:
    """(wall, user, system) seconds of ``repeats`` calls after one warm-up, and the last result."""
    result = fn()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        result = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--positions", type=int, default=256, help="hidden states per chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a Dask worker's share)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_model(ModelConfig(name=args.model), cache=False)
    hidden = hidden_states(backend, args.positions)
    vocab = backend.model.get_output_embeddings().weight.shape[0]

    with torch.inference_mode():
        buffer = torch.empty(hidden.shape[0], vocab)
        mine = timed(lambda: log_normalizer_(backend._head(hidden, buffer)), args.repeats)
        base = timed(lambda: torch.logsumexp(backend._head(hidden), dim=-1), args.repeats)
        reference = torch.logsumexp(backend._head(hidden).double(), dim=-1)
    n = hidden.shape[0] * args.repeats
    result = {
        "model": backend.identity, "vocab": vocab, "positions": hidden.shape[0], "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "thresher_positions_per_s": round(n / mine[0], 1), "baseline_positions_per_s": round(n / base[0], 1),
        "thresher_user_sys_s": [round(mine[1], 2), round(mine[2], 2)],
        "baseline_user_sys_s": [round(base[1], 2), round(base[2], 2)],
        "speedup": round(base[0] / mine[0], 2),
        "max_abs_diff_thresher": float((mine[3].double() - reference).abs().max()),
        "max_abs_diff_baseline": float((base[3].double() - reference).abs().max()),
    }
    print(f"LM head + log-normalizer, {result['model']}, vocab {vocab}, chunks of {hidden.shape[0]} positions, "
          f"{args.threads} thread(s), load average {result['load_average']}")
    print(f"  reused buffer + in-place normalizer: {result['thresher_positions_per_s']:>8} positions/s "
          f"(user {mine[1]:.2f} s, system {mine[2]:.2f} s)")
    print(f"  fresh tensor + torch.logsumexp:      {result['baseline_positions_per_s']:>8} positions/s "
          f"(user {base[1]:.2f} s, system {base[2]:.2f} s)")
    print(f"  speed-up: {result['speedup']}x   max |difference| vs float64: "
          f"{result['max_abs_diff_thresher']:.1e} (thresher), {result['max_abs_diff_baseline']:.1e} (baseline)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
