"""CLEAR's Auto-Filter on the NullModel mix at full size, through the real flow: how well it separates.

Run: ``python bench/clear_mix.py [--rows 100] [--workers 2]``

Input: the first ``--rows`` AlpacaEval instructions answered by ``gpt4_1106_preview``
and the same instructions answered by ``NullModel`` (adversarial garbage), so
``2 x rows`` rows. The stages are ``examples/clear.yaml``'s (validate, clear with the
embedded SmolLM2 + all-MiniLM, clear_filter at the median), run by ``thresher``'s
Prefect + Dask flow exactly as ``thresher run examples/clear.yaml`` runs them.

Prints the share of NullModel rows rejected, the share of gpt4 rows kept, their
confidence medians, and the wall time. The baseline is the chance level of a
median split (50% / 50%). ``tests/test_clear.py`` asserts the same property at
20 + 20 rows; this is the full-size figure the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100, help="instructions per model (2 x rows in)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from thresher.flows.curate import apply_overrides, execute
    from thresher.flows.registry import load_config

    work = Path(tempfile.mkdtemp(prefix="clear-mix-"))
    inputs = []
    for model in ("gpt4_1106_preview", "NullModel"):
        path = work / f"{model}.json"
        path.write_text(json.dumps(json.loads((DATA / f"{model}.json").read_text())[: args.rows]))
        inputs.append(str(path))
    config = apply_overrides(load_config(REPO / "examples/clear.yaml"), inputs=inputs,
                             out=str(work / "out"), workers=args.workers)
    started = time.perf_counter()
    manifest = execute(config, show_progress=True)
    seconds = time.perf_counter() - started

    kept = pq.read_table(work / "out" / "data").to_pylist()
    rejected = pq.read_table(work / "out" / "rejected").to_pylist()
    attributes = {r["row_id"]: r["clear_confidence"] for r in pq.read_table(work / "out" / "attributes").to_pylist()}
    null_rejected = sum(r["reason"] == "clear_low_confidence" and r["source"].endswith("NullModel.json")
                        for r in rejected)
    gpt4_kept = sum(r["candidate"] == "gpt4_1106_preview" for r in kept)
    print(json.dumps({
        "rows_in": manifest["counts"]["input"],
        "null_rejected": round(null_rejected / args.rows, 3),
        "gpt4_kept": round(gpt4_kept / args.rows, 3),
        "baseline (a median split by chance)": 0.5,
        "kept_confidence_median": round(statistics.median(attributes.values()), 4) if attributes else None,
        "seconds": round(seconds, 1),
        "out": str(work / "out"),
    }, indent=2))


if __name__ == "__main__":
    main()
