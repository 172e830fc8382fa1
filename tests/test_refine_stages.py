"""``wsss train_aff`` and ``wsss refine`` by hand on a tiny prepared dataset + CAM store; train_aff resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_params_dict, write_params
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import checkpoint, train_aff
from pipeline.config import StageParams, load_params
from pipeline.io import load_label_png
from stages.cli import app
from stages.train_aff import SECTIONS as TRAIN_AFF_SECTIONS

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def aff_args(root: Path, params: Path) -> list:
    return [
        "--params", params, "--data", root / "prepared", "--cams", root / "cams", "--model-dir", root / "aff",
        "--results", root / "results/train_aff", "--checkpoint", root / "aff.pt",
    ]  # fmt: skip


def refine_args(root: Path, params: Path, out: str = "pseudo") -> list:
    return [
        "--params", params, "--data", root / "prepared", "--cams", root / "cams", "--aff-dir", root / "aff",
        "--out", root / out, "--results", root / f"results/{out}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams -> train_aff -> refine on tiny params; returns the output root."""
    root = tmp_path_factory.mktemp("refine")
    params = write_params(root / "params.yaml", tiny_params_dict())
    upstream = {
        "prepare": ["--out", root / "prepared"],
        "train_cls": ["--data", root / "prepared", "--model-dir", root / "cls", "--results", root / "results/cls",
                      "--checkpoint", root / "cls.pt"],
        "cams": ["--data", root / "prepared", "--model-dir", root / "cls", "--out", root / "cams",
                 "--results", root / "results/cams"],
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # keep dvclive away from the repository's DVC workspace
        for stage, args in upstream.items():
            result = invoke(stage, "--params", params, *args)
            assert result.exit_code == 0, f"wsss {stage} failed:\n{result.output}\n{result.exception!r}"
        for stage, args in (("train_aff", aff_args(root, params)), ("refine", refine_args(root, params))):
            result = invoke(stage, *args)
            assert result.exit_code == 0, f"wsss {stage} failed:\n{result.output}\n{result.exception!r}"
    return root


def test_train_aff_artifacts(tiny_run):
    meta = json.loads((tiny_run / "aff/meta.json").read_text())
    assert meta["radius"] == 3 and meta["stride"] == 4 and meta["seed_map"] == "cam"
    assert meta["model"]["out_indices"] == [1, 2]
    assert load_file(tiny_run / "aff/model.safetensors")
    metrics = json.loads((tiny_run / "results/train_aff/metrics.json").read_text())
    assert 0 < metrics["labels"]["coverage"] <= 1 and 0 <= metrics["labels"]["precision"] <= 1
    assert np.isfinite(metrics["train"]["loss_total"])
    rows = (tiny_run / "results/train_aff/plots/metrics/train/loss_total.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2, "one header + one row per epoch"
    assert not (tiny_run / "aff.pt").exists(), "the checkpoint is deleted once training completes"
    assert not (tiny_run / "aff_labels").exists(), "so are the affinity labels beside it"


def test_refine_writes_one_label_per_image_with_the_image_classes(tiny_run):
    ids = json.loads((tiny_run / "cams/index.json").read_text())["images"]
    labels = json.loads((tiny_run / "prepared/cls_labels.json").read_text())
    pngs = sorted((tiny_run / "pseudo").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(ids)
    for png in pngs:
        label = load_label_png(png)
        assert label.shape == (32, 32)
        assert set(np.unique(label)) <= {0, *labels[png.stem]}, png.name


def test_refine_metrics_and_gallery(tiny_run):
    metrics = json.loads((tiny_run / "results/pseudo/metrics.json").read_text())
    assert 0 <= metrics["pseudo"]["miou"] <= 1 and 0 <= metrics["seed"]["miou"] <= 1
    assert metrics["gain_miou"] == pytest.approx(metrics["pseudo"]["miou"] - metrics["seed"]["miou"], abs=2e-5)
    assert metrics["pseudo"]["ignored_fraction"] == 0, "psa_crf labels every pixel"
    assert metrics["images_scored"] == 16
    assert "background" in metrics["pseudo"]["iou"] and "background" in metrics["seed"]["iou"]
    gallery = sorted(p.name for p in (tiny_run / "results/pseudo/plots/images").rglob("*.png"))
    assert gallery == ["failures.png", "gallery.png"]
    picture = Image.open(tiny_run / "results/pseudo/plots/images/gallery.png")
    assert picture.width == 4 * (192 + 4) + 4, "image | seeds | pseudo label | ground truth, 192 px each"


def test_refine_none_with_ignore_band_needs_no_affinity_model(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_params_dict()
    raw["refine"].update({"method": "none", "bg_threshold": 0.45, "ignore_band": [0.2, 0.7], "workers": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    args = refine_args(tiny_run, params, out="none")
    args[args.index("--aff-dir") + 1] = tmp_path / "missing"
    result = invoke("refine", *args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tiny_run / "results/none/metrics.json").read_text())
    assert 0 < metrics["pseudo"]["ignored_fraction"] < 1
    assert any((load_label_png(p) == 255).any() for p in (tiny_run / "none").glob("*.png"))


def test_refine_scores_only_score_split(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_run / "prepared", tmp_path / "prepared")
    few = (tmp_path / "prepared/splits/train.txt").read_text().split()[:5]
    (tmp_path / "prepared/splits/train_aug.txt").write_text("\n".join(few) + "\n")
    raw = tiny_params_dict()
    raw["refine"].update({"method": "none", "workers": 1, "score_split": "train_aug"})
    args = refine_args(tiny_run, write_params(tmp_path / "params.yaml", raw), out="few")
    args[args.index("--data") + 1] = tmp_path / "prepared"
    assert invoke("refine", *args).exit_code == 0
    assert json.loads((tiny_run / "results/few/metrics.json").read_text())["images_scored"] == 5
    assert len(list((tiny_run / "few").glob("*.png"))) == 16, "every image still gets a pseudo label"
    raw["refine"]["score_split"] = "val"  # the store holds train images only
    line = one_error_line(invoke("refine", *refine_args(tiny_run, write_params(tmp_path / "p.yaml", raw), "v")))
    assert "refine.score_split = val shares no image" in line


def test_refine_psa_without_affinity_model_names_train_aff(tiny_run, tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    args = refine_args(tiny_run, params, out="x")
    args[args.index("--aff-dir") + 1] = tmp_path / "missing"
    line = one_error_line(invoke("refine", *args))
    assert "'train_aff'" in line and str(tmp_path / "missing") in line


def test_train_aff_trains_nothing_for_a_method_without_affinity_net(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_params_dict()
    raw["refine"]["method"] = "crf"
    args = aff_args(tiny_run, write_params(tmp_path / "params.yaml", raw))
    for option, name in (("--model-dir", "aff"), ("--results", "results"), ("--checkpoint", "aff.pt")):
        args[args.index(option) + 1] = tmp_path / name
    (tmp_path / "aff.pt").write_bytes(b"an interrupted run's checkpoint")
    result = invoke("train_aff", *args)
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.output
    meta = json.loads((tmp_path / "aff/meta.json").read_text())
    assert meta == {"skipped": "refine.method was 'crf' when train_aff ran; only psa and psa_crf use the AffinityNet"}
    assert sorted(p.name for p in (tmp_path / "aff").iterdir()) == ["meta.json"]
    assert json.loads((tmp_path / "results/metrics.json").read_text()) == {}
    curves = sorted(p.name for p in (tmp_path / "results/plots/metrics/train").iterdir())
    assert curves == ["loss_bg.tsv", "loss_fg.tsv", "loss_neg.tsv", "loss_total.tsv"]
    assert (tmp_path / "results/plots/metrics/train/loss_bg.tsv").read_text() == "step\tloss_bg\n", "no step"
    assert not (tmp_path / "aff.pt").exists()
    # the curves a trained run writes under those names, and the ones dvc.yaml draws together
    logged = set(json.loads((tiny_run / "results/train_aff/metrics.json").read_text())["train"])
    assert logged >= {f"loss_{term}" for term in train_aff.LOSS_TERMS}
    drawn = next(p["Affinity loss"]["y"] for p in DVC["plots"] if isinstance(p, dict) and "Affinity loss" in p)
    assert sorted(drawn) == sorted(f"results/train_aff/plots/metrics/train/loss_{t}.tsv" for t in train_aff.LOSS_TERMS)
    # a PSA refine pointed at it says why there is no model, in one line
    psa = write_params(tmp_path / "psa.yaml", tiny_params_dict())
    refine = refine_args(tiny_run, psa, out="x")
    refine[refine.index("--aff-dir") + 1] = tmp_path / "aff"
    line = one_error_line(invoke("refine", *refine))
    assert "affinity model not trained" in line and "refine.method was 'crf'" in line


@pytest.mark.parametrize("stage", ["train_aff", "refine"])
def test_missing_cams_name_the_cams_stage(tiny_run, tmp_path, stage):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    args = aff_args(tiny_run, params) if stage == "train_aff" else refine_args(tiny_run, params, out="x")
    args[args.index("--cams") + 1] = tmp_path / "no_cams"
    line = one_error_line(invoke(stage, *args))
    assert "'cams'" in line and str(tmp_path / "no_cams") in line


def test_bad_refine_params_exit_2(tiny_run, tmp_path):
    raw = tiny_params_dict()
    raw["refine"]["method"] = "magic"
    params = write_params(tmp_path / "params.yaml", raw)
    line = one_error_line(invoke("refine", *refine_args(tiny_run, params, out="x")))
    assert "refine.method" in line and str(params) in line


def test_train_aff_resumes_to_the_same_weights(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_path = write_params(tmp_path / "params.yaml", tiny_params_dict())
    params = StageParams(load_params(params_path), TRAIN_AFF_SECTIONS)
    inputs = (tiny_run / "prepared", tiny_run / "cams")

    def run(name: str):
        return train_aff.train_affinity_net(
            params, *inputs, tmp_path / name, tmp_path / f"res_{name}", tmp_path / "ck.pt"
        )

    run("straight")
    save = checkpoint.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert (tmp_path / "ck.pt").is_file()
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    run("resumed")
    straight, resumed = (
        load_file(tmp_path / "straight/model.safetensors"),
        load_file(tmp_path / "resumed/model.safetensors"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert (straight[key] == resumed[key]).all(), key
