"""KD labels: bytes per token on disk, and labelling throughput against a plain per-row loop.

    python bench/kd.py [--rows 64] [--threads 2]

1. **Bytes per token.** The self-instruct seed tasks' answers are labelled once at k=128 with
   the embedded SmolLM2 (``hf`` backend, ``continuation_topk``); k=20 is the first 20 columns
   of the same arrays (each position's top-k is sorted). The KD columns are written to Parquet
   in several encodings and each file's size is divided by the response tokens. DistillKit
   (arcee-ai) publishes 114-344 B/token for its compressed top-k format (328-344 at k=128,
   114 at its k=50 budget setting, 192 for raw bf16 + int32 top-32).
2. **Throughput.** The same rows through ``continuation_topk`` (length-sorted batches, only the
   response positions through the LM head) against a plain loop: one forward per row,
   ``log_softmax`` over every position, ``topk`` at the response positions. Both in float32
   on the same model, in the same run; the two must agree.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from thresher.generators.base import ContinuationTopK, TopK
from thresher.generators.registry import load_model
from thresher.schemas.kd import kd_parquet_options, kd_table
from thresher.schemas.records import split_response

TEACHER = "embedded:smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
DISTILLKIT = "DistillKit: 328-344 B/token at k=128, 114 at k=50, 192 raw bf16 + int32 at k=32"


def conversations(limit: int) -> list[list[dict[str, str]]]:
    out = []
    for line in DATA.read_text().splitlines()[:limit]:
        task = json.loads(line)
        inst = task["instances"][0]
        user = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}])
    return out


def render(backend, messages) -> tuple[str, str]:
    prompt = backend.apply_chat_template(split_response(messages)[0], add_generation_prompt=True)
    full = backend.apply_chat_template(messages, add_generation_prompt=False)
    return prompt, full[len(prompt):]


def cut(results: list[ContinuationTopK], k: int) -> list[ContinuationTopK]:
    return [ContinuationTopK(r.prompt_ids, r.token_ids, TopK(r.topk.ids[:, :k], r.topk.logprobs[:, :k]), r.truncated)
            for r in results]


def parquet_bytes(table: pa.Table, **options) -> int:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.tell()


def numeric_leaves(table: pa.Table) -> list[str]:
    """The Parquet column paths of the top-k leaves (for BYTE_STREAM_SPLIT, which takes no strings)."""
    sink = io.BytesIO()
    pq.write_table(table.slice(0, 1), sink)
    schema = pq.ParquetFile(io.BytesIO(sink.getvalue())).schema
    return [schema.column(i).path for i in range(len(schema)) if schema.column(i).path != "row_id"]


def encodings(results: list[ContinuationTopK], k: int) -> dict[str, pa.Table]:
    """The candidate encodings of the same labels (top-k columns only, + row_id)."""
    ids = [f"r{i}" for i in range(len(results))]
    chosen = kd_table(ids, results, k, "{}").select(["row_id", "kd_topk_ids", "kd_topk_logprobs"])
    flat_ids = pa.array([r.topk.ids.reshape(-1) for r in results], pa.list_(pa.int32()))
    flat_f16 = pa.array([r.topk.logprobs.astype(np.float16).reshape(-1) for r in results], pa.list_(pa.float16()))
    f32 = pa.ListArray.from_arrays(chosen["kd_topk_logprobs"].combine_chunks().offsets,
                                   pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(
                                       [r.topk.logprobs.reshape(-1) for r in results]), pa.float32()), k))
    return {
        "fixed-size lists, int32 + float16 (thresher)": chosen,
        "flat lists, int32 + float16": pa.table({"row_id": ids, "ids": flat_ids, "lp": flat_f16}),
        "fixed-size lists, int32 + float32": chosen.set_column(2, "kd_topk_logprobs", f32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_model(TEACHER, cache=False)
    pairs = [render(backend, m) for m in conversations(args.rows)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]

    # ---- throughput (k=20), thresher's batched path against a per-row forward + topk loop
    backend.continuation_topk(prompts[:2], responses[:2], 20)  # warm up
    started = time.perf_counter()
    ours = backend.continuation_topk(prompts, responses, 20)
    t_ours = time.perf_counter() - started
    model = backend.model
    started = time.perf_counter()
    plain = []
    with torch.inference_mode():
        for r in ours:
            ids = torch.from_numpy(np.concatenate([r.prompt_ids, r.token_ids]).astype(np.int64))[None]
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            top = torch.topk(logprobs[len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(r.token_ids)], 20)
            plain.append((top.indices.numpy(), top.values.numpy()))
    t_plain = time.perf_counter() - started
    tokens = sum(len(r.token_ids) for r in ours)
    gap = max(float(np.abs(r.topk.logprobs - lp).max()) for r, (_, lp) in zip(ours, plain))
    same = np.mean([np.mean(r.topk.ids[:, 0] == i[:, 0]) for r, (i, _) in zip(ours, plain)])
    print(f"# labelling throughput: {len(ours)} rows, {tokens} response tokens, k=20, "
          f"SmolLM2-135M float32, {args.threads} threads")
    print(f"thresher continuation_topk   {t_ours:7.2f} s   {tokens / t_ours:8.0f} tokens/s")
    print(f"per-row forward + topk loop  {t_plain:7.2f} s   {tokens / t_plain:8.0f} tokens/s")
    print(f"speed-up {t_plain / t_ours:.2f}x; largest log-prob gap {gap:.1e}; same top-1 at {same:.1%} of positions")

    # ---- bytes per token on disk
    wide = backend.continuation_topk(prompts, responses, 128)
    tokens = sum(len(r.token_ids) for r in wide)
    print(f"\n# bytes per response token on disk ({len(wide)} rows, {tokens} tokens); {DISTILLKIT}")
    print(f"{'encoding':48s} {'k':>4s} {'snappy':>8s} {'zstd':>8s} {'zstd+bss':>9s}")
    for k in (20, 128):
        for name, table in encodings(cut(wide, k), k).items():
            sizes = [parquet_bytes(table, compression="snappy"), parquet_bytes(table, compression="zstd"),
                     parquet_bytes(table, compression="zstd", use_dictionary=False,
                                   use_byte_stream_split=numeric_leaves(table))]
            print(f"{name:48s} {k:4d} " + " ".join(f"{s / tokens:8.1f}" for s in sizes[:2]) + f" {sizes[2] / tokens:9.1f}")
    for k in (20, 128):
        full = kd_table([f"r{i}" for i in range(len(wide))], cut(wide, k), k, "{}")
        print(f"all KD columns at k={k} (prompt ids, response ids, top-k, flags) as thresher writes them "
              f"(zstd, byte-stream-split top-k): {parquet_bytes(full, **kd_parquet_options(full)) / tokens:.1f} B/token")


if __name__ == "__main__":
    sys.exit(main())
