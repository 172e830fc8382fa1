"""Ensemble screen: does averaging the maps of K classifiers narrow the R-CAM seeds' spread over seeds?

For every benchmark instance (``data.synthetic.seed``) and budget (E epochs x K members), trains K classifiers
for E epochs each that differ only in their training seed (``seed = instance + 1000 * member``): ``prepare``,
``train_cls`` and ``cams`` of each (``benchmarks/cuda_check.py --as-is --until cams``, several jobs at once).
Then it scores, on the instance's training images, each member's stored CAM / R-CAM seeds alone and the seeds of
the members' averaged maps (the ensemble), under the ``cams`` stage's protocols, and prints mean ± std over
instances.

Member 0 of an instance is the run of ``seed = instance`` of the config (whose images' seed is the run's seed).
``--set KEY=VALUE`` changes the config of every member (``dvc exp run -S`` style: a dotted key, a YAML value).
Each run works in its own directory: weights files under the project (``weights/...``) are found, other paths
(``data.root``, weights elsewhere) must be absolute.

Usage: python benchmarks/ensemble_screen.py --instances 40 41 42 --budgets 48x1 24x2 --jobs 8 \\
           [--device auto|cuda|cpu] [--threads 1] [--deadline 480] [--out DIR] [--params params.yaml]
           [--set KEY=VALUE ...]

The jobs' logs, each member's metrics and ``screen.json`` (every score) land in ``--out``; jobs still running at
``--deadline`` seconds are stopped and the instances they leave incomplete are scored on the members that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cuda_check import no_cuda_reason, on_device  # noqa: E402

from pipeline.config import parse_params, read_yaml  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402

MAPS = ("cam", "rcam")
CAMS_METRICS = "results/cams/metrics.json"
PROTOCOLS = ("miou_argmax", "miou_best")


def member_params(base: dict, instance: int, member: int, epochs: int, device: str, threads: int) -> dict:
    """``base`` for one ensemble member: the instance's images, the member's training seed, ``epochs`` of training.

    Args:
        base: A complete params mapping.
        instance: The benchmark instance (``data.synthetic.seed``), the same for every member.
        member: The member's index; its training seed is ``instance + 1000 * member``.
        epochs: ``train_cls.epochs``.
        device: Where the model stages run.
        threads: CPU threads of ``train_cls`` and ``cams`` (several jobs share the machine).
    """
    raw = on_device(base, device)
    raw["seed"] = instance + 1000 * member
    raw["data"] = {**raw["data"], "synthetic": {**raw["data"]["synthetic"], "seed": instance}}
    raw["train_cls"] = {**raw["train_cls"], "epochs": epochs, "threads": threads}
    raw["cams"] = {**raw["cams"], "threads": threads}
    return raw


def override(text: str) -> tuple[list[str], object]:
    """``"model.pretrained=w.safetensors"`` -> ``(["model", "pretrained"], "w.safetensors")`` (value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. train_cls.lr=0.001")
    return key.split("."), yaml.safe_load(value)


def with_overrides(raw: dict, overrides: list[tuple[list[str], object]]) -> dict:
    """A copy of ``raw`` with each ``(dotted key, value)`` set; a key that names no existing setting fails."""
    raw = json.loads(json.dumps(raw))
    for path, value in overrides:
        section = raw
        for name in path[:-1]:
            section = section.get(name) if isinstance(section, dict) else None
        if not isinstance(section, dict) or path[-1] not in section:
            raise SystemExit(f"ensemble_screen: --set {'.'.join(path)}: no such setting in the params")
        section[path[-1]] = value
    return raw


def job_dir(out: Path, instance: int, epochs: int, member: int) -> Path:
    """The working directory of one member's run."""
    return out / f"i{instance}-e{epochs}-m{member}"


def finished(workdir: Path) -> bool:
    """Whether the member's run in ``workdir`` wrote the ``cams`` stage's metrics."""
    metrics = workdir / "metrics.json"
    return metrics.is_file() and CAMS_METRICS in json.loads(metrics.read_text())


def run_job(workdir: Path, raw: dict, device: str, deadline: float) -> bool:
    """Run ``prepare`` .. ``cams`` of one member in ``workdir``; ``False`` if it failed or ran past ``deadline``.

    A member that finished before with the same params is not run again (a screen can be resumed or extended).
    """
    text = yaml.safe_dump(raw, sort_keys=False)
    if finished(workdir) and (workdir / "input.yaml").read_text() == text:
        return True
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").unlink(missing_ok=True)
    (workdir / "input.yaml").write_text(text)
    command = [sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--params", str(workdir / "input.yaml")]
    command += ["--as-is", "--until", "cams", "--workdir", str(workdir), "--device", device]
    command += ["--metrics-json", str(workdir / "metrics.json")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with (workdir / "log.txt").open("w") as log:
        try:
            left = deadline - time.time()
            if left <= 0:
                return False
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=left)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0 and finished(workdir)


def ensemble_scores(stores: list, data, thresholds: np.ndarray) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Seed mIoU of each member's maps alone and of the members' averaged maps, in one pass over the stores.

    Args:
        stores: One :class:`pipeline.io.CamStore` per member, over the same images.
        data: The :class:`pipeline.data.layout.PreparedDataset` the stores were made from (the ground truth).
        thresholds: The background sweep's grid.

    Returns:
        Each member's scores and the ensemble's (one member: the same), each ``{"<map>/miou_argmax": ...,
        "<map>/miou_best": ...}`` for ``cam`` and, when stored (V2), ``rcam``.
    """
    from pipeline.metrics import SeedEvaluator

    names = [name for name in MAPS if name in stores[0].load(stores[0].ids[0])]
    groups = len(stores) + 1 if len(stores) > 1 else 1  # each member, then their average
    evaluators = [{name: SeedEvaluator(data.num_classes, thresholds) for name in names} for _ in range(groups)]
    for image_id in stores[0].ids:
        loaded = [store.load(image_id) for store in stores]
        keys = loaded[0]["keys"]
        gt = data.load_mask(image_id)
        for name in names:
            maps = [member[name].astype(np.float32) for member in loaded]  # K x (N, H, W)
            maps += [np.mean(maps, axis=0)] if groups > 1 else []
            for group, member_maps in zip(evaluators, maps, strict=True):
                group[name].add(member_maps, keys, gt)
    scores = []
    for group in evaluators:
        summaries = {name: evaluator.summary() for name, evaluator in group.items()}
        scores.append({f"{name}/{k}": summary[k] for name, summary in summaries.items() for k in PROTOCOLS})
    return scores[: len(stores)], scores[-1]


def score_instance(out: Path, instance: int, epochs: int, size: int, members: list[int], thresholds) -> dict:
    """Scores of one instance at one budget (``epochs`` x ``size``) on the ``members`` that finished."""
    from pipeline.data.layout import PreparedDataset
    from pipeline.io import CamStore

    dirs = [job_dir(out, instance, epochs, m) for m in members]
    data = PreparedDataset.open(dirs[0] / "data" / "prepared")
    row = {"instance": instance, "epochs": epochs, "members": len(members), "budget_members": size}
    row["val_map"] = [json.loads((d / "metrics.json").read_text())["results/train_cls/metrics.json"]["val"]
                      ["map_classwise"] for d in dirs]  # fmt: skip
    row["single"], row["ensemble"] = ensemble_scores([CamStore(d / "data" / "cams") for d in dirs], data, thresholds)
    return row


def budget(text: str) -> tuple[int, int]:
    """``"24x2"`` -> ``(24, 2)``: epochs per member, members."""
    try:
        epochs, members = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not EPOCHSxMEMBERS, e.g. 24x2") from None
    return epochs, members


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std) of ``values``, 3 decimals."""
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown: per budget, each member alone and the ensemble (mean ± std over the instances it completed).

    The argmax protocol's mIoU (the ``cams`` stage's headline); R-CAM's cells are empty for V1, which has none, and
    the last column is R-CAM's, else the CAM's.
    """
    lines = ["| budget | instances | val mAP (each member) | CAM (each member) | R-CAM (each member) | CAM (ensemble) "
             "| R-CAM (ensemble) | per instance (ensemble) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for epochs, size in sorted({(r["epochs"], r["budget_members"]) for r in rows}, reverse=True):
        group = [r for r in rows if (r["epochs"], r["budget_members"], r["members"]) == (epochs, size, size)]
        if not group:
            continue
        keys = [f"{name}/miou_argmax" for name in MAPS if f"{name}/miou_argmax" in group[0]["ensemble"]]
        members = {key: mean_std([s[key] for r in group for s in r["single"]]) for key in keys}
        ensembles = {key: mean_std([r["ensemble"][key] for r in group]) for key in keys}
        cells = [members.get(f"{name}/miou_argmax", "") for name in MAPS]
        cells += [ensembles.get(f"{name}/miou_argmax", "") for name in MAPS]
        each = ", ".join(f"{r['instance']}: {r['ensemble'][keys[-1]]:.3f}" for r in group)
        val = mean_std([v for r in group for v in r["val_map"]])
        lines.append(f"| {epochs}x{size} | {len(group)} | {val} | {' | '.join(cells)} | {each} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--instances", type=int, nargs="+", required=True)
    parser.add_argument("--budgets", type=budget, nargs="+", default=[(48, 1), (24, 2)], help="EPOCHSxMEMBERS")
    parser.add_argument("--jobs", type=int, default=1, help="member runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if there is one")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later runs are stopped")
    parser.add_argument("--out", type=Path, default=Path("ensemble_screen"))
    parser.add_argument("--set", type=override, action="append", default=[], help="KEY=VALUE for every member")
    args = parser.parse_args()
    from pipeline.metrics import threshold_grid

    reason = no_cuda_reason() if args.device != "cpu" else None
    if args.device == "cuda" and reason:
        raise SystemExit(f"ensemble_screen: no CUDA device: {reason}; --device cpu runs on the CPU")
    device = "cpu" if args.device == "cpu" or reason else "cuda"

    base = with_overrides(read_yaml(args.params), args.set)
    deadline = time.time() + args.deadline
    plan = [(i, e, m) for i in args.instances for e, k in args.budgets for m in range(k)]
    raws = [member_params(base, i, m, e, device, args.threads) for i, e, m in plan]
    try:
        parse_params(raws[0], args.params)  # a bad --set fails here, in one line
    except ConfigError as exc:
        raise SystemExit(f"ensemble_screen: {exc}") from None
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(plan), desc="member runs", unit="run") as bar:
        futures = {pool.submit(run_job, job_dir(args.out, i, e, m), raw, device, deadline): (i, e, m)
                   for (i, e, m), raw in zip(plan, raws, strict=True)}  # fmt: skip
        done = set()
        for future in as_completed(futures):
            if future.result():
                done.add(futures[future])
            bar.update()
    print(f"{len(done)} of {len(plan)} runs finished", file=sys.stderr)
    thresholds = threshold_grid(base["cams"]["sweep"]["max"], base["cams"]["sweep"]["step"])
    tasks = [(args.out, i, e, size, members, thresholds) for i in args.instances for e, size in args.budgets
             if (members := [m for m in range(size) if (i, e, m) in done])]  # fmt: skip
    if not tasks:
        raise SystemExit(f"ensemble_screen: no run finished; their logs are in {args.out}/*/log.txt")
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = [future.result() for future in [pool.submit(score_instance, *task) for task in tasks]]
    (args.out / "screen.json").write_text(json.dumps(rows, indent=1))
    print(summary_table(rows))


if __name__ == "__main__":
    main()
