"""Train a student on thresher's KD labels: a minimal top-k logit-distillation loop.

    python examples/train_kd.py OUT --student MODEL [--fresh] [--steps N] [--batch-size B]
        [--lr LR] [--loss forward|reverse|jsd] [--seed S] [--max-length L]

OUT is a thresher output whose ``attributes/`` hold KD labels (a ``kd_logprobs`` or
``kd_generate`` stage, e.g. ``thresher run examples/kd.yaml``). MODEL is any name thresher
resolves (``embedded:smollm2-135m-instruct``, a local folder, a Hugging Face id already on
disk; nothing is downloaded). The student's tokenizer is checked against the teacher's
first: logit-level KD needs a shared tokenizer, so a mismatch stops here with exit code 2.

``--fresh`` trains a freshly initialised, tiny model of the student's architecture (2 layers,
hidden size 64, same vocabulary) instead of the pretrained weights: a quick check that the
labels, the batches and the loss fit together (its loss should fall within a few dozen steps).

Each step prints ``step N  loss X``; the last line gives the first and the last loss.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from thresher.generators.model_files import load_tokenizer, resolve_model_path
from thresher.schemas.kd_reader import (KDBatches, KDTokenizerMismatch, check_student_tokenizer, load_kd_rows,
                                        topk_kd_loss)


def tiny_config(path: str) -> object:
    """The student's config shrunk to 2 layers of width 64 (vocabulary and architecture kept)."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text = getattr(config, "text_config", None) or config  # multimodal configs keep the LM apart
    sizes = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16}
    for name, value in sizes.items():
        if hasattr(text, name):
            setattr(text, name, value)
    if getattr(text, "layer_types", None) is not None:  # per-layer attention kinds (e.g. Gemma 3)
        text.layer_types = list(text.layer_types[:2])
    return config


def load_student(path: str, fresh: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if fresh:
        return AutoModelForCausalLM.from_config(tiny_config(path))
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="a thresher output folder with KD labels")
    parser.add_argument("--student", required=True, help="model name (embedded:..., a folder, a cached hub id)")
    parser.add_argument("--fresh", action="store_true", help="a freshly initialised tiny student")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 with --fresh, 2e-5 otherwise")
    parser.add_argument("--loss", choices=("forward", "reverse", "jsd"), default="forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=None, help="cut sequences to this many tokens")
    args = parser.parse_args(argv)

    path = str(resolve_model_path(args.student)[0])
    try:
        check_student_tokenizer(args.out, load_tokenizer(path))
    except KDTokenizerMismatch as exc:
        print(f"refusing to train: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # no KD labels in OUT
        print(f"refusing to train: {exc}", file=sys.stderr)
        return 2

    table = load_kd_rows(args.out)
    batches = KDBatches(table, args.batch_size, shuffle=True, seed=args.seed, max_length=args.max_length)
    print(f"{table.num_rows} labelled rows, top-{batches.k}, {len(batches)} batches per epoch"
          + (f", {batches.skipped} rows skipped (no response token within --max-length)" if batches.skipped else ""),
          flush=True)
    if len(batches) == 0:
        print("nothing to train on", file=sys.stderr)
        return 2

    model = load_student(path, args.fresh, args.seed)
    model.train()
    lr = args.lr if args.lr is not None else (3e-3 if args.fresh else 2e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    while len(losses) < args.steps:
        for batch in batches:  # one epoch per pass; reshuffled each time
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = topk_kd_loss(logits, batch, kind=args.loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            print(f"step {len(losses)}  loss {losses[-1]:.4f}", flush=True)
            if len(losses) >= args.steps:
                break
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
