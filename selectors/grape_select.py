"""GRAPE selection: keep the best-fitting candidate of each instruction (arXiv 2502.04194).

The global stage ``grape_select`` reads the ``grape_logprob_mean`` attribute that
the ``grape`` stage wrote (:mod:`thresher.selectors.grape`) and, per group
(``group_id``: the rows answering one instruction, or one conversation history),
keeps the argmax — GRAPE's "the response that fits the base model best". No
model runs here, so changing these parameters re-runs nothing else.

In order:

1. Optional correctness pre-filter (the paper filters incorrect candidates before
   selecting, when correctness is known): ``correct_column`` names a column —
   an attribute an earlier stage wrote, or a field of the input rows (kept in
   ``meta``). A row whose value is false (``false``/``0``/``"no"``/``"incorrect"``...)
   is rejected with reason ``grape_incorrect``; a missing (null) value counts as
   not known to be wrong and is kept. An instruction whose candidates are all
   incorrect keeps none.
2. Argmax per group (:mod:`thresher.selectors.group_argmax`): the highest
   ``grape_logprob_mean``; ties go to the first row in corpus order (input files
   sorted by path, rows in file order). The others are rejected with reason
   ``grape_not_best``, their score in ``value`` and the winning row in
   ``kept_row_id``. A row with no score (no response token fitted in
   ``max_tokens``) never beats a scored one; a group in which no row has a score
   keeps none (reason ``grape_unscored``).

:meth:`GrapeSelectStage.summarize` reports wins and score distributions per model:
a row's model is its ``candidate`` name, else its ``source`` (:func:`model_label`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.selectors.group_argmax import group_argmax
from thresher.selectors.nullable import float_or_none, floats

SCORE = "grape_logprob_mean"
REASON_NOT_BEST = "grape_not_best"
REASON_INCORRECT = "grape_incorrect"
REASON_UNSCORED = "grape_unscored"
TRUE_WORDS = {"true", "yes", "y", "1", "correct", "pass", "passed", "right"}
FALSE_WORDS = {"false", "no", "n", "0", "incorrect", "fail", "failed", "wrong"}


class GrapeSelectParams(StageParams):
    correct_column: str | None = Field(
        None, description="column (attribute or input field) saying whether a candidate is correct; "
                          "false rows are rejected before the argmax")


def model_label(candidate: str | None, source: str) -> str:
    """Who wrote a row: its candidate (model) name when known, else its source file."""
    return candidate if candidate else source


def model_labels(rows: pa.Table) -> list[str]:
    """:func:`model_label` of every row, from its canonical ``candidate`` and ``source`` columns."""
    candidates = rows["candidate"].to_pylist() if "candidate" in rows.column_names else [None] * rows.num_rows
    return [model_label(c, s) for c, s in zip(candidates, rows["source"].to_pylist())]


def parse_correct(value: Any, column: str, row_id: str) -> bool | None:
    """A correctness value as True/False, None when unknown; anything else is an error."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(
        f"grape_select: {column} = {value!r} in row {row_id} is not a correctness value "
        f"(use true/false, 1/0, or one of {sorted(TRUE_WORDS | FALSE_WORDS)})"
    )


def correctness(rows: pa.Table, column: str) -> list[Any]:
    """The raw correctness values: an attribute column, else a field of each row's ``meta``."""
    if column in rows.column_names:
        return rows[column].to_pylist()
    metas = [json.loads(m) if m else {} for m in rows["meta"].to_pylist()] if "meta" in rows.column_names else []
    if not any(column in m for m in metas):
        raise ValueError(
            f"grape_select: correct_column '{column}' is neither an attribute column "
            f"({', '.join(rows.column_names)}) nor a field of any input row"
        )
    return [m.get(column) for m in metas]


def _fmt(x: float) -> str:
    return "not scored" if np.isnan(x) else f"{x:.6f}"


