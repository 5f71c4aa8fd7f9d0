"""``load_model``: a model config -> a ready backend, loaded once per process.

Dask workers call :func:`load_model` from many tasks; the first call in a
process loads the weights, later calls with the same config get the same
object back. The memo key is the whole config (semantic fields and resource
knobs: two configs that differ only in batch size get two backends, but share
nothing else). The request-cache wrapper is memoized separately, so
``cache=True`` and ``cache=False`` share one loaded model.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

from thresher.generators.base import ModelBackend, ModelError
from thresher.generators.request_cache import CachedBackend, RequestCache
from thresher.schemas.model_config import ModelConfig

_BACKENDS: dict[str, ModelBackend] = {}
_CACHED: dict[tuple[str, str], CachedBackend] = {}
_KEY_LOCKS: dict[str, threading.Lock] = {}
_GLOBAL = threading.Lock()

#: backend name -> (module, class); imported only when asked for
_CLASSES = {
    "hf": ("thresher.generators.hf", "HFBackend"),
    "openai": ("thresher.generators.openai_backend", "OpenAIBackend"),
    "vllm": ("thresher.generators.vllm_backend", "VLLMBackend"),
}


def memo_key(cfg: ModelConfig) -> str:
    """Canonical JSON of every config field: one loaded backend per distinct key."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def build_backend(cfg: ModelConfig) -> ModelBackend:
    """Construct (load) a new backend for ``cfg``, without memoization or caching."""
    module_name, class_name = _CLASSES[cfg.backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"backend {cfg.backend!r} is unavailable: {exc}") from exc
    return getattr(module, class_name)(cfg)


def load_model(
    cfg: ModelConfig | str | dict,
    cache: bool = True,
    cache_path: str | Path | None = None,
) -> ModelBackend:
    """The backend for ``cfg``, loaded once per process and reused.

    ``cache=True`` wraps it in a :class:`CachedBackend` over the request cache
    at ``cache_path`` (default ``$THRESHER_CACHE_DIR/requests.sqlite``).
    """
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)
    key = memo_key(cfg)
    with _GLOBAL:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:  # two threads asking for one model load it once
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = build_backend(cfg)
            _BACKENDS[key] = backend
        if not cache:
            return backend
        ckey = (key, str(Path(cache_path).expanduser().resolve()) if cache_path else "")
        cached = _CACHED.get(ckey)
        if cached is None:
            cached = CachedBackend(backend, RequestCache(cache_path))
            _CACHED[ckey] = cached
        return cached


def loaded_models() -> list[ModelBackend]:
    """The backends loaded in this process (not the cache wrappers)."""
    return list(_BACKENDS.values())


def clear_models() -> None:
    """Forget every loaded backend (their memory is freed once unreferenced)."""
    with _GLOBAL:
        for cached in _CACHED.values():
            cached.cache.close()
        _CACHED.clear()
        _BACKENDS.clear()
        _KEY_LOCKS.clear()
