"""A ``train_cls`` run killed after its first epoch resumes from its checkpoint and ends bit-identical."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env, tiny_params_dict, write_params
from safetensors.torch import load_file

from pipeline.config import Params, TrainClsParams
from pipeline.prepare import prepare

pytestmark = pytest.mark.slow  # trains in a subprocess, kills it and resumes

EPOCHS = 3
# 96 images in batches of 8: 12 steps per epoch, long enough (about a second) that polling every 20 ms sees
# the epoch-1 checkpoint well before the epoch-2 one replaces it
RESUME = {
    "data": {"synthetic": {"num_train": 96, "num_val": 8}},
    "train_cls": {"epochs": EPOCHS, "batch_size": 8, "warmup_epochs": 0.5, "threads": 1},
}
TIMEOUT = 300


@dataclass
class Run:
    """One ``wsss train_cls`` process and where it writes."""

    root: Path
    proc: subprocess.Popen
    log: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "ckpt.pt"

    @property
    def model(self) -> Path:
        return self.root / "model" / "model.safetensors"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def output(self) -> str:
        return self.log.read_text()


def start(params: Path, prepared: Path, root: Path, checkpoint: Path | None = None) -> Run:
    """Start ``wsss train_cls`` in the background; output goes to ``root/<n>.log``."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"run{len(list(root.glob('run*.log')))}.log"
    args = [
        *("--params", params, "--data", prepared, "--model-dir", root / "model", "--results", root / "results"),
        *("--checkpoint", checkpoint or root / "ckpt.pt"),
    ]
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.cli", "train_cls", *map(str, args)],
            cwd=root,
            env=subprocess_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    return Run(root, proc, log)


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch recorded in a checkpoint, or ``None`` if there is none yet."""
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def kill_after_first_epoch(run: Run) -> int | None:
    """Poll the checkpoint every 20 ms; SIGKILL the run as soon as it records epoch 1. Returns the epoch seen."""
    deadline = time.monotonic() + TIMEOUT
    seen, stamp = None, None
    while time.monotonic() < deadline and run.proc.poll() is None:
        stat = run.checkpoint.stat() if run.checkpoint.exists() else None
        if stat is not None and (stat.st_mtime_ns, stat.st_ino) != stamp:
            stamp = (stat.st_mtime_ns, stat.st_ino)
            seen = checkpoint_epoch(run.checkpoint)
            if seen is not None and seen >= 1:
                run.proc.send_signal(signal.SIGKILL)
                run.proc.wait(timeout=30)
                return seen
        time.sleep(0.02)
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait(timeout=30)
    return seen


@dataclass
class Scenario:
    reference: Run
    killed: Run
    epoch_seen: int | None
    killed_returncode: int | None
    epoch_after_kill: int | None
    model_after_kill: bool
    resumed: Run
    resumed_returncode: int
    other: Run
    other_returncode: int
    uncached: Run
    uncached_returncode: int


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Iterator[Scenario]:
    """An uninterrupted run, a run killed after epoch 1 and resumed, and a run with another config."""
    root = tmp_path_factory.mktemp("resume")
    raw = tiny_params_dict(**RESUME)
    cfg = Params.model_validate(raw)
    prepared = root / "prepared"
    prepare(cfg.data, cfg.seed, prepared)
    params = write_params(root / "params.yaml", raw)

    # the reference runs beside the run that gets killed (results do not depend on timing)
    started: list[Run] = []
    try:
        yield _play(root, prepared, params, started)
    finally:
        for run in started:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait(timeout=30)


def _play(root: Path, prepared: Path, params: Path, started: list[Run]) -> Scenario:
    reference = start(params, prepared, root / "reference")
    killed = start(params, prepared, root / "interrupted")
    started += [reference, killed]
    epoch_seen = kill_after_first_epoch(killed)
    epoch_after_kill = checkpoint_epoch(killed.checkpoint)
    model_after_kill = killed.model.exists()
    killed_returncode = killed.proc.returncode
    assert epoch_after_kill is not None, f"no checkpoint was written; output:\n{killed.output()}"

    # the same epoch-1 checkpoint, offered to a run whose configuration differs in one value
    other_dir = root / "other_config"
    other_dir.mkdir()
    (other_dir / "ckpt.pt").write_bytes(killed.checkpoint.read_bytes())
    other_lr = TrainClsParams().lr / 2  # another configuration than the killed run's (default) one
    other_raw = tiny_params_dict(data=RESUME["data"], train_cls={**RESUME["train_cls"], "lr": other_lr})
    other_params = write_params(other_dir / "params.yaml", other_raw)

    uncached_raw = tiny_params_dict(data=RESUME["data"], train_cls={**RESUME["train_cls"], "cache_images": False})
    uncached_params = write_params(root / "uncached.yaml", uncached_raw)

    resumed = start(params, prepared, root / "interrupted")
    other = start(other_params, prepared, other_dir)
    uncached = start(uncached_params, prepared, root / "uncached")
    started += [resumed, other, uncached]
    return Scenario(
        reference=reference,
        killed=killed,
        epoch_seen=epoch_seen,
        killed_returncode=killed_returncode,
        epoch_after_kill=epoch_after_kill,
        model_after_kill=model_after_kill,
        resumed=resumed,
        resumed_returncode=resumed.wait(),
        other=other,
        other_returncode=other.wait(),
        uncached=uncached,
        uncached_returncode=uncached.wait(),
    )


def test_kill_lands_after_first_epoch(scenario):
    assert scenario.killed_returncode == -signal.SIGKILL, "the run must be killed, not finish on its own"
    assert scenario.epoch_seen == 1
    assert scenario.epoch_after_kill == 1
    assert not scenario.model_after_kill, "no final model may exist before training completes"


def test_resumed_run_matches_uninterrupted_run(scenario):
    assert scenario.reference.wait() == 0, scenario.reference.output()
    assert scenario.resumed_returncode == 0, scenario.resumed.output()
    assert "resuming from" in scenario.resumed.output() and "at epoch 1" in scenario.resumed.output()
    reference, resumed = load_file(str(scenario.reference.model)), load_file(str(scenario.resumed.model))
    assert reference.keys() == resumed.keys() and len(reference) > 10
    different = [name for name in reference if not torch.equal(reference[name], resumed[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert not scenario.resumed.checkpoint.exists(), "the checkpoint is deleted once training completes"


def test_image_cache_does_not_change_training(scenario):
    assert scenario.reference.wait() == 0, scenario.reference.output()
    assert scenario.uncached_returncode == 0, scenario.uncached.output()
    cached, uncached = load_file(str(scenario.reference.model)), load_file(str(scenario.uncached.model))
    assert all(torch.equal(cached[name], uncached[name]) for name in cached)


def _tsv_values(path: Path) -> list[tuple[str, str]]:
    """(step, value) rows of a dvclive .tsv (the timestamp column differs between runs)."""
    header, *rows = path.read_text().splitlines()
    columns = header.split("\t")
    step, value = columns.index("step"), len(columns) - 1
    return [(row.split("\t")[step], row.split("\t")[value]) for row in rows]


@pytest.mark.parametrize("curve", ["val/map_classwise", "train/loss_total", "train/lr"])
def test_resumed_run_history_covers_every_epoch(scenario, curve):
    assert scenario.resumed_returncode == 0, scenario.resumed.output()
    assert scenario.reference.wait() == 0, scenario.reference.output()
    path = f"plots/metrics/{curve}.tsv"
    resumed = _tsv_values(scenario.resumed.results / path)
    assert [step for step, _ in resumed] == [str(s) for s in range(EPOCHS)]
    assert resumed == _tsv_values(scenario.reference.results / path)
    logged = yaml.safe_load((scenario.resumed.results / "params.yaml").read_text())
    assert logged["resumed_at_epoch"] == 1


def test_checkpoint_of_another_config_is_not_resumed(scenario):
    output = scenario.other.output()
    assert scenario.other_returncode == 0, output
    assert "another configuration; starting fresh" in output
    assert "resuming from" not in output
    assert f"epoch 1/{EPOCHS}" in output, "training must start again at the first epoch"
    logged = yaml.safe_load((scenario.other.results / "params.yaml").read_text())
    assert logged["resumed_at_epoch"] == 0
    assert len(_tsv_values(scenario.other.results / "plots/metrics/val/map_classwise.tsv")) == EPOCHS
    assert scenario.other.model.is_file()
