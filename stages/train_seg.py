"""``wsss train_seg``: train DeepLab on the pseudo labels (one process, or DDP under ``torchrun``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("seed", "data", "train_seg")


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    pseudo_labels: Annotated[Path, typer.Option(help="Pseudo-label PNGs (made by 'refine').")] = Path(
        "data/pseudo_labels"
    ),
    model_dir: Annotated[Path, typer.Option(help="Where the weights and meta.json go.")] = Path("models/seg"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, curves).")] = Path("results/train_seg"),
    checkpoint: Annotated[Path, typer.Option(help="Resumable checkpoint (deleted when training completes).")] = Path(
        "checkpoints/train_seg.pt"
    ),
) -> None:
    """Train on the pseudo labels of train_seg.split; resumes from --checkpoint if it matches."""
    from pipeline.train_seg import train_segmenter  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(model_dir, results, checkpoint)) as p:
        metrics = train_segmenter(p, data, pseudo_labels, model_dir, results, checkpoint)
        if metrics:
            typer.echo(f"val mIoU={metrics['val/miou']:.4f}")


if __name__ == "__main__":
    typer.run(main)
