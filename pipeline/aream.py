"""AReAM (He et al., 2023): attention re-activation for the DeiT classifier (``loss.aream``).

A ViT's deep-layer attention over-smooths and spreads onto the background. AReAM supervises the deep layers'
pre-softmax attention with pair labels taken from a reliable segmentation of the image: the CAM re-activated by
the shallow layers' attention, refined by PAR with two background scores. What is computed, per training step
after ``warmup_epochs`` (shapes for B images of S x S pixels, a token grid of h x w = N patch tokens, C classes,
L blocks, ``split`` = L0):

1. Affinity of block l: ``A_l`` = head mean of the softmax attention restricted to patch x patch (B, N, N).
2. Shallow fusion ``A = mean_{l < L0} (1 - e_l) A_l`` (``e_l = 0`` for uniform weights), the CAM re-activated as
   ``cam'_m = sum_n A_mn cam_n`` on the token grid, ReLU, per-class min-max normalised.
3. Reliable labels: PAR (AFA's) at ``par_scale`` of the crop on the softmax of ``[t ; cam' of the image's
   classes]`` for the two background scores t_l < t_h; ``Y = L_h``, ``Y = 255`` where ``L_h`` is background but
   ``L_l`` is not, padding 255.
4. Pair labels at the token grid (nearest): 1 same label, 0 different, 255 if either token is 255 (all pairs).
5. Per deep block ``z`` = head mean of the scaled pre-softmax logits on patch x patch;
   ``L_l = 1/2 sum_pos (1 - sigmoid z) / (N_pos + 1) + 1/2 sum_neg sigmoid z / (N_neg + 1)`` (AFA's loss), and
   ``L_aff = mean_{l >= L0} e_l L_l`` (``e_l = 1`` for uniform weights), added with ``weight``.

Entropy weights (``weights: entropy``) are computed online from the current batch, as the official code
computes them offline over the dataset with a trained baseline: per block, the present-class CAMs re-activated
by ``A_l`` summed over classes, softmax over tokens, entropy in bits, batch mean; min-max normalised over blocks.

At inference (``cams``) the CAM is re-activated by the uniform mean of every block's affinity and stored as the
``aream`` map. See docs/classifier.md (AReAM) and /work/shared/reference/refinement.md §4.

On SWTformer (S1 of the reference's §4.4) the blocks are those of one Swin stage, their window attention scattered
onto the stage's token grid (:mod:`pipeline.models.window_attention`; zero outside each window). The CAM is
resampled to that grid and re-activated ``steps`` times through the fused affinity plus the identity, rows
renormalised (:func:`window_walk`): one step moves it inside a window only. The loss of a deep block is taken on
the pairs it attends with (the window pairs its shift mask keeps); the pair labels of the others do not count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.models.window_attention import gather_windows
from pipeline.refinement.par import PAR, scaled_size

IGNORE = 255
ABSENT = -1e4
"""Score of a class the image does not have, before PAR's softmax: its probability is exactly 0."""
EPS = 1e-5


def patch_affinity(attention: torch.Tensor, prefix: int) -> torch.Tensor:
    """Head mean of one block's attention (probabilities or logits) on patch x patch: (B, heads, T, T) -> (B, N, N).

    Args:
        attention: (B, heads, T, T) with the ``prefix`` class (and other) tokens first.
        prefix: Number of prefix tokens.
    """
    return attention[:, :, prefix:, prefix:].float().mean(dim=1)  # (B, N, N)


