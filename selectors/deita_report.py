"""Small tables of score distributions for the manifest and ``report.md`` (deita stages)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def column_values(table: pa.Table, name: str) -> list[Any]:
    """A column as a Python list, or ``[]`` when the table does not have it."""
    return table[name].to_pylist() if name in table.column_names else []


def finite(values: Iterable[Any]) -> np.ndarray:
    """The non-null, finite numbers among ``values``, as float64."""
    out = np.array([float(v) for v in values if v is not None], dtype=np.float64)
    return out[np.isfinite(out)]


def quantile_rows(series: dict[str, Sequence[Any]], digits: int = 4) -> list[dict[str, Any]]:
    """One row per statistic (n, mean, min, p10, p25, median, p75, p90, max), one column per series."""
    arrays = {name: finite(values) for name, values in series.items()}
    stats: list[tuple[str, Any]] = [
        ("n", lambda a: int(a.size)), ("mean", np.mean), ("min", np.min),
        ("p10", lambda a: np.quantile(a, 0.10)), ("p25", lambda a: np.quantile(a, 0.25)),
        ("median", np.median), ("p75", lambda a: np.quantile(a, 0.75)),
        ("p90", lambda a: np.quantile(a, 0.90)), ("max", np.max),
    ]
    rows = []
    for label, fn in stats:
        row: dict[str, Any] = {"stat": label}
        for name, a in arrays.items():
            if label == "n":
                row[name] = fn(a)
            else:
                row[name] = round(float(fn(a)), digits) if a.size else None
        rows.append(row)
    return rows


def histogram_rows(series: dict[str, Sequence[Any]], edges: Sequence[float]) -> list[dict[str, Any]]:
    """Counts per bin ``[a, b)`` (the last bin closed), one column per series."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = {name: np.histogram(finite(values), bins=edges)[0] for name, values in series.items()}
    rows = []
    for i in range(len(edges) - 1):
        close = "]" if i == len(edges) - 2 else ")"
        row: dict[str, Any] = {"bin": f"[{edges[i]:g}, {edges[i + 1]:g}{close}"}
        row.update({name: int(c[i]) for name, c in counts.items()})
        rows.append(row)
    return rows


def count_codes(values: Iterable[Any]) -> dict[str, int]:
    """How many times each non-null value occurs, most frequent first."""
    return dict(Counter(v for v in values if v is not None).most_common())
