"""Throughput of the hf backend's batched paths against per-sample baselines.

Run: ``python bench/backends.py [--n 64] [--max-chars 800] [--models smollm2 gemma]``

For each embedded causal LM (SmolLM2-135M-Instruct, Gemma-3-270M), on real
AlpacaEval instruction/response pairs (``/work/shared/data``):

(a) continuation scoring (GRAPE): tokens/s of ``continuation_logprobs`` (batched)
    against a per-sample loop (one plain ``model(ids).logits`` -> ``log_softmax``
    -> gather per pair) and against the backend called one pair at a time;
(b) restricted next-token scoring (deita prompts, candidates "1".."6"):
    prompts/s of ``next_token_logprobs`` against the deita reference procedure,
    one ``model.generate(max_new_tokens=2, output_scores=True,
    return_dict_in_generate=True)`` per sample;
(c) the model's peak forward throughput: one large unpadded batch of
    equal-length sequences (tokens/s), with logits for every position (a plain
    ``model(ids)``) and without the LM head (transformer body only). Each path
    is shown as a percentage of the full-forward peak, counting every input
    token it processes (prompt + continuation).

Speed-up = batched throughput / baseline throughput.

Measured on the 2-core AVX-512 CPU dev box, float32, quiet machine
(``--n 24``, responses cut at 600 characters, ~160 tokens per pair):

    smollm2  peak 598 tok/s full forward, 781 body only
             (a) batched 564 tok/s = 94% of peak, 1.1x the per-sample loop
             (b) batched 712 tok/s = 119% of peak (91% of body), 1.6x deita's generate
    gemma    peak 213 tok/s full forward, 735 body only (the 262k-vocab LM head is 70%)
             (a) batched 209 tok/s = 98% of peak, 1.1x the per-sample loop
             (b) batched 652 tok/s = 306% of peak (89% of body), 2.0x deita's generate

With short pairs (``--max-chars 60``, ~33 tokens) batching gains 2.3-3.1x. On
this CPU a single 150-250-token sequence already keeps both cores busy (the
per-sample loop reaches 83-89% of peak), so batching can only remove padding and
per-call overhead; the large gains of batching are a GPU matter.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from thresher.generators.hf import HFBackend  # noqa: E402
from thresher.schemas.model_config import ModelConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4_1106_preview.json"
MODELS = {"smollm2": "embedded:smollm2-135m-instruct", "gemma": "embedded:gemma-3-270m"}
DEITA_QUALITY = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
DIGITS = ["1", "2", "3", "4", "5", "6"]


def load_pairs(n: int, max_chars: int) -> list[tuple[str, str]]:
    rows = json.loads(DATA.read_text())[:n]
    return [(f"Instruction: {r['instruction']}\nResponse:", " " + r["output"][:max_chars]) for r in rows]


def timed(fn) -> float:
    """Wall time of one run."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak(backend: HFBackend, batch: int, length: int) -> tuple[float, float]:
    """(full forward tokens/s, body-only tokens/s) on one unpadded equal-length batch."""
    ids = torch.randint(100, 1000, (batch, length))
    model = backend.model
    with torch.inference_mode():
        model(input_ids=ids[:1, :16])
        full = timed(lambda: model(input_ids=ids, use_cache=False).logits.float())
        body = timed(lambda: model.base_model(input_ids=ids, use_cache=False))
    return batch * length / full, batch * length / body


def naive_continuation(backend: HFBackend, pairs: list[tuple[str, str]]) -> None:
    """The per-sample loop: one full forward per pair, full-vocab log_softmax, gather."""
    tok, model = backend.tokenizer, backend.model
    with torch.inference_mode():
        for p, c in pairs:
            pi = tok(p)["input_ids"]
            ci = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pi + ci])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(pi) - 1:-1].float(), -1)
            lp.gather(-1, torch.tensor(ci)[:, None])


def deita_reference(backend: HFBackend, prompts: list[str]) -> None:
    """deita's scorer: one generate(max_new_tokens=2) per sample, softmax over the digit logits."""
    tok, model = backend.tokenizer, backend.model
    ids = [tok(d, add_special_tokens=False)["input_ids"][0] for d in DIGITS]
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            out = model.generate(
                **enc, max_new_tokens=2, do_sample=False, output_scores=True,
                return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
            )
            torch.softmax(out.scores[0][0, ids], -1)


