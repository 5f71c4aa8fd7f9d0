"""The Prefect flows: shard the corpus, run the configured stages on Dask, write the output.

Orchestration only; the work itself is in :mod:`thresher.flows.pipeline`.

- :func:`execute` runs a validated :class:`PipelineConfig` (the CLI calls it).
- :func:`curate` is the deployable flow: it takes a config path plus overrides
  (inputs, output, Dask address, workers) as parameters.

Tasks run through ``prefect_dask.DaskTaskRunner``: a local cluster of
``execution.workers`` processes by default, or the existing scheduler at
``execution.dask_address``. A stage's ``resources`` (e.g. ``{GPU: 1}``) are given
to Dask with ``dask.annotate`` so its tasks land only on workers that have them.
Prefect's own result caching is off (``NO_CACHE``): resume comes from the
content-addressed store, which, unlike Prefect's default policy, does not
depend on the run id.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import dask
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner
from tqdm.auto import tqdm

from thresher.flows import pipeline
from thresher.flows.ingest import ingest_file
from thresher.flows.ingest_split import ingest_range, join_ranges, plan_ingest, ranges_per_file
from thresher.flows.sharding import make_shards
from thresher.flows.artifacts import publish_artifacts
from thresher.flows.manifest import build_manifest
from thresher.flows.preflight import preflight
from thresher.flows.model_lifecycle import (
    model_events_everywhere, model_keys, release_models_everywhere, stage_models,
)
from thresher.flows.registry import build_stage, load_config, parse_config, source_entries, stage_class
from thresher.flows.output_parts import finish_output, summary_tables, write_ingest_rejected, write_shard_parts
from thresher.flows.threads import task_threads
from thresher.generators.registry import MEMORY_BUDGET_ENV
from thresher.schemas.config import ExecutionConfig, PipelineConfig, StageEntry
from thresher.schemas.readers import discover_inputs
from thresher.schemas.secrets import install_log_redaction, register_secret_env
from thresher.schemas.report import render_report
from thresher.schemas.writers import new_staging, write_json_atomic, write_text_atomic


@task(name="ingest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ingest_task(path: str, ingest, store_root: str) -> dict[str, Any]:
    return ingest_file(path, ingest, store_root)


@task(name="ingest-plan", cache_policy=NO_CACHE)
def ingest_plan_task(paths: list[str], ingest, slots: int, store_root: str) -> list[dict[str, Any]]:
    return plan_ingest(paths, ingest, slots, store_root)


@task(name="ingest-range", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ingest_range_task(path: str, start: int, end: int, fmt: str | None, file_key: str, ingest,
                      store_root: str) -> dict[str, Any]:
    return ingest_range(path, start, end, fmt, file_key, ingest, store_root)


@task(name="ingest-join", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ingest_join_task(path: str, ranges: list[dict], file_key: str, ingest, store_root: str) -> dict[str, Any]:
    return join_ranges(path, ranges, file_key, ingest, store_root)


def ingest_inputs(paths: list[str], config: PipelineConfig, slots: int, store_root: str,
                  show_progress: bool | str) -> list[dict[str, Any]]:
    """Every input file's ingest result: one task per file, or, when the files are fewer than the
    worker threads, a task per byte range of a large JSONL file and one joining them
    (:mod:`thresher.flows.ingest_split`)."""
    if not paths:
        return []
    files = [Path(p) for p in paths]
    parts = ranges_per_file([f.stat().st_size if f.is_file() else 0 for f in files],
                            [f.suffix.lower() for f in files], slots, config.ingest.split_min_bytes)
    plans = ingest_plan_task.submit(paths, config.ingest, slots, store_root).result() if max(parts) > 1 \
        else [{"path": p} for p in paths]  # no file to split: nothing to plan
    futures = []
    for plan in plans:
        if "ranges" in plan:
            futures += [ingest_range_task.submit(plan["path"], start, end, fmt, plan["key"], config.ingest, store_root)
                        for start, end, fmt in plan["ranges"]]
        else:
            futures.append(ingest_task.submit(plan["path"], config.ingest, store_root))
    results = iter(_progress(futures, "ingest", show_progress))
    done, joins = [], []
    for plan in plans:
        if "ranges" in plan:
            ranges = [next(results) for _ in plan["ranges"]]
            joins.append(ingest_join_task.submit(plan["path"], ranges, plan["key"], config.ingest, store_root))
        else:
            done.append(next(results))
    return done + (_progress(joins, "ingest (joining ranges)", show_progress) if joins else [])


#: what :func:`write_ingest_rejected` returns when reading and sharding rejected nothing
NO_INGEST_REJECTED = {"files": [], "rejected_by_reason": {}, "rejected_by_stage": {}}

@task(name="shard", cache_policy=NO_CACHE)
def shard_task(ingested: list[dict], shard_rows: int, store_root: str, min_shards: int = 1,
               shard_bytes: int | None = None) -> dict[str, Any]:
    # one task plans and writes the shards: written in parallel (a task each, every task reading the
    # row groups its rows span) they took 26 s for 1M rows where one task takes about 15 (bench/scale.py)
    return make_shards(ingested, shard_rows, store_root, min_shards, shard_bytes=shard_bytes)


@task(name="source", cache_policy=NO_CACHE, retry_delay_seconds=1)
def source_task(entry: StageEntry, task_spec: dict, store_root: str, threads: int | None = None) -> dict[str, Any]:
    return pipeline.run_source_task(entry, task_spec, store_root, threads)


@task(name="stage-on-shard", cache_policy=NO_CACHE, retry_delay_seconds=1)
def shard_stage_task(entry: StageEntry, state: dict, store_root: str, threads: int | None = None) -> dict[str, Any]:
    return pipeline.run_shard_stage(entry, state, store_root, threads)


@task(name="stage-global", cache_policy=NO_CACHE, retry_delay_seconds=1)
def global_stage_task(entry: StageEntry, states: list[dict], store_root: str, map_keys: list[str] | None = None,
                      threads: int | None = None) -> list[dict]:
    return pipeline.run_global_stage(entry, states, store_root, threads, map_keys)


@task(name="stage-global-map", cache_policy=NO_CACHE, retry_delay_seconds=1)
def shard_map_task(entry: StageEntry, state: dict, store_root: str, threads: int | None = None) -> str:
    return pipeline.run_shard_map(entry, state, store_root, threads)


@task(name="write-shard-output", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def shard_output_task(state: dict, store_root: str, staging: str, rows_per_file: int,
                      intermediate: list[str]) -> dict[str, Any]:
    return write_shard_parts(state, store_root, staging, rows_per_file, intermediate)


@task(name="write-ingest-rejected", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def ingest_rejected_task(ingested: list[dict], sharding: dict, store_root: str, staging: str,
                         rows_per_file: int) -> dict[str, Any]:
    return write_ingest_rejected(ingested, sharding, store_root, staging, rows_per_file)


@task(name="worker-slots", cache_policy=NO_CACHE)
def worker_slots_task() -> int:
    """Task threads across the cluster's workers (how many tasks run at once)."""
    from distributed import get_client

    return sum(get_client().nthreads().values()) or 1


