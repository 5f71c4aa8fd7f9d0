"""Run the curate flow as a Prefect deployment: served from this process, on a schedule.

``thresher serve CONFIG --name nightly --cron "0 3 * * *"`` registers the
deployment ``thresher-curate/nightly`` with the Prefect API (``PREFECT_API_URL``)
and serves it: scheduled runs and ad-hoc ones
(``prefect deployment run 'thresher-curate/nightly' --param out=/data/x``)
execute in this process. For work pools and ``prefect deploy``, see
``prefect.yaml`` at the repository root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType

from thresher.flows.curate import curate


def deployment_parameters(
    config_path: str,
    inputs: list[str] | None = None,
    out: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The deployment's default parameters (each can be overridden per run)."""
    params: dict[str, Any] = {"config_path": str(Path(config_path).resolve())}
    if inputs:
        params["inputs"] = [str(Path(p).resolve()) for p in inputs]
    if out:
        params["out"] = str(Path(out).resolve())
    if dask_address:
        params["dask_address"] = dask_address
    if workers:
        params["workers"] = workers
    return params


def serve(
    config_path: str,
    name: str,
    cron: str | None = None,
    inputs: list[str] | None = None,
    out: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    limit: int | None = None,
) -> None:
    """Register ``thresher-curate/<name>`` and serve it until interrupted."""
    curate.serve(
        name=name,
        cron=cron,
        parameters=deployment_parameters(config_path, inputs, out, dask_address, workers),
        description=f"thresher pipeline {config_path}",
        tags=["thresher"],
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_llm2llm(config_path: str, name: str, cron: str | None = None, out: str | None = None,
                  limit: int | None = None) -> None:
    """Register ``thresher-llm2llm/<name>`` (the LLM2LLM loop in ``config_path``) and serve it until interrupted."""
    from thresher.flows.llm2llm import llm2llm

    parameters: dict[str, Any] = {"config_path": str(Path(config_path).resolve())}
    if out:
        parameters["out"] = str(Path(out).resolve())
    llm2llm.serve(name=name, cron=cron, parameters=parameters, description=f"thresher LLM2LLM loop {config_path}",
                  tags=["thresher", "llm2llm"], limit=limit, entrypoint_type=EntrypointType.MODULE_PATH)
