"""The ``wsss`` command: every pipeline stage as a subcommand, plus ``predict`` for new images."""

from __future__ import annotations

import typer

from stages import cams, evaluate, predict, prepare, train_cls, train_seg

app = typer.Typer(
    help="Weakly supervised semantic segmentation: image-level labels -> seeds -> segmentation model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
STAGES = {
    "prepare": prepare,
    "train_cls": train_cls,
    "cams": cams,
    "train_seg": train_seg,
    "evaluate": evaluate,
}
for _name, _module in STAGES.items():
    app.command(_name)(_module.main)
app.command("predict")(predict.main)  # a tool for new images, not a DVC stage

if __name__ == "__main__":
    app()
