"""AReAM (``loss.aream``): pair labels, the affinity loss, re-activation, entropy weights, reliable labels, params,
and a tiny ``train_cls`` -> ``cams`` run that writes the ``aream`` map."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_params_dict, tiny_params_dict, write_params
from test_deit import IMG, NUM_CLASSES, TINY_VIT, tiny_deit
from test_swtformer import TINY_SWIN
from torch.testing import assert_close
from typer.testing import CliRunner

from pipeline.aream import (
    ABSENT,
    IGNORE,
    affinity_loss,
    aream_terms,
    entropy_weights,
    fused_affinity,
    layer_entropy,
    pair_labels,
    present_channels,
    reactivate,
    reactivate_steps,
    reliable_labels,
    window_walk,
)
from pipeline.aream_evidence import attention_evidence, foreground_share
from pipeline.config import parse_params
from pipeline.errors import ConfigError
from pipeline.io import CamStore
from pipeline.models.swtformer import build_model
from pipeline.refinement.par import PAR
from pipeline.refinement.seeds import choose_seed_map
from stages.cli import app

# --- pair labels --------------------------------------------------------------------------------------------------


def test_pair_labels_from_a_hand_made_label_map():
    # 4 x 4 pixels -> 2 x 2 tokens (nearest: the top-left pixel of each 2 x 2 block); tokens: 0, 1 / 1, 255
    seg = torch.tensor([[0, 7, 1, 0], [7, 7, 0, 0], [1, 9, 255, 1], [9, 9, 1, 1]])[None]
    pairs = pair_labels(seg, (2, 2))[0]
    expected = torch.tensor(
        [
            [1, 0, 0, IGNORE],  # token 0 (background): same as itself, differs from the two class-1 tokens
            [0, 1, 1, IGNORE],  # token 1 (class 1): positive with token 2 (class 1 too)
            [0, 1, 1, IGNORE],
            [IGNORE, IGNORE, IGNORE, IGNORE],  # token 3 is ignored: every pair with it is, itself included
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(pairs, expected)


# --- the loss -----------------------------------------------------------------------------------------------------


def test_affinity_loss_all_positive_and_all_negative_at_zero_logits():
    # sigmoid(0) = 1/2: four pairs of one kind give 1/2 * (4 * 1/2) / (4 + 1) = 0.2; the other term is empty
    zero = torch.zeros(1, 2, 2)
    assert_close(affinity_loss(zero, torch.ones(1, 2, 2, dtype=torch.uint8)), torch.tensor(0.2))
    assert_close(affinity_loss(zero, torch.zeros(1, 2, 2, dtype=torch.uint8)), torch.tensor(0.2))
    # confident and right: ~0; confident and wrong: ~1/2 * 4/5
    sure = torch.full((1, 2, 2), 30.0)
    assert affinity_loss(sure, torch.ones(1, 2, 2, dtype=torch.uint8)) < 1e-6
    assert_close(affinity_loss(sure, torch.zeros(1, 2, 2, dtype=torch.uint8)), torch.tensor(0.4))


def test_affinity_loss_mixed_pairs_and_ignored_pairs_count_for_nothing():
    # 2 positives at z = 0 (1 - sigmoid = 1/2 each), 2 negatives at z = ln 3 (sigmoid = 3/4 each):
    # 1/2 * 1 / 3 + 1/2 * 1.5 / 3 = 5/12
    logits = torch.tensor([[[0.0, 0.0, math.log(3), math.log(3)]]])
    pairs = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.uint8)
    assert_close(affinity_loss(logits, pairs), torch.tensor(5 / 12))
    # two more pairs, ignored, with any logit: the same loss, and no gradient reaches them
    logits = torch.tensor([[[0.0, 0.0, math.log(3), math.log(3), 5.0, -7.0]]], requires_grad=True)
    pairs = torch.tensor([[[1, 1, 0, 0, IGNORE, IGNORE]]], dtype=torch.uint8)
    loss = affinity_loss(logits, pairs)
    assert_close(loss, torch.tensor(5 / 12))
    loss.backward()
    assert torch.equal(logits.grad[0, 0, 4:], torch.zeros(2))
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 2], "positives pushed up, negatives down"


# --- re-activation and entropy weights ----------------------------------------------------------------------------


def test_reactivation_with_the_identity_affinity_is_the_identity():
    cam = torch.rand(2, 3, 4, 5)
    assert_close(reactivate(cam, torch.eye(20).expand(2, 20, 20)), cam)


def test_reactivation_with_a_uniform_affinity_is_the_mean():
    cam = torch.arange(4.0).view(1, 1, 2, 2)  # mean 1.5
    assert_close(reactivate(cam, torch.full((1, 4, 4), 0.25)), torch.full((1, 1, 2, 2), 1.5))


def _attention(patch: torch.Tensor) -> torch.Tensor:
    """(N, N) patch x patch affinity -> (1, 2 heads, 1 + N, 1 + N) attention, class token first, heads equal."""
    n = patch.shape[0]
    full = torch.zeros(1 + n, 1 + n)
    full[0, 0] = 1.0
    full[1:, 1:] = patch
    return full.expand(1, 2, 1 + n, 1 + n)


def test_fused_affinity_is_the_weighted_mean_of_the_head_mean_patch_blocks():
    a, b = torch.eye(4), torch.full((4, 4), 0.25)
    assert_close(fused_affinity([_attention(a), _attention(b)], prefix=1), ((a + b) / 2)[None])
    assert_close(fused_affinity([_attention(a), _attention(b)], 1, weights=[0.0, 1.0]), (b / 2)[None])


def test_entropy_weights_on_a_hand_case():
    # the CAM re-activated by the identity keeps one hot token: softmax([ln 3, 0, 0, 0]) = [1/2, 1/6, 1/6, 1/6],
    # entropy 1/2 + 1/2 log2 6 bits; a uniform affinity spreads it evenly: entropy log2 4 = 2 bits
    cam = torch.tensor([math.log(3), 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    blocks = [_attention(torch.eye(4)), _attention(torch.full((4, 4), 0.25))]
    entropy = layer_entropy(blocks, prefix=1, cam=cam)
    assert_close(entropy, torch.tensor([0.5 + 0.5 * math.log2(6), 2.0]))
    assert_close(entropy_weights(entropy), torch.tensor([0.0, 1.0]))
    assert_close(entropy_weights(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))
    assert_close(entropy_weights(torch.tensor([0.7, 0.7])), torch.ones(2)), "equal entropies: uniform"


# --- reliable labels ----------------------------------------------------------------------------------------------


def test_reliable_labels_three_bands_an_absent_class_and_padding():
    # three colour bands; class 2's CAM is 1 / 0.45 / 0 on them. Background scores 0.35 and 0.55:
    # 1 is foreground at both, 0.45 only at the low one (ignored), 0 at neither (background).
    s = 24
    image = torch.zeros(1, 3, s, s)
    image[:, 0, :, 8:16] = 1.0
    image[:, 1, :, 16:] = 1.0
    cam = torch.zeros(1, 3, s, s)
    cam[:, 1, :, :8], cam[:, 1, :, 8:16] = 1.0, 0.45
    cam[:, 0] = cam[:, 2] = 1.0  # classes 1 and 3 are absent from the image: never chosen
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    valid = torch.ones(1, 1, s, s)
    valid[..., -2:, :] = 0  # crop padding
    seg = reliable_labels(PAR(), image, cam, labels, valid, (0.35, 0.55), (s, s))[0]
    assert seg.shape == (s, s)
    assert bool((seg[:-2, 1:7] == 2).all()) and bool((seg[:-2, 9:15] == IGNORE).all())
    assert bool((seg[:-2, 17:] == 0).all()) and bool((seg[-2:] == IGNORE).all())
    assert set(seg.unique().tolist()) == {0, 2, IGNORE}
    # at half resolution (AFA's), from a CAM on a coarser grid: the same bands
    half = reliable_labels(PAR(), image, cam[..., ::2, ::2], labels, valid, (0.35, 0.55), (12, 12))[0]
    assert half[0, 1] == 2 and half[0, 5] == IGNORE and half[0, 10] == 0 and half[-1, 0] == IGNORE


def test_present_channels_pad_with_absent_and_name_the_classes():
    cam = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 1, 1)
    maps, classes = present_channels(cam, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    assert classes.tolist() == [[2, 3], [1, 0]]
    assert maps[:, :, 0, 0].tolist() == [[1.0, 2.0], [0.0, ABSENT]]


# --- the training term on the tiny DeiT -----------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["uniform", "entropy"])
def test_aream_terms_reach_the_deep_blocks_only(weights):
    model = tiny_deit().train()
    images = torch.randn(2, 3, IMG, IMG)
    out = model(images, attention=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cfg = {"split": 1, "bg_thresholds": (0.35, 0.55), "weights": weights, "par_scale": 0.5}
    terms = aream_terms(PAR(), out, images, labels, torch.ones(2, 1, IMG, IMG), cfg)
    assert terms["aff"].ndim == 0 and 0 <= terms["aff"].item() <= 0.5
    assert 0 <= terms["aff_ignored"].item() <= 1
    terms["aff"].backward()
    assert model.cam_head.weight.grad is None, "the labels are built without gradients"
    if weights == "uniform":  # with 2 blocks, entropy weights are 0 and 1: the deep one may get weight 0
        grad = model.vit.blocks[1].attn.qkv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, "the deep block's attention is supervised"


def test_reactivated_inference_matches_the_features_and_rows_are_stochastic():
    model = tiny_deit()
    x = torch.randn(1, 3, 30, 37)  # off the patch grid: attention and CAM share the padded 8 x 10 grid
    with torch.no_grad():
        feats, cam = model.reactivated(x)
        assert_close(feats.logit_map, model.features(x).logit_map, atol=1e-5, rtol=1e-5)
    assert cam.shape == (1, NUM_CLASSES, 8, 10) and bool((cam >= 0).all())


# --- SWTformer (S1: the window attention of one Swin stage) ------------------------------------------------------


def test_window_walk_adds_the_identity_and_keeps_rows_stochastic():
    affinity = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])  # (1, 2, 2): a token outside every window has a zero row
    walk = window_walk(affinity)
    assert_close(walk, torch.tensor([[[1.0, 0.0], [0.25, 0.75]]]))
    cam = torch.rand(1, 3, 1, 2)
    assert_close(reactivate_steps(cam, window_walk(torch.zeros(1, 2, 2)), 3), cam), "no attention: the identity"


def tiny_swin_aream():
    """A V2 SWTformer at 32 px whose stage 3 (a 4 x 4 grid in 2 x 2 windows) has a regular and a shifted block."""
    torch.manual_seed(0)
    swin = TINY_SWIN.model_copy(update={"depths": (1, 1, 2, 1)}).model_dump()
    return build_model(NUM_CLASSES, 32, swin=swin, hff_dims=(4, 4, 8, 8))


def test_swin_aream_terms_supervise_the_deep_window_pairs():
    model = tiny_swin_aream().train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.cat([torch.ones(2, 1, 1, 1), labels[:, :, None, None]], dim=1)
    out = model(images, mask, attention=True, stage=3)
    assert out["attention_grid"] == (4, 4) and [a.shape for a in out["attention"]] == [(2, 1, 16, 16)] * 2
    assert [z.shape for z in out["attention_logits"]] == [(2, 4, 4, 4)] * 2, "(B, windows, M^2, M^2)"
    assert out["cam"].shape[-2:] == (2, 2), "the CAM is on the last stage's grid, re-activated on stage 3's"
    cfg = {"split": None, "bg_thresholds": (0.35, 0.55), "weights": "uniform", "par_scale": 0.5, "steps": 2}
    terms = aream_terms(PAR(), out, images, labels, torch.ones(2, 1, 32, 32), cfg)
    assert 0 <= terms["aff"].item() <= 0.5
    terms["aff"].backward()
    assert model.cam_head.weight.grad is None, "the labels are built without gradients"
    deep = model.stage_blocks(3)[1].attn.qkv.weight.grad
    assert deep is not None and deep.abs().sum() > 0, "the deep (shifted) block's attention is supervised"


def test_swin_reactivated_inference_at_another_size():
    model = tiny_swin_aream().eval()
    x = torch.randn(1, 3, 40, 48)  # padded to 48 x 48 (the backbone's stride 16): stage 3 is 6 x 6, as the CAM
    with torch.no_grad():
        feats, cam = model.reactivated(x, stage=3, steps=2)
        assert_close(feats.logit_map, model.features(x).logit_map, atol=1e-5, rtol=1e-5)
    assert feats.logit_map.shape[-2:] == (3, 3) and cam.shape == (1, NUM_CLASSES, 6, 6) and bool((cam >= 0).all())


# --- params and the seed map --------------------------------------------------------------------------------------


def test_aream_needs_a_deep_block_one_line_errors():
    with pytest.raises(ConfigError, match="loss.aream.split = 4 must be below model.vit.depth = 4") as info:
        parse_params(default_params_dict(loss={"aream": {"enabled": True, "split": 4}}, model={"arch": "deit"}))
    assert "\n" not in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(ConfigError, match="split = 1 must be below the 1 blocks of Swin stage loss.aream.stage = 1"):
        parse_params(default_params_dict(loss={"aream": {"enabled": True, "stage": 1}}))
    with pytest.raises(ConfigError, match="bg_thresholds must be"):
        parse_params(default_params_dict(loss={"aream": {"bg_thresholds": [0.6, 0.5]}}))
    deit = parse_params(default_params_dict(loss={"aream": {"enabled": True}}, model={"arch": "deit"}))
    assert deit.loss.aream.split is None and deit.loss.aream.split_of(4) == 2, "half the ViT's 4 blocks"
    swin = parse_params(default_params_dict(loss={"aream": {"enabled": True}}))
    assert swin.loss.aream.split_of(swin.model.swin.depths[2]) == 1, "stage 3's 2 blocks: 1 shallow, 1 deep"


def test_auto_seed_map_prefers_rcam_then_aream_then_cam():
    assert choose_seed_map(["cam", "aream"], "auto") == "aream"
    assert choose_seed_map(["cam", "rcam"], "auto") == "rcam"
    assert choose_seed_map(["cam"], "auto") == "cam"
    assert choose_seed_map(["cam", "aream"], "cam") == "cam"
    with pytest.raises(ValueError, match="'aream' is not in the CAM store"):
        choose_seed_map(["cam"], "aream")


# --- train_cls + cams -----------------------------------------------------------------------------------------


def _run_stages(root: Path, raw: dict) -> Path:
    """prepare -> train_cls -> cams with the params ``raw`` under ``root``; returns ``root``."""
    params = write_params(root / "params.yaml", raw)
    common = ["--data", root / "prepared", "--model-dir", root / "models"]
    stages = {
        "prepare": ["--out", root / "prepared"],
        "train_cls": [*common, "--results", root / "results/train_cls", "--checkpoint", root / "ckpt.pt"],
        "cams": [*common, "--results", root / "results/cams", "--out", root / "cams"],
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage, args in stages.items():
            result = CliRunner().invoke(app, [str(a) for a in [stage, "--params", params, *args]])
            assert result.exit_code == 0, f"wsss {stage} failed:\n{result.output}\n{result.exception!r}"
    return root


@pytest.fixture(scope="module")
def aream_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams, DeiT with AReAM from the second epoch; returns the output root."""
    raw = tiny_params_dict(
        model={"arch": "deit", "vit": TINY_VIT},
        loss={"aream": {"enabled": True, "warmup_epochs": 1, "split": 1, "weights": "entropy"}},
    )
    return _run_stages(tmp_path_factory.mktemp("aream"), raw)


