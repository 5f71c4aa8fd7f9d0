"""deita's Repr Filter (score-first, diversity-aware selection), exact and blocked.

Liu et al., "What Makes Good Data for Alignment?" (ICLR 2024), reference code
hkust-nlp/deita ``src/deita/selection/filter/base.py``: walk the rows by
descending score; accept a row iff its largest cosine *similarity* to the rows
accepted so far is ``<= tau`` (default 0.9; the paper words it as a distance, the
code thresholds similarity: issues #20, #38); stop once ``budget`` rows are
accepted. The first row walked is always accepted.

:func:`sequential_repr_filter` is that rule, one row at a time.
:func:`repr_filter` gives exactly the same result, vectorized in blocks:

1. take the next ``block_size`` rows of the walk;
2. look for a *witness* first: each row meets the accepted rows filed under its
   ``witness_probes`` nearest anchors (of ``witness_buckets``, rows spread along
   the walk); a row that is surely over ``tau`` with one of them is rejected (the
   accepted set only grows, so that is final). Most rejected rows end here, at a
   small fraction of the cost of meeting every accepted row;
3. every other row meets every row accepted before the block, ``chunk_size``
   accepted rows at a time (one float32 product per chunk, the running maximum kept);
4. the block's own similarity matrix, over its surviving rows, decides the rest:
   a survivor with no similarity over ``tau`` to an earlier survivor is accepted;
   the others are settled in walk order against the rows of the block accepted
   before them (only those rows need a loop, over a small boolean matrix);
5. cut at the budget; append the accepted rows.

Memory is ``O(block_size x (chunk_size + block_size) + accepted x dim)`` (the
accepted rows are at most ``budget``), whatever the number of rows. (The
reference's own batched mode, ``batch_size > 1``, is not exact: it also rejects a
row for resembling an earlier row of its batch that was itself rejected.)

**Exactness.** The similarity is defined as the float64 dot product of the
float32, L2-normalized embeddings. Blocks are multiplied in float32; every pair
whose float32 similarity lies within the float32 dot-product error bound
(``gamma_d = d * 2**-24 / (1 - d * 2**-24)`` for unit vectors) of ``tau`` is
recomputed in float64 before it decides anything, so the float32 speed never
changes an accept/reject decision. The witness step only changes which
similarity is *reported* for a rejected row (the largest among the rows it met,
always over ``tau``); ``witness_buckets=0`` reports the overall largest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

ACCEPTED = 1
TOO_SIMILAR = 2
BELOW_BUDGET = 3


@dataclass
class FilterResult:
    """The walk's outcome; every array is indexed by walk position (0 = highest score).

    ``status``: :data:`ACCEPTED`, :data:`TOO_SIMILAR` or :data:`BELOW_BUDGET` (not
    walked: the budget was reached first). ``max_similarity``: the largest
    similarity to a row accepted earlier in the walk (NaN for the first row and
    for rows below the budget). ``nearest``: the walk position of that row (-1).
    """

    order: np.ndarray
    status: np.ndarray
    max_similarity: np.ndarray
    nearest: np.ndarray

    @property
    def accepted(self) -> np.ndarray:
        """Row indices of the accepted rows, in walk order."""
        return self.order[self.status == ACCEPTED]


def float32_margin(dim: int) -> float:
    """An upper bound on ``|fl32(x . y) - x . y|`` for unit vectors of ``dim`` entries."""
    u = 2.0 ** -24
    return 1.001 * dim * u / (1.0 - dim * u) + 1e-12


def _empty_result(order: np.ndarray) -> FilterResult:
    n = len(order)
    return FilterResult(order=order, status=np.full(n, BELOW_BUDGET, np.int8),
                        max_similarity=np.full(n, np.nan), nearest=np.full(n, -1, np.int64))


def sequential_repr_filter(
    embeddings: np.ndarray, order: np.ndarray, tau: float, budget: int | None = None,
    dtype: type = np.float64,
) -> FilterResult:
    """The rule, one row at a time: the plain loop (the baseline :func:`repr_filter` must equal).

    ``dtype=np.float64`` computes the similarity as defined; ``np.float32`` is the
    faster plain loop (its decisions can differ only for similarities within
    float32 rounding of ``tau``).
    """
    order = np.asarray(order, dtype=np.int64)
    result = _empty_result(order)
    cap = len(order) if budget is None else min(budget, len(order))
    if cap == 0:
        return result
    emb = np.asarray(embeddings)
    accepted = np.empty((cap, emb.shape[1]), dtype=dtype)
    positions = np.empty(cap, dtype=np.int64)
    m = 0
    for pos, row in enumerate(order):
        if m == cap:
            break
        x = emb[row].astype(dtype)
        if m:
            sims = accepted[:m] @ x
            j = int(np.argmax(sims))
            result.max_similarity[pos], result.nearest[pos] = float(sims[j]), positions[j]
            if sims[j] > tau:
                result.status[pos] = TOO_SIMILAR
                continue
        result.status[pos] = ACCEPTED
        accepted[m], positions[m] = x, pos
        m += 1
    return result


@contextmanager
def _torch_settings(threads: int | None) -> Iterator[None]:
    """No TF32 in CUDA matmuls (its rounding would break the error bound); ``threads`` CPU threads."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), torch.get_num_threads())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
        torch.set_num_threads(old[2])


