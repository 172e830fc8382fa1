"""A trained model on disk: ``<model_dir>/model.safetensors`` (the state dict) + ``meta.json`` (how to rebuild it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.errors import ModelError
from pipeline.io import read_json, write_json
from pipeline.outputs import replaced_dir

WEIGHTS = "model.safetensors"
META = "meta.json"


def save_model_dir(model_dir: Path | str, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write the module's state dict (contiguous CPU tensors) and ``meta``; the directory is replaced as one unit."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with replaced_dir(model_dir) as staging:
        save_file(state, str(staging / WEIGHTS))
        write_json(staging / META, meta)


def read_model_dir(model_dir: Path | str, what: str, stage: str) -> tuple[Path, dict[str, Any]]:
    """Check a model directory written by :func:`save_model_dir` and read its ``meta.json``.

    Args:
        model_dir: The directory.
        what: What the model is, for the error message (e.g. ``classifier``).
        stage: The stage that writes it, for the error message.

    Returns:
        ``(weights_path, meta)``; the caller loads the weights (``safetensors.torch.load_file``).

    Raises:
        ModelError: If ``meta.json`` or the weights are missing (one line naming the file and the stage).
    """
    model_dir = Path(model_dir)
    weights, meta_path = model_dir / WEIGHTS, model_dir / META
    for path in (meta_path, weights):
        if not path.is_file():
            raise ModelError(
                f"{what} not found: {path} is missing (run the '{stage}' stage first: `wsss {stage}` or "
                f"`dvc repro {stage}`)"
            )
    return weights, read_json(meta_path)
