"""Word n-gram hashes of many texts at once, vectorised with pyarrow and numpy.

The one text-to-shingles step of near-duplicate removal (MinHash over word 5-grams) and of
benchmark decontamination (13-gram and 8-gram overlap). Normalization, as datatrove and
NeMo Curator do it: Unicode NFKC, lowercase, punctuation removed, whitespace runs folded;
digits are kept unless asked (math variants differ only in their numbers).

How it stays fast without a Python loop per word: pyarrow lowercases, strips and splits
every text at once; the words are dictionary-encoded, so only the *distinct* words are
hashed in Python (xxh64); an n-gram's hash then combines its word hashes with numpy
(a rolling polynomial over uint64, wrapping), and n-grams never cross text boundaries.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

#: odd multipliers of the rolling n-gram hash (fixed: hashes must be the same in every process)
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class NGrams:
    """The n-gram hashes of a batch of texts: ``hashes[offsets[i]:offsets[i + 1]]`` are text i's."""

    hashes: np.ndarray   # uint64
    offsets: np.ndarray  # int64, len(texts) + 1
    words: pa.ListArray  # the normalized words of each text (for showing a match)
    n: int

    def of(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i]:self.offsets[i + 1]]


def normalized_words(texts: Sequence[str], keep_digits: bool = True) -> pa.ListArray:
    """Each text as a list of normalized words (NFKC, lowercase, no punctuation)."""
    arr = pa.array([unicodedata.normalize("NFKC", t or "") for t in texts], pa.string())
    arr = pc.utf8_lower(arr)
    arr = pc.replace_substring_regex(arr, r"[^\w\s]|_", " ")
    if not keep_digits:
        arr = pc.replace_substring_regex(arr, r"\d", "0")
    return pc.utf8_split_whitespace(arr)


def word_hashes(words: pa.Array) -> np.ndarray:
    """uint64 xxh64 of each word; each distinct word is hashed once."""
    if len(words) == 0:
        return np.zeros(0, np.uint64)
    encoded = pc.dictionary_encode(words).combine_chunks() if isinstance(words, pa.ChunkedArray) \
        else pc.dictionary_encode(words)
    distinct = np.fromiter((xxhash.xxh64_intdigest(w) for w in encoded.dictionary.cast(pa.binary()).to_pylist()),
                           np.uint64, len(encoded.dictionary))
    return distinct[encoded.indices.to_numpy(zero_copy_only=False)]


def ngram_hashes(texts: Sequence[str], n: int, keep_digits: bool = True, short_texts: bool = True) -> NGrams:
    """The hashes of every word ``n``-gram of each text.

    A text shorter than ``n`` words gives one hash of all its words when ``short_texts``
    (so short rows still have a signature), none otherwise; an empty text gives none.
    """
    words = normalized_words(texts, keep_digits)
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    h = word_hashes(words.flatten())
    starts = np.concatenate([[0], np.cumsum(lengths)])
    # rolling hash over each window of n words: sum_j h[i + j] * MIX^(n-1-j), wrapping in uint64
    count = np.where(lengths >= n, lengths - n + 1, np.where((lengths > 0) & short_texts, 1, 0))
    offsets = np.concatenate([[0], np.cumsum(count)])
    out = np.zeros(int(offsets[-1]), np.uint64)
    full = lengths >= n
    if full.any():
        # window start positions (global word index) of the texts with >= n words
        first = np.repeat(starts[:-1][full], count[full])
        within = np.arange(int(count[full].sum())) - np.repeat(np.cumsum(count[full]) - count[full], count[full])
        pos = first + within
        acc = np.zeros(len(pos), np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                acc = acc * _MIX + h[pos + j]
        out[np.repeat(offsets[:-1][full], count[full]) + within] = acc
    short = (~full) & (count == 1)
    if short.any():
        with np.errstate(over="ignore"):
            for i in np.flatnonzero(short):  # few: rows shorter than n words
                acc = np.uint64(lengths[i])
                for x in h[starts[i]:starts[i + 1]]:
                    acc = acc * _MIX + x
                out[offsets[i]] = acc
    return NGrams(hashes=out, offsets=offsets, words=words, n=n)
