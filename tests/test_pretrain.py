"""Formula-driven pretraining: the fractal generator's math, the pretraining set, and ``wsss pretrain``'s weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_params_dict, write_params
from torch.testing import assert_close

from pipeline.config import ModelParams
from pipeline.data import fractals
from pipeline.data.fractals import (
    FractalSet,
    chaos_points,
    fill_ratio,
    map_probabilities,
    render,
    search_categories,
    smooth_background,
    to_pixels,
    weight_variant,
)
from pipeline.errors import PretrainedError
from pipeline.io import sha256_of
from pipeline.models.pretrained import load_pretrained, save_state_dict
from pipeline.models.swtformer import build_model
from pipeline.pretrain import PretrainNet, build_encoder

SIERPINSKI = np.array([[0.5, 0, 0, 0.5, 0, 0], [0.5, 0, 0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5, 0, 0.5]])
"""The Sierpinski triangle of corners (0, 0), (1, 0), (0, 1): three maps halving towards each corner."""


def test_map_probabilities_follow_the_determinants():
    system = np.array([[2, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=float)  # |det| 2, 1, 0
    assert_close(map_probabilities(system), np.array([2 / 3, 1 / 3, 0.0]))
    singular = np.zeros((4, 6))
    assert_close(map_probabilities(singular), np.full(4, 0.25))


def test_chaos_game_stays_on_the_attractor():
    points = chaos_points(SIERPINSKI, 5000, np.random.default_rng(0), chains=100)
    assert points.shape == (5000, 2)
    assert (points >= -1e-9).all() and (points.sum(1) <= 1 + 1e-9).all()  # inside the triangle
    assert points[:, 0].max() > 0.9 and points[:, 1].max() > 0.9  # and reaching its corners
    x, y = points.T
    assert not ((x < 0.5 - 1e-5) & (y < 0.5 - 1e-5) & (x + y > 0.5 + 1e-5)).any()  # the middle hole stays empty


def test_to_pixels_fits_centres_and_refuses_divergence():
    pixels = to_pixels(np.array([[0.0, 0.0], [1.0, 2.0]]), 10)
    assert pixels.tolist() == [[2, 0], [7, 9]]  # height 2 spans the canvas; width 1 sits in its middle half
    boxed = to_pixels(np.array([[0.0, 0.0], [1.0, 1.0]]), 10, (0.5, 0.5, 0.0))
    assert boxed.tolist() == [[5, 0], [9, 5]]  # x from 5 (left 0.5) to 10, clipped to 9; y from 0 to 5
    assert to_pixels(np.array([[0.0, np.inf]]), 10) is None
    assert to_pixels(np.array([[0.0, 2e6]]), 10) is None


def test_fill_ratio():
    assert fill_ratio(np.array([[0.3, 0.3]] * 5), 10) == 1 / 100  # one point, one pixel
    assert fill_ratio(np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), 4) == 3 / 16
    assert fill_ratio(np.array([[np.nan, 0.0]]), 4) == 0.0
    expanding = np.array([[3.0, 0, 0, 3.0, 1, 1]])
    assert fill_ratio(chaos_points(expanding, 500, np.random.default_rng(0)), 16) == 0.0


def test_search_keeps_only_systems_that_fill_the_canvas():
    systems = search_categories(3, np.random.default_rng(0), min_fill=0.3, points=4000, canvas=64, progress=False)
    assert len(systems) == 3
    for system in systems:
        assert 2 <= len(system) <= 7 and system.shape[1] == 6 and np.abs(system).max() <= 1
        assert fill_ratio(chaos_points(system, 4000, np.random.default_rng(1)), 64) >= 0.2  # other draws: close


def test_weight_variants():
    system = np.arange(12, dtype=float).reshape(2, 6) + 1
    assert weight_variant(system, 0) is system
    assert_close(weight_variant(system, 1)[:, 0], system[:, 0] * 0.2)
    last = weight_variant(system, fractals.VARIANTS - 1)
    assert_close(last[:, 5], system[:, 5] * 1.8)
    assert_close(last[:, :5], system[:, :5])


def test_render_is_seeded_and_draws_on_the_background():
    first = render(SIERPINSKI, 32, 2000, np.random.default_rng(5))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render(SIERPINSKI, 32, 2000, np.random.default_rng(5)))
    background = smooth_background(32, np.random.default_rng(5))
    drawn = np.abs(first.astype(float) - background).sum(2) > 1
    assert 0.05 < drawn.mean() < 0.6  # the triangle covers part of the canvas
    diverging = render(np.array([[3.0, 0, 0, 3.0, 1, 1]]), 32, 500, np.random.default_rng(5))
    assert np.array_equal(diverging, np.clip(np.rint(background), 0, 255).astype(np.uint8))


def test_fractal_set_augments_per_epoch_and_not_held_out():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    held = FractalSet(images, np.array([0, 1, 2]), mean, std, augment=False)
    expected = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert_close(held[1]["image"], expected)
    assert int(held[1]["label"]) == 1
    train = FractalSet(images, np.array([0, 1, 2]), mean, std, augment=True, seed=3)
    views = []
    for epoch in range(8):
        train.epoch = epoch
        views.append(train[1]["image"])
        assert_close(views[-1], train[1]["image"])  # the same sample of the same epoch: the same view
    assert any(not torch.equal(views[0], view) for view in views[1:])
    for view in views:  # rotated and flipped: the same pixels in another order
        assert_close(view.flatten().sort().values, expected.flatten().sort().values)


@pytest.mark.parametrize("arch", ["swtformer", "deit"])
def test_pretrained_encoder_loads_into_the_classifier(tmp_path, arch):
    spec = tiny_params_dict()["model"] | {"arch": arch}
    model = ModelParams(**spec)
    torch.manual_seed(1)
    net = PretrainNet(build_encoder(model, 32), num_classes=5)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    path = save_state_dict(net.encoder.state_dict(), tmp_path / "enc.safetensors")
    dump = model.model_dump()
    (dump if arch == "swtformer" else dump["vit"])["pretrained"] = str(path)
    torch.manual_seed(2)
    classifier = build_model(4, 32, **dump)
    inner = classifier.vit if arch == "deit" else classifier.backbone.model
    for name, tensor in net.encoder.state_dict().items():
        assert_close(inner.state_dict()[name], tensor)


def test_checksum_in_the_manifest_is_checked(tmp_path):
    encoder = torch.nn.Linear(3, 2)
    path = save_state_dict(encoder.state_dict(), tmp_path / "enc.safetensors")
    manifest = tmp_path / "enc.json"
    manifest.write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(PretrainedError, match="does not match the sha256"):
        load_pretrained(torch.nn.Linear(3, 2), path)
    manifest.write_text(json.dumps({"sha256": sha256_of(path)}))
    target = torch.nn.Linear(3, 2)
    load_pretrained(target, path)
    assert_close(target.weight, encoder.weight)


def test_pretrain_command_writes_weights_and_manifest(tmp_path, cli):
    pretrain = {"categories": 3, "instances": 4, "val_instances": 2, "image_size": 32, "points": 500}
    raw = tiny_params_dict(pretrain=pretrain | {"epochs": 2, "batch_size": 4, "device": "cpu", "threads": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    result = cli("pretrain", "--params", params, "--out", "w/enc.safetensors", "--results", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "w/enc.json").read_text())
    assert len(manifest["held_out_top1"]) == 2 and 0 <= manifest["held_out_top1"][-1] <= 1
    assert manifest["params"]["pretrain"]["categories"] == 3
    assert "held-out top-1" in result.stdout
    curves = json.loads((tmp_path / "r/metrics.json").read_text())
    assert "top1" in curves["val"]
