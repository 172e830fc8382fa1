"""Relevance maps of the DeiT classifier (``cams.relevance``, WegFormer): the LRP rules conserve relevance, the
gradient-only map is the hand formula, the last block is the one-block rollout, and the multi-scale maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_params_dict, write_params
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import ModelParams, RelevanceParams, ViTParams
from pipeline.data.layout import PreparedDataset
from pipeline.io import CamStore
from pipeline.models.swtformer import build_model
from pipeline.refinement.wegformer import oracle_saliency
from pipeline.relevance import (
    add_relprop,
    linear_relprop,
    lrp_attention_relevance,
    matmul_relprop,
    multiscale_relevance,
    relevance_for_labels,
    relevance_rows,
    rollout,
    trace_forward,
)
from stages.cli import app

TINY_VIT = {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
IMG = 16
NUM_CLASSES = 3


def tiny_deit(seed: int = 0, **vit):
    torch.manual_seed(seed)
    params = ModelParams(arch="deit", vit=ViTParams(**{**TINY_VIT, **vit}))
    return build_model(NUM_CLASSES, IMG, **params.model_dump()).double().eval()


def total(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=tuple(range(1, x.dim())))


# --- the rules, each on its own ---------------------------------------------------------------------------------


def test_linear_rule_hand_case_and_conservation():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[3.0, 1.0]], dtype=torch.float64)  # positive contributions: x1 w1 = 3 (x2 w2 = -2 drops)
    assert torch.allclose(
        linear_relprop(x, w, torch.tensor([[6.0]], dtype=torch.float64)), torch.tensor([[6.0, 0.0]]).double()
    )
    torch.manual_seed(0)
    x, w, r = torch.randn(4, 7, 5).double(), torch.randn(3, 5).double(), torch.rand(4, 7, 3).double()
    x[..., 0], w[:, 0] = x[..., 0].abs() + 0.1, w[:, 0].abs() + 0.1  # every output has a positive contribution
    assert torch.allclose(total(linear_relprop(x, w, r)), total(r), rtol=1e-6)
    x[..., 0] = -1.0  # now some outputs have none: their relevance is dropped (the rule's only leak)
    dropped = (x.clamp(min=0) @ w.clamp(min=0).T + x.clamp(max=0) @ w.clamp(max=0).T) == 0  # (4, 7, 3)
    assert dropped.any()
    assert torch.allclose(total(linear_relprop(x, w, r)), total(r * ~dropped), rtol=1e-6)


def test_add_rule_splits_in_proportion_and_conserves():
    a, b = torch.tensor([[3.0, 0.0]]).double(), torch.tensor([[1.0, 2.0]]).double()
    r = torch.tensor([[4.0, 2.0]]).double()
    r_a, r_b = add_relprop(a, b, r)  # raw split: a gets 3, b gets 1 + 2 = 3; already conserving
    assert torch.allclose(r_a, torch.tensor([[3.0, 0.0]]).double()) and torch.allclose(
        r_b, torch.tensor([[1.0, 2.0]]).double()
    )
    torch.manual_seed(1)
    a, b, r = torch.randn(3, 6, 4).double(), torch.randn(3, 6, 4).double(), torch.rand(3, 6, 4).double()
    r_a, r_b = add_relprop(a, b, r)
    assert torch.allclose(total(r_a) + total(r_b), total(r), rtol=1e-6)


def test_matmul_rule_halves_and_conserves():
    torch.manual_seed(2)
    a, b = torch.rand(2, 3, 5, 4).double(), torch.rand(2, 3, 4, 6).double()
    r = torch.rand(2, 3, 5, 6).double()
    r_a, r_b = matmul_relprop(a, b, r)
    assert torch.allclose(total(r_a), total(r) / 2) and torch.allclose(total(r_b), total(r) / 2)


def test_lrp_through_the_tiny_vit_conserves_relevance_at_every_attention():
    """R = one-hot at the head (total 1) reaches every block's attention probabilities as half of the relevance
    entering that block's attention branch; what reaches the block inputs stays 1 (within tolerance)."""
    model = tiny_deit()
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    _, cls, traces = trace_forward(model, x)
    r_cls = linear_relprop(cls, model.cls_head.weight, torch.eye(NUM_CLASSES, dtype=torch.float64)[[0, 2]])
    assert torch.allclose(total(r_cls), torch.ones(2, dtype=torch.float64), atol=1e-6)
    per_block = lrp_attention_relevance(model, cls, traces, torch.tensor([0, 2]), depth=2)
    assert [r.shape for r in per_block] == [traces[0].probs.shape] * 2
    for r in per_block:
        share = total(r)
        assert torch.all(share > 0) and torch.all(share <= 0.5 + 1e-6)  # at most half: the other half is v's


def test_trace_forward_is_the_models_forward():
    model = tiny_deit()
    x = torch.randn(2, 3, 18, 13, dtype=torch.float64)  # not a multiple of the patch: padded like the model
    logits, _, _ = trace_forward(model, x)
    assert torch.allclose(logits, model.classify(x), atol=1e-10)


# --- maps ----------------------------------------------------------------------------------------------------


