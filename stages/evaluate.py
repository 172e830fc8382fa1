"""``wsss evaluate``: val mIoU of the segmentation model (single-scale, multi-scale + flip, CRF), plots, gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("evaluate",)


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    model_dir: Annotated[Path, typer.Option(help="Segmentation model (made by 'train_seg').")] = Path("models/seg"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, plots, gallery).")] = Path(
        "results/evaluate"
    ),
) -> None:
    """Evaluate the model on evaluate.split against the ground-truth masks."""
    from pipeline.evaluate import evaluate_segmenter  # imported here: torch loads only when a stage runs

    with stage_params(params, SECTIONS, outputs=(results,)) as p:
        metrics = evaluate_segmenter(p.evaluate, data, model_dir, results)
        typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("/miou")))


if __name__ == "__main__":
    typer.run(main)
