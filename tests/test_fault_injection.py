"""Fault injection: SIGKILL a stage at chosen commits, then check that what is on disk is old or new, never a mix.

For each stage that writes an output a later stage reads, a run with changed params is killed (``WSSS_FAULT_KILL_AT``)
at its first commit, at the swap of its output and at the commit after it. After every kill the output must be
byte-identical to the old complete one or to the new complete one (from an undisturbed run of a copy), and the
reader of the next stage must accept it; a hand re-run then completes and leaves no hidden leftovers. A full file
system ends with one line and no litter.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_params_dict, write_params
from typer.testing import CliRunner

from pipeline.data.layout import PreparedDataset
from pipeline.models.swtformer import load_classifier
from pipeline.outputs import FAULT_ENV, FAULT_LOG_ENV
from pipeline.refinement.seeds import open_cam_store
from stages.cli import app

pytestmark = pytest.mark.slow  # Python subprocesses, each importing torch


def args_of(stage: str, root: Path) -> list[str | Path]:
    """Each stage's input/output options inside ``root`` (the params file is ``root/params*.yaml``)."""
    return {
        "prepare": ["--out", root / "prepared"],
        "train_cls": ["--data", root / "prepared", "--model-dir", root / "cls", "--results", root / "results/cls",
                      "--checkpoint", root / "cls.pt"],
        "cams": ["--data", root / "prepared", "--model-dir", root / "cls", "--out", root / "cams",
                 "--results", root / "results/cams"],
        "refine": ["--data", root / "prepared", "--cams", root / "cams", "--aff-dir", root / "aff",
                   "--out", root / "pseudo", "--results", root / "results/pseudo"],
    }[stage]  # fmt: skip


def snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (hidden ones too)."""
    files = (p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def check_prepared(path: Path) -> None:
    data = PreparedDataset.open(path)
    for image_id in data.split("train") + data.split("val"):
        data.load_image(image_id)
        data.load_mask(image_id)


def check_cams(path: Path) -> None:
    store = open_cam_store(path)
    for image_id in store.ids:
        assert store.load(image_id)["cam"].ndim == 3
    assert {p.name for p in path.glob("*.npz")} == set(store._index.values())


def check_pseudo(path: Path) -> None:
    assert {p.stem for p in path.glob("*.png")} == set(open_cam_store(path.parent / "cams").ids)


def check_classifier(path: Path) -> None:
    load_classifier(path, torch.device("cpu"))


CASES: dict[str, tuple[str, dict, Callable[[Path], None]]] = {
    # stage: (output folder, what the new run changes, the next stage's reader)
    "prepare": ("prepared", {"seed": 1}, check_prepared),
    "train_cls": ("cls", {"seed": 1, "train_cls": {"epochs": 1}}, check_classifier),
    "cams": ("cams", {"cams": {"shard_size": 3, "scales": [1.0]}}, check_cams),
    "refine": ("pseudo", {"refine": {"method": "crf", "bg_threshold": 0.3}}, check_pseudo),
}
PARAMS = {"refine": {"method": "crf"}}  # no AffinityNet: train_aff has its own resume tests


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """prepare -> train_cls -> cams -> refine on tiny params (the "old" outputs); returns the root."""
    root = tmp_path_factory.mktemp("faults")
    params = write_params(root / "params.yaml", tiny_params_dict(**PARAMS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in ("prepare", "train_cls", "cams", "refine"):
            result = CliRunner().invoke(app, [stage, "--params", str(params), *map(str, args_of(stage, root))])
            assert result.exit_code == 0, result.output
    return root


def run_stage(stage: str, root: Path, **env: str) -> subprocess.CompletedProcess:
    return run_cli(stage, "--params", root / "params_new.yaml", *args_of(stage, root), cwd=root, **env)


@pytest.mark.parametrize("stage", list(CASES))
def test_a_killed_stage_leaves_the_old_or_the_new_output(old_run, tmp_path, stage):
    folder, change, check = CASES[stage]
    write_params(old_run / "params_new.yaml", tiny_params_dict(**{**PARAMS, **change}))
    scratch = tmp_path / "scratch"
    shutil.copytree(old_run, scratch)
    log = tmp_path / "commits.log"
    done = run_stage(stage, scratch, **{FAULT_LOG_ENV: str(log)})
    assert done.returncode == 0, done.stderr
    commits = log.read_text().splitlines()
    swap = commits.index(str(scratch / folder)) + 1  # 1-based, as WSSS_FAULT_KILL_AT counts
    new, old = snapshot(scratch / folder), snapshot(old_run / folder)
    assert new != old
    backup = tmp_path / "backup"
    shutil.copytree(old_run / folder, backup)
    for kill_at in sorted({1, swap, min(swap + 1, len(commits))}):
        shutil.rmtree(old_run / folder)
        shutil.copytree(backup, old_run / folder)
        (old_run / "cls.pt").unlink(missing_ok=True)  # a checkpoint from the last kill would change the commits
        killed = run_stage(stage, old_run, **{FAULT_ENV: str(kill_at)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert snapshot(old_run / folder) == (old if kill_at <= swap else new), f"killed at commit {kill_at}"
        check(old_run / folder)
    done = run_stage(stage, old_run)  # the hand re-run after the last kill
    assert done.returncode == 0, done.stderr
    assert snapshot(old_run / folder) == new
    assert not [p.name for p in old_run.rglob(".*") if not p.name.startswith(".dvc")]
    shutil.rmtree(old_run / folder)
    shutil.copytree(backup, old_run / folder)  # the next case starts from the old outputs again


HOLD = """
import sys, time
from pipeline.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_the_same_output_is_refused_while_the_first_lives(old_run):
    before = snapshot(old_run / "cams")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(old_run / "cams")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        params = str(old_run / "params.yaml")
        result = CliRunner().invoke(app, ["cams", "--params", params, *map(str, args_of("cams", old_run))])
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"pid {holder.pid}" in lines[0] and "another run" in lines[0]
    assert snapshot(old_run / "cams") == before


def test_a_full_file_system_ends_with_one_line_and_no_litter(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        params = write_params(tmp_path / "params.yaml", tiny_params_dict())
        done = run_cli("prepare", "--params", params, "--out", disk / "prepared", cwd=tmp_path)
        lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line]
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "No space left" in lines[0] and "Traceback" not in done.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
