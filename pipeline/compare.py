"""``wsss compare``: a grid of variants x seeds as DVC experiments, summarised as mean +- std per metric.

A grid file names the variants (each a set of ``dvc exp run -S`` overrides), the seeds, the stage to run up to
and the metrics to report::

    name: v1_v2                      # experiment names: <name>-<variant>-s<seed>
    target: cams                     # optional: dvc exp run <target> (default: the whole DAG)
    seeds: [0, 1, 2]
    variants:
      v1: {model.version: v1}
      v2: {}                         # the committed params.yaml
    metrics:                         # <stage>/<key path in results/<stage>/metrics.json>
      - train_cls/val/map_classwise
      - cams/cam/miou_argmax

Each run is ``dvc exp run --temp -n <name>-<variant>-s<seed> -S seed=<seed> -S <key>=<value> ... [target]``,
outside the workspace; runs that already exist are not repeated, so a killed grid resumes. The summary is read
from ``dvc exp show --json`` and written as a markdown table, a JSON file and a plot.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9_]*$"  # no '-': it separates the parts of an experiment name


class Grid(BaseModel):
    """A comparison grid (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME)]
    target: str | None = None
    seeds: Annotated[tuple[Annotated[int, Field(ge=0, lt=2**32)], ...], Field(min_length=1)]
    variants: Annotated[dict[Annotated[str, Field(pattern=NAME)], dict[str, Any]], Field(min_length=1)]
    metrics: Annotated[tuple[Annotated[str, Field(pattern=r"^[a-z_]+/.+")], ...], Field(min_length=1)]


def load_grid(path: Path | str) -> Grid:
    """Read and validate a grid file.

    Raises:
        ConfigError: One line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    try:
        return Grid.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "<top level>"
        raise ConfigError(f"{path}: {key}: {error['msg']}") from None


def experiment_name(grid: Grid, variant: str, seed: int) -> str:
    """``<grid>-<variant>-s<seed>``: the name of one run of the grid."""
    return f"{grid.name}-{variant}-s{seed}"


def format_value(value: Any) -> str:
    """A params value as ``dvc exp run -S`` reads it (YAML): ``true``, ``0.001``, ``[1.0, 0.5]``, ``cam``."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def exp_run_command(grid: Grid, variant: str, seed: int) -> list[str]:
    """The ``dvc exp run`` command line of one run (seed first, then the variant's overrides)."""
    overrides = {"seed": seed, **grid.variants[variant]}
    command = ["dvc", "exp", "run", "--temp", "-n", experiment_name(grid, variant, seed)]
    for key, value in overrides.items():
        command += ["-S", f"{key}={format_value(value)}"]
    return command + ([grid.target] if grid.target else [])


def experiments(shown: list[dict]) -> dict[str, dict]:
    """``dvc exp show --json`` -> ``{experiment name: its data}`` for every named experiment of every baseline."""
    found: dict[str, dict] = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for run in group.get("revs") or []:
                if run.get("name") and run.get("data"):
                    found[run["name"]] = run["data"]
    return found


def metric_value(data: dict, metric: str) -> float:
    """One metric of an experiment: ``cams/rcam/miou_argmax`` -> ``results/cams/metrics.json``'s rcam.miou_argmax.

    Returns:
        The value, or NaN if the experiment has no such metric (a failed or partial run).
    """
    stage, *keys = metric.split("/")
    value: Any = ((data.get("metrics") or {}).get(f"results/{stage}/metrics.json") or {}).get("data") or {}
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else float("nan")


def collect(grid: Grid, found: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """``{variant: {metric: [value per seed]}}`` (NaN where a run or metric is missing)."""
    return {
        variant: {
            metric: [metric_value(found.get(experiment_name(grid, variant, seed), {}), metric) for seed in grid.seeds]
            for metric in grid.metrics
        }
        for variant in grid.variants
    }


def summarise(values: list[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` over the finite values; std is 0 for one value, NaN for none."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def markdown_table(grid: Grid, values: dict[str, dict[str, list[float]]]) -> str:
    """The summary as a markdown table: a row per variant, ``mean ± std`` per metric, n where runs are missing."""
    header = ["variant", "overrides", *grid.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, per_metric in values.items():
        overrides = ", ".join(f"`{k}={format_value(v)}`" for k, v in grid.variants[variant].items()) or "-"
        cells = []
        for metric in grid.metrics:
            mean, std, n = summarise(per_metric[metric])
            missing = f" (n={n})" if n != len(grid.seeds) else ""
            cells.append("-" if n == 0 else f"{mean:.3f} ± {std:.3f}{missing}")
        lines.append("| " + " | ".join([variant, overrides, *cells]) + " |")
    seeds = ", ".join(str(s) for s in grid.seeds)
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {seeds}.")
    return "\n".join(lines) + "\n"


def plot(grid: Grid, values: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per metric: each variant's seeds as dots, its mean as a bar with a ± std error bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(values)
    fig, axes = plt.subplots(1, len(grid.metrics), figsize=(3.2 * len(grid.metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], grid.metrics, strict=True):
        stats = [summarise(values[name][metric]) for name in names]
        ax.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, alpha=0.6)
        for x, name in enumerate(names):
            ax.scatter([x] * len(grid.seeds), values[name][metric], s=12, color="black", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(re.sub(r"/", " / ", metric), fontsize=9)
    fig.suptitle(f"{grid.name}: seeds {', '.join(str(s) for s in grid.seeds)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(grid: Grid, values: dict[str, dict[str, list[float]]], out_dir: Path) -> str:
    """Write ``<out>/<name>.md``, ``.json`` (every value) and ``.png``; return the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(grid, values)
    (out_dir / f"{grid.name}.md").write_text(table)
    record = {"grid": grid.model_dump(mode="json"), "values": values}
    (out_dir / f"{grid.name}.json").write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    plot(grid, values, out_dir / f"{grid.name}.png")
    return table


def dvc_json(*args: str) -> list[dict]:
    """``dvc <args> --json`` parsed.

    Raises:
        ConfigError: If dvc fails (its last error line).
    """
    result = subprocess.run(["dvc", *args, "--json"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"`dvc {' '.join(args)}` failed: {last}")
    return json.loads(result.stdout)


def require_committed_params() -> None:
    """A grid runs against the committed params: uncommitted edits would leak into every run.

    Raises:
        ConfigError: If ``params.yaml`` or ``dvc.yaml`` has uncommitted changes.
    """
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if changed:
        raise ConfigError("params.yaml or dvc.yaml has uncommitted changes; commit or restore them before a grid")


def run_grid(grid: Grid, echo: Callable[[str], None] = print) -> list[str]:
    """Run the grid's experiments that do not exist yet, one after the other.

    Returns:
        The names of the runs that failed (the others are in ``dvc exp show``).
    """
    require_committed_params()
    done = experiments(dvc_json("exp", "show"))
    failed = []
    for variant in grid.variants:
        for seed in grid.seeds:
            name, command = experiment_name(grid, variant, seed), exp_run_command(grid, variant, seed)
            if name in done:
                echo(f"{name}: already run, kept")
                continue
            echo(f"{name}: {' '.join(command)}")
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(name)
    return failed
