"""The figures of ``report.md``: PNGs written to ``OUT/report/``, linked relatively from the report.

- ``funnel.png``: rows per stage (ingest first): in, created, rejected, replaced, out.
- ``attr-<column>.png``: a histogram of each numeric attribute (``attributes/``), one series per
  ``source``, each series as a share of its source's rows (sources of any size compare). Columns
  that are all null or constant, booleans, lists (embeddings, KD arrays) and strings are not
  plotted; at most :data:`MAX_ATTRIBUTES`.
- ``models-<score>.png``: a per-model score a stage selects on (GRAPE's ``grape_logprob_mean``),
  one series per model (a row's ``candidate``, else its ``source``:
  :func:`thresher.selectors.grape_select.model_label`): every scored candidate (the output's rows
  and the stage's rejections, whose ``value`` is the score), and the rows kept.

Memory: an output can hold millions of rows. Only narrow columns are read (``source``,
``candidate``, one numeric attribute at a time; never ``messages`` or list columns), one part file
at a time, and each figure plots a uniform sample of at most :data:`MAX_VALUES` values (seeded:
re-rendering draws the same sample). ``data/part-X.parquet`` and ``attributes/part-X.parquet``
hold the same rows in the same order (:mod:`thresher.schemas.writers`), which is how a row's
source is found for its attributes.

The folder is replaced as a whole (written beside it, then swapped in), so no figure of an
earlier run is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FOLDER = "report"
MAX_ATTRIBUTES = 12  #: numeric attribute columns plotted, in schema order
MAX_VALUES = 200_000  #: values sampled per figure (all of them below that)
MAX_SERIES = 10  #: series per figure (one color each); the smallest sources or models beyond are drawn as one "other"
#: per-model scores: (attribute column, the stage that selects on it and rejects with the score in ``value``)
MODEL_SCORES = (("grape_logprob_mean", "grape_select"),)


@dataclass
class Figure:
    section: str  #: "funnel", "attributes", or the stage whose summary it belongs to
    title: str
    path: str  #: relative to OUT, e.g. ``report/funnel.png``


@dataclass
class Plots:
    figures: list[Figure] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  #: (section, what was not plotted and why)

    def of(self, section: str) -> list[Figure]:
        return [f for f in self.figures if f.section == section]

    def notes_of(self, section: str) -> list[str]:
        return [text for s, text in self.notes if s == section]


def make_plots(manifest: dict[str, Any], out: Path) -> Plots:
    """Write the report's PNGs to ``out/report/`` (replacing the folder); return their relative paths."""
    out = Path(out)
    staging = out / f".{FOLDER}-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    plots = Plots()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a glyph a source name uses and the font lacks
            _draw(plots, staging, "funnel", "rows per stage", "funnel.png", lambda p: _funnel(manifest, p))
            _guarded(plots, "attributes", "attribute histograms", lambda: _attribute_figures(plots, out, staging))
            for score, stage in MODEL_SCORES:
                _guarded(plots, stage, f"{score} per model",
                         lambda: _model_figure(plots, manifest, out, staging, score, stage))
        target = out / FOLDER
        old = out / f".{FOLDER}-old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plots


def _guarded(plots: Plots, section: str, what: str, make: Callable[[], None]) -> None:
    """Figures that fail are a note in the report, not a failed run (the data is all written by now)."""
    try:
        make()
    except Exception as err:  # noqa: BLE001 - reported in the report itself
        plots.notes.append((section, f"{what}: not drawn ({type(err).__name__}: {err})"))


def _draw(plots: Plots, staging: Path, section: str, title: str, name: str, draw: Callable[[Path], None]) -> None:
    """One figure, written to ``staging/name``; a failure is a note (:func:`_guarded`)."""
    _guarded(plots, section, title, lambda: draw(staging / name))
    if (staging / name).is_file():
        plots.figures.append(Figure(section, title, f"{FOLDER}/{name}"))


