"""R-CAM's feature sources in ``benchmarks/seed_locating.py`` on hand-made stage maps."""

from __future__ import annotations

import importlib.util

import torch
from conftest import REPO

from pipeline.models.swtformer import HierarchicalFeatureFusion

_SPEC = importlib.util.spec_from_file_location("seed_locating", REPO / "benchmarks" / "seed_locating.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def _stages() -> list[torch.Tensor]:
    first = torch.zeros(1, 2, 4, 4)
    first[0, 0, :2, :2] = 4.0  # top-left 2x2 block of channel 0; its 2x2 average is 4 there, 0 elsewhere
    first[0, 1] = 1.0
    return [first, torch.full((1, 1, 4, 4), -2.0), torch.ones(1, 3, 2, 2), torch.ones(1, 4, 1, 1)]


def test_backbone_fusion_pools_down_upsamples_and_normalises_each_stage() -> None:
    fused = probe.backbone_fusion(_stages())
    assert fused.shape == (1, 2 + 1 + 3 + 4, 2, 2)
    # stage 1 pooled to 2x2: (4, 1) at the top-left cell, (0, 1) elsewhere, each unit length
    assert torch.allclose(fused[0, :2, 0, 0], torch.tensor([4.0, 1.0]) / 17**0.5)
    assert torch.allclose(fused[0, :2, 1, 1], torch.tensor([0.0, 1.0]))
    assert torch.allclose(fused[0, 2], torch.full((2, 2), -1.0))  # one channel: its sign
    assert torch.allclose(fused[0, 3:6], torch.full((3, 2, 2), 3**-0.5))
    assert torch.allclose(fused[0, 6:], torch.full((4, 2, 2), 0.5))  # 1x1 stage 4 upsampled to 2x2


def test_fusion_keeps_hff_or_replaces_it_or_adds_the_backbone() -> None:
    hff = HierarchicalFeatureFusion([2, 1, 3, 4], [4, 4, 8, 16], (2, 2, 2, 2), detach_inputs=True)
    stages = _stages()
    learned = hff(stages)
    assert probe.fusion("hff") is HierarchicalFeatureFusion.forward
    assert torch.equal(probe.fusion("backbone")(hff, stages), probe.backbone_fusion(stages))
    assert torch.equal(probe.fusion("both")(hff, stages), torch.cat([learned, probe.backbone_fusion(stages)], dim=1))
