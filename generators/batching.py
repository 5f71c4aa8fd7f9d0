"""Length-sorted batch planning and padding for batched model calls.

Sorting by length before batching keeps padding small, so a batched forward
spends nearly all of its compute on real tokens. Batches are planned longest
first: a batch that would not fit in memory fails at once, not at the end.
"""

from __future__ import annotations

from typing import Sequence

import torch


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_batch_tokens: int,
    min_tokens: int | None = None,
    max_padding: float = 0.1,
) -> list[list[int]]:
    """Group item indices into batches of similar length.

    Each batch holds at most ``batch_size`` items and at most ``max_batch_tokens``
    padded tokens (items x longest item), except that an item longer than the
    token budget still gets a batch of its own. Items are visited longest first
    (ties by index, so the plan is deterministic).

    ``min_tokens``: once a batch holds that many real tokens it is also closed
    when the next item would make more than ``max_padding`` of its padded
    tokens padding. Past a few hundred tokens a CPU forward is no faster per
    token in a bigger batch, so there padding is pure waste; ``None`` disables it.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = real = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        new_longest = max(longest, n)
        padded = new_longest * (len(current) + 1)
        wasteful = (
            min_tokens is not None and real >= min_tokens and 1 - (real + n) / padded > max_padding
        )
        if current and (len(current) >= batch_size or padded > max_batch_tokens or wasteful):
            batches.append(current)
            current, new_longest, real = [], n, 0
        current.append(i)
        longest = new_longest
        real += n
    if current:
        batches.append(current)
    return batches


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``(ids, attention_mask, lengths)`` tensors.

    ``side="right"`` puts real tokens first (position ids are then the plain
    ``arange``, and under a causal mask no real token ever sees a pad);
    ``side="left"`` puts them last (for decoding, where every row's next token
    goes to the same column).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    lengths = [len(s) for s in seqs]
    width = max(lengths) if lengths else 0
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[row, : len(s)] = t
            mask[row, : len(s)] = 1
        else:
            ids[row, width - len(s):] = t
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device), torch.as_tensor(lengths, dtype=torch.long, device=device)
