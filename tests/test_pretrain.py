"""Formula-driven pretraining: the fractal generator's math, the pretraining set, and ``wsss pretrain``'s weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_params_dict, write_params
from torch.testing import assert_close

from pipeline.config import SCENE_CLASSES, ModelParams, PretrainParams
from pipeline.data import fractals
from pipeline.data.fractals import (
    chaos_points,
    fill_ratio,
    map_probabilities,
    render,
    search_categories,
    smooth_background,
    to_pixels,
    weight_variant,
)
from pipeline.data.pretrain_images import PRETRAIN_LOOKS, PretrainImages, pretrain_looks, render_scenes, scene_spec
from pipeline.data.synthetic import CLASSES, generate_scene
from pipeline.errors import PretrainedError
from pipeline.io import sha256_of
from pipeline.models.pretrained import load_pretrained, read_state_dict, save_state_dict
from pipeline.models.swtformer import build_model
from pipeline.pretrain import PretrainNet, _loss_step, build_encoder, held_out_map, top1

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


def test_pretrain_images_augment_per_epoch_and_not_held_out():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    held = PretrainImages(images, np.array([0, 1, 2]), mean, std, augment=False)
    expected = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert_close(held[1]["image"], expected)
    assert int(held[1]["label"]) == 1
    train = PretrainImages(images, np.array([0, 1, 2]), mean, std, augment=True, seed=3)
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


def test_the_shipped_weights_fill_the_default_swin():
    """``model.pretrained``'s default: made for the default ``model.swin``, every backbone tensor comes from it."""
    model = ModelParams()
    manifest = json.loads((REPO / "weights/swin_small_scenes.json").read_text())
    assert manifest["params"]["model"]["swin"] == model.swin.model_dump(mode="json")
    shipped = read_state_dict(REPO / model.pretrained)
    torch.manual_seed(0)
    dump = model.model_dump() | {"pretrained": str(REPO / model.pretrained)}  # relative to the project's root
    backbone = build_model(6, 96, **dump).backbone.model.state_dict()
    assert backbone.keys() <= shipped.keys()
    for name, tensor in backbone.items():
        assert_close(tensor, shipped[name])


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
    pretrain = {"source": "fractals", "categories": 3, "instances": 4, "val_instances": 2, "image_size": 32}
    pretrain["points"] = 500
    raw = tiny_params_dict(pretrain=pretrain | {"epochs": 2, "batch_size": 4, "device": "cpu", "threads": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    result = cli("pretrain", "--params", params, "--out", "w/enc.safetensors", "--results", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "w/enc.json").read_text())
    assert manifest["held_out_metric"] == "top1"
    assert len(manifest["held_out"]) == 2 and 0 <= manifest["held_out"][-1] <= 1
    assert manifest["params"]["pretrain"]["categories"] == 3
    assert "held-out top1" in result.stdout
    curves = json.loads((tmp_path / "r/metrics.json").read_text())
    assert "top1" in curves["val"]


def test_scene_looks_are_patterned_so_none_is_a_benchmark_class():
    assert len(PRETRAIN_LOOKS) == SCENE_CLASSES == 60
    assert all(look.pattern != "plain" for look in PRETRAIN_LOOKS)  # every benchmark body is plain
    assert len({(look.body, look.pattern, look.part, look.part_color) for look in PRETRAIN_LOOKS}) == 60
    assert {c.body for c in CLASSES} <= {look.body for look in PRETRAIN_LOOKS}  # the same kind of objects
    assert pretrain_looks(3) == list(PRETRAIN_LOOKS[:3])
    with pytest.raises(ValueError, match="1..60"):
        pretrain_looks(61)
    with pytest.raises(ValueError, match="at most 60 with source scenes"):
        PretrainParams(source="scenes", categories=61)
    assert PretrainParams(source="fractals", categories=61).categories == 61


def test_scene_labels_are_the_classes_with_16_visible_pixels():
    looks = pretrain_looks(5)
    images, targets = render_scenes(looks, 6, 48, seed=2)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8 and targets.shape == (6, 5)
    for index in range(6):
        image, label, _ = generate_scene(index, 2, looks, scene_spec(48))
        assert np.array_equal(images[index], image)
        counts = np.bincount(label.ravel(), minlength=6)[1:]
        assert targets[index].tolist() == [float(n >= 16) for n in counts]
    assert targets.sum(1).min() >= 1  # every scene shows a class
    held, _ = render_scenes(looks, 2, 48, seed=2, first=6)
    again, _ = render_scenes(looks, 8, 48, seed=2)
    assert np.array_equal(held, again[6:])  # held-out scenes are the next indices: never a training scene


def test_multi_hot_labels_pass_through_and_take_binary_cross_entropy():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    targets = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    item = PretrainImages(images, targets, (0.5,) * 3, (0.25,) * 3, augment=True)[0]
    assert item["label"].dtype == torch.float32 and item["label"].tolist() == [1.0, 0.0, 1.0]
    net = torch.nn.Linear(2, 3)
    torch.nn.init.zeros_(net.weight), torch.nn.init.zeros_(net.bias)
    batch = {"image": torch.ones(2, 2), "label": torch.from_numpy(targets)}
    loss, _ = _loss_step(torch.device("cpu"), False, 0.1, multi_label=True)(net, batch)
    assert_close(loss, torch.tensor(math.log(2)))  # zero logits: ln 2 per class, smoothing unused
    ce, _ = _loss_step(torch.device("cpu"), False, 0.0, multi_label=False)(
        net, {**batch, "label": torch.tensor([0, 2])}
    )
    assert_close(ce, torch.tensor(math.log(3)))


def test_pretrain_command_on_scenes_reports_held_out_map(tmp_path, cli):
    pretrain = {"source": "scenes", "categories": 4, "instances": 3, "val_instances": 2, "image_size": 32}
    raw = tiny_params_dict(pretrain=pretrain | {"epochs": 2, "batch_size": 4, "device": "cpu", "threads": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    result = cli("pretrain", "--params", params, "--out", "w/enc.safetensors", "--results", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "w/enc.json").read_text())
    assert manifest["held_out_metric"] == "map_classwise" and len(manifest["held_out"]) == 2
    assert 0 <= manifest["held_out"][-1] <= 1
    assert "held-out map_classwise" in result.stdout
    assert "map_classwise" in json.loads((tmp_path / "r/metrics.json").read_text())["val"]


def test_held_out_metrics_by_hand():
    class Echo(torch.nn.Module):  # the "image" is the logits
        def forward(self, images):
            return images

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
    single = [{"image": logits, "label": torch.tensor([0, 1, 0])}]
    assert top1(Echo(), single, torch.device("cpu"), False) == pytest.approx(2 / 3)
    multi = [{"image": logits, "label": torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 1]])}]
    # class 0: positives score 2 and 1 over a negative 0 -> AP 1; class 1: AP 1; class 2: positive 2 above 1, 0 -> 1
    assert held_out_map(Echo(), multi, torch.device("cpu"), False) == pytest.approx(1.0)
    multi[0]["label"] = torch.tensor([[0.0, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 0: positive ranked 2nd -> AP 1/2
    assert held_out_map(Echo(), multi, torch.device("cpu"), False) == pytest.approx((0.5 + 1.0) / 2)
