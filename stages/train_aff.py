"""``wsss train_aff``: train the PSA AffinityNet on affinity labels derived from the seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("seed", "data", "train_aff", "refine.method")


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    cams: Annotated[Path, typer.Option(help="CAM store (made by 'cams').")] = Path("data/cams"),
    model_dir: Annotated[Path, typer.Option(help="Where the weights and meta.json go.")] = Path("models/aff"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, curves).")] = Path("results/train_aff"),
    checkpoint: Annotated[Path, typer.Option(help="Resumable checkpoint (deleted when training completes).")] = Path(
        "checkpoints/train_aff.pt"
    ),
) -> None:
    """Derive confident affinity labels from the seeds (two CRFs) and train the AffinityNet on them.

    Trains only when ``refine.method`` is ``psa`` or ``psa_crf`` (the methods that read the model); otherwise it
    writes a ``meta.json`` that says so and returns at once.
    """
    from pipeline.train_aff import train_affinity_net  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(model_dir, results, checkpoint)) as p:
        metrics = train_affinity_net(p, data, cams, model_dir, results, checkpoint)
        typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "nothing to train for refine.method")


if __name__ == "__main__":
    typer.run(main)
