"""``wsss predict``: segment new images with the trained model; needs no DVC and no params file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import UserError
from stages._common import EXIT_USAGE

EXIT_FAILED_INPUTS = 1


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def main(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder for <name>.png and <name>_overlay.jpg.")],
    model_dir: Annotated[Path, typer.Option(help="Segmentation model (made by 'train_seg').")] = Path("models/seg"),
    scales: Annotated[list[float], typer.Option("--scales", help="Inference scale; repeat for several.")] = [1.0],  # noqa: B006 - typer reads the default
    flip: Annotated[bool, typer.Option(help="Also average horizontally flipped passes.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="Torch threads (0 = default).")] = 0,
) -> None:
    """Write a palette PNG and an overlay per image; unreadable images are reported and skipped (exit 1)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if device not in ("auto", "cpu", "cuda") or any(s <= 0 for s in scales):
        _error("--device must be auto, cpu or cuda and --scales positive")
        raise typer.Exit(EXIT_USAGE)
    from pipeline.predict import predict_images  # imported here: torch loads only when the command runs

    try:
        report = predict_images(images, out, model_dir, tuple(scales), flip, device, threads, on_error=_error)
    except UserError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(f"wrote {len(report.written)} predictions to {out}")
    if report.failures:
        _error(f"{len(report.failures)} input(s) could not be read (see above)")
        raise typer.Exit(EXIT_FAILED_INPUTS)


if __name__ == "__main__":
    typer.run(main)