@task(name="release-models", cache_policy=NO_CACHE)
def release_models_task(keep: list[str]) -> dict[str, list[str]]:
    return release_models_everywhere(keep)


@task(name="model-events", cache_policy=NO_CACHE)
def model_events_task() -> list[dict]:
    return model_events_everywhere()


def _near(state: dict | None):
    """Run a shard's task where its last view was made, when that worker is still there
    (:mod:`thresher.flows.view_cache`); any worker may take it otherwise."""
    worker = state.get("worker") if isinstance(state, dict) else None
    return dask.annotate(workers=[worker], allow_other_workers=True) if worker else contextlib.nullcontext()


def _submit(task_fn, entry: StageEntry, *args, threads: int | None = None):
    task_fn = task_fn.with_options(name=f"{entry.stage}", retries=entry.params.retries)
    resources = dask.annotate(resources=dict(entry.params.resources)) if entry.params.resources \
        else contextlib.nullcontext()
    with resources, _near(args[0] if args else None):
        return task_fn.submit(entry, *args, threads=threads)


def worker_slots(config: PipelineConfig) -> int:
    """How many tasks run at once: the local cluster's worker threads, or (asked in a task) an existing cluster's."""
    if config.execution.dask_address:
        return worker_slots_task.submit().result()
    return config.execution.workers * config.execution.threads_per_worker


