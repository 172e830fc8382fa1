"""PAR (AFA's pixel-adaptive refinement): hand cases, a brute-force reference, and ``refine.method: par``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_params_dict, write_params
from typer.testing import CliRunner

from pipeline.config import ParParams, RefineParams
from pipeline.data.layout import PreparedDataset
from pipeline.io import CamWriter, load_label_png
from pipeline.refine import pseudo_label
from pipeline.refinement.par import (
    DILATIONS,
    PAR,
    SparsePattern,
    neighbour_distances,
    neighbour_index,
    neighbour_offsets,
    par_kernel,
    position_weights,
    refine_at_scale,
)
from stages.cli import app

W2, T = 0.01, 10

# --- a brute-force reference: AFA's formulas with replicate padding and one shifted copy per neighbour ----------


def _shifted(x: torch.Tensor, dilations) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, N, h, w): neighbour n of every pixel, by replicate padding and slicing."""
    pad = max(dilations)
    h, w = x.shape[-2:]
    padded = F.pad(x, [pad] * 4, mode="replicate")
    copies = [
        padded[..., pad + dy * d : pad + dy * d + h, pad + dx * d : pad + dx * d + w]
        for d in dilations
        for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    ]
    return torch.stack(copies, dim=2)


def _reference_par(image, maps, dilations, iterations, w1=0.3, w2=W2):
    near = _shifted(image, dilations)  # (B, 3, N, h, w)
    app = -(((near - image.unsqueeze(2)).abs() / (near.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2)
    dist = torch.tensor([d * (math.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in
                         ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))])  # fmt: skip
    pos = (-((dist / (dist.std() + 1e-8) / w1) ** 2)).softmax(0).view(1, 1, -1, 1, 1)
    kernel = app.mean(1, keepdim=True).softmax(2) + w2 * pos  # (B, 1, N, h, w)
    for _ in range(iterations):
        maps = (_shifted(maps, dilations) * kernel).sum(2)
    return maps


# --- bookkeeping --------------------------------------------------------------------------------------------------


def test_offsets_and_distances():
    offsets = neighbour_offsets((1, 3))
    assert offsets.shape == (16, 2)
    assert offsets[:8].tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]]
    assert offsets[8:].tolist() == (offsets[:8] * 3).tolist()
    r2 = math.sqrt(2)
    expected = [r2, 1, r2, 1, 1, r2, 1, r2]
    np.testing.assert_allclose(neighbour_distances((1, 3)), expected + [3 * e for e in expected], rtol=1e-6)
    assert len(neighbour_offsets(DILATIONS)) == 48


def test_neighbour_index_clamps_like_replicate_padding():
    index = neighbour_index(3, 4, (1,))  # pixels numbered y * 4 + x
    assert index.shape == (12, 8)  # pixel-major
    assert index[0].tolist() == [0, 0, 1, 0, 1, 4, 4, 5]  # top-left corner: outside -> clamped
    assert index[5].tolist() == [0, 1, 2, 4, 6, 8, 9, 10]  # (1, 1): the full 3x3 ring
    assert index[11].tolist() == [6, 7, 7, 10, 11, 10, 11, 11]  # bottom-right corner
    # a dilation larger than the image clamps to the border rows / columns
    assert neighbour_index(3, 4, (5,))[5].tolist() == [0, 1, 3, 4, 7, 8, 9, 11]


def test_sparse_pattern_merges_repeated_neighbours():
    index = neighbour_index(3, 4, (1,))
    pattern = SparsePattern(index)
    assert pattern.crow[:2].tolist() == [0, 4]  # the corner has 4 distinct neighbours (0, 1, 4, 5) of 8
    assert pattern.col[:4].tolist() == [0, 1, 4, 5]
    kernel = torch.ones(1, 12, 8)  # every neighbour weight 1: the corner's own column collects 3 of them
    dense = pattern.matrix(kernel).to_dense()
    assert dense[0, [0, 1, 4, 5]].tolist() == [3.0, 2.0, 2.0, 1.0]
    assert (dense.sum(1) == 8).all()


def test_kernel_rows_sum_to_one_plus_w2_and_a_constant_image_is_uniform():
    index = neighbour_index(6, 7, DILATIONS)
    kernel = par_kernel(torch.rand(2, 3, 6, 7), index, DILATIONS)
    assert kernel.shape == (2, 42, 48)
    torch.testing.assert_close(kernel.sum(2), torch.full((2, 42), 1 + W2))
    flat = par_kernel(torch.full((1, 3, 6, 7), 0.3), index, DILATIONS)  # std 0: every appearance logit is 0
    expected = 1 / 48 + W2 * position_weights(DILATIONS)  # (48,)
    torch.testing.assert_close(flat[0], expected.expand(42, 48))


