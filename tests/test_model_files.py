"""Model files: resolution without torch, and identities that follow the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thresher.generators.base import ModelError
from thresher.generators.model_files import backend_kind, fingerprint, resolve_model_path

NO_TORCH = """
import json, sys
from thresher.generators.model_files import resolve_model_path
from thresher.generators.openai_backend import OpenAIBackend
import thresher.generators.vllm_backend
from thresher.schemas.model_config import ModelConfig

path, kind, ident = resolve_model_path("embedded:smollm2-135m-instruct")
backend = OpenAIBackend(ModelConfig(name="served", backend="openai", base_url="http://127.0.0.1:9/v1",
                                    tokenizer="embedded:smollm2-135m-instruct"))
facts = {"identity": backend.identity, "kind": backend.kind, "tokenizer_files": backend.vocab.resolve()[0].name}
from thresher.generators.model_files import load_tokenizer
facts["ids"] = {name: load_tokenizer(resolve_model_path(name)[0])("Hello, world")["input_ids"]
                for name in ("embedded:smollm2-135m-instruct", "embedded:gemma-3-270m")}
facts["torch"] = "torch" in sys.modules
from transformers import AutoTokenizer  # the reference: what AutoTokenizer gives (it imports torch)
facts["auto_ids"] = {name: AutoTokenizer.from_pretrained(resolve_model_path(name)[0])("Hello, world")["input_ids"]
                     for name in facts["ids"]}
import thresher.generators.hf  # the control: the hf backend does import torch
facts["torch_after_hf"] = "torch" in sys.modules
print(json.dumps(facts))
"""


@pytest.mark.slow
def test_resolving_and_loading_the_openai_or_vllm_tokenizer_imports_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["identity"].startswith("openai:served|tokenizer:embedded:smollm2-135m-instruct@")
    assert facts["kind"] == "causal-lm" and facts["tokenizer_files"].startswith("smollm2-135m-instruct-")
    assert facts["torch"] is False and facts["torch_after_hf"] is True
    assert facts["ids"] == facts["auto_ids"] and all(len(ids) >= 3 for ids in facts["ids"].values())


def _folder(root: Path, weights: bytes) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_a_local_folder_is_identified_by_its_config_and_weights(tmp_path):
    a = _folder(tmp_path / "a", b"x" * 10)
    path, kind, ident = resolve_model_path(str(a))
    assert path == a.resolve() and kind == "causal-lm" and ident == f"{a.resolve()}@{fingerprint(a)}"
    before = fingerprint(a)
    (a / "model.safetensors").write_bytes(b"x" * 11)  # other weights, another identity
    assert fingerprint(a) != before
    (a / "modules.json").write_text("[]")
    assert resolve_model_path(str(a))[1] == "sentence-transformer"
    assert backend_kind("sentence-transformer") == "embedding" and backend_kind("causal-lm") == "causal-lm"


def test_nothing_is_downloaded():
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model_path("no-such-org/no-such-model")
