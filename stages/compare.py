"""``wsss compare GRID``: run a grid of variants x seeds as DVC experiments and report mean +- std per metric.

Not a DVC stage: it drives ``dvc exp run`` in a scratch clone (see :mod:`pipeline.compare_run`; the grid file is
described in :mod:`pipeline.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import user_errors


def main(
    grid_file: Annotated[Path, typer.Argument(help="Grid file (variants, seeds, targets, metrics).")],
    out: Annotated[Path, typer.Option(help="Where the table (.md), values (.json) and plot (.png) go.")] = Path(
        "results/compare"
    ),
    collect_only: Annotated[bool, typer.Option(help="Run nothing; report the experiments that exist.")] = False,
    rev: Annotated[
        str | None, typer.Option(help="With --collect-only: report the experiments of this baseline commit.")
    ] = None,
) -> None:
    """Run the grid's missing experiments (seed by seed, sharing unchanged stages), then print mean ± std."""
    import yaml

    from pipeline import compare, compare_run
    from pipeline.errors import ConfigError

    with user_errors():
        grid = compare.load_grid(grid_file)
        params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
        dvc_yaml = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))
        for variant in grid.variants:
            compare.stages_up_to(dvc_yaml, grid.target_of(variant))  # a wrong target stops before any run
        if rev is not None and not collect_only:
            raise ConfigError("--rev reports an earlier commit's runs: use it with --collect-only")
        baseline = compare_run.commit_of(rev or "HEAD")  # before the runs: a commit made meanwhile is not theirs
        failed = [] if collect_only else compare_run.run_grid(grid, params, typer.echo)
        shown = compare_run.dvc_json("exp", "show", "--rev", baseline)
        found = compare.experiments(shown)
        if collect_only:
            compare.require_runs(grid, found, baseline)
        values = compare.collect(grid, found, dvc_yaml)
        context = {"commit": baseline[:12]} if collect_only else compare_run.run_context(baseline)
        typer.echo(compare.write_report(grid, values, out, context))
        if failed:
            typer.echo(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", err=True)
            raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
