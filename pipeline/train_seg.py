"""``train_seg``: train DeepLab (segmentation-models-pytorch) on the pseudo labels.

Writes ``<model_dir>/model.safetensors`` + ``meta.json`` (see :mod:`pipeline.models.deeplab`), dvclive curves (loss, lr,
val mIoU per epoch) and metrics in ``<results_dir>``, and a resumable checkpoint after every epoch. A re-run with
the same configuration and pseudo labels resumes from it; anything else starts fresh with a warning. The
checkpoint is deleted once training completes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import runtime, training
from pipeline.config import StageParams, TrainSegParams
from pipeline.data.datasets import normalize, same_size_batches
from pipeline.data.layout import PreparedDataset
from pipeline.data.seg_datasets import SegmentationTrainSet, labels_fingerprint
from pipeline.errors import TrainingError
from pipeline.metrics import confusion_matrix, iou_per_class, mean_iou
from pipeline.models.deeplab import Segmenter, build_segmenter, predict_probs, save_segmenter, segmentation_loss

log = logging.getLogger(__name__)


@torch.no_grad()
def split_confusion(
    model: Segmenter,
    data: PreparedDataset,
    split: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    amp: bool,
    batch_size: int = 16,
) -> np.ndarray:
    """Single-scale confusion matrix of a split against its ground-truth masks (metrics only).

    Returns:
        (K, K) int64 matrix, rows = ground truth.
    """
    was_training = model.training
    model.eval()
    confusion = np.zeros((data.num_classes, data.num_classes), np.int64)
    for ids, images in same_size_batches(data.split(split), data.load_image, batch_size):
        x = torch.stack([normalize(im, mean, std) for im in images]).to(device)  # (B, 3, H, W)
        pred = predict_probs(model, x, (1.0,), False, amp).argmax(1).cpu().numpy()  # (B, H, W)
        for row, image_id in enumerate(ids):
            confusion += confusion_matrix(pred[row], data.load_mask(image_id), data.num_classes)
    model.train(was_training)
    return confusion


def _meta(params: StageParams, data: PreparedDataset) -> dict[str, Any]:
    cfg = params.train_seg
    return {
        "arch": cfg.arch,
        "encoder": cfg.encoder,
        "encoder_weights": cfg.encoder_weights,
        "output_stride": cfg.output_stride,
        "decoder_channels": cfg.decoder_channels,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "palette": data.palette,
        "mean": list(params.data.mean),
        "std": list(params.data.std),
        "crop_size": cfg.crop_size,
        "trained_on": cfg.split,
    }


def _make_optimizer(cfg: TrainSegParams, model: Segmenter) -> torch.optim.Optimizer:
    groups = training.param_groups(model, model.new_modules(), cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum)
    return torch.optim.AdamW(groups)


def train_segmenter(
    params: StageParams, data_dir: Path, labels_dir: Path, model_dir: Path, results_dir: Path, checkpoint: Path
) -> dict[str, float]:
    """Train DeepLab on pseudo labels; works in one process or under ``torchrun`` (DDP).

    Args:
        params: Sections ``seed``, ``data`` (normalisation), ``train_seg``.
        data_dir: Prepared dataset (images; val masks for the per-epoch mIoU).
        labels_dir: Pseudo labels, ``<image_id>.png`` for every image of ``train_seg.split``.
        model_dir: Where ``model.safetensors`` and ``meta.json`` go.
        results_dir: dvclive directory.
        checkpoint: Path of the resumable checkpoint.

    Returns:
        The last validation metrics.

    Raises:
        TrainingError: On a non-finite loss or an impossible device/batch set-up.
        DatasetError: On missing or inconsistent images or pseudo labels.
        SegModelError: If the model cannot be built.
    """
    cfg = params.train_seg
    data = PreparedDataset.open(data_dir)
    device = runtime.resolve_device(cfg.device)
    ddp = runtime.init_distributed(device)
    if ddp.world_size > 1 and device.type == "cuda":
        device = runtime.resolve_device(cfg.device, ddp.local_rank)
    if cfg.batch_size % ddp.world_size or cfg.batch_size // ddp.world_size < 2:
        raise TrainingError(
            f"train_seg.batch_size={cfg.batch_size} must split into >= 2 images for each of {ddp.world_size} "
            "processes (batch norm needs 2)"
        )
    runtime.set_threads(cfg.threads)
    runtime.seed_everything(params.seed)

    mean, std = tuple(params.data.mean), tuple(params.data.std)
    trainset = SegmentationTrainSet(
        data, cfg.split, labels_dir, cfg.crop_size, cfg.scale_range, cfg.flip, mean, std, params.seed
    )
    per_rank = cfg.batch_size // ddp.world_size
    steps_per_epoch = len(trainset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"train_seg.batch_size={cfg.batch_size} exceeds the {len(trainset)} images")
    total_steps = steps_per_epoch * cfg.epochs

    model = build_segmenter(
        cfg.arch, cfg.encoder, data.num_classes, cfg.encoder_weights, cfg.output_stride, cfg.decoder_channels
    ).to(device)
    optimizer = _make_optimizer(cfg, model)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = training.warmup_scheduler(optimizer, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    scaler = runtime.make_scaler(device, cfg.amp)
    trainables = training.Trainables(model, optimizer, scheduler, scaler)

    digest = f"{params.digest()}-{labels_fingerprint(Path(labels_dir), trainset.ids)}"
    state = training.resume(checkpoint, digest, trainables)  # the digest covers the pseudo labels too
    start_epoch, history = (state["epoch"], list(state["history"])) if state else (0, [])

    net: torch.nn.Module = model
    if ddp.world_size > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(net)
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
        loss_sum, started = 0.0, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"train_seg epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=None if ddp.is_main else True,
            mininterval=2,
        )
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
            target = batch["label"].to(device, non_blocking=True)  # (B, S, S)
            with runtime.autocast(device, cfg.amp):
                logits = net(images)  # (B, K, S, S)
            loss = segmentation_loss(logits, target)
            training.check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_sum += loss.item()
            rate = len(images) * ddp.world_size * bar.n / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}", refresh=False)
        record: dict[str, Any] = {
            "train/loss": loss_sum / len(batches),
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/images_per_s": len(batches) * cfg.batch_size / (time.perf_counter() - started),
        }
        if ddp.is_main:
            last = epoch + 1 == cfg.epochs
            if last or (cfg.val_every and (epoch + 1) % cfg.val_every == 0):
                confusion = split_confusion(model, data, "val", mean, std, device, cfg.amp)
                record["val/miou"] = mean_iou(confusion)
                if last:
                    ious = zip(data.class_names, iou_per_class(confusion), strict=True)
                    record.update({f"val/iou/{name}": float(iou) for name, iou in ious})
            history.append(record)
            _log_epoch(live, record)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
            training.save_progress(checkpoint, digest, trainables, epoch + 1, history, step=step)

    final = {k: v for k, v in history[-1].items() if k.startswith("val/")} if history else {}
    if ddp.is_main:
        save_segmenter(model, _meta(params, data), model_dir)
        live.end()
        checkpoint.unlink(missing_ok=True)
    runtime.cleanup_distributed()
    return final


def _log_epoch(live: Live, record: dict[str, float]) -> None:
    for name, value in record.items():
        if not np.isnan(value):
            live.log_metric(name, value, plot="/iou/" not in name)
    live.next_step()
