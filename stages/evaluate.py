"""``wsss evaluate``: val mIoU of the segmentation model (single-scale, multi-scale + flip, CRF), plots, galleries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("evaluate", "refine")  # refine: how the ladder gallery cuts seeds, as refine did


def main(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Prepared dataset (made by 'prepare').")] = Path("data/prepared"),
    model_dir: Annotated[Path, typer.Option(help="Segmentation model (made by 'train_seg').")] = Path("models/seg"),
    results: Annotated[Path, typer.Option(help="dvclive directory (metrics, plots, gallery).")] = Path(
        "results/evaluate"
    ),
    cams: Annotated[
        Path | None, typer.Option(help="CAM store (made by 'cams'); with --pseudo-labels: the ladder gallery.")
    ] = None,
    pseudo_labels: Annotated[Path | None, typer.Option(help="Pseudo labels (made by 'refine').")] = None,
) -> None:
    """Evaluate the model on evaluate.split against the ground-truth masks."""
    from pipeline.errors import ConfigError
    from pipeline.evaluate import LadderInputs, evaluate_segmenter  # imported here: torch loads only when run

    with stage_params(params, SECTIONS, outputs=(results,)) as p:
        if (cams is None) != (pseudo_labels is None):
            raise ConfigError("--cams and --pseudo-labels go together: the ladder gallery reads both")
        ladder = None if cams is None else LadderInputs(cams, pseudo_labels, p.refine)
        metrics = evaluate_segmenter(p.evaluate, data, model_dir, results, ladder)
        if metrics:  # rank 0 of a torchrun launch reports for all
            typer.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("/miou")))


if __name__ == "__main__":
    typer.run(main)
