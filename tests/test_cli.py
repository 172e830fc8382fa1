"""The ``wsss`` command: help, one-line user errors, and every stage run by hand on a tiny configuration."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, tiny_params_dict, write_params
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import REQUIRED_SECTIONS
from stages.cli import STAGES, app

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
HELP_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}


def invoke(*args: str | Path):
    """Run ``wsss <args>`` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args], env=HELP_ENV)


def option_names(stage: str) -> list[str]:
    """The ``--options`` of a stage, derived from its ``main`` signature."""
    return ["--" + name.replace("_", "-") for name in inspect.signature(STAGES[stage].main).parameters]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- help ---------------------------------------------------------------------------------------------------


def test_help_lists_every_stage():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    for stage in ("prepare", "train_cls", "cams"):
        assert re.search(rf"\b{stage}\b", text), f"{stage} missing from:\n{text}"


@pytest.mark.parametrize("stage", ["prepare", "train_cls", "cams"])
def test_stage_help_mentions_every_option(stage):
    result = invoke(stage, "--help")
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    options = option_names(stage)
    assert "--params" in options and len(options) >= 2
    for option in options:
        assert option in text, f"{option} missing from `wsss {stage} --help`:\n{text}"


# --- one-line errors for bad params -------------------------------------------------------------------------

BAD_PARAMS = {
    "unknown_key": ({"train_cls": {"epochz": 3}}, "train_cls.epochz"),
    "wrong_type": ({"train_cls": {"epochs": "many"}}, "train_cls.epochs"),
    "out_of_range": ({"cams": {"shard_size": 0}}, "cams.shard_size"),
    "nested_out_of_range": ({"data": {"synthetic": {"image_size": 8}}}, "data.synthetic.image_size"),
    "quoted_number": ({"train_cls": {"epochs": "2"}}, "train_cls.epochs"),
    "infinite_lr": ({"train_cls": {"lr": float("inf")}}, "train_cls.lr"),
    "empty_scales": ({"cams": {"scales": []}}, "cams.scales"),
}


@pytest.mark.parametrize("stage", ["prepare", "train_cls", "cams"])
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_exit_2_with_one_line(tmp_path, stage, case):
    # the whole file is validated, so every stage rejects an error in any section
    overrides, key = BAD_PARAMS[case]
    params = write_params(tmp_path / "bad.yaml", tiny_params_dict(**overrides))
    out = tmp_path / "out"
    result = invoke(stage, "--params", params, *_outputs(stage, out))
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(params) in lines[0] and key in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), "a stage with invalid params must not start work"


