"""Sharding: split the ingested corpus into shards of whole groups, and drop repeated rows.

A shard holds at most ``shard_rows`` rows (unless one group is larger); with
``min_shards`` (the cluster's worker threads) there are at least that many shards of
nearly equal size when the rows allow it, so no worker sits idle.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from thresher.flows.store import Store, digest
from thresher.schemas.readers import INGEST_STAGE
from thresher.schemas.records import make_rejected, records_table, rejected_table

SHARDING_VERSION = "1"
SHARDING_STAGE = "shard"
REASON_DUPLICATE_ROW = "duplicate_row"


def _pack_groups(group_ids: list[str], shard_rows: int) -> list[list[int]]:
    """Row positions per shard: groups in order of first appearance, never split."""
    members: dict[str, list[int]] = {}
    for position, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(position)
    shards: list[list[int]] = [[]]
    for rows in members.values():
        if shards[-1] and len(shards[-1]) + len(rows) > shard_rows:
            shards.append([])
        shards[-1].extend(rows)
    return [s for s in shards if s]


def _balance_groups(group_ids: list[str], parts: int) -> list[list[int]]:
    """Row positions in ``parts`` shards of nearly equal rows: groups in order, never split
    (a group goes to the shard its first row's place in the corpus falls in)."""
    members: dict[str, list[int]] = {}
    for position, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(position)
    shards: list[list[int]] = [[] for _ in range(parts)]
    before = 0
    for rows in members.values():
        shards[min(parts - 1, before * parts // len(group_ids))].extend(rows)
        before += len(rows)
    return [s for s in shards if s]


def plan_shards(group_ids: list[str], shard_rows: int, min_shards: int = 1) -> list[list[int]]:
    """Row positions per shard: at most ``shard_rows`` rows each (unless one group is larger),
    and at least ``min_shards`` shards of nearly equal size when the rows allow it."""
    n = len(group_ids)
    if min_shards > 1 and n and -(-n // min_shards) < shard_rows:
        balanced = _balance_groups(group_ids, min_shards)
        if max(len(s) for s in balanced) <= shard_rows:
            return balanced
    return _pack_groups(group_ids, shard_rows)


def make_shards(ingested: list[dict[str, Any]], shard_rows: int, store_root: str,
                min_shards: int = 1) -> dict[str, Any]:
    """Split the ingested corpus into shards of at most ``shard_rows`` rows, groups kept whole.

    With ``min_shards`` (the cluster's worker threads), there are at least that many
    shards of nearly equal size when the rows allow it, so no worker sits idle
    (:func:`plan_shards`).
    Returns ``{"key", "shards": [state, ...], "rejected": n, "cached"}``. Rows whose
    ``row_id`` repeats an earlier row's (the same content from the same source
    name, e.g. one file given twice) are rejected as ``duplicate_row``.
    """
    store = Store(store_root)
    ingested = sorted(ingested, key=lambda info: info["path"])
    key = digest({"version": SHARDING_VERSION, "inputs": [i["key"] for i in ingested], "shard_rows": shard_rows,
                  "min_shards": min_shards})
    if store.is_done(SHARDING_STAGE, key):
        return {**store.read_info(SHARDING_STAGE, key), "cached": True}
    tables = [store.read_table(INGEST_STAGE, i["key"], "records") for i in ingested]
    corpus = pa.concat_tables(tables) if tables else records_table([])
    row_ids = corpus["row_id"].to_pylist()
    seen: set[str] = set()
    keep = []
    duplicates = []
    for position, rid in enumerate(row_ids):
        if rid in seen:
            duplicates.append(position)
        else:
            seen.add(rid)
            keep.append(position)
    dup_rows = corpus.take(duplicates).to_pylist() if duplicates else []
    rejected = rejected_table(
        make_rejected(source=r["source"], source_row=r["source_row"], stage=SHARDING_STAGE,
                      reason=REASON_DUPLICATE_ROW, detail=f"row_id {r['row_id']} already read",
                      raw=_raw(r["messages"]), row_id=r["row_id"], kept_row_id=r["row_id"],
                      candidate=r["candidate"])
        for r in dup_rows
    )
    corpus = corpus.take(pa.array(keep, pa.int64()))
    states = []
    for index, positions in enumerate(plan_shards(corpus["group_id"].to_pylist(), shard_rows, min_shards)):
        shard = corpus.take(pa.array(positions, pa.int64()))
        shard_key = digest({"rows": shard["row_id"].to_pylist()})
        store.write("shards", shard_key, {"records": shard}, {"rows": shard.num_rows})
        states.append({"index": index, "key": shard_key, "base": shard_key, "layers": [], "rows": shard.num_rows})
    info = {"key": key, "shards": states, "rejected": rejected.num_rows}
    store.write(SHARDING_STAGE, key, {"rejected": rejected}, info)
    return {**info, "cached": False}


def _raw(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False)
