"""``wsss standin``: write a stand-in for VOC 2012 + SBD or COCO 2014 in the exact raw layout, from the generator.

Not a DVC stage: a tool for rehearsing a paper config end to end without the real data (point ``data.root`` at
the folder it writes). See :mod:`pipeline.data.standin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import user_errors


def main(
    dataset: Annotated[str, typer.Argument(metavar="voc|coco", help="voc (VOC 2012 + SBD) or coco (COCO 2014).")],
    out: Annotated[Path, typer.Option(help="Output folder (the stand-in's data.root); must be empty or absent.")],
    images: Annotated[int, typer.Option(min=2, help="Number of images (VOC: JPEGImages; COCO: train + val).")],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the images and the split.")] = 0,
) -> None:
    """Write a VOC or COCO stand-in: real layout, sizes, class counts and JPEGs; synthetic content."""
    from pipeline.data.standin import write_standin  # imported here: numpy and PIL load only when it runs

    with user_errors():
        counts = write_standin(dataset, out, images, seed)
        listed = ", ".join(f"{split}={count}" for split, count in counts.items())
        typer.echo(f"wrote a {dataset} stand-in in {out}: {listed} (point data.root at it)")


if __name__ == "__main__":
    typer.run(main)
