"""The one training loop (:func:`fit`) and its pieces: set-up, schedules, parameter groups, guards, batches.

Every trainer (``train_cls``, ``train_aff``, ``train_seg``) builds its data, model, optimiser and loss step, and
hands them to :func:`fit` as a :class:`Task`. :func:`fit` owns the rest: the learning-rate schedule, mixed
precision (scaler), gradient clipping, an optional moving average of the weights (validated and saved in place of
the last ones), the non-finite-loss guard, DDP, per-epoch records logged with dvclive,
the non-finite-weight guard before every save, the resumable checkpoint (a re-run with the same configuration
resumes; another configuration starts fresh with a warning; the checkpoint is deleted once training completes)
and the final save.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import runtime
from pipeline.checkpoint import Trainables, resume, save_progress
from pipeline.errors import TrainingError
from pipeline.live import open_live
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


def make_optimizer(kind: str, groups: list, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimiser of a training section's ``optimizer`` key over :func:`param_groups`' groups.

    Args:
        kind: ``adamw`` (torch defaults besides the groups' lr and weight decay) or ``sgd``.
        groups: Parameter groups, each with its ``lr`` and ``weight_decay``.
        momentum: SGD's momentum (ignored by AdamW).

    Returns:
        ``torch.optim.SGD`` or ``torch.optim.AdamW``.
    """
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=momentum)
    return torch.optim.AdamW(groups)


SYNC_EVERY = 20
"""Steps between the training loop's host syncs (finiteness, the progress bar's loss); also at every epoch's end."""


class FiniteWatch:
    """Notes on the device the first step whose loss is NaN or infinite; :meth:`check` reads it (one host sync).

    The training loop calls :meth:`add` every step without waiting for the GPU and :meth:`check` every
    :data:`SYNC_EVERY` steps: a non-finite loss still stops the run with its exact step, a few steps later, and
    before anything is saved (weights are checked before every save too).
    """

    def __init__(self, device: torch.device, name: str = "loss") -> None:
        self.name = name
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # () first bad step, -1: none yet
        self.value = torch.zeros((), device=device)  # () its value

    def add(self, value: torch.Tensor, step: int) -> None:
        """Record ``value`` (a loss) of ``step`` if it is the first non-finite one; no host sync."""
        value = value.detach().float()
        first = ~torch.isfinite(value).all() & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, value.sum(), self.value)  # a NaN or infinity carries into the sum

    def check(self) -> None:
        """Stop with the step number if a recorded value was NaN or infinite.

        Raises:
            TrainingError: Naming the first non-finite step and its value.
        """
        step = int(self.step)
        if step >= 0:
            raise TrainingError(
                f"{self.name} became {float(self.value)} at step {step}; stopping (try a lower learning rate)"
            )


def check_weights(model: nn.Module, name: str, epoch: int) -> None:
    """Stop when a parameter or floating-point buffer of ``model`` holds a NaN or an infinity.

    Run before every save: a loss can be finite while the update it drives makes a weight non-finite (a huge
    learning rate on the last step), and such a model must never be written. One host sync for the whole model.

    Args:
        model: The module about to be checkpointed or saved.
        name: The trainer's params section (for the message).
        epoch: The number of finished epochs (1-based, for the message).

    Raises:
        TrainingError: Naming the first non-finite tensor and the epoch.
    """
    buffers = ((key, b) for key, b in model.named_buffers() if b.is_floating_point() or b.is_complex())
    tensors = [*model.named_parameters(), *buffers]
    if not tensors:
        return
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
    for (key, tensor), ok in zip(tensors, finite, strict=True):
        if not ok:
            what = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise TrainingError(
                f"{name}: weight '{key}' became {what} in epoch {epoch}; stopping without saving it "
                "(try a lower learning rate)"
            )


def warmup_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler applying :func:`warmup_decay` to every parameter group's base learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, total_steps, warmup_steps, schedule, min_ratio)
    )


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


