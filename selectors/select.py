"""Declarative selection over joined attributes (global stage, no model).

Applied in this order, each step's rejections with their own reason:

1. ``where`` — conditions such as ``"deita_quality >= 3.5"`` or ``"candidate != NullModel"``,
   all of which a row must meet (reason ``select_where``);
2. ``argmax_per_group`` — keep the row with the highest value of a column in each
   ``group_id`` (ties: the first in corpus order; reason ``select_not_best``, with the
   group's best row in ``kept_row_id``);
3. ``order_by`` + ``budget`` — keep the ``budget`` rows with the highest (or, with
   ``ascending``, lowest) value; ties in corpus order (reason ``select_over_budget``).

Selection reads attribute tables that scoring stages already wrote, so changing a
threshold or a budget re-runs this stage only, never a model.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from thresher.flows.stage import Stage, StageOutput, StageParams
from thresher.selectors.group_argmax import group_argmax
from thresher.selectors.nullable import float_or_none, floats

_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_OPS = {
    ">=": np.greater_equal, "<=": np.less_equal, ">": np.greater,
    "<": np.less, "==": np.equal, "!=": np.not_equal,
}


def parse_condition(text: str) -> tuple[str, str, Any]:
    """``"col >= 3"`` -> ``("col", ">=", 3.0)``; a value that is not a number stays a string."""
    match = _CONDITION.match(text)
    if not match:
        raise ValueError(f"cannot read condition {text!r}; write it as '<column> <op> <value>' with op one of {list(_OPS)}")
    column, op, value = match.groups()
    value = value.strip("'\"")
    try:
        return column, op, float(value)
    except ValueError:
        return column, op, value


class SelectParams(StageParams):
    where: list[str] = Field(default_factory=list, description="conditions every kept row meets")
    argmax_per_group: str | None = Field(None, description="keep the row with the highest value of this column per group")
    order_by: str | None = Field(None, description="column that ranks rows for the budget")
    ascending: bool = Field(False, description="rank by ascending order_by (default: highest first)")
    budget: int | None = Field(None, ge=0, description="keep at most this many rows")

    @field_validator("where")
    @classmethod
    def _conditions_parse(cls, value: list[str]) -> list[str]:
        for condition in value:
            parse_condition(condition)
        return value


def _column(rows: pa.Table, name: str, why: str) -> np.ndarray:
    if name not in rows.column_names:
        raise ValueError(f"select: {why} names column '{name}', which no earlier stage wrote "
                         f"(columns: {', '.join(rows.column_names)})")
    return np.asarray(rows[name].to_pylist(), dtype=object)


def _numeric(values: np.ndarray, name: str) -> np.ndarray:
    try:
        return floats(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"select: column '{name}' is not numeric ({err})") from None


class SelectStage(Stage):
    name = "select"
    version = "2"  # 2: select_not_best names the group's best row in kept_row_id
    kind = "global"
    Params = SelectParams

    @property
    def reads(self) -> tuple[str, ...]:
        """The columns its conditions, its argmax and its ranking name, and the groups."""
        p: SelectParams = self.params
        named = [parse_condition(c)[0] for c in p.where] + [p.argmax_per_group, p.order_by]
        return ("group_id", *dict.fromkeys(c for c in named if c))

    def process(self, rows: pa.Table) -> StageOutput:
        p: SelectParams = self.params
        row_ids = rows["row_id"].to_pylist()
        alive = np.ones(len(row_ids), dtype=bool)
        rejected: list[dict] = []

        def drop(mask: np.ndarray, reason: str, detail_of, values=None, kept_of=None) -> None:
            for i in np.flatnonzero(mask & alive):
                rejected.append({"row_id": row_ids[i], "reason": reason, "detail": detail_of(i),
                                 "value": None if values is None else float_or_none(values[i]),
                                 "kept_row_id": None if kept_of is None else kept_of(i)})
            alive[mask] = False

        for condition in p.where:
            column, op, target = parse_condition(condition)
            raw = _column(rows, column, "where")
            if isinstance(target, float):
                values = _numeric(raw, column)
                meets = _OPS[op](values, target) & ~np.isnan(values)
            else:
                values = None
                meets = _OPS[op](raw.astype(str), target) & (raw != None)  # noqa: E711
            drop(~meets, "select_where", lambda i, c=condition, r=raw: f"fails '{c}' ({column} = {r[i]!r})", values)

        if p.argmax_per_group:
            values = _numeric(_column(rows, p.argmax_per_group, "argmax_per_group"), p.argmax_per_group)
            groups = rows["group_id"].to_pylist()
            argmax = group_argmax(values, groups, np.flatnonzero(alive))
            # a group where no row has a value keeps its first row
            best = {g: i if i is not None else argmax.members[g][0] for g, i in argmax.best.items()}
            winners = np.zeros(len(row_ids), dtype=bool)
            winners[list(best.values())] = True
            drop(~winners, "select_not_best",
                 lambda i: f"{p.argmax_per_group} = {values[i]:.6g} < {values[best[groups[i]]]:.6g} of row {row_ids[best[groups[i]]]}",
                 values, kept_of=lambda i: row_ids[best[groups[i]]])

        if p.budget is not None:
            if p.order_by:
                values = _numeric(_column(rows, p.order_by, "order_by"), p.order_by)
                key = np.where(np.isnan(values), np.inf, values if p.ascending else -values)
            else:
                values, key = None, np.zeros(len(row_ids))
            candidates = np.flatnonzero(alive)
            ranked = candidates[np.argsort(key[candidates], kind="stable")]
            over = np.zeros(len(row_ids), dtype=bool)
            over[ranked[p.budget:]] = True
            drop(over, "select_over_budget",
                 lambda i: f"ranked past the budget of {p.budget}" + (f" by {p.order_by}" if p.order_by else ""),
                 values)
        return StageOutput(rejected=rejected)
