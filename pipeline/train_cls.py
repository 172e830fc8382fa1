"""``train_cls``: fine-tune the classifier (SWTformer, or the DeiT classifier: ``model.arch``) on image-level labels.

Writes ``<model_dir>/model.safetensors`` + ``meta.json`` (everything ``cams`` needs to rebuild the model),
dvclive curves and metrics in ``<results_dir>``, and a resumable checkpoint in ``<checkpoint>`` after every
epoch (the loop, resume and checkpoints are :func:`pipeline.training.fit`'s).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline import runtime, training
from pipeline.aream import aream_terms
from pipeline.config import StageParams
from pipeline.data.datasets import ClassificationEvalSet, ClassificationTrainSet, index_batches
from pipeline.data.layout import PreparedDataset
from pipeline.errors import ConfigError
from pipeline.losses import deit_loss, swtformer_loss
from pipeline.metrics import classification_map
from pipeline.models.files import save_model_dir
from pipeline.models.swtformer import build_model, shared_classifier_scores
from pipeline.refinement.par import PAR
from pipeline.shard import Shard


def label_mask(valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) valid pixels, (B, C) labels -> (B, C+1, H, W) mask: background = valid, class k = valid * y_k."""
    return torch.cat([valid, valid * labels[:, :, None, None]], dim=1)


def _meta(params: StageParams, data: PreparedDataset) -> dict[str, Any]:
    """Everything ``cams`` needs to rebuild the classifier (``meta.json``), and AReAM's inference settings."""
    aream = params.loss.aream
    return {
        "model": params.model.model_dump(mode="json"),
        "num_classes": data.num_classes - 1,
        "img_size": params.train_cls.crop_size,
        "mean": list(params.data.mean),
        "std": list(params.data.std),
        "class_names": data.class_names,
        "aream": aream.model_dump(include={"stage", "steps"}) if aream.enabled else False,
    }


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
        DatasetError: If no image of ``train_aug`` or ``val`` has a class label.
    """
    cfg = params.train_cls
    data = PreparedDataset.open(data_dir)
    for split in ("train_aug", "val"):
        data.count_unlabelled(split, "train_cls")
    batch_size = training.rehearsal_batch("train_cls", cfg.batch_size, len(data.split("train_aug")), params.data.subset)
    run = training.setup("train_cls", cfg.device, cfg.threads, params.seed, batch_size)
    mean, std = params.data.mean, params.data.std
    trainset = ClassificationTrainSet(
        data,
        "train_aug",
        cfg.crop_size,
        cfg.resize_long,
        cfg.flip,
        cfg.color_jitter,
        mean,
        std,
        params.seed,
        cfg.cache_images,
    )
    valset = ClassificationEvalSet(data, "val", cfg.crop_size, mean, std)
    plan = index_batches(len(valset), cfg.batch_size)
    shard = Shard(run.dist)  # under torchrun every process scores its share of val's batches
    # its own generator: loading the val set must not move the global RNG that initialises the model
    val_loader = DataLoader(
        valset, batch_sampler=shard.mine(plan), num_workers=cfg.num_workers, generator=torch.Generator()
    )
    val_batches = list(val_loader) if cfg.cache_images else val_loader  # deterministic
    model = build_model(data.num_classes - 1, cfg.crop_size, **params.model.model_dump()).to(run.device)
    check_aream_split(params, model)
    groups = training.param_groups(model, model.new_modules(), cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    task = training.Task(
        "train_cls",
        model,
        torch.optim.AdamW(groups),
        trainset,
        _loss_step(run.device, cfg.amp, params.model.arch, params.loss.model_dump(), lambda: trainset.epoch),
        save=lambda trained: save_model_dir(model_dir, trained, _meta(params, data)),
        validate=lambda epoch: _validate(model, val_batches, len(plan), run.device, cfg.amp, shard),
        find_unused_parameters=_has_unused_parameters(params),
        validate_everywhere=True,
    )
    history = training.fit(
        task, training.Recipe.of(cfg, batch_size=batch_size), run, results_dir, checkpoint, params.digest()
    )
    return {k: v for k, v in history[-1].items() if k.startswith("val/")} if history else {}


def _has_unused_parameters(params: StageParams) -> bool:
    """Whether DDP must look for parameters without gradients.

    SWTformer-V2's HFF when GSC and CCL are off; the ViT's final LayerNorm when ``final_norm`` is off.
    """
    model, loss = params.model, params.loss
    if model.arch == "deit":
        return not model.final_norm
    return model.version == "v2" and not (loss.gsc or loss.ccl)


def check_aream_split(params: StageParams, model: torch.nn.Module) -> None:
    """Refuse an AReAM ``split`` that leaves no deep block (a timm model's depth is known once it is built).

    Raises:
        ConfigError: If ``loss.aream.split`` is not below the number of blocks (the ViT's, or the Swin stage's).
    """
    aream = params.loss.aream
    if not aream.enabled:
        return
    blocks = model.stage_blocks(aream.stage) if hasattr(model, "stage_blocks") else model.attentions
    if aream.split_of(len(blocks)) >= len(blocks):
        raise ConfigError(
            f"loss.aream.split = {aream.split_of(len(blocks))} must be below the {len(blocks)} blocks AReAM uses "
            "(blocks >= split are the deep ones)"
        )


def _loss_step(
    device: torch.device, amp: bool, arch: str, loss_args: dict[str, Any], epoch: Callable[[], int]
) -> training.Step:
    """The training step of :class:`pipeline.training.Task`: forward with the label mask, the ``arch``'s losses.

    SWTformer: :func:`swtformer_loss` (CLS, and GSC + CCL for V2); DeiT: :func:`deit_loss` (class-token and
    patch-token soft margin, weighted by ``loss.cls_weight``), plus from epoch ``loss.aream.warmup_epochs`` on
    (``epoch()`` is the current 0-based epoch) AReAM's affinity loss when ``loss.aream.enabled``.
    """
    aream = loss_args.pop("aream")
    par = PAR()

    def step(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        labels = batch["labels"].to(device)  # (B, C)
        valid = batch["valid"].to(device)  # (B, 1, S, S)
        mask = label_mask(valid, labels)  # (B, C+1, S, S)
        attention = aream["enabled"] and epoch() >= aream["warmup_epochs"]
        with runtime.autocast(device, amp):
            if not attention:
                out = net(images, mask)
            elif arch == "deit":
                out = net(images, mask, attention=True)
            else:
                out = net(images, mask, attention=True, stage=aream["stage"])
        if arch == "deit":
            terms = deit_loss(out, labels, cls_weight=loss_args["cls_weight"])
        else:
            terms = swtformer_loss(out, labels, mask, **loss_args)
        if attention:
            terms |= aream_terms(par, out, images, labels, valid, aream)
            terms["total"] = terms["total"] + aream["weight"] * terms["aff"]
        return terms["total"], {f"loss_{name}": value for name, value in terms.items()}

    return step


def _validate(
    model: torch.nn.Module, batches: Any, count: int, device: torch.device, amp: bool, shard: Shard
) -> dict[str, float]:
    """Val mAP of the classifier, its batches shared by the ranks; the metrics on the main process, ``{}`` elsewhere."""
    scores = shared_classifier_scores(model, batches, count, device, amp, shard)
    return {} if scores is None else {f"val/{name}": value for name, value in classification_map(*scores).items()}