#: a global stage that only declares the columns it reads gets them narrowed shard by shard on the
#: workers from this many rows on; below, its one task narrows them itself (a task per shard costs
#: more than it saves there). The stage gets the same table either way.
NARROW_ON_WORKERS_ROWS = 100_000


def rows_now(state: dict) -> int:
    """A shard's rows after its last stage (its rows at sharding before any)."""
    run = state.get("run")
    if not isinstance(run, dict):
        return int(state.get("rows") or 0)
    return int(run["in"] + run.get("created", 0) - run["rejected"] - run.get("replaced", 0))


def stage_threads(config: PipelineConfig, entry: StageEntry, tasks: int, slots: int) -> int | None:
    """Torch threads for each of a stage's ``tasks`` tasks: this machine's cores shared among the
    tasks that run at once (local clusters with ``fill_cores``, model stages whose models set no
    ``threads`` of their own); None leaves the worker's own setting."""
    execution = config.execution
    models = stage_models(entry)
    if (not execution.fill_cores or execution.dask_address or execution.cpu_threads_per_worker
            or not models or any(m.threads for m in models)):
        return None
    return task_threads(tasks, slots, os.cpu_count() or 1)


#: seconds between two progress lines of one stage (``progress: lines``)
PROGRESS_EVERY = 5.0


def _say(line: str) -> None:
    """A progress line on stdout (not ``print``: the flow's ``log_prints`` would turn it into a log
    record, which the CLI keeps quiet)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _rows_of(result: Any) -> int:
    """Rows a finished task handled, when its result says (ingest, shard and source tasks)."""
    if isinstance(result, dict) and "records" in result and "rejected" in result and "run" not in result:
        return int(result["records"] + result["rejected"]) if not result.get("cached") else 0
    run = result.get("run") if isinstance(result, dict) else None
    return int(run.get("in", 0) + run.get("created", 0)) if isinstance(run, dict) else 0


def _progress(futures: list, label: str, show: bool | str) -> list:
    """Wait for futures in order and return their results, showing progress: a bar (``True``,
    ``"bars"``: a terminal), a line every :data:`PROGRESS_EVERY` seconds with tasks done, rows/s
    and the time left (``"lines"``: logs, CI, Prefect workers, nohup), or nothing."""
    results: list = []
    started = last = time.perf_counter()
    if show == "lines":
        for future in futures:
            results.append(future.result())
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY or len(results) == len(futures):
                done, seconds = len(results), now - started
                rows = sum(_rows_of(r) for r in results)
                left = seconds / done * (len(futures) - done)
                _say(f"thresher: {label}: {done}/{len(futures)} tasks" + (f", {rows / seconds:,.0f} rows/s" if rows
                     and seconds > 0 else "") + (f", about {left:.0f} s left" if done < len(futures) else
                     f", done in {seconds:.1f} s"))
                last = now
        return results
    with tqdm(total=len(futures), desc=label, unit="task", disable=show is not True and show != "bars",
              leave=False) as bar:
        for future in futures:
            results.append(future.result())
            bar.update(1)
    return results


def _announce(config: PipelineConfig) -> None:
    """Where to watch the run: Prefect's run page and the Dask dashboard, when they have one."""
    try:
        from prefect.runtime import flow_run

        url = flow_run.ui_url
        if url and url.startswith("http"):  # a temporary local server has no UI to link to
            _say(f"thresher: Prefect run: {url}")
    except Exception:  # noqa: BLE001 - a missing URL must not stop a run
        pass
    try:
        from distributed import get_client

        link = get_client().dashboard_link
        if link and config.execution.dask_address:  # local clusters run without a dashboard
            _say(f"thresher: Dask dashboard: {link}")
    except Exception:  # noqa: BLE001
        pass


def store_root_of(config: PipelineConfig) -> str:
    return str(Path(config.cache_dir) if config.cache_dir else Path(config.out) / ".thresher")