def _new_figure(width: float, height: float, left: float = 0.8, bottom: float = 0.55, top: float = 0.35,
                right: float = 0.2, hspace: float = 0.35):
    """A figure on the non-interactive Agg backend (no pyplot, no global state), its margins in inches
    (a fixed layout: a layout engine would cost more than drawing the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        hspace=hspace)
    return fig


# ---- the funnel ----

FUNNEL_BARS = (("in", "#4c72b0"), ("created", "#55a868"), ("rejected", "#c44e52"),
               ("replaced", "#dd8452"), ("out", "#8172b3"))


def funnel_counts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows per step, ingest first (rows read, rejected at ingest, rows ingested), then each stage."""
    c = manifest["counts"]
    ingested = sum(i["records"] for i in manifest.get("inputs", []))
    steps = [{"stage": "ingest", "in": c["input"], "created": 0, "replaced": 0,
              "rejected": c.get("rejected_by_stage", {}).get("ingest", 0), "out": ingested}]
    steps += [{"stage": s["stage"], "in": s["in"], "created": s.get("created", 0), "rejected": s["rejected"],
               "replaced": s.get("replaced", 0), "out": s["out"]} for s in manifest["stages"]]
    return steps


def _funnel(manifest: dict[str, Any], path: Path) -> None:
    steps = funnel_counts(manifest)
    bars = [(k, color) for k, color in FUNNEL_BARS if k in ("in", "out") or any(s[k] for s in steps)]
    fig = _new_figure(8, 1.1 + 0.22 * len(bars) * len(steps) + 0.15 * len(steps),
                      left=0.3 + 0.075 * max(len(s["stage"]) for s in steps), bottom=0.8)
    ax = fig.add_subplot()
    height = 0.8 / len(bars)
    top = max([1] + [s[k] for s in steps for k, _ in bars])
    for j, (key, color) in enumerate(bars):
        ys = [i + (j - (len(bars) - 1) / 2) * height for i in range(len(steps))]
        values = [s[key] for s in steps]
        ax.barh(ys, values, height=height, color=color, label=key)
        for y, v in zip(ys, values):
            ax.text(v + top * 0.01, y, f"{v:,}", va="center", fontsize=7)
    ax.set_yticks(range(len(steps)), [s["stage"] for s in steps])
    ax.invert_yaxis()  # the first step on top
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("rows")
    ax.set_title(f"{manifest.get('name', '')}: rows per stage")
    fig.legend(loc="lower center", ncol=len(bars), fontsize=8, frameon=False)
    fig.savefig(path)


# ---- reading the output, narrowly ----

@dataclass
class _Part:
    """A data part and the attributes part of the same name: the same rows in the same order."""
    data: Path
    attributes: Path
    rows: int
    data_columns: list[str]
    attribute_schema: pa.Schema


def _paired_parts(out: Path) -> list[_Part]:
    """The output's (data, attributes) parts; a pair whose row counts differ is not this layout and is skipped."""
    data = {p.name: p for p in sorted((out / "data").glob("part-*.parquet"))}
    attributes = {p.name: p for p in sorted((out / "attributes").glob("part-*.parquet"))}
    parts = []
    for name in sorted(data.keys() & attributes.keys()):
        data_meta, attribute_meta = pq.read_metadata(data[name]), pq.read_metadata(attributes[name])
        if data_meta.num_rows == attribute_meta.num_rows:
            parts.append(_Part(data[name], attributes[name], data_meta.num_rows,
                               data_meta.schema.to_arrow_schema().names, attribute_meta.schema.to_arrow_schema()))
    return parts


def _read(path: Path, columns: list[str]) -> pa.Table:
    """Only ``columns`` of one Parquet file."""
    with pq.ParquetFile(path) as parquet:
        return parquet.read(columns=columns)


def _column(path: Path, name: str) -> np.ndarray:
    return pc.cast(_read(path, [name]).column(0), pa.float64()).to_numpy()  # nulls as NaN


def numeric_columns(schema: pa.Schema) -> list[str]:
    """The int and float scalar columns of an attributes schema (not booleans, lists, strings)."""
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def _labels(table: pa.Table, by_model: bool) -> pa.Array:
    """Each row's series: its source, or (``by_model``) its model (candidate, else source)."""
    labels = table["source"].combine_chunks()
    if by_model and "candidate" in table.column_names:
        candidate = table["candidate"].combine_chunks()
        labels = pc.if_else(pc.fill_null(pc.not_equal(candidate, ""), False), candidate, labels)
    return labels


