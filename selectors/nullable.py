"""Nullable numbers between Arrow and NumPy: null becomes NaN, and NaN becomes null again.

Attribute columns hold null where a row has no number (no score, no similarity);
the NumPy code that ranks and compares rows works with NaN instead. Every stage
crosses that boundary with these three functions:

- :func:`floats` — a column (or list) as float64, null as NaN;
- :func:`float_or_none` — one number back for a Python dict or Arrow array, NaN as None;
- :func:`nullable_floats` — a float array back as an Arrow float64 array, NaN as null.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa


def floats(values: pa.Array | pa.ChunkedArray | Iterable[Any]) -> np.ndarray:
    """``values`` as float64 with NaN for null; a value that is not a number raises ``TypeError``/``ValueError``."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def float_or_none(value: Any) -> float | None:
    """A Python float, or None for null or NaN."""
    return None if value is None or np.isnan(value) else float(value)


def nullable_floats(values: Iterable[Any]) -> pa.Array:
    """An Arrow float64 array with null where ``values`` has NaN (or None)."""
    return pa.array([float_or_none(v) for v in values], pa.float64())
