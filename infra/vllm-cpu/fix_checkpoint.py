"""Copy a thresher-converted checkpoint and rewrite model.safetensors in the standard
transformers layout for tied embeddings: keep only `model.embed_tokens.weight`
(drop `lm_head.weight`), metadata {"format": "pt"} -- what save_pretrained writes.

usage: fix_checkpoint.py SRC_DIR DST_DIR
"""
import json, shutil, sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.time()
dst.mkdir(parents=True, exist_ok=True)
for p in src.iterdir():
    if p.name != "model.safetensors":
        shutil.copy2(p, dst / p.name)
cfg = json.loads((src / "config.json").read_text())
if not cfg.get("architectures"):
    # convert_gguf saves model.config, which has no `architectures` after a GGUF load;
    # save_pretrained writes the class name, and vLLM needs it: without it vLLM resolves
    # LlamaModel / Gemma3TextModel (Gemma3 -> Gemma3ModelForEmbedding, a pooling model).
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg["model_type"]]]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print("added architectures:", cfg["architectures"])
tied = cfg.get("tie_word_embeddings", False)
tensors = {}
with safe_open(str(src / "model.safetensors"), "pt") as f:
    meta = f.metadata()
    for k in f.keys():
        tensors[k] = f.get_tensor(k)
print("source metadata:", meta, "| tie_word_embeddings:", tied)
if tied and "model.embed_tokens.weight" not in tensors and "lm_head.weight" in tensors:
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    print("renamed lm_head.weight -> model.embed_tokens.weight")
save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
print(f"wrote {dst} in {time.time()-t0:.1f}s;", len(tensors), "tensors")
