"""``benchmarks/ensemble_screen.py``: members' params, averaged seeds on hand-made stores, the table, a tiny run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_params_dict, write_params

from pipeline.config import read_yaml
from pipeline.io import CamStore, CamWriter
from pipeline.metrics import threshold_grid

_SPEC = importlib.util.spec_from_file_location("ensemble_screen", REPO / "benchmarks" / "ensemble_screen.py")
screen = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(screen)


def test_budget_reads_epochs_by_members_and_rejects_anything_else() -> None:
    assert screen.budget("24x2") == (24, 2)
    assert screen.budget("48x1") == (48, 1)
    for text in ("24", "24x", "ax2", "24x2x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="EPOCHSxMEMBERS"):
            screen.budget(text)


def test_members_share_the_images_and_differ_in_the_training_seed() -> None:
    base = read_yaml(REPO / "params.yaml")
    first, second = (screen.member_params(base, 40, member, 24, "cpu", 2) for member in (0, 1))
    assert (first["seed"], second["seed"]) == (40, 1040)
    assert first["data"]["synthetic"]["seed"] == second["data"]["synthetic"]["seed"] == 40
    assert first["train_cls"] == base["train_cls"] | {"epochs": 24, "threads": 2, "device": "cpu"}
    assert first["cams"]["threads"] == 2 and first["train_seg"]["device"] == "cpu"
    assert base["data"]["synthetic"]["seed"] is None and base["train_cls"]["epochs"] == 48, "base left as it was"


def test_overrides_set_existing_dotted_keys_to_yaml_values() -> None:
    base = {"model": {"pretrained": "none", "swin": {"depths": [1, 1]}}, "seed": 0}
    pairs = [screen.override("model.pretrained=w.safetensors"), screen.override("model.swin.depths=[2, 2]")]
    assert screen.with_overrides(base, pairs) == {"model": {"pretrained": "w.safetensors", "swin": {"depths": [2, 2]}},
                                                  "seed": 0}  # fmt: skip
    assert base["model"]["pretrained"] == "none", "base left as it was"
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        screen.override("model.pretrained")
    for key in ("model.pretrianed=x", "seed.x=1", "nothing=1"):
        with pytest.raises(SystemExit, match="no such setting"):
            screen.with_overrides(base, [screen.override(key)])


def _store(path, background: list[list[float]], names: tuple[str, ...] = ("cam", "rcam")) -> CamStore:
    """One 2x2 image, classes background + 1; the class's map is 1 - background."""
    bg = np.array(background, np.float32)
    maps = np.stack([bg, 1 - bg]).astype(np.float16)  # (2, 2, 2)
    with CamWriter(path, 8, quantize=False, stride=1) as writer:
        writer.add("a", np.array([0, 1]), dict.fromkeys(names, maps))
    return CamStore(path)


def test_the_ensemble_averages_the_members_maps(tmp_path) -> None:
    gt = np.array([[0, 1], [0, 1]], np.uint8)
    data = SimpleNamespace(num_classes=2, load_mask=lambda image_id: gt)
    first = _store(tmp_path / "a", [[0.7, 0.4], [0.4, 0.4]])  # predicts [[0, 1], [1, 1]]
    second = _store(tmp_path / "b", [[0.4, 0.4], [0.9, 0.4]])  # predicts [[1, 1], [0, 1]]
    grid = threshold_grid(0.6, 0.1)
    (alone,), ensemble = screen.ensemble_scores([first], data, grid)
    assert ensemble == alone, "one member is its own ensemble"
    # background: 1 of 2 pixels found, no false one -> 1/2; class: 2 of 2 plus 1 false -> 2/3
    assert alone["rcam/miou_argmax"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert screen.ensemble_scores([second], data, grid)[1]["cam/miou_argmax"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    members, both = screen.ensemble_scores([first, second], data, grid)  # background [[.55, .4], [.65, .4]]: truth
    assert members[0] == alone and members[1]["rcam/miou_argmax"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert both["rcam/miou_argmax"] == pytest.approx(1.0) and both["cam/miou_best"] == pytest.approx(1.0)
    v1 = screen.ensemble_scores([_store(tmp_path / "v1", [[0.7, 0.4], [0.4, 0.4]], ("cam",))], data, grid)[1]
    assert v1.keys() == {"cam/miou_argmax", "cam/miou_best"}


def test_summary_table_gives_mean_and_std_of_members_and_ensembles() -> None:
    def row(instance: int, members: list[float], ensemble: float) -> dict:
        single = [{"cam/miou_argmax": v - 0.1, "rcam/miou_argmax": v} for v in members]
        return {"instance": instance, "epochs": 24, "budget_members": 2, "members": len(members),
                "val_map": [0.9] * len(members), "single": single,
                "ensemble": {"cam/miou_argmax": ensemble - 0.1, "rcam/miou_argmax": ensemble}}  # fmt: skip

    rows = [row(1, [0.6, 0.8], 0.7), row(2, [0.6, 0.8], 0.8), row(3, [0.5], 0.5)]  # instance 3 is incomplete
    lines = screen.summary_table(rows).splitlines()
    assert len(lines) == 3
    cells = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert cells[:3] == ["24x2", "2", "0.900 ± 0.000"]
    assert cells[4] == "0.700 ± 0.115"  # 0.6, 0.8, 0.6, 0.8
    assert cells[6] == "0.750 ± 0.071" and cells[7] == "1: 0.700, 2: 0.800"
    for one in rows:  # V1: no R-CAM
        for scores in (*one["single"], one["ensemble"]):
            del scores["rcam/miou_argmax"]
    cells = [cell.strip() for cell in screen.summary_table(rows).splitlines()[2].split("|")[1:-1]]
    assert cells[3:8] == ["0.600 ± 0.115", "", "0.650 ± 0.071", "", "1: 0.600, 2: 0.700"]


def test_a_bad_setting_stops_the_screen_in_one_line_before_any_run(tmp_path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "ensemble_screen.py"), "--instances", "1", "--device", "cpu"]
    command += ["--set", "train_cls.lr=-1", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 1 and line.startswith("ensemble_screen: "), result.stderr
    assert line.endswith("params.yaml: train_cls.lr = -1 is invalid: Input should be greater than 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_tiny_screen_runs_the_members_up_to_cams_and_scores_them(tmp_path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "ensemble_screen.py"), "--params", str(params)]
    command += ["--instances", "3", "--budgets", "2x2", "--jobs", "2", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 of 2 runs finished" in result.stderr and "| 2x2 | 1 |" in result.stdout
    (row,) = json.loads((out / "screen.json").read_text())
    assert (row["instance"], row["epochs"], row["members"]) == (3, 2, 2)
    assert row["single"][0] != row["single"][1], "the members' training seeds differ"
    assert (out / "i3-e2-m1" / "data" / "cams" / "index.json").is_file()
    assert not (out / "i3-e2-m1" / "results" / "train_aff").exists(), "--until cams stops there"
    log = out / "i3-e2-m1" / "log.txt"
    written = log.stat().st_mtime_ns
    again = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "2 of 2 runs finished" in again.stderr, again.stderr[-2000:]
    assert log.stat().st_mtime_ns == written, "a finished member with the same params is not run again"
    assert json.loads((out / "screen.json").read_text()) == [row]
