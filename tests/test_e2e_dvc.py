"""End to end through DVC: ``dvc repro`` on tiny params, then the ``dvc exp run -S loss.ccl=false`` ablation."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, subprocess_env, tiny_params_dict, write_params

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train_cls", "cams", "train_aff", "refine")
SEED_KEYS = ("miou_argmax", "miou_best", "best_threshold")
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "wsss tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "wsss tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}


@dataclass
class Project:
    root: Path
    repro: subprocess.CompletedProcess | None = None
    exp_run: subprocess.CompletedProcess | None = None

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args),
            cwd=self.root,
            env=subprocess_env(**GIT_IDENTITY),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, timeout: float = 120) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout


def _dvc(*args: str) -> tuple[str, ...]:
    return (str(VENV_BIN / "dvc"), *args)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A fresh git + DVC repository holding the pipeline's code and DAG, reproduced once with tiny params."""
    root = tmp_path_factory.mktemp("dvc_project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_params(root / "params.yaml", tiny_params_dict())
    (root / ".gitignore").write_text("__pycache__/\n/checkpoints/\n")
    project = Project(root)
    project.ok("git", "init", "-q")
    project.ok("git", "config", "user.name", GIT_IDENTITY["GIT_AUTHOR_NAME"])
    project.ok("git", "config", "user.email", GIT_IDENTITY["GIT_AUTHOR_EMAIL"])
    project.ok(*_dvc("init", "-q"))
    project.ok("git", "add", "-A")
    project.ok("git", "commit", "-q", "-m", "pipeline")
    project.repro = project.run(*_dvc("repro"), timeout=400)
    if project.repro.returncode == 0:
        project.ok("git", "add", "-A")
        project.ok("git", "commit", "-q", "-m", "reproduce")
    return project


@pytest.fixture(scope="module")
def ablation(project) -> Project:
    """``dvc exp run -S loss.ccl=false`` on top of the reproduced baseline."""
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    project.exp_run = project.run(*_dvc("exp", "run", "-S", "loss.ccl=false"), timeout=400)
    return project


def test_repro_runs_every_stage(project):
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in project.repro.stdout
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # the lock records each stage's params; train_cls's must hold loss.ccl for the ablation to invalidate it
    assert lock["stages"]["train_cls"]["params"]["params.yaml"]["loss"]["ccl"] is True
    assert set(lock["stages"]["cams"]["params"]["params.yaml"]) == {"cams"}
    assert set(lock["stages"]["train_aff"]["params"]["params.yaml"]) == {"seed", "data", "train_aff"}
    assert set(lock["stages"]["refine"]["params"]["params.yaml"]) == {"refine"}
    for stage in STAGES:
        assert lock["stages"][stage]["outs"], stage


def test_reproduced_pipeline_is_up_to_date(project):
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    # a stage that wrote into its own deps or outside its outs would leave the pipeline changed
    assert json.loads(project.ok(*_dvc("status", "--json"))) == {}


def test_metrics_show_has_seed_miou(project):
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    shown = json.loads(project.ok(*_dvc("metrics", "show", "--json")))
    files = shown[""]["data"]
    cams = files["results/cams/metrics.json"]["data"]
    for kind in ("cam", "rcam"):
        for key in SEED_KEYS:
            assert 0 <= cams[kind][key] <= 1, (kind, key)
    assert 0 <= files["results/train_cls/metrics.json"]["data"]["val"]["map_classwise"] <= 1


def test_plots_render(project):
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    shown = json.loads(project.ok(*_dvc("plots", "show", "--json")))
    assert not shown.get("errors"), shown.get("errors")
    plots = shown["data"]
    for name in ("Classification loss", "Validation mAP", "results/cams/plots/custom/sweep_rcam.json"):
        assert plots[name][0]["type"] == "vega", name
    curves = plots["Validation mAP"][0]["content"]["data"]["values"]
    assert len(curves) == 2 * 2, "two curves (class-wise, sample-wise) of two epochs"
    sweep = plots["results/cams/plots/custom/sweep_cam.json"][0]["content"]["data"]["values"]
    assert len(sweep) == 61 and {"threshold", "miou"} <= set(sweep[0])
    images = [name for name in plots if name.startswith("results/cams/plots/images/")]
    assert len(images) == 2 and all(plots[name][0]["type"] == "image" for name in images)


def test_ablation_reruns_only_the_dependent_stages(ablation):
    output = ablation.exp_run.stdout + ablation.exp_run.stderr
    assert ablation.exp_run.returncode == 0, output
    assert "Stage 'prepare' didn't change, skipping" in output
    assert "Running stage 'prepare'" not in output
    assert "Running stage 'train_cls'" in output and "Running stage 'cams'" in output
    assert "Running stage 'train_aff'" in output and "Running stage 'refine'" in output, "new seeds, new labels"
    params = yaml.safe_load((ablation.root / "params.yaml").read_text())
    assert params["loss"]["ccl"] is False


def _experiments(shown: list[dict]) -> tuple[dict, list[dict]]:
    """The committed baseline and its experiments from ``dvc exp show --json``."""
    (baseline,) = [entry for entry in shown if entry["rev"] != "workspace"]
    runs = [rev for group in baseline.get("experiments") or [] for rev in group["revs"]]
    return baseline, runs


def test_exp_show_lists_baseline_and_ablation(ablation):
    assert ablation.exp_run.returncode == 0, ablation.exp_run.stdout + ablation.exp_run.stderr
    shown = json.loads(ablation.ok(*_dvc("exp", "show", "--json")))
    baseline, runs = _experiments(shown)
    assert len(runs) == 1, runs
    rows = {"baseline": baseline["data"], "ablation": runs[0]["data"]}
    ccl = {name: data["params"]["params.yaml"]["data"]["loss"]["ccl"] for name, data in rows.items()}
    assert ccl == {"baseline": True, "ablation": False}
    for data in rows.values():
        cams = data["metrics"]["results/cams/metrics.json"]["data"]
        for kind in ("cam", "rcam"):
            assert all(0 <= cams[kind][key] <= 1 for key in SEED_KEYS)
    losses = [d["metrics"]["results/train_cls/metrics.json"]["data"]["train"]["loss_total"] for d in rows.values()]
    assert losses[0] != losses[1], "switching CCL off must change the training loss"


def test_refine_method_change_reruns_only_refine(ablation):
    # runs after the ablation tests (file order): train_aff does not read `refine`, so it is not re-run
    assert ablation.exp_run.returncode == 0, ablation.exp_run.stdout + ablation.exp_run.stderr
    result = ablation.run(*_dvc("exp", "run", "-S", "refine.method=none"), timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Running stage 'refine'" in output
    for stage in ("prepare", "train_cls", "cams", "train_aff"):
        assert f"Running stage '{stage}'" not in output, stage
    metrics = json.loads((ablation.root / "results/refine/metrics.json").read_text())
    assert metrics["pseudo"]["miou"] == pytest.approx(metrics["seed"]["miou"], abs=1e-5), "none = the seeds"