@dataclass(frozen=True)
class Run:
    """The process a trainer runs in: its device, its place in a (possibly single-process) DDP run, the seed."""

    device: torch.device
    dist: Dist
    seed: int


def setup(name: str, device: str, threads: int, seed: int, batch_size: int, min_per_rank: int = 1) -> Run:
    """Pick the device, join the DDP group under ``torchrun``, check the batch split, set threads and seed.

    Args:
        name: The trainer's params section (for messages).
        device: ``auto`` | ``cpu`` | ``cuda``.
        threads: torch intra-op threads (0 keeps torch's default).
        seed: The global seed.
        batch_size: The global batch size, split evenly across the processes.
        min_per_rank: The fewest images one process may get (2 where batch norm needs them).

    Raises:
        TrainingError: If CUDA is missing or the batch does not split.
    """
    resolved, dist = runtime.distributed_device(device)
    if batch_size % dist.world_size or batch_size // dist.world_size < min_per_rank:
        why = " (batch norm needs 2)" if min_per_rank > 1 else ""
        raise TrainingError(
            f"{name}.batch_size={batch_size} must split into >= {min_per_rank} images for each of "
            f"{dist.world_size} processes{why}"
        )
    runtime.set_threads(threads)
    runtime.seed_everything(seed)
    return Run(resolved, dist, seed)


def check_batch(name: str, batch_size: int, num_samples: int) -> None:
    """Stop early when one batch needs more images than there are.

    Raises:
        TrainingError: If ``batch_size > num_samples``.
    """
    if batch_size > num_samples:
        raise TrainingError(f"{name}.batch_size={batch_size} exceeds the {num_samples} images")


def rehearsal_batch(name: str, batch_size: int, num_samples: int, subset: int | None) -> int:
    """The batch size to train with: ``batch_size``, cut to the training set in a rehearsal (``data.subset``).

    With ``data.subset: N`` every split holds at most N images, which may be fewer than a paper config's batch; the
    batch is then cut to the training set (with a warning) so that a rehearsal on a handful of images runs every
    step. Without a subset nothing changes: a batch larger than the training set stays an error (:func:`check_batch`).

    Args:
        name: The params section, for the message.
        batch_size: The section's ``batch_size``.
        num_samples: Images in the training set.
        subset: ``data.subset``.

    Returns:
        The batch size.
    """
    if subset is None or batch_size <= num_samples or num_samples == 0:
        return batch_size
    log.warning(
        "%s: data.subset leaves %d training images: batch_size %d cut to %d for this rehearsal (the paper's batch "
        "needs data.subset >= %d)",
        name,
        num_samples,
        batch_size,
        num_samples,
        batch_size,
    )
    return num_samples


@dataclass(frozen=True)
class Recipe:
    """The schedule and loop settings of a trainer's params section (missing loop keys: 0, i.e. off)."""

    epochs: int
    batch_size: int
    warmup_epochs: float
    schedule: str
    min_lr_ratio: float
    amp: bool
    grad_clip: float = 0.0
    num_workers: int = 0
    ema_decay: float = 0.0

    @classmethod
    def of(cls, section: Any, **overrides: Any) -> Recipe:
        """The recipe of a params section (``train_cls``, ``train_aff`` or ``train_seg``), with ``overrides``."""
        values = {f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)}
        return cls(**{**values, **overrides})


