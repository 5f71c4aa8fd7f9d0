"""The ``hf`` backend: transformers + torch, CPU or CUDA, every method batched.

What is computed, and the choices made:

- **Prompt tokenization** (``generate``, ``continuation_logprobs``'s prompt,
  ``next_token_logprobs``, causal-LM ``embed``): the text is tokenized with no
  special tokens and the tokenizer's *default prefix* (its BOS, if it adds one
  by default) is put in front, unless the text already starts with the BOS
  string (a chat template or a Magpie pre-query template that spells out
  ``<bos>``), which is then not doubled. No EOS is ever appended to a prompt.
  So Magpie's pre-query template reaches the model exactly as written.
- **Continuations** are tokenized separately with ``add_special_tokens=False``
  and their ids appended to the prompt's ids (GRAPE): a continuation's tokens
  never depend on its prompt. A prompt that tokenizes to nothing is given the
  BOS (else EOS) token, so the first continuation token has a context.
- **Log-probabilities** are ``log_softmax`` of the model's raw logits (no
  temperature, no top-p), in float32, over the full vocabulary, everywhere:
  continuation scores, next-token scores and generation ``top_logprobs``.
- **Batching**: items are sorted by length and grouped under
  ``ModelConfig.batch_size`` and ``max_batch_tokens``. Scoring and embedding
  pad on the RIGHT (real tokens keep positions ``0..n-1`` and, under the causal
  mask, never see a pad, so no padding mask is needed and results match
  one-at-a-time calls); decoding pads on the LEFT with an attention mask and
  explicit position ids. Only the positions that are scored go through the LM
  head (the big vocabulary projection), in chunks that bound memory.
- **Sampling** is reproducible per prompt: see :mod:`thresher.generators.sampling`.
- **Decoding** is a hand-written loop over a KV cache
  (:func:`~thresher.generators.hf_decode.decode_batch`), kept rather than
  ``model.generate``: a test pins its greedy output to ``generate(do_sample=False)``
  over 32 tokens, and ``generate`` would need a custom logits processor and
  stopping criterion to sample per prompt independently of the batch (see
  :mod:`thresher.generators.hf_decode`).
- **Truncation**: ``continuation_logprobs`` cuts prompt + continuation from the
  right at ``max_tokens`` or the context and flags it; ``next_token_logprobs``
  keeps the *last* tokens of an over-long prompt (its end asks the question);
  ``embed`` keeps the first tokens (as deita and sentence-transformers do);
  ``generate`` keeps the last ``context - 1`` prompt tokens and stops at the
  context.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from thresher.generators.base import (
    Completion,
    ContinuationScore,
    ContinuationTopK,
    Generation,
    Message,
    ModelBackend,
    ModelError,
    SamplingParams,
    TopK,
)
from thresher.generators.backend_common import PromptEncoder, resolve_single_tokens, truncate_pair
from thresher.generators.batching import pad_batch, plan_batches
from thresher.generators.embedded import is_embedded
from thresher.generators.hf_decode import decode_batch
from thresher.generators.hf_head import SelectedLogits, head_logits, log_normalizer_
from thresher.generators.model_files import backend_kind, load_tokenizer, resolve_model_path
from thresher.schemas.model_config import ModelConfig

#: on CPU, real tokens after which a batch closes rather than carry > 10% padding
MIN_CPU_BATCH_TOKENS = 512

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- device, dtype


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(requested: str, config: Any, device: torch.device) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype (float32 when unstated or float16 on CPU)."""
    if requested != "auto":
        return _DTYPES[requested]
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stated, str):
        stated = _DTYPES.get(stated)
    if stated not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32
    if stated == torch.float16 and device.type == "cpu":
        return torch.float32
    return stated


# --------------------------------------------------------------------------- backend


