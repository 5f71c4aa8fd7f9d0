"""The ``hf`` backend's decode loop: one left-padded batch, a KV cache, per-prompt seeded sampling.

Why a hand-written loop rather than transformers' ``model.generate``:
``tests/test_models_hf.py::test_greedy_decode_equals_transformers_generate``
checks that its greedy tokens equal ``generate(do_sample=False)`` over 32 new
tokens, for a batch of prompts of different lengths and for each prompt alone.
What the loop adds, and ``generate`` would need a custom logits processor,
a stopping criterion and its own post-processing for (so it would not be
shorter):

- sampling reproducible *per prompt*: each row draws from its own random
  stream (:mod:`thresher.generators.sampling`), so a prompt's samples do not
  depend on which prompts share its batch, nor on the batch size;
- ``top_logprobs``: the top-k of float32 ``log_softmax`` of the raw logits
  (before temperature and top-p), one list per generated token;
- stop strings found incrementally (:class:`~thresher.generators.backend_common.StopScanner`),
  each row stopping on its own.
"""

from __future__ import annotations

from typing import Any

import torch

from thresher.generators.backend_common import StopScanner, trim_at_stop
from thresher.generators.base import Completion, SamplingParams, TopK
from thresher.generators.batching import pad_batch
from thresher.generators.sampling import row_uniforms, select_tokens


def decode_batch(
    model: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    texts: list[str],
    sample_idx: list[int],
    params: SamplingParams,
    *,
    pad_id: int,
    eos_ids: set[int],
    context: int,
    device: torch.device,
) -> list[Completion]:
    """Decode the prompt ids ``seqs`` (one batch) until every row has stopped.

    ``texts`` and ``sample_idx`` (the prompt's text and the sample's index)
    seed each row's random stream. A row stops at an EOS or ``stop_token_ids``
    token (kept in ``token_ids``, left out of ``text``), at the first stop string
    (``text`` cut before it; ``token_ids`` run through the token that completed
    it), at ``max_tokens`` or at the context (``finish_reason="length"``).
    """
    ids, mask, _ = pad_batch(seqs, pad_id, "left", device)
    rows, width = ids.shape
    steps = max(0, min(params.max_tokens, context - width))
    u = None if params.temperature <= 0 else row_uniforms(texts, sample_idx, params.seed, steps).to(device)
    stop_ids = torch.tensor(sorted(eos_ids | set(params.stop_token_ids)) or [-1], device=device)
    k = params.top_logprobs or 0
    scanner = StopScanner(tokenizer, params.stop, rows) if params.stop else None
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    n_gen = torch.zeros(rows, dtype=torch.long, device=device)
    by_token = torch.zeros(rows, dtype=torch.bool, device=device)
    by_string = [False] * rows
    generated: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    top_lps: list[torch.Tensor] = []
    if steps:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    for step in range(steps):
        logits = out.logits[:, -1, :].float()
        if k:
            lp, ti = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
            top_ids.append(ti)
            top_lps.append(lp)
        nxt = select_tokens(logits, params.temperature, params.top_p, None if u is None else u[:, step])
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        generated.append(nxt)
        n_gen += (~finished).long()
        hit = torch.isin(nxt, stop_ids) & ~finished
        by_token |= hit
        finished |= hit
        if scanner is not None:
            tokens = nxt.tolist()
            for r in (~finished).nonzero().flatten().tolist():
                if scanner.push(r, tokens[r]):
                    by_string[r] = True
                    finished[r] = True
        if bool(finished.all()) or step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    gen = torch.stack(generated, dim=1).cpu() if generated else torch.zeros((rows, 0), dtype=torch.long)
    tops = None
    if k and top_ids:
        tops = (torch.stack(top_ids, dim=1).cpu().numpy(), torch.stack(top_lps, dim=1).cpu().numpy())
    comps = []
    for r in range(rows):
        n = int(n_gen[r])
        toks = gen[r, :n].tolist()
        text_toks = toks[:-1] if bool(by_token[r]) else toks
        text, cut = trim_at_stop(tokenizer.decode(text_toks, skip_special_tokens=True), params.stop)
        reason = "stop" if (bool(by_token[r]) or by_string[r] or cut) else "length"
        top = None
        if k:
            top = TopK.empty(k) if tops is None else TopK(tops[0][r, :n], tops[1][r, :n])
        comps.append(Completion(text=text, token_ids=toks, finish_reason=reason, top_logprobs=top))
    return comps
