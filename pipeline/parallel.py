"""A process pool for per-image CPU work (generation, CRF, random walk) that never oversubscribes the cores."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def resolve_workers(workers: int) -> int:
    """``0`` means one worker per CPU core this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    if workers > 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def _init(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """Worker set-up: one compute thread (torch intra- and inter-op), then the caller's initializer."""
    os.environ["OMP_NUM_THREADS"] = "1"  # for a torch imported later in this worker
    torch = sys.modules.get("torch")  # not imported here: the pool also serves torch-free stages (prepare)
    if torch is not None:
        torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


def map_ordered(
    function: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    in_flight: int = 4,
) -> Iterator[Any]:
    """``map(function, items)`` in ``workers`` processes (results in input order); in-process when ``workers == 1``.

    Workers are forked where the platform can (cheap, and scripts need no ``__main__`` guard; the pattern of
    torch's DataLoader workers), else spawned; each sets one torch thread, then calls ``initializer(*initargs)``
    once. The serial path calls the initializer in this process, so both
    paths run the same code. At most ``in_flight`` items per worker are submitted ahead of the consumer, so
    ``items`` can be a lazy generator over a dataset larger than memory.

    Args:
        function: A module-level function of one item.
        items: Picklable work items.
        workers: Number of processes (>= 1).
        initializer: Optional per-process set-up (e.g. loading a model into a module global).
        initargs: Its arguments.
        in_flight: Items queued per worker ahead of the consumer.

    Yields:
        ``function(item)`` for every item, in order.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(initializer, initargs)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers * in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