def test_train_cls_adds_the_affinity_loss_after_the_warmup(aream_run):
    meta = json.loads((aream_run / "models/meta.json").read_text())
    assert meta["aream"] == {"stage": 3, "steps": 2}, "the Swin settings, unused by the DeiT"
    lines = (aream_run / "results/train_cls/plots/metrics/train/loss_aff.tsv").read_text().split()
    assert lines[0] == "step" and len(lines) == 2 + 2, "logged in the second epoch only (header + one row)"
    metrics = json.loads((aream_run / "results/train_cls/metrics.json").read_text())["train"]
    expected = metrics["loss_cls"] + metrics["loss_patch"] + 0.1 * metrics["loss_aff"]
    assert metrics["loss_total"] == pytest.approx(expected)


def test_cams_writes_and_scores_the_aream_map(aream_run):
    store = CamStore(aream_run / "cams")
    entry = store.load(store.ids[0])
    assert set(entry) == {"keys", "cam", "aream"}
    aream = entry["aream"]
    assert aream.shape == entry["cam"].shape and aream.shape[1:] == (IMG, IMG)
    assert np.allclose(aream[0], 1 - aream[1:].max(axis=0), atol=1e-2), "background = 1 - max"
    assert not np.allclose(aream, entry["cam"]), "re-activation changes the map"
    metrics = json.loads((aream_run / "results/cams/metrics.json").read_text())
    assert 0 <= metrics["aream"]["miou_best"] <= 1 and 0 <= metrics["cam"]["miou_best"] <= 1
    assert choose_seed_map(list(entry), "auto") == "aream"


