"""The model lifecycle: a model config -> a ready backend, loaded once per process, released when done.

Stages get their models only through :func:`load_model`. Per process (a Dask
worker, or the CLI's own process):

- **Loaded once.** The first call for a config loads the weights; later calls
  with the same config, from any task or thread, get the same object back. The
  memo key is the whole config (semantic fields and resource knobs). The
  request-cache wrapper is memoized separately, so ``cache=True`` and
  ``cache=False`` share one loaded model.
- **Kept while its stage runs.** The pipeline runs every stage task inside
  :func:`model_scope`; a model used inside a scope is *pinned* until the scope
  ends, so nothing evicts it under a running task, and the next task of the same
  stage finds it loaded.
- **Released when its stage is over.** When every task of a stage has finished,
  the flow calls :func:`release_models` on every worker, keeping only the models
  the next stage uses: a GPU worker that ran ``grape`` and then ``deita_quality``
  never holds both models.
- **Released when another needs its room.** With a memory budget
  (``THRESHER_MODEL_MEMORY_GB``, set on local workers from
  ``execution.model_memory_gb``), loading a model first releases the
  least-recently-used unpinned models until the measured footprints fit.
  A footprint is measured at load: the growth of the process's resident memory
  plus, on CUDA, of the memory torch reserved.

Releasing calls the backend's ``close()`` (weights, buffers, connections,
engines) and drops every reference the registry holds, so the object is
garbage-collected. Every load and release is recorded
(:func:`lifecycle_events`); the flow writes them into the manifest.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from thresher.generators.base import ModelBackend, ModelError
from thresher.generators.request_cache import CachedBackend, RequestCache
from thresher.schemas.model_config import ModelConfig

MEMORY_BUDGET_ENV = "THRESHER_MODEL_MEMORY_GB"

#: backend name -> (module, class); imported only when asked for
_CLASSES = {
    "hf": ("thresher.generators.hf", "HFBackend"),
    "openai": ("thresher.generators.openai_backend", "OpenAIBackend"),
    "vllm": ("thresher.generators.vllm_backend", "VLLMBackend"),
}


@dataclass
class _Loaded:
    """One loaded model and what the registry knows about it."""

    cfg: ModelConfig
    backend: ModelBackend
    footprint: int = 0  # bytes, measured at load
    last_used: float = field(default_factory=time.monotonic)
    cached: dict[str, CachedBackend] = field(default_factory=dict)  # cache path -> wrapper


_LOADED: "OrderedDict[str, _Loaded]" = OrderedDict()  # least recently used first
_KEY_LOCKS: dict[str, threading.Lock] = {}
_PINS: dict[str, int] = {}  # key -> number of open scopes that use it
_LOAD_COUNTS: dict[str, int] = {}
_EVENTS: list[dict[str, Any]] = []
_GLOBAL = threading.RLock()
_SCOPE = threading.local()


def memo_key(cfg: ModelConfig) -> str:
    """Canonical JSON of every config field: one loaded backend per distinct key."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def as_config(cfg: ModelConfig | str | dict) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)


def backend_class(cfg: ModelConfig) -> type[ModelBackend]:
    """The backend class ``cfg`` names, its module imported."""
    module_name, class_name = _CLASSES[cfg.backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"backend {cfg.backend!r} is unavailable: {exc}") from exc
    return getattr(module, class_name)


def build_backend(cfg: ModelConfig) -> ModelBackend:
    """Construct (load) a new backend for ``cfg``, without memoization or caching."""
    return backend_class(cfg)(cfg)


# --------------------------------------------------------------------------- memory


def memory_budget() -> int | None:
    """The per-process model memory budget in bytes (``THRESHER_MODEL_MEMORY_GB``), or None."""
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError as exc:
        raise ModelError(f"{MEMORY_BUDGET_ENV}={raw!r} is not a number of GB") from exc
    return int(gb * 2**30) if gb > 0 else None


def _memory_in_use() -> int:
    """Resident memory of this process plus CUDA memory torch reserved (if torch is in use)."""
    import psutil

    used = psutil.Process().memory_info().rss
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        used += sum(torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count()))
    return used


def _footprint_total() -> int:
    return sum(entry.footprint for entry in _LOADED.values())


# --------------------------------------------------------------------------- scopes


@contextlib.contextmanager
def model_scope() -> Iterator[None]:
    """Pin every model loaded or used in this block (one stage task) until it ends."""
    previous = getattr(_SCOPE, "keys", None)
    _SCOPE.keys = set()
    try:
        yield
    finally:
        keys, _SCOPE.keys = _SCOPE.keys, previous
        with _GLOBAL:
            for key in keys:
                _PINS[key] -= 1
                if _PINS[key] <= 0:
                    del _PINS[key]


def _pin(key: str) -> None:
    keys = getattr(_SCOPE, "keys", None)
    if keys is not None and key not in keys:
        keys.add(key)
        _PINS[key] = _PINS.get(key, 0) + 1


# --------------------------------------------------------------------------- load / release


