"""PSA affinity supervision: pixel pairs within a radius, affinity labels from seeds, and the balanced loss.

Pairs live on the feature grid of the AffinityNet (stride ``s``). Each unordered pair of cells closer than
``radius`` is listed once, through an offset ``(dy, dx)`` of the half-plane used by PSA: a tensor of shape
(..., D, h, w) holds, at ``[d, y, x]``, the value for the pair ``(y, x) -> (y + dy_d, x + dx_d)``; pairs whose
target falls outside the grid are invalid.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.layout import IGNORE
from pipeline.refinement.crf import dense_crf
from pipeline.refinement.seeds import with_constant_background, with_power_background

EPS = 1e-5  # PSA's epsilon in the log terms and the pair counts


def radius_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA's half-plane of offsets with ``dy^2 + dx^2 < radius^2`` (34 offsets for radius 5).

    Args:
        radius: Pair radius in grid cells (>= 2).

    Returns:
        ``[(0, 1), ..., (0, r-1)] + [(dy, dx) for dy in 1..r-1, dx in -(r-1)..r-1 inside the circle]``.
    """
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius
    ]
    return offsets


def shifted(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]``, and ``fill`` where that falls outside: (..., h, w) -> same."""
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pair_affinities(features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """PSA affinities ``a_ij = exp(-mean_c |f_i,c - f_j,c|)`` for every listed pair.

    Args:
        features: (B, C, h, w) AffinityNet features.
        offsets: The pair offsets (:func:`radius_offsets`).

    Returns:
        (B, D, h, w) affinities in (0, 1]; entries whose target is outside the grid are meaningless.
    """
    out = [torch.exp(-(features - shifted(features, dy, dx, 0.0)).abs().mean(1)) for dy, dx in offsets]  # D x (B, h, w)
    return torch.stack(out, dim=1)  # (B, D, h, w)


def pair_label_masks(labels: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Split the listed pairs into background-positive, foreground-positive and negative pairs.

    Args:
        labels: (B, h, w) int64 grid labels (0 = background, class ids, 255 = ignore).
        offsets: The pair offsets.

    Returns:
        ``{"bg": ..., "fg": ..., "neg": ...}``, each a (B, D, h, w) bool mask: both cells background; both the
        same foreground class; two different labels. Pairs touching 255 or leaving the grid are in none.
    """
    targets = torch.stack([shifted(labels, dy, dx, IGNORE) for dy, dx in offsets], dim=1)  # (B, D, h, w)
    source = labels[:, None].expand_as(targets)  # (B, D, h, w)
    valid = (source != IGNORE) & (targets != IGNORE)
    same = source == targets
    return {"bg": valid & same & (source == 0), "fg": valid & same & (source != 0), "neg": valid & ~same}


def affinity_loss(affinity: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PSA's balanced affinity loss ``L = L_bg / 4 + L_fg / 4 + L_neg / 2``.

    ``L_bg`` and ``L_fg`` are the mean of ``-log(a + 1e-5)`` over background / foreground positive pairs,
    ``L_neg`` the mean of ``-log(1 + 1e-5 - a)`` over negative pairs (each count + 1e-5, so an empty set
    contributes 0).

    Args:
        affinity: (B, D, h, w) predicted affinities.
        masks: The pair sets of :func:`pair_label_masks`.

    Returns:
        ``{"bg", "fg", "neg", "total"}`` scalar tensors.
    """
    terms = {}
    for name in ("bg", "fg", "neg"):
        mask = masks[name].to(affinity.dtype)
        per_pair = -torch.log(1.0 + EPS - affinity) if name == "neg" else -torch.log(affinity + EPS)
        terms[name] = (per_pair * mask).sum() / (mask.sum() + EPS)
    terms["total"] = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return terms


def confident_labels(
    image: np.ndarray,
    maps: np.ndarray,
    keys: np.ndarray,
    crf: Mapping[str, float],
    fg_background: float,
    bg_background: float,
    mode: str,
) -> np.ndarray:
    """Three-state affinity labels from seeds: confident foreground, confident background, the rest ignored.

    Two CRFs run over ``[bg ; M_c]`` with two background scores: the *strong* background (``fg_background``,
    a high constant or a low power) keeps only confident foreground; the *weak* one (``bg_background``) keeps
    only confident background. ``Y = argmax_strong``, ``Y[argmax_strong == bg] = 255``,
    ``Y[argmax_weak == bg] = 0`` (PSA's rule).

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) stored maps (channel 0 background, replaced here).
        keys: (K,) class ids of the channels.
        crf: Keyword arguments of :func:`dense_crf` (iterations and kernels).
        fg_background: Background score (``mode="constant"``) or power (``mode="power"``) of the map that
            gives confident foreground.
        bg_background: The same for the map that gives confident background.
        mode: ``constant`` (``bg = t``) or ``power`` (``bg = (1 - max_c M_c)^alpha``).

    Returns:
        (H, W) uint8 labels: class ids, 0, or 255.
    """
    make = with_constant_background if mode == "constant" else with_power_background
    strong = dense_crf(image, make(maps, fg_background), **crf).argmax(0)  # (H, W) channel indices
    weak = dense_crf(image, make(maps, bg_background), **crf).argmax(0)  # (H, W)
    labels = np.asarray(keys)[strong].astype(np.uint8)
    labels[strong == 0] = IGNORE
    labels[weak == 0] = 0
    return labels


def grid_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Downsample labels to the feature grid, keeping only pure cells (all pixels agree), else 255.

    Args:
        labels: (H, W) uint8 labels with H, W multiples of ``stride``.
        stride: Cell size in pixels.

    Returns:
        (H / stride, W / stride) uint8 labels.
    """
    h, w = labels.shape
    if h % stride or w % stride:
        raise ValueError(f"label size {labels.shape} is not a multiple of the stride {stride}")
    cells = (
        labels.reshape(h // stride, stride, w // stride, stride)
        .transpose(0, 2, 1, 3)
        .reshape(h // stride, w // stride, -1)
    )
    pure = (cells == cells[..., :1]).all(-1)  # (h, w)
    return np.where(pure, cells[..., 0], IGNORE).astype(np.uint8)
