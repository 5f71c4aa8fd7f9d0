"""Per-shard output: each shard's rows are written by the worker that holds them, as their own parts.

:func:`write_shard_parts` runs on a worker, once per shard, at the end of a run. It writes
the shard's surviving rows (``data/`` + ``attributes/``), the rows its stages rejected
(``rejected/``) and replaced (``replaced/``) as ``part-NNNNN.parquet`` (``NNNNN`` the
shard's index; ``part-NNNNN-KKK.parquet`` when a shard holds more than ``rows_per_file``
rows) into the run's staging folder, and returns only counts and schemas. The rows the
reading and sharding rejected go to ``rejected/ingest.parquet``
(:func:`write_ingest_rejected`). The driver then makes the parts' schemas agree and swaps
the staging folders in whole (:func:`thresher.schemas.writers.swap_in`), so a reader never
mixes two runs and nothing of an earlier run is left behind.

A shard's rejected and replaced rows are looked up among the rows it ever held: its base
rows and the rows its stages created (a global stage's created rows belong to the shard
of their parent; those made from nothing to the last shard), so every row is written once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from thresher.flows.pipeline import base_rows, shard_view
from thresher.flows.sharding import SHARDING_STAGE, _raw
from thresher.flows.stage import conform_rejected
from thresher.flows.store import Store
from thresher.schemas.kd import TOPK_COLUMNS, with_kd_metadata
from thresher.schemas.readers import INGEST_STAGE
from thresher.schemas.records import RECORD_SCHEMA, REJECTED_SCHEMA, REJECTION_FIELDS, conform, records_table
from thresher.schemas.writers import OUTPUT_FOLDERS, swap_in, write_part

#: the extra column of ``replaced/``: the stage that replaced the row
REPLACED_SCHEMA = RECORD_SCHEMA.append(pa.field("replaced_by", pa.string()))


def _ids(table: pa.Table) -> pa.Array:
    return table["row_id"].combine_chunks() if table.num_rows else pa.array([], pa.string())


def shard_history(state: dict[str, Any], store: Store) -> tuple[pa.Table, list[tuple[str, str, pa.Table, pa.Table]]]:
    """(every row the shard ever held, and per layer (stage, key, its rejected rows, its replaced
    rows) restricted to this shard's rows), without joining any attribute."""
    held = [base_rows(state, store)]
    held_ids = set(_ids(held[0]).to_pylist())
    owned = state.get("global_layers", {})
    layers = []
    for stage, key in state["layers"]:
        created = store.read_table(stage, key, "created")
        if created is not None and created.num_rows:
            created = conform(created, RECORD_SCHEMA)
            if key in owned:  # a global stage: the rows whose parent is here (or, last shard, no parent)
                parents = created["parent_row_id"].to_pylist()
                mine = [i for i, p in enumerate(parents) if p in held_ids or (p is None and owned[key])]
                created = created.take(pa.array(mine, pa.int64()))
            held.append(created)
            held_ids.update(_ids(created).to_pylist())
        gone = []
        for name in ("rejected", "replaced"):
            table = store.read_table(stage, key, name)
            if table is None:
                table = pa.table({"row_id": pa.array([], pa.string())})
            if key in owned and table.num_rows:
                table = table.filter(pc.is_in(table["row_id"], value_set=pa.array(sorted(held_ids), pa.string())))
            gone.append(table)
        layers.append((stage, key, *gone))
    return pa.concat_tables(held), layers


def _rows_named(corpus: pa.Table, ids: pa.Table) -> pa.Table:
    """The rows of ``corpus`` whose ``row_id`` ``ids`` lists, in that order."""
    return corpus.take(pc.index_in(ids["row_id"], value_set=corpus["row_id"]))


def rejected_rows(stage: str, table: pa.Table, held: pa.Table) -> pa.Table:
    """A stage's rejected rows with their source, row, candidate and raw text (from the rows held)."""
    table = conform_rejected(table)
    base = _rows_named(held, table)
    return pa.table({
        "row_id": table["row_id"], "source": base["source"], "source_row": base["source_row"],
        "candidate": base["candidate"], "stage": pa.array([stage] * table.num_rows, pa.string()),
        **{f.name: table[f.name] for f in REJECTION_FIELDS},
        "raw": pa.array([_raw(m) for m in base["messages"].to_pylist()], pa.string()),
    }, schema=REJECTED_SCHEMA)


def replaced_rows(stage: str, table: pa.Table, held: pa.Table) -> pa.Table:
    rows = _rows_named(held, table)
    return rows.append_column("replaced_by", pa.array([stage] * rows.num_rows, pa.string()))


def split_output(rows: pa.Table, intermediate: set[str]) -> tuple[pa.Table, pa.Table]:
    """(canonical data columns, row_id + attribute columns) of kept rows; ``intermediate`` columns
    (wide columns a stage wrote for a later stage, e.g. embeddings) are left out."""
    data = rows.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    extra = [c for c in rows.column_names if c not in RECORD_SCHEMA.names and c not in intermediate]
    attributes = with_kd_metadata(rows.select(["row_id", *extra]))  # the teacher of KD labels, in the metadata
    data = data.replace_schema_metadata({**(data.schema.metadata or {}), **(attributes.schema.metadata or {})})
    return data, attributes


def group_hashes(groups: pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of the distinct group ids (the driver counts the output's groups from them)."""
    return np.array([xxhash.xxh3_64_intdigest(g.encode()) for g in pc.unique(groups).to_pylist() if g is not None],
                    dtype=np.uint64)


def write_shard_parts(state: dict[str, Any], store_root: str, staging: str, rows_per_file: int,
                      intermediate: list[str]) -> dict[str, Any]:
    """Write one shard's output parts into ``staging``; return its counts, files and schemas."""
    store = Store(store_root)
    folder, stem = Path(staging), f"part-{state['index']:05d}"
    kept = shard_view(state, store)
    data, attributes = split_output(kept, set(intermediate))
    held, layers = shard_history(state, store)
    rejected = [rejected_rows(stage, table, held) for stage, _, table, _ in layers if table.num_rows]
    replaced = [replaced_rows(stage, table, held) for stage, _, _, table in layers if table.num_rows]
    rejected = pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()
    replaced = pa.concat_tables(replaced) if replaced else REPLACED_SCHEMA.empty_table()
    files = {name: write_part(table, folder / name, stem, rows_per_file) if table.num_rows else []
             for name, table in (("data", data), ("attributes", attributes), ("rejected", rejected),
                                 ("replaced", replaced))}
    return {
        "index": state["index"], "files": files, "output": kept.num_rows,
        "attributes_schema": attributes.schema.remove_metadata(),
        "rejected_by_reason": dict(Counter(rejected["reason"].to_pylist())),
        "rejected_by_stage": dict(Counter(rejected["stage"].to_pylist())),
        "replaced_by_stage": dict(Counter(replaced["replaced_by"].to_pylist())),
        "groups": group_hashes(data["group_id"]),
    }


def write_ingest_rejected(ingested: list[dict], sharding: dict, store_root: str, staging: str,
                          rows_per_file: int) -> dict[str, Any]:
    """The rows reading and sharding rejected, as ``rejected/ingest.parquet``; their counts."""
    store = Store(store_root)
    parts = [store.read_table(INGEST_STAGE, i["key"], "rejected") for i in sorted(ingested, key=lambda x: x["path"])]
    if sharding.get("key"):
        parts.append(store.read_table(SHARDING_STAGE, sharding["key"], "rejected"))
    parts = [conform(p, REJECTED_SCHEMA) for p in parts if p is not None]  # conform: results of older versions
    rejected = pa.concat_tables(parts) if parts else REJECTED_SCHEMA.empty_table()
    files = write_part(rejected, Path(staging) / "rejected", "ingest", rows_per_file) if rejected.num_rows else []
    return {"files": files, "rejected_by_reason": dict(Counter(rejected["reason"].to_pylist())),
            "rejected_by_stage": dict(Counter(rejected["stage"].to_pylist()))}


def empty_output_tables(attributes_schema: pa.Schema) -> dict[str, pa.Table]:
    """A folder's empty part, for a folder no shard wrote to (readers expect one file at least)."""
    return {"data": records_table([]), "attributes": attributes_schema.empty_table(),
            "rejected": REJECTED_SCHEMA.empty_table(), "replaced": REPLACED_SCHEMA.empty_table()}


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(table.schema.metadata or {}))


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


def finish_output(out: Path, staging: Path, shards: list[dict[str, Any]], ingest: dict[str, Any],
                  rows_per_file: int) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Make the parts' schemas agree, give every folder a file, swap the staging folders in whole.

    Returns (the files per folder, the output's totals). A part whose attribute columns differ
    from the others' (a column one shard never filled) is rewritten in the common schema; that
    is the only part the driver reads."""
    schemas = [s["attributes_schema"] for s in shards]
    common = pa.unify_schemas(schemas, promote_options="permissive") if schemas else \
        pa.schema([("row_id", pa.string())])
    for shard, schema in zip(shards, schemas):
        if not schema.equals(common):
            for name in shard["files"]["attributes"]:
                path = staging / "attributes" / name
                pq.write_table(_conformed(pq.read_table(path), common), path)
    for folder, table in empty_output_tables(common).items():
        if not any(s["files"][folder] for s in shards) and not (folder == "rejected" and ingest["files"]):
            write_part(table, staging / folder, "part-00000", rows_per_file)
    files = {folder: sorted(p.name for p in (staging / folder).glob("*.parquet")) for folder in OUTPUT_FOLDERS}
    swap_in(out, staging)
    by_reason = _merge([ingest["rejected_by_reason"], *(s["rejected_by_reason"] for s in shards)])
    replaced_by_stage = _merge([s["replaced_by_stage"] for s in shards])
    groups = np.concatenate([s["groups"] for s in shards]) if shards else np.array([], np.uint64)
    totals = {
        "output": sum(s["output"] for s in shards),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
        "rejected_by_stage": _merge([ingest["rejected_by_stage"], *(s["rejected_by_stage"] for s in shards)]),
        "replaced": sum(replaced_by_stage.values()),
        "replaced_by_stage": replaced_by_stage,
        "groups_output": int(np.unique(groups).size),
    }
    return files, totals


#: columns the stages' summaries never read: text, and the wide arrays (KD labels, embeddings)
NOT_SUMMARIZED = {"messages", "meta", "origin", "raw", "kd_prompt_token_ids", *TOPK_COLUMNS}


def _narrow(folder: Path, skip: set[str]) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    names = [n for n in pq.read_schema(files[0]).names if n not in skip] if files else []
    return pq.read_table(files, columns=names) if files else pa.table({})


def summary_tables(out: Path) -> tuple[pa.Table, pa.Table]:
    """(the output rows, the rejected rows) as the stages' summaries read them: every column but
    the text and the wide arrays (:data:`NOT_SUMMARIZED`), read from the written output."""
    data = _narrow(out / "data", NOT_SUMMARIZED)
    attributes = _narrow(out / "attributes", NOT_SUMMARIZED | {"row_id"})
    for name in attributes.column_names:
        data = data.append_column(name, attributes[name])
    return data, _narrow(out / "rejected", NOT_SUMMARIZED)