def fused_affinity(
    attention: Sequence[torch.Tensor], prefix: int, weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """The mean over blocks of ``w_l * A_l`` (``w_l = 1`` without weights): list of (B, heads, T, T) -> (B, N, N)."""
    total = None
    for index, probs in enumerate(attention):
        term = patch_affinity(probs, prefix) * (1.0 if weights is None else float(weights[index]))  # (B, N, N)
        total = term if total is None else total + term
    return total / len(attention)


def reactivate(cam: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """``cam'_m = sum_n A_mn cam_n`` on the token grid: (B, C, h, w), (B, N, N) with N = h*w -> (B, C, h, w)."""
    b, c, h, w = cam.shape
    flat = cam.float().reshape(b, c, h * w).transpose(1, 2)  # (B, N, C)
    return torch.bmm(affinity.float(), flat).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)


def window_walk(affinity: torch.Tensor) -> torch.Tensor:
    """Window attention as a walk: ``A + I`` with rows renormalised to sum to 1: (B, N, N) -> (B, N, N)."""
    walk = affinity + torch.eye(affinity.shape[-1], device=affinity.device, dtype=affinity.dtype)
    return walk / walk.sum(dim=2, keepdim=True)


def reactivate_steps(cam: torch.Tensor, affinity: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`reactivate` ``steps`` times: (B, C, h, w), (B, N, N) -> (B, C, h, w)."""
    for _ in range(steps):
        cam = reactivate(cam, affinity)
    return cam


def layer_entropy(attention: Sequence[torch.Tensor], prefix: int, cam: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of each block's re-activated map, as the official AReAM code measures it, batch mean.

    Args:
        attention: L tensors (B, heads, T, T) of softmax attention.
        prefix: Number of prefix tokens.
        cam: (B, C, h, w) CAMs with the absent classes zeroed.

    Returns:
        (L,) mean over images of ``-sum_n p_n log2 p_n``, ``p = softmax_n(sum_c cam'_c)``.
    """
    entropies = []
    for probs in attention:
        score = reactivate(cam, patch_affinity(probs, prefix)).sum(dim=1).flatten(1)  # (B, N)
        p = score.softmax(dim=1)  # (B, N)
        entropies.append(-(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1).mean())
    return torch.stack(entropies)  # (L,)


def entropy_weights(entropy: torch.Tensor) -> torch.Tensor:
    """Min-max normalised entropies ``e_l = (H_l - min H) / (max H - min H)``; all ones when they are equal: (L,)."""
    spread = entropy.max() - entropy.min()
    if spread <= 0:
        return torch.ones_like(entropy)
    return (entropy - entropy.min()) / spread


def minmax_per_channel(x: torch.Tensor) -> torch.Tensor:
    """Per-(image, channel) min-max normalisation to [0, 1]: (B, C, H, W) -> (B, C, H, W)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return (x - low) / (high - low + EPS)


def present_channels(cam: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAMs of each image's own classes, padded to the batch's largest count K with :data:`ABSENT`.

    Args:
        cam: (B, C, h, w) CAMs.
        labels: (B, C) image-level labels.

    Returns:
        ``(maps, classes)``: (B, K, h, w) float32 maps and (B, K) their 1-based class ids (padding: 0).
    """
    k = max(1, int(labels.sum(dim=1).max().item()))
    order = labels.float().topk(k, dim=1).indices  # (B, K): present classes first
    present = labels.gather(1, order) > 0  # (B, K)
    maps = cam.float().gather(1, order[:, :, None, None].expand(-1, -1, *cam.shape[-2:]))  # (B, K, h, w)
    maps = torch.where(present[:, :, None, None], maps, torch.full_like(maps, ABSENT))
    return maps, (order + 1) * present


def reliable_labels(
    par: PAR, image: torch.Tensor, cam: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
    thresholds: tuple[float, float], size: tuple[int, int],
) -> torch.Tensor:  # fmt: skip
    """Three-state labels from CAMs refined by PAR at two background scores (AFA's ``refine_cams_with_bkg_v2``).

    PAR runs at ``size`` (AFA / AReAM: half the crop) on the image and the CAMs resampled there (bilinear), on
    a constant background channel and the image's own classes, softmax over them; the argmax is taken there.

    Args:
        par: The PAR module.
        image: (B, 3, S1, S2) image (any per-channel affine normalisation: PAR divides by local stds).
        cam: (B, C, h, w) CAMs in [0, 1], any resolution.
        labels: (B, C) image-level labels (absent classes cannot be chosen).
        valid: (B, 1, S1, S2) 1 on image pixels, 0 on crop padding (labelled 255).
        thresholds: ``(t_l, t_h)`` background scores, t_l <= t_h.
        size: The resolution PAR runs at and the labels have.

    Returns:
        (B, *size) int64: 0 background, k class k (1-based), 255 ignored (between the two scores, or padding).
    """
    fg, classes = present_channels(cam, labels)  # (B, K, h, w), (B, K)
    if tuple(fg.shape[-2:]) != tuple(size):
        fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=False)  # (B, K, *size)
    small = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)  # (B, 3, *size)
    stacks = [torch.cat([torch.full_like(fg[:, :1], t), fg], dim=1).softmax(dim=1) for t in thresholds]
    refined = par(small, torch.cat(stacks, dim=1))  # (B, 2 * (1 + K), *size)
    # max(dim).indices: the first maximum, like argmax, but ~7x faster on CPU over a non-innermost dim
    low, high = refined.view(fg.shape[0], 2, -1, *size).max(dim=2).indices.unbind(1)  # (B, *size) channel ids
    ids = torch.cat([torch.zeros_like(classes[:, :1]), classes], dim=1)  # (B, 1 + K): channel -> class id
    out = ids.gather(1, high.flatten(1)).view_as(high)  # (B, *size)
    out[(high == 0) & (low != 0)] = IGNORE
    out[F.interpolate(valid.float(), size=size, mode="nearest")[:, 0] < 0.5] = IGNORE
    return out


