"""Check a finished loop's output: every augmentation's parent is a seed the student got wrong in the
iteration that made it, no augmentation is a parent, and the final training set holds every
iteration's training set.

The loop runs :func:`lineage_problems` before it writes its manifest (a problem is a bug, and the
run fails); ``python -m thresher.llm2llm.check OUT`` runs it on any output folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq


def lineage_problems(out: Path | str) -> list[str]:
    """What is wrong with ``out``'s lineage (an empty list when nothing is)."""
    out = Path(out)
    data = pq.read_table(out / "data").to_pylist()
    problems: list[str] = []
    seeds = {r["row_id"] for r in data if r["iteration"] == 0}
    augmentations = [r for r in data if r["iteration"] != 0]
    parents = {r["parent_row_id"] for r in data if r["parent_row_id"] is not None}
    for r in augmentations:
        folder = out / "iterations" / f"{r['iteration']:02d}"
        evaluation = pq.read_table(folder / "eval.parquet")
        seeds_eval = evaluation.filter(pc.equal(evaluation["split"], "seeds"))
        wrong = {i for i, ok in zip(seeds_eval["row_id"].to_pylist(), seeds_eval["correct"].to_pylist()) if not ok}
        if r["parent_row_id"] not in seeds:
            problems.append(f"augmentation {r['row_id']} has parent {r['parent_row_id']}, which is not a seed")
        elif r["parent_row_id"] not in wrong:
            problems.append(f"augmentation {r['row_id']}'s parent {r['parent_row_id']} was not wrong in "
                            f"iteration {r['iteration']}")
        if not r["teacher"]:
            problems.append(f"augmentation {r['row_id']} does not name its teacher")
        if r["row_id"] in parents:
            problems.append(f"augmentation {r['row_id']} is the parent of another row")
    ids = {r["row_id"] for r in data}
    for folder in sorted((out / "iterations").glob("[0-9][0-9]")):
        trained = set(pq.read_table(folder / "train.parquet", columns=["row_id"])["row_id"].to_pylist())
        if not trained <= ids:
            problems.append(f"{folder.name}/train.parquet has {len(trained - ids)} rows missing from data/")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m thresher.llm2llm.check OUT", file=sys.stderr)
        return 2
    problems = lineage_problems(args[0])
    for p in problems:
        print(p)
    print(f"{args[0]}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
