"""``pipeline.compare``: grid files, experiment commands, reading ``dvc exp show --json``, mean +- std, reports."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from conftest import REPO

from pipeline.compare import (
    Grid,
    collect,
    experiments,
    format_value,
    load_grid,
    markdown_table,
    metric_value,
    require_runs,
    stages_up_to,
    summarise,
    write_report,
)
from pipeline.compare_run import commit_of, exp_run_command, param_value, run_order, run_overrides
from pipeline.errors import ConfigError

GRID = Grid(
    name="ccl",
    target="cams",
    seeds=(0, 1),
    variants={"on": {}, "off": {"loss.ccl": False, "cams.scales": [1.0, 0.5]}},
    metrics=("train_cls/val/map_classwise", "cams/rcam/miou_argmax"),
)


def run(name: str, map_classwise: float, rcam: float) -> dict:
    """One experiment as ``dvc exp show --json`` lists it."""
    metrics = {
        "results/train_cls/metrics.json": {"data": {"val": {"map_classwise": map_classwise}}},
        "results/cams/metrics.json": {"data": {"rcam": {"miou_argmax": rcam}}},
    }
    return {"rev": f"sha-{name}", "name": name, "data": {"metrics": metrics, "params": {}}}


SHOWN = [
    {"rev": "workspace", "data": {}},
    {
        "rev": "abc123",
        "data": {},
        "experiments": [
            {"revs": [run("ccl-on-s0", 0.8, 0.5)]},
            {"revs": [run("ccl-on-s1", 0.6, 0.7)]},
            {"revs": [run("ccl-off-s0", 0.5, 0.4)]},
            {"revs": [{"rev": "sha-unnamed", "data": {"metrics": {}}}]},
        ],
    },
]


def test_grid_file_round_trip_and_one_line_errors(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID.model_dump(mode="json")))
    assert load_grid(path) == GRID
    path.write_text("name: a-b\nseeds: [0]\nvariants: {x: {}}\nmetrics: [cams/cam/miou_best]\n")
    with pytest.raises(ConfigError, match=r"grid.yaml: name: String should match pattern") as info:
        load_grid(path)
    assert "\n" not in str(info.value)
    path.write_text("name: a\nseeds: []\nvariants: {x: {}}\nmetrics: [cams/cam/miou_best]\n")
    with pytest.raises(ConfigError, match="seeds"):
        load_grid(path)
    with pytest.raises(ConfigError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


PARAMS = {"seed": 0, "loss": {"ccl": True}, "cams": {"scales": [1.0], "sweep": {"max": 0.6}}}

# a DAG shaped like the project's: a -> b -> c, and d beside c (reads a's and b's outs)
DVC_YAML = {
    "stages": {
        "a": {"outs": ["data/a"]},
        "b": {"deps": ["data/a"], "outs": ["models/b", {"results/b/plots": {"cache": False}}]},
        "c": {"deps": ["data/a", "models/b/model.safetensors"], "metrics": [{"results/c/metrics.json": {}}]},
        "d": {"deps": ["data/a", "models/b"], "outs": ["data/d"]},
    }
}


def test_exp_run_command_sets_the_seed_then_every_key_any_variant_sets():
    assert exp_run_command(GRID, "off", 1, PARAMS) == [
        *("dvc", "exp", "run", "-n", "ccl-off-s1"),
        *("-S", "seed=1", "-S", "loss.ccl=false", "-S", "cams.scales=[1.0, 0.5]"),
        "cams",
    ]
    # "on" overrides nothing, but the previous run in the workspace may have been "off": undo it
    assert exp_run_command(GRID, "on", 0, PARAMS) == [
        *("dvc", "exp", "run", "-n", "ccl-on-s0"),
        *("-S", "seed=0", "-S", "loss.ccl=true", "-S", "cams.scales=[1.0]"),
        "cams",
    ]
    whole_dag = GRID.model_copy(update={"target": None, "targets": {"off": "train_cls"}})
    assert exp_run_command(whole_dag, "on", 0, PARAMS)[-1] == "cams.scales=[1.0]"
    assert exp_run_command(whole_dag, "off", 0, PARAMS)[-1] == "train_cls"


def test_overrides_need_a_committed_value():
    assert param_value(PARAMS, "cams.sweep.max") == 0.6
    with pytest.raises(ConfigError, match="'cams.sweep.min' is not in params.yaml"):
        param_value(PARAMS, "cams.sweep.min")
    with pytest.raises(ConfigError, match="'loss.ccl.x' is not in params.yaml"):
        param_value(PARAMS, "loss.ccl.x")
    grid = GRID.model_copy(update={"variants": {"on": {}, "off": {"loss.gsc": False}}})
    with pytest.raises(ConfigError, match="loss.gsc"):
        run_overrides(grid, "on", 0, PARAMS)


def test_runs_go_seed_by_seed():
    assert run_order(GRID) == [(0, "on"), (0, "off"), (1, "on"), (1, "off")]


def test_stages_up_to_follow_deps_into_outs():
    assert stages_up_to(DVC_YAML, "a") == {"a"}
    assert stages_up_to(DVC_YAML, "c") == {"a", "b", "c"}, "a dep inside an out"
    assert stages_up_to(DVC_YAML, "d") == {"a", "b", "d"}
    assert stages_up_to(DVC_YAML, None) == {"a", "b", "c", "d"}
    with pytest.raises(ConfigError, match="target 'e' is not a stage"):
        stages_up_to(DVC_YAML, "e")


def test_the_project_dag_up_to_refine():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert stages_up_to(dvc_yaml, "refine") == {"prepare", "train_cls", "cams", "train_aff", "refine"}
    assert stages_up_to(dvc_yaml, "evaluate") == set(dvc_yaml["stages"])


def test_a_target_must_name_a_variant(tmp_path):
    path = tmp_path / "grid.yaml"
    spec = {**GRID.model_dump(mode="json"), "targets": {"of": "train_cls"}}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="targets: of is not a variant"):
        load_grid(path)


def test_values_are_written_as_yaml_reads_them():
    assert [format_value(v) for v in (True, 0.001, 3, "cam", [1, 2], None)] == [
        "true",
        "0.001",
        "3",
        "cam",
        "[1, 2]",
        "null",
    ]
    assert yaml.safe_load(format_value([1.0, 0.5])) == [1.0, 0.5]


def test_experiments_are_found_by_name_and_metrics_by_path():
    found = experiments(SHOWN)
    assert set(found) == {"ccl-on-s0", "ccl-on-s1", "ccl-off-s0"}
    assert metric_value(found["ccl-on-s1"], "cams/rcam/miou_argmax") == 0.7
    assert math.isnan(metric_value(found["ccl-on-s1"], "cams/rcam/no_such_key"))
    assert math.isnan(metric_value({}, "refine/pseudo/miou"))


CAMS_DAG = {"stages": {"train_cls": {"outs": ["models/cls"]}, "cams": {"deps": ["models/cls"]}}}


def test_collect_marks_missing_runs_nan():
    values = collect(GRID, experiments(SHOWN), CAMS_DAG)
    assert values["on"]["train_cls/val/map_classwise"] == [0.8, 0.6]
    off = values["off"]["cams/rcam/miou_argmax"]
    assert off[0] == 0.4 and math.isnan(off[1]), "ccl-off-s1 never ran"


def test_collect_ignores_metrics_of_stages_a_variant_did_not_run():
    grid = GRID.model_copy(update={"targets": {"off": "train_cls"}})
    values = collect(grid, experiments(SHOWN), CAMS_DAG)
    assert values["off"]["train_cls/val/map_classwise"][0] == 0.5
    assert math.isnan(values["off"]["cams/rcam/miou_argmax"][0]), "the workspace's cams metrics are older"
    assert values["on"]["cams/rcam/miou_argmax"] == [0.5, 0.7]


def test_summarise_mean_and_sample_std():
    mean, std, n = summarise([0.8, 0.6])
    assert (round(mean, 12), round(std, 12), n) == (0.7, round(math.sqrt(0.02), 12), 2)
    assert summarise([0.4, float("nan")]) == (0.4, 0.0, 1)
    mean, std, n = summarise([float("nan")])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_markdown_table():
    table = markdown_table(GRID, collect(GRID, experiments(SHOWN), CAMS_DAG), "commit abc")
    assert table.splitlines() == [
        "| variant | overrides | train_cls/val/map_classwise | cams/rcam/miou_argmax |",
        "|---|---|---|---|",
        "| on | - | 0.700 ± 0.141 | 0.600 ± 0.141 |",
        "| off | `loss.ccl=false`, `cams.scales=[1.0, 0.5]` | 0.500 (n=1) | 0.400 (n=1) |",
        "",
        "Mean ± sample std over seeds 0, 1; commit abc.",
    ]


def test_a_one_seed_table_shows_values_without_a_spread():
    grid = GRID.model_copy(update={"seeds": (0,)})
    table = markdown_table(grid, collect(grid, experiments(SHOWN), CAMS_DAG))
    assert table.splitlines()[2:] == [
        "| on | - | 0.800 | 0.500 |",
        "| off | `loss.ccl=false`, `cams.scales=[1.0, 0.5]` | 0.500 | 0.400 |",
        "",
        "One run, seed 0.",
    ]


def test_require_runs_stops_only_when_no_run_of_the_grid_is_there():
    require_runs(GRID, experiments(SHOWN), "abc123" * 7)  # one of four missing: reported as n=1
    with pytest.raises(ConfigError, match=r"no experiment of grid 'ccl' \(ccl-on-s0, ...\) on commit abc123abc123: "):
        require_runs(GRID, {"other-on-s0": {}}, "abc123" * 7)


def test_collect_only_without_the_grids_runs_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(CAMS_DAG))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID.model_dump(mode="json"), sort_keys=False))
    monkeypatch.setattr("pipeline.compare_run.commit_of", lambda rev: "f" * 40)
    monkeypatch.setattr("pipeline.compare_run.dvc_json", lambda *args: [{"rev": "f" * 40, "data": {}}])
    result = CliRunner().invoke(app, ["compare", "grid.yaml", "--collect-only", "--out", "out"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "error: no experiment of grid 'ccl' (ccl-on-s0, ...) on commit ffffffffffff: give --rev the commit they ran "
        "on, or run the grid (without --collect-only); nothing was written"
    ]
    assert not (tmp_path / "out").exists()


def test_write_report_writes_the_table_the_values_and_a_plot(tmp_path):
    values = collect(GRID, experiments(SHOWN), CAMS_DAG)
    table = write_report(GRID, values, tmp_path / "out", {"commit": "abc", "cpu_cores": 2})
    assert table.splitlines()[-1] == "Mean ± sample std over seeds 0, 1; commit abc, cpu_cores 2."
    assert (tmp_path / "out/ccl.md").read_text() == table
    record = json.loads((tmp_path / "out/ccl.json").read_text())
    assert record["values"]["on"]["cams/rcam/miou_argmax"] == [0.5, 0.7]
    assert record["grid"]["variants"]["off"] == {"loss.ccl": False, "cams.scales": [1.0, 0.5]}
    assert record["context"] == {"commit": "abc", "cpu_cores": 2}
    assert (tmp_path / "out/ccl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path", sorted((REPO / "configs/compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_grids_name_metrics_the_committed_run_has(path):
    grid = load_grid(path)
    assert grid.name == path.stem
    committed = {"metrics": {}}
    for metrics in (REPO / "results").glob("*/metrics.json"):
        committed["metrics"][metrics.relative_to(REPO).as_posix()] = {"data": json.loads(metrics.read_text())}
    assert committed["metrics"], "the reference run's metrics are committed (results/*/metrics.json)"
    for metric in grid.metrics:
        if metric.split("/")[1] in ("aream", "relevance"):  # maps only the variants' classifiers write
            continue
        assert not math.isnan(metric_value(committed, metric)), f"{path.name}: no metric {metric}"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for variant in grid.variants:
        run_overrides(grid, variant, 0, params)  # every overridden key has a committed value


def test_commit_of_names_a_commit_or_says_it_is_not_one(monkeypatch):
    monkeypatch.chdir(REPO)
    assert re.fullmatch(r"[0-9a-f]{40}", commit_of("HEAD"))
    with pytest.raises(ConfigError, match="'no-such-rev' is not a commit"):
        commit_of("no-such-rev")


def test_the_report_is_of_the_commit_the_runs_started_on(tmp_path, monkeypatch):
    # a commit made while the grid runs moves HEAD: the runs are still the starting commit's experiments
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    head, shown_revs = ["a" * 40], []

    def run_grid_while_someone_commits(grid, params, echo):
        head[0] = "b" * 40
        return []

    monkeypatch.setattr("pipeline.compare.load_grid", lambda path: SimpleNamespace(variants={}))
    monkeypatch.setattr("pipeline.compare_run.commit_of", lambda rev: head[0])
    monkeypatch.setattr("pipeline.compare_run.run_grid", run_grid_while_someone_commits)
    monkeypatch.setattr("pipeline.compare_run.run_context", lambda commit: {"commit": commit[:12]})
    monkeypatch.setattr("pipeline.compare_run.dvc_json", lambda *args: shown_revs.append(args[-1]) or {})
    monkeypatch.setattr("pipeline.compare.experiments", lambda shown: {})
    monkeypatch.setattr("pipeline.compare.collect", lambda grid, found, dvc_yaml: {})
    monkeypatch.setattr("pipeline.compare.write_report", lambda grid, values, out, context: str(context))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert shown_revs == ["a" * 40] and "aaaaaaaaaaaa" in result.output
