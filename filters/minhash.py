"""MinHash signatures and LSH clusters, vectorised with numpy (near-duplicate removal).

Broder (1997), "On the resemblance and containment of documents": the probability that two
sets have the same minimum under a random hash equals their Jaccard similarity, so the share
of equal entries in two signatures of ``num_perm`` minima estimates it. LSH (Indyk & Motwani
1998; as datatrove and NeMo Curator use it): cut each signature into ``bands`` of ``rows``
entries; rows sharing one whole band are candidates, which happens with probability
``1 - (1 - J^rows)^bands`` (14 x 8: 50% at J = 0.72, 98% at J = 0.8).

The hash family is multiply-shift over 64-bit words (Dietzfelbinger et al. 1997):
``h_i(x) = (a_i * x + b_i) >> 32`` with odd random ``a_i`` from a fixed seed, so every process
computes the same signature, compiled with numba. ``bench/dedup.py`` compares it with
datasketch and rensa.
"""

from __future__ import annotations

import numpy as np

import numba

EMPTY = np.uint32(0xFFFFFFFF)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` uint64 parameters of ``num_perm`` hash functions (``a`` odd)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 63, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
    return a, b


@numba.njit(cache=True, nogil=True)
def _min_hashes(x, offsets, a, b, out):  # pragma: no cover - compiled
    for r in range(len(offsets) - 1):
        for s in range(offsets[r], offsets[r + 1]):
            v = x[s]
            for p in range(a.shape[0]):
                h = np.uint32((a[p] * v + b[p]) >> np.uint64(32))
                if h < out[r, p]:
                    out[r, p] = h


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int = 1) -> np.ndarray:
    """``(len(offsets) - 1, num_perm)`` uint32 MinHash signatures of the shingle sets
    ``hashes[offsets[i]:offsets[i + 1]]``; a row with no shingle gets all ``EMPTY``.

    One compiled loop (numba) over shingles and hash functions, no temporaries: 322k rows/s
    against 14.6k for the same computation in numpy on GSM8K rows (~100 shingles each).
    """
    a, b = permutations(num_perm, seed)
    out = np.full((len(offsets) - 1, num_perm), EMPTY, np.uint32)
    x = np.ascontiguousarray(hashes ^ (hashes >> np.uint64(29)), dtype=np.uint64)
    _min_hashes(x, np.ascontiguousarray(offsets, dtype=np.int64), a, b, out)
    return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: one per band of ``rows`` signature entries."""
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} hashes, the signatures have {sigs.shape[1]}")
    keys = np.zeros((sigs.shape[0], bands), np.uint64)
    mix = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = keys * mix + sigs[:, r::rows][:, :bands].astype(np.uint64) + np.uint64(r)
    return keys


def clusters(sigs: np.ndarray, bands: int, rows: int, valid: np.ndarray | None = None,
             min_similarity: float = 0.0) -> np.ndarray:
    """Each row's cluster: the smallest row index it is linked to through shared bands
    (union-find over LSH candidate pairs, as connected components). A candidate pair whose
    signatures agree on fewer than ``min_similarity`` of their entries (the estimated
    Jaccard) is not linked. Invalid rows (no shingles) are their own cluster."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = sigs.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    valid = np.ones(n, bool) if valid is None else valid
    idx = np.flatnonzero(valid)
    keys = band_keys(sigs[idx], bands, rows)
    src, dst = [], []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        new = np.r_[True, k[1:] != k[:-1]]
        group_first = order[np.maximum.accumulate(np.where(new, np.arange(len(k)), 0))]
        linked = ~new
        src.append(idx[order[linked]])
        dst.append(idx[group_first[linked]])
    src, dst = np.concatenate(src), np.concatenate(dst)
    if min_similarity > 0 and len(src):
        keep = np.concatenate([(sigs[src[a:a + 65536]] == sigs[dst[a:a + 65536]]).mean(axis=1) >= min_similarity
                               for a in range(0, len(src), 65536)])
        src, dst = src[keep], dst[keep]
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]
