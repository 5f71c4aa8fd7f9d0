"""deita benchmarks: (a) the blocked Repr Filter, (b) batched scoring vs the reference's per-sample calls.

Run: ``python bench/deita.py [--n 100000] [--dim 384] [--budget 10000] [--prompts 40]``
(``--skip-filter`` / ``--skip-scoring`` to run one half).

(a) :func:`thresher.selectors.repr_filter.repr_filter` on ``n x dim`` float32
    embeddings with a budget. The embeddings are synthetic (no model could embed
    100,000 rows on this CPU in a benchmark's time), built as the worst case for
    the filter: walked in order, each row is, with probability ``novel``, a new
    random direction, and otherwise a noisy copy (cosine about 0.95) of a random
    earlier new row, so about one row in ten is accepted and the walk runs through
    the whole pool before filling the budget. Baselines: the plain sequential
    loop (one float32 mat-vec against the accepted rows per row, BLAS on one
    thread: its fastest setting here), run in full (measured); and the
    reference's own loop (hkust-nlp/deita ``IterativeFilter.filter`` with
    ``batch_size=1``, re-implemented), far too slow to run in full: its cost per
    row is measured with the accepted set at several sizes and **extrapolated**
    (interpolated in the accepted-set size, summed over the real walk). The
    blocked result is also checked against the float64 sequential loop on a
    20,000-row pool (identical statuses).
(b) prompts/s of deita scoring on the same model (the embedded SmolLM2 stand-in):
    :class:`~thresher.selectors.deita_scoring.PromptScorer` (batched
    ``next_token_logprobs``, one forward per batch) against the reference
    procedure, one ``model.generate(max_new_tokens=2, output_scores=True,
    return_dict_in_generate=True)`` per sample (hkust-nlp/deita
    ``Scorer.infer_score``), on complexity and quality prompts built from real
    CodeAlpaca rows. The two scores are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from thresher.selectors.repr_filter import (
    ACCEPTED,
    BELOW_BUDGET,
    TOO_SIMILAR,
    repr_filter,
    sequential_repr_filter,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"


# --------------------------------------------------------------------------- (a) the filter


def synthetic_pool(n: int, dim: int, novel: float, noise: float, seed: int = 0) -> np.ndarray:
    """Unit rows in walk order: new random directions, or noisy copies of an earlier new one."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    originals: list[int] = []
    is_new = rng.random(n) < novel
    is_new[0] = True
    noise_vecs = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    for i in range(n):
        if is_new[i]:
            v = rng.standard_normal(dim).astype(np.float32)
            originals.append(i)
        else:
            v = out[originals[rng.integers(len(originals))]] + noise * noise_vecs[i]
        out[i] = v / np.linalg.norm(v)
    return out


def _reference_row(emb64: np.ndarray, filtered: list[int], i: int, tau: float) -> bool:
    """One row of hkust-nlp/deita ``IterativeFilter.filter`` with ``batch_size=1`` on CPU: too similar?

    Re-implemented step by step: the reference gathers every accepted embedding
    from its float64 array and converts it to a float32 tensor for every row,
    L2-normalizes both sides twice (``normalize_emb`` and ``cosine``), multiplies,
    and also compares the row with itself (its "batch").
    """
    import torch

    def compute_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a / a.norm(dim=1)[:, None]
        b = b / b.norm(dim=1)[:, None]
        a = a / a.norm(dim=1)[:, None]
        b = b / b.norm(dim=1)[:, None]
        return torch.mm(a, b.t())

    def chunked(existing: np.ndarray | torch.Tensor, cur: torch.Tensor, chunk: int = 100_000) -> torch.Tensor:
        out = torch.zeros((cur.size(0), existing.shape[0]), dtype=torch.float32)
        for start in range(0, existing.shape[0], chunk):
            part = torch.as_tensor(existing[start:start + chunk], dtype=torch.float32)
            d = compute_distance(cur, part)
            out[:, start:start + d.size(1)] = d
        return out

    cur = torch.tensor(emb64[i:i + 1], dtype=torch.float32)
    existing = emb64[filtered]
    bad = torch.any(chunked(existing, cur) > tau, dim=1)
    bad |= torch.any(chunked(cur, cur).tril(-1) > tau, dim=1)
    return bool(bad[0])


