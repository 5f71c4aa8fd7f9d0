"""Exact deduplication on normalized content, over the whole corpus (global stage).

Two rows are duplicates when their conversations are equal after Unicode NFC
normalization and whitespace folding (``content_id``). The first row in corpus
order (input files sorted by path, rows in file order) is kept; each later copy
is rejected with reason ``exact_duplicate``, the kept row in ``kept_row_id``.
"""

from __future__ import annotations

import pyarrow as pa

from thresher.flows.stage import Stage, StageOutput, StageParams


class ExactDedupStage(Stage):
    name = "exact_dedup"
    version = "2"  # 2: the kept row in kept_row_id
    kind = "global"
    reads = ("content_id",)
    Params = StageParams

    def process(self, rows: pa.Table) -> StageOutput:
        first_seen: dict[str, str] = {}
        rejected = []
        for row_id, key in zip(rows["row_id"].to_pylist(), rows["content_id"].to_pylist()):
            kept = first_seen.setdefault(key, row_id)
            if kept != row_id:
                rejected.append({"row_id": row_id, "reason": "exact_duplicate", "kept_row_id": kept,
                                 "detail": f"same normalized content as row {kept}"})
        return StageOutput(rejected=rejected)
