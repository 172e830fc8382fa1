"""The DeiT classifier (``model.arch: deit``): shapes at any input size, attention maps, the loss, params, and a
tiny ``prepare -> train_cls -> cams`` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_params_dict, tiny_params_dict, write_params
from safetensors.torch import save_file
from torch.testing import assert_close
from typer.testing import CliRunner

from pipeline.config import ModelParams, ViTParams, parse_params
from pipeline.errors import ConfigError, ModelError
from pipeline.io import CamStore
from pipeline.losses import deit_loss
from pipeline.models.deit import DeiTClassifier, RecordingAttention
from pipeline.models.swtformer import build_model, load_classifier
from stages.cli import app

TINY_VIT = {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
IMG = 32
NUM_CLASSES = 3


def tiny_deit(seed: int = 0, **vit) -> DeiTClassifier:
    torch.manual_seed(seed)
    params = ModelParams(arch="deit", vit=ViTParams(**{**TINY_VIT, **vit}))
    return build_model(NUM_CLASSES, IMG, **params.model_dump()).eval()


# --- the model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "grid"), [((32, 32), (8, 8)), ((48, 40), (12, 10)), ((30, 37), (8, 10))])
def test_output_shapes_at_any_input_size(size, grid):
    # dynamic size: the positional embedding is interpolated; a size off the patch grid is padded, then cropped
    model = tiny_deit()
    out = model(torch.randn(2, 3, *size), attention=True)
    assert out["logits"].shape == out["patch_logits"].shape == (2, NUM_CLASSES)
    assert out["cam"].shape == (2, NUM_CLASSES, *grid)
    padded = math.ceil(size[0] / 4) * math.ceil(size[1] / 4)
    assert len(out["attention"]) == len(out["attention_logits"]) == 2, "one map per block"
    assert out["attention"][0].shape == (2, 2, 1 + padded, 1 + padded), "(B, heads, T, T), class token first"
    assert model.features(torch.randn(1, 3, *size)).logit_map.shape == (1, NUM_CLASSES, *grid)


def test_attention_rows_are_the_softmax_of_the_logits():
    out = tiny_deit()(torch.randn(2, 3, IMG, IMG), attention=True)
    for logits, probs in zip(out["attention_logits"], out["attention"], strict=True):
        assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1]))
        assert bool((probs >= 0).all())
        assert_close(probs, logits.softmax(dim=-1))


def test_recording_attention_gives_the_fused_result_and_is_off_afterwards():
    model = tiny_deit()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        fused = model(x)
        explicit = model(x, attention=True)
    assert "attention" not in fused
    for key in ("logits", "patch_logits", "cam"):
        assert_close(explicit[key], fused[key], atol=1e-5, rtol=1e-5)
    assert all(isinstance(a, RecordingAttention) and not a.record and a.recorded is None for a in model.attentions)


def test_attention_maps_carry_gradients():
    # WegFormer's relevance needs d(score)/d(attention): the recorded probabilities are in the graph
    model = tiny_deit()
    out = model(torch.randn(1, 3, IMG, IMG), attention=True)
    probs = out["attention"][-1]
    probs.retain_grad()
    out["logits"][0, 1].backward()
    assert probs.grad is not None and probs.grad[0, :, 0].abs().sum() > 0, "the class-token row gets a gradient"


def test_heads_classify_and_cam():
    model = tiny_deit()
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    assert_close(model.classify(x), out["logits"])
    feats = model.features(x)
    assert_close(out["patch_logits"], feats.logit_map.mean(dim=(2, 3)))
    cam = out["cam"]
    assert bool((cam >= 0).all()) and bool((cam <= 1).all())
    peaks = cam.amax(dim=(2, 3))
    has_positive = feats.logit_map.amax(dim=(2, 3)) > 0
    assert_close(peaks[has_positive], torch.ones(int(has_positive.sum())), atol=1e-4, rtol=0)
    assert [type(m) for m in model.new_modules()] == [torch.nn.Linear, torch.nn.Conv2d]


def test_deit_loss_hand_values():
    # zero logits: each soft-margin term is log 2; a confident right answer gives ~0
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    zero = {"logits": torch.zeros(1, 3), "patch_logits": torch.zeros(1, 3)}
    terms = deit_loss(zero, labels, cls_weight=0.5)
    assert_close(terms["cls"], torch.tensor(math.log(2)))
    assert_close(terms["total"], torch.tensor(math.log(2)))  # 0.5 * (log 2 + log 2)
    sure = {"logits": torch.tensor([[30.0, -30.0, 30.0]]), "patch_logits": torch.zeros(1, 3)}
    assert deit_loss(sure, labels)["cls"] < 1e-6


@pytest.mark.parametrize("final_norm", [True, False])
def test_every_parameter_trains_but_the_unused_final_norm(final_norm):
    # train_cls: DDP's find_unused_parameters = not final_norm for DeiT; this is that rule
    torch.manual_seed(0)
    params = ModelParams(arch="deit", vit=ViTParams(**TINY_VIT), final_norm=final_norm)
    model = build_model(NUM_CLASSES, IMG, **params.model_dump()).train()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    deit_loss(model(torch.randn(2, 3, IMG, IMG)), labels)["total"].backward()
    unused = {name for name, p in model.named_parameters() if p.grad is None}
    assert unused == (set() if final_norm else {"vit.norm.weight", "vit.norm.bias"})
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_timm_name_builds_and_runs_at_other_sizes():
    torch.manual_seed(0)
    params = ModelParams(arch="deit", vit=ViTParams(name="deit_tiny_patch16_224"), head_kernel=1)
    model = build_model(NUM_CLASSES, 224, **params.model_dump()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 64))
    assert model.patch_size == 16 and out["cam"].shape == (1, NUM_CLASSES, 3, 4)


def test_a_vit_without_class_token_is_a_one_line_model_error():
    params = ModelParams(arch="deit", vit=ViTParams(name="test_vit2"))  # a timm test ViT: register token, no class
    with pytest.raises(ModelError, match="has no class token") as info:
        build_model(NUM_CLASSES, 32, **params.model_dump())
    assert "\n" not in str(info.value)


def test_vit_pretrained_file_really_loads(tmp_path):
    source = tiny_deit(seed=1)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(path))
    loaded = tiny_deit(seed=2, pretrained=str(path))
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key


# --- params ---------------------------------------------------------------------------------------------------


def test_unknown_timm_vit_name_is_a_one_line_error():
    raw = default_params_dict(model={"arch": "deit", "vit": {"name": "deit_nonexistent_patch16_224"}})
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message
    assert "model.vit.name = \"deit_nonexistent_patch16_224\" is invalid: not 'small' nor a timm ViT/DeiT" in message


def test_unknown_timm_vit_name_stops_train_cls_with_one_error_line(tmp_path):
    raw = tiny_params_dict(model={"arch": "deit", "vit": {"name": "vit_nonexistent"}})
    params = write_params(tmp_path / "params.yaml", raw)
    result = _invoke("train_cls", "--params", params, "--data", tmp_path / "prepared", "--model-dir", tmp_path / "m")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.vit.name" in lines[0], result.stderr
    assert not (tmp_path / "m").exists()


def test_a_swin_name_is_not_a_vit_name():
    with pytest.raises(ConfigError, match="model.vit.name = .* nor a timm ViT/DeiT name"):
        parse_params(default_params_dict(model={"vit": {"name": "swin_tiny_patch4_window7_224"}}))


def test_small_vit_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        parse_params(default_params_dict(model={"vit": {"embed_dim": 10, "num_heads": 4}}))


# --- train_cls + cams -----------------------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams with ``model.arch: deit`` on the tiny params; returns the output root."""
    root = tmp_path_factory.mktemp("deit")
    params = write_params(root / "params.yaml", tiny_params_dict(model={"arch": "deit", "vit": TINY_VIT}))
    common = ["--data", root / "prepared", "--model-dir", root / "models"]
    stages = {
        "prepare": ["--out", root / "prepared"],
        "train_cls": [*common, "--results", root / "results/train_cls", "--checkpoint", root / "ckpt.pt"],
        "cams": [*common, "--results", root / "results/cams", "--out", root / "cams"],
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # keep dvclive away from the repository's own DVC workspace
        for stage, args in stages.items():
            result = _invoke(stage, "--params", params, *args)
            assert result.exit_code == 0, f"wsss {stage} failed:\n{result.output}\n{result.exception!r}"
    return root


def test_train_cls_trains_and_records_both_loss_terms(deit_run):
    meta = json.loads((deit_run / "models/meta.json").read_text())
    assert meta["model"]["arch"] == "deit" and meta["model"]["vit"]["embed_dim"] == 16
    model, _ = load_classifier(deit_run / "models", torch.device("cpu"))
    assert isinstance(model, DeiTClassifier)
    metrics = json.loads((deit_run / "results/train_cls/metrics.json").read_text())
    assert {"loss_cls", "loss_patch", "loss_total"} <= set(metrics["train"])
    assert metrics["train"]["loss_total"] == pytest.approx(
        metrics["train"]["loss_cls"] + metrics["train"]["loss_patch"]
    )


def test_cams_store_holds_cam_only(deit_run):
    store = CamStore(deit_run / "cams")
    train_ids = (deit_run / "prepared/splits/train.txt").read_text().split()
    assert store.ids == train_ids
    entry = store.load(train_ids[0])
    assert set(entry) == {"keys", "cam"}, "no R-CAM for DeiT"
    keys, cam = entry["keys"], entry["cam"]
    assert keys[0] == 0 and cam.shape == (len(keys), IMG, IMG)
    assert np.allclose(cam[0], 1 - cam[1:].max(axis=0), atol=1e-2), "background = 1 - max"
    metrics = json.loads((deit_run / "results/cams/metrics.json").read_text())
    assert "rcam" not in metrics and 0 <= metrics["cam"]["miou_best"] <= 1
    trained = json.loads((deit_run / "results/train_cls/metrics.json").read_text())["val"]
    assert metrics["val"]["map_classwise"] == pytest.approx(trained["map_classwise"], abs=1e-6)
