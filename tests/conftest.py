"""Shared fixtures for the stage / CLI / DVC integration tests: tiny params and a CLI runner."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_OVERRIDES: dict[str, Any] = {
    "data": {
        "synthetic": {"num_train": 16, "num_val": 8, "image_size": 32, "min_scale": 0.2, "max_scale": 0.4},
    },
    "model": {
        "swin": {
            "patch_size": 2,
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": [2, 2, 2, 2],
        },
        "hff_dims": [4, 4, 8, 8],
        "pretrained": "none",  # the shipped weights are the default Swin's, not this one's
    },
    "train_cls": {
        "epochs": 2,
        "batch_size": 4,
        "crop_size": 32,
        "resize_long": [28, 36],
        "warmup_epochs": 0.5,
        "threads": 1,
        "device": "cpu",
    },
    "cams": {"scales": [1.0, 0.5], "gallery_size": 2, "shard_size": 8, "device": "cpu", "threads": 1},
    "train_aff": {
        "labels": {"crf": {"iterations": 2, "bilateral_sxy": 10}},
        "model": {"out_indices": [1, 2], "projection_dims": [4, 8], "feature_dim": 8},
        "radius": 3,
        "epochs": 2,
        "batch_size": 4,
        "warmup_epochs": 0.5,
        "crop_size": 32,
        "label_workers": 1,
        "num_workers": 1,  # one DataLoader process: the tiny runs exercise the loader path
        "device": "cpu",
        "threads": 1,
    },
    "refine": {
        "method": "psa_crf",
        "crf": {"iterations": 2, "bilateral_sxy": 10},
        "psa": {"logt": 3},
        "workers": 2,
        "gallery_size": 2,
    },
    "train_seg": {
        "encoder": "tu-test_efficientnet",
        "decoder_channels": 8,
        "epochs": 2,
        "batch_size": 4,
        "crop_size": 32,
        "warmup_epochs": 0.5,
        "device": "cpu",
        "threads": 1,
    },
    "evaluate": {"scales": [1.0, 0.5], "batch_size": 4, "gallery_size": 2, "device": "cpu", "threads": 1},
}


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in, recursively for nested mappings."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_params() -> Params:
    """Seed 0 and every section at its typed defaults (``Params`` has none of its own: a file names every section)."""
    sections = {name: field.annotation() for name, field in Params.model_fields.items() if name != "seed"}
    return Params(seed=0, **sections)


def default_params_dict(**overrides: Any) -> dict[str, Any]:
    """:func:`default_params` as plain data (a complete params file); keyword arguments are per-section overrides."""
    return deep_update(default_params().model_dump(mode="json"), overrides)


def tiny_params_dict(**overrides: Any) -> dict[str, Any]:
    """The tiny configuration as plain data; keyword arguments are per-section overrides (merged deeply)."""
    return deep_update(default_params_dict(**TINY_OVERRIDES), overrides)


def copy_pipeline(root: Path) -> Path:
    """Copy what ``dvc repro`` needs of the project into ``root``: the DAG, the code and the shipped weights."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for folder in ("pipeline", "stages", "weights"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    """Write a params mapping as YAML and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    """A params.yaml for a model and dataset small enough that every stage runs in seconds on one CPU core."""
    return write_params(tmp_path / "params.yaml", tiny_params_dict())


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: one thread, the venv's bin first on PATH, no tqdm bars."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "DVCLIVE_OPEN": "false",
        }
    )
    env.update(extra)
    return env


def run_cli(*args: str | Path, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``wsss <args>`` as ``python -m stages.cli`` in a subprocess and capture its output.

    ``cwd`` should be a temporary directory: the package is installed (editable), so it imports from anywhere,
    and nothing a stage does can touch the repository's own DVC workspace. Keyword arguments are extra
    environment variables.
    """
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *map(str, args)],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """The :func:`run_cli` helper as a fixture."""
    return run_cli
