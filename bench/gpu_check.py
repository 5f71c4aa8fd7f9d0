"""The GPU check: GRAPE over the whole AlpacaEval set and generation throughput, on a CUDA machine.

One command, for whenever a GPU machine is lent (see the README, "GPU check"):

    python bench/gpu_check.py                      # embedded Gemma-3-270M, the example's 512-token cap
    python bench/gpu_check.py --gguf .gpu/gemma-3-270m-q4_k_m.gguf --data .gpu/alpaca_eval
    python bench/gpu_check.py --device cpu --limit 3   # a CPU smoke run of the same code

It needs only what such a machine has (PyTorch, transformers, numpy, pyarrow) plus
the wheels ``bench/gpu_prepare.sh`` gathers (pydantic, gguf); it imports thresher
straight from this checkout, so nothing is installed.

What it runs, with thresher's own code (no pipeline, no Prefect, no Dask):

1. **GRAPE, ``examples/grape.yaml``'s set**: every ``alpaca_eval/*.json`` file read by
   thresher's reader (805 instructions x 9 candidates), ``GrapeStage.process`` on the
   ``hf`` backend (template ``auto``, ``max_tokens`` 512), then ``GrapeSelectStage``.
   Checked independently: one kept row per instruction, and each is its group's argmax
   of ``grape_logprob_mean`` (ties to the first in corpus order). Prints tokens/s and
   the wins per source model.
2. **Generation throughput**: greedy, ``--gen-tokens`` new tokens for ``--gen-prompts``
   instructions, through ``HFBackend.generate`` (batched), against transformers'
   ``model.generate`` one prompt at a time on the first ``--gen-baseline`` of them, in
   the same run: generated tokens/s and the ratio.

Writes ``$OUT/gpu_check.json`` (or ``--out``) and prints it; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_thresher_from_checkout() -> None:
    """Make ``import thresher`` find this checkout (the repo root is the package) without installing it."""
    try:
        import thresher  # noqa: F401
        return
    except ImportError:
        pass
    link_dir = Path(tempfile.mkdtemp(prefix="thresher-path-"))
    (link_dir / "thresher").symlink_to(REPO)
    sys.path.insert(0, str(link_dir))
    site = REPO / ".gpu" / "site"  # wheels unpacked by the one-line command in the README
    if site.is_dir():
        sys.path.insert(0, str(site))


def default_data() -> Path:
    for candidate in (REPO.parent / "shared" / "data" / "alpaca_eval", REPO / ".gpu" / "alpaca_eval"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data" / "alpaca_eval"


#: the tokenizer files bench/gpu_prepare.sh copies from this machine's embedded Gemma
TOKENIZER_DIR = REPO / ".gpu" / "tokenizer"


def model_name(args: argparse.Namespace) -> str:
    """A loadable model: the given name, or a GGUF file converted once to safetensors.

    The GGUF's own tokenizer is replaced by the one in ``TOKENIZER_DIR`` when present:
    transformers 5.17 (the GPU machines' version) rebuilds Gemma's tokenizer from a GGUF
    almost one token per character (an AlpacaEval prompt of 649 characters came out as
    525 tokens instead of 136 on 2026-11-27), which pushed 396 candidates past the
    512-token cap with no response token left to score.
    """
    if not args.gguf:
        return args.model
    import gzip
    import shutil

    from thresher.generators.embedded import convert_gguf

    out = Path(tempfile.gettempdir()) / f"thresher-gpu-check-{Path(args.gguf).stem}"
    if not (out / "config.json").exists():
        convert_gguf(Path(args.gguf), out)
    if (TOKENIZER_DIR / "tokenizer.json.gz").is_file():
        with gzip.open(TOKENIZER_DIR / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(TOKENIZER_DIR / "tokenizer_config.json", out / "tokenizer_config.json")
    return str(out)


def tokenizer_check(backend) -> dict:
    """The token count of a fixed text against the count this machine's tokenizer gave (gpu_prepare.sh)."""
    expected_file = TOKENIZER_DIR / "expected.json"
    if not expected_file.is_file():
        return {"checked": False}
    expected = json.loads(expected_file.read_text())
    got = len(backend.tokenizer(expected["text"], add_special_tokens=False)["input_ids"])
    return {"checked": True, "expected_tokens": expected["tokens"], "tokens": got, "ok": got == expected["tokens"]}


def read_candidates(data: Path, limit: int | None):
    """AlpacaEval rows through thresher's reader, the first ``limit`` instructions of each file."""
    from thresher.schemas.readers import read_file
    from thresher.schemas.records import records_table

    records = []
    for path in sorted(data.glob("*.json")):
        result = read_file(path, "auto", 200_000)
        if result.rejected:
            raise SystemExit(f"{path}: {len(result.rejected)} rows rejected at ingest")
        records += result.records[:limit] if limit else result.records
    return records_table(records)


def independent_argmax(rows, scores) -> set[str]:
    """Per group, the first row (corpus order) with the largest finite mean; a group
    with no finite mean keeps no row (grape_select's documented rule)."""
    import math

    best: dict[str, tuple[float, str]] = {}
    for gid, rid in zip(rows["group_id"].to_pylist(), rows["row_id"].to_pylist()):
        score = scores.get(rid)
        if score is None or not math.isfinite(score):
            continue
        if gid not in best or score > best[gid][0]:
            best[gid] = (score, rid)
    return {rid for _, rid in best.values()}


def grape_run(backend_cfg, rows, max_tokens: int):
    """``GrapeStage`` then ``GrapeSelectStage`` on ``rows``: (scored rows with their mean, means by
    row id, kept row ids in corpus order, stage-rejected ids, scored tokens, scoring seconds)."""
    import pyarrow as pa

    from thresher.selectors.grape import GrapeParams, GrapeStage
    from thresher.selectors.grape_select import GrapeSelectParams, GrapeSelectStage

    stage = GrapeStage(GrapeParams(model=backend_cfg, template="auto", max_tokens=max_tokens, request_cache=False))
    started = time.perf_counter()
    out = stage.process(rows)
    seconds = time.perf_counter() - started
    attrs = out.attributes
    means = dict(zip(attrs["row_id"].to_pylist(), attrs["grape_logprob_mean"].to_pylist()))
    tokens = sum(attrs["grape_n_tokens"].to_pylist())
    rejected_ids = {r["row_id"] for r in out.rejected}
    scored_rows = rows.filter(pa.array([r not in rejected_ids for r in rows["row_id"].to_pylist()]))
    joined = scored_rows.append_column(
        "grape_logprob_mean", pa.array([means.get(r) for r in scored_rows["row_id"].to_pylist()], pa.float64()))
    select = GrapeSelectStage(GrapeSelectParams()).process(joined)
    lost = {r["row_id"] for r in select.rejected}
    kept = [r for r in joined["row_id"].to_pylist() if r not in lost]
    return joined, means, kept, rejected_ids, tokens, seconds


def grape_check(backend_cfg, rows, max_tokens: int) -> dict:
    joined, means, kept, rejected_ids, tokens, seconds = grape_run(backend_cfg, rows, max_tokens)
    expected = independent_argmax(joined, means)
    groups = len(set(rows["group_id"].to_pylist()))
    wins: dict[str, int] = {}
    for rid, cand in zip(joined["row_id"].to_pylist(), joined["candidate"].to_pylist()):
        if rid in expected:
            wins[cand or "?"] = wins.get(cand or "?", 0) + 1
    return {
        "candidates": rows.num_rows, "instructions": groups, "kept": len(kept),
        "kept_is_argmax": set(kept) == expected,
        "one_per_instruction": len(kept) == len(expected) == len({gid for gid, rid in zip(
            joined["group_id"].to_pylist(), joined["row_id"].to_pylist()) if rid in set(kept)}),
        "unscored_instructions": groups - len(expected),
        "unscored_rows": sum(1 for r in joined["row_id"].to_pylist() if means.get(r) is None),
        "stage_rejected": len(rejected_ids), "scored_tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "wins_by_model": dict(sorted(wins.items(), key=lambda kv: -kv[1])),
    }


def generation_check(backend, prompts: list[str], new_tokens: int, baseline_n: int) -> dict:
    import torch

    from thresher.generators.base import SamplingParams

    params = SamplingParams(n=1, temperature=0.0, max_tokens=new_tokens, seed=0)
    texts = [backend.apply_chat_template([{"role": "user", "content": p}]) if backend.tokenizer.chat_template
             else p for p in prompts]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    backend.generate(texts[:2], params)  # warm-up
    sync()
    started = time.perf_counter()
    generations = backend.generate(texts, params)
    sync()
    batched_s = time.perf_counter() - started
    batched_tokens = sum(len(g.completions[0].token_ids) for g in generations)

    tok, model = backend.tokenizer, backend.model
    started = time.perf_counter()
    loop_tokens = 0
    with torch.inference_mode():
        for text in texts[:baseline_n]:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            out = model.generate(**ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id
                                 or tok.eos_token_id)
            loop_tokens += out.shape[1] - ids["input_ids"].shape[1]
    sync()
    loop_s = time.perf_counter() - started
    batched_rate, loop_rate = batched_tokens / batched_s, loop_tokens / loop_s
    return {
        "prompts": len(texts), "new_tokens_cap": new_tokens,
        "batched_tokens_per_s": round(batched_rate, 1), "batched_seconds": round(batched_s, 2),
        "baseline_prompts": baseline_n, "baseline_tokens_per_s": round(loop_rate, 1),
        "speedup": round(batched_rate / loop_rate, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--gguf", help="a GGUF file to convert and use instead of --model")
    parser.add_argument("--data", type=Path, default=None, help="the alpaca_eval folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (as on the CPU) or bfloat16")
    parser.add_argument("--max-tokens", type=int, default=512, help="GRAPE's cap (examples/grape.yaml: 512)")
    parser.add_argument("--limit", type=int, default=None, help="first N instructions only (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gen-prompts", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--gen-baseline", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_thresher_from_checkout()

    import torch

    from thresher.generators.registry import load_model
    from thresher.schemas.model_config import ModelConfig

    report: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "torch": torch.__version__}
    t0 = time.perf_counter()
    print("[gpu_check] loading (a GGUF is converted first)", file=sys.stderr, flush=True)
    cfg = ModelConfig(name=model_name(args), device=args.device, dtype=args.dtype,
                      batch_size=args.batch_size, max_batch_tokens=max(16384, args.batch_size * args.max_tokens))
    def emit(phase: str) -> None:
        """Progress on stderr and the report so far under --out: a run cut off by its time limit keeps its figures."""
        print(f"[gpu_check] {phase} after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    started = t0
    rows = read_candidates(args.data or default_data(), args.limit)
    backend = load_model(cfg, cache=False)
    report["tokenizer"] = tokenizer_check(backend)
    emit(f"model loaded, tokenizer {report['tokenizer']}")
    if report["tokenizer"].get("ok") is False:
        print(json.dumps(report, indent=2))
        return 1
    report["grape"] = grape_check(cfg, rows, args.max_tokens)
    emit("GRAPE done")
    instructions = list(dict.fromkeys(m[0]["content"] for m in rows["messages"].to_pylist()))[: args.gen_prompts]
    report["generation"] = generation_check(backend, instructions, args.gen_tokens,
                                            min(args.gen_baseline, len(instructions)))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text)
    ok = report["grape"]["kept_is_argmax"] and report["grape"]["one_per_instruction"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
