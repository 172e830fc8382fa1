"""What AReAM reads in a trained classifier: each block's attention, the CAM it re-activates, and its entropy.

AReAM's premise is that deep blocks' attention over-smooths onto the background while shallow blocks stay local.
:func:`attention_evidence` measures that on a batch, for the DeiT (global attention) and SWTformer (one Swin
stage's window attention, :mod:`pipeline.models.window_attention`): the entropy of each block's re-activated map
(the official code's layer weights; high = spread out) and the re-activated maps themselves, for a gallery
(``docs/render_aream_evidence.py``). :func:`foreground_share` says with the ground truth how much of a map lies
on its class: the direct test of "spreads onto the background".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.aream import layer_entropy, patch_affinity, reactivate, reactivate_steps, window_walk
from pipeline.models.swtformer import max_norm


@torch.no_grad()
def attention_evidence(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, stage: int = 3, steps: int = 1
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Per-block attention evidence of a DeiT or SWTformer classifier on a batch.

    Args:
        model: The classifier in eval mode.
        x: (B, 3, H, W) normalised images.
        labels: (B, C) image-level labels (the present classes' CAMs are re-activated).
        stage: SWTformer: the Swin stage whose blocks are read (1-based).
        steps: SWTformer: re-activation steps through window attention (plus the identity).

    Returns:
        ``cam`` (B, C, h, w): the max-normalised CAM on the attention's token grid, absent classes zeroed;
        ``reactivated``: per block (B, C, h, w), the CAM re-activated by that block alone (min-max per map not
        applied); ``entropy`` (L,): the batch-mean entropy in bits of each block's re-activated map
        (:func:`pipeline.aream.layer_entropy`); ``fused`` (B, C, h, w): re-activated by the mean of all blocks,
        as ``cams`` stores the ``aream`` map.
    """
    windows = hasattr(model, "stage_blocks")
    if windows:
        mask = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[:, :, None, None]  # (B, C+1, 1, 1)
        out = model(x, mask, attention=True, stage=stage)
        affinities = [a[:, 0] for a in out["attention"]]  # L x (B, N, N)
        grid = tuple(out["attention_grid"])
    else:
        out = model(x, attention=True)
        grid = tuple(out["cam"].shape[-2:])
        prefix = out["attention"][0].shape[-1] - grid[0] * grid[1]
        affinities = [patch_affinity(probs, prefix) for probs in out["attention"]]
    cam = max_norm(F.relu(out["cam"].float())) * labels[:, :, None, None]  # (B, C, h', w')
    cam = F.interpolate(cam, size=grid, mode="bilinear", align_corners=False) if cam.shape[-2:] != grid else cam

    def spread(affinity: torch.Tensor) -> torch.Tensor:
        return reactivate_steps(cam, window_walk(affinity), steps) if windows else reactivate(cam, affinity)

    return {
        "cam": cam,
        "reactivated": [spread(a) for a in affinities],
        "entropy": layer_entropy([a[:, None] for a in affinities], 0, cam),
        "fused": spread(torch.stack(affinities).mean(dim=0)),
    }


def foreground_share(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of each present class's map that lies on that class's ground truth, mean over (image, class).

    Args:
        maps: (B, C, h, w) non-negative maps on a token grid (class c in channel c - 1).
        masks: (B, H, W) ground truth (0 background, k class k, 255 ignored), any resolution.
        labels: (B, C) image-level labels: the (image, class) pairs averaged over.

    Returns:
        ``mean sum(map * fg) / sum(map)``, ``fg`` the class's pixel share of each token's cell (area resampling);
        1 = all of the map on its class, the class's area share = a uniform map. NaN without a present class.
    """
    classes = torch.arange(1, maps.shape[1] + 1, device=masks.device)[None, :, None, None]  # (1, C, 1, 1)
    fg = (masks[:, None] == classes).float()  # (B, C, H, W)
    fg = F.adaptive_avg_pool2d(fg, maps.shape[-2:])  # (B, C, h, w): share of each cell on the class
    mass = maps.clamp_min(0).flatten(2)  # (B, C, h*w)
    share = (mass * fg.flatten(2)).sum(2) / mass.sum(2).clamp_min(1e-12)  # (B, C)
    present = labels > 0
    return float(share[present].mean()) if present.any() else float("nan")
