"""End to end through DVC: ``dvc repro`` of the whole DAG on tiny params, then two ``dvc exp run`` ablations."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, copy_pipeline, subprocess_env, tiny_params_dict, write_params

pytestmark = pytest.mark.slow

STAGES = ("prepare", "train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate")
UPSTREAM_OF_REFINE = ("prepare", "train_cls", "cams")
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
    exp_run_refine: subprocess.CompletedProcess | None = None

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
    copy_pipeline(root)
    write_params(root / "params.yaml", tiny_params_dict())
    (root / ".gitignore").write_text("__pycache__/\n/checkpoints/\n")
    project = Project(root)
    project.ok("git", "init", "-q")
    project.ok("git", "config", "user.name", GIT_IDENTITY["GIT_AUTHOR_NAME"])
    project.ok("git", "config", "user.email", GIT_IDENTITY["GIT_AUTHOR_EMAIL"])
    project.ok(*_dvc("init", "-q"))
    project.ok("git", "add", "-A")
    project.ok("git", "commit", "-q", "-m", "pipeline")
    project.repro = project.run(*_dvc("repro"), timeout=600)
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


@pytest.fixture(scope="module")
def refine_ablation(ablation) -> Project:
    """``dvc exp run -S refine.method=none`` on top of the same baseline (after the CCL ablation)."""
    ablation.exp_run_refine = ablation.run(*_dvc("exp", "run", "-S", "refine.method=none"), timeout=400)
    return ablation


def test_repro_runs_every_stage(project):
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in project.repro.stdout
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    # the lock records each stage's params; train_cls's must hold loss.ccl for the ablation to invalidate it
    assert lock["stages"]["train_cls"]["params"]["params.yaml"]["loss"]["ccl"] is True
    assert set(lock["stages"]["cams"]["params"]["params.yaml"]) == {"cams"}
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
    images = sorted(name for name in plots if name.startswith("results/cams/plots/images/"))
    assert [name.rsplit("/", 1)[1] for name in images] == ["failures.png", "gallery.png"]
    assert all(plots[name][0]["type"] == "image" for name in images)
    ladder = [name for name in plots if name.startswith("results/evaluate/plots/images/ladder_")]
    assert len(ladder) == 2, "the ladder: the first images and the lowest-IoU ones"


def test_a_clone_shows_the_committed_metrics_and_pulls_the_rest_from_a_remote(project, tmp_path):
    # runs before the experiments below: the committed run is the baseline they are compared with
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    project.ok(*_dvc("remote", "add", "-d", "local", str(tmp_path / "remote")))
    project.ok("git", "commit", "-q", "-am", "a local DVC remote")
    project.ok(*_dvc("push"), timeout=300)
    metrics = json.loads(project.ok(*_dvc("metrics", "show", "--json")))[""]["data"]

    clone = Project(tmp_path / "clone")
    project.ok("git", "clone", "-q", str(project.root), str(clone.root))
    assert not (clone.root / "models/cls/model.safetensors").exists(), "models travel through the remote"
    shown = json.loads(clone.ok(*_dvc("metrics", "show", "--json")))[""]["data"]
    assert shown == metrics, "a fresh clone shows the committed metrics before any run or pull"
    assert (clone.root / "results/train_cls/plots/metrics/val/map_classwise.tsv").is_file(), "curves are in git"
    clone.ok(*_dvc("pull"), timeout=300)
    for model in ("cls", "aff", "seg"):
        pulled = (clone.root / f"models/{model}/model.safetensors").read_bytes()
        assert pulled == (project.root / f"models/{model}/model.safetensors").read_bytes(), model
    assert json.loads(clone.ok(*_dvc("status", "--json"))) == {}, "the pulled clone is up to date"


def test_ablation_reruns_only_the_dependent_stages(ablation):
    output = ablation.exp_run.stdout + ablation.exp_run.stderr
    assert ablation.exp_run.returncode == 0, output
    assert "Stage 'prepare' didn't change, skipping" in output
    assert "Running stage 'prepare'" not in output
    assert "Running stage 'train_cls'" in output and "Running stage 'cams'" in output
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


def test_refine_ablation_reruns_refine_and_downstream_only(refine_ablation):
    result = refine_ablation.exp_run_refine
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for stage in UPSTREAM_OF_REFINE:
        assert f"Running stage '{stage}'" not in output, stage
    # train_aff depends on refine.method alone of the refine section: it runs, and trains nothing for `none`
    assert "Running stage 'train_aff'" in output and "nothing to train" in output
    for stage in ("refine", "train_seg", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    shown = json.loads(refine_ablation.ok(*_dvc("exp", "show", "--json")))
    _, runs = _experiments(shown)
    methods = {run["data"]["params"]["params.yaml"]["data"]["refine"]["method"] for run in runs}
    assert methods == {"psa_crf", "none"}
    for run in runs:
        assert 0 <= run["data"]["metrics"]["results/evaluate/metrics.json"]["data"]["single_scale"]["miou"] <= 1


def test_compare_runs_a_grid_of_variants_and_seeds(refine_ablation, tmp_path):
    project = refine_ablation
    project.ok("git", "checkout", "--", ".")  # the ablations left their params in the workspace
    baseline = json.loads((project.root / "results/train_cls/metrics.json").read_text())
    grid = tmp_path / "grid.yaml"
    metrics = ["train_cls/train/loss_total", "cams/cam/miou_best"]
    variants = {"ccl": {}, "sweep": {"cams.sweep.max": 0.3}, "noccl": {"loss.ccl": False}}
    spec = {"name": "tiny", "target": "cams", "targets": {"noccl": "train_cls"}, "seeds": [0, 1]}
    grid.write_text(yaml.safe_dump({**spec, "variants": variants, "metrics": metrics}, sort_keys=False))
    command = (str(VENV_BIN / "wsss"), "compare", str(grid), "--out", str(tmp_path / "out"))

    result = project.run(*command, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    runs: dict[str, str] = {}  # run name -> what was printed between its "[k/6] <name>:" lines
    for chunk in re.split(r"^\[\d/6\] ", output, flags=re.MULTILINE):
        runs[chunk.split(":", 1)[0]] = runs.get(chunk.split(":", 1)[0], "") + chunk
    for seed in (0, 1):
        assert "Running stage 'train_cls'" not in runs[f"tiny-sweep-s{seed}"], "sweep re-uses ccl's classifier"
        assert "Running stage 'cams'" in runs[f"tiny-sweep-s{seed}"]
    assert "Running stage 'train_cls'" in runs["tiny-noccl-s0"] and "Running stage 'train_cls'" in runs["tiny-ccl-s1"]
    table = (tmp_path / "out/tiny.md").read_text()
    assert table.startswith("| variant | overrides | train_cls/train/loss_total |") and "(n=" not in table
    assert "| noccl | `loss.ccl=false` | " in table and table.splitlines()[4].endswith(" | - |"), "noccl: no cams"
    values = json.loads((tmp_path / "out/tiny.json").read_text())["values"]
    losses = values["ccl"]["train_cls/train/loss_total"]
    assert losses[0] == baseline["train"]["loss_total"], "seed 0 with the committed params is the committed run"
    assert losses[0] != losses[1], "seed 1 is another run"
    assert values["sweep"]["train_cls/train/loss_total"] == losses, "the same classifier, not trained again"
    assert values["noccl"]["train_cls/train/loss_total"][0] != losses[0], "the override reached the run"
    names = {run["name"] for run in _experiments(json.loads(project.ok(*_dvc("exp", "show", "--json"))))[1]}
    assert {f"tiny-{v}-s{s}" for v in variants for s in (0, 1)} <= names, "the runs are the project's experiments"

    again = project.run(*command, timeout=120)  # a grid resumes: nothing runs twice
    assert again.returncode == 0 and again.stdout.count("already run, kept") == 6, again.stdout + again.stderr


def test_the_documented_wegformer_set_runs_end_to_end(project):
    """docs/wegformer.md's `dvc exp run -S ...` set, read from the doc, runs every stage and is listed."""
    assert project.repro.returncode == 0, project.repro.stdout + project.repro.stderr
    project.ok("git", "checkout", "--", ".")  # earlier experiments left their params in the workspace
    doc = (REPO / "docs/wegformer.md").read_text()
    block = doc.split("### The WegFormer pipeline end to end", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    words = block.replace("\\\n", " ").split()
    assert words[:5] == ["dvc", "exp", "run", "-n", "wegformer"], block
    sets = [words[k + 1] for k, word in enumerate(words) if word == "-S"]
    assert "model.arch=deit" in sets and "refine.wegformer.epom=true" in sets
    overrides = [arg for value in sets for arg in ("-S", value)]
    result = project.run(*_dvc("exp", "run", "-n", "wegformer-doc", *overrides), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for stage in STAGES[1:]:
        assert f"Running stage '{stage}'" in output, stage
    _, runs = _experiments(json.loads(project.ok(*_dvc("exp", "show", "--json"))))
    (run,) = [run for run in runs if run.get("name") == "wegformer-doc"]
    params = run["data"]["params"]["params.yaml"]["data"]
    assert params["model"]["arch"] == "deit" and params["refine"]["wegformer"]["soft_erase"] == 0.55
    cams = run["data"]["metrics"]["results/cams/metrics.json"]["data"]
    assert 0 <= cams["relevance"]["miou_best"] <= 1, "the relevance maps were made and scored"
    assert 0 <= run["data"]["metrics"]["results/evaluate/metrics.json"]["data"]["single_scale"]["miou"] <= 1


def test_the_documented_aream_switch_reruns_train_cls_not_prepare(project):
    """docs/classifier.md's DeiT + AReAM line: train_cls and what follows run, prepare does not; it is listed."""
    project.ok("git", "checkout", "--", ".")  # earlier experiments left their params in the workspace
    doc = (REPO / "docs/classifier.md").read_text()
    (line,) = [line for line in doc.splitlines() if line.startswith("dvc exp run -S model.arch=deit -S loss.aream")]
    words = line.split("#", 1)[0].split()
    assert words == ["dvc", "exp", "run", "-S", "model.arch=deit", "-S", "loss.aream.enabled=true"], line
    tiny = ["-S", "loss.aream.warmup_epochs=0"]  # the tiny params train 2 epochs: the loss from the first one
    result = project.run(*_dvc("exp", "run", "-n", "aream-doc", *words[3:], *tiny), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Running stage 'prepare'" not in output
    for stage in ("train_cls", "cams", "refine", "train_seg", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    _, runs = _experiments(json.loads(project.ok(*_dvc("exp", "show", "--json"))))
    (run,) = [run for run in runs if run.get("name") == "aream-doc"]
    params = run["data"]["params"]["params.yaml"]["data"]
    assert params["model"]["arch"] == "deit" and params["loss"]["aream"]["enabled"] is True
    metrics = run["data"]["metrics"]
    assert "loss_aff" in metrics["results/train_cls/metrics.json"]["data"]["train"], "the affinity loss trained"
    assert 0 <= metrics["results/cams/metrics.json"]["data"]["aream"]["miou_best"] <= 1, "the re-activated map"
