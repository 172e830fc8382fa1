"""``train_seg``, ``evaluate`` and ``predict`` end to end on tiny data (in-process CLI), resume, and metrics."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, tiny_params_dict, write_params
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from pipeline import checkpoint
from pipeline import evaluate as evaluate_module
from pipeline.config import CrfParams, EvaluateParams, Params, load_sections
from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.evaluate import _crf_job, crf_job, crf_labels, evaluate_segmenter
from pipeline.io import CamWriter, save_label_png, write_json
from pipeline.models.deeplab import build_segmenter, save_segmenter
from pipeline.parallel import OrderedPool
from pipeline.prepare import prepare
from pipeline.train_seg import train_segmenter
from stages.cli import app

TINY_SEG = TINY_OVERRIDES["train_seg"]
TINY_EVAL = TINY_OVERRIDES["evaluate"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args], env={"TQDM_DISABLE": "1", "DVCLIVE_OPEN": "false"})


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny prepared dataset, pseudo labels (the ground truth, 255 kept), a CAM store and a params file."""
    root = tmp_path_factory.mktemp("seg")
    raw = tiny_params_dict()
    cfg = Params.model_validate(raw)
    prepare(cfg.data, cfg.seed, root / "prepared")
    data = PreparedDataset.open(root / "prepared")
    with CamWriter(root / "cams", shard_size=8) as cams:
        for image_id in data.split("train"):
            mask = data.load_mask(image_id)
            save_label_png(root / "pseudo" / f"{image_id}.png", mask, data.palette)
            keys = np.array([0, *data.labels[image_id]])
            cams.add(image_id, keys, {"cam": (mask[None] == keys[:, None, None]).astype(np.float32)})  # (N, H, W)
    write_params(root / "params.yaml", raw)
    return root


@pytest.fixture(scope="module")
def trained(workspace) -> tuple[Path, object]:
    """``wsss train_seg`` run once through the CLI."""
    result = invoke(
        "train_seg",
        *("--params", workspace / "params.yaml", "--data", workspace / "prepared"),
        *("--pseudo-labels", workspace / "pseudo", "--model-dir", workspace / "model"),
        *("--results", workspace / "results_train", "--checkpoint", workspace / "ckpt.pt"),
    )
    return workspace, result


def test_train_seg_cli_writes_model_meta_curves_and_metrics(trained):
    root, result = trained
    assert result.exit_code == 0, result.output
    assert "val mIoU=" in result.stdout
    meta = json.loads((root / "model" / "meta.json").read_text())
    assert meta["arch"] == "deeplabv3plus" and meta["encoder"] == "tu-test_efficientnet"
    assert meta["num_classes"] == 7 and meta["class_names"][0] == "background" and len(meta["palette"]) == 7
    assert len(load_file(str(root / "model" / "model.safetensors"))) > 10
    metrics = json.loads((root / "results_train" / "metrics.json").read_text())
    assert 0 <= metrics["val"]["miou"] <= 1 and "loss" in metrics["train"]
    for curve in ("train/loss", "train/lr", "val/miou"):
        rows = (root / "results_train" / "plots" / "metrics" / f"{curve}.tsv").read_text().splitlines()
        assert len(rows) == 1 + TINY_SEG["epochs"], curve
    assert not (root / "ckpt.pt").exists(), "the checkpoint is deleted once training completes"


def test_train_seg_without_pseudo_labels_names_the_missing_file(workspace, tmp_path):
    result = invoke(
        "train_seg",
        *("--params", workspace / "params.yaml", "--data", workspace / "prepared"),
        *("--pseudo-labels", tmp_path / "none", "--model-dir", tmp_path / "m", "--results", tmp_path / "r"),
    )
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: pseudo label not found: ")
    assert str(tmp_path / "none") in lines[0] and "'refine'" in lines[0]


