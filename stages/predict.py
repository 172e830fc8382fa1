"""``wsss predict``: segment new images with the trained model; needs no DVC and no params file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import UserError
from stages._common import user_errors

EXIT_FAILED_INPUTS = 1
DEFAULT_MAX_PIXELS = 50_000_000


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _warning(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _check_options(out: Path, scales: list[float], device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: must be auto, cpu or cuda")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise UserError(f"--scales {bad[0]}: every scale must be a positive finite number (e.g. --scales 1.0)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder (name a folder, new or existing)")


def main(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder for <name>.png and <name>_overlay.jpg.")],
    model_dir: Annotated[Path, typer.Option(help="Segmentation model (made by 'train_seg').")] = Path("models/seg"),
    scales: Annotated[list[float], typer.Option("--scales", help="Inference scale; repeat for several.")] = [1.0],  # noqa: B006 - typer reads the default
    flip: Annotated[bool, typer.Option(help="Also average horizontally flipped passes.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="Torch threads (0 = default).")] = 0,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Images with more pixels (width x height) are named and skipped.")
    ] = DEFAULT_MAX_PIXELS,
) -> None:
    """Write a palette PNG and an overlay per image; unreadable or too large images are named and skipped (exit 1)."""
    with user_errors():
        _check_options(out, scales, device)
        from pipeline.predict import predict_images  # imported here: torch loads only when the command runs

        report = predict_images(
            images,
            out,
            model_dir,
            tuple(scales),
            flip,
            device,
            threads,
            on_error=_error,
            max_pixels=max_pixels,
            on_skip=_warning,
        )
        typer.echo(f"wrote {len(report.written)} predictions to {out}")
        if report.skipped:
            _error(f"skipped {len(report.skipped)} image(s) above --max-pixels {max_pixels} (see above)")
        if report.failures:
            _error(f"{len(report.failures)} input(s) could not be read (see above)")
        if report.skipped or report.failures:
            raise typer.Exit(EXIT_FAILED_INPUTS)


if __name__ == "__main__":
    typer.run(main)