class HFBackend(ModelBackend):
    """A causal LM (or a sentence-transformer, for :meth:`embed` only) on transformers.

    One instance holds one model on one device; every public method is
    thread-safe (calls are serialized) and runs under ``torch.inference_mode``.
    """

    def __init__(self, cfg: ModelConfig | str) -> None:
        self.cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
        if self.cfg.backend != "hf":
            raise ModelError(f"HFBackend got a config for backend {self.cfg.backend!r}")
        self.device = pick_device(self.cfg.device)
        if self.cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads)
        self._lock = threading.RLock()
        self._closed = False
        path, file_kind, ident = resolve_model_path(self.cfg.name, self.cfg.revision)
        self.path = path
        self.kind = backend_kind(file_kind)
        if self.kind == "embedding":
            self._load_sentence_transformer(path)
            self.identity = f"hf:{ident}"
        else:
            self._load_causal_lm(path)
            self.identity = f"hf:{ident}:{str(self.dtype).removeprefix('torch.')}"
            if self.cfg.tokenizer:  # another tokenizer, another model as far as results go
                self.identity += f":tokenizer={resolve_model_path(self.cfg.tokenizer)[2]}"
            if self.cfg.max_model_len:  # changes where long inputs are cut
                self.identity += f":ctx={self.context}"

    # ------------------------------------------------------------------ loading

    def _load_sentence_transformer(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self.model = None
        self.dtype = torch.float32
        self._tok = self.st.tokenizer
        self.context = int(self.st.max_seq_length or 512)

    def _load_causal_lm(self, path: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        revision = None if is_embedded(self.cfg.name) else self.cfg.revision
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.dtype = _resolve_dtype(self.cfg.dtype, config, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, revision=revision, local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.st = None
        tok_src: Path | str = path
        if self.cfg.tokenizer:
            tok_src = resolve_model_path(self.cfg.tokenizer)[0]
        self._tok = load_tokenizer(tok_src)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else 0)
        ctx = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context = int(min(ctx, self.cfg.max_model_len or ctx))
        self._encoder = PromptEncoder(self._tok)
        self._prefix_ids = self._encoder.prefix_ids
        self._eos_ids = self._collect_eos_ids()
        probe = self._prefix_ids + self._tok("The cat sat", add_special_tokens=False)["input_ids"]
        self._selected = SelectedLogits(self.model, self.device, probe)

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self._tok.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids

    # ------------------------------------------------------------------ helpers

    @property
    def tokenizer(self) -> Any:
        return self._tok

    @property
    def context_length(self) -> int:
        return self.context

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens as :meth:`encode_prompts` makes them; a sentence-transformer's with its special tokens."""
        if self.kind == "embedding":
            return [len(ids) for ids in self._tok(list(texts))["input_ids"]] if texts else []
        return [len(ids) for ids in self.encode_prompts(texts)]

    def close(self) -> None:
        """Drop the model and the logits buffer, and free the CUDA cache; later calls raise."""
        with self._lock:
            self._closed = True
            if self.model is not None:
                self._selected.close()
            self.model = self.st = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise ModelError(
                f"{self.cfg.name} has no chat template (a base model?): use generate() "
                "with a prompt you format yourself"
            )
        return super().apply_chat_template(messages, add_generation_prompt)

    def _require_open(self) -> None:
        if self._closed:
            raise ModelError(f"the hf backend of {self.cfg.name} was closed; load the model again")

    def _require_lm(self, what: str) -> None:
        self._require_open()
        if self.model is None:
            raise ModelError(f"{self.cfg.name} is a sentence-transformer: it cannot {what}")

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of raw prompts: default prefix (BOS) + text, BOS never doubled."""
        return self._encoder.encode_prompts(texts)

    def encode_continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of continuations: no special tokens at all."""
        return self._encoder.encode_continuations(texts)

    def _start_ids(self) -> list[int]:
        """The context given to an empty prompt: the default prefix, else BOS, else EOS, else pad."""
        try:
            return self._encoder.start_ids()
        except ModelError:
            return [self.pad_id]

    def _batches(self, lengths: Sequence[int], decode: bool = False) -> list[list[int]]:
        """Length-sorted batches. For a single forward on CPU a batch also closes
        rather than pad > 10% once it holds MIN_CPU_BATCH_TOKENS real tokens (bigger
        CPU batches gain nothing there); decoding reads all weights every step, so
        its batches stay as full as the budgets allow."""
        min_tokens = MIN_CPU_BATCH_TOKENS if self.device.type == "cpu" and not decode else None
        return plan_batches(lengths, self.cfg.batch_size, self.cfg.max_batch_tokens, min_tokens)

    def _head(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits (float32) of hidden states (see :func:`~thresher.generators.hf_head.head_logits`)."""
        return head_logits(self.model, hidden, out)

    # ------------------------------------------------------------------ scoring

    def continuation_logprobs(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        max_tokens: int | None = None,
    ) -> list[ContinuationScore]:
        """Teacher-forced log p(c_t | prompt, c_<t) of each continuation token, batched.

        Prompt and continuation are tokenized separately and concatenated; one
        forward per length-sorted batch; ``log_softmax`` of the raw logits is
        gathered at the continuation's ids; prompt positions are never scored.
        """
        self._require_lm("score continuations")
        p_ids, c_ids, truncated = self._forced_pairs(prompts, continuations, max_tokens)
        results: list[ContinuationScore | None] = [None] * len(p_ids)
        for batch, ids, select in self._forced_batches(p_ids, c_ids):
            labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[select]

            def reduce(logits: torch.Tensor, sl: slice) -> torch.Tensor:
                picked = logits.gather(-1, labels[sl, None]).squeeze(-1)
                return picked - log_normalizer_(logits)

            flat = self._selected.run(ids, select, reduce).double().cpu().tolist()
            start = 0
            for i in batch:
                n = len(c_ids[i])
                results[i] = ContinuationScore(
                    token_ids=list(c_ids[i]), token_logprobs=flat[start:start + n], truncated=truncated[i]
                )
                start += n
        return [r for r in results if r is not None]

    def continuation_topk(
        self, prompts: Sequence[str], continuations: Sequence[str], k: int, max_tokens: int | None = None,
    ) -> list[ContinuationTopK]:
        """Teacher-forced top-k of float32 ``log_softmax`` of the raw logits at every continuation
        token; only those positions go through the LM head (batched as :meth:`continuation_logprobs`)."""
        self._require_lm("give top-k log-probs")
        k = int(k)
        p_ids, c_ids, truncated = self._forced_pairs(prompts, continuations, max_tokens)
        results: list[ContinuationTopK | None] = [None] * len(p_ids)
        for batch, ids, select in self._forced_batches(p_ids, c_ids):

            def reduce(logits: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
                values, indices = torch.topk(logits, k, dim=-1)  # sorted, most likely first
                return values - log_normalizer_(logits)[:, None], indices

            if bool(select.any()):
                lps, tids = self._selected.run(ids, select, reduce)
                lps, tids = lps.float().cpu().numpy(), tids.cpu().numpy().astype(np.int32)
            else:  # every continuation of the batch is empty (or cut away)
                lps, tids = np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
            start = 0
            for i in batch:
                n = len(c_ids[i])
                results[i] = ContinuationTopK(
                    prompt_ids=np.asarray(p_ids[i], np.int32), token_ids=np.asarray(c_ids[i], np.int32),
                    topk=TopK(tids[start:start + n], lps[start:start + n]), truncated=truncated[i])
                start += n
        return [r for r in results if r is not None]

    def _forced_pairs(self, prompts: Sequence[str], continuations: Sequence[str],
                      max_tokens: int | None) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """Prompt ids, continuation ids and truncation flags for teacher forcing."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        cap = self.context if max_tokens is None else max(0, min(int(max_tokens), self.context))
        p_ids = [p if p else self._start_ids() for p in self.encode_prompts(prompts)]
        c_ids = self.encode_continuations(continuations)
        truncated = [False] * len(p_ids)
        for i, (p, c) in enumerate(zip(p_ids, c_ids)):
            p_ids[i], c_ids[i], truncated[i] = truncate_pair(p, c, cap)
        return p_ids, c_ids, truncated

    def _forced_batches(self, p_ids: list[list[int]], c_ids: list[list[int]]):
        """Yield ``(indices, right-padded ids, positions that predict a continuation token)`` per batch,
        under the model lock and ``inference_mode``."""
        with self._lock, torch.inference_mode():
            for batch in self._batches([len(p_ids[i]) + len(c_ids[i]) for i in range(len(p_ids))]):
                ids, _, _ = pad_batch([p_ids[i] + c_ids[i] for i in batch], self.pad_id, "right", self.device)
                plen = torch.tensor([len(p_ids[i]) for i in batch], device=self.device)[:, None]
                clen = torch.tensor([len(c_ids[i]) for i in batch], device=self.device)[:, None]
                pos = torch.arange(ids.shape[1], device=self.device)[None, :]
                # position t predicts token t + 1: positions plen-1 .. plen+clen-2
                yield batch, ids, (pos >= plen - 1) & (pos < plen + clen - 1)

    def resolve_single_tokens(self, candidates: Sequence[str]) -> list[int]:
        """Each candidate string's one token id in this tokenizer (see
        :func:`~thresher.generators.backend_common.resolve_single_tokens`)."""
        return resolve_single_tokens(self._tok, candidates, self.cfg.name)

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Full-vocabulary log-probabilities of each candidate as the next token, ``(P, C)``.

        One forward per length-sorted batch; the logits at each prompt's last real
        position go through a float32 ``log_softmax`` over the whole vocabulary.
        """
        self._require_lm("score next tokens")
        cand_ids = self.resolve_single_tokens(candidates)
        enc = [p[-self.context:] for p in self.encode_prompts(prompts)]
        if any(not p for p in enc):
            raise ModelError("an empty prompt has no next-token distribution for a tokenizer without BOS")
        out = np.empty((len(enc), len(cand_ids)), dtype=np.float64)
        cand = torch.tensor(cand_ids, device=self.device, dtype=torch.long)
        with self._lock, torch.inference_mode():
            for batch in self._batches([len(p) for p in enc]):
                ids, _, lens = pad_batch([enc[i] for i in batch], self.pad_id, "right", self.device)
                select = torch.zeros_like(ids, dtype=torch.bool)
                select[torch.arange(len(batch), device=self.device), lens - 1] = True

                def reduce(logits: torch.Tensor, sl: slice) -> torch.Tensor:
                    return logits[:, cand] - log_normalizer_(logits)[:, None]

                out[batch] = self._selected.run(ids, select, reduce).double().cpu().numpy()
        return out

    # ------------------------------------------------------------------ embeddings

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence-transformers: the model's pooling, L2-normalized. Causal LM: the
        last layer's hidden state (after the final norm) at the last real token."""
        self._require_open()
        with self._lock, torch.inference_mode():
            if self.st is not None:
                if not texts:
                    return np.zeros((0, self.st.get_sentence_embedding_dimension()), dtype=np.float32)
                emb = self.st.encode(
                    list(texts), batch_size=self.cfg.batch_size, convert_to_numpy=True,
                    normalize_embeddings=True, show_progress_bar=False,
                )
                return np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)
            enc = [p[: self.context] for p in self.encode_prompts(texts)]
            dim = self.model.config.hidden_size
            out = np.zeros((len(enc), dim), dtype=np.float32)
            for batch in self._batches([len(p) for p in enc]):
                ids, _, lens = pad_batch([enc[i] for i in batch], self.pad_id, "right", self.device)
                hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                last = hidden[torch.arange(len(batch), device=self.device), (lens - 1).clamp(min=0)]
                out[batch] = last.float().cpu().numpy()
            return out

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """``params.n`` continuations of each raw prompt, batched, with per-prompt seeds.

        Greedy (``temperature == 0``) decodes each prompt once and repeats it n
        times. A completion ends at an EOS / ``stop_token_ids`` token (kept in
        ``token_ids``, left out of ``text``), at the first stop string (``text``
        cut before it; ``token_ids`` run through the token that completed it),
        or at ``max_tokens`` (``finish_reason="length"``). ``top_logprobs`` are
        the top-k of ``log_softmax`` of the raw logits (temperature 1, before
        top-p), one list per generated token, most likely first.
        """
        self._require_lm("generate")
        greedy = params.temperature <= 0
        per_prompt = 1 if greedy else max(1, params.n)
        enc = [p[-(self.context - 1):] for p in self.encode_prompts(prompts)]
        rows = [(i, j) for i in range(len(enc)) for j in range(per_prompt)]
        found: dict[tuple[int, int], Completion] = {}
        with self._lock, torch.inference_mode():
            lengths = [len(enc[i]) + params.max_tokens for i, _ in rows]
            for batch in self._batches(lengths, decode=True):
                sub = [rows[r] for r in batch]
                comps = decode_batch(
                    self.model, self._tok, [enc[i] for i, _ in sub], [prompts[i] for i, _ in sub],
                    [j for _, j in sub], params, pad_id=self.pad_id, eos_ids=self._eos_ids,
                    context=self.context, device=self.device,
                )
                found.update(zip(sub, comps))
        out = []
        for i, prompt in enumerate(prompts):
            comps = [found[(i, 0 if greedy else j)] for j in range(max(1, params.n))]
            if greedy:  # n identical greedy completions, as separate objects
                comps = [Completion(c.text, list(c.token_ids), c.finish_reason,
                                    None if c.top_logprobs is None else c.top_logprobs.copy())
                         for c in comps]
            out.append(Generation(prompt=prompt, completions=comps))
        return out