def bench_model(key: str, pairs: list[tuple[str, str]], args: argparse.Namespace) -> list[list[str]]:
    cfg = ModelConfig(name=MODELS[key], batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                      threads=args.threads)
    backend = HFBackend(cfg)
    single = HFBackend(cfg.model_copy(update={"batch_size": 1}))
    single.model = backend.model  # same weights, batch size 1
    prompts, conts = [p for p, _ in pairs], [c for _, c in pairs]
    p_ids, c_ids = backend.encode_prompts(prompts), backend.encode_continuations(conts)
    n_in = sum(len(a) + len(b) for a, b in zip(p_ids, c_ids))
    n_cont = sum(len(b) for b in c_ids)
    deita = [DEITA_QUALITY.format(instruction=r["instruction"], output=r["output"][: args.max_chars // 2])
             for r in json.loads(DATA.read_text())[: args.n]]
    n_deita = sum(len(x) for x in backend.encode_prompts(deita))

    backend.continuation_logprobs(prompts[:2], conts[:2])  # warm-up
    paths = {
        "batched": lambda: backend.continuation_logprobs(prompts, conts),
        "single": lambda: single.continuation_logprobs(prompts, conts),
        "naive": lambda: naive_continuation(backend, pairs),
        "next": lambda: backend.next_token_logprobs(deita, DIGITS),
        "deita": lambda: deita_reference(backend, deita),
    }
    # rounds interleave the paths, and the best round counts: a busy neighbour
    # process then slows every path alike rather than one
    best = {k: float("inf") for k in paths}
    full_peak = body_peak = 0.0
    for _ in range(args.repeat):
        f, b = peak(backend, args.peak_batch, args.peak_len)
        full_peak, body_peak = max(full_peak, f), max(body_peak, b)
        for k, fn in paths.items():
            best[k] = min(best[k], timed(fn))
    t_batched, t_single, t_naive, t_next, t_deita = (best[k] for k in paths)

    def row(path, seconds, tokens, items, base=None):
        tps = tokens / seconds
        return [key, path, f"{items / seconds:8.1f}", f"{tps:9.0f}", f"{100 * tps / full_peak:5.0f}%",
                "" if base is None else f"{base / seconds:5.1f}x"]

    print(f"{key}: {len(pairs)} pairs, {n_in} input tokens ({n_cont} continuation); "
          f"deita prompts: {n_deita} tokens; peak full forward {full_peak:.0f} tok/s, "
          f"body only {body_peak:.0f} tok/s ({args.peak_batch}x{args.peak_len})", flush=True)
    return [
        [key, "peak: full forward, 1 unpadded batch", "", f"{full_peak:9.0f}", "  100%", ""],
        [key, "peak: body only (no LM head)", "", f"{body_peak:9.0f}", f"{100 * body_peak / full_peak:5.0f}%", ""],
        row("(a) continuation, batched backend", t_batched, n_in, len(pairs), t_naive),
        row("(a) continuation, backend batch_size=1", t_single, n_in, len(pairs), t_naive),
        row("(a) continuation, per-sample loop", t_naive, n_in, len(pairs), t_naive),
        row("(b) next-token, batched backend", t_next, n_deita, len(deita), t_deita),
        row("(b) next-token, deita generate/sample", t_deita, n_deita, len(deita), t_deita),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="pairs / prompts per model")
    ap.add_argument("--max-chars", type=int, default=600, help="response characters kept")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-batch", type=int, default=8)
    ap.add_argument("--peak-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best counts")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
    rows = []
    for key in args.models:
        rows += bench_model(key, load_pairs(args.n, args.max_chars), args)
    head = ["model", "path", "items/s", "tokens/s", "%peak", "speed-up"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(line)
    print("tokens/s counts every input token processed (prompt + continuation); %peak is relative to "
          "the full-forward peak; speed-up is against the per-sample baseline of the same part.")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
