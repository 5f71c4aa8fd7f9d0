"""The pipeline's units of work, as plain functions over the content-addressed store.

Prefect tasks (:mod:`thresher.flows.curate`) call these; they hold no
orchestration. Every function first looks its key up in the store and returns
the finished result when it is there, so a re-run recomputes nothing and a
killed run resumes.

A shard's state is a small JSON-able dict::

    {"index": 3, "key": "<lineage digest>", "base": "<shard key>",
     "layers": [["validate", "<key>"], ["exact_dedup", "<key>"], ...]}

Its rows at any point are the base shard minus every layer's rejected rows,
joined with every layer's attribute columns (:func:`shard_view`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from thresher.flows.registry import build_stage
from thresher.flows.sharding import SHARDING_STAGE, _raw
from thresher.flows.stage import conform_rejected
from thresher.flows.store import Store, digest
from thresher.flows.threads import cpu_threads
from thresher.schemas.config import StageEntry
from thresher.schemas.readers import INGEST_STAGE
from thresher.schemas.records import (
    RECORD_SCHEMA, REJECTED_SCHEMA, REJECTION_FIELDS, conform, records_table, rejected_table,
)


# --------------------------------------------------------------------------- views


def _join_attributes(rows: pa.Table, attributes: pa.Table) -> pa.Table:
    """Left-join attribute columns onto rows by ``row_id`` (list columns supported)."""
    positions = pc.index_in(rows["row_id"], value_set=attributes["row_id"])
    for name in attributes.column_names:
        if name == "row_id":
            continue
        column = attributes[name].take(positions)
        if name in rows.column_names:
            rows = rows.set_column(rows.column_names.index(name), name, column)
        else:
            rows = rows.append_column(name, column)
    return rows


def base_rows(state: dict[str, Any], store: Store) -> pa.Table:
    """The rows a shard started from: read from the inputs, or none (a source stage's shard)."""
    if state["base"] is None:
        return records_table([])
    return conform(store.read_table("shards", state["base"], "records"), RECORD_SCHEMA)


def _layer_tables(stage: str, key: str, store: Store) -> dict[str, pa.Table | None]:
    return {name: store.read_table(stage, key, name) for name in ("rejected", "replaced", "created", "attributes")}


def _ids(table: pa.Table | None) -> set[str]:
    return set(table["row_id"].to_pylist()) if table is not None and table.num_rows else set()


def apply_layer(rows: pa.Table, layer: dict[str, pa.Table | None],
                unplaced: Literal["all", "parentless", "none"] = "all") -> pa.Table:
    """``rows`` after one stage: its created rows in, its rejected and replaced rows out, its attributes on.

    A created row takes its parent's place (right after the parent when the parent
    stays). The others go last, in the order made: ``all`` of them for a per-shard
    stage; a global stage's rows belong to the shard of their parent, so a shard takes
    only those made from nothing (``parentless``, the last shard) or ``none``.
    """
    created = layer["created"]
    if created is not None and created.num_rows:
        created = conform(created, RECORD_SCHEMA)
        row_ids = rows["row_id"].to_pylist()
        present = set(row_ids)
        children: dict[str | None, list[int]] = {}
        for j, parent in enumerate(created["parent_row_id"].to_pylist()):
            if parent in present:
                children.setdefault(parent, []).append(j)
            elif unplaced == "all" or (unplaced == "parentless" and parent is None):
                children.setdefault(None, []).append(j)
        order = []
        for i, rid in enumerate(row_ids):
            order.append(i)
            order.extend(len(row_ids) + j for j in children.get(rid, ()))
        order.extend(len(row_ids) + j for j in children.get(None, ()))
        rows = pa.concat_tables([rows, created], promote_options="default").take(pa.array(order, pa.int64()))
    gone = _ids(layer["rejected"]) | _ids(layer["replaced"])
    if gone:
        rows = rows.filter(pc.invert(pc.is_in(rows["row_id"], value_set=pa.array(sorted(gone), pa.string()))))
    if layer["attributes"] is not None:
        rows = _join_attributes(rows, layer["attributes"])
    return rows


def shard_view(state: dict[str, Any], store: Store) -> pa.Table:
    """The shard's surviving rows (read and created) with every attribute written so far."""
    rows = base_rows(state, store)
    owned = state.get("global_layers", {})  # a global layer's key -> whether this shard is the last
    for stage, key in state["layers"]:
        unplaced = "all" if key not in owned else "parentless" if owned[key] else "none"
        rows = apply_layer(rows, _layer_tables(stage, key, store), unplaced)
    return rows


def _layer_key(previous: str, identity: dict[str, Any]) -> str:
    return digest({"input": previous, "stage": identity})


def _worker_address() -> str | None:
    """The Dask worker running this task (recorded so placement can be checked), if any."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _run_stage(stage, rows: pa.Table | None, store: Store, key: str, task=None,
               threads: int | None = None, check: bool = True) -> dict[str, Any]:
    """Run ``stage`` on ``rows`` (a source stage: make ``task``'s rows) and store the result under ``key``."""
    if store.is_done(stage.name, key):
        return {**store.read_info(stage.name, key), "cached": True}
    if rows is not None and check:
        stage.check_columns(rows)
    started = time.perf_counter()
    from thresher.generators.registry import model_scope

    with model_scope(), cpu_threads(threads):  # the stage's models stay loaded while this task runs
        output = stage.process(rows) if rows is not None else stage.create(task)
    return _store_output(stage, key, output, rows.num_rows if rows is not None else 0, started, store,
                         columns=rows.column_names if rows is not None else [])


def _store_output(stage, key: str, output, n_in: int, started: float, store: Store,
                  columns: list[str] | None = None) -> dict[str, Any]:
    info = {
        "columns": columns or [],
        "stage": stage.name, "key": key, "in": n_in, "rejected": len(output.rejected),
        "created": len(output.created), "replaced": len(output.replaced),
        "seconds": round(time.perf_counter() - started, 3), "worker": _worker_address(),
        "pid": os.getpid(),
    }
    tables = {"attributes": output.attributes, "rejected": output.rejected_table()}
    if output.created:
        tables["created"] = output.created_table()
    if output.replaced:
        tables["replaced"] = output.replaced_table()
    store.write(stage.name, key, tables, info)
    return {**info, "cached": False}


def source_tasks(entry: StageEntry) -> list[dict[str, Any]]:
    """The tasks of a source stage, as plain dicts (they travel to Dask workers)."""
    return [vars(t) for t in build_stage(entry).tasks()]


def run_source_task(entry: StageEntry, task: dict[str, Any], store_root: str,
                    threads: int | None = None) -> dict[str, Any]:
    """Make one source task's rows (or reuse them); they start a shard of their own."""
    from thresher.flows.stage import SourceTask

    store = Store(store_root)
    stage = build_stage(entry)
    source_task = SourceTask(**task)
    key = digest({"source": stage.task_identity(source_task)})
    if store.is_done(stage.name, key):
        run = {**store.read_info(stage.name, key), "cached": True}
    else:
        run = _run_stage(stage, None, store, key, task=source_task, threads=threads)
    out = run["created"] - run["rejected"]
    return {"index": task["index"], "key": key, "base": None, "layers": [[stage.name, key]], "rows": out, "run": run}


def run_shard_stage(entry: StageEntry, state: dict[str, Any], store_root: str,
                    threads: int | None = None) -> dict[str, Any]:
    """Run a per-shard stage on one shard (or reuse its finished result)."""
    store = Store(store_root)
    stage = build_stage(entry)
    key = _layer_key(state["key"], stage.identity())
    if store.is_done(stage.name, key):
        run = {**store.read_info(stage.name, key), "cached": True}
    else:
        run = _run_stage(stage, shard_view(state, store), store, key, threads=threads)
    return {**state, "key": key, "layers": [*state["layers"], [stage.name, key]], "run": run}


def _map_name(stage) -> str:
    return f"{stage.name}.map"


def run_shard_map(entry: StageEntry, state: dict[str, Any], store_root: str, threads: int | None = None) -> str:
    """A global stage's per-shard step on one shard (or its finished result); returns its key."""
    store = Store(store_root)
    stage = build_stage(entry)
    key = _layer_key(state["key"], {**stage.identity(), "step": "map"})
    if not store.is_done(_map_name(stage), key):
        rows = shard_view(state, store)
        stage.check_columns(rows)
        started = time.perf_counter()
        with cpu_threads(threads):
            table = stage.map_shard(rows)
        if table.num_rows != rows.num_rows:
            raise ValueError(f"stage '{stage.name}': its per-shard step gave {table.num_rows} rows for {rows.num_rows}")
        store.write(_map_name(stage), key, {"map": table},
                    {"rows": rows.num_rows, "seconds": round(time.perf_counter() - started, 3)})
    return key


def run_global_stage(entry: StageEntry, states: list[dict[str, Any]], store_root: str,
                     threads: int | None = None, map_keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Run a global stage over all shards at once (or reuse its finished result). With ``map_keys``
    (a stage that maps shards), it reads the per-shard steps' tables instead of the rows."""
    store = Store(store_root)
    stage = build_stage(entry)
    key = _layer_key(digest([s["key"] for s in states]), stage.identity())
    if store.is_done(stage.name, key):
        run = {**store.read_info(stage.name, key), "cached": True}
    elif map_keys is not None:
        maps = [store.read_table(_map_name(stage), k, "map") for k in map_keys]
        rows = pa.concat_tables(maps) if maps else pa.table({"row_id": pa.array([], pa.string())})
        run = _run_stage(stage, rows, store, key, threads=threads, check=False)
    else:
        # only the columns the stage declares, shard by shard: the corpus it holds stays narrow
        narrow = (lambda t: t) if stage.reads is None else (lambda t: t.select(["row_id", *stage.reads]))
        views = [narrow(shard_view(s, store)) for s in states]
        rows = pa.concat_tables(views, promote_options="default") if views else narrow(records_table([]))
        run = _run_stage(stage, rows, store, key, threads=threads)
    return [
        {**s, "key": digest([s["key"], key]), "layers": [*s["layers"], [stage.name, key]], "run": run,
         "global_layers": {**s.get("global_layers", {}), key: i == len(states) - 1}}
        for i, s in enumerate(states)
    ]


# --------------------------------------------------------------------------- collecting results


def _layers(states: list[dict]) -> list[tuple[str, str]]:
    """Every (stage, key) layer of the run, once each, in the order first met."""
    return list(dict.fromkeys((stage, key) for state in states for stage, key in state["layers"]))


def all_rows(states: list[dict], store: Store) -> pa.Table:
    """Every row the run had at some point: the shards' base rows and every stage's created rows."""
    parts = [base_rows(s, store) for s in states if s["base"] is not None]
    for stage, key in _layers(states):
        created = store.read_table(stage, key, "created")
        if created is not None and created.num_rows:
            parts.append(conform(created, RECORD_SCHEMA))
    return pa.concat_tables(parts) if parts else records_table([])


def _rows_named(corpus: pa.Table, ids: pa.Table) -> pa.Table:
    """The rows of ``corpus`` whose ``row_id`` ``ids`` lists, in that order."""
    return corpus.take(pc.index_in(ids["row_id"], value_set=corpus["row_id"]))


def collect_rejected(ingested: list[dict], sharding: dict, states: list[dict], store: Store,
                     corpus: pa.Table | None = None) -> pa.Table:
    """Every rejected row of the run: its source, row, stage, rejection columns and raw text.

    ``corpus``: :func:`all_rows` of the run, when the caller already has it."""
    parts = [store.read_table(INGEST_STAGE, i["key"], "rejected") for i in sorted(ingested, key=lambda x: x["path"])]
    if sharding.get("key"):
        parts.append(store.read_table(SHARDING_STAGE, sharding["key"], "rejected"))
    corpus = all_rows(states, store) if corpus is None else corpus
    for stage, key in _layers(states):
        table = store.read_table(stage, key, "rejected")
        if table is None or not table.num_rows:
            continue
        table = conform_rejected(table)
        base = _rows_named(corpus, table)
        parts.append(pa.table({
            "row_id": table["row_id"],
            "source": base["source"],
            "source_row": base["source_row"],
            "candidate": base["candidate"],
            "stage": pa.array([stage] * table.num_rows, pa.string()),
            **{f.name: table[f.name] for f in REJECTION_FIELDS},
            "raw": pa.array([_raw(m) for m in base["messages"].to_pylist()], pa.string()),
        }, schema=REJECTED_SCHEMA))
    parts = [conform(p, REJECTED_SCHEMA) for p in parts if p is not None]  # conform: results stored by older versions
    return pa.concat_tables(parts) if parts else rejected_table([])


def collect_replaced(states: list[dict], store: Store, corpus: pa.Table | None = None) -> pa.Table:
    """Every row a stage replaced with a row it created (the new row names it in ``parent_row_id``),
    as it was, with the replacing stage in ``replaced_by``. ``corpus``: as for :func:`collect_rejected`."""
    corpus = all_rows(states, store) if corpus is None else corpus
    parts = []
    for stage, key in _layers(states):
        table = store.read_table(stage, key, "replaced")
        if table is None or not table.num_rows:
            continue
        rows = _rows_named(corpus, table)
        parts.append(rows.append_column("replaced_by", pa.array([stage] * rows.num_rows, pa.string())))
    return pa.concat_tables(parts) if parts else replaced_table()


def replaced_table() -> pa.Table:
    return records_table([]).append_column("replaced_by", pa.array([], pa.string()))


def collect_output(states: list[dict], store: Store) -> pa.Table:
    """The surviving rows of every shard, in shard order, with all attributes."""
    views = [shard_view(s, store) for s in states]
    return pa.concat_tables(views, promote_options="default") if views else records_table([])
