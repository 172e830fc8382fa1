"""``wsss pretrain``: pretraining of the classifier's encoder on generated images (not a DVC stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, stage_params

SECTIONS = ("data", "model", "pretrain")


def main(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="The encoder's weights (.safetensors); its manifest .json beside.")] = (
        Path("weights/swin_small_scenes.safetensors")
    ),
    results: Annotated[Path, typer.Option(help="dvclive directory (loss, held-out score).")] = Path("results/pretrain"),
    checkpoint: Annotated[Path, typer.Option(help="Resumable checkpoint (deleted when training completes).")] = Path(
        "checkpoints/pretrain.pt"
    ),
) -> None:
    """Pretrain the encoder of `model` (Swin; ViT with model.arch=deit) on fractals or scenes, for model.pretrained."""
    from pipeline.pretrain import pretrain  # imported here: torch loads only when the command runs

    with stage_params(params, SECTIONS, outputs=(out, results, checkpoint)) as p:
        manifest = pretrain(p, out, results, checkpoint)
        if manifest:
            held_out = f"held-out {manifest['held_out_metric']} {manifest['held_out'][-1]:.3f}"
            typer.echo(f"wrote {out} (sha256 {manifest['sha256'][:12]}…, {held_out})")


if __name__ == "__main__":
    typer.run(main)
