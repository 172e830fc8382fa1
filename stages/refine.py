"""``wsss refine``: seeds -> pseudo-label PNGs (threshold, dense CRF, PSA random walk, PAR, or those + CRF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("refine",)


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    cams: Annotated[Path, typer.Option(help="CAM store (made by 'cams').")] = Path("data/cams"),
    aff_dir: Annotated[Path, typer.Option(help="AffinityNet (made by 'train_aff'; read by psa methods).")] = Path(
        "models/aff"
    ),
    out: Annotated[Path, typer.Option(help="One palette PNG per image (255 = ignore).")] = Path("data/pseudo_labels"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, gallery).")] = Path("results/refine"),
) -> None:
    """Turn the stored seeds into pseudo labels by refine.method and score them against the ground truth."""
    from pipeline.refine import refine_pseudo_labels  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(out, results)) as p:
        metrics = refine_pseudo_labels(p.refine, data, cams, aff_dir, out, results)
        if metrics:  # rank 0 of a torchrun launch reports for all
            typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/iou/" not in k))


if __name__ == "__main__":
    typer.run(main)
