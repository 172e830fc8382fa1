"""Swin backbone wrapper over timm: four NCHW stage maps for any input size."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from pipeline.config import ModelParams

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """Pretrained weights that cannot be loaded; the message is one line for the user."""


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a small convolutional stem before the patchifying convolution.

    Early convolutions give a from-scratch transformer the locality prior it lacks and make it train much
    faster on small data (Xiao et al., "Early Convolutions Help Transformers See Better", 2021). The stem is
    a 3x3 convolution + GELU at full resolution, then the usual ``patch_size`` x ``patch_size`` projection.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hidden = max(8, self.proj.out_channels // 2)
        self.proj = nn.Sequential(
            nn.Conv2d(self.proj.in_channels, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, self.proj.out_channels, kernel_size=self.patch_size, stride=self.patch_size),
        )


class SwinBackbone(nn.Module):
    """A timm Swin Transformer returning its four stage maps as NCHW tensors.

    Inputs of any size are padded (bottom/right, zeros) to a multiple of :attr:`stride` and the outputs are
    cropped back, so stage ``i`` returns ``ceil(H / stride_i) x ceil(W / stride_i)`` maps.

    Args:
        model: A timm ``SwinTransformer`` built with ``strict_img_size=False``.
        final_norm: Apply the model's final LayerNorm to the last stage map.
    """

    def __init__(self, model: SwinTransformer, final_norm: bool = True) -> None:
        super().__init__()
        self.model = model
        self.final_norm = final_norm
        reductions = [info["reduction"] for info in model.feature_info]
        self.channels: list[int] = [info["num_chs"] for info in model.feature_info]
        self.strides: list[int] = reductions
        self.stride = reductions[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the four stage maps.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            ``[s1, s2, s3, s4]`` with ``s_i`` of shape (B, C_i, ceil(H/r_i), ceil(W/r_i)).
        """
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.model.forward_intermediates(x, norm=self.final_norm, intermediates_only=True)
        return [f[..., : -(-h // r), : -(-w // r)] for f, r in zip(feats, self.strides, strict=True)]


def _load_state(path: Path, setting: str = "model.pretrained") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedError(f"{setting}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise PretrainedError(f"{setting}: cannot read {path} ({type(exc).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_pretrained(model: nn.Module, path: Path, setting: str = "model.pretrained") -> None:
    """Load backbone weights from a local file, checking names and shapes.

    Args:
        model: The timm model.
        path: A ``.safetensors`` or ``.pth`` file (a plain state dict, or one under ``model``/``state_dict``).
        setting: The params key that named the file (used in error messages).

    Raises:
        PretrainedError: If the file is unreadable, shares no tensor with the model, or has wrong shapes.
    """
    state = _load_state(path, setting)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        key = wrong[0]
        raise PretrainedError(
            f"{setting}: {path}: {len(wrong)} tensors have the wrong shape "
            f"(first: {key} {tuple(state[key].shape)} vs {tuple(own[key].shape)} in the model)"
        )
    missing, _ = model.load_state_dict(state, strict=False)
    if len(missing) == len(own):
        raise PretrainedError(f"{setting}: {path} has no weights for this backbone")
    if missing:
        log.warning(
            "%s: %d of %d backbone tensors not in %s (e.g. %s)", setting, len(missing), len(own), path, missing[0]
        )


def build_backbone(params: ModelParams, img_size: int) -> SwinBackbone:
    """Build the Swin backbone described by the ``model`` section.

    ``model.backbone: small`` builds the CPU-sized configuration of ``model.swin`` through timm's
    ``SwinTransformer``; any other value is a timm model name (e.g. ``swin_tiny_patch4_window7_224``).
    ``model.pretrained`` is ``none`` or a local ``.safetensors`` / ``.pth`` file.

    Args:
        params: The ``model`` section.
        img_size: Training crop size; fixes the window/shift layout (inputs of other sizes still work).

    Returns:
        The backbone.

    Raises:
        PretrainedError: If the pretrained weights cannot be loaded.
    """
    if params.backbone == "small":
        swin = params.swin
        model = SwinTransformer(
            img_size=img_size,
            patch_size=swin.patch_size,
            embed_dim=swin.embed_dim,
            depths=swin.depths,
            num_heads=swin.num_heads,
            window_size=swin.window_size,
            mlp_ratio=swin.mlp_ratio,
            num_classes=0,
            drop_path_rate=params.drop_path_rate,
            strict_img_size=False,
            embed_layer=ConvStemPatchEmbed if swin.conv_stem else PatchEmbed,
        )
    else:
        model = timm.create_model(
            params.backbone,
            pretrained=False,
            num_classes=0,
            drop_path_rate=params.drop_path_rate,
            strict_img_size=False,
            img_size=img_size,
        )
    if params.pretrained != "none":
        load_pretrained(model, Path(params.pretrained))
    return SwinBackbone(model, final_norm=params.final_norm)