def test_swin_aream_from_train_cls_to_the_aream_map(tmp_path):
    raw = tiny_params_dict(
        model={"version": "v1", "swin": {"depths": [1, 1, 2, 1]}},
        loss={"aream": {"enabled": True, "warmup_epochs": 1, "steps": 3}},
    )
    root = _run_stages(tmp_path, raw)
    assert json.loads((root / "models/meta.json").read_text())["aream"] == {"stage": 3, "steps": 3}
    train = json.loads((root / "results/train_cls/metrics.json").read_text())["train"]
    assert train["loss_aff"] > 0, "the affinity loss of the second epoch"
    store = CamStore(root / "cams")
    entry = store.load(store.ids[0])
    assert set(entry) == {"keys", "cam", "aream"} and entry["aream"].shape == entry["cam"].shape
    assert choose_seed_map(list(entry), "auto") == "aream", "V1 has no R-CAM"


@pytest.mark.parametrize("arch", ["deit", "swtformer"])
def test_attention_evidence_per_block(arch):
    model = (tiny_deit() if arch == "deit" else tiny_swin_aream()).eval()
    size = IMG if arch == "deit" else 32
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    evidence = attention_evidence(model, torch.randn(1, 3, size, size), labels, stage=3, steps=2)
    cam, blocks = evidence["cam"], evidence["reactivated"]
    assert len(blocks) == 2 and evidence["entropy"].shape == (2,)
    assert all(b.shape == cam.shape == evidence["fused"].shape for b in blocks)
    assert (cam[:, 1] == 0).all() and (blocks[0][:, 1] == 0).all(), "absent classes stay zero"
    n = cam.shape[-2] * cam.shape[-1]
    assert ((evidence["entropy"] >= 0) & (evidence["entropy"] <= math.log2(n) + 1e-4)).all()


