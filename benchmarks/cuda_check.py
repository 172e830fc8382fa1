"""CUDA check: every stage of a tiny rehearsal on one GPU, with each stage's wall time and peak GPU memory.

Takes a paper config (default ``configs/voc_paper.yaml``) and keeps its models, crop sizes, batch sizes, scales and
CRF settings, but runs one epoch on a few synthetic images (the generator, at ``--image-size`` px: no dataset or
download needed), with ``pretrained: none`` weights unless ``--pretrained`` (hubs may be unreachable). The stages
run in this process, in DAG order, with the command lines of ``dvc.yaml``, so ``torch.cuda`` peak statistics
can be read after each. Prints a Markdown table; exits with code 2 and one line when no CUDA device exists.

With ``--as-is`` it runs the config unchanged instead (``--params params.yaml --as-is``: the default synthetic
benchmark, the whole DAG on the GPU, as ``dvc repro`` would on that machine) and with ``--metrics-json FILE`` writes the
stages' metrics (``dvc.yaml``'s metric files) to one JSON file, to compare with the CPU run's.

Usage: python benchmarks/cuda_check.py [--params configs/coco_paper.yaml] [--images 32] [--image-size 448]
                                       [--workdir DIR] [--pretrained] [--as-is] [--metrics-json FILE]
                                       [--until STAGE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAINING = ("train_cls", "train_aff", "train_seg")
ON_DEVICE = (*TRAINING, "cams", "evaluate")
# the settings that may name a weights file, as key paths
WEIGHTS = (
    ("model", "pretrained"),
    ("model", "vit", "pretrained"),
    ("train_aff", "model", "pretrained"),
    ("train_seg", "encoder_weights"),
)


def no_cuda_reason() -> str | None:
    """Why CUDA cannot be used here, or ``None`` when a CUDA device is available."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device (no GPU, no driver, or none visible)"


