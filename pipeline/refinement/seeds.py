"""Seeds from the CAM store: which map to use, the constant background score, and thresholded labels."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.layout import IGNORE
from pipeline.errors import DatasetError
from pipeline.io import CamStore

SeedMap = Literal["auto", "cam", "rcam", "aream", "relevance"]


def open_cam_store(cams_dir: Path | str) -> CamStore:
    """Open the CAM store written by ``cams``.

    Raises:
        DatasetError: If the store (its ``index.json``) is missing.
    """
    try:
        return CamStore(cams_dir)
    except FileNotFoundError as exc:
        raise DatasetError(str(exc)) from None


def choose_seed_map(available: list[str] | tuple[str, ...], seed_map: SeedMap) -> str:
    """Resolve ``auto``: ``rcam`` when the store has it (V2), else ``aream`` (a DeiT trained with AReAM), else ``cam``.

    Args:
        available: Map names in the store entry of an image (e.g. ``["cam", "rcam"]``).
        seed_map: ``auto``, ``cam``, ``rcam``, ``aream`` or ``relevance`` (the DeiT's, ``cams.relevance``).

    Returns:
        The map name to read.

    Raises:
        ValueError: If the requested map is not in the store.
    """
    if seed_map == "auto":
        return next(name for name in ("rcam", "aream", "cam") if name in available or name == "cam")
    if seed_map not in available:
        raise ValueError(f"seed map '{seed_map}' is not in the CAM store (it has: {', '.join(sorted(available))})")
    return seed_map


def with_constant_background(maps: np.ndarray, bg_score: float) -> np.ndarray:
    """Replace the background channel of stored maps by a constant score.

    Args:
        maps: (K, H, W) scores, channel 0 = background, channels 1.. = the image's classes in [0, 1].
        bg_score: The constant background score (the seed threshold).

    Returns:
        (K, H, W) float32 scores ``[t ; M_1 ; ... ]``.
    """
    scores = np.array(maps, dtype=np.float32)  # (K, H, W)
    scores[0] = bg_score
    return scores


def with_power_background(maps: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's background score ``(1 - max_c M_c)^alpha`` in channel 0: (K, H, W) -> (K, H, W) float32."""
    scores = np.array(maps, dtype=np.float32)  # (K, H, W)
    fg_max = scores[1:].max(0) if len(scores) > 1 else np.zeros(scores.shape[1:], np.float32)
    scores[0] = np.clip(1.0 - fg_max, 0.0, 1.0) ** alpha
    return scores


def seed_scores(maps: np.ndarray, bg_threshold: float | None) -> np.ndarray:
    """Seed scores ``[bg ; M_c]``: a constant background score, or (``None``) the stored background channel.

    Args:
        maps: (K, H, W) stored maps, channel 0 = background.
        bg_threshold: Constant background score, or ``None`` to keep the stored background (R-CAM's
            background prototype for V2; ``1 - max_c M_c`` for CAM).

    Returns:
        (K, H, W) float32 scores.
    """
    if bg_threshold is None:
        return np.array(maps, dtype=np.float32)
    return with_constant_background(maps, bg_threshold)


def threshold_labels(
    maps: np.ndarray, keys: np.ndarray, bg_threshold: float | None, ignore_band: tuple[float, float] | None = None
) -> np.ndarray:
    """Seed labels: the best foreground class where its score exceeds the threshold, else background.

    Ties go to background (a score equal to the threshold is background), like the ``cams`` sweep. With
    ``bg_threshold=None`` the labels are the argmax over the stored channels (``cams``' argmax protocol).

    Args:
        maps: (K, H, W) stored maps, channel 0 = background, channels 1.. = classes ``keys[1:]``.
        keys: (K,) class ids of the channels, ``keys[0] == 0``.
        bg_threshold: Constant background score, or ``None`` for the stored background channel.
        ignore_band: Optional ``(low, high)``, constant threshold only: pixels whose best foreground score
            ``s`` has ``low < s <= high`` become 255 (uncertain).

    Returns:
        (H, W) uint8 class ids, 255 = ignore.
    """
    keys = np.asarray(keys)
    if bg_threshold is None:
        return argmax_labels(maps, keys)
    if len(keys) == 1:
        return np.zeros(maps.shape[1:], np.uint8)
    fg = np.asarray(maps[1:], dtype=np.float32)  # (K-1, H, W)
    score = fg.max(0)  # (H, W)
    labels = np.where(score > bg_threshold, keys[1:][fg.argmax(0)], 0).astype(np.uint8)
    if ignore_band is not None:
        low, high = ignore_band
        labels[(score > low) & (score <= high)] = IGNORE
    return labels


def argmax_labels(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(K, H, W) scores over the channels of ``keys`` -> (H, W) uint8 class ids (ties to the first channel)."""
    return np.asarray(keys)[np.asarray(scores).argmax(0)].astype(np.uint8)