def load_model(
    cfg: ModelConfig | str | dict,
    cache: bool = True,
    cache_path: str | Path | None = None,
) -> ModelBackend:
    """The backend for ``cfg``, loaded once per process and reused until released.

    ``cache=True`` wraps it in a :class:`CachedBackend` over the request cache
    at ``cache_path`` (default ``$THRESHER_CACHE_DIR/requests.sqlite``).
    """
    cfg = as_config(cfg)
    key = memo_key(cfg)
    with _GLOBAL:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
        _pin(key)  # pinned before loading: a concurrent load cannot evict it
    with lock:  # two threads asking for one model load it once
        with _GLOBAL:
            entry = _LOADED.get(key)
        if entry is None:
            entry = _load(key, cfg)
        with _GLOBAL:
            entry.last_used = time.monotonic()
            _LOADED.move_to_end(key)
            if not cache:
                return entry.backend
            ckey = str(Path(cache_path).expanduser().resolve()) if cache_path else ""
            wrapper = entry.cached.get(ckey)
            if wrapper is None:
                wrapper = entry.cached[ckey] = CachedBackend(entry.backend, RequestCache(cache_path))
            return wrapper


def _load(key: str, cfg: ModelConfig) -> _Loaded:
    budget = memory_budget()
    if budget is not None:
        _evict_for(budget, needed=_last_footprint(key), protect=key)
    cls = backend_class(cfg)  # libraries imported before measuring: the footprint is the model's
    before = _memory_in_use()
    started = time.perf_counter()
    backend = cls(cfg)
    entry = _Loaded(cfg, backend, footprint=max(0, _memory_in_use() - before))
    with _GLOBAL:
        _LOADED[key] = entry
        _LOAD_COUNTS[key] = _LOAD_COUNTS.get(key, 0) + 1
        _record("load", key, cfg, seconds=round(time.perf_counter() - started, 3), bytes=entry.footprint)
    if budget is not None:
        _evict_for(budget, needed=0, protect=key)
    return entry


def _last_footprint(key: str) -> int:
    """The footprint this model had when last loaded in this process (0 if never)."""
    for event in reversed(_EVENTS):
        if event["key"] == key and event["event"] == "load":
            return int(event["bytes"])
    return 0


def _evict_for(budget: int, needed: int, protect: str) -> None:
    """Release least-recently-used unpinned models (not ``protect``) until ``needed`` more bytes fit."""
    with _GLOBAL:
        victims = []
        total = _footprint_total()
        for key, entry in _LOADED.items():  # least recently used first
            if total + needed <= budget:
                break
            if _PINS.get(key) or key == protect:
                continue
            victims.append(key)
            total -= entry.footprint
    for key in victims:
        _release(key, "memory_budget")


def _release(key: str, reason: str) -> bool:
    with _GLOBAL:
        entry = _LOADED.pop(key, None)
        if entry is None:
            return False
        _record("release", key, entry.cfg, reason=reason, bytes=entry.footprint)
    for wrapper in entry.cached.values():
        wrapper.cache.close()
    entry.backend.close()
    del entry
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return True


@contextlib.contextmanager
def borrowed_model(cfg: ModelConfig | str | dict, reason: str = "done",
                   **load_kwargs: Any) -> Iterator[ModelBackend]:
    """The backend for ``cfg`` during this block (:func:`load_model` with ``load_kwargs``), released
    at its end only if this block loaded it: a model the process already held stays loaded for
    whoever holds it (a session, a notebook, another stage in the same worker). For one block at a
    time per model, as the LLM2LLM loop's steps run; stages share models through
    :func:`model_scope` instead."""
    key = memo_key(as_config(cfg))
    with _GLOBAL:
        held_before = key in _LOADED
    backend = load_model(cfg, **load_kwargs)
    try:
        yield backend
    finally:
        if not held_before:
            _release(key, reason)


def release_models(keep: Iterable[str] = (), reason: str = "stage_over") -> list[str]:
    """Release every loaded, unpinned model whose memo key is not in ``keep``; return their names.

    The flow calls this on every worker when a stage is over, with the keys of
    the models the next stage uses (:func:`memo_key`).
    """
    keep = set(keep)
    with _GLOBAL:
        victims = [k for k in _LOADED if k not in keep and not _PINS.get(k)]
        names = [_LOADED[k].cfg.name for k in victims]
    for key in victims:
        _release(key, reason)
    return names


# --------------------------------------------------------------------------- introspection


def _record(event: str, key: str, cfg: ModelConfig, **extra: Any) -> None:
    _EVENTS.append({"event": event, "model": cfg.name, "backend": cfg.backend, "key": key,
                    "pid": os.getpid(), "time": time.time(), **extra})


def lifecycle_events() -> list[dict[str, Any]]:
    """Every load and release in this process, oldest first."""
    with _GLOBAL:
        return [dict(e) for e in _EVENTS]


def load_counts() -> dict[str, int]:
    """How many times each model (by memo key) was loaded in this process."""
    with _GLOBAL:
        return dict(_LOAD_COUNTS)


def loaded_models() -> list[ModelBackend]:
    """The backends loaded in this process (not the cache wrappers)."""
    with _GLOBAL:
        return [entry.backend for entry in _LOADED.values()]


def clear_models() -> None:
    """Release every loaded backend, pinned or not, and forget the history (tests)."""
    with _GLOBAL:
        keys = list(_LOADED)
    for key in keys:
        _release(key, "cleared")
    with _GLOBAL:
        _KEY_LOCKS.clear()
        _PINS.clear()
        _LOAD_COUNTS.clear()
        _EVENTS.clear()
