"""WegFormer's map and label post-processors for ``refine`` (``refine.wegformer``; ``docs/wegformer.md``).

They work on any stored map (Swin CAM, R-CAM, the DeiT's CAM or relevance):

* :func:`soft_erase` (WegFormer eq. 6-7): flatten each class map by clipping it at ``S_r`` of its maximum.
* :func:`drs_scores` / :func:`drs_ignore`: the initial pseudo label from maps plus a saliency map (the DRS recipe
  WegFormer compares against): background ``1 - saliency``, weak class cues zeroed, conflicting and
  salient-but-background pixels ignored.
* :func:`epom` (eq. 8-10): background pixels that score above a class's threshold become 255.
* :func:`load_saliency` reads a saliency folder; :func:`oracle_saliency` is the ground-truth
  foreground: an ORACLE (upper bound), for the synthetic benchmark only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.errors import DatasetError

GREY = [(i, i, i) for i in range(256)]


def soft_erase(maps: np.ndarray, ratio: float) -> np.ndarray:
    """Soft erase the class channels: min-max normalise, clip at ``ratio``, divide by ``ratio`` (back to [0, 1]).

    Args:
        maps: (K, H, W) stored maps, channel 0 background (left as it is).
        ratio: ``S_r`` in (0, 1] (WegFormer: 0.55).

    Returns:
        (K, H, W) float32; a flat class channel becomes 0.
    """
    out = np.array(maps, dtype=np.float32)  # (K, H, W)
    for c in range(1, len(out)):
        low, high = out[c].min(), out[c].max()
        span = high - low
        out[c] = np.minimum((out[c] - low) / span, ratio) / ratio if span > 0 else 0.0
    return out


def drs_scores(maps: np.ndarray, saliency: np.ndarray, cue_threshold: float) -> np.ndarray:
    """Scores ``[1 - saliency ; cues]``: the class channels with values below ``cue_threshold`` zeroed.

    Args:
        maps: (K, H, W) maps, channel 0 background (replaced).
        saliency: (H, W) saliency in [0, 1].
        cue_threshold: DRS: 0.2.

    Returns:
        (K, H, W) float32 scores; their argmax is DRS's initial pseudo label.
    """
    scores = np.array(maps, dtype=np.float32)  # (K, H, W)
    scores[1:][scores[1:] < cue_threshold] = 0.0
    scores[0] = 1.0 - saliency
    return scores


def drs_ignore(labels: np.ndarray, scores: np.ndarray, saliency: np.ndarray, conflict_threshold: float) -> np.ndarray:
    """DRS's ignored pixels: two or more channels above ``conflict_threshold``, or fully salient but background.

    Args:
        labels: (H, W) uint8 pseudo label.
        scores: (K, H, W) the :func:`drs_scores` it came from.
        saliency: (H, W) saliency in [0, 1].
        conflict_threshold: DRS: 0.9.

    Returns:
        (H, W) uint8 labels with those pixels 255.
    """
    out = labels.copy()
    out[(scores > conflict_threshold).sum(0) >= 2] = IGNORE
    out[(saliency >= 1.0) & (labels == 0)] = IGNORE
    return out


def epom(labels: np.ndarray, maps: np.ndarray, keys: np.ndarray, fg_threshold: float) -> np.ndarray:
    """Efficient potential object mining: background pixels that look like a present class become 255.

    Per class ``c = keys[k]`` (map ``maps[k]``): the threshold is the median of the map over the pixels labelled
    ``c``; if none is, the upper quartile over the pixels whose map exceeds ``fg_threshold`` (none either: the class
    is skipped). Background pixels (label 0) above the threshold become 255.

    Args:
        labels: (H, W) uint8 pseudo label.
        maps: (K, H, W) class maps (channel 0 unused).
        keys: (K,) class ids, ``keys[0] == 0``.
        fg_threshold: ``T_fg`` of the class-absent branch.

    Returns:
        (H, W) uint8 labels.
    """
    out = labels.copy()
    background = labels == 0
    for k in range(1, len(keys)):
        own = labels == keys[k]
        if own.any():
            threshold = np.median(maps[k][own])
        elif (maps[k] > fg_threshold).any():
            threshold = np.percentile(maps[k][maps[k] > fg_threshold], 75)
        else:
            continue
        out[background & (maps[k] > threshold)] = IGNORE
    return out


def check_saliency_dir(folder: Path | str) -> Path:
    """The saliency folder as a path.

    Raises:
        DatasetError: If it is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"refine.wegformer.saliency: {folder} is not a folder of <image_id>.png saliency maps")
    return folder


def load_saliency(folder: Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """Read ``<folder>/<image_id>.png`` (grey 0..255, RGB is converted) as (H, W) float32 in [0, 1].

    Raises:
        DatasetError: If the file is missing, unreadable, or not of the image's size ``(H, W)``.
    """
    path = folder / f"{image_id}.png"
    if not path.is_file():
        raise DatasetError(f"saliency map missing: {path} (refine.wegformer.saliency needs one per image)")
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # (H, W)
    except OSError as exc:
        raise DatasetError(f"saliency map unreadable: {path} ({exc})") from None
    if grey.shape != tuple(size):
        raise DatasetError(f"saliency map {path} is {grey.shape[1]}x{grey.shape[0]}, its image {size[1]}x{size[0]}")
    return grey


ORACLE = "oracle"  # refine.wegformer.saliency: the ground-truth foreground (an upper bound, never a method)


def oracle_saliency(data: PreparedDataset, image_id: str) -> np.ndarray:
    """ORACLE saliency from the ground truth (an upper bound, never a method): 1 on objects, 0 on background.

    The ignore band around objects counts as salient.

    Returns:
        (H, W) float32 in {0, 1}.

    Raises:
        DatasetError: If the image has no ground-truth mask.
    """
    if not data.mask_path(image_id).is_file():
        raise DatasetError(f"refine.wegformer.saliency = oracle needs a ground-truth mask: {image_id} has none")
    return (data.load_mask(image_id) != 0).astype(np.float32)  # (H, W)
