"""PSA random walk: seeds diffused over the affinity graph of a feature grid.

The walk runs as a stencil over the grid (:func:`grid_walk`): memory grows linearly with the number of cells, where
the dense (n, n) transition matrix of PSA's code (:func:`transition_matrix`, kept as the reference the tests and
``benchmarks/random_walk_memory.py`` compare with) grows with its square: 0.6 GB per VOC image at stride 4.
"""

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


def grid_walk(
    seeds: torch.Tensor, affinity: torch.Tensor, offsets: list[tuple[int, int]], beta: float, steps: int
) -> torch.Tensor:
    """The walk of :func:`random_walk` with :func:`transition_matrix`, computed on the grid without the matrix.

    With ``A`` the symmetric affinity matrix (self-loops 1, ``a^beta`` for the listed pairs), one step is
    ``(V A)_j / sum_i A_ij``: each cell gathers its own score, the scores of the cells it points to and of the
    cells that point to it, each weighted by that pair's affinity. Memory: O((K + D) * h * w).

    Args:
        seeds: (K, h, w) scores per channel and cell.
        affinity: (D, h, w) pair affinities in [0, 1] (the pair ``(y, x) -> (y, x) + offsets[d]`` at ``[d, y, x]``).
        offsets: The D pair offsets.
        beta: Sharpening power (PSA: 8).
        steps: Number of steps.

    Returns:
        (K, h, w) float32 diffused scores.
    """
    inside = [shifted(torch.ones_like(affinity[0]), dy, dx, 0.0) for dy, dx in offsets]  # D x (h, w): target exists
    weights = [affinity[d].float().clamp(0, 1) ** beta * inside[d] for d in range(len(offsets))]  # D x (h, w)
    degree = torch.ones_like(weights[0])  # (h, w): column sums of A
    for (dy, dx), weight in zip(offsets, weights, strict=True):
        degree = degree + weight + shifted(weight, -dy, -dx, 0.0)
    scores = seeds.float()  # (K, h, w)
    for _ in range(steps):
        gathered = scores.clone()
        for (dy, dx), weight in zip(offsets, weights, strict=True):
            gathered += weight * shifted(scores, dy, dx, 0.0) + shifted(weight * scores, -dy, -dx, 0.0)
        scores = gathered / degree
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
    _, height, width = scores.shape
    _, h, w = affinity.shape
    padded = F.pad(scores.float(), (0, w * stride - width, 0, h * stride - height))  # (K, h*s, w*s)
    cells = F.avg_pool2d(padded[None], stride)[0]  # (K, h, w)
    walked = grid_walk(cells, affinity, offsets, beta, steps)  # (K, h, w)
    full = F.interpolate(walked[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)[0]
    return full[:, :height, :width]  # (K, H, W)
