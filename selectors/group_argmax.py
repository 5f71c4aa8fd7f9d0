"""The best row of each group: the argmax per ``group_id`` that GRAPE and ``select`` take.

Rows are positions in a table in corpus order (input files sorted by path, rows in
file order). In each group the row with the largest value wins; a tie goes to the
first row in corpus order; a row without a value (NaN) never beats one with a
value. A group in which no row has a value has no winner (``None``): the caller
decides (``select`` keeps its first row, ``grape_select`` rejects them all).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class GroupArgmax:
    """Per group, in order of first appearance: its rows and its winner."""

    members: dict[Hashable, list[int]]  # positions of the group's rows, in corpus order
    best: dict[Hashable, int | None]  # the winner's position; None when no row has a value


def group_argmax(values: np.ndarray, groups: Sequence[Hashable], positions: Iterable[int]) -> GroupArgmax:
    """The argmax of ``values`` per group over the rows at ``positions`` (in corpus order)."""
    members: dict[Hashable, list[int]] = {}
    best: dict[Hashable, int | None] = {}
    for i in positions:
        i = int(i)
        group = groups[i]
        members.setdefault(group, []).append(i)
        j = best.get(group)
        if not np.isnan(values[i]) and (j is None or values[i] > values[j]):
            best[group] = i
        else:
            best.setdefault(group, None)
    return GroupArgmax(members, best)
