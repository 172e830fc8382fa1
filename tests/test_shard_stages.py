"""``cams``, ``refine`` and ``evaluate`` on 2 ranks (gloo on CPU) write what one process writes; ``train_aff``'s
label pass, shared out over 2 ranks, gives one process's labels.

Each stage runs once alone and once sharded over two processes, on the same inputs: ``cams`` and ``evaluate``
under ``torchrun --nproc_per_node 2``, ``refine`` through ``WSSS_NPROC_PER_NODE=2`` (the relaunch ``dvc repro``
uses). Outputs are compared byte for byte; the CAM shards by their arrays (a zip member carries its write time).
The batches (8 per ``cams`` batch, 4 per ``evaluate`` batch) fall so that rank 0 takes two and rank 1 one, the
CAM shards (6 images) cross the ranks' batches, and ``cams``'s val mAP (one batch) leaves rank 1 empty.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env, tiny_params_dict, write_params

from pipeline.config import Params
from pipeline.data.layout import PreparedDataset
from pipeline.models.deeplab import build_segmenter, save_segmenter
from pipeline.models.files import save_model_dir
from pipeline.models.swtformer import build_model
from pipeline.prepare import prepare
from pipeline.train_cls import _meta

pytestmark = pytest.mark.slow  # torchrun with two processes

SHARDED = {
    "data": {"synthetic": {"num_train": 20, "num_val": 10}},
    "cams": {"shard_size": 6},
    "refine": {"method": "crf", "workers": 1},
    "evaluate": {"crf_workers": 1},
}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def wsss(
    root: Path, *args: object, torchrun: bool = False, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if torchrun else (sys.executable,)
    command = [str(part) for part in (*launcher, "-m", "stages.cli", *args)]
    result = subprocess.run(command, cwd=root, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (dvclive's params.yaml left out: it logs how the stage ran)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "params.yaml"
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Prepared data, an untrained classifier and segmenter, a params file."""
    root = tmp_path_factory.mktemp("shard")
    raw = tiny_params_dict(**SHARDED)
    params = Params.model_validate(raw)
    prepare(params.data, params.seed, root / "prepared")
    data = PreparedDataset.open(root / "prepared")
    torch.manual_seed(0)
    config = {**params.model.model_dump(), "pretrained": "none"}
    classifier = build_model(data.num_classes - 1, params.train_cls.crop_size, **config)
    save_model_dir(root / "cls", classifier, _meta(params, data))
    segmenter = build_segmenter("deeplabv3plus", "tu-test_efficientnet", data.num_classes, decoder_channels=8)
    meta = {
        **{"arch": "deeplabv3plus", "encoder": "tu-test_efficientnet", "encoder_weights": "none"},
        **{"output_stride": 16, "decoder_channels": 8, "num_classes": data.num_classes},
        **{"class_names": data.class_names, "palette": data.palette},
        **{"mean": list(params.data.mean), "std": list(params.data.std)},
    }
    save_segmenter(segmenter, meta, root / "seg")
    write_params(root / "params.yaml", raw)
    return root


def cams_args(root: Path, name: str) -> list:
    return [
        "cams", "--params", root / "params.yaml", "--data", root / "prepared", "--model-dir", root / "cls",
        "--out", root / name / "cams", "--results", root / name / "results_cams",
    ]  # fmt: skip


def test_cams_on_two_ranks_writes_what_one_process_writes(workspace):
    wsss(workspace, *cams_args(workspace, "one"))
    result = wsss(workspace, *cams_args(workspace, "two"), torchrun=True)
    assert "sharded over 2 processes" in result.stderr
    assert files(workspace / "two/results_cams") == files(workspace / "one/results_cams")
    one, two = files(workspace / "one/cams"), files(workspace / "two/cams")
    assert two.keys() == one.keys() and two["index.json"] == one["index.json"]
    assert len(one) == 1 + 4  # index.json + 20 images in shards of 6
    for name in sorted(one.keys() - {"index.json"}):
        with np.load(workspace / "one/cams" / name) as a, np.load(workspace / "two/cams" / name) as b:
            assert a.files == b.files
            for key in a.files:
                assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), f"{name}: {key}"


