"""Why some GRAPE rows come out unscored on a GPU: a one-off probe for a device machine.

The GPU check of 2026-11-27 (H200, float32) found 44 of 805 AlpacaEval instructions
with no scored candidate at all (``grape_logprob_mean`` null for every row), while no
prompt reaches the 512-token cap. This script scores the same rows the same way
and reports, in ``$OUT/probe.json``:

- how many rows have a non-finite mean, and whether their token log-probs are NaN or -inf;
- for a few of them: the row scored alone (batch of one) on the same device, the
  first layer whose hidden state is not finite, and the score with the eager
  attention implementation and on the CPU.

    python bench/gpu_probe_unscored.py --gguf /tmp/gemma.gguf --data .gpu/alpaca_eval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import import_thresher_from_checkout, model_name, read_candidates, default_data  # noqa: E402


def classify(logprobs: list[float]) -> str:
    if any(math.isnan(x) for x in logprobs):
        return "nan"
    if any(math.isinf(x) for x in logprobs):
        return "inf"
    return "finite" if logprobs else "empty"


def first_bad_layer(backend, ids) -> str | None:
    """The first decoder layer whose output holds a non-finite value (forward hooks)."""
    import torch

    found: list[str] = []
    hooks = []
    layers = backend.model.base_model.layers
    for index, layer in enumerate(layers):
        def hook(_module, _inp, out, index=index):
            hidden = out[0] if isinstance(out, tuple) else out
            if not found and not torch.isfinite(hidden).all():
                found.append(f"layer {index}")
        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            emb = backend.model.base_model.embed_tokens(ids)
            if not torch.isfinite(emb).all():
                found.append("embeddings")
            backend.model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--gguf")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="probe the first rows even if all are finite")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_thresher_from_checkout()
    import torch

    from thresher.generators.registry import load_model
    from thresher.schemas.model_config import ModelConfig
    from thresher.schemas.records import split_response
    from thresher.selectors.grape_prompt import resolve_format

    name = model_name(args)
    cfg = ModelConfig(name=name, device=args.device, dtype="float32", batch_size=64, max_batch_tokens=32768)
    backend = load_model(cfg, cache=False)
    fmt = resolve_format("auto", backend)
    rows = read_candidates(args.data or default_data(), args.limit)
    prompts, responses = [], []
    for messages in rows["messages"].to_pylist():
        history, response = split_response(messages)
        prompts.append(fmt.render(history))
        responses.append(response)
    scores = backend.continuation_logprobs(prompts, responses, 512)
    kinds = [classify(s.token_logprobs) for s in scores]
    groups = rows["group_id"].to_pylist()
    bad = [i for i, k in enumerate(kinds) if k != "finite"]
    by_group: dict[str, list[str]] = {}
    for g, k in zip(groups, kinds):
        by_group.setdefault(g, []).append(k)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "rows": len(kinds),
        "kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "groups_all_bad": sum(all(k != "finite" for k in ks) for ks in by_group.values()),
        "groups_some_bad": sum(any(k != "finite" for k in ks) for ks in by_group.values()),
        "bad_lengths": sorted({len(scores[i].token_ids) + backend.count_tokens([prompts[i]])[0] for i in bad})[:40],
        "examples": [],
    }
    cpu_backend = None
    for i in (bad or (list(range(len(kinds))) if args.smoke else []))[: args.examples]:
        alone = backend.continuation_logprobs([prompts[i]], [responses[i]], 512)[0]
        seq = (backend.encode_prompts([prompts[i]])[0] + backend.encode_continuations([responses[i]])[0])[:512]
        ids = torch.tensor([seq], device=backend.device)
        example = {
            "row": i, "group": groups[i], "kind": kinds[i],
            "bad_positions": sum(1 for x in scores[i].token_logprobs if not math.isfinite(x)),
            "n_tokens": len(scores[i].token_logprobs),
            "alone_kind": classify(alone.token_logprobs),
            "alone_mean": alone.mean if math.isfinite(alone.mean) else str(alone.mean),
            "first_bad_layer_prompt": first_bad_layer(backend, ids),
            "prompt_head": prompts[i][:160],
        }
        try:
            backend.model.set_attn_implementation("eager")
            eager = backend.continuation_logprobs([prompts[i]], [responses[i]], 512)[0]
            example["eager_kind"] = classify(eager.token_logprobs)
            backend.model.set_attn_implementation("sdpa")
        except Exception as err:  # noqa: BLE001 - a probe reports what it can
            example["eager_kind"] = f"error: {err}"
        if args.device != "cpu":
            if cpu_backend is None:
                cpu_backend = load_model(cfg.model_copy(update={"device": "cpu"}), cache=False)
            on_cpu = cpu_backend.continuation_logprobs([prompts[i]], [responses[i]], 512)[0]
            example["cpu_kind"] = classify(on_cpu.token_logprobs)
            example["cpu_mean"] = on_cpu.mean if math.isfinite(on_cpu.mean) else str(on_cpu.mean)
        report["examples"].append(example)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