def test_gradient_map_is_the_hand_formula_on_a_one_block_vit():
    """One block: map = mean_h((dA * A)^+)[cls, patches], with A and dA from the model's own recorded attention."""
    model = tiny_deit(depth=1)
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    out = model(x, attention=True)
    probs = out["attention"][0]  # (1, h, T, T)
    (grad,) = torch.autograd.grad(out["logits"][0, 1], probs)
    hand = (grad * probs).clamp(min=0).mean(dim=1)[0, 0, 1:].reshape(IMG // 4, IMG // 4)
    for blocks in ("last", "all"):
        got = relevance_rows(model, x, torch.tensor([1]), "gradient", blocks)[0]
        assert torch.allclose(got, hand.detach(), atol=1e-12), blocks


@pytest.mark.parametrize("kind", ["full", "gradient"])
def test_last_block_map_is_the_rollout_of_one_block(kind):
    model = tiny_deit(depth=1)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    classes = torch.tensor([2, 0])
    assert torch.allclose(
        relevance_rows(model, x, classes, kind, "last"), relevance_rows(model, x, classes, kind, "all"), atol=1e-12
    )


def test_rollout_hand_case():
    m1 = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    m2 = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    # (I + m2)(I + m1) = [[1, 1], [2, 3]]
    assert torch.equal(rollout([m1, m2]), torch.tensor([[[1.0, 1.0], [2.0, 3.0]]]))


def test_rows_are_independent_whatever_the_class_batch():
    """Batching (image, class) rows gives each row its own class's map."""
    model = tiny_deit()
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    labels = [[1, 3], [2]]
    together = relevance_for_labels(model, x, labels, "full", "all", class_batch=8)
    alone = relevance_for_labels(model, x, labels, "full", "all", class_batch=1)
    assert torch.allclose(together, alone, atol=1e-10)
    assert together[0, 1].abs().sum() == 0 and together[1, 0].abs().sum() == 0  # absent classes stay 0
    assert together[0, 0].sum() > 0 and together[1, 1].sum() > 0


def test_multiscale_maps_shape_range_and_flip():
    model = tiny_deit()
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    params = RelevanceParams(kind="gradient", blocks="all")
    maps = multiscale_relevance(model, x, [[2]], (1.0, 0.5), True, params)
    assert maps.shape == (1, NUM_CLASSES, IMG, IMG)
    assert abs(float(maps[0, 1].max()) - 1.0) < 1e-3 and maps.min() >= 0
    assert maps[0, 0].abs().sum() == 0
    mirrored = multiscale_relevance(model, x.flip(-1), [[2]], (1.0, 0.5), True, params)
    assert torch.allclose(mirrored.flip(-1), maps, atol=1e-9)  # the flip pair makes the map flip-symmetric


# --- the stages ----------------------------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def relevance_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams (relevance: full, all blocks) with the tiny DeiT; returns the output root."""
    root = tmp_path_factory.mktemp("relevance")
    raw = tiny_params_dict(
        model={"arch": "deit", "vit": {**TINY_VIT, "patch_size": 8}},
        cams={"relevance": {"kind": "full", "blocks": "all", "class_batch": 3}},
    )
    params = write_params(root / "params.yaml", raw)
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


def test_cams_stores_and_scores_the_relevance_map(relevance_run):
    store = CamStore(relevance_run / "cams")
    entry = store.load(store.ids[0])
    assert set(entry) == {"keys", "cam", "relevance"}
    relevance = entry["relevance"]
    assert relevance.shape == entry["cam"].shape and relevance.min() >= 0 and relevance.max() <= 1 + 1e-6
    assert np.allclose(relevance[0], 1 - relevance[1:].max(axis=0), atol=1e-2), "background = 1 - max"
    metrics = json.loads((relevance_run / "results/cams/metrics.json").read_text())
    assert 0 <= metrics["relevance"]["miou_best"] <= 1


def test_refine_reads_relevance_with_soft_erase_epom_and_oracle_saliency(relevance_run, monkeypatch):
    monkeypatch.chdir(relevance_run)
    folder = relevance_run / "saliency"  # a saliency folder, here the ground-truth foreground as PNGs
    folder.mkdir()
    data = PreparedDataset.open(relevance_run / "prepared")
    for image_id in data.split("train"):
        Image.fromarray((oracle_saliency(data, image_id) * 255).astype(np.uint8)).save(folder / f"{image_id}.png")
    weg = {"soft_erase": 0.55, "epom": True}
    variants = {"plain": weg, "oracle": {**weg, "saliency": "oracle"}, "folder": {**weg, "saliency": str(folder)}}
    pseudo = {}
    for name, wegformer in variants.items():
        refine = {"method": "none", "seed_map": "relevance", "workers": 1, "wegformer": wegformer}
        refine["bg_threshold"] = None if "saliency" in wegformer else 0.5
        params = write_params(relevance_run / f"{name}.yaml", tiny_params_dict(refine=refine))
        args = ["--data", "prepared", "--cams", "cams", "--out", f"pl_{name}", "--results", f"results/refine_{name}"]
        result = _invoke("refine", "--params", params, *args)
        assert result.exit_code == 0, result.output
        metrics = json.loads((relevance_run / f"results/refine_{name}/metrics.json").read_text())
        assert 0 <= metrics["pseudo"]["miou"] <= 1
        pseudo[name] = metrics["pseudo"]["miou"]
    assert pseudo["oracle"] == pseudo["folder"], "saliency: oracle is the ground truth's foreground"
    (folder / f"{CamStore(relevance_run / 'cams').ids[0]}.png").unlink()
    result = _invoke("refine", "--params", params, *args)
    assert result.exit_code == 2 and "saliency map missing" in result.output.strip().splitlines()[-1]
