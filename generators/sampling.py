"""Token selection for batched decoding, reproducible per prompt.

Sampling draws one uniform number per (prompt, sample, step) from a random
stream seeded by ``(seed, sample index, sha256(prompt))`` and picks the token by
inverse-CDF over the (temperature-scaled, top-p truncated) distribution. The
samples of a prompt therefore depend on its seed and text only, not on which
other prompts share its batch or on the batch size (up to the float noise a
different padding shape can cause in the logits).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Sequence

import numpy as np
import torch


def row_uniforms(
    prompts: Sequence[str], sample_index: Sequence[int], seed: int | None, steps: int
) -> torch.Tensor:
    """Uniforms in [0, 1) of shape ``(rows, steps)``, float64, one stream per row.

    ``seed=None`` draws fresh entropy (not reproducible).
    """
    out = np.empty((len(prompts), max(steps, 1)), dtype=np.float64)
    base = secrets.randbits(63) if seed is None else int(seed)
    for row, (prompt, j) in enumerate(zip(prompts, sample_index)):
        digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
        words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
        rng = np.random.default_rng([base & 0xFFFFFFFF, base >> 32, int(j), *words])
        out[row] = rng.random(out.shape[1])
    return torch.from_numpy(out)


def select_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor
) -> torch.Tensor:
    """The next token of each row: greedy at ``temperature == 0``, else sampled.

    ``logits``: raw logits ``(rows, vocab)``; ``u``: one uniform per row. Top-p
    keeps the smallest set of most likely tokens whose probability reaches
    ``top_p`` (the most likely token always stays).
    """
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits.double() / temperature
    if top_p < 1.0:
        scaled, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(scaled, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs[:, 0] = torch.where(probs[:, 0] > 0, probs[:, 0], torch.ones_like(probs[:, 0]))
    else:
        order = None
        probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # never land on a zero-probability token (possible only at float edges)
    idx = torch.where(probs.gather(-1, idx) > 0, idx, torch.argmax(probs, dim=-1, keepdim=True))
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)

