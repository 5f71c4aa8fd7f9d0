"""CLEAR's Auto-Filter (arXiv 2403.12776, Sec. 3): keep rows whose confidence C > gamma.

A global stage over the ``clear_confidence`` attribute the ``clear`` stage wrote:
gamma is the median confidence of the rows reaching this stage (the paper's choice,
so about half is removed) or a fixed number. Rows at or below gamma, and rows with
no confidence, are rejected with reason ``clear_low_confidence`` (value = C). No
model runs here, so changing gamma re-runs only this stage. Every row gets the
``clear_gamma`` attribute that decided it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.selectors.nullable import floats

BINS = np.round(np.linspace(0.0, 1.0, 11), 2)


def resolve_gamma(confidence: np.ndarray, gamma: float | str) -> float:
    """The threshold: ``gamma`` itself, or the median of the known confidences."""
    if gamma == "median":
        known = confidence[~np.isnan(confidence)]
        return float(np.median(known)) if known.size else float("nan")
    return float(gamma)


def confidences(rows: pa.Table) -> np.ndarray:
    if "clear_confidence" not in rows.column_names:
        raise ValueError("clear_filter needs the clear_confidence attribute: put the 'clear' stage before it")
    return floats(rows["clear_confidence"])


def histogram(kept: pa.Table, rejected: pa.Table, reasons: tuple[str, ...]) -> list[dict]:
    """Confidence histogram (bins of 0.1) per source: output rows and rows this stage rejected."""
    series: dict[tuple[str, str], list[float]] = {}
    if "clear_confidence" in kept.column_names:
        for src, v in zip(kept["source"].to_pylist(), kept["clear_confidence"].to_pylist()):
            if v is not None:
                series.setdefault((src, "kept"), []).append(v)
    for src, reason, v in zip(rejected["source"].to_pylist(), rejected["reason"].to_pylist(),
                              rejected["value"].to_pylist()):
        if reason in reasons and v is not None:
            series.setdefault((src, "rejected"), []).append(v)
    out = []
    for (src, fate), values in sorted(series.items()):
        counts, _ = np.histogram(np.clip(values, 0, 1), bins=BINS)
        row = {"source": src, "rows": fate, "n": len(values), "median": round(float(np.median(values)), 3)}
        row.update({f"{lo:.1f}-{hi:.1f}": int(c) for lo, hi, c in zip(BINS[:-1], BINS[1:], counts)})
        out.append(row)
    return out


def gamma_of(kept: pa.Table) -> float | None:
    if "clear_gamma" in kept.column_names and kept.num_rows:
        values = [v for v in kept["clear_gamma"].to_pylist() if v is not None]
        return round(values[0], 4) if values else None
    return None


class ClearFilterParams(StageParams):
    gamma: float | Literal["median"] = Field(
        "median", description="keep rows with clear_confidence > gamma; 'median': the corpus median")


class ClearFilterStage(Stage):
    """CLEAR Auto-Filter: reject rows whose BSDetector confidence is not above gamma."""

    name = "clear_filter"
    version = "1"
    kind = "global"
    Params = ClearFilterParams
    requires = ("clear_confidence",)
    reads = ("clear_confidence",)
    provides = ("clear_gamma",)

    def process(self, rows: pa.Table) -> StageOutput:
        conf = confidences(rows)
        gamma = resolve_gamma(conf, self.params.gamma)
        row_ids = rows["row_id"].to_pylist()
        rejected = []
        for rid, c in zip(row_ids, conf):
            if np.isnan(c):
                rejected.append({"row_id": rid, "reason": "clear_low_confidence",
                                 "detail": "not scored (no assistant response)", "value": None})
            elif not c > gamma:
                rejected.append({"row_id": rid, "reason": "clear_low_confidence",
                                 "detail": f"confidence {c:.4f} <= gamma {gamma:.4f}", "value": float(c)})
        attributes = pa.table({"row_id": pa.array(row_ids, pa.string()),
                               "clear_gamma": pa.array([gamma] * len(row_ids), pa.float64())})
        return StageOutput(attributes=attributes, rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict:
        return {"gamma": gamma_of(kept),
                "confidence histogram per source": histogram(kept, rejected, ("clear_low_confidence",))}
