"""The ``wsss`` command: every pipeline stage as a subcommand, plus ``predict`` for new images."""

from __future__ import annotations

from typing import Annotated

import typer

from stages import (
    cams,
    compare,
    download,
    evaluate,
    predict,
    prepare,
    refine,
    standin,
    train_aff,
    train_cls,
    train_seg,
)
from stages._common import DEBUG_ENV, set_debug

app = typer.Typer(
    help="Weakly supervised semantic segmentation: image-level labels -> seeds -> segmentation model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help=f"On an error, print the full traceback (for bug reports) before the one-line message; "
            f"{DEBUG_ENV}=1 does the same.",
        ),
    ] = False,
) -> None:
    """Weakly supervised semantic segmentation: image-level labels -> seeds -> segmentation model."""
    set_debug(debug)


STAGES = {
    "prepare": prepare,
    "train_cls": train_cls,
    "cams": cams,
    "train_aff": train_aff,
    "refine": refine,
    "train_seg": train_seg,
    "evaluate": evaluate,
}
for _name, _module in STAGES.items():
    app.command(_name)(_module.main)
# tools that are not DVC stages (the default DAG never downloads)
COMMANDS = {
    "predict": predict.main,
    "download": download.main,
    "download-weights": download.weights,
    "compare": compare.main,
    "standin": standin.main,
}
for _name, _function in COMMANDS.items():
    app.command(_name)(_function)

if __name__ == "__main__":
    app()
