"""``train_seg``: train DeepLab (segmentation-models-pytorch) on the pseudo labels.

Writes ``<model_dir>/model.safetensors`` + ``meta.json`` (see :mod:`pipeline.models.deeplab`), dvclive curves (loss, lr,
val mIoU per epoch) and metrics in ``<results_dir>``, and a resumable checkpoint after every epoch. A re-run with
the same configuration and pseudo labels resumes from it; anything else starts fresh with a warning. The
checkpoint is deleted once training completes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import runtime, training
from pipeline.config import StageParams, TrainSegParams
from pipeline.data.datasets import normalize, size_batches
from pipeline.data.layout import PreparedDataset
from pipeline.data.seg_datasets import SegmentationTrainSet
from pipeline.io import labels_fingerprint
from pipeline.metrics import confusion_matrix, iou_report, mean_iou
from pipeline.models.deeplab import Segmenter, build_segmenter, predict_probs, save_segmenter, segmentation_loss
from pipeline.shard import Shard


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
    shard: Shard | None = None,
) -> np.ndarray:
    """Single-scale confusion matrix of a split against its ground-truth masks (metrics only).

    With a ``shard`` of a ``torchrun`` launch, each process predicts its share of the one-process batches
    (:meth:`Shard.mine`) and the main process sums the matrices: every process must call it.

    Returns:
        (K, K) int64 matrix, rows = ground truth: the whole split's on the main process, this process's share
        on the others.
    """
    shard = shard or Shard()
    was_training = model.training
    model.eval()
    confusion = np.zeros((data.num_classes, data.num_classes), np.int64)
    for ids in shard.mine(size_batches(data.split(split), data.image_size, batch_size)):
        x = torch.stack([normalize(data.load_image(i), mean, std) for i in ids]).to(device)  # (B, 3, H, W)
        pred = predict_probs(model, x, (1.0,), False, amp).argmax(1).cpu().numpy()  # (B, H, W)
        for row, image_id in enumerate(ids):
            confusion += confusion_matrix(pred[row], data.load_mask(image_id), data.num_classes)
    model.train(was_training)
    parts = shard.gather(confusion)
    return np.sum(parts, axis=0) if shard.is_main else confusion


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
    return training.make_optimizer(cfg.optimizer, groups, cfg.momentum)


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
    batch_size = training.rehearsal_batch("train_seg", cfg.batch_size, len(data.split(cfg.split)), params.data.subset)
    run = training.setup("train_seg", cfg.device, cfg.threads, params.seed, batch_size, min_per_rank=2)
    mean, std = tuple(params.data.mean), tuple(params.data.std)
    trainset = SegmentationTrainSet(
        data, cfg.split, labels_dir, cfg.crop_size, cfg.scale_range, cfg.flip, mean, std, params.seed
    )
    model = build_segmenter(
        cfg.arch, cfg.encoder, data.num_classes, cfg.encoder_weights, cfg.output_stride, cfg.decoder_channels
    ).to(run.device)

    def step(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(run.device, non_blocking=True)  # (B, 3, S, S)
        target = batch["label"].to(run.device, non_blocking=True)  # (B, S, S)
        with runtime.autocast(run.device, cfg.amp):
            logits = net(images)  # (B, K, S, S)
        loss = segmentation_loss(logits, target)
        return loss, {"loss": loss}

    def validate(epoch: int) -> dict[str, float]:
        last = epoch + 1 == cfg.epochs
        if not (last or (cfg.val_every and (epoch + 1) % cfg.val_every == 0)):
            return {}
        shard = Shard(run.dist)  # every process predicts its share of val (validate_everywhere)
        confusion = split_confusion(model, data, "val", mean, std, run.device, cfg.amp, shard=shard)
        if not shard.is_main:
            return {}
        return iou_report(confusion, data.class_names, "val") if last else {"val/miou": mean_iou(confusion)}

    task = training.Task(
        "train_seg",
        model,
        _make_optimizer(cfg, model),
        trainset,
        step,
        save=lambda trained: save_segmenter(trained, _meta(params, data), model_dir),
        validate=validate,
        sync_batchnorm=True,
        validate_everywhere=True,
    )
    digest = f"{params.digest()}-{labels_fingerprint(Path(labels_dir), trainset.ids)}"  # the pseudo labels too
    history = training.fit(task, training.Recipe.of(cfg, batch_size=batch_size), run, results_dir, checkpoint, digest)
    return {k: v for k, v in history[-1].items() if k.startswith("val/")} if history else {}
