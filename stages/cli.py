"""The ``wsss`` command: every pipeline stage as a subcommand, plus ``predict`` for new images."""

from __future__ import annotations

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

app = typer.Typer(
    help="Weakly supervised semantic segmentation: image-level labels -> seeds -> segmentation model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
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