@flow(name="thresher-pipeline", log_prints=True, validate_parameters=False)
def pipeline_flow(config_data: dict, show_progress: bool | str = True) -> dict[str, Any]:
    """Ingest -> shard -> stages -> output, over Dask. Returns the run's manifest."""
    started = time.perf_counter()
    config = parse_config(config_data)
    if show_progress:
        _announce(config)
    store_root = store_root_of(config)
    paths = [str(p) for p in discover_inputs(config.inputs)] if config.inputs else []

    slots = worker_slots(config)
    ingested = ingest_inputs(paths, config, slots if config.execution.fill_cores else 1, store_root, show_progress)
    min_shards = slots if config.execution.fill_cores else 1
    sharding = shard_task.submit(ingested, config.shard_rows, store_root, min_shards,
                                 shard_bytes=config.shard_bytes).result()
    states = sharding["shards"]

    stage_runs: list[list[dict]] = []
    for position, entry in enumerate(config.stages):
        kind = stage_class(entry.stage).kind
        if kind == "source":  # each task's rows start a shard of their own
            tasks = pipeline.source_tasks(entry)
            threads = stage_threads(config, entry, len(tasks), slots)
            futures = [_submit(source_task, entry, t, store_root, threads=threads) for t in tasks]
            made = _progress(futures, entry.stage, show_progress)
            stage_runs.append([s["run"] for s in made])
            states = [*states, *({**s, "index": len(states) + i} for i, s in enumerate(made))]
        elif kind == "global":
            map_keys = None
            stage = build_stage(entry)
            if stage.maps_shards or (stage.reads is not None and sum(map(rows_now, states)) >= NARROW_ON_WORKERS_ROWS):
                # its per-shard step (or the narrowing to the columns it reads) runs on every shard first
                threads = stage_threads(config, entry, len(states), slots)
                map_keys = _progress([_submit(shard_map_task, entry, s, store_root, threads=threads) for s in states],
                                     f"{entry.stage} (per shard)", show_progress)
            threads = stage_threads(config, entry, 1, slots)
            states = _progress([_submit(global_stage_task, entry, states, store_root, map_keys, threads=threads)],
                               entry.stage, show_progress)[0]
        else:
            threads = stage_threads(config, entry, len(states), slots)
            futures = [_submit(shard_stage_task, entry, s, store_root, threads=threads) for s in states]
            states = _progress(futures, entry.stage, show_progress)
        if kind != "source":
            stage_runs.append([s["run"] for s in states])
        if stage_models(entry):  # the stage is over: its models leave the workers
            following = config.stages[position + 1] if position + 1 < len(config.stages) else None
            release_models_task.submit(model_keys(following)).result()
    uses_models = any(stage_models(entry) for entry in config.stages)
    model_events = model_events_task.submit().result() if uses_models else []

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = new_staging(out)  # every part is written here, by the worker holding its shard, then swapped in
    rows_per_file = config.output.rows_per_file
    hidden = sorted({c for e in config.stages for c in stage_class(e.stage).intermediate} - set(config.output.keep_columns))
    ingest_part = ingest_rejected_task.submit(ingested, sharding, store_root, str(staging), rows_per_file) \
        if sum(i["rejected"] for i in ingested) + sharding.get("rejected", 0) else None  # none: no task
    parts = []
    for state in states:
        with _near(state):
            parts.append(shard_output_task.submit(state, store_root, str(staging), rows_per_file, hidden))
    parts = _progress(parts, "output", show_progress)
    files, totals = finish_output(out, staging, parts, ingest_part.result() if ingest_part else NO_INGEST_REJECTED,
                                  rows_per_file)
    kept, rejected = summary_tables(out)
    manifest = build_manifest(config, ingested, sharding, stage_runs, totals, kept, rejected, files,
                              seconds=time.perf_counter() - started)
    del kept, rejected
    manifest["model_lifecycle"] = model_events
    write_json_atomic(out / "manifest.json", manifest)
    report = render_report(manifest, out, figures=report_figures(config))
    write_text_atomic(out / "report.md", report)
    publish_artifacts(manifest, report)  # the run page in Prefect's UI shows the funnel
    return manifest


