"""Local sequence-classification models (an NLI cross-encoder, a reward model), loaded once per process.

Nothing is fetched from a hub: the model is a folder on disk (``ModelConfig.name``). The
tokenizer and model load with transformers' ``AutoTokenizer`` and
``AutoModelForSequenceClassification``, go to the GPU when ``device`` is ``auto``/``cuda`` and
one is there, and are kept per (folder, device) for the life of the process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from thresher.schemas.model_config import ModelConfig

_LOADED: dict[str, tuple[Any, Any, Any]] = {}
_LOCK = threading.Lock()


def load_sequence_classifier(cfg: ModelConfig, what: str) -> tuple[Any, Any, Any]:
    """(tokenizer, model in eval mode, torch device) of the local folder ``cfg.name``.

    ``what`` names the role in errors, e.g. ``"clear: nli_model"``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(cfg.name).expanduser()
    if not path.is_dir():
        raise ValueError(f"{what} {cfg.name!r} is not a local folder; give the path of a downloaded "
                         "sequence-classification checkpoint — nothing is fetched from a hub")
    key = f"{path.resolve()}|{cfg.device}"
    with _LOCK:
        if key not in _LOADED:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
            wants_gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
            device = torch.device("cuda" if wants_gpu else "cpu")
            model.to(device).eval()
            _LOADED[key] = (tokenizer, model, device)
        return _LOADED[key]