Step = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Task:
    """What one trainer hands to :func:`fit`: the parts that differ between trainers.

    Attributes:
        name: The params section (``train_cls``): progress bars, logs and messages.
        model: The module to train and save.
        optimizer: Its optimiser; :func:`fit` adds the warm-up + decay schedule.
        trainset: A map-style dataset whose ``epoch`` attribute :func:`fit` sets before each epoch (augmentation
            seeded by ``(seed, epoch, index)`` makes resumed runs exact).
        step: ``step(net, batch) -> (loss, terms)``: the forward pass through ``net`` (``model``, or its DDP
            wrapper) and the loss to minimise; each term is averaged over the epoch into ``train/<term>``.
        save: Writes the trained model (main process only).
        validate: ``validate(epoch) -> metrics`` after each epoch (0-based), on the main process (on every process
            with ``validate_everywhere``: it shares out its work and returns the metrics on the main one).
        live_params: Extra run parameters for dvclive.
        static_metrics: Metrics logged once (not per epoch), e.g. the quality of the training labels.
        find_unused_parameters: DDP must allow parameters without a gradient.
        sync_batchnorm: Use synchronised batch norm across CUDA processes.
        validate_everywhere: Call ``validate`` on every process of a ``torchrun`` launch, not the main one only.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainset: Dataset
    step: Step
    save: Callable[[nn.Module], None]
    validate: Callable[[int], dict[str, float]] | None = None
    live_params: dict[str, Any] = field(default_factory=dict)
    static_metrics: dict[str, float] = field(default_factory=dict)
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    validate_everywhere: bool = False


def fit(task: Task, recipe: Recipe, run: Run, results_dir: Path, checkpoint: Path, digest: str) -> list[dict]:
    """Train ``task.model`` for ``recipe.epochs`` epochs; resume from ``checkpoint`` when it matches ``digest``.

    Args:
        task: What is trained and how one step computes its loss.
        recipe: Epochs, global batch size, schedule, AMP, gradient clipping, DataLoader workers.
        run: Device, DDP rank information and seed (:func:`setup`).
        results_dir: dvclive directory (per-epoch curves, final metrics).
        checkpoint: The resumable checkpoint, written after every epoch and deleted at the end.
        digest: Hash of everything the run depends on; a checkpoint with another digest is ignored.

    Returns:
        The per-epoch records (empty on processes other than the main one).

    Raises:
        TrainingError: On a non-finite loss or weight (nothing non-finite is ever saved), or a batch larger than
            the training set.
    """
    check_batch(task.name, recipe.batch_size, len(task.trainset))
    steps = len(task.trainset) // recipe.batch_size
    warmup = round(recipe.warmup_epochs * steps)
    scheduler = warmup_scheduler(task.optimizer, steps * recipe.epochs, warmup, recipe.schedule, recipe.min_lr_ratio)
    scaler = runtime.make_scaler(run.device, recipe.amp)
    trainables = Trainables(task.model, task.optimizer, scheduler, scaler, moving_average(task.model, recipe.ema_decay))
    state = resume(checkpoint, digest, trainables)
    start, history = (state["epoch"], list(state["history"])) if state else (0, [])
    net = _parallel(task, run)
    torch.backends.cudnn.benchmark = run.device.type == "cuda"  # every trainer's crops have one fixed size
    live = _open_live(task, run, results_dir, start, history)
    task.model.train()
    for epoch in range(start, recipe.epochs):
        record = _train_epoch(task, recipe, run, net, trainables, epoch, epoch * steps)
        check_weights(task.model, task.name, epoch + 1)  # on every rank: DDP replicas hold the same weights
        validated = task.validate is not None and (run.dist.is_main or task.validate_everywhere)
        with averaged_weights(task.model, trainables.ema):
            metrics = task.validate(epoch) if validated else {}
        if run.dist.is_main:
            record.update(metrics)
            history.append(record)
            log_epoch(live, record)
            log.info("%s epoch %d/%d: %s", task.name, epoch + 1, recipe.epochs, _describe(record))
            save_progress(checkpoint, digest, trainables, epoch + 1, history, step=(epoch + 1) * steps)
    if trainables.ema is not None:
        task.model.load_state_dict(trainables.ema.module.state_dict())
    check_weights(task.model, task.name, recipe.epochs)
    if run.dist.is_main:
        task.save(task.model)
        live.end()
        checkpoint.unlink(missing_ok=True)
    runtime.cleanup_distributed()
    return history


def _train_epoch(
    task: Task, recipe: Recipe, run: Run, net: nn.Module, trainables: Trainables, epoch: int, step: int
) -> dict[str, float]:
    """One pass over this process's share of the training set; returns the epoch's ``train/...`` record."""
    task.trainset.epoch = epoch
    per_rank = recipe.batch_size // run.dist.world_size
    batches = list(epoch_indices(len(task.trainset), run.seed, epoch, run.dist, per_rank))
    cuda = run.device.type == "cuda"
    loader = DataLoader(task.trainset, batch_sampler=batches, num_workers=recipe.num_workers, pin_memory=cuda)
    sums: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    desc = f"{task.name} epoch {epoch + 1}/{recipe.epochs}"
    bar = tqdm(loader, desc=desc, unit="step", disable=None if run.dist.is_main else True, mininterval=2)
    watch = FiniteWatch(run.device)
    for done, batch in enumerate(bar, 1):
        loss, terms = task.step(net, batch)
        watch.add(loss, step)
        _update(trainables, loss, recipe.grad_clip)
        if trainables.ema is not None:
            trainables.ema.update_parameters(trainables.model)
        step += 1
        for name, value in terms.items():  # summed on the device in float64: as exact as Python floats
            term = value.detach().double()
            sums[name] = term if name not in sums else sums[name] + term
        if done % SYNC_EVERY == 0 or done == len(batches):
            watch.check()
            rate = recipe.batch_size * done / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}", refresh=False)
    record: dict[str, float] = {f"train/{name}": total.item() / len(batches) for name, total in sums.items()}
    record["train/lr"] = trainables.optimizer.param_groups[0]["lr"]
    record["train/images_per_s"] = len(batches) * recipe.batch_size / (time.perf_counter() - started)
    return record


def _update(trainables: Trainables, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward (through the AMP scaler), optional gradient-norm clipping, optimiser and schedule step."""
    optimizer, scaler = trainables.optimizer, trainables.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainables.model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    trainables.scheduler.step()