class _Labels:
    """Series labels (sources or models) as small integer ids, shared by the figures of one pass."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def ids(self, labels: pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(pc.fill_null(labels, "(none)"))
        lookup = np.array([self.names.setdefault(str(n), len(self.names)) for n in encoded.dictionary.to_pylist()]
                          + [0], dtype=np.int64)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]


class _Sampler:
    """A seeded uniform sample of about :data:`MAX_VALUES` of ``total_rows`` rows, drawn part by part."""

    def __init__(self, total_rows: int, seed: int):
        self.rate = min(1.0, MAX_VALUES / total_rows) if total_rows else 1.0
        self.rng = np.random.default_rng(seed)

    def mask(self, n: int) -> np.ndarray:
        return np.ones(n, dtype=bool) if self.rate >= 1.0 else self.rng.random(n) < self.rate


class _Series:
    """One figure's sampled values per series, and every non-null value counted per series."""

    def __init__(self, labels: _Labels, rate: float):
        self.labels, self.rate = labels, rate
        self.values: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.counts: dict[int, int] = {}

    def add(self, values: np.ndarray, ids: np.ndarray, sampled: np.ndarray) -> None:
        valid = np.isfinite(values)
        for i, n in zip(*np.unique(ids[valid], return_counts=True)):
            self.counts[int(i)] = self.counts.get(int(i), 0) + int(n)
        keep = valid & sampled
        self.values.append(values[keep])
        self.ids.append(ids[keep])

    def grouped(self, noun: str, rank: dict[str, int] | None = None) -> list[tuple[str, int, np.ndarray]]:
        """(label, non-null rows, sampled values) per series, the highest ``rank`` (e.g. a model's wins)
        then the largest first; beyond :data:`MAX_SERIES`, the rest as one "other"."""
        values = np.concatenate(self.values) if self.values else np.zeros(0)
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        names = {i: n for n, i in self.labels.names.items()}
        rank = rank or {}
        order = sorted(self.counts, key=lambda i: (-rank.get(names[i], 0), -self.counts[i], names[i]))
        shown = order if len(order) <= MAX_SERIES else order[:MAX_SERIES - 1]
        series = [(names[i], self.counts[i], values[ids == i]) for i in shown]
        rest = order[len(shown):]
        if rest:
            series.append((f"{len(rest)} other {noun}s", sum(self.counts[i] for i in rest),
                           values[np.isin(ids, rest)]))
        return series


# ---- attributes by source ----

def attribute_samples(out: Path) -> tuple[dict[str, _Series], list[str]]:
    """The numeric attribute columns of the output (at most :data:`MAX_ATTRIBUTES`), each sampled
    per source; and the columns left out."""
    parts = _paired_parts(out)
    columns: list[str] = []
    for part in parts:
        columns += [c for c in numeric_columns(part.attribute_schema) if c not in columns]
    left_out = columns[MAX_ATTRIBUTES:]
    columns = columns[:MAX_ATTRIBUTES]
    if not columns:
        return {}, left_out
    sampler = _Sampler(sum(part.rows for part in parts), seed=0)
    labels = _Labels()
    per = {c: _Series(labels, sampler.rate) for c in columns}
    for part in parts:
        ids = labels.ids(_labels(_read(part.data, ["source"]), by_model=False))
        mask = sampler.mask(len(ids))  # one sample of rows for every column
        for c in columns:
            if c in part.attribute_schema.names:
                per[c].add(_column(part.attributes, c), ids, mask)
    return per, left_out


def _attribute_figures(plots: Plots, out: Path, staging: Path) -> None:
    per, left_out = attribute_samples(out)
    if left_out:
        plots.notes.append(("attributes", f"{len(left_out)} more numeric attributes not plotted: " + ", ".join(left_out)))
    for c, samples in per.items():
        series = samples.grouped("source")
        values = np.concatenate([v for _, _, v in series]) if series else np.zeros(0)
        if not values.size:
            plots.notes.append(("attributes", f"{c}: not plotted (no values)"))
            continue
        if values.min() == values.max():
            plots.notes.append(("attributes", f"{c}: not plotted (constant {values.min():g})"))
            continue
        _draw(plots, staging, "attributes", f"{c} by source", f"attr-{_safe(c)}.png",
              lambda p, c=c, series=series, rate=samples.rate: _histogram(p, c, series, "source", rate))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _bins(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo - 0.5, hi + 0.5])
    if np.all(values == np.round(values)) and hi - lo <= 60:  # integers: one bin per value
        return np.arange(lo - 0.5, hi + 1.5)
    return np.linspace(lo, hi, 41)


def _histogram(path: Path, column: str, series: list[tuple[str, int, np.ndarray]], what: str, rate: float) -> None:
    fig = _new_figure(7, 4)
    sampled = "" if rate >= 1.0 else f", a {100 * rate:.2g}% sample"
    _histogram_on(fig.add_subplot(), column, series, what, f"{column} by {what}{sampled}")
    fig.savefig(path)


