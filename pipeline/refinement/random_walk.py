"""PSA random walk: a transition matrix from pair affinities, and seeds diffused over it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.refinement.affinity import shifted


def transition_matrix(affinity: torch.Tensor, offsets: list[tuple[int, int]], beta: float) -> torch.Tensor:
    """Column-stochastic transition matrix of the affinity graph on an (h, w) grid.

    ``A_ij = A_ji = a_ij^beta`` for the listed pairs, ``A_ii = 1``, 0 elsewhere; ``T_ij = A_ij / sum_k A_kj``.

    Args:
        affinity: (D, h, w) pair affinities in [0, 1] (the pair ``(y, x) -> (y, x) + offsets[d]`` at ``[d, y, x]``).
        offsets: The D pair offsets.
        beta: Sharpening power (PSA: 8).

    Returns:
        (n, n) float32 matrix, n = h * w, columns summing to 1.
    """
    _, h, w = affinity.shape
    n = h * w
    index = torch.arange(n, dtype=torch.float32).reshape(h, w)
    dense = torch.eye(n, dtype=torch.float32)
    for d, (dy, dx) in enumerate(offsets):
        target = shifted(index, dy, dx, -1.0).long()  # (h, w), -1 outside the grid
        valid = target >= 0
        source = index.long()[valid]
        values = affinity[d].float()[valid].clamp(0, 1) ** beta
        dense[source, target[valid]] = values
        dense[target[valid], source] = values
    return dense / dense.sum(0, keepdim=True)


def random_walk(seeds: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """Diffuse seeds: ``V <- V T`` repeated ``steps`` times (PSA: ``steps = 2^logt``).

    Each step replaces a node's scores by the affinity-weighted mean of its neighbours' scores.

    Args:
        seeds: (K, n) scores per channel and node.
        transition: (n, n) column-stochastic matrix.
        steps: Number of steps.

    Returns:
        (K, n) diffused scores.
    """
    scores = seeds.float()
    for _ in range(steps):
        scores = scores @ transition  # (K, n)
    return scores


def walk_seed_scores(
    scores: torch.Tensor, affinity: torch.Tensor, offsets: list[tuple[int, int]], stride: int, beta: float, steps: int
) -> torch.Tensor:
    """Propagate full-resolution seed scores over the affinity grid and bring them back to full resolution.

    The scores are zero-padded to the grid (``h * stride`` x ``w * stride``), average-pooled to one value per
    cell, walked, bilinearly upsampled and cropped (PSA's inference).

    Args:
        scores: (K, H, W) seed scores (channel 0 = background).
        affinity: (D, h, w) pair affinities with ``h * stride >= H`` and ``w * stride >= W``.
        offsets: The D pair offsets.
        stride: Pixels per grid cell.
        beta: Sharpening power.
        steps: Random-walk steps.

    Returns:
        (K, H, W) float32 walked scores.
    """
    k, height, width = scores.shape
    _, h, w = affinity.shape
    padded = F.pad(scores.float(), (0, w * stride - width, 0, h * stride - height))  # (K, h*s, w*s)
    cells = F.avg_pool2d(padded[None], stride)[0].reshape(k, h * w)  # (K, n)
    walked = random_walk(cells, transition_matrix(affinity, offsets, beta), steps).reshape(1, k, h, w)
    full = F.interpolate(walked, size=(h * stride, w * stride), mode="bilinear", align_corners=False)[0]
    return full[:, :height, :width]  # (K, H, W)
