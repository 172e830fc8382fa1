"""The projection arithmetic of ``benchmarks/full_run_cost.py`` on hand-made measurements (nothing is timed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from pipeline.config import load_params, parse_params, read_yaml
from stages.cli import STAGES

_SPEC = importlib.util.spec_from_file_location("full_run_cost", REPO / "benchmarks" / "full_run_cost.py")
cost = importlib.util.module_from_spec(_SPEC)
sys.modules["full_run_cost"] = cost  # dataclasses look their module up
_SPEC.loader.exec_module(cost)

MEASURED = {
    "baseline_rss_bytes": 100.0,
    "decode_s": 0.01,
    "cls_sample_s": 0.02,
    "seg_sample_s": 0.03,
    "aff_sample_s": 0.01,
    "prepare_s": 0.004,
    "mask_png_bytes": 2_000.0,
    "cls_step_s": 3.0,
    "cls_step_flops": 6e12,
    "cls_params": 30e6,
    "train_cls_rss_bytes": 1_000.0,
    "cams_forward_s": 5.0,
    "cams_forward_flops": 4e12,
    "seed_eval_s": 0.02,
    "shard_write_s": 0.05,
    "shard_bytes": 1e6,
    "shard_raw_bytes": 2e6,
    "cams_rss_bytes": 2_000.0,
    "aff_labels_s": 0.6,
    "aff_step_s": 8.0,
    "aff_step_flops": 3e12,
    "aff_params": 25e6,
    "train_aff_rss_bytes": 3_000.0,
    "refine_s": 1.5,
    "png_write_s": 0.002,
    "pseudo_png_bytes": 3_000.0,
    "refine_rss_bytes": 500.0,
    "seg_step_img_s": 4.0,
    "seg_step_img_flops": 5e11,
    "seg_val_s": 1.0,
    "seg_val_flops": 1e11,
    "seg_params": 60e6,
    "train_seg_rss_bytes": 4_000.0,
    "eval_forward_s": 10.0,
    "eval_forward_flops": 1e12,
    "eval_crf_s": 1.8,
    "eval_crf_present_s": 0.6,
    "eval_probs_bytes": 16e6,
    "evaluate_rss_bytes": 5_000.0,
}


@pytest.fixture(scope="module")
def voc():
    return cost.DATASETS["voc"], load_params(REPO / "configs" / "voc_paper.yaml")


def stage(costs, name):
    return next(s for s in costs if s.stage == name)


def test_val_passes_and_loader_bound():
    assert cost.val_passes(46, 5) == 10 and cost.val_passes(45, 5) == 9 and cost.val_passes(12, 0) == 1
    cpu, gpu = cost.Machine("cpu", 2), cost.Machine("gpu", 16, 1e12, 2e12)
    assert cost.loader_bound(cpu, 3.0, 0.4, 8) == pytest.approx(3.2)  # loaders share the 2 cores
    assert cost.loader_bound(gpu, 3.0, 0.4, 8) == 3.0  # hidden behind the step
    assert cost.loader_bound(gpu, 0.01, 0.4, 8) == pytest.approx(0.05)  # loader-bound: 8 workers
    assert cost.loader_bound(gpu, 0.01, 0.4, 0) == pytest.approx(0.41)  # no loaders: in turn
    assert cost.model_seconds(cpu, 5.0, 1e12, train=True) == 5.0
    assert cost.model_seconds(gpu, 5.0, 1e12, train=False) == pytest.approx(0.5)


def test_projection_on_two_cpu_cores(voc):
    spec, params = voc
    costs = cost.project(spec, params, MEASURED, cost.Machine("cpu", 2), absent_kept=0.5)
    assert [s.stage for s in costs] == ["prepare", "train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate"]
    assert stage(costs, "prepare").seconds == pytest.approx(12_031 * 0.004 / 2)
    steps = 30 * (10_582 // 16)
    val = 30 * 1_449 * (3.0 / 48 + 0.02 / 2)
    assert stage(costs, "train_cls").seconds == pytest.approx(steps * (3.0 + 16 * 0.02 / 2) + val)
    # seeds for train_aug, scored on the 1,464 train images only; the store's writer thread adds up on a CPU
    cams = stage(costs, "cams")
    assert cams.seconds == pytest.approx(10_582 * (5.0 + 0.01 + 0.05) + 1_464 * (0.02 + 0.01 / 4))
    assert cams.out_bytes == pytest.approx(10_582 * 1e6)
    assert cams.memory_bytes == pytest.approx(2_000 + 500 * 2e6)
    aff = stage(costs, "train_aff")
    assert aff.seconds == pytest.approx(10_582 * 0.6 / 2 + 5 * (10_582 // 8) * (8.0 + 8 * 0.01 / 2))  # 8 loaders
    assert aff.memory_bytes == 2 * (100 + 8 * 21 * 500 * 375), "2 label processes; the labels are files"
    assert stage(costs, "refine").seconds == pytest.approx(10_582 * 1.5 / 2)
    seg = stage(costs, "train_seg").seconds
    assert seg == pytest.approx(46 * 661 * (16 * 4.0 + 16 * 0.03 / 2) + 10 * 1_449 * (1.0 + 0.01))
    # a CRF on the image's labels (0.6 s) and half the others (absent_kept 0.5 of the 1.2 s they add)
    assert stage(costs, "evaluate").seconds == pytest.approx(1_449 * (10.0 + 0.01) + 1_449 * (0.6 + 0.6) / 2)


def test_projection_on_a_gpu_uses_flops_and_16_cores(voc):
    spec, params = voc
    gpu = cost.Machine("gpu", 16, 1e13, 2e13)
    costs = cost.project(spec, params, MEASURED, gpu, absent_kept=0.0)
    cams = stage(costs, "cams")  # the writer thread (0.05 s per image) keeps up with the main thread (0.21 s)
    assert cams.seconds == pytest.approx(10_582 * (4e12 / 2e13 + 0.01) + 1_464 * (0.02 + 0.01 / 4))
    slow_writer = cost.project(spec, params, {**MEASURED, "shard_write_s": 0.5}, gpu)
    assert stage(slow_writer, "cams").seconds == pytest.approx(10_582 * 0.5)
    # the CRF workers (15 of them, the image's labels only) overlap the forwards; the slower of the two counts
    forward = 1_449 * (1e12 / 2e13 + 0.01)
    assert stage(costs, "evaluate").seconds == pytest.approx(max(forward, 1_449 * 0.6 / 15))
    assert stage(costs, "refine").seconds == pytest.approx(10_582 * 1.5 / 16)


def test_disk_counts_dvc_cache_twice_and_the_largest_checkpoint(voc):
    spec, params = voc
    costs = cost.project(spec, params, MEASURED, cost.Machine("cpu", 2))
    disk = cost.disk_summary(spec, params, MEASURED, costs)
    outs = sum(s.out_bytes for s in costs)
    assert disk["dvc_cache"] == outs
    assert disk["checkpoint"] == pytest.approx(4 * 60e6 * 2)  # DeepLab + SGD momentum
    assert disk["total"] == pytest.approx(2.1e9 + 2 * outs + 4 * 60e6 * 2)


def test_cuda_check_exits_with_one_line_without_cuda(tmp_path):
    # no GPU in CI: the script must say so and stop before any work (the CUDA path itself needs a GPU to test)
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--workdir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cuda_check: no CUDA device: "), result.stderr
    assert not (tmp_path / "run").exists(), "nothing was run"


def test_cuda_checks_script_stops_with_one_line_without_cuda(tmp_path):
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")  # python3 is the venv's
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "cuda_checks.sh"), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().startswith("cuda_checks: no CUDA device: ") and len(result.stderr.splitlines()) == 1
    assert not list((tmp_path / "out").iterdir()), "no check ran"


def _cuda_check():
    spec = importlib.util.spec_from_file_location("cuda_check", REPO / "benchmarks" / "cuda_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


def test_cuda_check_as_is_moves_only_the_devices():
    base = read_yaml(REPO / "params.yaml")
    raw = _cuda_check().on_device(base, "cuda")
    changed = {name for name in raw if raw[name] != base[name]}
    assert changed == {"train_cls", "train_aff", "train_seg", "cams", "evaluate"}
    assert raw["train_cls"] == base["train_cls"] | {"device": "cuda"}
    assert base["train_cls"]["device"] == "auto", "the config read is left as it was"


def test_cuda_check_anchors_the_projects_weights_files(tmp_path):
    """The stages run in a work directory: ``weights/...`` of the project becomes absolute, nothing else moves."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.safetensors").write_bytes(b"")
    base = {
        "model": {"pretrained": "weights/w.safetensors", "vit": {"pretrained": "deit_small_patch16_224.fb_in1k"}},
        "train_aff": {"model": {"pretrained": "weights/absent.safetensors"}},
        "train_seg": {"encoder_weights": "none"},
    }
    raw = _cuda_check().anchored(base, tmp_path)
    assert raw["model"]["pretrained"] == str(tmp_path / "weights" / "w.safetensors")
    assert raw["model"]["vit"] == base["model"]["vit"] and raw["train_aff"] == base["train_aff"]
    assert raw["train_seg"] == base["train_seg"] and base["model"]["pretrained"] == "weights/w.safetensors"
    assert _cuda_check().anchored({"seed": 0}) == {"seed": 0}, "absent sections are not made"


def test_cuda_check_reads_every_stages_metrics(tmp_path):
    check = _cuda_check()
    names = check.metric_files()
    assert names == [f"results/{stage}/metrics.json" for stage in STAGES if stage not in ("prepare", "predict")]
    for index, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_text(f'{{"value": {index}}}')
    assert check.read_metrics(tmp_path) == {name: {"value": index} for index, name in enumerate(names)}


def test_cuda_check_rehearsal_params_validate():
    check = _cuda_check()
    for name in ("voc_paper.yaml", "coco_paper.yaml"):
        raw = check.rehearsal_params(read_yaml(REPO / "configs" / name), 32, 448, "cuda", pretrained=False)
        params = parse_params(raw)
        assert params.train_cls.epochs == params.train_aff.epochs == params.train_seg.epochs == 1
        weights = {params.model.pretrained, params.train_aff.model.pretrained, params.train_seg.encoder_weights}
        assert weights == {"none"}
        assert params.train_seg.encoder == "resnet101" and params.train_cls.crop_size == 224, "the paper's models"
        assert {params.train_cls.device, params.cams.device, params.evaluate.device} == {"cuda"}
    assert list(check.stage_commands()) == list(STAGES)
