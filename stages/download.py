"""``wsss download`` and ``wsss download-weights``: fetch a real dataset or pretrained weights once, by hand.

Not DVC stages: the default DAG is the synthetic benchmark and must never download; a user with the data already on
disk points ``data.root`` at it and skips this. Archives are checksum-verified before extraction, so the raw data
under ``data.root`` is a fixed input of ``prepare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.data.sources import download_dataset
from stages._common import ParamsOption, stage_params, user_errors

SECTIONS = ("data",)


def main(
    params: ParamsOption = Path("params.yaml"),
    dataset: Annotated[str | None, typer.Option(help="voc or coco (default: data.dataset).")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root (default: data.root).")] = None,
    sha256: Annotated[
        list[str] | None, typer.Option(help="ARCHIVE=HEX: a checksum for an archive (repeatable).")
    ] = None,
    trust_unpinned: Annotated[
        bool, typer.Option(help="Accept archives without a published checksum; record the hash of the download.")
    ] = False,
    keep_archives: Annotated[bool, typer.Option(help="Keep the archives after extraction.")] = False,
) -> None:
    """Download, verify (SHA-256) and extract VOC 2012 + SBD or COCO 2014 into data.root."""
    with stage_params(params, SECTIONS) as p:
        target = root if root is not None else Path(p.data.root)
        extracted = download_dataset(dataset or p.data.dataset, target, sha256, trust_unpinned, keep_archives)
        typer.echo(f"{target}: extracted {', '.join(extracted) if extracted else 'nothing new (all up to date)'}")


def weights(
    tag: Annotated[str, typer.Argument(help="timm pretrained tag, e.g. swin_tiny_patch4_window7_224.ms_in1k.")],
    out: Annotated[Path, typer.Option(help="Output .safetensors file (usable as model.pretrained).")],
) -> None:
    """Save a timm pretrained backbone as a .safetensors file, for machines without network."""
    from pipeline.models import pretrained  # imported here: timm loads only when the command runs

    with user_errors():
        path = pretrained.save_state_dict(pretrained.timm_state_dict(tag), out)
        typer.echo(f"saved {tag} to {path}")


if __name__ == "__main__":
    typer.run(main)