class _Walk:
    """The state of a blocked walk: the accepted rows so far, on ``device``."""

    def __init__(self, emb: np.ndarray, tau: float, cap: int, device: torch.device, chunk_size: int) -> None:
        self.emb, self.tau, self.cap = emb, tau, cap
        self.device, self.chunk = device, chunk_size
        self.margin = float32_margin(emb.shape[1])
        self.buf = torch.empty((cap, emb.shape[1]), dtype=torch.float32, device=device)
        self.buf_rows = np.empty(cap, dtype=np.int64)  # row index of each accepted row
        self.buf_pos = np.empty(cap, dtype=np.int64)  # walk position of each accepted row
        self.m = 0

    def decide(self, best: np.ndarray, rows: np.ndarray, partners: np.ndarray) -> np.ndarray:
        """Whether each row has a similarity over tau, exactly, given its float32 maximum ``best``.

        ``best <= tau - margin``: no pair can be over; ``best > tau + margin``: its
        pair is over. In between, the row's similarities to ``partners`` (row
        indices) are recomputed in float64.
        """
        over = best > self.tau + self.margin
        for i in np.flatnonzero((best > self.tau - self.margin) & ~over):
            exact = self.emb[partners].astype(np.float64) @ self.emb[rows[i]].astype(np.float64)
            over[i] = bool((exact > self.tau).any())
        return over

    def against_accepted(self, x: torch.Tensor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rejected by a row accepted before the block, best float32 similarity, its buffer index)."""
        b = x.shape[0]
        best = torch.full((b,), -np.inf, dtype=torch.float32, device=self.device)
        arg = torch.full((b,), -1, dtype=torch.int64, device=self.device)
        for start in range(0, self.m, self.chunk):
            stop = min(start + self.chunk, self.m)
            value, where = (x @ self.buf[start:stop].T).max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            arg = torch.where(better, where + start, arg)
        best_np = best.cpu().numpy().astype(np.float64)
        rejected = self.decide(best_np, rows, self.buf_rows[:self.m])
        return rejected, best_np, arg.cpu().numpy()

    def inner_over(self, x: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        """``over[i, j]``: similarity of block rows i and j over tau, exactly (float64 where unsure)."""
        sims = (x @ x.T).cpu().numpy()
        over = sims > self.tau + self.margin
        ia, ib = np.nonzero((sims > self.tau - self.margin) & ~over)
        if len(ia):
            exact = np.einsum("ij,ij->i", self.emb[rows[ia]].astype(np.float64), self.emb[rows[ib]].astype(np.float64))
            over[ia, ib] = exact > self.tau
        return over

    def append(self, x: torch.Tensor, rows: np.ndarray, positions: np.ndarray) -> None:
        k = len(rows)
        self.buf[self.m:self.m + k] = x
        self.buf_rows[self.m:self.m + k] = rows
        self.buf_pos[self.m:self.m + k] = positions
        self.m += k


class _Buckets:
    """Accepted rows grouped by their most similar anchor, to find a witness cheaply.

    A row that is too similar to an accepted row usually shares that row's
    nearest anchor: comparing it first with the accepted rows of its ``probes``
    nearest anchors' buckets finds such a witness at a fraction of the cost of
    comparing it with every accepted row. A witness only ever *rejects* (and only
    when float32 is sure: similarity > tau + margin); every other row still
    meets every accepted row, so the decisions stay exact.
    """

    def __init__(self, anchors: torch.Tensor, probes: int) -> None:
        self.anchors = anchors
        self.probes = max(1, min(probes, anchors.shape[0]))
        self.vecs: list[torch.Tensor | None] = [None] * anchors.shape[0]
        self.index: list[np.ndarray] = [np.empty(0, np.int64)] * anchors.shape[0]

    def add(self, x: torch.Tensor, buf_index: np.ndarray) -> None:
        if not len(buf_index):
            return
        home = (x @ self.anchors.T).argmax(dim=1).cpu().numpy()
        for c in np.unique(home):
            sel = np.flatnonzero(home == c)
            v = x[torch.from_numpy(sel).to(x.device)]
            self.vecs[c] = v if self.vecs[c] is None else torch.cat([self.vecs[c], v])
            self.index[c] = np.concatenate([self.index[c], buf_index[sel]])

    def search(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the largest float32 similarity in its probed buckets, and that row's buffer index."""
        b = x.shape[0]
        best = np.full(b, -np.inf)
        arg = np.full(b, -1, dtype=np.int64)
        probed = (x @ self.anchors.T).topk(self.probes, dim=1).indices.cpu().numpy()
        for c in np.unique(probed):
            if self.vecs[c] is None:
                continue
            sel = np.flatnonzero((probed == c).any(axis=1))
            value, where = (x[torch.from_numpy(sel).to(x.device)] @ self.vecs[c].T).max(dim=1)
            value = value.cpu().numpy().astype(np.float64)
            better = value > best[sel]
            best[sel[better]] = value[better]
            arg[sel[better]] = self.index[c][where.cpu().numpy()[better]]
        return best, arg


