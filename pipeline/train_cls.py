"""``train_cls``: fine-tune the SWTformer classifier on image-level labels.

Writes ``<model_dir>/model.safetensors`` + ``meta.json`` (everything ``cams`` needs to rebuild the model),
dvclive curves and metrics in ``<results_dir>``, and a resumable checkpoint in ``<checkpoint>`` after every
epoch. A re-run with the same configuration resumes from it; a different configuration starts fresh with a
warning. The checkpoint is deleted once training completes, so a later run never reuses stale state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import runtime, training
from pipeline.config import StageParams
from pipeline.data.datasets import ClassificationEvalSet, ClassificationTrainSet
from pipeline.data.layout import PreparedDataset
from pipeline.errors import TrainingError
from pipeline.losses import swtformer_loss
from pipeline.metrics import classification_map
from pipeline.models.files import save_model_dir
from pipeline.models.swtformer import SWTformer, build_model

log = logging.getLogger(__name__)


def label_mask(valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) valid pixels, (B, C) labels -> (B, C+1, H, W) mask: background = valid, class k = valid * y_k."""
    return torch.cat([valid, valid * labels[:, :, None, None]], dim=1)


@torch.no_grad()
def evaluate_classifier(
    model: SWTformer, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, amp: bool
) -> dict[str, float]:
    """Class-wise and sample-wise mAP of the classifier's sigmoid scores on batches of ``ClassificationEvalSet``."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in batches:
        with runtime.autocast(device, amp):
            logits = model.classify(batch["image"].to(device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    model.train(was_training)
    return classification_map(np.concatenate(scores), np.concatenate(targets))


def _save_model(model: SWTformer, params: StageParams, data: PreparedDataset, model_dir: Path) -> None:
    meta = {
        "model": params.model.model_dump(mode="json"),
        "num_classes": data.num_classes - 1,
        "img_size": params.train_cls.crop_size,
        "mean": list(params.data.mean),
        "std": list(params.data.std),
        "class_names": data.class_names,
    }
    save_model_dir(model_dir, model, meta)


def train_classifier(
    params: StageParams, data_dir: Path, model_dir: Path, results_dir: Path, checkpoint: Path
) -> dict[str, float]:
    """Train the classifier; works in one process or under ``torchrun`` (DDP).

    Args:
        params: Sections ``seed``, ``data``, ``model``, ``train_cls``, ``loss``.
        data_dir: Prepared dataset directory.
        model_dir: Where the final weights and ``meta.json`` go.
        results_dir: dvclive directory (metrics and curves).
        checkpoint: Path of the resumable checkpoint.

    Returns:
        The final validation metrics.

    Raises:
        TrainingError: On a non-finite loss or an impossible device/batch set-up.
    """
    cfg, loss_cfg = params.train_cls, params.loss
    data = PreparedDataset.open(data_dir)
    device = runtime.resolve_device(cfg.device)
    ddp = runtime.init_distributed(device)
    if ddp.world_size > 1 and device.type == "cuda":
        device = runtime.resolve_device(cfg.device, ddp.local_rank)
    if cfg.batch_size % ddp.world_size:
        raise TrainingError(f"train_cls.batch_size={cfg.batch_size} is not divisible by the {ddp.world_size} processes")
    runtime.set_threads(cfg.threads)
    runtime.seed_everything(params.seed)

    trainset = ClassificationTrainSet(
        data,
        "train_aug",
        cfg.crop_size,
        cfg.resize_long,
        cfg.flip,
        cfg.color_jitter,
        params.data.mean,
        params.data.std,
        params.seed,
        cfg.cache_images,
    )
    valset = ClassificationEvalSet(data, "val", cfg.crop_size, params.data.mean, params.data.std)
    # its own generator: loading the val set must not move the global RNG that initialises the model
    val_loader = DataLoader(valset, cfg.batch_size, num_workers=cfg.num_workers, generator=torch.Generator())
    val_batches = list(val_loader) if cfg.cache_images and ddp.is_main else val_loader  # deterministic: load once
    per_rank = cfg.batch_size // ddp.world_size
    steps_per_epoch = len(trainset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"train_cls.batch_size={cfg.batch_size} exceeds the {len(trainset)} images")
    total_steps = steps_per_epoch * cfg.epochs

    model = build_model(params.model, data.num_classes - 1, cfg.crop_size).to(device)
    groups = training.param_groups(model, model.new_modules(), cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = training.warmup_scheduler(optimizer, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    scaler = runtime.make_scaler(device, cfg.amp)
    trainables = training.Trainables(model, optimizer, scheduler, scaler)

    digest = params.digest()
    state = training.resume(checkpoint, digest, trainables)
    start_epoch, history = (state["epoch"], list(state["history"])) if state else (0, [])

    find_unused = params.model.version == "v2" and not (loss_cfg.gsc or loss_cfg.ccl)
    net = DistributedDataParallel(model, find_unused_parameters=find_unused) if ddp.world_size > 1 else model
    live = Live(str(results_dir), dvcyaml=None, save_dvc_exp=False, report=None) if ddp.is_main else None
    if live is not None:
        live.log_params({"world_size": ddp.world_size, "device": str(device), "resumed_at_epoch": start_epoch})
        for record in history:
            _log_epoch(live, record)

    step = start_epoch * steps_per_epoch
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        trainset.epoch = epoch
        batches = list(training.epoch_indices(len(trainset), params.seed, epoch, ddp, per_rank))
        loader = DataLoader(trainset, batch_sampler=batches, num_workers=cfg.num_workers)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"train_cls epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=None if ddp.is_main else True,
            mininterval=2,
        )
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device)
            mask = label_mask(batch["valid"].to(device), labels)
            with runtime.autocast(device, cfg.amp):
                out = net(images, mask)
            terms = swtformer_loss(out, labels, mask, loss_cfg)
            training.check_finite(terms["total"], step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            rate = len(images) * ddp.world_size * bar.n / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{terms['total'].item():.3f}", img_s=f"{rate:.0f}", refresh=False)
        record: dict[str, Any] = {f"train/loss_{k}": v / len(batches) for k, v in sums.items()}
        record["train/lr"] = optimizer.param_groups[0]["lr"]
        record["train/images_per_s"] = len(batches) * cfg.batch_size / (time.perf_counter() - started)
        if ddp.is_main:
            record.update({f"val/{k}": v for k, v in evaluate_classifier(model, val_batches, device, cfg.amp).items()})
            history.append(record)
            _log_epoch(live, record)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
            training.save_progress(checkpoint, digest, trainables, epoch + 1, history, step=step)

    final = {k: v for k, v in history[-1].items() if k.startswith("val/")} if history else {}
    if ddp.is_main:
        _save_model(model, params, data, model_dir)
        live.end()
        checkpoint.unlink(missing_ok=True)
    runtime.cleanup_distributed()
    return final


def _log_epoch(live: Live, record: dict[str, float]) -> None:
    for name, value in record.items():
        live.log_metric(name, value)
    live.next_step()
