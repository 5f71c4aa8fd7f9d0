"""The top-k KD loss and batch layout (thresher.schemas.kd_reader), on small hand-built tensors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from thresher.generators.base import ContinuationTopK, TopK
from thresher.schemas.kd import kd_table
from thresher.schemas.kd_reader import KDBatch, KDBatches, topk_kd_divergence, topk_kd_loss

V = 11


def _batch(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> KDBatch:
    """One row whose every position is a target, for the loss alone."""
    n, k = topk_ids.shape
    return KDBatch(input_ids=torch.zeros(1, n, dtype=torch.long), attention_mask=torch.ones(1, n, dtype=torch.long),
                   target_mask=torch.ones(1, n, dtype=torch.bool), topk_ids=topk_ids.view(1, n, k),
                   topk_logprobs=topk_logprobs.view(1, n, k).float(), labels=topk_ids[:, 0].view(1, n),
                   row_ids=["r"])


def _teacher(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Full log-softmax of random logits, (n, V), peaky enough that top-k matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(n, V, generator=g), dim=-1)


def _topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logp.topk(k, dim=-1)
    return ids, values


def test_forward_kl_is_zero_at_equality_with_the_full_vocab_and_positive_otherwise():
    teacher = _teacher()
    ids, lps = _topk(teacher, V)  # k = V: no tail
    batch = _batch(ids, lps)
    same = topk_kd_loss(teacher.unsqueeze(0), batch, "forward")
    assert abs(float(same)) < 1e-5
    other = topk_kd_loss(_teacher(seed=1).unsqueeze(0), batch, "forward")
    assert float(other) > 0.1
    # with k = V the loss is the plain full-vocabulary KL
    student = torch.log_softmax(_teacher(seed=1), -1)
    full = (teacher.exp() * (teacher - student)).sum(-1).mean()
    assert float(other) == pytest.approx(float(full), rel=1e-4)


def test_the_tail_bucket_gives_the_kl_over_k_plus_one_buckets():
    teacher, student_logits = _teacher(), 2 * _teacher(seed=2) + 0.3
    k = 3
    ids, lps = _topk(teacher, k)
    loss = topk_kd_loss(student_logits.unsqueeze(0), _batch(ids, lps), "forward")
    # direct: p and q over (the teacher's k ids, everything else), from the full distributions
    q_full = torch.softmax(student_logits.double(), -1)
    p_full = teacher.double().exp()
    p_k, q_k = p_full.gather(-1, ids), q_full.gather(-1, ids)
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    direct = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(loss) == pytest.approx(float(direct), rel=1e-4)
    # and it is not the truncated sum without the tail
    truncated = (p_k * (p_k.log() - q_k.log())).sum(-1).mean()
    assert abs(float(loss) - float(truncated)) > 1e-3


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
@pytest.mark.parametrize("k", [3, V])
def test_reverse_and_jsd_are_nonnegative_and_zero_at_equality(kind, k):
    teacher = _teacher(n=6)
    ids, lps = _topk(teacher, k)
    batch = _batch(ids, lps)
    assert abs(float(topk_kd_loss(teacher.unsqueeze(0), batch, kind))) < 1e-5
    for seed in range(1, 4):
        per_position = topk_kd_divergence(_teacher(n=6, seed=seed), ids, lps, kind)
        assert bool((per_position >= -1e-6).all()), per_position
        assert float(per_position.mean()) > 1e-3
    # the direct k+1-bucket value, for the reverse KL and the JSD
    student = _teacher(n=6, seed=5)
    q_full, p_full = student.double().exp(), teacher.double().exp()
    p_k, q_k = p_full.gather(-1, ids), q_full.gather(-1, ids)
    p = torch.cat([p_k, (1 - p_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    q = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    xlogy = lambda a, b: torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log()), 0 * a)
    if kind == "reverse":
        direct = xlogy(q, p).sum(-1)
    else:
        direct = 0.5 * xlogy(p, (p + q) / 2).sum(-1) + 0.5 * xlogy(q, (p + q) / 2).sum(-1)
    got = topk_kd_divergence(student, ids, lps, kind)
    assert torch.allclose(got.double(), direct, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_padding_entries_give_a_finite_loss_and_gradients(kind):
    teacher = _teacher()
    ids, lps = _topk(teacher, 5)
    ids, lps = ids.clone(), lps.clone()
    ids[1, 2:], lps[1, 2:] = 0, -math.inf   # a position the server gave only 2 entries
    ids[2, :], lps[2, :] = 0, -math.inf     # and one it gave none
    logits = _teacher(seed=3).clone().requires_grad_(True)
    loss = topk_kd_loss(logits.unsqueeze(0), _batch(ids, lps), kind)
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # the padded entries are ignored: the same as the 2-entry top-k (the rest is the tail)
    alone = topk_kd_divergence(logits.detach()[1:2], ids[1:2, :2], lps[1:2, :2], kind)
    padded = topk_kd_divergence(logits.detach()[1:2], ids[1:2], lps[1:2], kind)
    assert float(padded) == pytest.approx(float(alone), rel=1e-5)


def test_kd_batches_place_the_topk_entries_before_the_tokens_they_predict():
    k = 3
    rows = []
    for prompt, response in (([5, 6, 7], [8]), ([4], [3, 2, 1, 10])):
        t = len(response)
        ids = np.stack([[tok, (tok + 1) % V, -1] for tok in response]).astype(np.int32)
        lps = np.tile(np.array([-0.1, -2.5, -np.inf], np.float32), (t, 1))
        lps[:, 0] = -np.arange(1, t + 1) / 10  # entry t is recognisable by its top log-prob
        rows.append(ContinuationTopK(np.array(prompt, np.int32), np.array(response, np.int32), TopK(ids, lps)))
    table = kd_table(["a", "b"], rows, k, json.dumps({"teacher": "t"}))

    (batch,) = list(KDBatches(table, batch_size=2))
    assert batch.row_ids == ["a", "b"]
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0], [4, 3, 2, 1, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.target_mask.tolist() == [[False, False, True, False, False], [True, True, True, True, False]]
    assert batch.labels.tolist() == [[-100, -100, 8, -100, -100], [3, 2, 1, 10, -100]]
    # entry t at position prompt_len - 1 + t; padding entries -> id 0, log-prob -inf
    assert batch.topk_ids[0, 2].tolist() == [8, 9, 0]
    assert batch.topk_ids[1, :4].tolist() == [[3, 4, 0], [2, 3, 0], [1, 2, 0], [10, 0, 0]]
    assert batch.topk_logprobs[1, :4, 0].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4], abs=1e-3)
    assert batch.topk_logprobs[1, :4, 1].tolist() == pytest.approx([-2.5] * 4, abs=1e-3)
    assert torch.isneginf(batch.topk_logprobs[:, :, 2]).all()
    assert torch.isneginf(batch.topk_logprobs[~batch.target_mask]).all()
    assert (batch.topk_ids[~batch.target_mask] == 0).all()
    assert batch.topk_ids.dtype == torch.long and batch.topk_logprobs.dtype == torch.float32
    # the label at every target position is the next input token
    b, pos = batch.target_mask.nonzero(as_tuple=True)
    assert (batch.labels[b, pos] == batch.input_ids[b, pos + 1]).all()

    # max_length cuts response tokens from the right; a row left with no response token is skipped
    cut = KDBatches(table, batch_size=4, max_length=3)
    (only,) = list(cut)
    assert cut.skipped == 1 and only.row_ids == ["b"]
    assert only.input_ids.tolist() == [[4, 3, 2]] and only.labels.tolist() == [[3, 2, -100]]
    assert only.topk_logprobs[0, :2, 0].tolist() == pytest.approx([-0.1, -0.2], abs=1e-3)

    # shuffling covers every row once per epoch, reproducibly
    order = [r for b in KDBatches(table, batch_size=1, shuffle=True, seed=3) for r in b.row_ids]
    assert sorted(order) == ["a", "b"]


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_teacher_probabilities_summing_past_one_stay_finite_and_nonnegative(kind):
    # float16 log-probs of a confident teacher: exp(0) + exp(-3) > 1, so 1 - sum p < 0
    ids = torch.tensor([[2, 7]])
    lps = torch.tensor([[0.0, -3.0]], dtype=torch.float16).float()
    logits = torch.zeros(1, V, requires_grad=True)
    value = topk_kd_divergence(logits, ids, lps, kind)
    value.sum().backward()
    assert torch.isfinite(value).all() and float(value.detach()) > 0
    assert torch.isfinite(logits.grad).all()
    # a student that puts all its mass on the teacher's top-1 id is (almost) at zero
    peaked = torch.full((1, V), -30.0)
    peaked[0, 2], peaked[0, 7] = 0.0, -3.0
    assert float(topk_kd_divergence(peaked, ids, lps, kind)) < 1e-3
