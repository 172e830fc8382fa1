"""Inference stages (``cams``, ``refine``, ``evaluate``) split across the processes of a ``torchrun`` launch.

The split: a stage lists its work units in the order one process runs them (images, or the batches of the
one-process batching, so that every batch holds the same images as in one process), and rank ``r`` of ``world``
takes ``units[r::world]``. The merge: what each unit writes travels to rank 0 in rounds (:meth:`Shard.merged`),
which receives it in the one-process order and alone writes the outputs (into the one staging directory it swaps
in, :func:`pipeline.outputs.replaced_dir`); integer sums (confusion matrices, counts) and gallery picks are
gathered at the end. So the outputs equal a one-process run's, bit for bit with the same threads per process.

Python objects travel over gloo, also when the stage's own process group is NCCL. Without ``torchrun`` everything
runs in this process through the same code: one rank that takes every unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline import runtime
from pipeline.errors import DistributedError
from pipeline.runtime import Dist

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class Shard:
    """A process's place in a sharded stage: which units it takes, and how results reach the main process."""

    dist: Dist = field(default_factory=Dist)
    group: Any = None  # the gloo group for Python objects (None: the default group)

    @property
    def is_main(self) -> bool:
        """True on the process that merges the results and writes the outputs."""
        return self.dist.is_main

    def mine(self, units: Sequence[T]) -> list[T]:
        """The units of this rank: ``units[rank::world]``."""
        return list(units[self.dist.rank :: self.dist.world_size])

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on the main process; ``[]`` on the others."""
        if self.dist.world_size == 1:
            return [value]
        values: list[Any] | None = [None] * self.dist.world_size if self.is_main else None
        with _peers_alive():
            dist.gather_object(value, values, dst=0, group=self.group)
        return values or []

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in one process)."""
        if self.dist.world_size > 1:
            with _peers_alive():
                dist.barrier(group=self.group)

    def merged(self, results: Iterable[T], count: int, chunk: int = 1) -> Iterator[T]:
        """The results of all ranks' units, in the one-process order, on the main process (nothing elsewhere).

        Every rank must call it and consume it whole: it drives ``results`` (this rank's, one per unit of
        :meth:`mine`) ``chunk`` at a time, and each round gathers the ranks' chunks on the main process.

        Args:
            results: This rank's results, one per unit of ``self.mine(units)``, in order (may be lazy).
            count: The number of units of the whole stage (``len(units)``).
            chunk: Results per rank per round (memory on the main process: ``world * chunk`` results).

        Yields:
            On the main process, the result of every unit in the order of ``units``.
        """
        ahead = iter(results)
        if self.dist.world_size == 1:
            yield from ahead
            return
        for _ in range(-(-count // (self.dist.world_size * chunk))):
            yield from interleave(self.gather(list(itertools.islice(ahead, chunk))))
        if next(ahead, _END) is not _END:
            raise RuntimeError(f"rank {self.dist.rank} computed more results than its share of {count} units")

    def agree(self, stage: str, summary: str, content: dict[str, object]) -> None:
        """Stop unless every rank was given the same work (e.g. the same image ids, params and model).

        Args:
            stage: The stage, for the message.
            summary: What this rank sees, in words (e.g. ``1000 images of train``).
            content: JSON-able data by name (``ids``, ``params``, ...) that must be equal on every rank; compared
                by hash.

        Raises:
            DistributedError: One line naming the first rank that differs from rank 0.
        """
        if self.dist.world_size == 1:
            return
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
        seen: list[Any] = [None] * self.dist.world_size
        with _peers_alive():
            dist.all_gather_object(seen, f"{summary} ({', '.join(content)}: {digest})", group=self.group)
        message = disagreement(stage, seen)
        if message is not None:
            raise DistributedError(message)


@contextlib.contextmanager
def _peers_alive() -> Iterator[None]:
    """Turn the error of a collective whose peer died (gloo: connection closed) into one line that says so.

    Raises:
        DistributedError: If the collective fails.
    """
    try:
        yield
    except RuntimeError:
        raise DistributedError(
            "another process of this torchrun launch stopped (its error is above): this one stops too, and the "
            "outputs keep their old content"
        ) from None


def interleave(parts: list[list[T]]) -> Iterator[T]:
    """One round's results in unit order: the first of every rank (rank order), then the second of every rank, ..."""
    for position in range(max((len(part) for part in parts), default=0)):
        yield from (part[position] for part in parts if position < len(part))


def disagreement(stage: str, seen: list[str]) -> str | None:
    """The one-line error when the ranks' descriptions of their work differ, else ``None``."""
    for rank, value in enumerate(seen):
        if value != seen[0]:
            return (
                f"the {len(seen)} processes of this torchrun launch disagree on {stage}'s work: rank 0 has "
                f"{seen[0]}, rank {rank} has {value} (start every process on the same data, params and code)"
            )
    return None


@contextlib.contextmanager
def sharded(device_name: str) -> Iterator[tuple[torch.device, Shard]]:
    """The device and the :class:`Shard` of an inference stage; joins the process group under ``torchrun``.

    Under ``torchrun`` the processes other than rank 0 log warnings and errors only, and the group is left
    at the end.

    Args:
        device_name: ``auto`` | ``cpu`` | ``cuda`` (each CUDA process takes its ``LOCAL_RANK``'s GPU).

    Yields:
        ``(device, shard)``.
    """
    device, ddp = runtime.distributed_device(device_name)
    if ddp.world_size == 1:
        yield device, Shard()
        return
    world = ddp.world_size
    try:
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        if ddp.is_main:
            log.info("sharded over %d processes: rank r takes units r, r + %d, ...; rank 0 writes", world, world)
        else:
            logging.getLogger().setLevel(logging.WARNING)
        yield device, Shard(ddp, group)
    finally:
        runtime.cleanup_distributed()
