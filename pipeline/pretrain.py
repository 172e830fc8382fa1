"""``pretrain``: formula-driven pretraining of the classifier's encoder on fractal categories (FractalDB-style).

The encoder is the one ``model`` describes (the Swin of SWTformer, or the ViT of the DeiT classifier), trained with
a linear head to tell :mod:`pipeline.data.fractals`' categories apart (cross-entropy with label smoothing), through
the one training loop. Writes the encoder's weights as ``.safetensors`` (usable as ``model.pretrained`` or
``model.vit.pretrained``) and beside them a manifest ``<name>.json``: the file's SHA-256, the command and params
that reproduce it, the held-out top-1 per epoch. :func:`pipeline.models.pretrained.load_pretrained` checks the
checksum before loading.
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
from pipeline.data.fractals import FractalSet, render_instances, search_categories
from pipeline.io import sha256_of, write_json
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


def fractal_sets(params: StageParams) -> tuple[FractalSet, FractalSet]:
    """The training and held-out fractal sets of ``pretrain`` (same categories, disjoint renders)."""
    cfg = params.pretrain
    systems = search_categories(cfg.categories, np.random.default_rng([cfg.seed, 1]), cfg.min_fill)
    drawing = {"size": cfg.image_size, "points": cfg.points, "seed": cfg.seed}
    train = render_instances(systems, cfg.instances, **drawing, desc="fractal train images")
    held = render_instances(systems, cfg.val_instances, **drawing, first=cfg.instances, desc="fractal held-out images")
    mean, std = params.data.mean, params.data.std
    labels = np.arange(cfg.categories)
    return (
        FractalSet(train, np.repeat(labels, cfg.instances), mean, std, augment=True, seed=cfg.seed),
        FractalSet(held, np.repeat(labels, cfg.val_instances), mean, std, augment=False),
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
    trainset, heldset = fractal_sets(params)
    model = PretrainNet(build_encoder(params.model, cfg.image_size), cfg.categories).to(run.device)
    groups = training.param_groups(model, [model.head], cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    held_loader = DataLoader(heldset, batch_size=256, generator=torch.Generator())
    task = training.Task(
        "pretrain",
        model,
        torch.optim.AdamW(groups),
        trainset,
        _loss_step(run.device, cfg.amp, cfg.label_smoothing),
        save=lambda trained: save_state_dict(trained.encoder.state_dict(), out),
        validate=lambda epoch: {"val/top1": top1(model, held_loader, run.device, cfg.amp)},
    )
    history = training.fit(task, training.Recipe.of(cfg), run, results_dir, checkpoint, params.digest())
    if not run.dist.is_main:
        return {}
    manifest = {
        "file": out.name,
        "sha256": sha256_of(out),
        "command": shlex.join(["wsss", *sys.argv[1:]]) if Path(sys.argv[0]).name == "wsss" else None,
        "params": {"model": params.model.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")},
        "held_out_top1": [round(record["val/top1"], 4) for record in history],
        "minutes": round((time.time() - started) / 60, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(out.with_suffix(".json"), manifest)
    return manifest


def _loss_step(device: torch.device, amp: bool, smoothing: float) -> training.Step:
    """Cross-entropy over the categories, with label smoothing."""

    def step(net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        labels = batch["label"].to(device)  # (B,)
        with runtime.autocast(device, amp):
            logits = net(images)  # (B, K)
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        return loss, {"loss": loss}

    return step


@torch.no_grad()
def top1(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    """The fraction of ``loader``'s images whose highest logit is their category (model left in training mode)."""
    model.eval()
    correct = total = 0
    for batch in loader:
        with runtime.autocast(device, amp):
            logits = model(batch["image"].to(device))  # (B, K)
        correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
        total += len(batch["label"])
    model.train()
    return correct / max(total, 1)