def moving_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers, updated after every step; ``None`` at 0.

    Args:
        model: The module being trained.
        decay: Weight of the average at each update (``ema = decay * ema + (1 - decay) * weights``); 0 = no average.
    """
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@contextmanager
def averaged_weights(model: nn.Module, ema: AveragedModel | None) -> Iterator[None]:
    """Run the block with ``ema``'s weights in ``model``, then put the trained weights back (nothing if ``None``)."""
    if ema is None:
        yield
        return
    trained = {key: value.clone() for key, value in model.state_dict().items()}
    model.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(trained)


def _parallel(task: Task, run: Run) -> nn.Module:
    """The module the steps run: ``task.model`` alone, or wrapped in DDP under ``torchrun``."""
    if run.dist.world_size == 1:
        return task.model
    module = task.model
    if task.sync_batchnorm and run.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(module, find_unused_parameters=task.find_unused_parameters)


def _open_live(task: Task, run: Run, results_dir: Path, start: int, history: list[dict]) -> Live | None:
    """Dvclive on the main process, with the run's parameters, the static metrics and the replayed history."""
    if not run.dist.is_main:
        return None
    live = open_live(results_dir)
    base = {"world_size": run.dist.world_size, "device": str(run.device), "resumed_at_epoch": start}
    live.log_params({**base, **task.live_params})
    for name, value in task.static_metrics.items():
        live.log_metric(name, round(value, 5), plot=False)
    for record in history:
        log_epoch(live, record)
    return live


def log_epoch(live: Live, record: dict[str, float]) -> None:
    """Log one epoch's record and advance dvclive's step; NaN values are skipped, per-class IoUs get no plot."""
    for name, value in record.items():
        if not np.isnan(value):
            live.log_metric(name, value, plot="/iou/" not in name)
    live.next_step()


def _describe(record: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in record.items())