def test_a_rank_that_fails_stops_the_launch_and_leaves_the_old_store(workspace):
    if not (workspace / "one/cams/index.json").is_file():
        wsss(workspace, *cams_args(workspace, "one"))
    bad = workspace / "bad"
    shutil.copytree(workspace / "prepared", bad / "prepared")
    shutil.copytree(workspace / "one/cams", bad / "cams")
    image = bad / "prepared/images/train_00010.png"  # in the second batch: rank 1's
    image.write_bytes(image.read_bytes()[:200])  # its header still reads, its pixels do not
    args = cams_args(workspace, "bad")
    args[args.index(workspace / "prepared")] = bad / "prepared"
    result = wsss(workspace, *args, torchrun=True, check=False)
    assert result.returncode != 0
    assert f"error: cannot read image {image}: image file is truncated" in result.stderr
    assert files(bad / "cams") == files(workspace / "one/cams")
    assert not list(bad.glob(".cams.*")), "no staging leftovers"


def refine_args(root: Path, name: str) -> list:
    return [
        "refine", "--params", root / "params.yaml", "--data", root / "prepared", "--cams", root / "one/cams",
        "--aff-dir", root / "no_aff", "--out", root / name / "pseudo", "--results", root / name / "results_refine",
    ]  # fmt: skip


def test_refine_under_nproc_setting_writes_what_one_process_writes(workspace):
    if not (workspace / "one/cams/index.json").is_file():
        wsss(workspace, *cams_args(workspace, "one"))
    wsss(workspace, *refine_args(workspace, "one"))
    result = wsss(workspace, *refine_args(workspace, "two"), WSSS_NPROC_PER_NODE="2")
    assert "sharded over 2 processes" in result.stderr
    one = files(workspace / "one/pseudo")
    assert len(one) == 20 and files(workspace / "two/pseudo") == one
    assert files(workspace / "two/results_refine") == files(workspace / "one/results_refine")
    assert not list(workspace.glob("two/.pseudo.*")), "no staging leftovers"


def evaluate_args(root: Path, name: str) -> list:
    return [
        "evaluate", "--params", root / "params.yaml", "--data", root / "prepared", "--model-dir", root / "seg",
        "--results", root / name / "results_evaluate",
    ]  # fmt: skip


def test_evaluate_on_two_ranks_writes_what_one_process_writes(workspace):
    wsss(workspace, *evaluate_args(workspace, "one"))
    wsss(workspace, *evaluate_args(workspace, "two"), torchrun=True)
    one = files(workspace / "one/results_evaluate")
    assert {"metrics.json", "confusion.json", "plots/images/gallery.png"} <= one.keys()
    assert files(workspace / "two/results_evaluate") == one


def test_train_aff_labels_on_two_ranks_are_one_process_labels(workspace):
    if not (workspace / "one/cams/index.json").is_file():
        wsss(workspace, *cams_args(workspace, "one"))
    params = write_params(workspace / "psa.yaml", tiny_params_dict(**{**SHARDED, "refine": {"method": "psa"}}))

    def train_aff(name: str, **launch) -> dict:
        out = workspace / name
        wsss(
            workspace, "train_aff", "--params", params, "--data", workspace / "prepared", "--cams",
            workspace / "one/cams", "--model-dir", out / "aff", "--results", out / "results_aff",
            "--checkpoint", out / "aff.pt", **launch,
        )  # fmt: skip
        assert not (out / "aff_labels").exists(), "the labels go with the checkpoint"
        return json.loads((out / "results_aff/metrics.json").read_text())["labels"]

    one, two = train_aff("one"), train_aff("two", torchrun=True)
    assert one == two and 0 < one["coverage"] <= 1  # 20 images' labels, 10 made by each rank