def test_par_matches_the_brute_force_reference_batched():
    torch.manual_seed(0)
    image, maps = torch.rand(3, 3, 7, 9), torch.rand(3, 4, 7, 9)
    par = PAR(dilations=(1, 2, 4), iterations=3)
    out = par(image, maps)
    assert out.shape == (3, 4, 7, 9) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference_par(image, maps, (1, 2, 4), 3), rtol=1e-5, atol=1e-6)
    single = torch.cat([par(image[i : i + 1], maps[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(out, single, rtol=1e-6, atol=1e-7)  # the batch is block-diagonal


def test_par_resizes_maps_to_the_image():
    out = PAR(iterations=1)(torch.rand(1, 3, 8, 10), torch.rand(1, 2, 4, 5))
    assert out.shape == (1, 2, 8, 10)


def test_refine_at_scale_shapes_and_stacks():
    torch.manual_seed(0)
    par = PAR(iterations=2)
    image, scores = torch.rand(2, 3, 20, 24), torch.rand(2, 2, 3, 20, 24)  # (B, S, K, H, W)
    out = refine_at_scale(par, image, scores, scale=0.5)
    assert out.shape == (2, 2, 3, 20, 24)
    one = refine_at_scale(par, image, scores[:, 1], scale=0.5)  # each stack alone: same kernel, same result
    torch.testing.assert_close(out[:, 1], one)
    probs_sum = refine_at_scale(par, image, scores[:, 0], scale=1.0).sum(1)  # softmax then (1 + w2)^T
    torch.testing.assert_close(probs_sum, torch.full_like(probs_sum, (1 + W2) ** 2))


# --- the two properties the issue asks for ------------------------------------------------------------------------


@pytest.mark.parametrize("constant_image", [True, False])
def test_constant_maps_stay_constant(constant_image):
    torch.manual_seed(0)
    image = torch.full((1, 3, 12, 16), 0.4) if constant_image else torch.rand(1, 3, 12, 16)
    maps = torch.tensor([0.2, 0.7, 0.1]).view(1, 3, 1, 1).expand(1, 3, 12, 16)
    out = PAR()(image, maps)
    # every pixel's weights sum to 1 + w2 (not renormalised, as published): a global factor (1.01)^10
    torch.testing.assert_close(out, maps * (1 + W2) ** T)


def _two_colour(height=8, width=32):
    image = torch.zeros(1, 3, height, width)
    image[:, 0, :, : width // 2] = 1.0  # red | blue
    image[:, 2, :, width // 2 :] = 1.0
    return image


def test_a_seed_does_not_leak_across_a_colour_edge():
    image, half = _two_colour(), 16
    fg = torch.zeros(1, 1, 8, 32)
    fg[..., :half] = 1.0
    maps = torch.cat([1 - fg, fg], 1)  # (1, 2, 8, 32): background | object seeded on the red side
    out = PAR()(image, maps)
    # Across the edge the appearance weight is about exp(-29) (hand: a colour step of 1 over a local std of at
    # most 0.5, divided by w1 = 0.3, squared, 2 of 3 channels); only the colour-blind position term (weight
    # w2) carries mass: at most T * w2 * (1 + w2)^T = 0.11 after T = 10 steps.
    assert out[0, 1, :, half:].max() < T * W2 * (1 + W2) ** T
    assert out[0, 1, :, :half].min() > 1.0
    # the same seed on a uniform image spreads across the same columns
    uniform = PAR()(torch.full_like(image, 0.5), maps)
    assert uniform[0, 1, :, half : half + 4].min() > 0.4


def test_an_overshooting_seed_snaps_back_to_the_colour_edge():
    fg = torch.zeros(1, 1, 8, 32)
    fg[..., :18] = 1.0  # two columns too far into the blue side
    labels = PAR()(_two_colour(), torch.cat([1 - fg, fg], 1))[0].argmax(0)
    expected = torch.zeros(8, 32, dtype=torch.long)
    expected[:, :16] = 1
    assert torch.equal(labels, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    image, maps = torch.rand(2, 3, 30, 40), torch.rand(2, 3, 30, 40)
    cpu = PAR()(image, maps)
    torch.testing.assert_close(PAR()(image.cuda(), maps.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-5)


# --- refine.method: par ------------------------------------------------------------------------------------------


def _three_bands(width=16):
    """An 8 x 3w image of three colour bands and seeds whose class-2 score is 0.9 | 0.45 | 0.1 band by band."""
    image = np.zeros((8, 3 * width, 3), np.uint8)
    image[:, :width] = (200, 30, 30)
    image[:, width : 2 * width] = (30, 200, 30)
    image[:, 2 * width :] = (30, 30, 200)
    fg = np.repeat([0.9, 0.45, 0.1], width)[None].repeat(8, 0).astype(np.float32)  # (8, 3w)
    return image, np.stack([1 - fg, fg]), np.array([0, 2])


def test_par_pseudo_label_dense_and_three_state():
    image, maps, keys = _three_bands()
    exact = ParParams(scale=1.0)  # at half resolution the bilinear round trip blurs each band edge by a pixel
    dense = pseudo_label(image, maps, keys, RefineParams(method="par", bg_threshold=0.5, par=exact), None)
    assert dense.dtype == np.uint8 and dense.shape == (8, 48)
    assert (dense[:, :16] == 2).all() and (dense[:, 16:] == 0).all()
    params = RefineParams(method="par", par=ParParams(scale=1.0, thresholds=(0.35, 0.55)))
    three = pseudo_label(image, maps, keys, params, None)
    # 0.9 beats both backgrounds: class 2; 0.45 is between them: 255; 0.1 is background under both
    assert (three[:, :16] == 2).all() and (three[:, 16:32] == 255).all() and (three[:, 32:] == 0).all()
    crf = pseudo_label(image, maps, keys, params.model_copy(update={"method": "par_crf"}), None)
    assert set(np.unique(crf)) <= {0, 2, 255}


@pytest.mark.parametrize(
    "bad", [{"thresholds": [0.6, 0.3]}, {"dilations": []}, {"dilations": [0]}, {"scale": 0}, {"iterations": 0}]
)
def test_par_config_errors(bad):
    with pytest.raises(ValueError):
        ParParams.model_validate(bad)


@pytest.fixture(scope="module")
def prepared_with_seeds(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny prepared synthetic dataset and a CAM store of noisy blurred ground-truth seeds (no training)."""
    root = tmp_path_factory.mktemp("par")
    params = write_params(root / "params.yaml", tiny_params_dict())
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(root / "prepared")])
    assert result.exit_code == 0, result.output
    data = PreparedDataset.open(root / "prepared")
    rng = np.random.default_rng(0)
    with CamWriter(root / "cams", shard_size=8) as writer:
        for image_id in data.split("train"):
            keys = np.array([0, *data.labels[image_id]])
            mask = torch.from_numpy(data.load_mask(image_id).astype(np.int64))
            onehot = torch.stack([(mask == k).float() for k in keys[1:]])[None]  # (1, K-1, H, W)
            blurred = F.avg_pool2d(onehot, 5, stride=1, padding=2)[0].numpy()
            cams = np.clip(blurred + rng.normal(0, 0.1, blurred.shape), 0, 1)
            writer.add(image_id, keys, {"cam": np.concatenate([1 - cams.max(0, keepdims=True), cams])})
    return root, params


@pytest.mark.parametrize("thresholds", [None, [0.35, 0.55]])
def test_refine_stage_with_par(prepared_with_seeds, tmp_path, monkeypatch, thresholds):
    root, _ = prepared_with_seeds
    monkeypatch.chdir(tmp_path)
    raw = tiny_params_dict(refine={"method": "par", "par": {"thresholds": thresholds}, "workers": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    args = ["refine", "--params", params, "--data", root / "prepared", "--cams", root / "cams",
            "--aff-dir", tmp_path / "no_aff", "--out", tmp_path / "pseudo", "--results", tmp_path / "res"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    labels = json.loads((root / "prepared/cls_labels.json").read_text())
    pngs = sorted((tmp_path / "pseudo").glob("*.png"))
    assert len(pngs) == 16
    for png in pngs:
        label = load_label_png(png)
        assert label.shape == (32, 32)
        assert set(np.unique(label)) <= {0, 255, *labels[png.stem]}, png.name
    metrics = json.loads((tmp_path / "res/metrics.json").read_text())
    assert metrics["images_scored"] == 16
    assert metrics["pseudo"]["miou"] > 0.3, "seeds made from the ground truth give decent labels"
    assert (metrics["pseudo"]["ignored_fraction"] > 0) == (thresholds is not None)
