"""A process pool for per-image CPU work (generation, CRF, random walk) that never oversubscribes the cores."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def resolve_workers(workers: int) -> int:
    """``0`` means one worker per CPU core this process may run on (its affinity mask, else ``os.cpu_count()``).

    Under ``torchrun`` the node's cores are shared: ``0`` gives each of its ``LOCAL_WORLD_SIZE`` processes its share.
    """
    if workers > 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere).

    Args:
        parent: The parent's pid when this process was made; if it is already gone, exit now.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _init(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """Worker set-up: die with the parent, one compute thread (torch intra- and inter-op), the caller's initializer."""
    die_with_parent(parent)
    os.environ["OMP_NUM_THREADS"] = "1"  # for a torch imported later in this worker
    torch = sys.modules.get("torch")  # not imported here: the pool also serves torch-free stages (prepare)
    if torch is not None:
        torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


class OrderedPool:
    """``function`` over items submitted one at a time, in worker processes; results come back in submission order.

    A context manager: the workers start on entering and are shut down (after finishing their items) on leaving.
    Workers are forked where the platform can (cheap, and scripts need no ``__main__`` guard; the pattern of
    torch's DataLoader workers), else spawned; each sets one torch thread, then calls ``initializer(*initargs)``
    once. With ``processes == 0`` everything runs in this process (the initializer too), so both paths run the
    same code. At most ``in_flight`` items per process are queued ahead of the consumer, so memory stays bounded
    however many items pass through; an exception raised for an item is re-raised when its result is due.

    Args:
        function: A module-level function of one (picklable) item.
        processes: Worker processes; 0 runs every item in this process.
        initializer: Optional per-process set-up (e.g. loading a model into a module global).
        initargs: Its arguments.
        in_flight: Items queued per process ahead of the consumer.
    """

    def __init__(
        self,
        function: Callable[[Any], Any],
        processes: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple = (),
        in_flight: int = 4,
    ) -> None:
        self.function = function
        self.processes = processes
        self.limit = processes * in_flight
        self._setup = (initializer, initargs)
        self._pending: deque[Future] = deque()
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> OrderedPool:
        initializer, initargs = self._setup
        if self.processes <= 0:
            if initializer is not None:
                initializer(*initargs)
            return self
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self._executor = ProcessPoolExecutor(
            self.processes, mp_context=context, initializer=_init, initargs=(os.getpid(), *self._setup)
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        self._pending.clear()

    def submit(self, item: Any) -> list[Any]:
        """Queue one item; return the results now due, in order (on the in-process path, this item's)."""
        if self._executor is None:
            return [self.function(item)]
        self._pending.append(self._executor.submit(self.function, item))
        ready = []
        while self._pending and (len(self._pending) >= self.limit or self._pending[0].done()):
            ready.append(self._pending.popleft().result())
        return ready

    def drain(self) -> list[Any]:
        """Wait for every item still in flight; return their results in order."""
        ready = [future.result() for future in self._pending]
        self._pending.clear()
        return ready


def map_ordered(
    function: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    in_flight: int = 4,
) -> Iterator[Any]:
    """``map(function, items)`` in ``workers`` processes (results in input order); in-process when ``workers == 1``.

    An :class:`OrderedPool` fed from ``items``: each worker sets one torch thread and calls
    ``initializer(*initargs)`` once (the serial path calls it in this process), and at most ``in_flight`` items
    per worker are submitted ahead of the consumer, so ``items`` can be a lazy generator over a dataset larger
    than memory.

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
    with OrderedPool(function, workers if workers > 1 else 0, initializer, initargs, in_flight) as pool:
        for item in items:
            yield from pool.submit(item)
        yield from pool.drain()
