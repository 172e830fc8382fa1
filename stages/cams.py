"""``wsss cams``: multi-scale + flip CAM / R-CAM seeds, their shards, seed mIoU, mAP and a gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("cams",)


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    model_dir: Annotated[Path, typer.Option(help="Classifier (made by 'train_cls').")] = Path("models/cls"),
    out: Annotated[Path, typer.Option(help="CAM shards + index.json.")] = Path("data/cams"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, gallery).")] = Path("results/cams"),
) -> None:
    """Generate seeds for the split in cams.split and evaluate them against the ground truth."""
    from pipeline.cams import generate_cams  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(out, results)) as p:
        metrics = generate_cams(p.cams, data, model_dir, out, results)
        if metrics:  # rank 0 of a torchrun launch reports for all
            typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    typer.run(main)
