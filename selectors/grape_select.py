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
2. Argmax per group: the highest ``grape_logprob_mean``; ties go to the first row
   in corpus order (input files sorted by path, rows in file order). The others
   are rejected with reason ``grape_not_best``, their score in ``value`` and a
   detail naming the winning row and its score. A row with no score (no response
   token fitted in ``max_tokens``) never beats a scored one; a group in which no
   row has a score keeps none (reason ``grape_unscored``).

Every detail starts with the row's model label as a Python string literal
(the ``candidate`` name, else its ``source``), which :meth:`GrapeSelectStage.summarize`
reads back to report wins and score distributions per model.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from thresher.flows.stage import Stage, StageOutput, StageParams

SCORE = "grape_logprob_mean"
REASON_NOT_BEST = "grape_not_best"
REASON_INCORRECT = "grape_incorrect"
REASON_UNSCORED = "grape_unscored"
TRUE_WORDS = {"true", "yes", "y", "1", "correct", "pass", "passed", "right"}
FALSE_WORDS = {"false", "no", "n", "0", "incorrect", "fail", "failed", "wrong"}
_LEADING_LITERAL = re.compile(r"""^('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


class GrapeSelectParams(StageParams):
    correct_column: str | None = Field(
        None, description="column (attribute or input field) saying whether a candidate is correct; "
                          "false rows are rejected before the argmax")


def model_label(candidate: str | None, source: str) -> str:
    """Who wrote a row: its candidate (model) name when known, else its source file."""
    return candidate if candidate else source


def label_of_detail(detail: str) -> str | None:
    """The model label a ``grape_select`` detail starts with (see the module docstring)."""
    match = _LEADING_LITERAL.match(detail or "")
    if not match:
        return None
    try:
        value = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


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
    version = "1"
    kind = "global"
    Params = GrapeSelectParams
    requires = (SCORE,)

    def process(self, rows: pa.Table) -> StageOutput:
        p: GrapeSelectParams = self.params
        row_ids = rows["row_id"].to_pylist()
        groups = rows["group_id"].to_pylist()
        candidates = rows["candidate"].to_pylist() if "candidate" in rows.column_names else [None] * len(row_ids)
        labels = [model_label(c, s) for c, s in zip(candidates, rows["source"].to_pylist())]
        scores = np.array([np.nan if v is None else float(v) for v in rows[SCORE].to_pylist()], dtype=np.float64)

        def value(i: int) -> float | None:
            return None if np.isnan(scores[i]) else float(scores[i])

        rejected: list[dict[str, Any]] = []
        alive = np.ones(len(row_ids), dtype=bool)

        if p.correct_column:
            raw = correctness(rows, p.correct_column)
            for i, v in enumerate(raw):
                if parse_correct(v, p.correct_column, row_ids[i]) is False:
                    alive[i] = False
                    rejected.append({"row_id": row_ids[i], "reason": REASON_INCORRECT, "value": value(i),
                                     "detail": f"{labels[i]!r}: {p.correct_column} = {v!r} (correctness pre-filter)"})

        members: dict[str, list[int]] = {}
        for i in np.flatnonzero(alive):  # table order is corpus order
            members.setdefault(groups[i], []).append(int(i))
        for group in members.values():
            scored = [i for i in group if not np.isnan(scores[i])]
            if not scored:
                for i in group:
                    rejected.append({"row_id": row_ids[i], "reason": REASON_UNSCORED, "value": None, "detail": (
                        f"{labels[i]!r}: no candidate of this instruction has a score "
                        "(no response token fitted in the grape stage's max_tokens)")})
                continue
            best = scored[0]
            for i in scored[1:]:
                if scores[i] > scores[best]:
                    best = i
            for i in group:
                if i == best:
                    continue
                relation = "ties with" if scores[i] == scores[best] else "<"
                tie = " (a tie: the first in corpus order wins)" if relation == "ties with" else ""
                rejected.append({"row_id": row_ids[i], "reason": REASON_NOT_BEST, "value": value(i), "detail": (
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

        cands = kept["candidate"].to_pylist() if "candidate" in kept.column_names else [None] * kept.num_rows
        for cand, source, score in zip(cands, kept["source"].to_pylist(), kept[SCORE].to_pylist()):
            e = entry(model_label(cand, source), source)
            e["rows"] += 1
            e["wins"] += 1
            if score is not None and np.isfinite(score):
                e["scores"].append(score)
        own_cands = rejected["candidate"].to_pylist() if "candidate" in rejected.column_names else None
        for k, (source, detail, score) in enumerate(zip(
                rejected["source"].to_pylist(), rejected["detail"].to_pylist(), rejected["value"].to_pylist())):
            label = model_label(own_cands[k], source) if own_cands else (label_of_detail(detail) or source)
            e = entry(label, source)
            e["rows"] += 1
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
