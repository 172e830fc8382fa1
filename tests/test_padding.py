"""Pad-to-stride-then-crop (models/padding.py), and the three networks that use it pad exactly as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import SwinParams
from pipeline.models.affinitynet import AffinityNet
from pipeline.models.backbone import build_backbone
from pipeline.models.deeplab import build_segmenter
from pipeline.models.padding import crop_to_input, pad_to_multiple

SIZES = [(32, 32), (33, 47), (50, 70), (17, 9)]


def _old_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """The padding every network computed for itself at d66d219 (zeros, bottom/right, up to a multiple)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -(-w // multiple) * multiple - w, 0, -(-h // multiple) * multiple - h))


def test_pad_and_crop_by_hand():
    x = torch.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 4, 4) and torch.equal(padded[..., :2, :3], x) and padded.sum() == x.sum()
    assert pad_to_multiple(padded, 4) is padded, "a fitting input is returned as is"
    assert torch.equal(crop_to_input(padded, (2, 3)), x)
    assert crop_to_input(torch.zeros(1, 1, 8, 8), (33, 47), stride=8).shape == (1, 1, 5, 6), "ceil(33/8), ceil(47/8)"


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    segmenter = build_segmenter("deeplabv3plus", "tu-test_efficientnet", 3, output_stride=16, decoder_channels=8)
    affinity = AffinityNet(backbone="regnetx_002", out_indices=(1, 2), projection_dims=(4, 8), feature_dim=8)
    swin = SwinParams(patch_size=2, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(2, 2, 2, 2))
    backbone = build_backbone("small", 32, swin=swin.model_dump())
    return segmenter.eval(), affinity.eval(), backbone.eval()


@pytest.mark.parametrize("size", SIZES)
def test_networks_pad_as_before(networks, size):
    # each network pads internally; fed an input already padded the old way it pads nothing more, so equal
    # outputs mean equal padding
    segmenter, affinity, backbone = networks
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = segmenter(x)
        assert logits.shape[-2:] == size
        assert torch.equal(logits, segmenter.net(_old_pad(x, 16))[..., : size[0], : size[1]])
        assert torch.equal(affinity(x), affinity(_old_pad(x, affinity.pad_multiple)))
        padded = backbone(_old_pad(x, backbone.stride))
        for f, g, r in zip(backbone(x), padded, backbone.strides, strict=True):
            assert torch.equal(f, g[..., : -(-size[0] // r), : -(-size[1] // r)])