def _histogram_on(ax, column: str, series: list[tuple[str, int, np.ndarray]], what: str, title: str,
                  bins: np.ndarray | None = None, colors: dict[str, str] | None = None) -> None:
    """Step histograms on ``ax``, one per series, each normalized to a share of its own rows."""
    if bins is None:
        bins = _bins(np.concatenate([v for _, _, v in series]))
    for i, (label, n, v) in enumerate(series):
        if v.size:
            ax.hist(v, bins=bins, weights=np.full(v.size, 1.0 / v.size), histtype="step", linewidth=1.5,
                    label=f"{label} (n={n:,})", color=(colors or {}).get(label, f"C{i % 10}"))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(column)
    ax.set_ylabel(f"share of the {what}'s rows")
    ax.legend(fontsize=7)


# ---- per-model scores ----

def model_samples(manifest: dict[str, Any], out: Path, score: str, stage: str) -> tuple[_Series | None, _Series | None]:
    """``score`` sampled per model: (every candidate ``stage`` scored, or None when it did not run;
    the output's rows, or None when no output row has the column)."""
    parts = [part for part in _paired_parts(out) if score in part.attribute_schema.names]
    if not parts:
        return None, None
    labels = _Labels()
    n_output = sum(part.rows for part in parts)
    kept_sampler = _Sampler(n_output, seed=1)
    kept = _Series(labels, kept_sampler.rate)
    seen = seen_sampler = None  # every scored candidate: the output's rows + the stage's rejections (score in `value`)
    rejected_parts = sorted((out / "rejected").glob("*.parquet"))
    if stage in manifest.get("summaries", {}) and rejected_parts:
        seen_sampler = _Sampler(n_output + manifest["counts"].get("rejected_by_stage", {}).get(stage, 0), seed=2)
        seen = _Series(labels, seen_sampler.rate)
    for part in parts:
        ids = labels.ids(_labels(_read(part.data, [c for c in ("source", "candidate") if c in part.data_columns]),
                                 by_model=True))
        values = _column(part.attributes, score)
        kept.add(values, ids, kept_sampler.mask(len(ids)))
        if seen is not None:
            seen.add(values, ids, seen_sampler.mask(len(ids)))
    for path in rejected_parts if seen is not None else []:
        names = pq.read_schema(path).names
        if not {"stage", "value", "source"} <= set(names):
            continue
        table = _read(path, [c for c in ("stage", "source", "candidate", "value") if c in names])
        table = table.filter(pc.fill_null(pc.equal(table["stage"], stage), False))
        ids = labels.ids(_labels(table, by_model=True))
        seen.add(pc.cast(table["value"], pa.float64()).to_numpy(zero_copy_only=False), ids, seen_sampler.mask(len(ids)))
    return seen, kept


def _model_figure(plots: Plots, manifest: dict[str, Any], out: Path, staging: Path, score: str, stage: str) -> None:
    seen, kept = model_samples(manifest, out, score, stage)
    if not (kept and kept.counts) and not (seen and seen.counts):
        return
    section = stage if stage in manifest.get("summaries", {}) else "models"

    def draw(path: Path) -> None:
        wins = {label: n for label, n, _ in kept.grouped("model")}  # the models with the most rows kept first
        panels = [(s, s.grouped("model", wins), t) for s, t in ((seen, f"every candidate {stage} scored"),
                                                                (kept, "rows in the output"))
                  if s is not None and s.counts]
        bins = _bins(np.concatenate([v for _, series, _ in panels for _, _, v in series]))  # one scale for both
        colors: dict[str, str] = {}  # one color per model in both
        for _, series, _ in panels:
            for label, _, _ in series:
                colors.setdefault(label, f"C{len(colors) % 10}")
        fig = _new_figure(7, 3.5 * len(panels), hspace=0.35)
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (s, series, title) in zip(axes, panels):
            sampled = "" if s.rate >= 1.0 else f" (a {100 * s.rate:.2g}% sample)"
            _histogram_on(ax, score, series, "model", f"{score}: {title}{sampled}", bins, colors)
        for ax in axes[:-1]:
            ax.set_xlabel("")
        fig.savefig(path)

    _draw(plots, staging, section, f"{score} per model", f"models-{_safe(score)}.png", draw)
