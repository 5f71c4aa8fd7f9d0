"""CPU threads for a stage's tasks, so that a stage with fewer tasks than workers still uses every core.

A local worker gets ``cores / workers`` threads (its ``OMP_NUM_THREADS``), right when every
worker has a task. When a stage has fewer tasks than workers (one big shard, a global
stage), the idle workers' cores would sit unused, so :func:`task_threads` gives each task
the machine's cores divided among the tasks that run at once, and :func:`cpu_threads` sets
torch's intra-op threads to that for the task's duration. Results do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def task_threads(tasks: int, slots: int, cores: int) -> int:
    """Threads per task when ``tasks`` tasks share ``slots`` worker threads on ``cores`` cores."""
    running = max(1, min(tasks, slots))
    return max(1, cores // running)


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (nothing when None: the flow gives
    a number to model stages only, which import torch anyway)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