def pair_labels(seg: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """All-pairs affinity labels at the token grid: (B, S, S) labels -> (B, N, N) uint8 (1 / 0 / 255).

    The labels are resampled to ``grid`` (nearest); a pair is 1 when both tokens have the same label, 0 when they
    differ, 255 when either token is 255.
    """
    small = F.interpolate(seg[:, None].float(), size=grid, mode="nearest")[:, 0].flatten(1).long()  # (B, N)
    same = small[:, :, None] == small[:, None, :]  # (B, N, N)
    ignored = (small == IGNORE)[:, :, None] | (small == IGNORE)[:, None, :]  # (B, N, N)
    pairs = same.to(torch.uint8)
    pairs[ignored] = IGNORE
    return pairs


def affinity_loss(logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """AFA's balanced, sigmoid-gated affinity loss: (B, N, N) logits, (B, N, N) pair labels -> ().

    ``1/2 sum_pos (1 - sigmoid z) / (N_pos + 1) + 1/2 sum_neg sigmoid z / (N_neg + 1)``, counts over the batch;
    pairs labelled 255 do not count.
    """
    gate = torch.sigmoid(logits.float())  # (B, N, N)
    pos, neg = pairs == 1, pairs == 0
    pos_term = ((1 - gate) * pos).sum() / (pos.sum() + 1)
    neg_term = (gate * neg).sum() / (neg.sum() + 1)
    return 0.5 * pos_term + 0.5 * neg_term


def aream_terms(
    par: PAR, out: dict, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, cfg: dict
) -> dict[str, torch.Tensor]:
    """AReAM's affinity loss of one training step (the module docstring's steps 1-5).

    Args:
        par: The PAR module for the reliable labels.
        out: The classifier's output with ``attention=True``: ``cam`` (B, C, h, w), ``attention`` (L tensors
            (B, heads, T, T) of probabilities) and ``attention_logits``; the DeiT's are (B, heads, T, T) with its
            prefix tokens first. SWTformer's attention is (B, 1, N, N) on the grid ``attention_grid``, its logits
            (B, nW, M^2, M^2) per window with ``attention_windows`` (slot index, valid pairs) per block.
        images: (B, 3, S, S) the training crops.
        labels: (B, C) image-level labels.
        valid: (B, 1, S, S) valid pixels of the crops.
        cfg: ``loss.aream`` as a mapping (``split``, ``bg_thresholds``, ``weights``, ``par_scale``, ``steps``).

    Returns:
        ``aff`` (the weighted mean over deep blocks, with gradients) and ``aff_ignored`` (the ignored share of
        the pairs, a diagnostic).
    """
    probs, logits, windows = out["attention"], out["attention_logits"], out.get("attention_windows")
    grid = tuple(out.get("attention_grid", out["cam"].shape[-2:]))
    split, prefix = cfg["split"] or (len(probs) + 1) // 2, probs[0].shape[-1] - grid[0] * grid[1]
    with torch.no_grad():
        cam = out["cam"].detach().float() * labels[:, :, None, None]  # (B, C, h, w)
        if tuple(cam.shape[-2:]) != grid:
            cam = F.interpolate(cam, size=grid, mode="bilinear", align_corners=False)  # (B, C, *grid)
        e = entropy_weights(layer_entropy(probs, prefix, cam)) if cfg["weights"] == "entropy" else None
        shallow = fused_affinity(probs[:split], prefix, None if e is None else 1 - e[:split])  # (B, N, N)
        if windows is None:
            cam = reactivate(cam, shallow)
        else:
            cam = reactivate_steps(cam, window_walk(shallow), cfg["steps"])
        cam = minmax_per_channel(F.relu(cam))  # (B, C, *grid); bilinear keeps min and max
        size = scaled_size(*images.shape[-2:], cfg["par_scale"])
        seg = reliable_labels(par, images, cam, labels, valid, tuple(cfg["bg_thresholds"]), size)  # (B, *size)
        pairs = pair_labels(seg, grid)  # (B, N, N)
    deep = []
    for block in range(split, len(logits)):
        if windows is None:
            deep.append(affinity_loss(patch_affinity(logits[block], prefix), pairs))
        else:
            index, valid_pairs = (t.to(pairs.device) for t in windows[block])
            deep.append(affinity_loss(logits[block], gather_windows(pairs, index, valid_pairs, IGNORE)))
    weights = [1.0] * len(deep) if e is None else e[split:]
    aff = sum(w * term for w, term in zip(weights, deep, strict=True)) / len(deep)
    return {"aff": aff, "aff_ignored": (pairs == IGNORE).float().mean()}
