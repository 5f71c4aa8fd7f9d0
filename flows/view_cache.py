"""A worker's recent shard views, so a shard's layers are not re-joined from scratch for every stage.

A shard's rows after stage *n* are its rows after stage *n-1* with stage *n*'s layer
applied (:func:`thresher.flows.pipeline.apply_layer`). Each worker process keeps the
newest view of every shard it worked on, keyed by the state's lineage key; the flow sends
a shard's next task to the worker that holds its view (``dask.annotate(workers=...,
allow_other_workers=True)``), so the next stage applies one layer instead of replaying
all of them. A miss (another worker, an evicted view, a resumed run) replays from the
deepest view the worker has, else from the shard's base rows: the same rows either way.

The cache holds at most :data:`VIEW_CACHE_BYTES` (``THRESHER_VIEW_CACHE_MB``, default
1024 MB per worker process), least recently used out first, and one view per shard.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import pyarrow as pa

VIEW_CACHE_BYTES = int(float(os.environ.get("THRESHER_VIEW_CACHE_MB", "1024")) * (1 << 20))

_views: OrderedDict[str, pa.Table] = OrderedDict()
_newest_of_shard: dict[str, str] = {}  # a shard's base key -> the key of its newest cached view
_lock = threading.Lock()


def deepest(keys: list[str]) -> tuple[int, pa.Table | None]:
    """(how many of ``keys`` the cached view covers, the view) for the last of ``keys`` that is cached."""
    with _lock:
        for depth in range(len(keys), 0, -1):
            view = _views.get(keys[depth - 1])
            if view is not None:
                _views.move_to_end(keys[depth - 1])
                return depth, view
    return 0, None


def remember(shard: str, key: str, view: pa.Table) -> None:
    """Keep ``view`` as shard ``shard``'s newest view (its older one goes), within the byte budget."""
    if view.nbytes > VIEW_CACHE_BYTES:
        return
    with _lock:
        older = _newest_of_shard.get(shard)
        if older is not None and older != key:
            _views.pop(older, None)
        _views[key] = view
        _views.move_to_end(key)
        _newest_of_shard[shard] = key
        total = sum(t.nbytes for t in _views.values())
        while total > VIEW_CACHE_BYTES and len(_views) > 1:
            _, evicted = _views.popitem(last=False)
            total -= evicted.nbytes


def clear() -> None:
    with _lock:
        _views.clear()
        _newest_of_shard.clear()