def reference_loop(emb64: np.ndarray, rows: int, tau: float, budget: int) -> list[int]:
    """The reference's loop over the first ``rows`` rows (walk order = row order)."""
    filtered = [0]
    for i in range(1, rows):
        if not _reference_row(emb64, filtered, i, tau):
            filtered.append(i)
        if len(filtered) >= budget:
            break
    return filtered


def reference_loop_cost(emb64: np.ndarray, accepted_rows: np.ndarray, m: int, probe: np.ndarray, tau: float) -> float:
    """Seconds per row of the reference's loop with ``m`` accepted rows."""
    filtered = list(accepted_rows[:m])
    t = time.perf_counter()
    for i in probe:
        _reference_row(emb64, filtered, int(i), tau)
    return (time.perf_counter() - t) / len(probe)


def extrapolate(cost_at: dict[int, float], m_before: np.ndarray) -> float:
    """Sum over the walk of the per-row cost, interpolated linearly in the accepted-set size."""
    ms = np.array(sorted(cost_at), dtype=np.float64)
    return float(np.sum(np.interp(m_before, ms, [cost_at[int(m)] for m in ms])))


def single_blas_thread():
    """A context with numpy's BLAS on one thread (its fastest setting for mat-vec loops on a shared box)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()


def bench_filter(n: int, dim: int, budget: int, tau: float, novel: float) -> None:
    print(f"== (a) Repr Filter: {n:,} x {dim} float32 embeddings, budget {budget:,}, tau {tau}")
    t = time.perf_counter()
    emb = synthetic_pool(n, dim, novel, noise=0.33)
    print(f"synthetic pool built in {time.perf_counter() - t:.1f} s (walk order = row order; a new random "
          f"direction with p={novel}, else a noisy copy, cosine ~0.95, of an earlier new one)")
    order = np.arange(n)

    repr_filter(emb[:4000], order[:4000], tau, 400)  # warm up torch
    t = time.perf_counter()
    res = repr_filter(emb, order, tau, budget)
    blocked = time.perf_counter() - t
    status = res.status
    walked = int((status != BELOW_BUDGET).sum())
    print(f"blocked repr_filter (1 torch thread, witness buckets on): {blocked:.2f} s; walked {walked:,} rows: "
          f"accepted {int((status == ACCEPTED).sum()):,}, too similar {int((status == TOO_SIMILAR).sum()):,}, "
          f"below budget {int((status == BELOW_BUDGET).sum()):,}")
    t = time.perf_counter()
    exact = repr_filter(emb, order, tau, budget, witness_buckets=0)
    print(f"blocked repr_filter without witness buckets (exact largest similarity for every row): "
          f"{time.perf_counter() - t:.2f} s; same statuses: {bool((exact.status == status).all())}")

    with single_blas_thread():
        sub = 20_000
        t = time.perf_counter()
        seq = sequential_repr_filter(emb[:sub], order[:sub], tau, budget // 5)
        seq_sub = time.perf_counter() - t
        blk = repr_filter(emb[:sub], order[:sub], tau, budget // 5)
        print(f"exactness: first {sub:,} rows, budget {budget // 5:,}: the sequential float64 loop ({seq_sub:.1f} s) "
              f"and repr_filter give identical statuses: {bool((seq.status == blk.status).all())}")

        accepted_rows = res.accepted
        m_before = np.concatenate([[0], np.cumsum(status[:walked] == ACCEPTED)[:-1]])
        grid = sorted({1, *[int(f * len(accepted_rows)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)]})
        probe = np.arange(n - 500, n)
        t = time.perf_counter()
        plain_run = sequential_repr_filter(emb, order, tau, budget, dtype=np.float32)
        plain_total = time.perf_counter() - t
        print(f"plain sequential loop (float32 mat-vec per row, BLAS on 1 thread), the whole walk: {plain_total:.1f} s "
              f"MEASURED; same statuses as repr_filter: {bool((plain_run.status == status).all())}")

        import torch

        emb64 = emb.astype(np.float64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # its fastest setting here, as for the other two
        ref = {m: reference_loop_cost(emb64, accepted_rows, m, probe[:40], tau) for m in grid}
        ref_total = extrapolate(ref, m_before)
        prefix = min(5_000, walked)
        t = time.perf_counter()
        ref_kept = reference_loop(emb64, prefix, tau, budget)
        ref_prefix = time.perf_counter() - t
        torch.set_num_threads(threads)
        print("reference loop (deita IterativeFilter, batch_size=1, CPU, 1 torch thread; re-implemented): per row "
              + ", ".join(f"{ref[m] * 1e3:.2f} ms at {m:,}" for m in grid))
        print(f"  run on the first {prefix:,} walked rows: {ref_prefix:.1f} s measured, "
              f"{extrapolate(ref, m_before[:prefix]):.1f} s predicted by the per-row costs; same rows kept: "
              f"{ref_kept == [int(r) for r in res.accepted if r < prefix]}")
        print(f"  whole walk: {ref_total:.0f} s, EXTRAPOLATED (per-row cost interpolated in the accepted-set size, "
              f"summed over the {walked:,} walked rows; not run)")
    print(f"speed-up of the blocked filter ({blocked:.2f} s, measured): {plain_total / blocked:.1f}x over the plain "
          f"loop (measured), {ref_total / blocked:.0f}x over the reference loop (extrapolated)")


# --------------------------------------------------------------------------- (b) scoring


def deita_prompts(k: int) -> list[str]:
    from thresher.selectors.deita_scoring import complexity_prompt, quality_prompt

    rows = json.loads(DATA.read_text())[: (k + 1) // 2]
    prompts = []
    for r in rows:
        instruction = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        prompts += [complexity_prompt(instruction), quality_prompt(instruction, r["output"])]
    return prompts[:k]


def reference_scores(backend, prompts: list[str]) -> list[float]:
    """hkust-nlp/deita ``Scorer.infer_score`` (transformers path), one sample per call."""
    import torch
    from scipy.special import softmax

    tok, model = backend.tokenizer, backend.model
    ids = backend.resolve_single_tokens(["1", "2", "3", "4", "5", "6"])
    out = []
    for prompt in prompts:
        input_ids = tok.encode(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            gen = model.generate(input_ids, max_new_tokens=2, num_return_sequences=1, return_dict_in_generate=True,
                                 output_scores=True, pad_token_id=tok.pad_token_id)
        logits = gen.scores[0][0].detach().cpu().numpy()
        out.append(float(np.sum(softmax(logits[ids]) * np.arange(1, 7))))
    return out


def bench_scoring(k: int) -> None:
    from thresher.generators.registry import load_model
    from thresher.selectors.deita_scoring import PromptScorer

    # one torch thread for both paths: on this shared CPU, more threads only wait for busy cores
    backend = load_model({"name": "embedded:smollm2-135m-instruct", "threads": 1}, cache=False)
    prompts = deita_prompts(k)
    tokens = PromptScorer(backend).token_counts(prompts)
    print(f"\n== (b) deita scoring on {backend.identity}: {len(prompts)} prompts (complexity + quality, CodeAlpaca), "
          f"{np.mean(tokens):.0f} tokens on average, batch_size {backend.cfg.batch_size}, 1 torch thread")
    PromptScorer(backend).score(prompts[:2])  # warm up
    reference_scores(backend, prompts[:2])
    t = time.perf_counter()
    ours = PromptScorer(backend, max_tokens=2048).score(prompts)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference_scores(backend, prompts)
    per_sample = time.perf_counter() - t
    diff = max(abs(o.score - r) for o, r in zip(ours, ref))
    print(f"batched next_token_logprobs (PromptScorer): {len(prompts) / batched:.2f} prompts/s ({batched:.1f} s)")
    print(f"reference, one generate(max_new_tokens=2, output_scores=True) per sample: "
          f"{len(prompts) / per_sample:.2f} prompts/s ({per_sample:.1f} s)")
    print(f"speed-up: {per_sample / batched:.2f}x; largest score difference: {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--budget", type=int, default=10_000)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--novel", type=float, default=0.1, help="share of rows that are new directions")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--skip-filter", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true")
    args = ap.parse_args()
    if not args.skip_filter:
        bench_filter(args.n, args.dim, args.budget, args.tau, args.novel)
    if not args.skip_scoring:
        bench_scoring(args.prompts)


if __name__ == "__main__":
    main()