def _settle_block(prior_rejected: np.ndarray, over: np.ndarray) -> np.ndarray:
    """Which rows of a block are accepted, given the rule's dependencies inside it.

    ``over[i, j]``: row i's similarity to row j is over tau (only j < i is read).
    A surviving row with no conflict with an earlier surviving row is accepted
    outright; each conflicted row, in walk order, is accepted iff it conflicts
    with no row of the block already accepted (all of which come before it).
    """
    b = len(prior_rejected)
    alive = ~prior_rejected
    earlier = np.tril(over, k=-1) & alive[None, :] & alive[:, None]
    conflicted = earlier.any(axis=1)
    accepted = alive & ~conflicted
    for i in np.flatnonzero(conflicted):
        accepted[i] = not (earlier[i, :i] & accepted[:i]).any()
    return accepted[:b]


def repr_filter(
    embeddings: np.ndarray,
    order: np.ndarray,
    tau: float = 0.9,
    budget: int | None = None,
    block_size: int = 2048,
    chunk_size: int = 8192,
    device: str = "cpu",
    witness_buckets: int = 64,
    witness_probes: int = 4,
    threads: int | None = 1,
) -> FilterResult:
    """deita's Repr Filter over ``embeddings[order]``, exactly the sequential rule, in blocks.

    ``embeddings``: (n, d) float32, L2-normalized rows. ``order``: the row indices
    to walk, highest score first (rows not in ``order`` are not considered).

    ``witness_buckets > 0`` first compares each row with the accepted rows of its
    nearest anchors' buckets (:class:`_Buckets`; anchors: rows evenly spaced along
    the walk): a row found too similar there is rejected without meeting every
    accepted row. Decisions are the same either way; only the similarity reported
    for such a row is the largest among the rows it met (always > tau; in practice
    almost always the overall largest). ``witness_buckets = 0`` reports the exact
    largest similarity for every row, at the full cost.

    ``threads``: torch CPU threads for the products (restored afterwards; None
    leaves torch's setting). One thread is the default: on a shared machine,
    threads that wait for a busy core make small products many times slower,
    and one thread already reaches most of a core's float32 throughput.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    order = np.asarray(order, dtype=np.int64)
    result = _empty_result(order)
    n = len(order)
    cap = n if budget is None else min(budget, n)
    if cap == 0 or n == 0:
        return result
    dev = torch.device(device)
    with torch.inference_mode(), _torch_settings(threads):
        walk = _Walk(emb, tau, cap, dev, max(1, chunk_size))
        buckets = None
        if witness_buckets > 0:
            anchors = order[np.linspace(0, n - 1, min(witness_buckets, n)).astype(np.int64)]
            buckets = _Buckets(torch.from_numpy(emb[np.unique(anchors)]).to(dev), witness_probes)
        for start in range(0, n, max(1, block_size)):
            if walk.m >= cap:
                break
            stop = min(start + block_size, n)
            rows = order[start:stop]
            positions = np.arange(start, stop, dtype=np.int64)
            x = torch.from_numpy(emb[rows]).to(dev)
            prior_rejected = np.zeros(len(rows), dtype=bool)
            best, arg = np.full(len(rows), -np.inf), np.full(len(rows), -1, dtype=np.int64)
            pending = np.arange(len(rows))
            if buckets is not None and walk.m:
                w_best, w_arg = buckets.search(x)
                sure = w_best > tau + walk.margin
                prior_rejected[sure], best[sure], arg[sure] = True, w_best[sure], w_arg[sure]
                pending = np.flatnonzero(~sure)
            if len(pending) and walk.m:
                sub = x if len(pending) == len(rows) else x[torch.from_numpy(pending).to(dev)]
                prior_rejected[pending], best[pending], arg[pending] = walk.against_accepted(sub, rows[pending])
            alive = np.flatnonzero(~prior_rejected)
            accepted = np.zeros(len(rows), dtype=bool)
            if len(alive):
                sub = torch.from_numpy(alive).to(dev)
                accepted[alive] = _settle_block(np.zeros(len(alive), bool), walk.inner_over(x[sub], rows[alive]))
            # the budget: nothing after the cap-th acceptance is walked
            room = cap - walk.m
            hits = np.flatnonzero(accepted)
            end = len(rows) if len(hits) < room else int(hits[room - 1]) + 1
            accepted[end:] = False
            keep = np.flatnonzero(accepted)
            x_keep = x[torch.from_numpy(keep).to(dev)]
            # the largest similarity to an earlier accepted row, before or inside the block
            nearest = np.where(np.isfinite(best), walk.buf_pos[np.maximum(arg, 0)], -1)
            if len(keep):
                to_keep = (x @ x_keep.T).cpu().numpy().astype(np.float64)
                to_keep[keep[None, :] >= np.arange(len(rows))[:, None]] = -np.inf
                in_best, in_arg = to_keep.max(axis=1), to_keep.argmax(axis=1)
                nearest = np.where(in_best > best, positions[keep[in_arg]], nearest)
            walked = slice(start, start + end)
            result.status[walked] = np.where(accepted[:end], ACCEPTED, TOO_SIMILAR)
            result.nearest[walked] = nearest[:end]
            has = nearest[:end] >= 0
            if has.any():
                result.max_similarity[start:start + end][has] = np.einsum(
                    "ij,ij->i", emb[rows[:end][has]].astype(np.float64),
                    emb[order[nearest[:end][has]]].astype(np.float64))
            if buckets is not None:
                buckets.add(x_keep, np.arange(walk.m, walk.m + len(keep)))
            walk.append(x_keep, rows[keep], positions[keep])
    return result
