"""The paper configs rehearsed end to end: ``dvc repro`` of each on a small stand-in of its dataset.

Each config is copied as it is into a fresh DVC project; only what a rehearsal may change is changed: ``data.root``
(the stand-in), ``data.subset``, the epochs (1; a warm-up of a whole epoch or more becomes half an epoch, since
warm-up must be shorter than training) and the pretrained weights (``none``: the hubs are unreachable here). The
model, resolutions, crop sizes and label counts stay the paper's, so this catches what a user would hit first on
the real data: a missing section, a shape error at 500 x 375 or 640 x 480, a NaN. The batches are cut to the subset
(:func:`pipeline.training.rehearsal_batch`): the paper's batch of 16 at 512 px needs about 13.5 GB on a CPU, more
than CI can spare, and far more time than the few images that show a config runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, VENV_BIN, copy_pipeline, subprocess_env

from pipeline.config import Params, parse_params
from pipeline.data.standin import write_standin

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate")
TRAINING = ("train_cls", "train_aff", "train_seg")
SUBSET = 2  # every split: the batches of the training stages are cut to it (a rehearsal; train_seg needs 2)
# Stand-ins with the real split proportions: VOC 20 images -> train 2 / val 2 / train_aug 18 (train_seg trains on
# train: 2 for batch norm); COCO 4 -> train 3 / val 1 (COCO's evaluate, 81 labels at 640 x 480, is the slow stage).
IMAGES = {"voc": 20, "coco": 4}
REPRO_TIMEOUT = 1500


def rehearsal_params(config: Path, root: Path) -> dict[str, Any]:
    """A paper config with only the rehearsal's changes: data root and subset, one epoch, no pretrained weights."""
    raw = yaml.safe_load(config.read_text())
    raw["data"]["root"] = str(root)
    raw["data"]["subset"] = SUBSET
    for section in TRAINING:
        raw[section]["epochs"] = 1
        default = Params.model_fields[section].annotation.model_fields["warmup_epochs"].default
        if raw[section].get("warmup_epochs", default) >= 1:
            raw[section]["warmup_epochs"] = 0.5
    raw["model"]["pretrained"] = "none"
    raw["train_aff"].setdefault("model", {})["pretrained"] = "none"
    raw["train_seg"]["encoder_weights"] = "none"
    return raw


def finite_numbers(value: Any, where: str = "") -> list[str]:
    """The keys of every number in a JSON value that is not finite (or not a number where one is expected)."""
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in finite_numbers(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [bad for index, item in enumerate(value) for bad in finite_numbers(item, f"{where}[{index}]")]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return [where]
    return []


def make_project(root: Path, params: dict[str, Any]) -> None:
    """A DVC project (no git) holding the pipeline's code, its DAG and ``params``."""
    copy_pipeline(root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "dvc"), *args],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("name", ["voc_paper.yaml", "coco_paper.yaml"])
def test_paper_config_runs_every_stage_on_a_standin(name, tmp_path):
    dataset = name.split("_")[0]
    counts = write_standin(dataset, tmp_path / "raw", IMAGES[dataset], seed=0)
    assert min(counts["train"], counts["train_aug"]) >= SUBSET
    params = rehearsal_params(REPO / "configs" / name, tmp_path / "raw")
    parse_params(params, name)  # the rehearsal's changes keep the config valid
    project = tmp_path / "project"
    make_project(project, params)
    assert dvc(project, "init", "--no-scm", "-q").returncode == 0
    started = time.perf_counter()
    result = dvc(project, "repro", timeout=REPRO_TIMEOUT)
    elapsed = time.perf_counter() - started
    print(f"\n{name}: dvc repro on {IMAGES[dataset]} stand-in images, subset {SUBSET}: {elapsed:.0f} s")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout, stage
    for split in ("train", "train_aug", "val"):
        ids = (project / "data" / "prepared" / "splits" / f"{split}.txt").read_text().split()
        assert len(ids) == min(SUBSET, counts[split]), (split, len(ids))
    for stage in STAGES[1:]:
        path = project / "results" / stage / "metrics.json"
        assert path.is_file(), f"{stage} wrote no metrics.json"
        metrics = json.loads(path.read_text())
        assert metrics and not finite_numbers(metrics), f"{stage}: non-finite metrics {finite_numbers(metrics)}"
