"""``wsss compare``: a grid of variants x seeds as DVC experiments, summarised as mean +- std per metric.

A grid file names the variants (each a set of ``dvc exp run -S`` overrides), the seeds, the stage to run up to
and the metrics to report::

    name: v1_v2                      # experiment names: <name>-<variant>-s<seed>
    target: cams                     # optional: dvc exp run <target> (default: the whole DAG)
    targets: {v1: train_cls}         # optional: a variant's own target (its later metrics are not reported)
    seeds: [0, 1, 2]
    variants:
      v1: {model.version: v1}
      v2: {}                         # the committed params.yaml
    metrics:                         # <stage>/<key path in results/<stage>/metrics.json>
      - train_cls/val/map_classwise
      - cams/cam/miou_argmax

The runs themselves are :mod:`pipeline.compare_run`'s. The summary is read from ``dvc exp show --json`` and written
as a markdown table, a JSON file and a plot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9_]*$"  # no '-': it separates the parts of an experiment name


class Grid(BaseModel):
    """A comparison grid (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME)]
    target: str | None = None
    targets: dict[str, str] = {}
    seeds: Annotated[tuple[Annotated[int, Field(ge=0, lt=2**32)], ...], Field(min_length=1)]
    variants: Annotated[dict[Annotated[str, Field(pattern=NAME)], dict[str, Any]], Field(min_length=1)]
    metrics: Annotated[tuple[Annotated[str, Field(pattern=r"^[a-z_]+/.+")], ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _targets_name_variants(self) -> Grid:
        unknown = sorted(set(self.targets) - set(self.variants))
        if unknown:
            raise ValueError(f"targets: {', '.join(unknown)} is not a variant")
        return self

    def target_of(self, variant: str) -> str | None:
        """The stage ``variant`` runs up to (None: the whole DAG)."""
        return self.targets.get(variant, self.target)


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


def stages_up_to(dvc_yaml: dict, target: str | None) -> set[str]:
    """The stages ``dvc repro <target>`` runs: the target and every stage it depends on (all for None).

    Args:
        dvc_yaml: The parsed ``dvc.yaml``; stage B depends on stage A when one of B's deps is, contains or lies
            inside one of A's outs.
        target: A stage name, or None for the whole DAG.

    Raises:
        ConfigError: If the target is not a stage.
    """
    stages = dvc_yaml.get("stages") or {}
    if target is None:
        return set(stages)
    if target not in stages:
        raise ConfigError(f"target {target!r} is not a stage of dvc.yaml ({', '.join(stages)})")

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    outs = {name: paths(spec.get("outs")) + paths(spec.get("metrics")) for name, spec in stages.items()}
    found, todo = set(), [target]
    while todo:
        stage = todo.pop()
        found.add(stage)
        for dep in paths(stages[stage].get("deps")):
            todo += [
                other
                for other, made in outs.items()
                if other not in found and any(inside(dep, out) or inside(out, dep) for out in made)
            ]
    return found


def collect(grid: Grid, found: dict[str, dict], dvc_yaml: dict) -> dict[str, dict[str, list[float]]]:
    """``{variant: {metric: [value per seed]}}``; NaN where a run or metric is missing.

    A metric of a stage that a variant's target does not run is NaN too: a run up to ``refine`` still carries the
    previous run's ``results/train_seg/metrics.json`` in its workspace.
    """
    values = {}
    for variant in grid.variants:
        ran = stages_up_to(dvc_yaml, grid.target_of(variant))
        values[variant] = {
            metric: [
                metric_value(found.get(experiment_name(grid, variant, seed), {}), metric)
                if metric.split("/")[0] in ran
                else float("nan")
                for seed in grid.seeds
            ]
            for metric in grid.metrics
        }
    return values


def require_runs(grid: Grid, found: dict[str, dict], commit: str) -> None:
    """Stop when ``found`` holds none of the grid's experiments: a report of them would be all dashes.

    Args:
        grid: The grid.
        found: :func:`experiments` of the commit's ``dvc exp show``.
        commit: The commit whose experiments were read (named in the error).

    Raises:
        ConfigError: If no run of the grid is there (nothing has been written).
    """
    names = [experiment_name(grid, variant, seed) for variant in grid.variants for seed in grid.seeds]
    if not any(name in found for name in names):
        raise ConfigError(
            f"no experiment of grid {grid.name!r} ({names[0]}, ...) on commit {commit[:12]}: give --rev the commit "
            "they ran on, or run the grid (without --collect-only); nothing was written"
        )


def summarise(values: list[float]) -> tuple[float, float, int]:
    """``(mean, sample std, n)`` over the finite values; std is 0 for one value, NaN for none."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def markdown_table(grid: Grid, values: dict[str, dict[str, list[float]]], where: str = "") -> str:
    """The summary as a markdown table: a row per variant, ``mean ± std`` per metric, n where runs are missing.

    A metric with one value (one seed, or one run left) shows the value alone: a sample std needs two.

    Args:
        grid: The grid.
        values: :func:`collect`'s values.
        where: Appended to the footer (the commit and the machine the runs ran on).
    """
    header = ["variant", "overrides", *grid.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, per_metric in values.items():
        overrides = ", ".join(f"`{k}={format_value(v)}`" for k, v in grid.variants[variant].items()) or "-"
        cells = []
        for metric in grid.metrics:
            mean, std, n = summarise(per_metric[metric])
            missing = f" (n={n})" if n != len(grid.seeds) else ""
            spread = f" ± {std:.3f}" if n > 1 else ""
            cells.append("-" if n == 0 else f"{mean:.3f}{spread}{missing}")
        lines.append("| " + " | ".join([variant, overrides, *cells]) + " |")
    seeds = ", ".join(str(s) for s in grid.seeds)
    over = f"Mean ± sample std over seeds {seeds}" if len(grid.seeds) > 1 else f"One run, seed {seeds}"
    lines.append("")
    lines.append(f"{over}{'; ' + where if where else ''}.")
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


def write_report(
    grid: Grid, values: dict[str, dict[str, list[float]]], out_dir: Path, context: dict[str, Any] | None = None
) -> str:
    """Write ``<out>/<name>.md``, ``.json`` (every value) and ``.png``; return the markdown table.

    Args:
        grid: The grid.
        values: :func:`collect`'s values.
        out_dir: Where the three files go.
        context: Where the runs ran (``commit``, ``cpu_cores``, ``omp_num_threads``), written to the table's
            footer and the JSON file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    context = context or {}
    where = ", ".join(f"{key} {value}" for key, value in context.items())
    table = markdown_table(grid, values, where)
    (out_dir / f"{grid.name}.md").write_text(table)
    record = {"grid": grid.model_dump(mode="json"), "context": context, "values": values}
    (out_dir / f"{grid.name}.json").write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    plot(grid, values, out_dir / f"{grid.name}.png")
    return table
