"""``wsss prepare``: write the dataset in the prepared layout (the synthetic benchmark by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("seed", "data")


def main(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output directory (replaced).")] = Path("data/prepared"),
) -> None:
    """Generate (synthetic) or convert the dataset into images, masks, split lists and labels."""
    from pipeline.prepare import prepare  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(out,)) as p:
        data = prepare(p.data, p.seed, out)
        counts = ", ".join(f"{s}={len(data.split(s))}" for s in ("train", "train_aug", "val"))
        typer.echo(f"prepared {data.info['dataset']} in {data.root}: {counts}")


if __name__ == "__main__":
    typer.run(main)
