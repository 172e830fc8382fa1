"""``train_seg`` under ``torchrun --nproc_per_node 2`` (gloo on CPU): the global batch is split, rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import subprocess_env, tiny_params_dict, write_params

from pipeline.config import Params
from pipeline.data.layout import PreparedDataset
from pipeline.io import save_label_png
from pipeline.metrics import mean_iou
from pipeline.models.deeplab import load_segmenter
from pipeline.prepare import prepare
from pipeline.train_seg import split_confusion
from pipeline.training import warmup_decay

pytestmark = pytest.mark.slow  # torchrun with two processes

# 8 images, a global batch of 4 (2 per process), 1 epoch: two optimiser steps
DDP = {
    "data": {"synthetic": {"num_train": 8, "num_val": 40}},  # val: 3 batches of 16, shared by the 2 processes
    "train_seg": {
        "encoder": "tu-test_efficientnet",
        "decoder_channels": 8,
        "epochs": 1,
        "batch_size": 4,
        "crop_size": 32,
        "warmup_epochs": 0.0,
        "device": "cpu",
        "threads": 1,
    },
}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_ddp")
    raw = tiny_params_dict(**DDP)
    cfg = Params.model_validate(raw)
    prepare(cfg.data, cfg.seed, root / "prepared")
    data = PreparedDataset.open(root / "prepared")
    for image_id in data.split("train"):
        save_label_png(root / "pseudo" / f"{image_id}.png", data.load_mask(image_id), data.palette)
    params = write_params(root / "params.yaml", raw)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "stages.cli", "train_seg", "--params", params, "--data", root / "prepared"),
        *("--pseudo-labels", root / "pseudo", "--model-dir", root / "model"),
        *("--results", root / "results", "--checkpoint", root / "ckpt.pt"),
    ]
    result = subprocess.run(
        [str(part) for part in command], cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    return root, cfg, result


def test_torchrun_two_processes_train_and_only_rank_zero_writes(ddp_run):
    root, cfg, result = ddp_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("epoch 1/1:") == 1, output
    logged = yaml.safe_load((root / "results" / "params.yaml").read_text())
    assert logged["world_size"] == 2
    assert sorted(p.name for p in (root / "model").iterdir()) == ["meta.json", "model.safetensors"]
    assert not (root / "ckpt.pt").exists()
    # two optimiser steps of the global batch: the logged lr is the schedule's value after step 2 of 2
    _, row = (root / "results/plots/metrics/train/lr.tsv").read_text().splitlines()
    ts = cfg.train_seg
    assert float(row.split("\t")[-1]) == pytest.approx(ts.lr * warmup_decay(2, 2, 0, ts.schedule, ts.min_lr_ratio))


def test_a_batch_that_leaves_one_image_per_process_is_refused(ddp_run):
    root, _, _ = ddp_run
    raw = tiny_params_dict(**{**DDP, "train_seg": {**DDP["train_seg"], "batch_size": 2}})
    params = write_params(root / "params_batch2.yaml", raw)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "stages.cli", "train_seg", "--params", params, "--data", root / "prepared"),
        *("--pseudo-labels", root / "pseudo", "--model-dir", root / "model2", "--results", root / "results2"),
    ]
    result = subprocess.run(
        [str(part) for part in command], cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "train_seg.batch_size=2 must split into >= 2 images for each of 2 processes" in result.stderr
    assert not (root / "model2").exists()


def test_validation_shared_by_the_two_processes_equals_one_process(ddp_run):
    # each rank predicts half of val, rank 0 sums the confusions: the metrics of the saved model in one process
    root, cfg, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr
    model, _ = load_segmenter(root / "model", torch.device("cpu"))
    data = PreparedDataset.open(root / "prepared")
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    confusion = split_confusion(model, data, "val", mean, std, torch.device("cpu"), amp=False)
    logged = json.loads((root / "results/metrics.json").read_text())["val"]
    assert logged["miou"] == pytest.approx(mean_iou(confusion), abs=1e-6)
