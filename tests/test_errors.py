"""Every failure a user can cause or meet ends with one line naming the file or key, the cause and the fix.

Corrupt CAM stores, model files, checkpoints and masks, mismatched models, bad ``predict`` options, OS errors
(exit 1) and unexpected exceptions; ``--debug`` / ``WSSS_DEBUG=1`` shows the traceback instead. Artifacts are
built directly with the writers (no training), so the file runs in seconds.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_params_dict, write_params
from PIL import Image
from typer.testing import CliRunner

from pipeline.checkpoint import Trainables, resume, save_checkpoint
from pipeline.config import AffinityNetParams, ModelParams, Params
from pipeline.data.layout import PreparedDataset, read_rgb
from pipeline.errors import DatasetError, ModelError, UserError
from pipeline.io import CamWriter, save_label_png
from pipeline.models.affinitynet import AffinityNet, load_affinity_model
from pipeline.models.deeplab import build_segmenter, save_segmenter
from pipeline.models.files import save_model_dir
from pipeline.models.swtformer import build_model
from pipeline.predict import predict_images
from pipeline.prepare import prepare
from pipeline.refinement.seeds import open_cam_store
from stages.cli import app

ENV = {"TQDM_DISABLE": "1", "DVCLIVE_OPEN": "false", "WSSS_DEBUG": ""}


def invoke(*args: str | Path, env: dict[str, str] | None = None):
    """Run ``wsss <args>`` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args], env={**ENV, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def one_error_line(result, exit_code: int = 2) -> str:
    """Check a CLI result ended with ``exit_code`` and one ``error: ...`` line on stderr; return that line."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny prepared dataset, an untrained classifier saved as ``train_cls`` does, and the tiny params."""
    root = tmp_path_factory.mktemp("errors")
    raw = tiny_params_dict()
    cfg = Params.model_validate(raw)
    prepare(cfg.data, cfg.seed, root / "prepared")
    write_params(root / "params.yaml", raw)
    save_classifier(root / "cls", PreparedDataset.open(root / "prepared").class_names)
    return root


def save_classifier(model_dir: Path, class_names: list[str]) -> Path:
    """An untrained tiny classifier for ``class_names`` in the ``train_cls`` format."""
    model_cfg = ModelParams(**tiny_params_dict()["model"])
    model = build_model(len(class_names) - 1, 32, **model_cfg.model_dump())
    meta = {
        "model": model_cfg.model_dump(mode="json"),
        "num_classes": len(class_names) - 1,
        "img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "class_names": class_names,
    }
    save_model_dir(model_dir, model, meta)
    return model_dir


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def run_cams(workspace: Path, tmp_path: Path, model_dir: Path, data: Path | None = None):
    return invoke(
        "cams",
        "--params",
        workspace / "params.yaml",
        "--data",
        data or workspace / "prepared",
        "--model-dir",
        model_dir,
        "--out",
        tmp_path / "cams",
        "--results",
        tmp_path / "results",
    )


# --- CAM store ----------------------------------------------------------------------------------------------


def _store(directory: Path) -> Path:
    with CamWriter(directory, shard_size=2) as writer:
        for n in range(3):
            writer.add(f"i{n}", np.array([0, 1]), {"cam": np.full((2, 4, 4), 0.5, np.float32)})
    return directory


DAMAGES = {
    "garbage_shard": ("shard-00000.npz", lambda p: p.write_bytes(b"not a zip at all")),
    "truncated_shard": ("shard-00000.npz", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "missing_shard": ("shard-00001.npz", lambda p: p.unlink()),
    "garbage_index": ("index.json", lambda p: p.write_text("{ not json")),
    "index_a_list": ("index.json", lambda p: p.write_text("[1, 2]")),
    "index_of_other_format": ("index.json", lambda p: p.write_text('{"images": {"i0": 3}}')),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_corrupt_cam_store_is_one_line_naming_the_file(tmp_path, damage):
    directory = _store(tmp_path / "cams")
    name, apply = DAMAGES[damage]
    apply(directory / name)
    with pytest.raises(DatasetError) as info:
        store = open_cam_store(directory)
        for image_id in store.ids:
            store.load(image_id)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(directory / name) in message and "'cams'" in message, message


# --- model files --------------------------------------------------------------------------------------------


def test_cams_with_a_truncated_classifier(workspace, tmp_path):
    model_dir = copy_dir(workspace / "cls", tmp_path / "cls")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_error_line(run_cams(workspace, tmp_path, model_dir))
    assert str(weights) in line and "'train_cls'" in line, line
    assert not (tmp_path / "cams").exists()


META_EDITS = {
    "garbage": lambda meta: "{ not json",
    "a_list": lambda meta: "[]",
    "key_missing": lambda meta: json.dumps({k: v for k, v in meta.items() if k != "mean"}),
    "num_classes_edited": lambda meta: json.dumps({**meta, "num_classes": meta["num_classes"] + 3}),
    "num_classes_a_string": lambda meta: json.dumps({**meta, "num_classes": "six"}),
}


@pytest.mark.parametrize("edit", sorted(META_EDITS))
def test_cams_with_an_edited_meta_json(workspace, tmp_path, edit):
    model_dir = copy_dir(workspace / "cls", tmp_path / "cls")
    meta_path = model_dir / "meta.json"
    meta_path.write_text(META_EDITS[edit](json.loads(meta_path.read_text())))
    line = one_error_line(run_cams(workspace, tmp_path, model_dir))
    assert str(model_dir) in line and "'train_cls'" in line, line


def test_cams_with_a_classifier_of_other_classes(workspace, tmp_path):
    names = [*PreparedDataset.open(workspace / "prepared").class_names, "extra_1", "extra_2"]
    model_dir = save_classifier(tmp_path / "cls", names)
    line = one_error_line(run_cams(workspace, tmp_path, model_dir))
    assert "was trained on classes" in line and str(model_dir / "meta.json") in line, line
    assert str(workspace / "prepared" / "classes.json") in line


def _affinity_dir(model_dir: Path) -> Path:
    cfg = AffinityNetParams(**tiny_params_dict()["train_aff"]["model"])
    meta = {"model": cfg.model_dump(mode="json"), "radius": 3, "stride": 4, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model_dir(model_dir, AffinityNet(**cfg.model_dump()), {**meta, "seed_map": "cam"})
    return model_dir


@pytest.mark.parametrize("damage", ["truncated_weights", "garbage_meta", "radius_missing"])
def test_damaged_affinity_model_is_one_model_error(tmp_path, damage):
    model_dir = _affinity_dir(tmp_path / "aff")
    weights, meta_path = model_dir / "model.safetensors", model_dir / "meta.json"
    if damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "garbage_meta":
        meta_path.write_bytes(b"\xff\xfe garbage")
    else:
        meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "radius"}))
    with pytest.raises(ModelError) as info:
        load_affinity_model(model_dir)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(model_dir) in message and "'train_aff'" in message, message


# --- checkpoints --------------------------------------------------------------------------------------------


def test_train_cls_with_an_empty_checkpoint_says_to_delete_it(workspace, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"")
    args = ["--data", workspace / "prepared", "--model-dir", tmp_path / "m", "--results", tmp_path / "r"]
    result = invoke("train_cls", "--params", workspace / "params.yaml", *args, "--checkpoint", checkpoint)
    line = one_error_line(result)
    assert str(checkpoint) in line and "delete" in line and "--checkpoint" in line, line
    assert not (tmp_path / "m").exists()


def _trainables() -> Trainables:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainables(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def _write_checkpoint(path: Path, kind: str) -> None:
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x80\x04 this is not a checkpoint" * 10)
    elif kind == "truncated":
        save_checkpoint(path, {"model": _trainables().model.state_dict(), "config_digest": "d", "epoch": 1})
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "old_format":
        save_checkpoint(path, {"model": _trainables().model.state_dict(), "epoch": 1})
    elif kind == "empty_dict":
        save_checkpoint(path, {})
    else:
        save_checkpoint(path, [1, 2, 3])


@pytest.mark.parametrize("kind", ["zero_bytes", "garbage", "truncated", "old_format", "empty_dict", "a_list"])
def test_unusable_checkpoint_is_one_line_saying_what_to_do(tmp_path, kind):
    path = tmp_path / "train_cls.pt"
    _write_checkpoint(path, kind)
    with pytest.raises(UserError) as info:
        resume(path, "d", _trainables())
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(path) in message and "delete it" in message and "--checkpoint" in message, message


# --- ground-truth masks -------------------------------------------------------------------------------------


def _masked_copy(workspace: Path, tmp_path: Path) -> tuple[PreparedDataset, Path]:
    source = workspace / "prepared"
    data = PreparedDataset.open(source)
    image_id = data.split("train")[0]
    prepared = tmp_path / "prepared"
    for path in source.rglob("*"):
        if path.is_file():
            (prepared / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (prepared / path.relative_to(source)).write_bytes(path.read_bytes())
    return PreparedDataset.open(prepared), prepared / "masks" / f"{image_id}.png"


def test_truncated_ground_truth_mask_is_one_line(workspace, tmp_path):
    data, mask = _masked_copy(workspace, tmp_path)
    mask.write_bytes(mask.read_bytes()[:60])
    line = one_error_line(run_cams(workspace, tmp_path, workspace / "cls", data=data.root))
    assert str(mask) in line and "'prepare'" in line, line


def test_out_of_range_ground_truth_mask_is_one_line(workspace, tmp_path):
    data, mask = _masked_copy(workspace, tmp_path)
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 40
    save_label_png(mask, values, data.palette)
    with pytest.raises(DatasetError) as info:
        data.load_mask(mask.stem)
    message = str(info.value)
    assert str(mask) in message and "40" in message and "'prepare'" in message, message


@pytest.mark.parametrize("name", ["classes.json", "cls_labels.json"])
def test_damaged_dataset_index_is_one_line(workspace, tmp_path, name):
    data, _ = _masked_copy(workspace, tmp_path)
    (data.root / name).write_text("{ not json")
    line = one_error_line(run_cams(workspace, tmp_path, workspace / "cls", data=data.root))
    assert str(data.root / name) in line and "'prepare'" in line, line


# --- params the code cannot build ---------------------------------------------------------------------------


def test_unknown_backbone_is_one_line_naming_the_key(workspace, tmp_path):
    params = write_params(tmp_path / "p.yaml", tiny_params_dict(model={"backbone": "no_such_backbone"}))
    args = ["--data", workspace / "prepared", "--model-dir", tmp_path / "m", "--results", tmp_path / "r"]
    line = one_error_line(invoke("train_cls", "--params", params, *args, "--checkpoint", tmp_path / "c.pt"))
    assert "model.backbone" in line and "no_such_backbone" in line, line


# --- predict ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """An untrained tiny segmentation model saved in the ``train_seg`` format."""
    model_dir = tmp_path_factory.mktemp("seg") / "model"
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
    save_segmenter(model, meta, model_dir)
    return model_dir


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("scale", ["nan", "inf", "-1"])
def test_predict_rejects_non_finite_scales(tmp_path, seg_model, image, scale):
    result = invoke("predict", image, "--out", tmp_path / "out", "--model-dir", seg_model, "--scales", scale)
    line = one_error_line(result)
    assert "--scales" in line and scale in line, line
    assert not (tmp_path / "out").exists()


def test_predict_out_naming_a_file(tmp_path, seg_model, image):
    out = tmp_path / "taken.txt"
    out.write_text("a file, not a folder")
    line = one_error_line(invoke("predict", image, "--out", out, "--model-dir", seg_model))
    assert str(out) in line and "--out" in line, line
    assert out.read_text() == "a file, not a folder"


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched to claim ``width`` x ``height`` (CRC fixed): a cheap huge header."""
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at 16: width, height, ...
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over the type and the 13 data bytes
    path.write_bytes(bytes(data))
    return path


def test_predict_skips_a_decompression_bomb_and_goes_on(tmp_path, seg_model):
    folder = tmp_path / "images"
    folder.mkdir()
    png_claiming(folder / "a_huge.png", 30000, 30000)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "b_small.png")
    result = invoke("predict", folder, "--out", tmp_path / "out", "--model-dir", seg_model)
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert (tmp_path / "out" / "b_small.png").is_file(), "the image after the huge one is still predicted"
    warned = [line for line in result.stderr.splitlines() if str(folder / "a_huge.png") in line]
    assert len(warned) == 1 and "30000x30000" in warned[0] and "--max-pixels" in warned[0], result.stderr
    assert error_lines(result.stderr)[-1] == "error: skipped 1 image(s) above --max-pixels 50000000 (see above)"


def test_predict_pixel_limit_is_an_option(tmp_path, seg_model):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(small)
    report = predict_images([small], tmp_path / "out", seg_model, device_name="cpu", max_pixels=99, on_error=print)
    assert report.written == [] and len(report.skipped) == 1 and str(small) in report.skipped[0]
    report = predict_images([small], tmp_path / "out", seg_model, device_name="cpu", max_pixels=100, on_error=print)
    assert report.written == [tmp_path / "out" / "small.png"] and report.skipped == []


@pytest.mark.parametrize(
    ("mode", "values", "suffix"),
    [
        ("I;16", np.array([[1000, 1400, 3000]], np.uint16), ".png"),
        ("I", np.array([[-5000, -3000, 5000]], np.int32), ".tif"),
        ("F", np.array([[0.0, 0.1, 0.5]], np.float32), ".tif"),
    ],
)
def test_high_bit_depth_images_are_rescaled_by_their_range(tmp_path, mode, values, suffix):
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    rgb = read_rgb(path)
    # (v - min) / (max - min) * 255: 0, 0.2 * 255 = 51, 255 -- not clipped to 255 or to 0
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 51, 255]] and (rgb == rgb[..., :1]).all()


def test_predict_rescales_a_16_bit_grey_image(tmp_path, seg_model, monkeypatch):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[40000, 40100, 40500, 41000]] * 4, np.uint16)).save(path)  # clipped: all white
    assert Image.open(path).mode == "I;16"
    seen = []
    monkeypatch.setattr("pipeline.predict.overlay", lambda image, *args: seen.append(image) or image)
    report = predict_images([path], tmp_path / "out", seg_model, device_name="cpu")
    assert report.written == [tmp_path / "out" / "deep.png"]
    # (v - 40000) / 1000 * 255: 0, 25.5 -> 26 (rounded), 127.5 -> 128, 255
    assert seen[0].shape == (4, 4, 3) and seen[0][0, :, 0].tolist() == [0, 26, 128, 255]


# --- OS errors, unexpected errors and --debug ---------------------------------------------------------------

OS_ERRORS = {  # the cause (strerror) and a hint
    errno.ENOSPC: ("No space left on device", "free some space"),
    errno.EROFS: ("Read-only file system", "writable folder"),
    errno.EACCES: ("Permission denied", "fix the permissions"),
    errno.EIO: ("Input/output error", "check the path, the disk"),
}


def _raise_os_error(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/data/out/shard-00001.npz")

    return fail


@pytest.mark.parametrize("code", sorted(OS_ERRORS))
def test_os_error_in_predict_is_one_line_exit_1(tmp_path, image, monkeypatch, code):
    monkeypatch.setattr("pipeline.predict.predict_images", _raise_os_error(code))
    line = one_error_line(invoke("predict", image, "--out", tmp_path / "out"), exit_code=1)
    cause, hint = OS_ERRORS[code]
    assert line.startswith(f"error: /data/out/shard-00001.npz: {cause} (") and hint in line, line


def test_os_error_in_a_stage_is_one_line_exit_1(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.prepare.prepare", _raise_os_error(errno.ENOSPC))
    line = one_error_line(invoke("prepare", "--params", workspace / "params.yaml", "--out", tmp_path), exit_code=1)
    assert line.startswith("error: /data/out/shard-00001.npz: No space left on device (the disk is full"), line


def test_unexpected_error_is_one_line_pointing_at_debug(tmp_path, image, monkeypatch):
    def fail(*args, **kwargs):
        raise EOFError  # click would turn a bare EOFError into "Aborted!"

    monkeypatch.setattr("pipeline.predict.predict_images", fail)
    line = one_error_line(invoke("predict", image, "--out", tmp_path / "out"), exit_code=1)
    assert "EOFError" in line and "--debug" in line and "WSSS_DEBUG=1" in line, line


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, image, monkeypatch):
    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("pipeline.predict.predict_images", fail)
    line = one_error_line(invoke("predict", image, "--out", tmp_path / "out"), exit_code=1)
    assert line.startswith("error: out of memory (OutOfMemoryError: CUDA out of memory.") and "batch size" in line


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(tmp_path, image, monkeypatch, how):
    monkeypatch.setattr("pipeline.predict.predict_images", _raise_os_error(errno.ENOSPC))
    args = ["predict", image, "--out", tmp_path / "out"]
    result = invoke("--debug", *args) if how == "option" else invoke(*args, env={"WSSS_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "in fail" in result.stderr, result.stderr
    assert error_lines(result.stderr)[-1].startswith("error: /data/out/shard-00001.npz: ")


def test_a_deliberate_exit_inside_the_wrapper_keeps_its_code(tmp_path, monkeypatch):
    # compare exits 1 after its report when some runs failed: that is not an unexpected error
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setattr("pipeline.compare.load_grid", lambda path: SimpleNamespace(variants={}))
    monkeypatch.setattr("pipeline.compare_run.run_grid", lambda grid, params, echo: ["v1/seed0"])
    monkeypatch.setattr("pipeline.compare_run.commit_of", lambda rev: "0" * 40)
    monkeypatch.setattr("pipeline.compare_run.dvc_json", lambda *args: {})
    monkeypatch.setattr("pipeline.compare.experiments", lambda shown: {})
    monkeypatch.setattr("pipeline.compare.collect", lambda grid, found, dvc_yaml: {})
    monkeypatch.setattr("pipeline.compare.write_report", lambda grid, values, out, context: "the table")
    result = invoke("compare", tmp_path / "grid.yaml", "--out", tmp_path / "out")
    assert result.exit_code == 1 and error_lines(result.stderr) == ["error: 1 run(s) failed: v1/seed0"], result.stderr


def test_every_command_runs_inside_the_error_wrapper():
    for command in app.registered_commands:
        source = inspect.getsource(command.callback)
        assert "with user_errors()" in source or "with stage_params(" in source, command.callback.__qualname__
