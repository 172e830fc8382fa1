"""Inputs of any size for networks that need a multiple of their stride: zero-pad, run, crop the output back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad images at the bottom and right so that height and width are multiples of ``multiple``.

    Args:
        x: (B, C, H, W) images.
        multiple: The network's stride (or largest reduction).

    Returns:
        (B, C, ceil(H / m) * m, ceil(W / m) * m); ``x`` itself when it already fits.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def crop_to_input(y: torch.Tensor, size: tuple[int, int], stride: int = 1) -> torch.Tensor:
    """Crop a map computed on a :func:`pad_to_multiple` input back to the unpadded input's extent.

    Args:
        y: (B, C, h', w') output at ``stride`` (1 = the input's resolution).
        size: (H, W) of the input before padding.
        stride: The output's reduction.

    Returns:
        (B, C, ceil(H / stride), ceil(W / stride)), a view of ``y``.
    """
    h, w = size
    return y[..., : -(-h // stride), : -(-w // stride)]
