"""When models leave the workers: the flow's side of the model lifecycle.

A model is loaded once per worker process by :func:`thresher.generators.registry.load_model`
and stays loaded while its stage's tasks run (every stage task runs inside
``registry.model_scope()``). When every task of a stage has finished, the flow
calls :func:`release_models_everywhere` with the models the *next* stage uses:
every worker releases the rest, so a GPU worker that ran ``grape`` and then
``deita_quality`` never holds both models, and ``clear`` followed by
``clear_correct`` on the same model does not reload it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from thresher.schemas.config import StageEntry
from thresher.schemas.model_config import ModelConfig


def stage_models(entry: StageEntry | None) -> list[ModelConfig]:
    """Every model a configured stage names (``model``, ``corrector``, ``similarity_model``...)."""
    if entry is None:
        return []
    found: list[ModelConfig] = []

    def walk(value: Any) -> None:
        if isinstance(value, ModelConfig):
            found.append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(entry.params)
    return found


def model_keys(entry: StageEntry | None) -> list[str]:
    """The registry's memo keys of the models a stage uses."""
    from thresher.generators.registry import memo_key

    return sorted({memo_key(cfg) for cfg in stage_models(entry)})


def _on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _release_here(keep: list[str]) -> list[str]:
    from thresher.generators.registry import release_models

    return release_models(keep)


def _events_here() -> list[dict[str, Any]]:
    from thresher.generators.registry import lifecycle_events

    return lifecycle_events()


def release_models_everywhere(keep: list[str]) -> dict[str, list[str]]:
    """Release, on every Dask worker (or in this process), the models not in ``keep``.

    Returns ``{worker: [released model names]}``.
    """
    if not _on_dask_worker():
        return {"local": _release_here(keep)}
    from distributed import get_client

    return get_client().run(_release_here, list(keep))


def model_events_everywhere() -> list[dict[str, Any]]:
    """Every model load and release on every worker, oldest first, each with its worker."""
    if not _on_dask_worker():
        per_worker = {"local": _events_here()}
    else:
        from distributed import get_client

        per_worker = get_client().run(_events_here)
    events = [{**e, "worker": worker} for worker, worker_events in per_worker.items() for e in worker_events]
    for event in events:
        event.pop("key", None)
    return sorted(events, key=lambda e: e["time"])
