"""Calling a model backend over many items, a chunk at a time: the loop every model stage shares.

:func:`call_in_chunks` sends ``chunk_size`` items per backend call (the stages'
``chunk_size`` knob; the request cache is written after each call, so a killed run
loses at most one chunk) and returns one result per item, in item order. Given
``one``, a chunk whose call raises is retried item by item with ``one``, which
returns the item's failure as a value instead of raising: one bad item fails
alone, the others still get their results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def call_in_chunks(
    items: Sequence[Item],
    call: Callable[[list[Item]], Sequence[Result]],
    chunk_size: int,
    *,
    one: Callable[[Item], Result] | None = None,
    progress: str | None = None,
) -> list[Result]:
    """``call`` on consecutive chunks of ``items``; one result per item, in order.

    ``one``: retry a chunk whose call raises item by item (without it the error
    propagates). ``progress``: log ``"<progress> <done>/<total> in <s> s"`` after each chunk.
    """
    chunk_size = max(1, chunk_size)
    results: list[Result] = []
    started = time.perf_counter()
    for start in range(0, len(items), chunk_size):
        chunk = list(items[start:start + chunk_size])
        try:
            got = list(call(chunk))
            if len(got) != len(chunk):
                raise ValueError(f"the backend returned {len(got)} results for {len(chunk)} items")
        except Exception:
            if one is None:
                raise
            got = [one(item) for item in chunk]  # one bad item fails alone; `one` names its error
        results.extend(got)
        if progress:
            log.info("%s %d/%d in %.1f s", progress, len(results), len(items), time.perf_counter() - started)
    return results
