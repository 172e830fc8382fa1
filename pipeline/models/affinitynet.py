"""AffinityNet (PSA): a timm ``features_only`` CNN whose fused multi-level features define pair affinities."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AffinityNetParams
from pipeline.errors import ConfigError
from pipeline.models.padding import pad_to_multiple
from pipeline.models.pretrained import load_pretrained


class AffinityNet(nn.Module):
    """Backbone feature levels -> 1x1 conv + ELU each -> upsample to the finest level -> concat -> 1x1 conv + ELU.

    PSA projects three stride-8 levels of ResNet-38 to 64/128/256 channels and fuses them to 448; here the
    levels come from any timm ``features_only`` model (``out_indices``), coarser levels are bilinearly
    upsampled to the finest one, whose stride is the grid stride of the affinities.

    Args:
        params: Backbone name, feature levels, projection and output widths.

    Raises:
        ConfigError: If timm cannot build the backbone with these feature levels.
        PretrainedError: If ``params.pretrained`` cannot be loaded.
    """

    def __init__(self, params: AffinityNetParams) -> None:
        super().__init__()
        try:
            self.encoder = timm.create_model(
                params.backbone, pretrained=False, features_only=True, out_indices=params.out_indices
            )
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
            raise ConfigError(
                f"train_aff.model: cannot build the timm features_only model '{params.backbone}' with out_indices "
                f"{list(params.out_indices)} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        self.stride = min(reductions)
        self.pad_multiple = max(reductions)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1, bias=False), nn.ELU())
            for c, d in zip(channels, params.projection_dims, strict=True)
        )
        self.fuse = nn.Sequential(nn.Conv2d(sum(params.projection_dims), params.feature_dim, 1, bias=False), nn.ELU())
        for block in self.projections:
            nn.init.kaiming_normal_(block[0].weight)
        nn.init.xavier_uniform_(self.fuse[0].weight, gain=4)
        if params.pretrained != "none":
            load_pretrained(self.encoder, params.pretrained, setting="train_aff.model.pretrained")

    def new_modules(self) -> list[nn.Module]:
        """The layers that are not part of the backbone (trained with the higher learning rate)."""
        return [self.projections, self.fuse]

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) affinity grid of an image: the image is padded to a multiple of :attr:`pad_multiple`."""
        m = self.pad_multiple
        return -(-height // m) * m // self.stride, -(-width // m) * m // self.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused features on the affinity grid.

        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            (B, F, h, w) features with ``(h, w) = grid_size(H, W)``.
        """
        h, w = self.grid_size(*images.shape[-2:])
        padded = pad_to_multiple(images, self.pad_multiple)  # (B, 3, h*s, w*s)
        levels = []
        for feature, project in zip(self.encoder(padded), self.projections, strict=True):
            x = project(feature)  # (B, d_i, h_i, w_i)
            if x.shape[-2:] != (h, w):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            levels.append(x)
        return self.fuse(torch.cat(levels, dim=1))  # (B, F, h, w)
