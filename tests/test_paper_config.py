"""The paper configurations: they validate, ``dvc repro --dry`` lays out the full DAG on VOC data, and a tiny VOC
fixture runs through ``prepare -> train_cls -> cams`` (seeds for train_aug scored on train as well)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, copy_pipeline, subprocess_env, tiny_params_dict, write_params
from raw_fixtures import VOC_TRAIN, VOC_TRAIN_AUG, make_voc
from typer.testing import CliRunner

from pipeline.config import REQUIRED_SECTIONS, load_params
from stages.cli import app

CONFIGS = REPO / "configs"
STAGES = ("prepare", "train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate")


PAPER_CONFIGS = ["voc_paper.yaml", "coco_paper.yaml"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_name_every_section(name):
    # complete files: no section silently falls back to the synthetic defaults (which would also fail to load)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert tuple(raw) == REQUIRED_SECTIONS  # pretrain: their encoders start from ImageNet weights
    assert isinstance(raw["seed"], int)
    for section in REQUIRED_SECTIONS[1:]:
        assert isinstance(raw[section], dict) and raw[section], f"{name}: section '{section}' is empty"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_validate(name):
    params = load_params(CONFIGS / name)
    assert params.model.backbone == "swin_tiny_patch4_window7_224"
    assert params.model.pretrained == "swin_tiny_patch4_window7_224.ms_in1k"
    assert params.train_cls.crop_size == 224 and params.train_cls.batch_size == 16
    assert params.cams.scales == (1.0, 0.5, 1.5, 2.0)
    assert params.data.dataset == name.split("_")[0]
    assert params.train_seg.decoder_channels == 256, "DeepLab's ASPP/decoder width"
    assert params.evaluate.crf_workers > 0, "the val CRF runs in parallel"


def test_voc_paper_schedule():
    params = load_params(CONFIGS / "voc_paper.yaml")
    assert params.train_cls.epochs == 30 and params.data.root == "data/raw/voc"


def test_voc_paper_follows_the_standard_protocol_without_overrides():
    params = load_params(CONFIGS / "voc_paper.yaml")
    # seeds for what DeepLab trains on, scored on the 1,464 train images with fine masks
    assert params.cams.split == params.train_seg.split == "train_aug"
    assert params.cams.score_split == "train"
    assert params.evaluate.split == "val"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_affinity_recipe_is_consistent(name):
    # PSA's SGD learning rate belongs to SGD on an ImageNet-initialised backbone, not to AdamW from scratch
    aff = load_params(CONFIGS / name).train_aff
    assert aff.optimizer == "sgd" and aff.lr * aff.head_lr_mult <= 0.1 and aff.model.pretrained != "none"
    assert aff.radius == 5 and aff.crop_size == 448 and aff.model.out_indices[0] == 2, "PSA: radius 5 at stride 8"


def test_paper_deeplab_recipe_is_vainf_sgd():
    for name in PAPER_CONFIGS:
        seg = load_params(CONFIGS / name).train_seg
        assert (seg.optimizer, seg.lr, seg.head_lr_mult, seg.momentum) == ("sgd", 1e-3, 10.0, 0.9), name


def test_coco_paper_later_stages_follow_the_voc_recipe():
    voc, coco = load_params(CONFIGS / "voc_paper.yaml"), load_params(CONFIGS / "coco_paper.yaml")
    assert coco.data.root == "data/raw/coco"
    assert coco.train_aff.model == voc.train_aff.model and coco.train_aff.radius == voc.train_aff.radius
    assert coco.refine.method == voc.refine.method == "psa_crf" and coco.refine.crf == voc.refine.crf
    for key in ("arch", "encoder", "encoder_weights", "optimizer", "lr", "schedule", "crop_size"):
        assert getattr(coco.train_seg, key) == getattr(voc.train_seg, key), key
    assert coco.train_seg.split == coco.cams.split == "train" and coco.evaluate.split == "val"
    assert coco.cams.score_split is None
    assert coco.evaluate.scales == voc.evaluate.scales and coco.evaluate.use_crf
    # about 100k DeepLab iterations over COCO train (82,081 images)
    assert 90_000 <= coco.train_seg.epochs * (82_081 // coco.train_seg.batch_size) <= 110_000


def test_dvc_dag_never_downloads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)
    assert not any("download" in stage["cmd"] for stage in stages.values())


def voc_params(raw: Path, **overrides) -> dict:
    """The VOC paper params pointed at ``raw``, with per-section overrides."""
    raw_params = yaml.safe_load((CONFIGS / "voc_paper.yaml").read_text())
    raw_params["data"]["root"] = str(raw)
    for section, values in overrides.items():
        raw_params[section] = {**raw_params[section], **values}
    return raw_params


@pytest.mark.slow  # dvc subprocesses
def test_dvc_repro_dry_lists_the_full_dag_on_voc(tmp_path):
    project = copy_pipeline(tmp_path / "project")
    write_params(project / "params.yaml", voc_params(make_voc(tmp_path / "raw")))
    env = subprocess_env()

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=120
        )

    assert dvc("init", "--no-scm", "-q").returncode == 0
    # --force: on a fresh workspace DVC 3's plain --dry stops at the first stage whose dependency is another
    # stage's missing output ("No such file or directory: data/prepared")
    result = dvc("repro", "--dry", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    order = [result.stdout.index(f"Running stage '{stage}'") for stage in STAGES]
    assert order == sorted(order), "prepare, then train_cls, then cams"
    assert "wsss prepare --out data/prepared" in result.stdout
    assert not (project / "data").exists(), "a dry run runs nothing"
    status = dvc("status", "--json")
    assert json.loads(status.stdout)["prepare"], "prepare would run on the VOC params"


def test_tiny_voc_runs_prepare_train_cls_cams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_voc(Path("raw"))
    params = write_params(Path("params.yaml"), tiny_params_dict(data={"dataset": "voc", "root": "raw"}))
    runner = CliRunner()
    commands = [
        ["prepare", "--out", "data/prepared"],
        ["train_cls", "--data", "data/prepared", "--model-dir", "models/cls", "--results", "results/train_cls"],
        ["cams", "--data", "data/prepared", "--model-dir", "models/cls", "--out", "data/cams", "--results", "rc"],
    ]
    for command in commands:
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert result.exit_code == 0, f"{command[0]}: {result.output}"
    assert json.loads(Path("models/cls/meta.json").read_text())["num_classes"] == 20
    index = json.loads(Path("data/cams/index.json").read_text())
    assert sorted(index["images"]) == sorted(VOC_TRAIN), "cams.split train: the official train list"
    metrics = json.loads(Path("rc/metrics.json").read_text())
    assert 0 <= metrics["cam"]["miou_best"] <= 1 and 0 <= metrics["rcam"]["miou_argmax"] <= 1

    # the VOC protocol: seeds for train_aug, scored on train only -> same seed scores, more images stored
    voc = {"dataset": "voc", "root": "raw"}
    aug = write_params(
        Path("aug.yaml"), tiny_params_dict(data=voc, cams={"split": "train_aug", "score_split": "train"})
    )
    command = ["cams", "--data", "data/prepared", "--model-dir", "models/cls", "--out", "data/cams_aug"]
    command += ["--results", "ra"]
    result = runner.invoke(app, [*command, "--params", str(aug)])
    assert result.exit_code == 0, result.output
    index = json.loads(Path("data/cams_aug/index.json").read_text())
    assert sorted(index["images"]) == sorted(VOC_TRAIN_AUG)
    scored = json.loads(Path("ra/metrics.json").read_text())
    for name in ("cam", "rcam"):
        for key in ("miou_argmax", "miou_best", "best_threshold"):
            assert scored[name][key] == pytest.approx(metrics[name][key], abs=1e-6), f"{name}.{key}"

    # a score split that shares no image with the split is refused in one line
    val = write_params(Path("val.yaml"), tiny_params_dict(data=voc, cams={"score_split": "val"}))
    result = runner.invoke(app, [*command, "--params", str(val)])
    assert result.exit_code == 2 and "shares no image" in result.output
