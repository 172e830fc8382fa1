"""A trained model on disk: ``<model_dir>/model.safetensors`` (the state dict) + ``meta.json`` (how to rebuild it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ModelError, one_line
from pipeline.io import read_json, write_json
from pipeline.outputs import replaced_dir

WEIGHTS = "model.safetensors"
META = "meta.json"
SKIPPED = "skipped"
"""The only key of the ``meta.json`` of a stage that trained nothing (its value says why)."""


def save_model_dir(model_dir: Path | str, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write the module's state dict (contiguous CPU tensors) and ``meta``; the directory is replaced as one unit."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with replaced_dir(model_dir) as staging:
        save_file(state, str(staging / WEIGHTS))
        write_json(staging / META, meta)


def read_model_dir(
    model_dir: Path | str, what: str, stage: str, required: tuple[str, ...] = ()
) -> tuple[Path, dict[str, Any]]:
    """Check a model directory written by :func:`save_model_dir` and read its ``meta.json``.

    Args:
        model_dir: The directory.
        what: What the model is, for the error message (e.g. ``classifier``).
        stage: The stage that writes it, for the error message.
        required: Keys ``meta.json`` must have.

    Returns:
        ``(weights_path, meta)``; the caller loads the weights with :func:`load_weights`.

    Raises:
        ModelError: If ``meta.json`` or the weights are missing, or ``meta.json`` is not a JSON object with the
            ``required`` keys (one line naming the file and the stage).
    """
    model_dir = Path(model_dir)
    weights, meta_path = model_dir / WEIGHTS, model_dir / META
    if meta_path.is_file() and not weights.is_file():
        skipped = _skip_reason(meta_path)
        if skipped:
            raise ModelError(
                f"{what} not trained: {meta_path} says {skipped} (`dvc repro` re-runs '{stage}' when the params "
                f"need the model; by hand: `wsss {stage}` with those params)"
            )
    for path in (meta_path, weights):
        if not path.is_file():
            raise ModelError(
                f"{what} not found: {path} is missing (run the '{stage}' stage first: `wsss {stage}` or "
                f"`dvc repro {stage}`)"
            )
    again = retrain_hint(stage)
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise ModelError(f"cannot read {meta_path}: {one_line(exc)} (edited or damaged? {again})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} is not a {what} description (a JSON object is expected; {again})")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ModelError(f"{meta_path} has no key '{missing[0]}' (edited, or written by another version? {again})")
    return weights, meta


def _skip_reason(meta_path: Path) -> str | None:
    """The reason in a ``{"skipped": reason}`` ``meta.json``, or None for any other content."""
    try:
        meta = read_json(meta_path)
    except ValueError:
        return None
    return str(meta[SKIPPED]) if isinstance(meta, dict) and SKIPPED in meta else None


def retrain_hint(stage: str) -> str:
    """The fix for a broken or mismatched model directory: re-run the stage that writes it."""
    return f"run the '{stage}' stage again: `wsss {stage}` or `dvc repro {stage}`"


def load_weights(weights: Path, stage: str) -> dict[str, torch.Tensor]:
    """Load ``model.safetensors`` (CPU tensors).

    Raises:
        ModelError: If the file is truncated or not a safetensors file (one line naming it and the stage).
    """
    try:
        return load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - SafetensorError derives from Exception only
        raise ModelError(
            f"cannot read {weights}: {one_line(exc)} (truncated or damaged; {retrain_hint(stage)})"
        ) from None


def check_classes(meta: dict[str, Any], model_dir: Path | str, data_root: Path, class_names: list[str]) -> None:
    """Check that a model was trained on the dataset's classes (``meta["class_names"]``).

    Raises:
        ModelError: If the class lists differ (one line naming both files).
    """
    if list(meta.get("class_names", [])) != list(class_names):
        raise ModelError(
            f"{Path(model_dir) / META} was trained on classes {meta.get('class_names')}, but "
            f"{data_root / 'classes.json'} lists {list(class_names)} (use a model trained on this dataset, or "
            "point --data at the dataset it was trained on)"
        )
