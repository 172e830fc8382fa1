"""AffinityNet (PSA): a timm ``features_only`` CNN whose fused multi-level features define pair affinities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import normalize
from pipeline.errors import ConfigError, ModelError, one_line
from pipeline.models.files import META, load_weights, read_model_dir, retrain_hint
from pipeline.models.padding import pad_to_multiple
from pipeline.models.pretrained import load_pretrained
from pipeline.refinement.affinity import pair_affinities, radius_offsets


class AffinityNet(nn.Module):
    """Backbone feature levels -> 1x1 conv + ELU each -> upsample to the finest level -> concat -> 1x1 conv + ELU.

    PSA projects three stride-8 levels of ResNet-38 to 64/128/256 channels and fuses them to 448; here the
    levels come from any timm ``features_only`` model (``out_indices``), coarser levels are bilinearly
    upsampled to the finest one, whose stride is the grid stride of the affinities.

    Args:
        backbone: A timm model name that supports ``features_only``.
        out_indices: The backbone's feature levels to fuse.
        projection_dims: Channels of each level's projection (one per entry of ``out_indices``).
        feature_dim: Channels of the fused feature.
        pretrained: ``none``, a local weights file or a timm tag for the backbone.

    Raises:
        ConfigError: If timm cannot build the backbone with these feature levels.
        PretrainedError: If ``pretrained`` cannot be loaded.
    """

    def __init__(
        self,
        backbone: str = "regnetx_002",
        out_indices: tuple[int, ...] = (1, 2),
        projection_dims: tuple[int, ...] = (32, 64),
        feature_dim: int = 64,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        try:
            self.encoder = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=out_indices)
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
            raise ConfigError(
                f"train_aff.model: cannot build the timm features_only model '{backbone}' with out_indices "
                f"{list(out_indices)} ({one_line(exc)})"
            ) from None
        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        self.stride = min(reductions)
        self.pad_multiple = max(reductions)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1, bias=False), nn.ELU())
            for c, d in zip(channels, projection_dims, strict=True)
        )
        self.fuse = nn.Sequential(nn.Conv2d(sum(projection_dims), feature_dim, 1, bias=False), nn.ELU())
        for block in self.projections:
            nn.init.kaiming_normal_(block[0].weight)
        nn.init.xavier_uniform_(self.fuse[0].weight, gain=4)
        if pretrained != "none":
            load_pretrained(self.encoder, pretrained, setting="train_aff.model.pretrained")

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


@dataclass
class AffinityModel:
    """A trained AffinityNet with what inference needs: pair offsets, grid stride, normalisation."""

    net: AffinityNet
    offsets: list[tuple[int, int]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @torch.no_grad()
    def affinities(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 image -> (D, h, w) pair affinities on the model's grid."""
        x = normalize(image, self.mean, self.std)[None]  # (1, 3, H, W)
        return pair_affinities(self.net(x), self.offsets)[0]


def load_affinity_model(model_dir: Path | str) -> AffinityModel:
    """Rebuild the AffinityNet written by ``train_aff`` (on the CPU, in eval mode).

    Raises:
        ModelError: If the model files are missing or do not describe an AffinityNet this code builds.
    """
    weights, meta = read_model_dir(model_dir, "affinity model", "train_aff", ("model", "radius", "mean", "std"))
    meta_path, again = Path(model_dir) / META, retrain_hint("train_aff")
    try:
        net = AffinityNet(**{**meta["model"], "pretrained": "none"})
        offsets = radius_offsets(meta["radius"])
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{meta_path} does not describe an affinity model this version builds ({one_line(exc)}; edited? {again})"
        ) from None
    try:
        net.load_state_dict(load_weights(weights, "train_aff"))
    except RuntimeError as exc:
        raise ModelError(f"{weights} does not match {meta_path} ({one_line(exc)}; {again})") from None
    return AffinityModel(net.eval(), offsets, mean, std)
