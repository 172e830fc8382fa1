"""Sharded inference: ``cams``, ``refine`` and ``evaluate`` in one process against N ranks of ``torchrun``.

One run, same inputs: each stage runs as ``wsss <stage>`` in one process, then under
``torchrun --standalone --nproc_per_node N``, with the same resources per process (1 thread, pool workers 1), so
the N ranks use N cores where the one process uses one. Times are the whole command's wall time (start-up
included: what a user waits for). ``refine`` reads the CAMs of the one-process ``cams`` run.

Prints each stage's two times and their ratio (target >= 1.6 with 2 ranks on 2 idle cores), and whether the two
runs wrote the same ``metrics.json``; exits with 1 if one differs.

Needs a prepared dataset and the models: after ``dvc repro train_seg`` the defaults point at them. On the 96 px
benchmark a stage's work is seconds, so start-up (torch's import, torchrun's rendezvous) and rank 0's share of
writing weigh on the ratio; ``--voc N`` measures at VOC's size instead: it writes a VOC stand-in of N images
(``wsss standin voc``, 500 x 375), prepares its first ``--subset`` images per split, trains the config's models
on them for one epoch (the times do not depend on the weights; ``train_seg`` on the pseudo labels of the
one-process ``refine``) and runs ``cams`` on ``train_aug``, ``refine`` on its CAMs and ``evaluate`` on ``val``.
``--batch`` sets ``cams.batch_size`` and ``evaluate.batch_size`` (default: the config's).

Usage: python benchmarks/shard_speedup.py [--params params.yaml] [--nproc 2] [--data data/prepared]
       [--cls models/cls] [--aff models/aff] [--seg models/seg] [--voc N] [--subset 64] [--batch B]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PER_PROCESS = {"cams": {"threads": 1}, "refine": {"workers": 1}, "evaluate": {"threads": 1, "crf_workers": 1}}


def stage_args(stage: str, args: argparse.Namespace, params: Path, out: Path, cams: Path) -> list[str]:
    """The ``wsss <stage>`` arguments that read the inputs of ``args`` and write under ``out``."""
    common = ["--params", params, "--data", args.data.resolve()]
    outputs = {
        "cams": ["--model-dir", args.cls.resolve(), "--out", out / "cams"],
        "refine": ["--cams", cams, "--aff-dir", args.aff.resolve(), "--out", out / "pseudo"],
        "evaluate": ["--model-dir", args.seg.resolve()],
    }
    return [str(a) for a in (stage, *common, *outputs[stage], "--results", out / f"results_{stage}")]


def voc_setup(args: argparse.Namespace, raw: dict, root: Path) -> None:
    """``--voc``: a prepared VOC stand-in and a classifier under ``root``; ``args`` and ``raw`` pointed at them."""
    from pipeline.data.standin import write_standin

    write_standin("voc", root / "raw", args.voc, workers=os.cpu_count())
    raw["data"] |= {"dataset": "voc", "root": str(root / "raw"), "subset": args.subset}
    raw["cams"] |= {"split": "train_aug", "score_split": None}
    raw["refine"] |= {"score_split": None}
    raw["evaluate"] |= {"split": "val"}
    for section in ("train_cls", "train_seg"):
        raw[section] |= {"epochs": 1, "warmup_epochs": 0.5}
    raw["train_seg"] |= {"split": "train_aug"}  # where refine wrote pseudo labels
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    args.data, args.cls, args.seg = root / "prepared", root / "cls", root / "seg"
    cli = [sys.executable, "-m", "stages.cli"]
    timed([*cli, "prepare", "--params", str(params), "--out", str(args.data)], root)
    timed([*cli, "train_cls", "--params", str(params), "--data", str(args.data), "--model-dir", str(args.cls),
           "--results", str(root / "results_train_cls"), "--checkpoint", str(root / "cls.pt")], root)  # fmt: skip


def train_seg(args: argparse.Namespace, params: Path, pseudo: Path, root: Path) -> None:
    """``--voc``: one epoch of the config's DeepLab on the pseudo labels of the one-process ``refine``."""
    timed([sys.executable, "-m", "stages.cli", "train_seg", "--params", str(params), "--data", str(args.data),
           "--pseudo-labels", str(pseudo), "--model-dir", str(args.seg), "--results", str(root / "results_train_seg"),
           "--checkpoint", str(root / "seg.pt")], root)  # fmt: skip


def timed(command: list[str], cwd: Path) -> float:
    """Wall time of ``command`` in seconds; its output is shown only if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "DVCLIVE_OPEN": "false"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--cls", type=Path, default=Path("models/cls"))
    parser.add_argument("--aff", type=Path, default=Path("models/aff"))
    parser.add_argument("--seg", type=Path, default=Path("models/seg"))
    parser.add_argument("--voc", type=int, default=0, help="images of a VOC stand-in to measure on (0: --data)")
    parser.add_argument("--subset", type=int, default=64, help="--voc: images per split")
    parser.add_argument("--batch", type=int, default=0, help="cams' and evaluate's batch_size (0: the config's)")
    args = parser.parse_args()
    raw = yaml.safe_load(args.params.read_text())
    alone_cmd = [sys.executable, "-m", "stages.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    sharded_cmd = [*torchrun, "-m", "stages.cli"]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.voc:
            voc_setup(args, raw, root)
        for section, values in PER_PROCESS.items():
            raw[section] = {**raw[section], **values}
            if args.batch and section != "refine":
                raw[section]["batch_size"] = args.batch
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"{'stage':<10}{'1 process':>12}{f'{args.nproc} ranks':>12}{'ratio':>8}  same metrics")
        for stage in PER_PROCESS:
            one, many = root / "one", root / "many"
            if stage == "evaluate" and args.voc:
                train_seg(args, params, one / "pseudo", root)
            alone = timed([*alone_cmd, *stage_args(stage, args, params, one, one / "cams")], root)
            sharded = timed([*sharded_cmd, *stage_args(stage, args, params, many, one / "cams")], root)
            metrics = [(run / f"results_{stage}" / "metrics.json").read_bytes() for run in (one, many)]
            same = metrics[0] == metrics[1]
            failed |= not same
            print(f"{stage:<10}{alone:>11.1f}s{sharded:>11.1f}s{alone / sharded:>7.2f}x  {'yes' if same else 'NO'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
