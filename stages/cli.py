"""The ``wsss`` command: every pipeline stage as a subcommand, plus ``predict`` for new images."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from stages import (
    cams,
    compare,
    download,
    evaluate,
    predict,
    prepare,
    pretrain,
    refine,
    standin,
    train_aff,
    train_cls,
    train_seg,
)
from stages._common import DEBUG_ENV, relaunch_under_torchrun, set_debug


class _Wsss(typer.Typer):
    """The ``wsss`` command; started as a program (not by a test's runner), it first honours WSSS_NPROC_PER_NODE."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        relaunch_under_torchrun(sys.argv[1:])
        return super().__call__(*args, **kwargs)


app = _Wsss(
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
    "pretrain": pretrain.main,
}
for _name, _function in COMMANDS.items():
    app.command(_name)(_function)

if __name__ == "__main__":
    app()
