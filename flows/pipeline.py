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

from thresher.flows import view_cache
from thresher.flows.registry import build_stage
from thresher.flows.store import Store, digest
from thresher.flows.threads import cpu_threads
from thresher.schemas.config import StageEntry
from thresher.schemas.records import RECORD_SCHEMA, conform, records_table


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
    """The shard's surviving rows (read and created) with every attribute written so far.

    Starts from the deepest view this worker process still holds for the shard
    (:mod:`thresher.flows.view_cache`), else from its base rows, applies the layers after
    it, and keeps the result for the shard's next stage.
    """
    layers = state["layers"]
    keys = _view_keys(state)
    depth, rows = view_cache.deepest(keys) if keys else (0, None)
    if rows is None:
        rows = base_rows(state, store)
    owned = state.get("global_layers", {})  # a global layer's key -> whether this shard is the last
    for stage, key in layers[depth:]:
        unplaced = "all" if key not in owned else "parentless" if owned[key] else "none"
        rows = apply_layer(rows, _layer_tables(stage, key, store), unplaced)
    if keys and depth < len(keys):
        view_cache.remember(shard_name(state), keys[-1], rows)
    return rows


def shard_name(state: dict[str, Any]) -> str:
    """What names a shard across its stages: its index and where it began (its base rows or source task)."""
    return f"{state['index']}:{state['base'] or state['layers'][0][1]}"


def _view_keys(state: dict[str, Any]) -> list[str] | None:
    """The lineage key after each of the state's layers (None for a state from before they were kept)."""
    keys = list(state.get("keys") or ())
    return keys if len(keys) == len(state["layers"]) else None


def _extend(state: dict[str, Any], stage: str, layer: str, key: str, **more: Any) -> dict[str, Any]:
    """``state`` after one more layer: its new lineage key, the layer, and the key it ends at."""
    keys = _view_keys(state)
    return {**state, "key": key, "layers": [*state["layers"], [stage, layer]],
            "keys": [*keys, key] if keys is not None else None, **more}


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
    return {"index": task["index"], "key": key, "base": None, "layers": [[stage.name, key]], "keys": [key],
            "rows": out, "run": run, "worker": _worker_address()}


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
    after = _extend(state, stage.name, key, key, run=run, worker=_worker_address())
    shard_view(after, store)  # one layer onto the view just used: the shard's next stage starts from it here
    return after


def narrowed(stage, rows: pa.Table) -> pa.Table:
    """``row_id`` and the columns ``stage`` declares it reads (all of ``rows`` when it declares none);
    a declared column the rows lack is left to the stage to report."""
    if stage.reads is None:
        return rows
    return rows.select(["row_id", *dict.fromkeys(c for c in stage.reads if c in rows.column_names and c != "row_id")])


def _map_name(stage) -> str:
    return f"{stage.name}.map"


def run_shard_map(entry: StageEntry, state: dict[str, Any], store_root: str, threads: int | None = None) -> str:
    """A global stage's per-shard step on one shard (or its finished result); returns its key.

    The step is the stage's :meth:`~thresher.flows.stage.Stage.map_shard` (``maps_shards``), or
    else the columns it declares it reads (``reads``): either way the global task gets narrow tables,
    made on the workers that hold the shards' views."""
    store = Store(store_root)
    stage = build_stage(entry)
    key = _layer_key(state["key"], {**stage.identity(), "step": "map"})
    if not store.is_done(_map_name(stage), key):
        rows = shard_view(state, store)
        stage.check_columns(rows)
        started = time.perf_counter()
        with cpu_threads(threads):
            table = stage.map_shard(rows) if stage.maps_shards else narrowed(stage, rows)
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
        rows = pa.concat_tables(maps, promote_options="default") if maps else pa.table({"row_id": pa.array([], pa.string())})
        run = _run_stage(stage, rows, store, key, threads=threads, check=False)
        # the per-shard steps' task seconds, counted with the stage's in the manifest
        run["map_seconds"] = round(sum(store.read_info(_map_name(stage), k)["seconds"] for k in map_keys), 3)
    else:
        # only the columns the stage declares, shard by shard: the corpus it holds stays narrow
        views = [narrowed(stage, shard_view(s, store)) for s in states]
        rows = pa.concat_tables(views, promote_options="default") if views else narrowed(stage, records_table([]))
        run = _run_stage(stage, rows, store, key, threads=threads)
    return [_extend(s, stage.name, key, digest([s["key"], key]), run=run,
                    global_layers={**s.get("global_layers", {}), key: i == len(states) - 1})
            for i, s in enumerate(states)]