@pytest.mark.parametrize("section", REQUIRED_SECTIONS)
def test_params_file_without_a_section_exits_2_with_one_line(tmp_path, section):
    # every section is required, also those the stage does not read (cams reads only `cams`)
    raw = tiny_params_dict()
    del raw[section]
    params = write_params(tmp_path / "bad.yaml", raw)
    out = tmp_path / "out"
    result = invoke("cams", "--params", params, *_outputs("cams", out))
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    needs = ", ".join(REQUIRED_SECTIONS)
    assert lines == [f"error: {params}: section '{section}' is missing (every params file needs: {needs})"]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_duplicate_params_key_exits_2_with_one_line(tmp_path):
    text = yaml.safe_dump(tiny_params_dict(), sort_keys=False)
    params = tmp_path / "dup.yaml"
    params.write_text(text.replace("seed: 0\n", "seed: 0\nseed: 1\n", 1))
    result = invoke("prepare", "--params", params, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert error_lines(result.stderr) == [
        f"error: {params}: key 'seed' appears twice in one mapping (lines 1 and 2); keep one"
    ]
    assert not (tmp_path / "out").exists()


def test_missing_params_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = invoke("prepare", "--params", missing, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


@pytest.mark.slow  # a Python subprocess (torch import, ~5-10 s on a shared core)
def test_bad_params_in_a_real_process(tmp_path):
    # a subprocess shows what a user sees: no log lines, warnings or traceback besides the error
    params = write_params(tmp_path / "bad.yaml", tiny_params_dict(loss={"gsc_weight": -1}))
    result = run_cli("train_cls", "--params", params, "--data", tmp_path / "none", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(params) in lines[0] and "loss.gsc_weight" in lines[0]
    assert result.stdout == ""


def _outputs(stage: str, root: Path) -> list[str | Path]:
    """Output options that point every artifact of ``stage`` under ``root``."""
    if stage == "prepare":
        return ["--out", root / "prepared"]
    common = ["--data", root / "prepared", "--model-dir", root / "models", "--results", root / "results" / stage]
    if stage == "train_cls":
        return [*common, "--checkpoint", root / "ckpt.pt"]
    return [*common, "--out", root / "cams"]


# --- missing inputs name the stage that makes them ----------------------------------------------------------


def test_train_cls_without_prepared_data(tiny_params, tmp_path):
    missing = tmp_path / "no_such_prepared"
    result = invoke("train_cls", "--params", tiny_params, *_outputs("train_cls", tmp_path), "--data", missing)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0] and "'prepare'" in lines[0]
    assert not (tmp_path / "models").exists()


def test_cams_without_prepared_data(tiny_params, tmp_path):
    missing = tmp_path / "no_such_prepared"
    result = invoke("cams", "--params", tiny_params, *_outputs("cams", tmp_path), "--data", missing)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "'prepare'" in lines[0]


def test_cams_without_model(tiny_params, tmp_path, pipeline_run):
    missing = tmp_path / "no_model"
    args = [*_outputs("cams", tmp_path), "--data", pipeline_run / "prepared", "--model-dir", missing]
    result = invoke("cams", "--params", tiny_params, *args)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0] and "'train_cls'" in lines[0]
    assert not (tmp_path / "cams").exists()


# --- the stages by hand -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams on the tiny params, run once for the module; returns the output root."""
    root = tmp_path_factory.mktemp("by_hand")
    params = write_params(root / "params.yaml", tiny_params_dict())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # keep dvclive away from the repository's own DVC workspace
        for stage in ("prepare", "train_cls", "cams"):
            result = invoke(stage, "--params", params, *_outputs(stage, root))
            assert result.exit_code == 0, f"wsss {stage} failed:\n{result.output}\n{result.exception!r}"
    return root


def test_prepare_layout(pipeline_run):
    prepared = pipeline_run / "prepared"
    classes = json.loads((prepared / "classes.json").read_text())
    labels = json.loads((prepared / "cls_labels.json").read_text())
    splits = {s: (prepared / "splits" / f"{s}.txt").read_text().split() for s in ("train", "train_aug", "val")}
    assert classes["names"][0] == "background" and len(classes["palette"]) == len(classes["names"])
    assert len(splits["train"]) == 16 and len(splits["val"]) == 8 and splits["train_aug"] == splits["train"]
    assert set(labels) == set(splits["train"]) | set(splits["val"])
    for image_id in splits["train"] + splits["val"]:
        assert (prepared / "images" / f"{image_id}{classes['image_ext']}").is_file()
        assert (prepared / "masks" / f"{image_id}.png").is_file()
        assert all(1 <= k < len(classes["names"]) for k in labels[image_id])


def test_train_cls_artifacts(pipeline_run):
    model_dir, results = pipeline_run / "models", pipeline_run / "results" / "train_cls"
    assert (model_dir / "model.safetensors").stat().st_size > 0
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["img_size"] == 32 and meta["model"]["swin"]["embed_dim"] == 8
    assert meta["num_classes"] == len(meta["class_names"]) - 1
    metrics = json.loads((results / "metrics.json").read_text())
    assert 0 <= metrics["val"]["map_classwise"] <= 1 and 0 <= metrics["val"]["map_samplewise"] <= 1
    rows = (results / "plots/metrics/val/map_classwise.tsv").read_text().splitlines()
    assert len(rows) == 1 + 2, "one header + one row per epoch"
    assert not (pipeline_run / "ckpt.pt").exists(), "the checkpoint is deleted once training completes"


def test_cams_store(pipeline_run):
    cams = pipeline_run / "cams"
    index = json.loads((cams / "index.json").read_text())
    train_ids = (pipeline_run / "prepared/splits/train.txt").read_text().split()
    assert list(index["images"]) == train_ids
    shards = sorted({name for name in index["images"].values()})
    assert shards == ["shard-00000.npz", "shard-00001.npz"], "16 images in shards of 8"
    assert all((cams / s).is_file() for s in shards)


def test_cams_metrics_and_gallery(pipeline_run):
    results = pipeline_run / "results" / "cams"
    metrics = json.loads((results / "metrics.json").read_text())
    names = json.loads((pipeline_run / "prepared/classes.json").read_text())["names"]
    for kind in ("cam", "rcam"):
        for key in ("miou_argmax", "miou_best", "best_threshold"):
            assert 0 <= metrics[kind][key] <= 1, (kind, key)
        assert metrics[kind]["miou_best"] >= metrics[kind]["miou_argmax"] - 1e-4
        for protocol in ("iou_argmax", "iou_best"):
            assert "background" in metrics[kind][protocol]
            assert set(metrics[kind][protocol]) <= set(names)
    assert set(metrics["val"]) >= {"map_classwise", "map_samplewise"}
    gallery = sorted(p.name for p in (results / "plots" / "images").rglob("*.png"))
    assert gallery == ["failures.png", "gallery.png"], gallery
    # the widest row: image | a CAM and an R-CAM panel per present class | ground truth, 192 px each
    train_ids = (pipeline_run / "prepared/splits/train.txt").read_text().split()
    labels = json.loads((pipeline_run / "prepared/cls_labels.json").read_text())
    columns = max(2 + 2 * len(labels[i]) for i in train_ids[:2])
    assert Image.open(results / "plots/images/gallery.png").width == columns * (192 + 4) + 4
    for kind in ("cam", "rcam"):
        sweep = json.loads((results / f"plots/custom/sweep_{kind}.json").read_text())
        assert len(sweep) == 61, "thresholds 0.00, 0.01, ..., 0.60"
        assert {"threshold", "miou"} <= set(sweep[0])


def test_cams_metrics_agree_with_train_cls(pipeline_run):
    # the same classifier on the same val split: cams re-evaluates and must get train_cls's final mAP
    trained = json.loads((pipeline_run / "results/train_cls/metrics.json").read_text())["val"]
    cams = json.loads((pipeline_run / "results/cams/metrics.json").read_text())["val"]
    assert cams["map_classwise"] == pytest.approx(trained["map_classwise"], abs=1e-6)


def test_train_cls_records_the_run_and_the_params_it_used(pipeline_run):
    # dvclive's params.yaml holds facts of the run (not the params file: DVC tracks that itself)
    logged = yaml.safe_load((pipeline_run / "results/train_cls/params.yaml").read_text())
    assert logged == {"world_size": 1, "device": "cpu", "resumed_at_epoch": 0}
    # meta.json holds the params the model was built with: they must be the params file's values
    used = yaml.safe_load((pipeline_run / "params.yaml").read_text())
    meta = json.loads((pipeline_run / "models" / "meta.json").read_text())
    assert meta["model"] == used["model"]
    assert meta["img_size"] == used["train_cls"]["crop_size"]
    assert meta["mean"] == used["data"]["mean"] and meta["std"] == used["data"]["std"]
