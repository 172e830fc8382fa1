"""SWTformer V1/V2: the patch-token CAM head, HFF, structure-aware seeds and background-aware prototypes.

:func:`build_model` and :func:`load_classifier` also build the DeiT classifier (``model.arch: deit``,
:mod:`pipeline.models.deit`).

V1 = Swin backbone + a conv CAM head on the last stage (GAP logits, ReLU + max-normalised CAM).
V2 adds (SIPE's machinery with SWTformer's three changes; docs/classifier.md):
hierarchical feature fusion (HFF) of the four stages, a background map ``1 - max_c M_c``, seeds located by
the soft IoU between each token's structure (absolute cosine affinity of last-stage tokens) and each
class map, class prototypes on the HFF feature, and R-CAM = ReLU(cosine) to the prototypes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from pipeline import runtime
from pipeline.aream import fused_affinity, reactivate_steps, window_walk
from pipeline.errors import ModelError, one_line
from pipeline.models.backbone import SwinBackbone, build_backbone
from pipeline.models.files import META, load_weights, read_model_dir, retrain_hint
from pipeline.models.window_attention import record_window_attention

EPS = 1e-5


def max_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Divide each (image, channel) map by its spatial maximum: (B, K, H, W) -> (B, K, H, W)."""
    return x / (x.amax(dim=(2, 3), keepdim=True) + eps)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """Prepend the background map ``1 - max_c M_c`` to max-normalised CAMs: (B, C, h, w) -> (B, C+1, h, w).

    With no class (C = 0: an image without image-level labels) the background is 1 everywhere.
    """
    if cam.shape[1] == 0:
        return cam.new_ones(cam.shape[0], 1, *cam.shape[2:])  # (B, 1, h, w)
    return torch.cat([1.0 - cam.amax(dim=1, keepdim=True), cam], dim=1)


@torch.no_grad()
def structure_aware_seeds(
    cam: torch.Tensor, tokens: torch.Tensor, label_mask: torch.Tensor, bg_iou_scale: float = 0.5
) -> torch.Tensor:
    """Assign every token to the class whose map best overlaps the token's structure (soft IoU).

    The structure of token i is its row of the absolute cosine affinity ``S_ij = |cos(t_i, t_j)|``
    (SWTformer Eq. 4). ``IoU_k(i) = sum_j S_ij M_k(j) / (sum_j S_ij + sum_j M_k(j) - sum_j S_ij M_k(j))``;
    the background IoU is multiplied by ``bg_iou_scale``; the seed is the one-hot argmax, masked by the labels.

    Args:
        cam: (B, K, h, w) maps with background first, already masked by ``label_mask``.
        tokens: (B, D, h, w) last-stage tokens.
        label_mask: (B, K, h, w) or (B, K, 1, 1) 0/1 mask of the allowed classes (and valid pixels).
        bg_iou_scale: Weight of the background IoU.

    Returns:
        (B, K, h, w) one-hot seeds (all-zero where the winning class is not allowed).
    """
    b, k, h, w = cam.shape
    feats = F.normalize(tokens.float().flatten(2), dim=1, eps=EPS)  # (B, D, hw)
    affinity = torch.bmm(feats.transpose(1, 2), feats).abs()  # (B, hw, hw)
    maps = cam.float().flatten(2)  # (B, K, hw)
    inter = torch.bmm(maps, affinity)  # (B, K, hw), S is symmetric
    union = affinity.sum(dim=1).unsqueeze(1) + maps.sum(dim=2, keepdim=True) - inter
    iou = inter / union.clamp_min(EPS)
    iou[:, 0] *= bg_iou_scale
    seeds = F.one_hot(iou.argmax(dim=1), k).permute(0, 2, 1).reshape(b, k, h, w).to(cam.dtype)
    return seeds * label_mask