class GrapeSelectStage(Stage):
    """The argmax of ``grape_logprob_mean`` per instruction (see the module docstring)."""

    name = "grape_select"
    version = "2"  # 2: grape_not_best names the winning row in kept_row_id
    kind = "global"
    Params = GrapeSelectParams
    requires = (SCORE,)

    @property
    def reads(self) -> tuple[str, ...]:
        """Groups, model labels and scores; the correctness column (or ``meta``, where it may be a field)."""
        p: GrapeSelectParams = self.params
        return ("group_id", "candidate", "source", SCORE, *((p.correct_column, "meta") if p.correct_column else ()))

    def process(self, rows: pa.Table) -> StageOutput:
        p: GrapeSelectParams = self.params
        row_ids = rows["row_id"].to_pylist()
        groups = rows["group_id"].to_pylist()
        labels = model_labels(rows)
        scores = floats(rows[SCORE])
        rejected: list[dict[str, Any]] = []
        alive = np.ones(len(row_ids), dtype=bool)

        if p.correct_column:
            raw = correctness(rows, p.correct_column)
            for i, v in enumerate(raw):
                if parse_correct(v, p.correct_column, row_ids[i]) is False:
                    alive[i] = False
                    rejected.append({
                        "row_id": row_ids[i], "reason": REASON_INCORRECT, "value": float_or_none(scores[i]),
                        "detail": f"{labels[i]!r}: {p.correct_column} = {v!r} (correctness pre-filter)"})

        argmax = group_argmax(scores, groups, np.flatnonzero(alive))  # table order is corpus order
        for group, members in argmax.members.items():
            best = argmax.best[group]
            if best is None:
                for i in members:
                    rejected.append({"row_id": row_ids[i], "reason": REASON_UNSCORED, "value": None, "detail": (
                        f"{labels[i]!r}: no candidate of this instruction has a score "
                        "(no response token fitted in the grape stage's max_tokens)")})
                continue
            for i in members:
                if i == best:
                    continue
                relation = "ties with" if scores[i] == scores[best] else "<"
                tie = " (a tie: the first in corpus order wins)" if relation == "ties with" else ""
                rejected.append({
                    "row_id": row_ids[i], "reason": REASON_NOT_BEST, "value": float_or_none(scores[i]),
                    "kept_row_id": row_ids[best], "detail": (
                        f"{labels[i]!r}: {SCORE} {_fmt(scores[i])} {relation} {_fmt(scores[best])} "
                        f"of the winning row {row_ids[best]} ({labels[best]!r}){tie}")})
        return StageOutput(rejected=rejected)

    def summarize(self, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
        """Wins per model (candidate) and each model's distribution of ``grape_logprob_mean``.

        Wins are counted over the final output rows; a model's distribution covers
        every scored row of it this stage saw (kept, and rejected with its score).
        """
        if SCORE not in kept.column_names:
            return {}
        per: dict[tuple[str, str], dict[str, Any]] = {}

        def entry(label: str, source: str) -> dict[str, Any]:
            return per.setdefault((label, source), {"rows": 0, "wins": 0, "scores": []})

        for table, score_column, won in ((kept, SCORE, True), (rejected, "value", False)):
            for label, source, score in zip(model_labels(table), table["source"].to_pylist(),
                                            table[score_column].to_pylist()):
                e = entry(label, source)
                e["rows"] += 1
                e["wins"] += won
                if score is not None and np.isfinite(score):
                    e["scores"].append(score)
        n_groups = kept.num_rows
        table = []
        for (label, source), e in sorted(per.items(), key=lambda kv: (-kv[1]["wins"], kv[0])):
            s = np.array(e["scores"], dtype=np.float64)
            mean, median, p10, p90 = (
                [round(float(x), 4) for x in (s.mean(), np.median(s), *np.percentile(s, [10, 90]))]
                if s.size else [None] * 4)
            table.append({
                "model": label, "source": source, "rows": e["rows"], "wins": e["wins"],
                "win %": round(100.0 * e["wins"] / n_groups, 1) if n_groups else 0.0,
                "mean": mean, "median": median, "p10": p10, "p90": p90,
            })
        reasons = rejected["reason"].to_pylist()
        return {
            "instructions kept (one row each)": n_groups,
            "candidates rejected as not best": reasons.count(REASON_NOT_BEST),
            "candidates rejected as incorrect": reasons.count(REASON_INCORRECT),
            "candidates in groups with no score": reasons.count(REASON_UNSCORED),
            "wins and grape_logprob_mean per model": table,
        }