def report_figures(config: PipelineConfig) -> bool:
    """Whether report.md gets its PNG figures: ``output.figures``, unless ``THRESHER_REPORT_FIGURES=0``."""
    return config.output.figures and os.environ.get("THRESHER_REPORT_FIGURES", "1") != "0"


def local_worker_resources(config: PipelineConfig) -> dict[str, float]:
    """What the local cluster's workers offer: the most any stage asks for (e.g. ``{GPU: 1}``).

    On an existing cluster, workers declare their own resources (``dask worker --resources``);
    a local cluster is this machine, so it offers what the stages need rather than hang.
    """
    offered: dict[str, float] = {}
    for entry in config.stages:
        for name, amount in entry.params.resources.items():
            offered[name] = max(offered.get(name, 0), amount)
    return offered


def local_cpu_threads(execution: ExecutionConfig) -> int:
    """CPU threads per local worker: the configured number, else the cores shared among the workers."""
    if execution.cpu_threads_per_worker:
        return execution.cpu_threads_per_worker
    return max(1, (os.cpu_count() or 1) // execution.workers)


def cpu_thread_env(threads: int) -> dict[str, str]:
    """Worker environment for ``threads`` CPU threads (Dask's nanny sets 1 unless told otherwise)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def shared_prefect_api() -> str | None:
    """The Prefect API that local workers report task runs to.

    The configured ``PREFECT_API_URL`` when there is one; else this process's
    ephemeral server, started now (the flow run reuses it). Without this, every
    Dask worker process would start an ephemeral server of its own: seconds per
    worker, and a run that fails when one is slow to start on a busy machine.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # one per process: the instance the flow's client gets
    server.start()
    return server.api_url


def make_task_runner(config: PipelineConfig) -> DaskTaskRunner:
    """A DaskTaskRunner on the given scheduler, or on a new local cluster of worker processes."""
    execution = config.execution
    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    cluster_kwargs = {
        "n_workers": execution.workers,
        "threads_per_worker": execution.threads_per_worker,
        "processes": True,
        "dashboard_address": None,
        "env": cpu_thread_env(local_cpu_threads(execution)),
    }
    if execution.model_memory_gb:
        cluster_kwargs["env"][MEMORY_BUDGET_ENV] = str(execution.model_memory_gb)
    api = shared_prefect_api()
    if api:
        cluster_kwargs["env"]["PREFECT_API_URL"] = api
    resources = local_worker_resources(config)
    if resources:
        cluster_kwargs["resources"] = resources
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def apply_overrides(
    config: PipelineConfig,
    inputs: list[str] | None = None,
    out: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> PipelineConfig:
    """Command-line / deployment overrides: ``inputs`` replaces the config's inputs."""
    config = config.model_copy(deep=True)
    if inputs:
        config.inputs = [str(Path(p).expanduser().resolve()) for p in inputs]
    if out:
        config.out = str(Path(out).expanduser().resolve())
    if dask_address:
        config.execution.dask_address = dask_address
    if workers:
        config.execution.workers = workers
    if not config.inputs and not source_entries(config):
        raise ValueError("no inputs: give them in the config ('inputs:') or with --input, "
                         "or begin the stages with a source stage (e.g. magpie)")
    if not config.out:
        raise ValueError("no output folder: give it in the config ('out:') or with --out")
    return config


def execute(config: PipelineConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run a validated config to completion; returns the manifest."""
    preflight(config)  # inputs that match nothing, an output that is a file: one line, before any work
    register_secret_env(m.api_key_env for e in config.stages for m in stage_models(e))  # their values are redacted here too
    install_log_redaction()
    runner = make_task_runner(config)
    run = pipeline_flow.with_options(task_runner=runner, flow_run_name=f"{config.name}")
    return run(config.to_dict(), show_progress=show_progress)


@flow(name="thresher-curate", validate_parameters=True)
def curate(
    config_path: str,
    inputs: list[str] | None = None,
    out: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Deployable entry point: run the pipeline in ``config_path`` with optional overrides."""
    config = apply_overrides(load_config(config_path), inputs, out, dask_address, workers)
    manifest = execute(config, show_progress=False)
    return {"out": config.out, "counts": manifest["counts"]}
