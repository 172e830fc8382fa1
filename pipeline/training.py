"""Training-loop pieces shared by the training stages: devices, DDP, seeding, schedules, checkpoints."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.io import atomic_path
from pipeline.runtime import Dist

log = logging.getLogger(__name__)


def warmup_decay(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine or poly(0.9) decay.

    Args:
        step: Current optimiser step (0-based).
        total: Total number of steps.
        warmup: Warm-up steps.
        schedule: ``cosine`` or ``poly``.
        min_ratio: Final factor.

    Returns:
        The factor in [min_ratio, 1] that multiplies the base learning rates.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else (1 - progress) ** 0.9
    return min_ratio + (1 - min_ratio) * decay


def param_groups(model: nn.Module, new_modules: list[nn.Module], lr: float, head_mult: float, wd: float) -> list:
    """AdamW groups: backbone and new layers (``lr * head_mult``), each split into decay / no-decay.

    Biases, norm weights (1-D tensors) and relative-position tables get no weight decay.
    """
    new_ids = {id(p) for m in new_modules for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or "relative_position_bias_table" in name
        groups.setdefault((id(param) in new_ids, no_decay), []).append(param)
    return [
        {"params": params, "lr": lr * (head_mult if is_new else 1.0), "weight_decay": 0.0 if no_decay else wd}
        for (is_new, no_decay), params in sorted(groups.items())
    ]


def check_finite(value: torch.Tensor, step: int, name: str = "loss") -> None:
    """Stop with the step number when a loss is NaN or infinite.

    Raises:
        TrainingError: If ``value`` is not finite.
    """
    if not torch.isfinite(value).all():
        raise TrainingError(f"{name} became {value.item()} at step {step}; stopping (try a lower learning rate)")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (tensors, numbers, strings and containers of them only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint with ``weights_only=True``; ``None`` if there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def warmup_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler applying :func:`warmup_decay` to every parameter group's base learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, total_steps, warmup_steps, schedule, min_ratio)
    )


@dataclass
class Trainables:
    """What a resumable training loop checkpoints together with the RNG states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict[str, Any]:
        """The four state dicts, keyed by attribute name."""
        return {name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scheduler", "scaler")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name in ("model", "optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(state[name])


def resume(path: Path, digest: str, trainables: Trainables) -> dict[str, Any] | None:
    """Restore training from ``path`` if it holds a checkpoint of the same configuration.

    Args:
        path: The checkpoint written by :func:`save_progress`.
        digest: Hash of everything the run depends on; a checkpoint with another one is ignored (with a warning).
        trainables: Restored in place, together with the RNG states.

    Returns:
        The checkpoint (``epoch``, ``history`` and any extras), or ``None`` when training starts fresh.
    """
    state = load_checkpoint(path)
    if state is None:
        return None
    if state["config_digest"] != digest:
        log.warning("checkpoint %s was made with another configuration; starting fresh", path)
        return None
    trainables.load_state_dict(state)
    set_rng_state(state["rng"])
    log.info("resuming from %s at epoch %d", path, state["epoch"])
    return state


def save_progress(
    path: Path, digest: str, trainables: Trainables, epoch: int, history: list[dict], **extra: Any
) -> None:
    """Checkpoint the end of ``epoch`` (1-based count of finished epochs) for :func:`resume`."""
    state = {**trainables.state_dict(), "rng": rng_state(), "epoch": epoch, "config_digest": digest}
    save_checkpoint(path, {**state, "history": history, **extra})


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and, if present, CUDA) for exact resumption."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_indices(num_samples: int, seed: int, epoch: int, ddp: Dist, batch_size: int) -> Iterator[list[int]]:
    """Shuffled mini-batches of sample indices for one epoch, sharded across ranks; drops the last partial batch.

    The order depends only on (seed, epoch), so it is reproducible after a resume.

    Args:
        num_samples: Dataset length.
        seed: Global seed.
        epoch: Epoch number.
        ddp: Rank information.
        batch_size: Per-process batch size.
    """
    order = np.random.default_rng([seed, epoch, 7]).permutation(num_samples)
    global_batch = batch_size * ddp.world_size
    for start in range(0, num_samples - global_batch + 1, global_batch):
        chunk = order[start : start + global_batch]
        yield chunk[ddp.rank :: ddp.world_size].tolist()