def test_interrupted_train_seg_resumes_to_the_same_weights(workspace, tmp_path, monkeypatch):
    params = load_sections(workspace / "params.yaml", ("seed", "data", "train_seg"))
    args = (workspace / "prepared", workspace / "pseudo")
    train_segmenter(params, *args, tmp_path / "ref", tmp_path / "ref_results", tmp_path / "ref.pt")

    save = checkpoint.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(params, *args, tmp_path / "run", tmp_path / "run_results", tmp_path / "run.pt")
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    train_segmenter(params, *args, tmp_path / "run", tmp_path / "run_results", tmp_path / "run.pt")

    reference = load_file(str(tmp_path / "ref" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    rows = (tmp_path / "run_results" / "plots" / "metrics" / "val" / "miou.tsv").read_text().splitlines()
    assert len(rows) == 1 + TINY_SEG["epochs"]


def test_evaluate_cli_writes_metrics_plots_and_gallery(trained):
    root, train_result = trained
    assert train_result.exit_code == 0, train_result.output
    result = invoke(
        "evaluate",
        *("--params", root / "params.yaml", "--data", root / "prepared"),
        *("--model-dir", root / "model", "--results", root / "results_eval"),
        *("--cams", root / "cams", "--pseudo-labels", root / "pseudo"),
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "results_eval" / "metrics.json").read_text())
    assert set(metrics) >= {"single_scale", "multi_scale"}
    assert 0 <= metrics["multi_scale"]["miou"] <= 1 and "background" in metrics["multi_scale"]["iou"]
    images = root / "results_eval" / "plots" / "images"
    assert (images / "confusion_multi_scale.png").is_file()
    galleries = {"gallery.png", "failures.png", "ladder_gallery.png", "ladder_failures.png"}
    assert galleries <= {p.name for p in images.glob("*.png")}
    ladder = Image.open(images / "ladder_gallery.png")
    assert ladder.width == 5 * (192 + 4) + 4, "image | seeds | pseudo label | DeepLab | ground truth, 192 px each"
    rows = TINY_EVAL["gallery_size"]
    assert ladder.height > rows * 192 and Image.open(images / "ladder_failures.png").height == ladder.height
    confusion = json.loads((root / "results_eval" / "confusion.json").read_text())
    assert np.asarray(confusion["single_scale"]).shape == (7, 7)


def test_evaluate_ladder_needs_both_inputs(workspace, tmp_path):
    result = invoke("evaluate", "--params", workspace / "params.yaml", "--model-dir", tmp_path, "--cams", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --cams and --pseudo-labels go together: the ladder gallery reads both"


def test_evaluate_without_model_names_the_path_and_the_stage(workspace, tmp_path):
    result = invoke(
        "evaluate", "--params", workspace / "params.yaml", "--data", workspace / "prepared", "--model-dir", tmp_path
    )
    assert result.exit_code == 2
    assert f"{tmp_path / 'meta.json'} is missing" in result.stderr and "'train_seg'" in result.stderr


# --- evaluate on a constructed case -------------------------------------------------------------------------


class RedChannelModel(nn.Module):
    """A stand-in model that predicts the class id written in the red channel of the (unnormalised) image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = (x[:, 0] * 255).round().long().clamp(0, self.num_classes - 1)  # (B, H, W)
        return 10.0 * F.one_hot(classes, self.num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)


def _constructed_dataset(root: Path) -> PreparedDataset:
    """Two 4x4 val images, 3 classes. GT: columns 0-1 background, 2-3 class 1; one GT pixel is 255.

    The prediction (red channel) moves the boundary one column right: columns 0-2 background, 3 class 1.
    """
    names, palette = ["background", "a", "b"], [[0, 0, 0], [200, 0, 0], [0, 200, 0]]
    write_json(root / "classes.json", {"dataset": "test", "names": names, "palette": palette, "image_ext": ".png"})
    write_json(root / "cls_labels.json", {"v0": [1], "v1": [1]})
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "val.txt").write_text("v0\nv1\n")
    gt = np.tile(np.array([0, 0, 1, 1], np.uint8), (4, 1))
    pred = np.tile(np.array([0, 0, 0, 1], np.uint8), (4, 1))
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = pred
    (root / "images").mkdir()
    for image_id in ("v0", "v1"):
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        mask = gt.copy()
        if image_id == "v1":
            mask[0, 3] = IGNORE
        save_label_png(root / "masks" / f"{image_id}.png", mask, palette)
    return PreparedDataset.open(root)


def test_evaluate_metrics_on_a_constructed_case(tmp_path, monkeypatch):
    data = _constructed_dataset(tmp_path / "prepared")
    meta = {"mean": [0, 0, 0], "std": [1, 1, 1], "class_names": data.class_names, "palette": data.palette}
    monkeypatch.setattr(evaluate_module, "load_segmenter", lambda model_dir, device: (RedChannelModel(3), meta))
    # a CRF too weak to move any label: its confusion matrix must equal the multi-scale one
    weak_crf = CrfParams(gauss_compat=0, bilateral_compat=1e-3)
    params = EvaluateParams(scales=(1.0,), flip=True, device="cpu", gallery_size=1, crf=weak_crf)
    metrics = evaluate_segmenter(params, data.root, tmp_path / "model", tmp_path / "results")
    # background: TP 16, GT 16, predicted 24 -> 2/3; class a: TP 7, GT 15 (one ignored), predicted 7 -> 7/15;
    # class b is in neither GT nor prediction -> left out of the mean
    expected = {"background": 2 / 3, "a": 7 / 15}
    for mode in ("single_scale", "multi_scale", "crf"):
        assert metrics[f"{mode}/miou"] == pytest.approx(np.mean(list(expected.values())))
        assert metrics[f"{mode}/iou/background"] == pytest.approx(expected["background"])
        assert metrics[f"{mode}/iou/a"] == pytest.approx(expected["a"])
        assert f"{mode}/iou/b" not in metrics
    confusion = json.loads((tmp_path / "results" / "confusion.json").read_text())
    assert confusion["multi_scale"] == confusion["crf"] == [[16, 0, 0], [8, 7, 0], [0, 0, 0]]
    images = tmp_path / "results" / "plots" / "images"
    assert not (images / "ladder_gallery.png").exists(), "no ladder without the CAM store and pseudo labels"
    gallery = Image.open(images / "gallery.png")
    assert gallery.width == 5 * (192 + 4) + 4, "image | single | multi | CRF | GT, 192 px each"
    # multi-scale IoU: v0 (2/3 + 4/8) / 2 = 0.583, v1 (2/3 + 3/7) / 2 = 0.548 (its ignored pixel was class a):
    # the worst is v1, not among the first (v0), so it has no CRF panel: image | single | multi | GT
    assert Image.open(images / "failures.png").width == 4 * (192 + 4) + 4


def test_crf_in_worker_processes_matches_the_serial_crf():
    rng = np.random.default_rng(0)
    params = CrfParams(bilateral_sxy=10, bilateral_srgb=20)
    jobs = [
        (
            f"i{n}",
            rng.integers(0, 255, (12, 10, 3), dtype=np.uint8),
            rng.dirichlet(np.ones(3), (12, 10)).transpose(2, 0, 1).astype(np.float32),  # (K, H, W)
        )
        for n in range(5)
    ]
    results = {}
    for workers in (0, 2):
        with OrderedPool(_crf_job, workers, in_flight=2) as pool:
            done = [item for job in jobs for item in pool.submit(crf_job(*job, params.model_dump(), 0.0))]
            done += pool.drain()
        results[workers] = done
    assert [key for key, _ in results[2]] == [key for key, *_ in jobs], "results come back in submission order"
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(results[0], results[2], strict=True))
    assert all(label.shape == (12, 10) and label.dtype == np.uint8 for _, label in results[0])


def test_crf_leaves_out_labels_that_never_reach_min_prob_and_maps_ids_back():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)
    probs = np.full((5, 16, 20), 1e-4, dtype=np.float32)  # labels 0, 2, 4 only matter
    probs[0, :, :10], probs[2, :8, 10:], probs[4, 8:, 10:] = 0.9996, 0.9996, 0.9996
    crf = CrfParams(bilateral_sxy=10, bilateral_srgb=20).model_dump()
    pruned = crf_labels(image, probs, crf, min_prob=0.01)
    assert set(np.unique(pruned)) == {0, 2, 4}, "label ids are the original ones, not positions among the kept"
    np.testing.assert_array_equal(pruned, crf_labels(image, probs, crf))
    np.testing.assert_array_equal(crf_labels(image, probs, crf, min_prob=0.9999), crf_labels(image, probs, crf))


def test_evaluate_rejects_a_model_of_other_classes(tmp_path, monkeypatch):
    data = _constructed_dataset(tmp_path / "prepared")
    meta = {"mean": [0, 0, 0], "std": [1, 1, 1], "class_names": ["background", "x", "y"], "palette": data.palette}
    monkeypatch.setattr(evaluate_module, "load_segmenter", lambda model_dir, device: (RedChannelModel(3), meta))
    with pytest.raises(Exception, match="was trained on classes"):
        evaluate_segmenter(EvaluateParams(device="cpu"), data.root, tmp_path / "model", tmp_path / "results")


# --- predict ------------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """An untrained tiny model saved in the ``train_seg`` format."""
    model = build_segmenter("deeplabv3plus", "tu-test_efficientnet", 3, decoder_channels=8)
    meta = {
        "arch": "deeplabv3plus",
        "encoder": "tu-test_efficientnet",
        "encoder_weights": "none",
        "output_stride": 16,
        "decoder_channels": 8,
        "num_classes": 3,
        "class_names": ["background", "a", "b"],
        "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    save_segmenter(model, meta, tmp_path / "model")
    return tmp_path / "model"


def test_predict_folder_with_a_corrupt_file(tmp_path, model_dir):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "one.jpg")
    Image.fromarray(rng.integers(0, 255, (17, 9, 3), dtype=np.uint8)).save(folder / "sub" / "two.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, skipped")
    out = tmp_path / "out"
    result = invoke("predict", folder, "--out", out, "--model-dir", model_dir, "--scales", "1.0", "--scales", "0.5")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(str(folder / "broken.png") in line for line in errors), result.stderr
    assert "wrote 2 predictions" in result.stdout
    label = np.asarray(Image.open(out / "one.png"))
    assert Image.open(out / "one.png").mode == "P" and label.shape == (20, 30) and label.max() < 3
    assert np.asarray(Image.open(out / "sub" / "two.png")).shape == (17, 9)
    assert Image.open(out / "one_overlay.jpg").size == (30, 20)
    assert (out / "sub" / "two_overlay.jpg").is_file()
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_predict_files_work_and_missing_inputs_are_reported(tmp_path, model_dir):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    result = invoke("predict", image, tmp_path / "nope.jpg", "--out", tmp_path / "out", "--model-dir", model_dir)
    assert result.exit_code == 1
    assert f"image not found: {tmp_path / 'nope.jpg'}" in result.stderr
    assert (tmp_path / "out" / "x.png").is_file()


def test_predict_with_a_missing_model(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    result = invoke("predict", image, "--out", tmp_path / "out", "--model-dir", tmp_path / "no_model")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert f"{tmp_path / 'no_model' / 'meta.json'} is missing" in lines[0] and "'train_seg'" in lines[0]


# --- help and params errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train_seg", ["--params", "--data", "--pseudo-labels", "--model-dir", "--results", "--checkpoint"]),
        ("evaluate", ["--params", "--data", "--model-dir", "--results"]),
        ("predict", ["--out", "--model-dir", "--scales", "--flip", "--device", "--threads"]),
    ],
)
def test_help_lists_the_options(command, options):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.stdout, f"{option} missing from `wsss {command} --help`"


@pytest.mark.parametrize(("command", "section"), [("train_seg", "train_seg"), ("evaluate", "evaluate")])
def test_bad_params_exit_2_with_one_line(tmp_path, command, section):
    params = write_params(tmp_path / "bad.yaml", tiny_params_dict(**{section: {"batch_size": 0}}))
    result = invoke(command, "--params", params, "--data", tmp_path / "missing")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(params) in lines[0] and f"{section}.batch_size" in lines[0]
