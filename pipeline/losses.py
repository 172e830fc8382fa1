"""Classifier losses: SWTformer's and the DeiT classifier's.

SWTformer: CLS (multilabel soft margin), GSC (CAM <-> R-CAM L1) and CCL (literal or contrastive). DeiT: the
class-token + patch-token soft margin (MCTformer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.models.swtformer import max_norm


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss averaged over classes and images: (B, C), (B, C) -> ()."""
    return F.multilabel_soft_margin_loss(logits.float(), labels)


def gsc_loss(cam_bg: torch.Tensor, rcam: torch.Tensor) -> torch.Tensor:
    """Global semantic consistency: mean |M - R~| over every element (SIPE's form of SWTformer Eq. 5).

    Args:
        cam_bg: (B, K, H, W) CAM with background, masked by labels and valid pixels, on the R-CAM grid.
        rcam: (B, K, H, W) max-normalised R-CAM.
    """
    return (cam_bg - rcam).abs().mean()


def spatial_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between every channel of ``a`` and every channel of ``b`` over space: (B,K,H,W)^2 -> (B,K,K)."""
    a = F.normalize(a.flatten(2), dim=2, eps=1e-8)
    b = F.normalize(b.flatten(2), dim=2, eps=1e-8)
    return torch.bmm(a, b.transpose(1, 2))


def ccl_literal(cos: torch.Tensor) -> torch.Tensor:
    """SWTformer Eq. 6 applied elementwise: 0.5 * ((2/3 cos)^2 + (1 - cos)^2)."""
    return 0.5 * ((2.0 / 3.0 * cos) ** 2 + (1.0 - cos) ** 2)


def ccl_loss(cam_bg: torch.Tensor, rcam: torch.Tensor, present: torch.Tensor, mode: str) -> torch.Tensor:
    """Class-wise contrastive loss between CAM and R-CAM.

    ``literal``: Eq. 6 on the per-class spatial cosine cos(M_k, R~_k), averaged over present channels.
    ``contrastive``: on the K x K cosine matrix between M_k and R~_k', positives (k = k') give
    0.5 (1 - cos)^2 and negatives (k != k', both present) 0.5 (2/3 cos)^2, averaged over present pairs.

    Args:
        cam_bg: (B, K, H, W) masked CAM with background.
        rcam: (B, K, H, W) max-normalised R-CAM.
        present: (B, K) 0/1 mask of present channels (background always 1).
        mode: ``literal`` or ``contrastive``.
    """
    cos = spatial_cosine(cam_bg.float(), rcam.float())  # (B, K, K)
    if mode == "literal":
        diagonal = torch.diagonal(cos, dim1=1, dim2=2)  # (B, K)
        return (ccl_literal(diagonal) * present).sum() / present.sum().clamp_min(1)
    pairs = present.unsqueeze(2) * present.unsqueeze(1)  # (B, K, K)
    eye = torch.eye(cos.shape[1], device=cos.device, dtype=cos.dtype)
    per_pair = eye * 0.5 * (1.0 - cos) ** 2 + (1.0 - eye) * 0.5 * (2.0 / 3.0 * cos) ** 2
    return (per_pair * pairs).sum() / pairs.sum().clamp_min(1)


def swtformer_loss(
    out: dict[str, torch.Tensor],
    labels: torch.Tensor,
    valid_mask: torch.Tensor,
    *,
    cls_weight: float = 1.0,
    gsc: bool = True,
    gsc_weight: float = 1.0,
    ccl: bool = True,
    ccl_weight: float = 1.0,
    ccl_mode: str = "literal",
    detach_cam: str = "none",
    aream: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """All loss terms of one training step.

    Args:
        out: Model output (``logits``; for V2 also ``cam_bg`` and ``rcam``).
        labels: (B, C) image-level labels.
        valid_mask: (B, K, H, W) mask at image resolution: channel 0 = valid (non-padded) pixels, channel k =
            valid pixels times the label of class k.
        cls_weight: Weight of the classification term.
        gsc: Add the GSC term (V2 only).
        gsc_weight: Its weight.
        ccl: Add the CCL term (V2 only).
        ccl_weight: Its weight.
        ccl_mode: ``literal`` (paper Eq. 6) or ``contrastive``.
        detach_cam: Where the CAM is a fixed target, so that only R-CAM's branch (HFF) learns from the term:
            ``none`` (SIPE's code: GSC and CCL also train the CAM head and the backbone), ``ccl`` (in CCL only) or
            ``both`` (the CAM branch then learns from classification alone, as V1's).
        aream: ``loss.aream``, the DeiT classifier's (pipeline/aream.py); accepted so that the whole ``loss``
            section can be passed, unused here.

    Returns:
        ``{"cls": ..., ["gsc": ...], ["ccl": ...], "total": ...}`` (unweighted terms plus the weighted total).
    """
    terms = {"cls": classification_loss(out["logits"], labels)}
    total = cls_weight * terms["cls"]
    if "rcam" in out and (gsc or ccl):
        size = out["rcam"].shape[-2:]
        mask = F.interpolate(valid_mask, size=size, mode="nearest")  # (B, K, H3, W3)
        cam = F.interpolate(out["cam_bg"], size=size, mode="bilinear", align_corners=True) * mask
        rcam = max_norm(out["rcam"])
        if gsc:
            terms["gsc"] = gsc_loss(cam.detach() if detach_cam == "both" else cam, rcam)
            total = total + gsc_weight * terms["gsc"]
        if ccl:
            present = (valid_mask.amax(dim=(2, 3)) > 0).to(cam.dtype)  # (B, K)
            terms["ccl"] = ccl_loss(cam.detach() if detach_cam in ("ccl", "both") else cam, rcam, present, ccl_mode)
            total = total + ccl_weight * terms["ccl"]
    terms["total"] = total
    return terms


def deit_loss(
    out: dict[str, torch.Tensor], labels: torch.Tensor, *, cls_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """The DeiT classifier's loss (MCTformer-V2, AReAM's baseline): soft margin on both sets of scores.

    Args:
        out: Model output with ``logits`` (B, C) from the class token and ``patch_logits`` (B, C), the GAP of
            the patch-token CAM head.
        labels: (B, C) image-level labels.
        cls_weight: Weight of both terms (MCTformer weighs them 1 each).

    Returns:
        ``{"cls": ..., "patch": ..., "total": cls_weight * (cls + patch)}``.
    """
    terms = {
        "cls": classification_loss(out["logits"], labels),
        "patch": classification_loss(out["patch_logits"], labels),
    }
    terms["total"] = cls_weight * (terms["cls"] + terms["patch"])
    return terms
