"""A reward model: one number for a whole conversation, from a local sequence-classification model.

Magpie's ``reward`` tag (magpie-align/magpie ``exp/gen_rm.py``; their reward model is
FsfairX-LLaMA3-RM, and ArmoRM for Llama-3 data): the conversation (instruction and response)
is rendered with the reward model's own chat template, tokenized without adding special
tokens again, and the model's single logit is the reward. The reference keeps rows with a
reward above -10 (and reads ``reward - base reward`` where it has a base model's answers).

No reward model is embedded: ``ModelConfig.name`` is a local folder (nothing is fetched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from thresher.generators.sequence_classifier import load_sequence_classifier
from thresher.schemas.model_config import ModelConfig

Message = dict[str, str]


class RewardModel:
    """``scores(conversations)``: the reward of each conversation (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.tokenizer, self.model, self.device = load_sequence_classifier(cfg, "magpie_tag: reward_model")
        if self.model.config.num_labels != 1:
            raise ValueError(f"magpie_tag: reward_model {cfg.name!r} has {self.model.config.num_labels} labels; "
                             "a reward model has one output (the reward)")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"magpie_tag: reward_model {cfg.name!r} has no chat template to render conversations")
        if self.tokenizer.pad_token is None:  # batches need padding; the model finds each row's last real token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.identity = f"reward:{Path(cfg.name).name}"

    def texts(self, conversations: Sequence[Sequence[Message]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(list(c), tokenize=False) for c in conversations]

    def scores(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        import torch

        texts = self.texts(conversations)
        out = np.zeros(len(texts))
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            batch = self.tokenizer(texts[start:start + size], padding=True, truncation=True,
                                   add_special_tokens=False, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out[start:start + size] = self.model(**batch).logits[:, 0].float().cpu().numpy()
        return out
