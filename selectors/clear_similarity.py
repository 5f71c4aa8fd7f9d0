"""Similarity of a response to a sampled answer, for BSDetector's observed consistency.

BSDetector (arXiv 2308.16175, Sec. 3.1) measures how much each sampled answer y_i
agrees with the given response y with an NLI cross-encoder: ``1 - P(contradiction)``.
Two implementations:

- :class:`NLISimilarity` — the paper's choice, when the user configures an NLI model
  (a local folder ``AutoModelForSequenceClassification`` loads, e.g. DeBERTa-large-MNLI).
  The contradiction label is found by name in the model's ``id2label``. The
  contradiction probability is averaged over both directions (y => y_i and y_i => y),
  so the score does not depend on which text is the premise.
- :class:`EmbeddingSimilarity` — the default, since no NLI model ships with thresher:
  cosine similarity of sentence embeddings (``embedded:all-minilm-l6-v2``), clipped to
  [0, 1]. It measures topical/semantic agreement rather than logical contradiction,
  so it is weaker on short factual answers that differ in one detail, and strong at
  telling an on-topic answer from an unrelated or garbage one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from thresher.generators.sequence_classifier import load_sequence_classifier
from thresher.schemas.model_config import ModelConfig


class Similarity(Protocol):
    identity: str

    def scores(self, responses: Sequence[str], samples: Sequence[str]) -> np.ndarray:
        """Agreement in [0, 1] of each ``responses[i]`` with ``samples[i]``."""


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings, clipped to [0, 1]."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.identity = f"cosine:{backend.identity}"

    def scores(self, responses: Sequence[str], samples: Sequence[str]) -> np.ndarray:
        if len(responses) != len(samples):
            raise ValueError("responses and samples must have the same length")
        if not responses:
            return np.zeros(0)
        texts = list(dict.fromkeys([*responses, *samples]))
        index = {t: i for i, t in enumerate(texts)}
        emb = np.asarray(self.backend.embed(texts), dtype=np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        a = emb[[index[t] for t in responses]]
        b = emb[[index[t] for t in samples]]
        return np.clip(np.sum(a * b, axis=1), 0.0, 1.0)


def _load_nli(cfg: ModelConfig):
    """Tokenizer, model, contradiction index and device of a local NLI model (once per process)."""
    tok, model, device = load_sequence_classifier(cfg, "clear: nli_model")
    labels = {int(i): str(n).lower() for i, n in model.config.id2label.items()}
    found = [i for i, n in labels.items() if n.startswith("contradict")]
    if len(found) != 1:
        raise ValueError(
            f"clear: nli_model {cfg.name!r} has labels {sorted(labels.values())}; "
            "expected exactly one 'contradiction' label"
        )
    return tok, model, found[0], device


class NLISimilarity:
    """``1 - P(contradiction)`` from an NLI cross-encoder, averaged over both directions."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.tokenizer, self.model, self.contradiction, self.device = _load_nli(cfg)
        self.identity = f"nli:{Path(cfg.name).name}"

    def contradiction_probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros(len(premises))
        bs = self.cfg.batch_size
        for a in range(0, len(premises), bs):
            enc = self.tokenizer(list(premises[a:a + bs]), list(hypotheses[a:a + bs]),
                                 padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            out[a:a + bs] = torch.softmax(logits, dim=-1)[:, self.contradiction].cpu().numpy()
        return out

    def scores(self, responses: Sequence[str], samples: Sequence[str]) -> np.ndarray:
        if len(responses) != len(samples):
            raise ValueError("responses and samples must have the same length")
        forward = self.contradiction_probs(responses, samples)
        backward = self.contradiction_probs(samples, responses)
        return 1.0 - (forward + backward) / 2.0
