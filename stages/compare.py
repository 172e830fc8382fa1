"""``wsss compare GRID``: run a grid of variants x seeds as DVC experiments and report mean +- std per metric.

Not a DVC stage: it drives ``dvc exp run`` (the grid file is described in :mod:`pipeline.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import user_errors


def main(
    grid_file: Annotated[Path, typer.Argument(help="Grid file (variants, seeds, target, metrics).")],
    out: Annotated[Path, typer.Option(help="Where the table (.md), values (.json) and plot (.png) go.")] = Path(
        "results/compare"
    ),
    collect_only: Annotated[bool, typer.Option(help="Run nothing; report the experiments that exist.")] = False,
) -> None:
    """Run the grid's missing experiments (dvc exp run --temp), then write and print mean ± std per metric."""
    from pipeline import compare

    with user_errors():
        grid = compare.load_grid(grid_file)
        failed = [] if collect_only else compare.run_grid(grid, typer.echo)
        values = compare.collect(grid, compare.experiments(compare.dvc_json("exp", "show")))
        typer.echo(compare.write_report(grid, values, out))
        if failed:
            typer.echo(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", err=True)
            raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
