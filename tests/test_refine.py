"""Refinement pieces on hand-made cases: seeds, affinity labels and loss, random walk, the pool, the config."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import AffinityLabelParams, AffinityNetParams, CrfParams, RefineParams, TrainAffParams
from pipeline.models.affinitynet import AffinityModel, AffinityNet
from pipeline.parallel import resolve_workers
from pipeline.refine import pseudo_label, pseudo_labels
from pipeline.refinement.affinity import (
    affinity_loss,
    confident_labels,
    grid_labels,
    pair_affinities,
    pair_label_masks,
    radius_offsets,
    shifted,
)
from pipeline.refinement.random_walk import grid_walk, random_walk, transition_matrix, walk_seed_scores
from pipeline.refinement.seeds import (
    choose_seed_map,
    seed_scores,
    threshold_labels,
    with_constant_background,
    with_power_background,
)

NO_PAIRWISE = CrfParams(gauss_compat=0, bilateral_compat=0, iterations=1)

# --- seeds ------------------------------------------------------------------------------------------------------


def test_threshold_labels_with_ignore_band():
    keys = np.array([0, 2, 5])
    fg = np.array(
        [
            [[0.10, 0.40, 0.50, 0.70]],  # class 2
            [[0.20, 0.30, 0.60, 0.65]],  # class 5
        ],
        np.float32,
    )  # (2, 1, 4): best fg scores 0.2, 0.4, 0.6, 0.7
    maps = np.concatenate([np.zeros((1, 1, 4), np.float32), fg])
    np.testing.assert_array_equal(threshold_labels(maps, keys, 0.45), [[0, 0, 5, 2]])
    # band (0.35, 0.6]: 0.4 and 0.6 are uncertain; 0.2 stays background, 0.7 stays class 2
    np.testing.assert_array_equal(threshold_labels(maps, keys, 0.45, (0.35, 0.6)), [[0, 255, 255, 2]])
    # a score equal to the threshold is background (ties go to background, like the cams sweep)
    np.testing.assert_array_equal(threshold_labels(maps, keys, 0.6), [[0, 0, 0, 2]])


def test_stored_background_is_the_argmax_protocol():
    keys = np.array([0, 2, 5])
    maps = np.array([[[0.9, 0.3, 0.5]], [[0.1, 0.6, 0.5]], [[0.2, 0.1, 0.2]]], np.float32)  # (3, 1, 3)
    # argmax over [stored bg ; classes]; a tie (0.5 = 0.5) goes to the first channel, background
    np.testing.assert_array_equal(threshold_labels(maps, keys, None), [[0, 2, 0]])
    np.testing.assert_array_equal(seed_scores(maps, None), maps)
    np.testing.assert_allclose(seed_scores(maps, 0.4)[0], [[0.4, 0.4, 0.4]])


def test_threshold_labels_background_only_image():
    assert (threshold_labels(np.ones((1, 2, 3), np.float32), np.array([0]), 0.5) == 0).all()


def test_background_channels():
    maps = np.array([[[9.0]], [[0.25]], [[0.5]]], np.float32)  # (3, 1, 1)
    np.testing.assert_allclose(with_constant_background(maps, 0.4)[:, 0, 0], [0.4, 0.25, 0.5])
    np.testing.assert_allclose(with_power_background(maps, 2)[:, 0, 0], [0.25, 0.25, 0.5])
    assert maps[0, 0, 0] == 9.0, "the input is not modified"


def test_choose_seed_map():
    assert choose_seed_map(["keys", "cam", "rcam"], "auto") == "rcam"
    assert choose_seed_map(["keys", "cam"], "auto") == "cam"
    assert choose_seed_map(["keys", "cam", "rcam"], "cam") == "cam"
    with pytest.raises(ValueError, match="rcam"):
        choose_seed_map(["keys", "cam"], "rcam")


# --- pairs and affinity labels ----------------------------------------------------------------------------------


def test_radius_offsets_match_psa():
    offsets = radius_offsets(5)
    assert len(offsets) == 34 and len(set(offsets)) == 34
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert not {(-dy, -dx) for dy, dx in offsets} & set(offsets), "each unordered pair once"
    assert radius_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]


def test_shifted():
    x = torch.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(shifted(x, 0, 1, -1), [[1, 2, -1], [4, 5, -1]])
    np.testing.assert_array_equal(shifted(x, 1, -1, -1), [[-1, 3, 4], [-1, -1, -1]])


def test_pair_label_masks_hand_made():
    labels = torch.tensor([[[0, 0, 2, 2, 255]]])  # (1, 1, 5)
    masks = pair_label_masks(labels, [(0, 1), (0, 2)])
    # offset (0, 1): pairs (0,1) bg, (1,2) neg, (2,3) fg, (3,4) ignored, (4,-) outside
    np.testing.assert_array_equal(masks["bg"][0, 0, 0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(masks["neg"][0, 0, 0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(masks["fg"][0, 0, 0], [0, 0, 1, 0, 0])
    # offset (0, 2): pairs (0,2) neg, (1,3) neg, (2,4) ignored
    np.testing.assert_array_equal(masks["neg"][0, 1, 0], [1, 1, 0, 0, 0])
    assert not masks["bg"][0, 1].any() and not masks["fg"][0, 1].any()


def test_affinity_loss_is_balanced_and_ignores_255():
    labels = torch.tensor([[[0, 0, 0, 1, 1, 255]]])  # (1, 1, 6)
    offsets = [(0, 1)]  # pairs: (0,1) bg, (1,2) bg, (2,3) neg, (3,4) fg, (4,5) ignored
    masks = pair_label_masks(labels, offsets)
    affinity = torch.tensor([[[[0.5, 0.5, 0.25, 0.8, 0.123, 0.77]]]], requires_grad=True)  # (1, 1, 1, 6)
    terms = affinity_loss(affinity, masks)
    bg, fg, neg = -np.log(0.5 + 1e-5), -np.log(0.8 + 1e-5), -np.log(0.75 + 1e-5)
    assert terms["bg"].item() == pytest.approx(bg * 2 / (2 + 1e-5), rel=1e-5)
    assert terms["fg"].item() == pytest.approx(fg / (1 + 1e-5), rel=1e-5)
    assert terms["neg"].item() == pytest.approx(neg / (1 + 1e-5), rel=1e-5)
    assert terms["total"].item() == pytest.approx(bg / 4 + fg / 4 + neg / 2, rel=1e-4)
    terms["total"].backward()
    assert affinity.grad[0, 0, 0, 4] == 0 and affinity.grad[0, 0, 0, 5] == 0, "ignored and outside pairs"
    # balance: twice as many background pairs with the same affinity leave the loss unchanged
    wide = torch.tensor([[[0, 0, 0, 0, 0, 1, 1, 255]]])
    wide_aff = torch.tensor([[[[0.5, 0.5, 0.5, 0.5, 0.25, 0.8, 0.1, 0.1]]]])
    assert affinity_loss(wide_aff, pair_label_masks(wide, offsets))["total"].item() == pytest.approx(
        terms["total"].item(), rel=1e-4
    )


def test_affinity_loss_without_pairs_of_a_kind_is_finite():
    masks = pair_label_masks(torch.zeros(1, 2, 2, dtype=torch.long), [(0, 1)])  # background only
    terms = affinity_loss(torch.full((1, 1, 2, 2), 0.5), masks)
    assert terms["fg"].item() == 0 and terms["neg"].item() == 0 and torch.isfinite(terms["total"])


def test_confident_labels_three_states():
    # scores 0.9 (confident fg), 0.45 (uncertain), 0.1 (confident bg); no pairwise terms -> the unary decides
    image = np.zeros((1, 3, 3), np.uint8)
    maps = np.zeros((2, 1, 3), np.float32)
    maps[1, 0] = [0.9, 0.45, 0.1]
    keys = np.array([0, 4])
    labels = confident_labels(image, maps, keys, NO_PAIRWISE.model_dump(), 0.6, 0.3, "constant")
    np.testing.assert_array_equal(labels, [[4, 255, 0]])
    # power mode: bg = (1 - 0.9)^a, (0.55)^a, (0.9)^a; a=1 -> fg only at 0.9; a=8 -> bg only at 0.1 (0.43 > 0.1)
    labels = confident_labels(image, maps, keys, NO_PAIRWISE.model_dump(), 1.0, 8.0, "power")
    np.testing.assert_array_equal(labels, [[4, 255, 0]])


def test_grid_labels_keep_pure_cells():
    labels = np.array([[1, 1, 0, 0], [1, 1, 0, 3], [2, 2, 255, 255], [2, 2, 255, 255]], np.uint8)
    np.testing.assert_array_equal(grid_labels(labels, 2), [[1, 255], [2, 255]])
    with pytest.raises(ValueError):
        grid_labels(labels[:3], 2)


# --- random walk ------------------------------------------------------------------------------------------------


def test_transition_matrix_hand_made():
    # a 1 x 3 grid with pairs (0,1): 0.5 and (1,2): 0.2; beta = 2 squares them
    affinity = torch.tensor([[[0.5, 0.2, 0.9]]])  # the third entry's pair leaves the grid: unused
    a = np.array([[1, 0.25, 0], [0.25, 1, 0.04], [0, 0.04, 1]])
    expected = a / a.sum(0, keepdims=True)
    np.testing.assert_allclose(transition_matrix(affinity, [(0, 1)], beta=2.0).numpy(), expected, rtol=1e-6)


def test_transition_matrix_is_column_stochastic():
    offsets = radius_offsets(2)
    t = transition_matrix(torch.rand(len(offsets), 3, 4), offsets, beta=2.0)
    assert t.shape == (12, 12)
    np.testing.assert_allclose(t.sum(0).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("radius", [2, 3, 5])
def test_grid_walk_equals_the_dense_transition_matrix_walk(radius):
    torch.manual_seed(radius)
    offsets = radius_offsets(radius)
    affinity, seeds = torch.rand(len(offsets), 7, 11), torch.rand(3, 7, 11)
    dense = random_walk(seeds.reshape(3, -1), transition_matrix(affinity, offsets, beta=4.0), steps=16)
    np.testing.assert_allclose(grid_walk(seeds, affinity, offsets, 4.0, 16).reshape(3, -1), dense, atol=1e-5)


def test_grid_walk_one_step_by_hand():
    # a 1 x 3 grid, pairs (x, x+1) with affinities 1 and 0.5 (beta 1): A = [[1, 1, 0], [1, 1, .5], [0, .5, 1]],
    # column sums 2, 2.5, 1.5; seeds (1, 0, 0) -> (1 / 2, 1 / 2.5, 0)
    walked = grid_walk(torch.tensor([[[1.0, 0, 0]]]), torch.tensor([[[1.0, 0.5, 0.7]]]), [(0, 1)], 1.0, 1)
    np.testing.assert_allclose(walked[0, 0].numpy(), [0.5, 0.4, 0.0], atol=1e-6)


def test_walk_with_identity_affinity_leaves_seeds_unchanged():
    offsets = radius_offsets(3)
    seeds = torch.rand(3, 4, 5)
    walked = walk_seed_scores(seeds, torch.zeros(len(offsets), 4, 5), offsets, stride=1, beta=8, steps=64)
    np.testing.assert_allclose(walked.numpy(), seeds.numpy(), atol=1e-6)


def test_walk_spreads_a_seed_across_its_region_only():
    # a 1 x 6 grid: cells 0-2 are region A, 3-5 region B; affinity 1 inside a region, 0 across
    offsets = [(0, 1)]
    affinity = torch.tensor([[[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]]])  # pair (x, x+1)
    t = transition_matrix(affinity, offsets, beta=8)
    seeds = torch.tensor([[1.0, 0, 0, 0, 0, 0]])  # (K=1, n=6): a seed in cell 0
    walked = random_walk(seeds, t, steps=256)[0]
    # each step averages a node's neighbourhood, so region A converges to one value: the seed weighted by the
    # degree of its cell (with self-loops: 2 of 2 + 3 + 2)
    np.testing.assert_allclose(walked[:3].numpy(), 2 / 7, atol=1e-4)
    np.testing.assert_array_equal(walked[3:].numpy(), 0)  # nothing leaks into region B
    assert random_walk(seeds, t, steps=1)[0, 2].item() == 0, "one step reaches only the direct neighbour"


def test_walk_seed_scores_keeps_constant_scores_constant():
    # H, W divisible by the stride: pooling gives a constant grid, the column-stochastic walk keeps it constant
    # (each step is a weighted mean), and bilinear upsampling of a constant is that constant
    torch.manual_seed(0)
    offsets = radius_offsets(2)
    scores = torch.tensor([0.2, 0.7, 1.5]).view(3, 1, 1).expand(3, 12, 16)
    affinity = torch.rand(len(offsets), 3, 4)
    out = walk_seed_scores(scores, affinity, offsets, stride=4, beta=2, steps=8)
    assert out.shape == (3, 12, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), scores.numpy(), rtol=1e-5)


def test_walk_seed_scores_pools_and_upsamples_to_the_image():
    # H, W not divisible by the stride: zero padding to the grid, cropped back to (H, W)
    offsets = radius_offsets(2)
    scores = torch.full((2, 10, 13), 0.5)
    out = walk_seed_scores(scores, torch.zeros(len(offsets), 3, 4), offsets, stride=4, beta=1, steps=4)
    assert out.shape == (2, 10, 13)
    # no affinity: the walk is the identity; the top-left 2 x 2 cells have no padding, so stay 0.5 inside
    np.testing.assert_allclose(out[:, :6, :10].numpy(), 0.5, rtol=1e-5)
    assert out[:, -1, -1].max() < 0.5, "the last cell holds padding zeros"


# --- AffinityNet ------------------------------------------------------------------------------------------------

TINY_NET = AffinityNetParams(backbone="regnetx_002", out_indices=(1, 2), projection_dims=(4, 8), feature_dim=8)


def test_affinitynet_grid_and_affinities():
    torch.manual_seed(0)
    net = AffinityNet(**TINY_NET.model_dump()).eval()
    assert net.stride == 4 and net.pad_multiple == 8
    assert net.grid_size(50, 70) == (14, 18)
    with torch.no_grad():
        features = net(torch.randn(2, 3, 50, 70))
        affinity = pair_affinities(features, radius_offsets(3))
    assert features.shape == (2, 8, 14, 18)
    assert affinity.shape == (2, len(radius_offsets(3)), 14, 18)
    assert (affinity > 0).all() and (affinity <= 1).all()


def test_affinitynet_unknown_backbone_is_a_config_error():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_net"):
        AffinityNet(**{**TINY_NET.model_dump(), "backbone": "no_such_net"})


# --- pseudo labels and the pool ---------------------------------------------------------------------------------


def _jobs(count: int, size: int = 24):
    rng = np.random.default_rng(0)
    for _ in range(count):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        image[:, size // 2 :] = (20, 200, 20)
        maps = rng.random((3, size, size)).astype(np.float32)
        yield image, maps, np.array([0, 1, 3])


@pytest.fixture(scope="module")
def tiny_affinity_model() -> AffinityModel:
    torch.manual_seed(0)
    return AffinityModel(AffinityNet(**TINY_NET.model_dump()).eval(), radius_offsets(3), (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("method", ["none", "crf", "psa", "psa_crf", "par", "par_crf"])
def test_pseudo_label_methods_use_only_the_image_classes(method, tiny_affinity_model):
    image, maps, keys = next(_jobs(1))
    net = tiny_affinity_model
    params = RefineParams(method=method, crf=CrfParams(iterations=3, bilateral_sxy=10))
    labels = pseudo_label(image, maps, keys, params, net)
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 3}


def test_resolve_workers():
    assert resolve_workers(3) == 3
    assert 1 <= resolve_workers(0) <= (os.cpu_count() or 1)


def test_pool_gives_the_serial_labels():
    params = RefineParams(method="crf", crf=CrfParams(iterations=5, bilateral_sxy=10))
    serial = list(pseudo_labels(_jobs(6), params, None, workers=1))
    pooled = list(pseudo_labels(_jobs(6), params, None, workers=2))
    assert len(pooled) == 6
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a, b)


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "bad"),
    [
        (RefineParams, {"method": "magic"}),
        (RefineParams, {"bg_threshold": 1.5}),
        (RefineParams, {"bg_threshold": 0.45, "ignore_band": [0.5, 0.6]}),  # band must contain the threshold
        (RefineParams, {"bg_threshold": None, "ignore_band": [0.3, 0.6]}),  # a band needs a constant threshold
        (RefineParams, {"psa": {"logt": -1}}),
        (RefineParams, {"workers": -1}),
        (RefineParams, {"crf": {"iterations": 0}}),
        (AffinityLabelParams, {"fg_score": 0.3, "bg_score": 0.6}),
        (AffinityLabelParams, {"fg_alpha": 32, "bg_alpha": 4}),
        (AffinityNetParams, {"out_indices": [1, 2], "projection_dims": [8]}),
        (AffinityNetParams, {"out_indices": []}),
        (TrainAffParams, {"radius": 1}),
        (TrainAffParams, {"seed_map": "both"}),
        (TrainAffParams, {"epochs": 2, "warmup_epochs": 2}),
    ],
)
def test_config_errors(model, bad):
    with pytest.raises(ValueError):
        model.model_validate(bad)


def test_config_error_in_a_params_file_is_one_line(tmp_path):
    import yaml
    from conftest import default_params_dict

    from pipeline.config import load_params
    from pipeline.errors import ConfigError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params_dict(refine={"ignore_band": [0.5, 0.6]})))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "refine" in message and "ignore_band" in message
