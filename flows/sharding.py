"""Sharding: split the ingested corpus into shards of whole groups, and drop repeated rows.

A shard holds at most ``shard_rows`` rows and, with ``shard_bytes``, at most that many
bytes of ``messages`` JSON (unless one group is larger: groups are never split); with
``min_shards`` (the cluster's worker threads) there are at least that many shards of
nearly equal size when the rows allow it, so no worker sits idle.

Planning reads only the narrow columns (``row_id``, ``group_id``, and each row's
``messages`` size when ``shard_bytes`` is set); each shard is then written by taking its
rows from the row groups of the ingested files that hold them, so memory holds about a
shard's worth of rows, not the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thresher.flows.store import Store, digest
from thresher.schemas.readers import INGEST_STAGE
from thresher.schemas.records import make_rejected, records_table, rejected_table

SHARDING_VERSION = "1"
SHARDING_STAGE = "shard"
REASON_DUPLICATE_ROW = "duplicate_row"

GroupIds = Sequence[str] | pa.Array | pa.ChunkedArray


# --------------------------------------------------------------------------- sizes


#: ``json.dumps(messages, ensure_ascii=False)`` writes each message as
#: ``{"role": "<role>", "content": "<content>"}`` and joins them with ``", "`` inside ``[]``.
_MESSAGE_FRAME = len('{"role": "", "content": ""}')
_ESCAPED_AS_TWO = r'["\\\n\r\t\x08\x0c]'  # written as \" \\ \n \r \t \b \f
_ESCAPED_AS_SIX = r"[\x00-\x07\x0b\x0e-\x1f]"  # other control characters: \u00XX


def _json_string_bytes(strings: pa.Array) -> np.ndarray:
    """Bytes of each string as JSON writes it (``ensure_ascii=False``), quotes left out."""
    size = pc.binary_length(strings).to_numpy(zero_copy_only=False).astype(np.int64)
    size += pc.count_substring_regex(strings, _ESCAPED_AS_TWO).to_numpy(zero_copy_only=False)
    size += 5 * pc.count_substring_regex(strings, _ESCAPED_AS_SIX).to_numpy(zero_copy_only=False)
    return size


def messages_json_bytes(messages: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each row's ``len(json.dumps(messages, ensure_ascii=False).encode())``, computed in Arrow."""
    if isinstance(messages, pa.ChunkedArray):
        parts = [messages_json_bytes(chunk) for chunk in messages.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    turns = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    per_turn = (_MESSAGE_FRAME + _json_string_bytes(pc.struct_field(flat, "role").fill_null(""))
                + _json_string_bytes(pc.struct_field(flat, "content").fill_null("")))
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    total = np.bincount(parents, weights=per_turn, minlength=len(messages)).astype(np.int64)
    return total + 2 + 2 * np.maximum(turns - 1, 0)  # "[" "]" and ", " between turns


# --------------------------------------------------------------------------- planning


def _groups(group_ids: GroupIds, row_bytes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(row positions, group by group in order of first appearance; rows per group; bytes per group)."""
    array = group_ids if isinstance(group_ids, (pa.Array, pa.ChunkedArray)) else pa.array(group_ids, pa.string())
    if isinstance(array, pa.ChunkedArray):  # large_string: no 2 GiB limit when the chunks are combined
        array = array.cast(pa.large_string()).combine_chunks() if array.num_chunks else pa.array([], pa.string())
    # dictionary codes are given in order of first appearance
    codes = array.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    group_bytes = None if row_bytes is None else np.bincount(codes, weights=row_bytes).astype(np.int64)
    return order, sizes, group_bytes


def _split(order: np.ndarray, sizes: np.ndarray, first_groups: list[int]) -> list[np.ndarray]:
    """``order`` cut before each group in ``first_groups`` (a shard's first group)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [s for s in np.split(order, starts[first_groups[1:]]) if len(s)] if first_groups else []


def _pack_groups(group_ids: GroupIds, shard_rows: int, row_bytes: np.ndarray | None = None,
                 shard_bytes: int | None = None) -> list[np.ndarray]:
    """Row positions per shard: groups in order of first appearance, never split; a shard
    closes when the next group would take it over ``shard_rows`` rows or ``shard_bytes`` bytes."""
    order, sizes, group_bytes = _groups(group_ids, row_bytes if shard_bytes is not None else None)
    first_groups: list[int] = []
    rows = size = 0
    byte_list = group_bytes.tolist() if group_bytes is not None else None
    for index, n in enumerate(sizes.tolist()):
        b = byte_list[index] if byte_list is not None else 0
        if not first_groups or (rows and (rows + n > shard_rows or (byte_list is not None and size + b > shard_bytes))):
            first_groups.append(index)
            rows = size = 0
        rows += n
        size += b
    return _split(order, sizes, first_groups)


def _balance_groups(group_ids: GroupIds, parts: int) -> list[np.ndarray]:
    """Row positions in ``parts`` shards of nearly equal rows: groups in order, never split
    (a group goes to the shard its first row's place in the corpus falls in)."""
    order, sizes, _ = _groups(group_ids, None)
    before = np.cumsum(sizes) - sizes
    shard_of = np.minimum(parts - 1, before * parts // max(1, len(order)))
    first_groups = np.flatnonzero(np.diff(shard_of, prepend=-1)).tolist()
    return _split(order, sizes, first_groups)


def plan_shards(group_ids: GroupIds, shard_rows: int, min_shards: int = 1,
                row_bytes: np.ndarray | None = None, shard_bytes: int | None = None) -> list[np.ndarray]:
    """Row positions per shard: at most ``shard_rows`` rows each and, with ``shard_bytes``, at
    most that many bytes of ``row_bytes`` (unless one group is larger), and at least
    ``min_shards`` shards of nearly equal rows when the rows and bytes allow it."""
    n = len(group_ids)
    if shard_bytes is not None and row_bytes is None:
        raise ValueError("shard_bytes needs row_bytes (each row's size)")
    if min_shards > 1 and n and -(-n // min_shards) < shard_rows:
        balanced = _balance_groups(group_ids, min_shards)
        if max(len(s) for s in balanced) <= shard_rows and (
                shard_bytes is None or max(int(row_bytes[s].sum()) for s in balanced) <= shard_bytes):
            return balanced
    return _pack_groups(group_ids, shard_rows, row_bytes, shard_bytes)


# --------------------------------------------------------------------------- shards


class _IngestedRows:
    """One ingested ``records.parquet``, read by row-group ranges; the last range read is kept
    (consecutive shards mostly need the same row groups)."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = pq.read_metadata(path)
        sizes = [self.metadata.row_group(i).num_rows for i in range(self.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # first row of each row group
        self._cached: tuple[int, int, pa.Table] | None = None  # first, last row group read, their rows

    def rows(self, positions: np.ndarray, columns: list[str] | None = None) -> tuple[pa.Table, int]:
        """(rows holding every one of ``positions``, the position of its first row); all columns
        (kept for the next call), or a one-off read of ``columns``."""
        first = int(np.searchsorted(self.starts, positions.min(), side="right") - 1)
        last = int(np.searchsorted(self.starts, positions.max(), side="right") - 1)
        cached = self._cached
        if columns is not None or cached is None or cached[0] > first or cached[1] < last:
            with pq.ParquetFile(self.path, metadata=self.metadata) as parquet:
                cached = (first, last, parquet.read_row_groups(range(first, last + 1), columns=columns))
            if columns is None:
                self._cached = cached
        return cached[2], int(self.starts[cached[0]])

    def release(self) -> None:
        self._cached = None


def _take_rows(files: list[_IngestedRows], starts: np.ndarray, positions: np.ndarray,
               columns: list[str] | None = None) -> pa.Table:
    """The corpus rows at ``positions`` (in that order), the corpus being the files end to end."""
    owner = np.searchsorted(starts, positions, side="right") - 1
    local = positions - starts[owner]
    pieces, offset = [], np.zeros(len(files), np.int64)
    base = 0
    for index in np.unique(owner).tolist():
        table, first_row = files[index].rows(local[owner == index], columns)
        offset[index] = base - first_row
        pieces.append(table)
        base += table.num_rows
    return pa.concat_tables(pieces).take(pa.array(local + offset[owner], pa.int64()))


def _row_bytes(paths: list[Path]) -> np.ndarray:
    """Each row's :func:`messages_json_bytes`, the files end to end, read a batch at a time."""
    sizes = [np.zeros(0, np.int64)]
    for path in paths:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=4096, columns=["messages"]):
                sizes.append(messages_json_bytes(batch.column(0)))
    return np.concatenate(sizes)


def make_shards(ingested: list[dict[str, Any]], shard_rows: int, store_root: str,
                min_shards: int = 1, shard_bytes: int | None = None) -> dict[str, Any]:
    """:func:`plan_sharding`, then every shard not yet written, one after the other, the ingested
    files' row groups read once for consecutive shards (a run stopped while writing them writes
    only those left)."""
    sharding = plan_sharding(ingested, shard_rows, store_root, min_shards, shard_bytes)
    if sharding["unwritten"]:
        store = Store(store_root)
        plan = pq.read_table(store.path(SHARDING_STAGE, sharding["key"]) / "plan.parquet")
        shard_of, positions = plan["shard"].to_numpy(), plan["position"].to_numpy()
        files = [_IngestedRows(Path(p)) for p in sharding["paths"]]
        starts = np.array(sharding["starts"], np.int64)
        for index in sharding["unwritten"]:
            rows = positions[shard_of == index]
            touched = set((np.searchsorted(starts, rows, side="right") - 1).tolist())
            for number, file in enumerate(files):
                if number not in touched:
                    file.release()  # keep only what this shard may share with the next
            write_shard(sharding, index, store_root, _take_rows(files, starts, rows))
    return {**sharding, "unwritten": []}


def write_shard(sharding: dict[str, Any], index: int, store_root: str, rows: pa.Table) -> str:
    """Write ``rows`` as shard ``index`` of a planned sharding, unless it is written already; returns its key."""
    store = Store(store_root)
    state = sharding["shards"][index]
    if store.is_done("shards", state["key"]):
        return state["key"]
    store.write("shards", state["key"], {"records": rows}, {"rows": rows.num_rows})
    return state["key"]


def plan_sharding(ingested: list[dict[str, Any]], shard_rows: int, store_root: str,
                  min_shards: int = 1, shard_bytes: int | None = None) -> dict[str, Any]:
    """Plan the split of the ingested corpus into shards of at most ``shard_rows`` rows, groups
    kept whole; :func:`make_shards` writes the shards from it.

    With ``shard_bytes``, a shard also closes before its rows' ``messages`` JSON would pass
    that many bytes (:func:`messages_json_bytes`; a group larger than that is a shard of its
    own). With ``min_shards`` (the cluster's worker threads), there are at least that many
    shards of nearly equal size when the rows allow it, so no worker sits idle
    (:func:`plan_shards`).
    Returns ``{"key", "shards": [state, ...], "rejected": n, "cached", "unwritten": [index, ...],
    "paths", "starts"}`` (the ingested files and their first rows in the corpus); the plan, each
    kept row's shard and position, is ``plan.parquet`` in the result. Rows whose
    ``row_id`` repeats an earlier row's (the same content from the same source
    name, e.g. one file given twice) are rejected as ``duplicate_row``.
    """
    store = Store(store_root)
    ingested = sorted(ingested, key=lambda info: info["path"])
    fields = {"version": SHARDING_VERSION, "inputs": [i["key"] for i in ingested], "shard_rows": shard_rows,
              "min_shards": min_shards}
    if shard_bytes is not None:  # only then: earlier stores keep their keys
        fields["shard_bytes"] = shard_bytes
    key = digest(fields)
    if store.is_done(SHARDING_STAGE, key):  # planned before; a run stopped while writing left some shards to write
        info = store.read_info(SHARDING_STAGE, key)
        return {**info, "cached": True,
                "unwritten": [s["index"] for s in info["shards"] if not store.is_done("shards", s["key"])]}

    paths = [store.path(INGEST_STAGE, i["key"]) / "records.parquet" for i in ingested]
    narrow = [pq.read_table(p, columns=["row_id", "group_id"]) for p in paths]
    files = [_IngestedRows(p) for p in paths]
    starts = np.concatenate([[0], np.cumsum([t.num_rows for t in narrow], dtype=np.int64)])
    corpus = pa.concat_tables(narrow) if narrow else records_table([]).select(["row_id", "group_id"])
    del narrow
    row_bytes = _row_bytes(paths) if shard_bytes is not None else None

    # the first row of each row_id is kept, later ones are duplicates
    ids = corpus["row_id"].cast(pa.large_string()).combine_chunks() if corpus.num_rows else pa.array([], pa.string())
    first = np.unique(ids.dictionary_encode().indices.to_numpy(zero_copy_only=False), return_index=True)[1]
    keep = np.zeros(corpus.num_rows, bool)
    keep[first] = True
    duplicates = np.flatnonzero(~keep)
    kept = np.flatnonzero(keep)
    del ids, first

    dup_rows = _take_rows(files, starts, duplicates, ["row_id", "messages", "source", "source_row", "candidate"]
                          ).to_pylist() if len(duplicates) else []
    rejected = rejected_table(
        make_rejected(source=r["source"], source_row=r["source_row"], stage=SHARDING_STAGE,
                      reason=REASON_DUPLICATE_ROW, detail=f"row_id {r['row_id']} already read",
                      raw=_raw(r["messages"]), row_id=r["row_id"], kept_row_id=r["row_id"],
                      candidate=r["candidate"])
        for r in dup_rows
    )
    del dup_rows
    group_ids = corpus["group_id"].take(pa.array(kept, pa.int64())) if len(duplicates) else corpus["group_id"]
    corpus_ids = corpus["row_id"]
    del corpus
    plan = plan_shards(group_ids, shard_rows, min_shards,
                       row_bytes[kept] if row_bytes is not None else None, shard_bytes)
    states, shard_of, positions = [], [], []
    for index, members in enumerate(plan):
        rows = kept[members]
        shard_key = digest({"rows": corpus_ids.take(pa.array(rows, pa.int64())).to_pylist()})
        states.append({"index": index, "key": shard_key, "base": shard_key, "layers": [], "rows": len(rows)})
        shard_of.append(np.full(len(rows), index, np.int32))
        positions.append(rows.astype(np.int64))
    plan_table = pa.table({"shard": np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32),
                           "position": np.concatenate(positions) if positions else np.zeros(0, np.int64)})
    info = {"key": key, "shards": states, "rejected": rejected.num_rows, "paths": [str(p) for p in paths],
            "starts": starts.tolist()}
    store.write(SHARDING_STAGE, key, {"rejected": rejected, "plan": plan_table}, info)
    return {**info, "cached": False, "unwritten": [s["index"] for s in states]}


def _raw(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False)
