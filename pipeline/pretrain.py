"""``pretrain``: pretraining of the classifier's encoder on generated images (fractals or many-class scenes).

The encoder is the one ``model`` describes (the Swin of SWTformer, or the ViT of the DeiT classifier), trained with
a linear head through the one training loop, on :mod:`pipeline.data.pretrain_images`' images: FractalDB-style
categories (cross-entropy with label smoothing; held-out top-1) or the stand-ins' patterned many-class scenes
(binary cross-entropy; held-out class-wise mAP). Writes the encoder's weights as ``.safetensors`` (usable as
``model.pretrained`` or ``model.vit.pretrained``) and beside them a manifest ``<name>.json``: the file's SHA-256,
the command and params that reproduce it, the held-out metric per epoch.
:func:`pipeline.models.pretrained.load_pretrained` checks the checksum before loading.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline import runtime, training
from pipeline.config import ModelParams, StageParams
from pipeline.data.fractals import render_instances, search_categories
from pipeline.data.pretrain_images import PretrainImages, pretrain_looks, render_scenes
from pipeline.io import sha256_of, write_json
from pipeline.metrics import classification_map
from pipeline.models.pretrained import save_state_dict
from pipeline.models.swtformer import build_model

log = logging.getLogger(__name__)


class PretrainNet(nn.Module):
    """An encoder that returns pooled (B, D) features (a timm model built with ``num_classes=0``) + a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, K) logits."""
        return self.head(self.encoder(images))


def build_encoder(model: ModelParams, img_size: int) -> nn.Module:
    """The timm encoder of the classifier ``model`` describes, randomly initialised (its ``pretrained`` ignored).

    Returns:
        The Swin (``arch: swtformer``) or ViT (``arch: deit``), whose state dict is what ``model.pretrained`` (or
        ``model.vit.pretrained``) loads.
    """
    spec = model.model_dump()
    spec["pretrained"] = "none"
    spec["vit"]["pretrained"] = "none"
    classifier = build_model(1, img_size, **spec)
    return classifier.vit if model.arch == "deit" else classifier.backbone.model


def pretrain_sets(params: StageParams) -> tuple[PretrainImages, PretrainImages]:
    """The training and held-out sets of ``pretrain`` (same categories, disjoint draws).

    ``source: fractals``: ``categories`` IFS, ``instances`` (``val_instances``) renders each, one label per image.
    ``source: scenes``: ``categories`` patterned looks, ``categories x instances`` (``x val_instances``) scenes,
    multi-hot labels.
    """
    cfg = params.pretrain
    mean, std = params.data.mean, params.data.std
    if cfg.source == "scenes":
        looks = pretrain_looks(cfg.categories)
        train_count, held_count = cfg.categories * cfg.instances, cfg.categories * cfg.val_instances
        train = render_scenes(looks, train_count, cfg.image_size, cfg.seed, desc="scene train images")
        held = render_scenes(looks, held_count, cfg.image_size, cfg.seed, first=train_count, desc="scene held-out")
    else:
        systems = search_categories(cfg.categories, np.random.default_rng([cfg.seed, 1]), cfg.min_fill)
        drawing = {"size": cfg.image_size, "points": cfg.points, "seed": cfg.seed}
        labels = np.arange(cfg.categories)
        train = (
            render_instances(systems, cfg.instances, **drawing, desc="fractal train images"),
            np.repeat(labels, cfg.instances),
        )
        held = (
            render_instances(systems, cfg.val_instances, **drawing, first=cfg.instances, desc="fractal held-out"),
            np.repeat(labels, cfg.val_instances),
        )
    return (
        PretrainImages(*train, mean, std, augment=True, seed=cfg.seed),
        PretrainImages(*held, mean, std, augment=False),
    )


def pretrain(params: StageParams, out: Path, results_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Pretrain the encoder and write ``out`` (weights) and its manifest ``out.with_suffix('.json')``.

    Args:
        params: Sections ``data`` (normalisation), ``model`` (the encoder) and ``pretrain``.
        out: The ``.safetensors`` file to write.
        results_dir: dvclive directory (curves of loss and held-out top-1).
        checkpoint: Resumable checkpoint (deleted when training completes).

    Returns:
        The manifest.

    Raises:
        TrainingError: On a non-finite loss or an impossible device/batch set-up.
    """
    cfg = params.pretrain
    started = time.time()
    run = training.setup("pretrain", cfg.device, cfg.threads, cfg.seed, cfg.batch_size)
    trainset, heldset = pretrain_sets(params)
    scenes = cfg.source == "scenes"
    metric = "map_classwise" if scenes else "top1"
    evaluate = held_out_map if scenes else top1
    model = PretrainNet(build_encoder(params.model, cfg.image_size), cfg.categories).to(run.device)
    groups = training.param_groups(model, [model.head], cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    held_loader = DataLoader(heldset, batch_size=256, generator=torch.Generator())
    task = training.Task(
        "pretrain",
        model,
        torch.optim.AdamW(groups),
        trainset,
        _loss_step(run.device, cfg.amp, cfg.label_smoothing, multi_label=scenes),
        save=lambda trained: save_state_dict(trained.encoder.state_dict(), out),
        validate=lambda epoch: {f"val/{metric}": evaluate(model, held_loader, run.device, cfg.amp)},
    )
    history = training.fit(task, training.Recipe.of(cfg), run, results_dir, checkpoint, params.digest())
    if not run.dist.is_main:
        return {}
    manifest = {
        "file": out.name,
        "sha256": sha256_of(out),
        "command": shlex.join(["wsss", *sys.argv[1:]]) if Path(sys.argv[0]).name == "wsss" else None,
        "params": {"model": params.model.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")},
        "held_out_metric": metric,
        "held_out": [round(record[f"val/{metric}"], 4) for record in history],
        "minutes": round((time.time() - started) / 60, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(out.with_suffix(".json"), manifest)
    return manifest


def _loss_step(device: torch.device, amp: bool, smoothing: float, multi_label: bool) -> training.Step:
    """Cross-entropy over the categories with label smoothing, or (``multi_label``) binary cross-entropy."""

    def step(net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        labels = batch["label"].to(device)  # (B,) category indices, or (B, K) multi-hot
        with runtime.autocast(device, amp):
            logits = net(images)  # (B, K)
        if multi_label:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        else:
            loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        return loss, {"loss": loss}

    return step


@torch.no_grad()
def _scores(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) logits and the labels of ``loader``'s images (model left in training mode)."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        with runtime.autocast(device, amp):
            logits.append(model(batch["image"].to(device)).float().cpu())  # (B, K)
        labels.append(batch["label"])
    model.train()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def top1(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    """The fraction of ``loader``'s images whose highest logit is their category."""
    logits, labels = _scores(model, loader, device, amp)
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def held_out_map(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    """Class-wise mAP of ``loader``'s multi-label images (classes without a positive skipped)."""
    logits, labels = _scores(model, loader, device, amp)
    return classification_map(logits, labels)["map_classwise"]
