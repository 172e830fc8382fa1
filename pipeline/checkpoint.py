"""The resumable checkpoint of a training run: model, optimiser, scheduler, scaler, RNG states and progress.

Checkpoints are written atomically and hold only tensors, numbers, strings and containers of them, so they load
with ``weights_only=True``; a configuration digest tells whether a checkpoint belongs to the run that finds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError, one_line
from pipeline.io import atomic_path
from pipeline.outputs import remove_leftovers

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (tensors, numbers, strings and containers of them only).

    Temporaries that killed runs left beside it (full-size copies) are removed first.
    """
    remove_leftovers(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "config_digest")


def unusable(path: Path, why: str) -> CheckpointError:
    """The one-line error for a checkpoint that cannot be resumed, with the two ways out."""
    return CheckpointError(
        f"checkpoint {path} {why}: delete it to train from scratch, or pass --checkpoint with another path"
    )


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint with ``weights_only=True``; ``None`` if there is none.

    Raises:
        CheckpointError: If the file is empty, truncated, or not a checkpoint (one line: delete it or move it).
    """
    if not path.is_file():
        return None
    if path.stat().st_size == 0:
        raise unusable(path, "is empty (0 bytes; a run killed while writing it?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError (zip), ...: all one cause
        raise unusable(path, f"cannot be read ({type(exc).__name__}: truncated or not a checkpoint)") from None


@dataclass
class Trainables:
    """What a resumable training loop checkpoints together with the RNG states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None

    def _names(self) -> tuple[str, ...]:
        return ("model", "optimizer", "scheduler", "scaler") + (("ema",) if self.ema is not None else ())

    def state_dict(self) -> dict[str, Any]:
        """The state dicts (four, five with an EMA), keyed by attribute name."""
        return {name: getattr(self, name).state_dict() for name in self._names()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name in self._names():
            getattr(self, name).load_state_dict(state[name])


def resume(path: Path, digest: str, trainables: Trainables) -> dict[str, Any] | None:
    """Restore training from ``path`` if it holds a checkpoint of the same configuration.

    Args:
        path: The checkpoint written by :func:`save_progress`.
        digest: Hash of everything the run depends on; a checkpoint with another one is ignored (with a warning).
        trainables: Restored in place, together with the RNG states.

    Returns:
        The checkpoint (``epoch``, ``history`` and any extras), or ``None`` when training starts fresh.

    Raises:
        CheckpointError: If the file is not a checkpoint this version can resume (empty, truncated, old format).
    """
    state = load_checkpoint(path)
    if state is None:
        return None
    missing = [key for key in RESUME_KEYS if key not in state] if isinstance(state, dict) else ["model"]
    if missing:
        raise unusable(path, f"is not a checkpoint of this version (no '{missing[0]}'; an older format?)")
    if state["config_digest"] != digest:
        log.warning("checkpoint %s was made with another configuration; starting fresh", path)
        return None
    try:
        trainables.load_state_dict(state)
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise unusable(path, f"does not fit this run ({one_line(exc)})") from None
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
