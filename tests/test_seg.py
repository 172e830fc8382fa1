"""DeepLab building blocks: the loss, the smp model wrapper, encoder weights, augmentation, pseudo-label checks."""

from __future__ import annotations

import math
import re
import socket
import time
import warnings

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import default_params_dict
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from pipeline.config import parse_params
from pipeline.data.datasets import same_size_batches
from pipeline.data.layout import IGNORE
from pipeline.data.seg_datasets import load_pseudo_label, random_scale_flip_crop
from pipeline.errors import ConfigError, DatasetError, SegModelError
from pipeline.io import save_label_png
from pipeline.models import deeplab as seg
from pipeline.models.deeplab import build_segmenter, predict_probs, segmentation_loss
from pipeline.models.pretrained import reachable

TINY = "tu-test_efficientnet"  # a ~90k-parameter timm test model: builds and runs in milliseconds


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny(arch: str = "deeplabv3plus", classes: int = 3, weights: str = "none") -> seg.Segmenter:
    torch.manual_seed(0)
    return build_segmenter(arch, TINY, classes, weights, output_stride=16, decoder_channels=8).eval()


# --- loss ---------------------------------------------------------------------------------------------------


def test_loss_ignores_255_and_averages_over_labelled_pixels():
    # pixel 0: logits (0, 0), target 0 -> ln 2; pixel 1: logits (ln 3, 0), target 0 -> ln(4/3); pixel 2 ignored
    logits = torch.tensor([[0.0, math.log(3.0), 50.0], [0.0, 0.0, -50.0]]).view(1, 2, 1, 3)
    target = torch.tensor([[[0, 0, IGNORE]]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_all_ignore_crop_gives_zero_loss_and_finite_zero_gradients():
    model = tiny().train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.full((2, 32, 32), IGNORE, dtype=torch.int64)
    loss = segmentation_loss(model(x), target)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


# --- model --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("size", [(37, 45), (16, 16), (33, 17)])
def test_model_returns_class_logits_at_input_size(arch, size):
    model = tiny(arch, classes=5)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_smp_encoder_names_build_too():
    model = build_segmenter("deeplabv3", "resnet18", 4, decoder_channels=8)
    assert isinstance(model.net, smp.DeepLabV3) and model.stride == 16


def test_unknown_encoder_is_a_one_line_error():
    with pytest.raises(SegModelError, match=r"unknown encoder 'resnet_nope'") as info:
        build_segmenter("deeplabv3plus", "resnet_nope", 3)
    assert "\n" not in str(info.value)
    with pytest.raises(SegModelError, match="names no timm model"):
        build_segmenter("deeplabv3plus", "tu-not_a_model", 3)


def test_predict_probs_averages_scales_and_flips_into_probabilities():
    model = tiny()
    x = torch.randn(1, 3, 24, 40)
    probs = predict_probs(model, x, (1.0, 0.5, 1.5), True)
    assert probs.shape == (1, 3, 24, 40)
    assert torch.allclose(probs.sum(1), torch.ones(1, 24, 40), atol=1e-5)
    # flip-averaging makes the prediction of a mirrored image the mirror of the prediction
    mirrored = predict_probs(model, x.flip(-1), (1.0,), True)
    assert torch.allclose(mirrored, predict_probs(model, x, (1.0,), True).flip(-1), atol=1e-5)


# --- encoder weights ----------------------------------------------------------------------------------------


def test_local_encoder_weights_file_is_loaded(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    reference = tiny()
    torch.manual_seed(123)
    donor = timm.create_model("test_efficientnet")  # a plain timm checkpoint: encoder keys + a classifier head
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    loaded = tiny(weights=str(path))
    assert torch.equal(loaded.net.encoder.model.conv_stem.weight, donor.conv_stem.weight)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), reference(x))


def test_whole_smp_model_file_with_encoder_prefix_is_accepted(tmp_path):
    donor = tiny()
    torch.nn.init.constant_(donor.net.encoder.model.conv_stem.weight, 0.5)
    path = tmp_path / "deeplab.pth"
    torch.save(donor.net.state_dict(), path)
    loaded = tiny(weights=str(path))
    assert (loaded.net.encoder.model.conv_stem.weight == 0.5).all()


def test_encoder_weights_of_another_encoder_give_a_one_line_error(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    with pytest.raises(SegModelError) as info:
        tiny(weights=str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message and message.startswith("train_seg.encoder_weights:")


def test_wrong_shapes_and_unreadable_files_give_one_line_errors(tmp_path):
    state = {k: v.clone() for k, v in timm.create_model("test_efficientnet").state_dict().items()}
    state["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    shapes = tmp_path / "shapes.pth"
    torch.save(state, shapes)
    with pytest.raises(SegModelError, match="wrong shape.*conv_stem.weight"):
        tiny(weights=str(shapes))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(SegModelError, match=f"cannot read {garbage}"):
        tiny(weights=str(garbage))
    with pytest.raises(SegModelError, match="not found"):
        tiny(weights=str(tmp_path / "missing.pth"))


def test_offline_weight_tag_fails_fast_with_advice(monkeypatch):
    def no_download(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(seg, "reachable", lambda url: True)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_download)
    with pytest.raises(SegModelError) as info:
        build_segmenter("deeplabv3plus", "resnet18", 3, "imagenet")
    message = str(info.value)
    assert "cannot download 'imagenet' weights for encoder 'resnet18'" in message
    assert "train_seg.encoder_weights=/path/to/resnet18.safetensors" in message and "\n" not in message


def test_unreachable_hub_uses_the_cache_only_and_fails_within_seconds(monkeypatch, tmp_path):
    monkeypatch.setattr(seg, "reachable", lambda url: False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    offline_before = hub_constants.HF_HUB_OFFLINE
    started = time.monotonic()
    with pytest.raises(SegModelError, match=r"\(no network\); pass a local file instead"):
        build_segmenter("deeplabv3plus", "resnet18", 3, "imagenet")
    assert time.monotonic() - started < 10
    assert hub_constants.HF_HUB_OFFLINE == offline_before, "the hub's offline switch is restored"


def test_unknown_weight_tag_lists_the_available_ones(monkeypatch):
    monkeypatch.setattr(seg, "reachable", lambda url: False)
    with pytest.raises(SegModelError, match="Wrong pretrained weights `nope`.*imagenet"):
        build_segmenter("deeplabv3plus", "resnet18", 3, "nope")


# --- data ---------------------------------------------------------------------------------------------------


def test_crop_pads_labels_with_ignore_and_keeps_pairs_aligned():
    rng = np.random.default_rng(0)
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = np.arange(12)[None, :] * 20  # red encodes the column
    label = np.tile(np.arange(12, dtype=np.uint8), (10, 1))
    out_image, out_label = random_scale_flip_crop(image, label, 16, (1.0, 1.0), True, rng)
    assert out_image.shape == (16, 16, 3) and out_label.shape == (16, 16)
    labelled = out_label != IGNORE
    assert labelled.sum() == 10 * 12, "scale 1: every source pixel lands in the crop, the rest is padding"
    assert (out_image[labelled][:, 0] == out_label[labelled] * 20).all()
    assert (out_image[~labelled] == 0).all()


def test_crop_of_a_larger_image_has_no_padding():
    rng = np.random.default_rng(1)
    image = np.full((40, 40, 3), 7, np.uint8)
    label = np.ones((40, 40), np.uint8)
    _, out_label = random_scale_flip_crop(image, label, 16, (0.8, 1.2), False, rng)
    assert (out_label == 1).all()


def test_pseudo_label_checks(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    good = np.array([[0, 1], [2, IGNORE]], np.uint8)
    save_label_png(tmp_path / "good.png", good, palette)
    assert (load_pseudo_label(tmp_path / "good.png", 3, (2, 2)) == good).all()
    with pytest.raises(DatasetError, match="holds class id 5"):
        save_label_png(tmp_path / "bad.png", np.array([[0, 5]], np.uint8), palette)
        load_pseudo_label(tmp_path / "bad.png", 3, (1, 2))
    with pytest.raises(DatasetError, match="is 2x2, its image 3x2"):
        load_pseudo_label(tmp_path / "good.png", 3, (2, 3))
    with pytest.raises(DatasetError, match="run the 'refine' stage"):
        load_pseudo_label(tmp_path / "missing.png", 3, (2, 2))


def test_same_size_batches_split_on_size_and_count():
    shapes = {"a": (4, 4), "b": (4, 4), "c": (4, 4), "d": (5, 4), "e": (4, 4)}
    groups = list(same_size_batches(list(shapes), lambda i: np.zeros((*shapes[i], 3), np.uint8), 2))
    assert [ids for ids, _ in groups] == [["a", "b"], ["c"], ["d"], ["e"]]


# --- params -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("train_seg", {"arch": "unet"}, "train_seg.arch"),
        ("train_seg", {"output_stride": 32}, "train_seg.output_stride"),
        ("train_seg", {"batch_size": 1}, "train_seg.batch_size"),
        ("train_seg", {"scale_range": [2.0, 0.5]}, "scale_range must be"),
        ("train_seg", {"epochs": 2, "warmup_epochs": 2}, "warmup_epochs must be smaller"),
        ("evaluate", {"scales": [1.0, 0.0]}, "evaluate.scales.1"),
        ("evaluate", {"scalez": [1.0]}, "unknown key 'evaluate.scalez'"),
    ],
)
def test_seg_params_are_validated(section, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(default_params_dict(**{section: value}))


def test_hub_probe_follows_the_endpoint(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert reachable(hub_constants.ENDPOINT)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # closed now
    assert not reachable(hub_constants.ENDPOINT)
