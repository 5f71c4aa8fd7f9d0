"""Reading KD labels back for training: the columns, the tokenizer check, batches and the loss.

The KD stages write the teacher's top-k log-probs per response token into
``OUT/attributes/part-*.parquet`` (the columns of :mod:`thresher.schemas.kd`). This
module turns them into training inputs for a student that shares the teacher's tokenizer::

    check_student_tokenizer(out, student_tokenizer)   # KDTokenizerMismatch when the ids differ
    table = load_kd_rows(out)                         # the labelled rows' KD columns (Arrow)
    for batch in KDBatches(table, batch_size=8, shuffle=True):
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = topk_kd_loss(logits, batch, kind="forward")

Everything stays in Arrow/numpy arrays until a batch is padded into torch tensors: the
top-k columns are read through their flat child arrays and offsets, never as Python lists
of per-token pairs (100k rows x 512 tokens x k=20 would be a billion objects).

Alignment: response token t (``kd_token_ids[t]``) sits at sequence position
``prompt_len + t``; it is predicted by the logits at position ``prompt_len - 1 + t``, so
that is where the top-k entry t and the label go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thresher.generators.tokenizer_fingerprint import compare_fingerprints, tokenizer_fingerprint
from thresher.schemas.kd import KD_COLUMNS, read_kd_metadata, teachers_of

#: the columns :func:`load_kd_rows` returns (``kd_teacher`` and ``kd_truncated`` ride along for reporting)
READ_COLUMNS = ("row_id", *KD_COLUMNS)


class KDTokenizerMismatch(ValueError):
    """The student's tokenizer does not map text to the teacher's ids: logit-level KD is meaningless."""


def _attribute_files(out_dir: Path | str) -> list[Path]:
    return sorted((Path(out_dir) / "attributes").glob("part-*.parquet"))


def _dedup(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for entry in entries:
        seen.setdefault(json.dumps(entry, sort_keys=True), entry)
    return [seen[key] for key in sorted(seen)]


def read_kd_metadata_of(out_dir: Path | str) -> list[dict[str, Any]]:
    """The ``thresher.kd`` schema metadata of ``OUT/attributes/part-*.parquet``: every teacher setting, once.

    A file whose schema carries no KD metadata but has a ``kd_teacher`` column contributes
    that column's distinct values (the same dicts, one per run).
    """
    entries: list[dict[str, Any]] = []
    for path in _attribute_files(out_dir):
        schema = pq.read_schema(path)
        found = read_kd_metadata(schema)
        if not found and "kd_teacher" in schema.names:
            found = teachers_of(pq.read_table(path, columns=["kd_teacher"], use_threads=False))
        entries.extend(found)
    return _dedup(entries)


def check_student_tokenizer(out_dir: Path | str, student_tokenizer: Any) -> None:
    """Raise :class:`KDTokenizerMismatch` unless the student's tokenizer fingerprint equals every teacher's.

    Also raises (a :class:`ValueError`) when the output holds no KD labels at all.
    """
    teachers = read_kd_metadata_of(out_dir)
    if not teachers:
        raise ValueError(f"{out_dir}: no KD labels (no thresher.kd metadata or kd_teacher values in "
                         f"{Path(out_dir) / 'attributes'}); run a kd_logprobs or kd_generate stage first")
    student = tokenizer_fingerprint(student_tokenizer)
    for meta in teachers:
        differs = compare_fingerprints(meta["tokenizer"], student)
        if differs:
            raise KDTokenizerMismatch(
                f"{out_dir}: the KD labels were written by teacher {meta.get('teacher')!r} with a tokenizer "
                f"that differs from the student's in: {'; '.join(differs)}. Logit-level KD compares the two "
                f"distributions token id by token id, so it needs a shared tokenizer: pick a student of the "
                f"teacher's family (same vocabulary, merges and special tokens), or relabel with such a teacher.")


def load_kd_rows(out_dir: Path | str) -> pa.Table:
    """``row_id`` + the KD columns of the rows that have KD labels, from every attributes file.

    Raises ValueError when there are none, or when files hold different top-k widths.
    """
    tables = []
    for path in _attribute_files(out_dir):
        names = pq.read_schema(path).names
        if not all(c in names for c in READ_COLUMNS):
            continue
        table = pq.read_table(path, columns=list(READ_COLUMNS), use_threads=False)
        labelled = pc.and_(pc.is_valid(table["kd_token_ids"]), pc.is_valid(table["kd_topk_ids"]))
        tables.append(table.filter(labelled))
    widths = {t.schema.field("kd_topk_ids").type.value_type.list_size for t in tables}
    if len(widths) > 1:
        raise ValueError(f"{out_dir}: the attributes files hold top-k of different widths {sorted(widths)}")
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise ValueError(f"{out_dir}: no rows with KD labels in {Path(out_dir) / 'attributes'}")
    return pa.concat_tables(tables).combine_chunks()


# ---- batches ----

@dataclass
class KDBatch:
    """Padded tensors for one batch (B rows, L positions, top-``k``); see the module docstring for alignment.

    ``input_ids``/``attention_mask`` (B, L) long, right-padded with 0; ``target_mask`` (B, L) bool:
    the positions whose next token is a response token; ``topk_ids`` (B, L, k) long and
    ``topk_logprobs`` (B, L, k) float32: the teacher's top-k at those positions (elsewhere, and
    for padding entries: id 0, log-prob -inf); ``labels`` (B, L) long: the next token at target
    positions, -100 elsewhere. ``row_ids``: the rows, in batch order.
    """

    input_ids: Any
    attention_mask: Any
    target_mask: Any
    topk_ids: Any
    topk_logprobs: Any
    labels: Any
    row_ids: list[str]

    def to(self, device: Any) -> "KDBatch":
        return KDBatch(*(getattr(self, f).to(device) for f in
                         ("input_ids", "attention_mask", "target_mask", "topk_ids", "topk_logprobs", "labels")),
                       row_ids=self.row_ids)


def _flat_list(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, respecting slices (no Python objects per element)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return array.flatten(), offsets


class KDBatches:
    """Iterate a :func:`load_kd_rows` table as :class:`KDBatch` es; each ``iter()`` is one epoch.

    ``shuffle``: a new permutation per epoch (seeded by ``seed`` and the epoch number).
    ``max_length``: cut each sequence to that many positions from the right (response tokens
    beyond it are dropped); rows left with no response token to learn (the prompt alone fills
    ``max_length``, or an empty response) are skipped and counted in :attr:`skipped`.
    """

    def __init__(self, table: pa.Table, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 max_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.max_length = batch_size, shuffle, seed, max_length
        self.epoch = 0
        prompt, self._prompt_off = _flat_list(table["kd_prompt_token_ids"])
        response, self._resp_off = _flat_list(table["kd_token_ids"])
        self._prompt = prompt.to_numpy(zero_copy_only=False).astype(np.int64)
        self._response = response.to_numpy(zero_copy_only=False).astype(np.int64)
        ids_rows, ids_off = _flat_list(table["kd_topk_ids"])        # fixed_size_list<int32>[k], T entries
        lps_rows, lps_off = _flat_list(table["kd_topk_logprobs"])
        if not (np.array_equal(ids_off, self._resp_off) and np.array_equal(lps_off, self._resp_off)):
            raise ValueError("kd_topk_ids / kd_topk_logprobs do not have one entry per kd_token_ids token")
        self.k = ids_rows.type.list_size
        self._topk_ids = ids_rows.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.k)
        self._topk_lps = lps_rows.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, self.k)
        self._row_ids = table["row_id"].to_pylist() if "row_id" in table.column_names else [""] * table.num_rows
        plen = np.diff(self._prompt_off)
        tlen = np.diff(self._resp_off)
        if max_length is not None:
            tlen = np.clip(np.minimum(tlen, max_length - plen), 0, None)
        self._plen, self._tlen = plen, tlen
        keep = (tlen > 0) & (plen > 0)
        self.rows = np.flatnonzero(keep)
        self.skipped = int((~keep).sum())

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[KDBatch]:
        order = self.rows
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            yield self._batch(order[start:start + self.batch_size])

    def _batch(self, rows: np.ndarray) -> KDBatch:
        import torch

        plen, tlen = self._plen[rows], self._tlen[rows]
        B, L, k = len(rows), int((plen + tlen).max()), self.k
        input_ids = np.zeros((B, L), np.int64)
        attention = np.zeros((B, L), np.int64)
        target = np.zeros((B, L), bool)
        labels = np.full((B, L), -100, np.int64)
        topk_ids = np.zeros((B, L, k), np.int64)
        topk_lps = np.full((B, L, k), -np.inf, np.float32)
        for b, (r, p, t) in enumerate(zip(rows, plen, tlen)):
            p0, r0 = self._prompt_off[r], self._resp_off[r]
            response = self._response[r0:r0 + t]
            input_ids[b, :p] = self._prompt[p0:p0 + p]
            input_ids[b, p:p + t] = response
            attention[b, :p + t] = 1
            target[b, p - 1:p - 1 + t] = True
            labels[b, p - 1:p - 1 + t] = response
            topk_ids[b, p - 1:p - 1 + t] = self._topk_ids[r0:r0 + t]
            topk_lps[b, p - 1:p - 1 + t] = self._topk_lps[r0:r0 + t]
        pad = topk_ids < 0
        topk_ids[pad] = 0
        topk_lps[pad] = -np.inf
        return KDBatch(torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(target),
                       torch.from_numpy(topk_ids), torch.from_numpy(topk_lps), torch.from_numpy(labels),
                       row_ids=[self._row_ids[r] for r in rows])


def kd_batches(table: pa.Table, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               max_length: int | None = None) -> Iterator[KDBatch]:
    """One epoch of :class:`KDBatches` over ``table``."""
    return iter(KDBatches(table, batch_size, shuffle=shuffle, seed=seed, max_length=max_length))


# ---- the loss ----

#: the teacher's tail bucket is at least this (then renormalised): finite logs for every kind
TAIL_FLOOR = 1e-6


def topk_kd_divergence(student_logits: Any, topk_ids: Any, topk_logprobs: Any, kind: str = "forward",
                       temperature: float = 1.0) -> Any:
    """Per-position divergence between the teacher's top-k (+ tail) and the student, shape ``(N,)``.

    ``student_logits`` (N, V); ``topk_ids`` (N, k); ``topk_logprobs`` (N, k), -inf for padding
    entries (whose ids are ignored). Both distributions are coarsened to k+1 buckets:

    * teacher: p_i = exp(logprob_i) at its k ids and a tail p_tail = 1 - sum_i p_i, floored at
      :data:`TAIL_FLOOR` (float16 log-probs can sum past 1) and renormalised with the k entries;
    * student: q_i = softmax(logits / temperature) at the teacher's ids, q_tail = 1 - sum_i q_i,
      computed as the log-sum-exp of the student's log-probs outside those ids (exact: no
      cancellation in 1 - sum when the top-k holds nearly all the mass).

    Padding entries are out of both supports; so is the tail when the k ids cover the whole
    vocabulary. See :func:`topk_kd_loss` for ``kind`` and the references.
    """
    import torch
    import torch.nn.functional as F

    logq_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    floor = torch.finfo(torch.float32).min / 4  # "log 0", finite: keeps logsumexp and gradients NaN-free
    t_lp = topk_logprobs.float()
    valid = torch.isfinite(t_lp)
    ids = topk_ids.long().clamp(min=0)
    # padding entries point at the row's first real id and mask it again (every write to one id
    # writes the same value, so the scatter is deterministic); a row with no real entry points them
    # all at id 0 and writes that id's own value back
    first = ids.gather(-1, valid.float().argmax(-1, keepdim=True))
    fill_ids = torch.where(valid, ids, first)
    logq_k = logq_all.gather(-1, fill_ids)
    any_valid = valid.any(-1, keepdim=True).expand_as(valid)
    outside = logq_all.scatter(-1, fill_ids, torch.where(any_valid, torch.full_like(logq_k, floor), logq_k))
    logq_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
    has_tail = logq_tail > floor / 2                                      # False: the ids cover the vocab

    p_k = torch.where(valid, t_lp.exp(), torch.zeros_like(t_lp))
    p_tail = torch.where(has_tail, (1.0 - p_k.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR),
                         torch.zeros_like(logq_tail))
    log_total = (p_k.sum(-1, keepdim=True) + p_tail).log()
    support = torch.cat([valid, has_tail], dim=-1)                        # (N, k+1)
    logp = torch.cat([t_lp, p_tail.clamp(min=TAIL_FLOOR).log()], dim=-1) - log_total
    logq = torch.cat([logq_k, logq_tail], dim=-1)
    logp = torch.where(support, logp, torch.zeros_like(logp))
    logq = torch.where(support, logq, torch.zeros_like(logq))
    p = torch.where(support, logp.exp(), torch.zeros_like(logp))
    q = torch.where(support, logq.exp(), torch.zeros_like(logq))

    def kl(a: Any, loga: Any, logb: Any) -> Any:  # sum over the support of a_i (log a_i - log b_i)
        return torch.where(support, a * (loga - logb), torch.zeros_like(a)).sum(-1)

    if kind == "forward":
        return kl(p, logp, logq)
    if kind == "reverse":
        return kl(q, logq, logp)
    if kind == "jsd":
        beta = 0.5
        logm = (beta * p + (1 - beta) * q).clamp(min=torch.finfo(torch.float32).tiny).log()
        return beta * kl(p, logp, logm) + (1 - beta) * kl(q, logq, logm)
    raise ValueError(f"kind must be 'forward', 'reverse' or 'jsd', got {kind!r}")


def topk_kd_loss(student_logits: Any, batch: KDBatch, kind: str = "forward", temperature: float = 1.0) -> Any:
    """The mean top-k KD divergence over the batch's target positions (a scalar tensor).

    ``student_logits`` (B, L, V) from the student on ``batch.input_ids``; only the target
    positions are normalised (float32), so the full (B, L, V) log-softmax is never built.

    ``kind``:
      * ``"forward"`` KL(p || q), the classic distillation objective (Hinton, Vinyals & Dean
        2015, "Distilling the Knowledge in a Neural Network"), here on k+1 buckets;
      * ``"reverse"`` KL(q || p), mode-seeking;
      * ``"jsd"`` the generalized Jensen-Shannon divergence with beta = 0.5,
        0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2, as in GKD (Agarwal et al. 2024,
        "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
        TRL's ``GKDTrainer`` / ``generalized_jsd_loss``).

    The teacher's mass outside its top-k goes into one tail bucket, log(1 - sum_i p_i), as TRL's
    server-side distillation (a vLLM teacher returning top-k log-probs) does (verl's "tail-aware
    top-k KL", verl-project/verl#7856, argues the same), so the value is a true divergence between
    two distributions (>= 0, 0 only when they agree on every bucket) rather than a truncated sum.
    ``temperature`` divides the student's logits only (the stored teacher log-probs are at
    temperature 1) and there is no T^2 factor: multiply by ``temperature ** 2`` for Hinton's
    scaling. A batch without target positions gives 0.
    """
    mask = batch.target_mask.to(student_logits.device)
    values = topk_kd_divergence(student_logits[mask], batch.topk_ids.to(student_logits.device)[mask],
                                batch.topk_logprobs.to(student_logits.device)[mask], kind, temperature)
    return values.sum() / max(int(mask.sum()), 1)