def test_foreground_share_hand_cases():
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 2  # class 2 on the top-left quarter
    labels = torch.tensor([[0.0, 1.0]])
    on_class = torch.zeros(1, 2, 2, 2)
    on_class[0, 1, 0, 0] = 1.0  # all of class 2's map on its own cell
    assert foreground_share(on_class, masks, labels) == 1.0
    assert foreground_share(torch.ones(1, 2, 2, 2), masks, labels) == 0.25, "uniform: the class's area share"
    off = torch.zeros(1, 2, 2, 2)
    off[0, 1, 1, 1] = 3.0
    assert foreground_share(off, masks, labels) == 0.0
    assert math.isnan(foreground_share(off, masks, torch.zeros(1, 2)))


def test_the_evidence_gallery_draws_a_trained_run(aream_run, tmp_path):
    out = tmp_path / "evidence.png"
    script = Path(__file__).resolve().parents[1] / "docs/render_aream_evidence.py"
    args = ["--model-dir", aream_run / "models", "--data", aream_run / "prepared", "--images", "2", "--out", out]
    result = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["images"]) == 2 and len(report["entropy_bits"]) == TINY_VIT["depth"]
    assert set(report["fg_share"]) == {"CAM", "all blocks"} | {f"block {k}" for k in range(TINY_VIT["depth"])}
    assert all(0 <= share <= 1 for share in report["fg_share"].values())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
