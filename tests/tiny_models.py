"""Very small, randomly initialised models of a real architecture, with a real tokenizer, as model folders.

For tests of code paths that train or generate where the embedded models would cost too much
time: the code path (transformers, TRL, the chat template, the save and load) is the real one.
"""

from __future__ import annotations

from pathlib import Path


def tiny_smollm2(out: Path, seed: int = 0) -> Path:
    """A 2-layer, width-32 model of SmolLM2-135M-Instruct's architecture (LlamaForCausalLM) with
    SmolLM2's tokenizer and chat template, saved in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from thresher.generators.model_files import load_tokenizer, resolve_model_path

    src, _, _ = resolve_model_path("embedded:smollm2-135m-instruct")
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    load_tokenizer(src).save_pretrained(out)
    return out