def argmax_seeds(cam: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Seeds without structure: the one-hot argmax of ``cam`` over the allowed channels.

    Args:
        cam: (B, K, h, w) maps with background first.
        label_mask: (B, K, h, w) or (B, K, 1, 1) 0/1 mask of the allowed classes (and valid pixels).

    Returns:
        (B, K, h, w) one-hot seeds masked by ``label_mask``.
    """
    allowed = torch.where(label_mask.bool(), cam.float(), torch.finfo(torch.float32).min)  # (B, K, h, w)
    return F.one_hot(allowed.argmax(dim=1), cam.shape[1]).permute(0, 3, 1, 2).to(cam.dtype) * label_mask


def prototypes(seeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Class prototypes: seed-masked average of the features (divided by the map area, as SIPE does).

    Args:
        seeds: (B, K, h, w) one-hot seeds on any grid (nearest-resized to the feature grid).
        features: (B, D, H, W) fused features.

    Returns:
        (B, K, D) prototypes; zero for a class without seeds.
    """
    seeds = F.interpolate(seeds, size=features.shape[-2:], mode="nearest")  # (B, K, H, W)
    return torch.einsum("bkhw,bdhw->bkd", seeds, features) / features.shape[-2:].numel()


def refined_cam(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """R-CAM = ReLU(cos(feature, prototype)): (B, D, H, W), (B, K, D) -> (B, K, H, W); zero prototypes give 0."""
    feats = F.normalize(features, dim=1, eps=1e-8)
    protos = F.normalize(protos, dim=2, eps=1e-8)
    return F.relu(torch.einsum("bdhw,bkd->bkhw", feats, protos))


class HierarchicalFeatureFusion(nn.Module):
    """HFF: project the four stage maps, L2-normalise each, and concatenate them on the stage-3 grid.

    Stages 1 and 2 are brought down by strided convolutions (kernel = stride = the resolution ratio), stage 3
    by a 1x1 convolution, stage 4 by a 1x1 convolution followed by bilinear upsampling.

    Args:
        in_channels: Channels of the four stages.
        strides: Output strides of the four stages.
        out_channels: Projected channels per stage; the fused map has their sum.
        detach_inputs: Stop gradients into the backbone (HFF then learns from GSC/CCL only, as in SIPE).
    """

    def __init__(
        self, in_channels: list[int], strides: list[int], out_channels: tuple[int, ...], detach_inputs: bool
    ) -> None:
        super().__init__()
        target = strides[2]
        layers = []
        for cin, stride, cout in zip(in_channels, strides, out_channels, strict=True):
            ratio = max(1, target // stride)
            layers.append(nn.Conv2d(cin, cout, kernel_size=ratio, stride=ratio, bias=False))
        self.projections = nn.ModuleList(layers)
        self.detach_inputs = detach_inputs
        self.out_channels = sum(out_channels)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """(B, C_i, H_i, W_i) x 4 -> (B, sum(out_channels), H_3, W_3)."""
        size = stages[2].shape[-2:]
        fused = []
        for stage, projection in zip(stages, self.projections, strict=True):
            x = projection(stage.detach() if self.detach_inputs else stage)
            x = F.normalize(x, dim=1, eps=EPS)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused.append(x)
        return torch.cat(fused, dim=1)


@dataclass
class Features:
    """What the network computes before any label is used (summable across flips at inference)."""

    logit_map: torch.Tensor  # (B, C, h, w) raw CAM head output
    tokens: torch.Tensor  # (B, D, h, w) last-stage tokens
    fused: torch.Tensor | None  # (B, D_hff, H3, W3) HFF feature (V2 only)


class SWTformer(nn.Module):
    """SWTformer classifier (V1 or V2).

    Args:
        backbone: The Swin backbone.
        num_classes: Number of foreground classes C.
        version: ``v1`` (CAM head only) or ``v2`` (+ HFF, seeds, prototypes, R-CAM).
        head_kernel: Kernel of the CAM head convolution (1 or 3).
        hff_dims: HFF's projected channels per stage (V2).
        detach_hff_inputs: Stop gradients from HFF into the backbone (V2).
        bg_iou_scale: Weight of the background IoU in structure-aware seed locating (V2).
    """

    def __init__(
        self,
        backbone: SwinBackbone,
        num_classes: int,
        *,
        version: str = "v2",
        head_kernel: int = 3,
        hff_dims: tuple[int, ...] = (32, 32, 64, 64),
        detach_hff_inputs: bool = True,
        bg_iou_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if version not in ("v1", "v2"):
            raise ValueError(f"unknown SWTformer version {version!r} (v1 | v2)")
        self.backbone = backbone
        self.version = version
        self.bg_iou_scale = bg_iou_scale
        self.cam_head = nn.Conv2d(
            backbone.channels[-1], num_classes, head_kernel, padding=head_kernel // 2, bias=head_kernel == 3
        )
        self.hff = (
            HierarchicalFeatureFusion(backbone.channels, backbone.strides, hff_dims, detach_hff_inputs)
            if version == "v2"
            else None
        )

    def new_modules(self) -> list[nn.Module]:
        """The layers trained from scratch (they get the head learning rate)."""
        return [m for m in (self.cam_head, self.hff) if m is not None]

    def features(self, x: torch.Tensor) -> Features:
        """Run the backbone, the CAM head and (V2) HFF on (B, 3, H, W) images."""
        stages = self.backbone(x)
        tokens = stages[-1]  # (B, D, h, w)
        return Features(self.cam_head(tokens), tokens, self.hff(stages) if self.hff is not None else None)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits only (no HFF, no seeds): (B, 3, H, W) -> (B, C)."""
        return self.cam_head(self.backbone(x)[-1]).mean(dim=(2, 3))

    def maps(
        self, feats: Features, label_mask: torch.Tensor | None, seed_locating: str = "structure"
    ) -> dict[str, torch.Tensor]:
        """Turn features into logits, CAMs and (V2) seeds and R-CAMs.

        Args:
            feats: Output of :meth:`features`.
            label_mask: (B, K, h', w') or (B, K, 1, 1) 0/1 mask over background + classes (channel 0 = valid
                pixels). Needed for V2; resized (nearest) to the token grid.
            seed_locating: ``structure`` (:func:`structure_aware_seeds`, SWTformer's; used in training) or
                ``cam`` (:func:`argmax_seeds` of the CAM with background).

        Returns:
            ``logits`` (B, C); ``cam`` (B, C, h, w) max-normalised; for V2 also ``cam_bg`` (B, K, h, w)
            unmasked CAM with background, ``seeds`` (B, K, h, w) and ``rcam`` (B, K, H3, W3).
        """
        logits = feats.logit_map.mean(dim=(2, 3))  # (B, C)
        cam = max_norm(F.relu(feats.logit_map))  # (B, C, h, w)
        out = {"logits": logits, "cam": cam}
        if feats.fused is None:
            return out
        if label_mask is None:
            raise ValueError("SWTformer-V2 needs a label mask to locate seeds")
        cam_bg = with_background(cam)  # (B, K, h, w)
        mask = label_mask if label_mask.shape[-1] == 1 else F.interpolate(label_mask, cam_bg.shape[-2:])
        if seed_locating == "structure":
            seeds = structure_aware_seeds(cam_bg.detach() * mask, feats.tokens.detach(), mask, self.bg_iou_scale)
        elif seed_locating == "cam":
            seeds = argmax_seeds(cam_bg.detach(), mask)
        else:
            raise ValueError(f"unknown seed_locating {seed_locating!r} (structure | cam)")
        out.update(cam_bg=cam_bg, seeds=seeds, rcam=refined_cam(feats.fused, prototypes(seeds, feats.fused)))
        return out

    def stage_blocks(self, stage: int) -> list[SwinTransformerBlock]:
        """The Swin blocks of ``stage`` (1-based), whose attention AReAM uses."""
        return list(self.backbone.model.layers[stage - 1].blocks)

    def forward(
        self, x: torch.Tensor, label_mask: torch.Tensor | None = None, attention: bool = False, stage: int = 3
    ) -> dict[str, Any]:
        """Full forward pass: see :meth:`maps`.

        With ``attention``, also the attention of the blocks of Swin stage ``stage`` (AReAM, S1):
        ``attention`` (B, 1, N, N) probabilities on the stage's token grid ``attention_grid`` (H, W), zero outside
        each window; ``attention_logits`` (B, nW, M^2, M^2) per window; ``attention_windows`` (slot -> token
        index, valid pairs) per block (:mod:`pipeline.models.window_attention`). Head means, one per block.
        """
        if not attention:
            return self.maps(self.features(x), label_mask)
        with record_window_attention(self.stage_blocks(stage)) as records:
            feats = self.features(x)
        return self.maps(feats, label_mask) | {
            "attention": [record.dense()[:, None] for record in records],
            "attention_logits": [record.logits for record in records],
            "attention_windows": [(record.index, record.valid) for record in records],
            "attention_grid": records[0].grid,
        }

    def reactivated(self, x: torch.Tensor, stage: int = 3, steps: int = 1) -> tuple[Features, torch.Tensor]:
        """AReAM's inference (S1): :meth:`features` and the CAM re-activated through ``stage``'s window attention.

        Returns:
            :meth:`features`' output and the (B, C, H_s, W_s) max-normalised CAM, resampled to the stage's grid,
            re-activated ``steps`` times by the identity plus the block mean of the stage's attention, rows
            renormalised (:func:`pipeline.aream.window_walk`).
        """
        with record_window_attention(self.stage_blocks(stage)) as records:
            feats = self.features(x)
        affinity = window_walk(fused_affinity([record.dense()[:, None] for record in records], 0))  # (B, N, N)
        cam = F.interpolate(max_norm(F.relu(feats.logit_map)), size=records[0].grid, mode="bilinear")
        return feats, reactivate_steps(cam, affinity, steps)


def build_model(
    num_classes: int,
    img_size: int,
    *,
    arch: str = "swtformer",
    backbone: str = "small",
    swin: Mapping[str, Any] | None = None,
    vit: Mapping[str, Any] | None = None,
    pretrained: str = "none",
    drop_path_rate: float = 0.0,
    final_norm: bool = True,
    **heads: Any,
) -> nn.Module:
    """Build the classifier of ``model.arch``: an SWTformer (Swin backbone + heads) or the DeiT classifier.

    Args:
        num_classes: Number of foreground classes C.
        img_size: Training crop size (fixes the Swin window layout, and the small ViT's positional embedding).
        arch: ``swtformer`` (:func:`build_backbone` + :class:`SWTformer`) or ``deit``
            (:func:`pipeline.models.deit.build_deit`, which reads ``vit``, ``drop_path_rate``, ``final_norm`` and
            ``head_kernel`` and ignores the Swin-only keys).
        backbone: ``small`` or a timm Swin name.
        swin: The ``small`` Swin configuration.
        vit: ``model.vit`` (``name``, ``pretrained`` and the small ViT configuration), for ``deit``.
        pretrained: ``none``, a local weights file or a timm tag (Swin).
        drop_path_rate: Stochastic depth.
        final_norm: Final LayerNorm on the last stage map (the ViT's tokens).
        **heads: Keyword arguments of :class:`SWTformer` (``version``, ``head_kernel``, ``hff_dims``, ...).
    """
    if arch == "deit":
        from pipeline.models.deit import build_deit  # here: deit imports this module

        if vit is None:
            raise ValueError("arch 'deit' needs its configuration in `vit`")
        kernel = heads.get("head_kernel", 3)
        return build_deit(
            num_classes, img_size, vit, drop_path_rate=drop_path_rate, final_norm=final_norm, head_kernel=kernel
        )
    if arch != "swtformer":
        raise ValueError(f"unknown model.arch {arch!r} (swtformer | deit)")
    trunk = build_backbone(
        backbone, img_size, swin=swin, pretrained=pretrained, drop_path_rate=drop_path_rate, final_norm=final_norm
    )
    return SWTformer(trunk, num_classes, **heads)


@torch.no_grad()
def classifier_scores(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, amp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's (N, C) sigmoid scores and the (N, C) image-level labels of batches of ``ClassificationEvalSet``.

    The model is run in eval mode (and left in the mode it was in).
    """
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in batches:
        with runtime.autocast(device, amp):
            logits = model.classify(batch["image"].to(device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(targets)


def shared_classifier_scores(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], count: int, device: torch.device, amp: bool, shard
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`classifier_scores` of a split whose batches are shared out by rank, merged in order on rank 0.

    Args:
        model: The classifier.
        batches: This rank's batches (``shard.mine`` of the split's batches), in order.
        count: The number of batches of the whole split.
        device: Where the model runs.
        amp: Autocast on CUDA.
        shard: The :class:`pipeline.shard.Shard` of the run (one process: every batch).

    Returns:
        The whole split's (N, C) scores and labels, in the one-process order, on the main process; ``None`` on the
        others.
    """
    parts = list(shard.merged((classifier_scores(model, [batch], device, amp) for batch in batches), count))
    if not shard.is_main:
        return None
    return np.concatenate([s for s, _ in parts]), np.concatenate([t for _, t in parts])


def load_classifier(model_dir: Path | str, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier from ``model.safetensors`` + ``meta.json`` written by ``train_cls``.

    Returns:
        The model on ``device`` in eval mode, and its ``meta.json``.

    Raises:
        ModelError: If the model files are missing, or do not describe a classifier this code builds.
    """
    required = ("model", "num_classes", "img_size", "mean", "std", "class_names")
    weights, meta = read_model_dir(model_dir, "classifier", "train_cls", required)
    try:
        config = {**meta["model"], "pretrained": "none"}
        if isinstance(config.get("vit"), dict):
            config["vit"] = {**config["vit"], "pretrained": "none"}
        model = build_model(meta["num_classes"], meta["img_size"], **config)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{Path(model_dir) / META} does not describe a classifier this version builds ({one_line(exc)}; "
            f"edited? {retrain_hint('train_cls')})"
        ) from None
    try:
        model.load_state_dict(load_weights(weights, "train_cls"))
    except RuntimeError as exc:
        raise ModelError(
            f"{weights} does not match {Path(model_dir) / META} ({one_line(exc)}; {retrain_hint('train_cls')})"
        ) from None
    return model.to(device).eval(), meta