def rehearsal_params(base: dict, images: int, image_size: int, device: str, pretrained: bool) -> dict:
    """The paper config ``base`` shrunk to a rehearsal: synthetic images, one epoch, every model stage on ``device``.

    Args:
        base: A complete params mapping (a paper config).
        images: Training images (at least the largest batch size).
        image_size: Side of the synthetic images.
        device: ``cuda`` (or ``cpu`` to try the script itself).
        pretrained: Keep the config's pretrained weights (needs network or a warm cache).

    Returns:
        A complete params mapping.
    """
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in base.items()}
    synthetic = {"num_train": images, "num_val": max(4, images // 4), "image_size": image_size}
    raw["data"] |= {"dataset": "synthetic", "synthetic": synthetic}
    for name in TRAINING:
        raw[name] |= {"epochs": 1, "warmup_epochs": 0.0, "batch_size": min(raw[name].get("batch_size", 16), images)}
    raw["train_seg"]["val_every"] = 1
    raw = on_device(raw, device)
    if not pretrained:
        raw["model"]["pretrained"] = "none"
        raw["train_aff"]["model"] = {**raw["train_aff"]["model"], "pretrained": "none"}
        raw["train_seg"]["encoder_weights"] = "none"
    return raw


def on_device(base: dict, device: str) -> dict:
    """``base`` with every model stage (training, CAMs, evaluation) on ``device``."""
    return base | {name: {**base[name], "device": device} for name in ON_DEVICE}


def anchored(base: dict, root: Path = REPO) -> dict:
    """``base`` with each weights file it names relative to ``root`` made absolute.

    Under DVC the stages run in the project's root, where ``weights/...`` is found; here they run in a work
    directory. ``none``, timm tags and absolute paths are left as they are.
    """
    raw = copy.deepcopy(base)
    for *sections, key in WEIGHTS:
        holder = raw
        for name in sections:
            holder = holder.get(name) or {}
        value = holder.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (root / value).is_file():
            holder[key] = str(root / value)
    return raw


def dvc_stages() -> dict[str, dict]:
    """The stages of ``dvc.yaml``, in DAG order."""
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_commands() -> dict[str, list[str]]:
    """Each DVC stage's command line from ``dvc.yaml`` (without the leading ``wsss``), in DAG order."""
    return {name: shlex.split(stage["cmd"])[1:] for name, stage in dvc_stages().items()}


def run_stages(
    params: Path, workdir: Path, cuda: bool = True, until: str | None = None
) -> list[tuple[str, float, float, float]]:
    """Run the stages in ``workdir``; return ``(stage, seconds, peak allocated, peak reserved)`` (bytes, 0 off CUDA).

    ``until`` names the last stage to run (default: every stage).

    Raises:
        SystemExit: With the stage's exit code when a stage fails.
    """
    import torch

    from stages.cli import app

    rows = []
    home = Path.cwd()
    os.chdir(workdir)
    try:
        for name, args in stage_commands().items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            code = app([*args, "--params", str(params)], standalone_mode=False)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            if code:
                raise SystemExit(f"cuda_check: stage {name} failed with exit code {code}")
            peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
            rows.append((name, seconds, *peaks))
            print(f"{name}: {seconds:.1f} s, peak {peaks[0] / 2**30:.2f} GiB allocated", file=sys.stderr, flush=True)
            if name == until:
                break
    finally:
        os.chdir(home)
    return rows


def metric_files() -> list[str]:
    """Every stage's metric files, as ``dvc.yaml`` names them (relative to the project's root)."""
    return [path for stage in dvc_stages().values() for entry in stage.get("metrics", []) for path in entry]


def read_metrics(workdir: Path) -> dict[str, dict]:
    """The metrics the stages run in ``workdir`` wrote: ``{path in dvc.yaml: its JSON}``."""
    return {name: json.loads((workdir / name).read_text()) for name in metric_files() if (workdir / name).is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "configs" / "voc_paper.yaml")
    parser.add_argument("--images", type=int, default=32, help="synthetic training images (>= the largest batch)")
    parser.add_argument("--image-size", type=int, default=448, help="side of the synthetic images (VOC: ~500)")
    parser.add_argument("--workdir", type=Path, help="keep the rehearsal here (default: a temporary directory)")
    parser.add_argument("--pretrained", action="store_true", help="keep the config's pretrained weights")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: try this script without a GPU")
    parser.add_argument("--as-is", action="store_true", help="run the config unchanged, not a one-epoch rehearsal")
    parser.add_argument("--metrics-json", type=Path, help="write the stages' metrics here, as one JSON file")
    parser.add_argument("--until", choices=list(dvc_stages()), help="the last stage to run (default: all)")
    args = parser.parse_args()
    reason = no_cuda_reason() if args.device == "cuda" else None
    if reason is not None:
        print(f"cuda_check: no CUDA device: {reason}. Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        raise SystemExit(2)

    import torch

    from pipeline.config import parse_params, read_yaml

    base = read_yaml(args.params)
    if args.as_is:
        raw = on_device(base, args.device)
    else:
        raw = rehearsal_params(base, args.images, args.image_size, args.device, args.pretrained)
    raw = anchored(raw)
    parse_params(raw, args.params)  # a bad rehearsal config fails here, in one line
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        params = workdir / "params.yaml"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        rows = run_stages(params, workdir, cuda=args.device == "cuda", until=args.until)
        if args.metrics_json is not None:
            args.metrics_json.write_text(json.dumps(read_metrics(workdir), indent=1))
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    size = f"{args.images} synthetic images of {args.image_size} px, one epoch"
    print(f"\n{name}, {args.params.name}: {'as configured' if args.as_is else size}\n")
    print("| stage | wall time | peak GPU memory allocated | reserved |")
    print("|---|---|---|---|")
    for stage, seconds, allocated, reserved in rows:
        print(f"| {stage} | {seconds:.1f} s | {allocated / 2**30:.2f} GiB | {reserved / 2**30:.2f} GiB |")
    print(f"| total | {sum(r[1] for r in rows):.1f} s | {max(r[2] for r in rows) / 2**30:.2f} GiB | |")


if __name__ == "__main__":
    main()
