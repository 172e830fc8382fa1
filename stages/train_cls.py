"""``wsss train_cls``: fine-tune the SWTformer classifier (one process, or DDP under ``torchrun``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("seed", "data", "model", "train_cls", "loss")


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    model_dir: Annotated[Path, typer.Option(help="Where the weights and meta.json go.")] = Path("models/cls"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, curves).")] = Path("results/train_cls"),
    checkpoint: Annotated[Path, typer.Option(help="Resumable checkpoint (deleted when training completes).")] = Path(
        "checkpoints/train_cls.pt"
    ),
) -> None:
    """Train on image-level labels; resumes from --checkpoint if it matches the configuration."""
    from pipeline.train_cls import train_classifier  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(model_dir, results, checkpoint)) as p:
        metrics = train_classifier(p, data, model_dir, results, checkpoint)
        if metrics:
            typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    typer.run(main)
