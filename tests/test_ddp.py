"""``train_cls`` under ``torchrun --nproc_per_node 2`` (gloo on CPU): two optimiser steps, one set of artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env, tiny_params_dict, write_params
from torch.utils.data import DataLoader

from pipeline.config import Params
from pipeline.data.datasets import ClassificationEvalSet
from pipeline.data.layout import PreparedDataset
from pipeline.metrics import classification_map
from pipeline.models.swtformer import classifier_scores, load_classifier
from pipeline.prepare import prepare
from pipeline.training import warmup_decay

pytestmark = pytest.mark.slow  # torchrun with two processes

# 4 images, a global batch of 4 (2 per process), 2 epochs: one optimiser step per epoch, two in all; val's 12 images
# make 3 batches of 4: rank 0 scores two, rank 1 one
DDP = {
    "data": {"synthetic": {"num_train": 4, "num_val": 12}},
    "train_cls": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0.0, "device": "cpu", "threads": 1},
}


def torchrun(root: Path, params: Path, prepared: Path) -> subprocess.CompletedProcess:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "stages.cli", "train_cls", "--params", params, "--data", prepared),
        *("--model-dir", root / "model", "--results", root / "results", "--checkpoint", root / "ckpt.pt"),
    ]
    return subprocess.run(
        [str(part) for part in command],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    raw = tiny_params_dict(**DDP)
    cfg = Params.model_validate(raw)
    prepare(cfg.data, cfg.seed, root / "prepared")
    params = write_params(root / "params.yaml", raw)
    return root, cfg, torchrun(root, params, root / "prepared")


def test_torchrun_two_processes_succeed(ddp_run):
    root, _, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr
    logged = yaml.safe_load((root / "results" / "params.yaml").read_text())
    assert logged["world_size"] == 2 and logged["device"] == "cpu"


def test_only_rank_zero_writes(ddp_run):
    root, _, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    # rank 0 alone logs epochs and writes artifacts; a second writer would log every epoch twice
    assert output.count("epoch 1/2:") == 1 and output.count("epoch 2/2:") == 1, output
    assert sorted(p.name for p in (root / "model").iterdir()) == ["meta.json", "model.safetensors"]
    assert not (root / "ckpt.pt").exists()
    assert not list(root.rglob(".*.tmp")) and not list(root.rglob(".ckpt.pt.*"))


def test_exactly_two_optimiser_steps(ddp_run):
    root, cfg, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr
    # the learning rate after each epoch is the schedule's value after step 1 and step 2 of 2
    header, *rows = (root / "results/plots/metrics/train/lr.tsv").read_text().splitlines()
    lrs = [float(row.split("\t")[-1]) for row in rows]
    tc = cfg.train_cls
    expected = [tc.lr * warmup_decay(step, 2, 0, tc.schedule, tc.min_lr_ratio) for step in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert expected[0] > expected[1] * 10, "the two values must tell one step from two"
    metrics = json.loads((root / "results" / "metrics.json").read_text())
    assert 0 <= metrics["val"]["map_classwise"] <= 1
    assert metrics["train"]["loss_total"] > 0


def test_val_map_shared_by_the_two_processes_equals_one_process(ddp_run):
    root, cfg, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr
    model, meta = load_classifier(root / "model", torch.device("cpu"))
    data = PreparedDataset.open(root / "prepared")
    valset = ClassificationEvalSet(data, "val", meta["img_size"], meta["mean"], meta["std"])
    batches = DataLoader(valset, cfg.train_cls.batch_size)
    one_process = classification_map(*classifier_scores(model, batches, torch.device("cpu"), amp=False))
    logged = json.loads((root / "results" / "metrics.json").read_text())["val"]
    assert logged == pytest.approx(one_process, abs=1e-6) and len(valset) == 12
