"""Images without any class label (VOC keeps them on purpose): every stage runs, counts and reports them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_params_dict, write_params
from typer.testing import CliRunner

from stages.cli import app

UNLABELLED = ["train_00001", "train_00004", "train_00009", "val_00002"]


def args_of(stage: str, root: Path) -> list[str | Path]:
    prepared = ["--data", root / "prepared"]
    return {
        "prepare": ["--out", root / "prepared"],
        "train_cls": [*prepared, "--model-dir", root / "cls", "--results", root / "results/train_cls",
                      "--checkpoint", root / "cls.pt"],
        "cams": [*prepared, "--model-dir", root / "cls", "--out", root / "cams", "--results", root / "results/cams"],
        "train_aff": [*prepared, "--cams", root / "cams", "--model-dir", root / "aff",
                      "--results", root / "results/train_aff", "--checkpoint", root / "aff.pt"],
        "refine": [*prepared, "--cams", root / "cams", "--aff-dir", root / "aff", "--out", root / "pseudo",
                   "--results", root / "results/refine"],
        "train_seg": [*prepared, "--pseudo-labels", root / "pseudo", "--model-dir", root / "seg",
                      "--results", root / "results/train_seg", "--checkpoint", root / "seg.pt"],
        "evaluate": [*prepared, "--model-dir", root / "seg", "--results", root / "results/evaluate"],
    }[stage]  # fmt: skip


def invoke(stage: str, params: Path, root: Path):
    return CliRunner().invoke(app, [stage, "--params", str(params), *map(str, args_of(stage, root))])


def blank_labels(root: Path, ids: list[str]) -> None:
    path = root / "prepared" / "cls_labels.json"
    labels = json.loads(path.read_text())
    labels.update(dict.fromkeys(ids, []))
    path.write_text(json.dumps(labels))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("label_less")
    params = write_params(root / "params.yaml", tiny_params_dict())
    assert invoke("prepare", params, root).exit_code == 0
    return root, params


def test_every_stage_runs_on_images_without_labels_and_counts_them(prepared, monkeypatch):
    root, params = prepared
    blank_labels(root, UNLABELLED)
    monkeypatch.chdir(root)
    for stage in ("train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate"):
        result = invoke(stage, params, root)
        assert result.exit_code == 0, f"{stage}: {result.output}"
    for stage in ("cams", "refine"):
        metrics = json.loads((root / "results" / stage / "metrics.json").read_text())
        assert metrics["images_without_labels"] == 3, stage  # the train images: cams.split is train


def test_train_cls_refuses_a_split_without_any_label(prepared, tmp_path, monkeypatch):
    root, params = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "prepared").symlink_to(root / "prepared")
    data = json.loads((root / "prepared" / "cls_labels.json").read_text())
    saved = dict(data)
    monkeypatch.chdir(tmp_path)
    try:
        blank_labels(root, [i for i in data if i.startswith("train")])
        result = invoke("train_cls", params, copy)
    finally:
        (root / "prepared" / "cls_labels.json").write_text(json.dumps(saved))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "no image of split 'train_aug'" in lines[0] and "run 'prepare' again" in lines[0]
